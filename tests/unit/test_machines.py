"""Named machines without a guest: the registry, and `sm exec` / `ps` / `stop` against a
stand-in daemon (a held lock, a machine.json, and a Unix socket that answers
``CONNECT 52`` with ``OK`` and then relays to the agent running on this host)."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
from dataclasses import asdict
from pathlib import Path

import pytest

from tests.cli_runner import sm
from tests.unit.agent_harness import AgentProcess
from vmm import machines
from vmm.agent_client import AgentUnavailable, connect_vsock_uds


def _relay(a: socket.socket, b: socket.socket) -> None:
    try:
        while data := a.recv(1 << 16):
            b.sendall(data)
        b.shutdown(socket.SHUT_WR)
    except OSError:
        pass


class FakeVsockSocket:
    """The Firecracker-style socket of a vsock device whose guest runs ``agent`` on port 52."""

    def __init__(self, path: Path, agent: AgentProcess | None):
        self.agent = agent
        self.lines: list[bytes] = []
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen(8)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            line = b""
            while not line.endswith(b"\n"):
                line += client.recv(1)
            self.lines.append(line)
            if self.agent is None or line != b"CONNECT 52\n":
                client.close()   # the guest refused: the device closes the socket
                continue
            client.sendall(b"OK 1073741824\n")
            upstream = self.agent.connect()
            threading.Thread(target=_relay, args=(client, upstream), daemon=True).start()
            threading.Thread(target=_relay, args=(upstream, client), daemon=True).start()

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("SM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def fake_machine(home: Path, name: str, socket_path: Path, alive: bool = True,
                 state: str = "running") -> int | None:
    """A machine directory; with ``alive`` its lock is held (returns the fd to keep)."""
    directory = home / "machines" / name
    directory.mkdir(parents=True)
    info = machines.MachineInfo(name, "sm-test/image:1", 2, 256, os.getpid() if alive else 0,
                                0.0, state, str(socket_path), env=("GREETING=hi", "PATH=/usr/bin:/bin"),
                                workdir="/tmp")
    (directory / machines.STATE_FILE).write_text(json.dumps(asdict(info)))
    fd = os.open(directory / machines.LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    if alive:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd
    os.close(fd)
    return None


@pytest.fixture
def running(home, tmp_path):
    agent = AgentProcess(sys.executable, tmp_path / "agent.sock")
    vsock = FakeVsockSocket(tmp_path / "v.sock", agent)
    lock = fake_machine(home, "box", tmp_path / "v.sock")
    yield vsock
    os.close(lock)
    vsock.close()
    agent.stop()


def test_names_are_checked():
    for bad in ("", "-x", "a/b", "..", "x" * 64, "a b"):
        with pytest.raises(machines.MachinesError, match="bad machine name"):
            machines.check_name(bad)
    assert machines.check_name("web-1.test_a") == "web-1.test_a"


def test_an_unknown_machine_is_one_line(home):
    result = sm("exec", "nothing-here", "--", "true", SM_HOME=str(home))
    assert (result.returncode, result.stderr) == (125, "sm: no machine named 'nothing-here' (see `sm ps`)\n")


def test_a_dead_daemon_is_reported_and_cleaned_by_ps(home, tmp_path):
    fake_machine(home, "ghost", tmp_path / "gone.sock", alive=False)
    result = sm("exec", "ghost", "--", "true", SM_HOME=str(home))
    assert result.returncode == 125 and "machine 'ghost' is not running" in result.stderr
    listing = sm("ps", SM_HOME=str(home))
    assert "ghost" in listing.stdout and "dead: daemon gone, leftovers removed" in listing.stdout
    assert not (home / "machines" / "ghost").exists()
    assert "ghost" not in sm("ps", SM_HOME=str(home)).stdout


def test_stop_of_a_dead_daemon_removes_its_leftovers(home, tmp_path):
    fake_machine(home, "ghost", tmp_path / "gone.sock", alive=False)
    result = sm("stop", "ghost", SM_HOME=str(home))
    assert result.returncode == 0
    assert "ghost was not running (its daemon had exited); removed what it left" in result.stderr
    assert not (home / "machines" / "ghost").exists()


def test_a_name_in_use_is_refused(home, tmp_path):
    lock = fake_machine(home, "taken", tmp_path / "t.sock")
    try:
        with pytest.raises(machines.MachinesError, match="a machine named 'taken' already exists"):
            machines._claim(home / "machines", "taken")
    finally:
        os.close(lock)


def test_ps_lists_a_running_machine(home, running):
    header, row = sm("ps", SM_HOME=str(home)).stdout.splitlines()
    assert header.split() == ["NAME", "IMAGE", "CPUS", "MEMORY", "UPTIME", "STATE"]
    assert row.split()[:5] == ["box", "sm-test/image:1", "2", "256", "MiB"]
    assert row.split()[-1] == "running"


def test_exec_streams_output_and_exits_with_the_status(home, running):
    result = sm("exec", "box", "--", "sh", "-c", 'echo "$GREETING $(pwd)"; echo err >&2; exit 7',
                SM_HOME=str(home))
    assert (result.stdout, result.stderr, result.returncode) == ("hi /tmp\n", "err\n", 7)
    assert running.lines == [b"CONNECT 52\n"]


def test_exec_env_cwd_and_stdin(home, running):
    result = sm("exec", "--env", "GREETING=hello", "--cwd", "/", "box", "--",
                "sh", "-c", 'read line; echo "$line $GREETING $(pwd)"',
                prefix=["sh", "-c", 'printf "from stdin\\n" | "$@"', "sh"], SM_HOME=str(home))
    assert (result.stdout, result.returncode) == ("from stdin hello /\n", 0)


def test_exec_of_a_killed_command_is_128_plus_the_signal(home, running):
    assert sm("exec", "box", "--", "sh", "-c", "kill -TERM $$", SM_HOME=str(home)).returncode == 143


def test_exec_of_a_missing_command_is_127(home, running):
    result = sm("exec", "box", "--", "no-such-program", SM_HOME=str(home))
    assert result.returncode == 127 and result.stderr.count("\n") == 1


def test_bad_env_is_one_line(home, running):
    result = sm("exec", "--env", "NOVALUE", "box", "--", "true", SM_HOME=str(home))
    assert (result.returncode, result.stderr) == (125, "sm: --env 'NOVALUE' is not NAME=VALUE\n")


def test_a_refused_port_is_agent_unavailable(tmp_path):
    vsock = FakeVsockSocket(tmp_path / "v.sock", None)
    try:
        with pytest.raises(ConnectionRefusedError, match="nothing listens on guest vsock port 52"):
            connect_vsock_uds(tmp_path / "v.sock")
        client = machines.AgentClient.over_vsock_uds(tmp_path / "v.sock")
        with pytest.raises(AgentUnavailable, match="cannot connect to the guest agent"):
            client.ping()
    finally:
        vsock.close()
