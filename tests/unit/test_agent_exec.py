"""The guest agent's exec, run on the host over a Unix socket (as root, like in a guest).

The ``agent`` fixture runs each test under this interpreter and under the oldest python3
on the machine (the agent supports 3.8+)."""

import hashlib
import os
import signal
import sys
import threading
import time

import pytest

from tests.unit.agent_harness import AgentProcess, child_states, oldest_python3
from vmm.agent_client import (
    AgentClient,
    AgentRequestFailed,
    AgentUnavailable,
    CommandNotFound,
    ExecFailed,
    ExecTimeout,
)
from vmm.guest import agent as wire

INTERPRETERS = {"host-python": sys.executable, "oldest-python": oldest_python3()}


@pytest.fixture(scope="module", params=list(INTERPRETERS))
def agent(request, tmp_path_factory):
    python = INTERPRETERS[request.param]
    process = AgentProcess(python, tmp_path_factory.mktemp("agent") / "agent.sock")
    yield process
    process.stop()


@pytest.fixture
def client(agent):
    with agent.client() as client:
        yield client


def test_hello_names_protocol_and_python(client, agent):
    info = client.hello()
    assert info["protocol"] == 1 and info["agent"] == "sm-agent" and info["pid"] == agent.pid


@pytest.mark.parametrize("code", [0, 1, 3, 255])
def test_exit_codes(client, code):
    result = client.exec(["sh", "-c", f"exit {code}"])
    assert (result.exit_code, result.signal) == (code, None)


def test_stdout_and_stderr_are_separate(client):
    result = client.exec(["sh", "-c", "for i in 1 2 3; do echo out$i; echo err$i >&2; done"])
    assert result.stdout == b"out1\nout2\nout3\n"
    assert result.stderr == b"err1\nerr2\nerr3\n"


def test_killed_by_signal_reports_it(client):
    result = client.exec(["sh", "-c", "kill -TERM $$"])
    assert (result.exit_code, result.signal) == (128 + signal.SIGTERM, signal.SIGTERM)


def test_send_signal_to_running_process(client):
    with client.exec_stream(["sh", "-c", "echo ready; exec sleep 30"]) as stream:
        first = next(iter(stream))
        assert first.data == b"ready\n"
        stream.send_signal(signal.SIGINT)
        result = stream.result(timeout=10)
    assert result.signal == signal.SIGINT


def test_stdin_larger_than_the_window(client):
    data = os.urandom(3 * 1024 * 1024 + 17)
    result = client.exec(["cat"], stdin=data)
    assert result.stdout == data and result.exit_code == 0


def test_stdin_written_while_streaming(client):
    with client.exec_stream(["sh", "-c", "read line; echo got:$line"]) as stream:
        stream.write(b"hello\n")
        result = stream.result(timeout=10)
    assert result.stdout == b"got:hello\n"


def test_env_and_default_path(client):
    result = client.exec(["sh", "-c", 'echo "$FOO|$PATH"'], env={"FOO": "bar baz"})
    foo, path = result.stdout.decode().strip().split("|")
    assert foo == "bar baz" and "/usr/bin" in path


def test_cwd(client, tmp_path):
    assert client.exec(["pwd"], cwd=str(tmp_path)).stdout.decode().strip() == str(tmp_path)


@pytest.mark.parametrize("user", ["65534", "nobody", "65534:65534"])
def test_user(client, user):
    result = client.exec(["sh", "-c", "id -u; id -g; echo $HOME"], user=user)
    uid, gid, home = result.stdout.decode().split()
    assert uid == "65534" and gid == "65534"
    assert home != "/root"


def test_numeric_user_without_passwd_entry_gets_gid_0(client):
    assert client.exec(["sh", "-c", "id -u; id -g"], user="4242").stdout.split() == [b"4242", b"0"]


def test_unknown_user_is_refused(client):
    with pytest.raises(ExecFailed, match="no user 'no-such-user'"):
        client.exec(["true"], user="no-such-user")


def test_missing_command_is_a_clear_error_and_the_connection_survives(agent):
    sock = agent.connect()
    with AgentClient(sock, io_timeout=10) as client:  # one connection: it must stay usable
        with pytest.raises(CommandNotFound, match="no-such-command: command not found"):
            client.exec(["no-such-command", "arg"])
        assert client.exec(["echo", "still here"]).stdout == b"still here\n"


def test_missing_cwd_is_not_reported_as_missing_command(client):
    with pytest.raises(ExecFailed, match="working directory /no/such/dir"):
        client.exec(["true"], cwd="/no/such/dir")


def test_output_streams_before_exit(client):
    with client.exec_stream(["sh", "-c", "echo first; sleep 1; echo second"]) as stream:
        started = time.monotonic()
        chunks = iter(stream)
        assert next(chunks).data == b"first\n"
        assert time.monotonic() - started < 0.9
        assert b"".join(c.data for c in chunks) == b"second\n"
    assert stream.exit_code == 0


