"""`sm start` → `sm exec` → `sm ps` → `sm snapshot` / `sm restore` → `sm stop` on a real
guest, as a user runs them.

One machine (the default image) is started for the module; its last test stops it.
Its snapshots are restored (no boot) into a second machine, one at a time.
"""

from __future__ import annotations

import secrets

import pytest

from tests.cli_runner import sm
from vmm import machines
from vmm.agent_client import AgentClient, connect_vsock_uds

pytestmark = pytest.mark.usefixtures("linux_kvm", "guest_initramfs")


@pytest.fixture(scope="module")
def name():
    name = f"sm-test-{secrets.token_hex(3)}"
    started = sm("start", "--name", name, "--memory", "384")
    assert (started.returncode, started.stdout) == (0, f"{name}\n"), started.stderr
    yield name
    if (machines.machines_dir() / name).exists():
        sm("stop", name)


def test_exec_streams_output_and_exits_with_the_command_status(name):
    result = sm("exec", name, "--", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (result.stdout, result.stderr, result.returncode) == ("out\n", "err\n", 3)


def test_exec_passes_stdin_env_cwd_and_user(name):
    result = sm("exec", "--env", "GREETING=hello", "--cwd", "/tmp", "--user", "65534", name, "--",
                "sh", "-c", 'read line; echo "$line $GREETING $(pwd) $(id -u)"',
                prefix=["sh", "-c", 'printf "from stdin\\n" | "$@"', "sh"])
    assert (result.stdout, result.returncode) == ("from stdin hello /tmp 65534\n", 0)


def test_exec_runs_python_of_the_image_and_reports_a_signal(name):
    assert sm("exec", name, "--", "python3", "-c", "print(6*7)").stdout == "42\n"
    assert sm("exec", name, "--", "sh", "-c", "kill -KILL $$").returncode == 128 + 9


def test_a_missing_command_is_127_and_one_line(name):
    result = sm("exec", name, "--", "no-such-program")
    assert result.returncode == 127
    assert result.stderr.count("\n") == 1 and "no-such-program" in result.stderr


def test_the_vsock_socket_speaks_connect_for_other_tools(name):
    socket_link = machines.machines_dir() / name / machines.SOCKET_LINK
    with AgentClient(connect_vsock_uds(socket_link)) as client:
        assert client.ping() > 0


def test_a_name_in_use_is_refused_at_once(name):
    result = sm("start", "--name", name)
    assert result.returncode == 125
    assert result.stderr == (f"sm: a machine named {name!r} already exists: choose another "
                             "--name, or `sm stop` it first\n")


def test_a_machine_that_cannot_start_says_why_in_one_line():
    result = sm("start", "sm-test/no-such-image:1")
    assert result.returncode == 125
    assert result.stderr.startswith("sm: ") and result.stderr.count("\n") == 1
    assert "sm-test/no-such-image:1" in result.stderr


def test_ps_lists_the_machine(name):
    rows = [line.split() for line in sm("ps").stdout.splitlines()]
    assert rows[0] == ["NAME", "IMAGE", "CPUS", "MEMORY", "UPTIME", "STATE"]
    row = next(row for row in rows if row[0] == name)
    assert row[2:5] == ["1", "384", "MiB"] and row[-1] == "running"


def _snapshot_rows() -> dict[str, list[str]]:
    listing = sm("snapshots")
    assert listing.returncode == 0, listing.stderr
    return {row.split()[0]: row.split() for row in listing.stdout.splitlines()[1:]}


def test_snapshot_restore_under_another_name_diff_and_remove(name):
    snap, diff, clone = f"{name}-snap", f"{name}-diff", f"{name}-clone"
    assert sm("exec", name, "--", "sh", "-c", "echo before > /tmp/mark").returncode == 0
    taken = sm("snapshot", name, snap)
    assert taken.returncode == 0, taken.stderr
    assert taken.stdout.split()[0] == snap and "  full  " in taken.stdout
    assert sm("exec", name, "--", "sh", "-c", "echo after > /tmp/mark").returncode == 0
    try:
        restored = sm("restore", snap, "--name", clone)
        assert (restored.returncode, restored.stdout) == (0, f"{clone}\n"), restored.stderr
        assert sm("exec", clone, "--", "cat", "/tmp/mark").stdout == "before\n"
        assert sm("exec", name, "--", "cat", "/tmp/mark").stdout == "after\n"   # still running
        assert sm("exec", clone, "--", "sh", "-c", "echo clone > /tmp/mark").returncode == 0
        taken = sm("snapshot", "--diff", clone, diff)
        assert taken.returncode == 0 and f"  diff of {snap}  " in taken.stdout, taken.stderr
    finally:
        sm("stop", clone)

    rows = _snapshot_rows()
    assert rows[snap][1:4] == ["full", "sm/python-default:latest", "-"]
    assert rows[diff][1:4] == ["diff", "sm/python-default:latest", snap]
    assert any(row[1] == "base" for row in rows.values())   # the warm base `sm start` used
    refused = sm("rm-snapshot", snap)
    assert refused.returncode == 125 and f"is the parent of {diff!r}" in refused.stderr

    try:   # the diff chain comes back through the CLI too
        assert sm("restore", diff, "--name", clone).returncode == 0
        assert sm("exec", clone, "--", "cat", "/tmp/mark").stdout == "clone\n"
    finally:
        sm("stop", clone)
    removed = sm("rm-snapshot", diff, snap)
    assert (removed.returncode, removed.stdout) == (0, f"{diff}\n{snap}\n")
    assert snap not in _snapshot_rows() and diff not in _snapshot_rows()


def test_stop_powers_it_off_and_removes_it(name):   # last: the machine is gone after it
    stopped = sm("stop", name)
    assert (stopped.returncode, stopped.stdout) == (0, f"{name}\n")
    assert not (machines.machines_dir() / name).exists()
    assert name not in sm("ps").stdout
    result = sm("exec", name, "--", "true")
    assert (result.returncode, result.stderr) == (125, f"sm: no machine named {name!r} (see `sm ps`)\n")
