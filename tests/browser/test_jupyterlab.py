"""JupyterLab in a real browser, on the sm kernel.

Runs on the host: JupyterLab and the sm kernel run where guests can run (in the test bed
here, its port forwarded to the host's 127.0.0.1 only; directly on hardware KVM), and
Debian's Chromium, driven by playwright-core (tests/browser/lab.mjs), opens the notebooks.
Screenshots go to build/browser-test/. See docs/browser-test.md.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parents[1]
SCREENSHOTS = PROJECT / "build" / "browser-test"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# Waiting for a test bed slot, booting it and starting JupyterLab under emulation.
SERVER_TIMEOUT = 3600
# Starting the kernel boots a microVM in the test bed; lab.mjs has its own deadlines.
SCENARIO_TIMEOUT = 1200


@dataclass
class Lab:
    url: str
    token: str
    log: Path

    def request(self, method: str, path: str, timeout: float = 30) -> bytes:
        request = urllib.request.Request(f"{self.url}{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()

    def log_tail(self, lines: int = 60) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n--- JupyterLab's run (last lines) ---\n" + "\n".join(text.splitlines()[-lines:])


def missing_host_tools() -> list[str]:
    missing = [] if shutil.which("node") else ["node (apt-get install nodejs npm)"]
    if not Path(CHROMIUM).exists():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    if not (HERE / "node_modules" / "playwright-core").is_dir():
        missing.append("playwright-core (npm ci --prefix tests/browser)")
    return missing


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_serving(lab: Lab, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + SERVER_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"JupyterLab's run ended (status {server.returncode}) before it served"
                        + lab.log_tail())
        try:
            json.loads(lab.request("GET", "/api/status", timeout=10))
            return
        except (OSError, http.client.HTTPException, ValueError):
            time.sleep(2)   # not up yet: QEMU accepts, then drops or hangs until it is
    pytest.fail(f"JupyterLab did not answer within {SERVER_TIMEOUT} s" + lab.log_tail())


@pytest.fixture(scope="module")
def lab():
    if os.environ.get("SM_IN_TESTBED") == "1":
        pytest.fail("the browser test runs on the host (it starts the test bed itself): "
                    "run it with the host's pytest, not inside the test bed")
    missing = missing_host_tools()
    if missing:
        pytest.fail(f"the browser test needs {', '.join(missing)}: run make setup")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    port = free_port()
    lab = Lab(f"http://127.0.0.1:{port}", secrets.token_hex(16), SCREENSHOTS / "jupyterlab.log")
    # One port number on both sides: a direct run (hardware KVM) listens on the host itself.
    argv = [sys.executable, "-m", "tests.testbed", "auto", "--timeout", str(SERVER_TIMEOUT),
            "--forward", f"{port}:{port}", "--",
            "python", "tests/browser/serve_lab.py", "--port", str(port), "--token", lab.token]
    with open(lab.log, "w") as log:
        server = subprocess.Popen(argv, cwd=PROJECT, stdin=subprocess.DEVNULL, stdout=log,
                                  stderr=subprocess.STDOUT)
    try:
        wait_until_serving(lab, server)
        yield lab
        lab.request("POST", "/api/shutdown")
        server.wait(timeout=300)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def run_in_browser(lab: Lab, scenario: str) -> subprocess.CompletedProcess:
    """lab.mjs's run of one scenario; then its kernel (a microVM) is shut down."""
    try:
        return subprocess.run(["node", "lab.mjs", scenario, lab.url, lab.token,
                               str(SCREENSHOTS / f"{scenario}.png")],
                              cwd=HERE, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=SCENARIO_TIMEOUT, env={**os.environ, "CHROMIUM": CHROMIUM})
    finally:
        for session in json.loads(lab.request("GET", "/api/sessions")):
            lab.request("DELETE", f"/api/sessions/{session['id']}", timeout=300)


def test_a_cell_run_in_the_browser_shows_the_sm_kernels_output(lab):
    result = run_in_browser(lab, "arithmetic")
    assert result.returncode == 0, result.stdout + result.stderr + lab.log_tail()
    assert 'arithmetic.ipynb open, kernel "Python (sm microVM)" idle' in result.stdout
    assert "lab.mjs: print(6*7) printed 42\n" in result.stdout


def test_moving_the_balloon_slider_in_the_browser_changes_the_balloon(lab):
    result = run_in_browser(lab, "balloon")
    assert result.returncode == 0, result.stdout + result.stderr + lab.log_tail()
    assert "lab.mjs: slider moved to " in result.stdout
    assert "lab.mjs: balloon grew to " in result.stdout