def test_timeout_kills_the_process_group_and_keeps_partial_output(client):
    with pytest.raises(ExecTimeout, match="still running after 0.5 s") as caught:
        client.exec(["sh", "-c", "echo partial; sleep 30 & sleep 30"], timeout=0.5)
    assert caught.value.stdout == b"partial\n"
    assert client.exec(["true"]).exit_code == 0


def test_pty(client):
    result = client.exec(["sh", "-c", "tty; stty size"], pty=True)
    lines = result.stdout.decode().split("\r\n")
    assert lines[0].startswith("/dev/pts/") and lines[1] == "24 80"


def test_pty_resize_and_stdin(client):
    with client.exec_stream(["sh", "-c", "read x; stty size"], pty=(30, 100)) as stream:
        stream.resize(40, 120)
        stream.write(b"go\n")
        result = stream.result(timeout=10)
    assert b"40 120" in result.stdout


def test_concurrent_execs_on_separate_connections(client):
    results = {}

    def run(index):
        results[index] = client.exec(["sh", "-c", f"sleep 0.3; echo {index}"])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert time.monotonic() - started < 2.0
    assert {i: r.stdout for i, r in results.items()} == {i: f"{i}\n".encode() for i in range(8)}


def test_orphans_are_reaped(client, agent):
    # The shell exits at once; its background child becomes the agent's (child subreaper).
    client.exec(["sh", "-c", "sleep 0.2 & exit 0"])
    deadline = time.monotonic() + 5
    while child_states(agent.pid):  # the sleep, then nothing: never a zombie left behind
        assert time.monotonic() < deadline, child_states(agent.pid)
        time.sleep(0.05)


def test_stats(client):
    stats = client.stats()
    assert 0 < stats.mem_available <= stats.mem_total
    assert stats.uptime > 0 and len(stats.load) == 3 and stats.procs_total >= 1


def test_ping(client):
    assert client.ping() >= 0


def test_set_clock_rejects_nonsense(client):
    # The real clock_settime is exercised in a guest: setting the host's clock is not a unit test.
    with pytest.raises(AgentRequestFailed, match="'time' must be positive"):
        client.set_clock(-5)


def test_reseed_takes_host_entropy_and_rejects_a_bad_seed(client):
    client.reseed()     # as root this credits the host's own pool: harmless
    for seed in (b"short", b"x" * 513):
        with pytest.raises(AgentRequestFailed, match="'seed' must be 16 to 512 bytes"):
            client.reseed(seed)
    with pytest.raises(AgentRequestFailed, match="'seed' must be"):
        client._run("reseed", {"seed": "not hex"})


def test_large_stdout_stream(tmp_path, host_agent):
    data = os.urandom(50 * 1024 * 1024)
    source = tmp_path / "big"
    source.write_bytes(data)
    with host_agent.client() as client:
        result = client.exec(["cat", str(source)])
    assert len(result.stdout) == len(data)
    assert hashlib.sha256(result.stdout).digest() == hashlib.sha256(data).digest()


def test_agent_killed_mid_exec_gives_one_clear_error(tmp_path):
    victim = AgentProcess(sys.executable, tmp_path / "victim.sock")
    try:
        with victim.client(io_timeout=10) as client:
            with client.exec_stream(["sh", "-c", "echo running; sleep 30"]) as stream:
                chunks = iter(stream)
                assert next(chunks).data == b"running\n"
                os.kill(victim.pid, signal.SIGKILL)
                started = time.monotonic()
                with pytest.raises(AgentUnavailable, match="closed the connection"):
                    list(chunks)
                assert time.monotonic() - started < 5
            victim.process.wait(5)  # all its sockets closed, the listener too
            with pytest.raises(AgentUnavailable, match="cannot connect"):
                client.exec(["true"])
    finally:
        victim.stop()


@pytest.fixture(scope="module")
def host_agent(tmp_path_factory):
    process = AgentProcess(sys.executable, tmp_path_factory.mktemp("agent") / "agent.sock")
    yield process
    process.stop()


def test_silent_command_sends_heartbeats(host_agent):
    sock = host_agent.connect()
    sock.settimeout(20)
    frames = wire.FrameReader(sock.recv)
    wire.send_frame(sock, wire.HELLO, wire.encode_json({"protocol": wire.PROTOCOL_VERSION}))
    assert frames.read()[0] == wire.HELLO
    wire.send_frame(sock, wire.REQUEST, wire.encode_json({"op": "exec", "argv": ["sleep", "5.5"]}))
    wire.send_frame(sock, wire.STDIN_EOF)
    seen = []
    while not seen or seen[-1] != wire.EXIT:
        seen.append(frames.read()[0])
    assert seen == [wire.REPLY, wire.HEARTBEAT, wire.EXIT]
    wire.send_frame(sock, wire.DONE)
    sock.close()


def test_nul_byte_in_env_is_a_bad_request(client):
    with pytest.raises(AgentRequestFailed, match="embedded null byte"):
        client.exec(["true"], env={"A": "x\0y"})
    assert client.exec(["true"]).exit_code == 0


def test_argv_must_be_a_list(client):
    with pytest.raises(TypeError, match="argv is a list"):
        client.exec("ls -l")
