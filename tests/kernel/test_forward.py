"""PortForward and the agent's forward operation, on the host (the agent over a Unix socket)."""

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from sm_kernel.forward import ForwardError, PortForward, open_forward
from vmm.guest import agent as agent_module


@pytest.fixture
def agent(tmp_path):
    path = str(tmp_path / "agent.sock")
    process = subprocess.Popen([sys.executable, agent_module.__file__, "--unix", path], stderr=subprocess.DEVNULL)
    while not os.path.exists(path):
        assert process.poll() is None
        time.sleep(0.01)

    def connect():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        return sock

    yield connect
    process.kill()
    process.wait()


@pytest.fixture
def greeting_server():
    """A TCP server that speaks first (as ZMTP does), then echoes in upper case."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.sendall(b"GREETING\n")
            while data := conn.recv(65536):
                conn.sendall(data.upper())
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()


def recv_exactly(sock, size):
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "closed early"
        data += chunk
    return data


def test_forward_carries_bytes_both_ways_and_keeps_the_first_ones(agent, greeting_server):
    sock = agent()
    open_forward(sock, greeting_server)
    assert recv_exactly(sock, 9) == b"GREETING\n"
    payload = os.urandom(3 << 20).hex().encode()[:3 << 20]
    threading.Thread(target=sock.sendall, args=(payload,), daemon=True).start()
    assert recv_exactly(sock, len(payload)) == payload.upper()
    sock.close()


def test_forward_to_a_closed_port_is_refused_and_the_connection_stays_usable(agent):
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    sock = agent()
    with pytest.raises(ForwardError, match=f"cannot connect to 127.0.0.1:{port}"):
        open_forward(sock, port)
    sock.close()


@pytest.mark.parametrize("port", [0, 70000, "80", True])
def test_bad_ports_are_refused(agent, port):
    sock = agent()
    with pytest.raises(ForwardError):
        open_forward(sock, port)


def test_port_forward_serves_a_unix_path_and_cuts_connections_on_close(agent, greeting_server, tmp_path):
    forward = PortForward(agent, greeting_server, str(tmp_path / "fwd.sock"))
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(forward.path)
    assert recv_exactly(client, 9) == b"GREETING\n"
    client.sendall(b"abc")
    assert recv_exactly(client, 3) == b"ABC"
    forward.close()
    client.settimeout(10)
    assert client.recv(10) == b""
    assert not os.path.exists(forward.path)
