"""Named machines without a guest: the registry, and `sm exec` / `ps` / `stop` against a
stand-in daemon (a held lock, a machine.json, and a Unix socket that answers
``CONNECT 52`` with ``OK`` and then relays to the agent running on this host); and
`sm snapshot` / `snapshots` / `rm-snapshot` against the daemon's real control server
holding a stand-in Machine that writes snapshots without a guest."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from tests.cli_runner import sm
from tests.unit.agent_harness import AgentProcess
from vmm import machines, named_snapshots
from vmm.agent_client import AgentUnavailable, connect_vsock_uds
from vmm.balloon import MemoryBalloon
from vmm.snapshot import snapshot as snapshots
from vmm.snapshot.errors import SnapshotError
from vmm.snapshot.state_file import write_state


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
                 state: str = "running", control_socket: Path | None = None) -> int | None:
    """A machine directory; with ``alive`` its lock is held (returns the fd to keep)."""
    directory = home / "machines" / name
    directory.mkdir(parents=True)
    info = machines.MachineInfo(name, "sm-test/image:1", 2, 256, os.getpid() if alive else 0,
                                0.0, state, str(socket_path), env=("GREETING=hi", "PATH=/usr/bin:/bin"),
                                workdir="/tmp", control_uds=str(control_socket or ""))
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


# ---- snapshots: the daemon's control socket, and the named snapshot directory -------------

def write_snapshot(path: Path, parent: Path | None = None, image: str = "sm/python-default:latest") -> None:
    """A snapshot directory `vmm.snapshot.snapshot.info` accepts: a state file and a 1 MiB
    sparse memory file (no machine state: it is never restored)."""
    path.mkdir(parents=True)
    parent_created = snapshots.info(parent).created if parent is not None else None
    write_state(path / snapshots.STATE_FILE, {
        "vmm_version": snapshots.vmm_version(), "created": time.time(),
        "parent": str(parent) if parent is not None else None, "parent_created": parent_created,
        "pages": None, "meta": {"image": image}, "state": {},
        "machine": {"cpus": 1, "memory_mib": 1, "layout": [[0, 1 << 20]], "cmdline": "",
                    "disks": []}})
    with open(path / snapshots.MEMORY_FILE, "wb") as memory:
        memory.truncate(1 << 20)


class StubBalloonDevice:
    """The balloon device as MemoryBalloon drives it; the "guest" meets every target."""

    def __init__(self):
        self.target_pages = self.actual_pages = 0

    def set_target(self, pages: int) -> None:
        self.target_pages = self.actual_pages = pages

    def request_stats(self, timeout: float) -> dict[int, int]:
        return {4: 300 << 20, 5: 512 << 20}          # free, total (virtio balloon tags)


class StubMachine:
    """What the daemon's control server needs of a Machine: snapshot(path, diff), balloon."""

    def __init__(self):
        self.last: Path | None = None
        self.fail: Exception | None = None
        self.calls: list[tuple[str, bool]] = []
        self.balloon = MemoryBalloon(StubBalloonDevice(), 512)

    def snapshot(self, path, diff=False):
        self.calls.append((path, diff))
        if self.fail is not None:
            raise self.fail
        write_snapshot(Path(path), parent=self.last if diff else None)
        self.last = Path(path)
        return snapshots.info(path)


@pytest.fixture
def snapshot_dir(home, monkeypatch) -> Path:
    monkeypatch.setenv("SM_SNAPSHOTS", str(home / "snapshots"))
    return home / "snapshots"


@pytest.fixture
def daemon(home, snapshot_dir, tmp_path):
    """A machine "box" whose control socket is served by the daemon's own server class."""
    machine = StubMachine()
    server = machines._ControlServer(tmp_path / "c.ctl", machine)
    lock = fake_machine(home, "box", tmp_path / "v.sock", control_socket=tmp_path / "c.ctl")
    yield machine, server
    os.close(lock)
    server.close()


