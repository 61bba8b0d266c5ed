"""The Firecracker-compatible Unix socket: CONNECT <port> / OK <port>, and <uds>_<port>."""

import os
import socket

import pytest

from tests.unit.test_vsock_device import in_thread, recv_all
from tests.unit.vsock_guest import GuestVsock
from vmm.devices.virtio.vsock import Vsock
from vmm.devices.virtio.vsock.packet import OP_REQUEST

CID = 7


@pytest.fixture
def uds(tmp_path):
    return str(tmp_path / "v.sock")


@pytest.fixture
def vsock(uds):
    device = Vsock(CID, uds_path=uds)
    yield device
    device.close()


@pytest.fixture
def guest(vsock):
    g = GuestVsock(vsock, CID)
    yield g
    g.close()


def uds_client(path, line):
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(10)
    client.connect(path)
    client.sendall(line)
    return client


def read_line(sock):
    line = b""
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            break
        line += byte
    return line


def test_connect_ok_then_stream(guest, uds):
    guest.listen(52)
    # Data right after the CONNECT line belongs to the stream, not to the handshake.
    client = uds_client(uds, b"CONNECT 52\nearly bytes")
    conn = guest.accepted(52)
    ok = in_thread(read_line, client)
    line = ok()
    request = next(p for p in guest.packets if p.op == OP_REQUEST)
    assert line == f"OK {request.src_port}\n".encode()
    assert guest.read(conn, 11) == b"early bytes"
    payload = os.urandom(300_000)
    receiver = in_thread(recv_all, client, len(payload))
    guest.write(conn, payload)
    assert receiver() == payload
    client.close()
    guest.run_until(lambda: conn.peer_shutdown == 3, what="SHUTDOWN after the client left")


def test_connect_to_a_closed_guest_port_closes_the_client(guest, uds):
    client = uds_client(uds, b"CONNECT 99\n")
    eof = in_thread(client.recv, 100)
    guest.run_until(lambda: any(p.op == OP_REQUEST for p in guest.packets))
    assert eof() == b""
    client.close()


@pytest.mark.parametrize("line", [b"HELLO 52\n", b"CONNECT\n", b"CONNECT abc\n", b"CONNECT 99999999999\n",
                                  b"CONNECT 52" + b" " * 40])
def test_bad_connect_lines_close_the_client(guest, vsock, uds, line):
    client = uds_client(uds, line)
    try:
        assert client.recv(100) == b""
    except ConnectionResetError:
        pass  # closed with the client's bytes unread: a reset, as TCP would say
    client.close()
    assert not vsock._live


def test_guest_connection_goes_to_the_port_socket(guest, uds):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(f"{uds}_1234")
    server.listen(1)
    server.settimeout(10)
    conn = guest.connect(1234)
    assert conn.state == "established"
    peer, _ = server.accept()
    peer.settimeout(10)
    guest.write(conn, b"from the guest")
    assert peer.recv(100) == b"from the guest"
    peer.sendall(b"from the host")
    assert guest.read(conn, 13) == b"from the host"
    peer.close()
    server.close()
    assert guest.connect(1235).reset     # no socket there


def test_the_socket_path_must_not_exist(uds):
    open(uds, "w").close()
    with pytest.raises(FileExistsError, match="remove it"):
        Vsock(CID, uds_path=uds)


def test_close_removes_the_socket(uds):
    Vsock(CID, uds_path=uds).close()
    assert not os.path.exists(uds)
