"""Run the ``sm`` CLI as a user would, in a subprocess that can never hang a test.

A command past its deadline gets SIGABRT: with ``-X faulthandler`` it prints every
thread's stack, and that goes into the test failure instead of a silent hang.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest


def sm(*args: str, timeout: float = 600, prefix: list[str] | None = None,
       **env: str) -> subprocess.CompletedProcess:
    argv = [*(prefix or []), sys.executable, "-X", "faulthandler", "-m", "vmm.cli", *args]
    with subprocess.Popen(argv, env={**os.environ, **env}, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)
            stdout, stderr = process.communicate()
            pytest.fail(f"`sm {' '.join(args)}` hung for {timeout} s; its threads:\n{stderr}\n"
                        f"its output:\n{stdout[-4000:]}", pytrace=False)
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)