def test_snapshot_through_the_daemon_then_list_and_remove(home, snapshot_dir, daemon):
    machine, _ = daemon
    env = {"SM_HOME": str(home), "SM_SNAPSHOTS": str(snapshot_dir)}
    full = sm("snapshot", "box", "s1", **env)
    assert full.returncode == 0, full.stderr
    assert full.stdout.split()[0] == "s1" and "  full  " in full.stdout
    diff = sm("snapshot", "--diff", "box", "s2", **env)
    assert diff.returncode == 0 and "  diff of s1  " in diff.stdout
    assert machine.calls == [(str(snapshot_dir / "s1"), False), (str(snapshot_dir / "s2"), True)]

    header, *rows = sm("snapshots", **env).stdout.splitlines()
    assert header.split() == ["NAME", "TYPE", "IMAGE", "PARENT", "SIZE", "CREATED"]
    assert [row.split()[:4] for row in rows] == [["s1", "full", "sm/python-default:latest", "-"],
                                                 ["s2", "diff", "sm/python-default:latest", "s1"]]

    refused = sm("rm-snapshot", "s1", **env)
    assert (refused.returncode, refused.stderr) == (
        125, "sm: snapshot 's1' is the parent of 's2': remove that too, or use --force (which "
             "leaves it unusable)\n")
    assert (snapshot_dir / "s1").is_dir()
    removed = sm("rm-snapshot", "s1", "s2", **env)
    assert (removed.returncode, removed.stdout) == (0, "s1\ns2\n")
    assert list(snapshot_dir.iterdir()) == []


def test_a_snapshot_gets_a_dated_name_and_takes_paths(home, snapshot_dir, daemon, tmp_path):
    env = {"SM_HOME": str(home), "SM_SNAPSHOTS": str(snapshot_dir)}
    named = sm("snapshot", "box", **env)
    assert named.returncode == 0, named.stderr
    name = named.stdout.split()[0]
    assert name.startswith("box-") and (snapshot_dir / name / "state").is_file()
    at_path = sm("snapshot", "box", str(tmp_path / "elsewhere" / "s"), **env)
    assert at_path.stdout.split()[0] == str(tmp_path / "elsewhere" / "s")
    assert sm("rm-snapshot", str(tmp_path / "elsewhere" / "s"), **env).returncode == 0


def test_snapshot_errors_are_one_line(home, snapshot_dir, daemon):
    machine, _ = daemon
    env = {"SM_HOME": str(home), "SM_SNAPSHOTS": str(snapshot_dir)}
    machine.fail = SnapshotError("could not write the snapshot to /x: No space left on device "
                                 "(an earlier snapshot there is unchanged)\ndetails")
    result = sm("snapshot", "box", "s1", **env)
    assert (result.returncode, result.stderr) == (
        125, "sm: could not write the snapshot to /x: No space left on device (an earlier "
             "snapshot there is unchanged)\n")
    machine.fail = None
    assert sm("snapshot", "box", "s1", **env).returncode == 0
    cases = {("snapshot", "box", "s1"): "sm: snapshot 's1' already exists: choose another name, "
                                        "or `sm rm-snapshot s1` first\n",
             ("snapshot", "box", "base/x"): "sm: base/ holds the images' warm base snapshots: "
                                            "choose another name\n",
             ("snapshot", "box", ".."): "sm: bad snapshot name '..': use letters, digits, '_', '.' "
                                        "or '-', starting with a letter or digit (or give a path "
                                        "with a '/')\n",
             ("snapshot", "nobox", "s9"): "sm: no machine named 'nobox' (see `sm ps`)\n",
             ("restore", "nothing"): "sm: no snapshot 'nothing' (see `sm snapshots`)\n",
             ("rm-snapshot", "s1", "nothing"): "sm: no snapshot 'nothing' (see `sm snapshots`)\n"}
    for argv, line in cases.items():
        result = sm(*argv, **env)
        assert (result.returncode, result.stderr) == (125, line), argv
    assert (snapshot_dir / "s1").is_dir()   # rm-snapshot removed none of them


