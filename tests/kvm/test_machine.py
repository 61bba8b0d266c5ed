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
# then says how many bytes it saw and their sha256.
ECHO_SERVER = f"""
import hashlib, socket, threading
def serve(conn):
    total, digest = 0, hashlib.sha256()
    while True:
        data = conn.recv(65536)
        if not data:
            break
        total += len(data)
        digest.update(data)
        conn.sendall(data)
    conn.sendall(b"total=%d sha256=%s" % (total, digest.hexdigest().encode()))
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


def _tree_sums(root) -> dict[str, str]:
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file() and not path.is_symlink()}


def test_put_and_get_a_50_mb_file_with_checksums(machine, tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(50 << 20))
    expected = hashlib.sha256(big.read_bytes()).hexdigest()
    machine.put(big, "/root/big.bin")
    assert machine.exec(["sha256sum", "/root/big.bin"]).stdout.split()[0].decode() == expected
    machine.get("/root/big.bin", tmp_path / "back.bin")
    assert hashlib.sha256((tmp_path / "back.bin").read_bytes()).hexdigest() == expected
    machine.exec(["rm", "/root/big.bin"])   # guest RAM: the root filesystem's writes live there


def test_put_and_get_a_tree_with_checksums(machine, tmp_path):
    tree = tmp_path / "tree"
    for index in range(40):
        path = tree / f"d{index % 5}" / f"sub{index % 3}" / f"f{index}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(index * 9973))   # empty, small, and several 64 KiB frames
    (tree / "top.txt").write_text("top\n")
    (tree / "link").symlink_to("top.txt")
    machine.put(tree, "/root/tree")
    listing = machine.exec(["sh", "-c", "cd /root/tree && find . -type f | xargs sha256sum"])
    guest = {name.decode()[2:]: digest.decode()
             for digest, name in (line.split() for line in listing.stdout.splitlines())}
    assert guest == _tree_sums(tree)
    machine.get("/root/tree", tmp_path / "tree-back")
    assert _tree_sums(tmp_path / "tree-back") == _tree_sums(tree)
    assert os.readlink(tmp_path / "tree-back" / "link") == "top.txt"


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


def test_100_mb_echo_through_vsock_both_ways_with_checksums(machine, echo_server):
    """100 MB host→guest and the same back at once; each side checks what it got."""
    chunks = [os.urandom(1 << 20) for _ in range(100)]
    total = 100 << 20
    sent = hashlib.sha256()
    for chunk in chunks:
        sent.update(chunk)
    received, count = hashlib.sha256(), 0
    with machine.vsock.connect(echo_server) as conn:
        def send() -> None:
            for chunk in chunks:
                conn.sendall(chunk)
            conn.shutdown(socket.SHUT_WR)
        sender = threading.Thread(target=send)
        sender.start()
        tail = b""
        while data := conn.recv(1 << 16):
            take = max(0, min(len(data), total - count))   # then the server's summary line
            received.update(data[:take])
            count += take
            tail += data[take:]
        sender.join()
    assert count == total
    assert received.hexdigest() == sent.hexdigest()
    assert tail == b"total=%d sha256=%s" % (total, sent.hexdigest().encode())


def test_64_concurrent_vsock_connections(machine, echo_server):
    payloads = [os.urandom(64 << 10) for _ in range(64)]
    results: dict[int, bytes] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(
        i, echo(machine, echo_server, payloads[i]))) for i in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert all(results[i] == payloads[i] + b"total=65536 sha256=%s" % hashlib.sha256(
        payloads[i]).hexdigest().encode() for i in range(64))


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
                assert time.monotonic() < deadline, f"the agent did not come back; console: {m.console[-3000:]}"
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
