"""Runs the guest agent on the host for tests: a subprocess listening on a Unix socket,
and a scripted fake agent for the hostile-agent tests."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from vmm.agent_client import AgentClient
from vmm.guest import agent as wire

AGENT_FILE = Path(wire.__file__)


def oldest_python3() -> str:
    """The oldest working python3 >= 3.8 on this machine (the agent's floor), else this one."""
    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates = sorted(glob.glob(f"{pyenv_root}/versions/3.*/bin/python3"))
    candidates += [shutil.which(f"python3.{minor}") for minor in range(8, 12)]
    found = {}
    for candidate in filter(None, candidates):
        try:
            output = subprocess.run([candidate, "-c", "import sys; print(*sys.version_info[:2])"],
                                    capture_output=True, text=True, timeout=30, check=False).stdout
        except OSError:
            continue
        if output.split():  # pyenv shims of versions not selected print nothing on stdout
            version = tuple(map(int, output.split()))
            if version >= (3, 8):
                found.setdefault(version, candidate)
    return found[min(found)] if found else sys.executable


class AgentProcess:
    def __init__(self, python: str, socket_path: Path):
        self.python = python
        self.socket_path = socket_path
        self.process = subprocess.Popen(
            [python, "-I", "-S", str(AGENT_FILE), "--unix", str(socket_path)],
            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 15
        while not socket_path.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"agent under {python} did not start: {self.process.stderr.read()!r}")
            time.sleep(0.01)

    @property
    def pid(self) -> int:
        return self.process.pid

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(self.socket_path))
        return sock

    def client(self, io_timeout: float = 10.0) -> AgentClient:
        return AgentClient(self.connect, io_timeout=io_timeout)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        self.process.stderr.close()


class FakeAgent:
    """One connection whose agent end runs ``script(sock, frames)`` in a thread."""

    def __init__(self, script):
        self.client_sock, self._agent_sock = socket.socketpair()
        self._thread = threading.Thread(target=self._run, args=(script,), daemon=True)
        self._thread.start()

    def _run(self, script):
        try:
            script(self._agent_sock, wire.FrameReader(self._agent_sock.recv))
        except OSError:
            pass

    def close(self):
        self._agent_sock.close()
        self._thread.join(5)


def answer_hello(sock, frames):
    frame_type, _ = frames.read()
    assert frame_type == wire.HELLO
    wire.send_frame(sock, wire.HELLO, wire.encode_json({"protocol": wire.PROTOCOL_VERSION}))


def child_states(pid: int) -> list[str]:
    """The states (R, S, Z...) of the processes whose parent is ``pid``."""
    states = []
    for status in glob.glob("/proc/[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in Path(status).read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            states.append(fields["State"].split()[0])
    return states