def test_a_damaged_snapshot_is_listed_and_refused_by_restore(home, snapshot_dir):
    env = {"SM_HOME": str(home), "SM_SNAPSHOTS": str(snapshot_dir)}
    write_snapshot(snapshot_dir / "base" / "0123abcd")
    write_snapshot(snapshot_dir / "broken")
    with open(snapshot_dir / "broken" / "state", "r+b") as state:
        state.seek(100)
        state.write(b"X")
    listing = sm("snapshots", **env)
    rows = [row.split()[:4] for row in listing.stdout.splitlines()[1:]]
    assert rows == [["broken", "unusable", "-", "-"],
                    ["base/0123abcd", "base", "sm/python-default:latest", "-"]]
    problem = f"{snapshot_dir / 'broken' / 'state'} is truncated or damaged (checksum mismatch): " \
              "take the snapshot again"
    assert listing.stderr == f"sm: snapshot 'broken' cannot be restored: {problem}\n"
    result = sm("restore", "broken", **env)
    assert (result.returncode, result.stderr) == (125, f"sm: {problem}\n")
    assert not (home / "machines").exists()   # refused before a daemon was started


def test_diffs_of_a_kernel_session_keep_their_base(home, snapshot_dir):
    write_snapshot(snapshot_dir / "base" / "k1")
    write_snapshot(snapshot_dir / "kernel-1-ab" / "cell3", parent=snapshot_dir / "base" / "k1")
    with pytest.raises(named_snapshots.SnapshotsError, match="'base/k1' is the parent of '.*cell3'"):
        named_snapshots.remove(["base/k1"])
    assert named_snapshots.remove(["base/k1"], force=True) == [snapshot_dir / "base" / "k1"]
    assert [entry.name for entry in named_snapshots.list_snapshots()] == []


def test_the_control_socket_refuses_bad_requests(daemon, tmp_path):
    machine, _ = daemon

    def ask(line: bytes) -> dict:
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(tmp_path / "c.ctl"))
            client.sendall(line)
            return json.loads(client.makefile("rb").readline())

    for line in (b"not json\n", b"[]\n", b'{"op": "format-disk"}\n', b"\n"):
        assert ask(line)["ok"] is False and "one JSON request per line" in ask(line)["error"]
    for request in ({"op": "snapshot", "path": "relative/x"},
                    {"op": "snapshot", "path": "/x", "diff": "yes"}, {"op": "snapshot"}):
        assert ask(json.dumps(request).encode() + b"\n") == {
            "ok": False, "error": "a snapshot request needs an absolute path and a boolean diff"}
    assert machine.calls == []


def test_a_stopping_daemon_finishes_a_snapshot_and_takes_no_more(home, snapshot_dir, tmp_path):
    started, release = threading.Event(), threading.Event()

    class SlowMachine(StubMachine):
        def snapshot(self, path, diff=False):
            started.set()
            release.wait(10)
            return super().snapshot(path, diff)

    server = machines._ControlServer(tmp_path / "c.ctl", SlowMachine())
    lock = fake_machine(home, "box", tmp_path / "v.sock", control_socket=tmp_path / "c.ctl")
    try:
        taking = threading.Thread(target=machines.snapshot, args=("box", snapshot_dir / "s1"))
        taking.start()
        started.wait(10)
        closing = threading.Thread(target=server.close)
        closing.start()
        closing.join(0.2)
        assert closing.is_alive()   # close() waits for the snapshot being taken
        release.set()
        closing.join(10)
        taking.join(10)
        assert (snapshot_dir / "s1" / "state").is_file()
        assert not (tmp_path / "c.ctl").exists()
        with pytest.raises(machines.MachineNotRunning, match="cannot reach the daemon of machine 'box'"):
            machines.snapshot("box", snapshot_dir / "s2")
    finally:
        os.close(lock)


def test_sm_balloon_sets_the_target_and_shows_the_guest_figures(home, snapshot_dir, daemon):
    machine, _ = daemon
    env = {"SM_HOME": str(home)}
    shown = sm("balloon", "box", "--target", "200", **env)
    assert shown.returncode == 0, shown.stderr
    assert machine.balloon.target_mib == 200
    lines = shown.stdout.splitlines()
    assert lines[0] == "balloon 200 MiB (target 200 MiB) of 512 MiB guest RAM"
    assert lines[1:] == ["  free: 315MB", "  total: 537MB"]
    clamped = sm("balloon", "box", "--target", "4096", **env)
    assert clamped.returncode == 0 and machine.balloon.target_mib == 512
    assert "outside 0..512 MiB" in clamped.stderr
    assert sm("balloon", "nobody", **env).returncode == 125
