"""The test bed runner, exercised from the host: it boots the test bed for real."""

import http.client
import os
import socket
import subprocess
import sys
import time
import urllib.request
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
    others = set(leftover_qemus())   # test beds of other runs on this host are not ours
    result = run_testbed("--timeout", "2", "--", "sleep", "600")
    assert result.returncode == 124
    assert "testbed: the command ran past its timeout of 2 s" in result.stderr
    assert set(leftover_qemus()) - others == set()


def test_a_wedged_test_bed_is_booted_again():
    result = run_testbed("--stall-timeout", "15", "--", "sh", "-c",
                         "test -e /testbed/first && echo second attempt && exit 0; "
                         "touch /testbed/first; sleep 600")
    assert "testbed: no output for 15 s: the test bed seems wedged; booting it again " \
           "(attempt 2 of 3)" in result.stderr
    assert result.stdout.splitlines()[-1] == "second attempt"
    assert result.returncode == 0


def test_after_a_crashed_test_bed_the_suite_resumes_where_it_stopped():
    result = run_testbed("--", "python", "-m", "pytest", "tests/testbed/sample_resumable.py")
    assert "testbed: the test bed stopped before the command finished" in result.stderr
    assert "booting it again (attempt 2 of 3)" in result.stderr
    assert "Kernel panic" in result.stderr      # the console's tail says why
    assert "1 tests finished earlier (0 failed) are left out" in result.stdout, result.stdout
    assert "2 passed, 1 deselected" in result.stdout
    assert result.returncode == 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def fetch_until_served(url: str, runner: subprocess.Popen) -> str:
    """Until the server inside listens, QEMU accepts the connection and drops it (or, before
    the test bed's NIC is up, leaves it hanging)."""
    while runner.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                return response.read().decode()
        except (OSError, http.client.HTTPException):
            time.sleep(1)
    raise AssertionError(f"the test bed run ended (status {runner.returncode}) before serving")


def test_a_forwarded_port_reaches_a_server_inside_and_nothing_else_goes_out():
    port = free_port()
    with socket.socket() as host_listener:   # what the test bed must not reach
        host_listener.bind(("127.0.0.1", 0))
        host_listener.listen()
        outbound_port = host_listener.getsockname()[1]
        runner = subprocess.Popen(
            [sys.executable, "-m", "tests.testbed", "run", "--timeout", "600",
             "--forward", f"{port}:8000", "--", "python", "tests/testbed/sample_server.py",
             "8000", str(outbound_port)],
            cwd=PROJECT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        try:
            page = fetch_until_served(f"http://127.0.0.1:{port}/", runner)
            stdout, stderr = runner.communicate(timeout=300)
        finally:
            runner.kill()
    assert page == "served from the test bed; outbound blocked\n", stdout + stderr
    assert "listening on 8000" in stdout
    assert runner.returncode == 0


def test_a_forward_to_a_port_in_use_is_refused_with_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        result = run_testbed("--forward", f"{port}:80", "--", "true")
    assert result.returncode == 125
    assert f"testbed: cannot forward 127.0.0.1:{port} into the test bed" in result.stderr
