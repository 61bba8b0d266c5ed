"""The test bed runner, exercised from the host: it boots the test bed for real."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.testbed import image

PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def built_image():
    return image.build()


def run_testbed(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.testbed", "run", *args], cwd=PROJECT,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)


def leftover_qemus() -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "qemu-system" in cmdline and "testbed-run-" in cmdline:
            found.append(cmdline)
    return found


def test_a_failing_test_inside_fails_the_run_with_its_output():
    result = run_testbed("--", "python", "-m", "pytest", "-q", "tests/testbed/sample_failing.py")
    assert "1 failed, 1 passed" in result.stdout, result.stdout + result.stderr
    assert "assert 'failing' == 'on purpose'" in result.stdout
    assert result.returncode == 1


def test_all_output_and_the_exit_status_of_the_command_come_back():
    result = run_testbed("--", "sh", "-c", "seq 1 5000; echo inside $(hostname); exit 7")
    assert result.stdout.splitlines()[-5001:] == [*map(str, range(1, 5001)), "inside testbed"]
    assert result.returncode == 7


def test_a_command_past_its_timeout_is_stopped_with_one_line():
    result = run_testbed("--timeout", "2", "--", "sleep", "600")
    assert result.returncode == 124
    assert "testbed: the command ran past its timeout of 2 s" in result.stderr
    assert leftover_qemus() == []


def test_a_wedged_test_bed_is_booted_again_once():
    result = run_testbed("--stall-timeout", "15", "--", "sh", "-c",
                         "test -e /testbed/first && echo second attempt && exit 0; "
                         "touch /testbed/first; sleep 600")
    assert "testbed: no output for 15 s: the test bed seems wedged; booting it again " \
           "(attempt 2 of 2)" in result.stderr
    assert result.stdout.splitlines()[-1] == "second attempt"
    assert result.returncode == 0
