"""The Machine API on a real guest: the agent over virtio-vsock, and vsock streams themselves.

One machine (the default image) is booted for the module; tests that break it boot their own.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
import time

import pytest

from tests.kvm.test_run import PLAIN_IMAGE, busybox_images  # noqa: F401  (fixture)
from vmm import Machine
from vmm.agent_client import AgentUnavailable, CommandNotFound
from vmm.machine import MachineError

pytestmark = pytest.mark.usefixtures("linux_kvm", "guest_initramfs")

ECHO_PORT = 5000
# A vsock echo server in the guest: each connection echoes until the host half-closes,
# then says how many bytes it saw.
ECHO_SERVER = f"""
import socket, threading
def serve(conn):
    total = 0
    while True:
        data = conn.recv(65536)
        if not data:
            break
        total += len(data)
        conn.sendall(data)
    conn.sendall(b"total=%d" % total)
    conn.close()
server = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
server.bind((socket.VMADDR_CID_ANY, {ECHO_PORT}))
server.listen(128)
print("listening", flush=True)
while True:
    threading.Thread(target=serve, args=(server.accept()[0],), daemon=True).start()
"""


@pytest.fixture(scope="module")
def machine():
    with Machine.boot(memory_mib=512) as m:
        yield m


@pytest.fixture(scope="module")
def echo_server(machine):
    stream = machine.exec_stream(["python3", "-c", ECHO_SERVER])
    assert next(iter(stream)).data == b"listening\n"
    yield ECHO_PORT
    stream.send_signal(signal.SIGKILL)


def test_python_in_the_default_image_says_42(machine):
    result = machine.exec(["python3", "-c", "print(6*7)"])
    assert (result.stdout, result.exit_code) == (b"42\n", 0)


def test_exit_status_stderr_stdin_env_cwd_and_user(machine):
    result = machine.exec(["sh", "-c", 'read line; echo "$line $GREETING $(pwd) $(id -u)"; '
                                       'echo oops >&2; exit 3'],
                          stdin=b"hello\n", env={"GREETING": "world", "PATH": "/usr/bin:/bin"},
                          cwd="/tmp", user="65534")
    assert result.stdout == b"hello world /tmp 65534\n"
    assert result.stderr == b"oops\n"
    assert result.exit_code == 3


def test_a_signal_reaches_the_process(machine):
    stream = machine.exec_stream(["sh", "-c", "echo ready; exec sleep 600"])
    assert next(iter(stream)).data == b"ready\n"
    stream.send_signal(signal.SIGTERM)
    result = stream.result(timeout=30)
    assert result.signal == signal.SIGTERM


def test_a_missing_command_is_one_clear_error(machine):
    with pytest.raises(CommandNotFound, match="no-such-program"):
        machine.exec(["no-such-program"])


def test_put_and_get_a_file_and_a_tree_with_checksums(machine, tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(20 << 20))
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "leaf.txt").write_text("leaf\n")
    (tree / "top.txt").write_text("top\n")
    machine.put(big, "/root/big.bin")
    machine.put(tree, "/root/tree")
    guest_sum = machine.exec(["sha256sum", "/root/big.bin"]).stdout.split()[0].decode()
    assert guest_sum == hashlib.sha256(big.read_bytes()).hexdigest()
    machine.get("/root/big.bin", tmp_path / "back.bin")
    machine.get("/root/tree", tmp_path / "tree-back")
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()
    assert (tmp_path / "tree-back" / "a" / "b" / "leaf.txt").read_text() == "leaf\n"


def echo(machine, port: int, payload: bytes) -> bytes:
    with machine.vsock.connect(port) as conn:
        sender = threading.Thread(target=lambda: (conn.sendall(payload),
                                                  conn.shutdown(socket.SHUT_WR)))
        sender.start()
        received = bytearray()
        while chunk := conn.recv(1 << 16):
            received += chunk
        sender.join()
    return bytes(received)


def test_a_vsock_stream_echoes_bytes_both_ways_and_half_closes(machine, echo_server):
    payload = os.urandom(16 << 20)
    received = echo(machine, echo_server, payload)
    assert received == payload + b"total=%d" % len(payload)


def test_64_concurrent_vsock_connections(machine, echo_server):
    payloads = [os.urandom(64 << 10) for _ in range(64)]
    results: dict[int, bytes] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(
        i, echo(machine, echo_server, payloads[i]))) for i in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert all(results[i] == payloads[i] + b"total=65536" for i in range(64))


def test_a_stalled_host_reader_loses_nothing(machine):
    stream = machine.exec_stream(["python3", "-c",
                                  "import os; os.write(1, bytes(range(256)) * 40960)"])
    time.sleep(3)   # the guest fills every buffer and blocks on credit meanwhile
    result = stream.result(timeout=120)
    assert result.stdout == bytes(range(256)) * 40960
    assert result.exit_code == 0


def test_the_agent_comes_back_after_kill_9():
    with Machine.boot() as m:
        agent_pid = m.exec(["sh", "-c", "echo $PPID"]).stdout.strip().decode()
        with pytest.raises(AgentUnavailable):
            m.exec(["sh", "-c", f"kill -9 {agent_pid}"])
        # init's loop starts the agent again; the client reconnects on the next call
        deadline = time.monotonic() + 60
        while True:
            try:
                assert m.exec(["echo", "back"]).stdout == b"back\n"
                break
            except AgentUnavailable:
                assert time.monotonic() < deadline, "the agent did not come back"
                time.sleep(0.5)
        assert m.exec(["sh", "-c", "echo $PPID"]).stdout.strip().decode() != agent_pid


def test_an_image_without_python_says_the_agent_cannot_run(busybox_images):  # noqa: F811
    with pytest.raises(MachineError, match="has no python3, so the agent cannot run"):
        Machine.boot(PLAIN_IMAGE)


def test_two_machines_run_at_once_in_one_process(machine):
    with Machine.boot() as other:
        machine.exec(["sh", "-c", "echo one > /root/who"])
        other.exec(["sh", "-c", "echo two > /root/who"])
        assert machine.exec(["cat", "/root/who"]).stdout == b"one\n"
        assert other.exec(["cat", "/root/who"]).stdout == b"two\n"
