import hashlib
import os
import socket
import threading

import pytest

from tests.unit.vsock_guest import GuestConn, GuestVsock
from vmm.devices.virtio import mmio
from vmm.devices.virtio.device import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_VSOCK,
)
from vmm.devices.virtio.vsock import Vsock
from vmm.devices.virtio.vsock.connection import BUF_ALLOC
from vmm.devices.virtio.vsock.packet import (
    EVENT_TRANSPORT_RESET,
    OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RST,
    OP_RW,
    OP_SHUTDOWN,
    SHUTDOWN_BOTH,
    SHUTDOWN_RCV,
    SHUTDOWN_SEND,
    Header,
)

CID = 3
MB = 1 << 20


@pytest.fixture
def vsock():
    device = Vsock(CID)
    yield device
    device.close()


@pytest.fixture
def guest(vsock):
    g = GuestVsock(vsock, CID)
    yield g
    g.close()


def in_thread(target, *args):
    result = {}

    def run():
        try:
            result["value"] = target(*args)
        except BaseException as error:  # noqa: BLE001 - re-raised by join()
            result["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join(timeout=30):
        thread.join(timeout)
        assert not thread.is_alive(), "host thread hung"
        if "error" in result:
            raise result["error"]
        return result.get("value")

    return join


def recv_all(sock, size=None):
    chunks = []
    total = 0
    while size is None or total < size:
        data = sock.recv(1 << 16)
        if not data:
            break
        chunks.append(data)
        total += len(data)
    return b"".join(chunks)


def host_connect(guest, vsock, port):
    guest.listen(port)
    join = in_thread(vsock.connect, port)
    conn = guest.accepted(port)
    return join(), conn


# --- identity ---------------------------------------------------------------------


def test_identity_features_and_config(vsock):
    memory_transport = GuestVsock(vsock, CID)
    t = memory_transport.transport
    assert int.from_bytes(t.read(mmio.REG_DEVICE_ID, 4), "little") == VIRTIO_ID_VSOCK == 19
    assert vsock.avail_features & (1 << VIRTIO_F_VERSION_1)
    assert vsock.avail_features & (1 << VIRTIO_F_EVENT_IDX)
    assert t.read(mmio.CONFIG_SPACE, 4) + t.read(mmio.CONFIG_SPACE + 4, 4) == CID.to_bytes(8, "little")
    memory_transport.close()


@pytest.mark.parametrize("cid", [0, 1, 2, 1 << 32])
def test_reserved_cids_are_refused(cid):
    with pytest.raises(ValueError, match="CID"):
        Vsock(cid)


# --- host → guest connections -------------------------------------------------------


def test_host_connect_handshake_and_echo(guest, vsock):
    guest.listen(5000)
    join = in_thread(vsock.connect, 5000)
    conn = guest.accepted(5000)
    request = next(p for p in guest.packets if p.op == OP_REQUEST)
    assert (request.src_cid, request.dst_cid, request.dst_port) == (2, CID, 5000)
    assert request.buf_alloc == BUF_ALLOC
    stream = join()
    assert stream.guest_port == 5000 and stream.host_port == request.src_port

    stream.sendall(b"ping")
    assert guest.read(conn, 4) == b"ping"
    guest.write(conn, b"pong")
    assert stream.recv(4) == b"pong"
    stream.close()


@pytest.mark.parametrize("event_idx", [False, True])
def test_megabytes_both_ways_with_checksums(vsock, event_idx):
    guest = GuestVsock(vsock, CID, event_idx=event_idx)
    stream, conn = host_connect(guest, vsock, 5001)
    to_guest = os.urandom(3 * MB)
    to_host = os.urandom(3 * MB)
    sender = in_thread(stream.sendall, to_guest)
    receiver = in_thread(recv_all, stream, len(to_host))
    guest.write(conn, to_host)
    got = guest.read(conn, len(to_guest))
    sender()
    assert hashlib.sha256(got).digest() == hashlib.sha256(to_guest).digest()
    assert hashlib.sha256(receiver()).digest() == hashlib.sha256(to_host).digest()
    stream.close()
    guest.close()


def test_connect_to_a_closed_guest_port_is_refused(guest, vsock):
    join = in_thread(vsock.connect, 6000)
    with pytest.raises(ConnectionRefusedError, match="6000"):
        guest.run_until(lambda: any(p.op == OP_REQUEST for p in guest.packets))
        guest.run_until(lambda: not vsock._live)
        join()


def test_connect_times_out_when_the_guest_never_answers(vsock):
    with pytest.raises(TimeoutError, match="did not answer"):
        vsock.connect(6001, timeout=0.2)   # no driver at all
    assert not vsock._live


# --- flow control ----------------------------------------------------------------


def test_host_never_exceeds_the_guest_credit(guest, vsock):
    guest.buf_alloc = 4096
    stream, conn = host_connect(guest, vsock, 5002)
    payload = os.urandom(256 * 1024)
    sender = in_thread(stream.sendall, payload)
    guest.run_until(lambda: len(conn.data) == 4096, what="a full guest buffer")
    for _ in range(20):          # the host keeps trying; the guest does not read
        guest.poll()
    assert len(conn.data) == 4096
    got = guest.read(conn, len(payload))   # GuestError if the device ever oversends
    sender()
    assert got == payload
    stream.close()


def test_stalled_host_reader_stops_the_guest_without_loss(guest, vsock):
    stream, conn = host_connect(guest, vsock, 5003)
    payload = os.urandom(4 * MB)
    with pytest.raises(TimeoutError, match="credit"):
        guest.write(conn, payload, timeout=0.5)
    assert conn.credit == 0
    [device_conn] = vsock._live
    assert len(device_conn.to_host) <= BUF_ALLOC
    sent_before_stall = conn.sent
    assert sent_before_stall < len(payload)
    receiver = in_thread(recv_all, stream, len(payload))
    guest.write(conn, payload[sent_before_stall:])
    assert receiver() == payload
    stream.close()


def test_credit_request_is_answered(guest, vsock):
    stream, conn = host_connect(guest, vsock, 5004)
    count = len(guest.packets)
    guest.send(conn, OP_CREDIT_REQUEST)
    guest.run_until(lambda: len(guest.packets) > count)
    assert guest.packets[-1].op == OP_CREDIT_UPDATE and guest.packets[-1].buf_alloc == BUF_ALLOC
    stream.close()


# --- shutdown and reset ----------------------------------------------------------


def test_half_close_from_the_host(guest, vsock):
    stream, conn = host_connect(guest, vsock, 5005)
    stream.sendall(b"request")
    stream.shutdown(socket.SHUT_WR)
    assert guest.read(conn, 100) == b"request"     # then end of stream
    assert conn.peer_shutdown == SHUTDOWN_SEND
    guest.write(conn, b"reply")
    guest.send(conn, OP_SHUTDOWN, flags=SHUTDOWN_BOTH)
    assert recv_all(stream) == b"reply"
    guest.run_until(lambda: conn.reset, what="RST closing the connection")
    stream.close()
    guest.run_until(lambda: not vsock._live)


def test_half_close_from_the_guest(guest, vsock):
    stream, conn = host_connect(guest, vsock, 5006)
    guest.write(conn, b"question")
    guest.send(conn, OP_SHUTDOWN, flags=SHUTDOWN_SEND)
    assert recv_all(stream) == b"question"
    stream.sendall(b"answer")
    assert guest.read(conn, 6) == b"answer"
    stream.close()
    guest.run_until(lambda: conn.peer_shutdown == SHUTDOWN_BOTH, what="SHUTDOWN after close")
    guest.send(conn, OP_RST)
    guest.run_until(lambda: not vsock._live)


def test_host_close_sends_shutdown_then_forgets_after_rst(guest, vsock):
    stream, conn = host_connect(guest, vsock, 5007)
    stream.sendall(b"last words")
    stream.close()
    assert guest.read(conn, 100) == b"last words"
    assert conn.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND
    guest.send(conn, OP_RST)
    guest.run_until(lambda: not vsock._live)


def test_guest_close_mid_stream_delivers_everything_then_eof(guest, vsock):
    stream, conn = host_connect(guest, vsock, 5008)
    data = os.urandom(200 * 1024)
    guest.write(conn, data)
    guest.send(conn, OP_SHUTDOWN, flags=SHUTDOWN_BOTH)
    guest.run_until(lambda: conn.reset, what="RST answering the guest's close")
    assert recv_all(stream) == data
    stream.close()


def test_guest_reset_reaches_the_host_as_one_exception(guest, vsock):
    stream, conn = host_connect(guest, vsock, 5009)
    guest.send(conn, OP_RST)
    guest.run_until(lambda: not vsock._live)
    with pytest.raises(ConnectionResetError, match="5009: the guest reset"):
        stream.recv(10)
    with pytest.raises(ConnectionResetError):
        stream.sendall(b"x" * MB)
    stream.close()


# --- guest → host connections ---------------------------------------------------------


def test_guest_connects_to_a_host_listener(guest, vsock):
    with vsock.listen(7000) as listener:
        conn = guest.connect(7000)
        assert conn.state == "established"
        stream = listener.accept(timeout=5)
        assert (stream.host_port, stream.guest_port) == (7000, conn.port)
        guest.write(conn, b"hello host")
        assert stream.recv(100) == b"hello host"
        stream.sendall(b"hello guest")
        assert guest.read(conn, 11) == b"hello guest"
        stream.close()


def test_guest_connect_to_an_unknown_host_port_gets_rst(guest, vsock):
    conn = guest.connect(7001)
    assert conn.reset


def test_listener_backlog_overflow_is_refused(guest, vsock):
    with vsock.listen(7002, backlog=1) as listener:
        assert guest.connect(7002).state == "established"
        assert guest.connect(7002).reset
        listener.accept(timeout=1).close()
    with pytest.raises(TimeoutError):
        vsock.listen(7003).accept(timeout=0.05)


def test_64_concurrent_connections(guest, vsock):
    count = 64
    guest.listen(8000)
    joins = [in_thread(vsock.connect, 8000) for _ in range(count)]
    guest.run_until(lambda: len(guest.conns) == count, what="64 connections")
    streams = {}
    for join in joins:
        stream = join()
        streams[stream.host_port] = stream
    payloads = {port: os.urandom(32 * 1024) for port in streams}
    senders = [in_thread(streams[port].sendall, payloads[port]) for port in streams]
    for conn in guest.conns.values():
        guest.run_until(lambda c=conn: len(c.data) >= 32 * 1024 or len(c.data) == c.buf_alloc)
    for conn in list(guest.conns.values()):
        data = guest.read(conn, 32 * 1024)
        assert data == payloads[conn.peer_port]
        guest.write(conn, data[::-1])
    for sender in senders:
        sender()
    for port, stream in streams.items():
        assert recv_all(stream, 32 * 1024) == payloads[port][::-1]
        stream.close()


# --- a hostile guest -------------------------------------------------------------------


def test_guest_exceeding_its_credit_is_reset(guest, vsock):
    stream, conn = host_connect(guest, vsock, 5010)
    chunk = os.urandom(65536)
    for _ in range(2 * BUF_ALLOC // len(chunk) + 4):   # ignores the credit the device advertised
        guest.send(conn, OP_RW, chunk)
    guest.run_until(lambda: conn.reset, what="RST for the credit violation")
    with pytest.raises(ConnectionResetError, match="credit"):
        recv_all(stream)
    assert not any(c.to_host for c in vsock._live)
    stream.close()


def test_garbage_packets_are_dropped_and_the_device_keeps_working(guest, vsock):
    base = {"src_cid": CID, "dst_cid": 2, "src_port": 1, "dst_port": 2, "len": 0, "type": 1,
            "op": OP_REQUEST, "flags": 0, "buf_alloc": 0, "fwd_cnt": 0}
    guest.send_raw(Header(**{**base, "src_cid": 99}).pack())
    guest.send_raw(Header(**{**base, "dst_cid": 7}).pack())
    guest.send_raw(Header(**{**base, "op": 42}).pack())
    guest.send_raw(Header(**{**base, "type": 2}).pack())
    guest.send_raw(Header(**{**base, "op": OP_RW, "len": 1000}).pack(), b"short")    # lies about len
    guest.send_raw(Header(**{**base, "op": OP_RW, "len": 1 << 20}).pack())
    guest.send_raw(b"\x00" * 20)
    guest.run_until(lambda: len(guest.free_tx) == 64)
    assert sum(vsock.dropped_packets.values()) == 7
    assert set(vsock.dropped_packets) == {
        "WrongSourceCid", "WrongDestinationCid", "UnknownOp", "UnsupportedSocketType",
        "DescChainTooShortForData", "InvalidPktLen", "DescChainTooShortForHeader"}
    assert not guest.transport.broken
    stream, conn = host_connect(guest, vsock, 5011)
    stream.sendall(b"still alive")
    assert guest.read(conn, 11) == b"still alive"
    stream.close()


def test_packets_for_unknown_connections_get_rst_and_stay_bounded(guest, vsock):
    base = {"src_cid": CID, "dst_cid": 2, "src_port": 1, "dst_port": 2, "len": 0, "type": 1,
            "op": OP_RW, "flags": 0, "buf_alloc": 0, "fwd_cnt": 0}
    guest.send_raw(Header(**{**base, "len": 3}).pack(), b"abc")
    guest.run_until(lambda: any(p.op == OP_RST for p in guest.packets))
    rst = next(p for p in guest.packets if p.op == OP_RST)
    assert (rst.src_port, rst.dst_port) == (2, 1)
    # A flood of them with no rx buffers posted: the device keeps a bounded queue.
    for port in range(2000):
        guest.send_raw(Header(**{**base, "op": OP_SHUTDOWN, "src_port": port}).pack())
        guest.free_tx.extend(h // 2 for h, _ in guest.rings[1].take_used())
    assert len(vsock._stray_rsts) <= 256


def test_guest_lying_about_its_credit_cannot_grow_host_memory(guest, vsock):
    stream, conn = host_connect(guest, vsock, 5012)
    before = len(guest.packets)
    guest.send(conn, OP_CREDIT_UPDATE, fwd_cnt=0x80000000)   # "consumed" more than it was sent
    sender = in_thread(stream.sendall, b"y" * 100000)
    guest.run_until(lambda: len(guest.packets) > before)
    assert guest.packets[before].op == OP_CREDIT_REQUEST       # no data on a nonsense credit
    # The guest answers honestly, then claims an enormous window: what the device
    # sends is still bounded by the rx buffers the guest posts.
    guest.send(conn, OP_CREDIT_UPDATE, buf_alloc=0xFFFFFFFF, fwd_cnt=0)
    guest.run_until(lambda: conn.received == 100000)
    sender()
    assert not any(c.to_host for c in vsock._live)
    stream.close()


def test_guest_sending_before_the_handshake_resets(guest, vsock):
    guest.ignore_requests = True
    join = in_thread(vsock.connect, 5013, 5)
    guest.run_until(lambda: any(p.op == OP_REQUEST for p in guest.packets))
    request = next(p for p in guest.packets if p.op == OP_REQUEST)
    rogue = GuestConn(request.dst_port, request.src_port, 4096)
    guest.send(rogue, OP_RW, b"early")
    with pytest.raises(ConnectionResetError, match="before the handshake"):
        join()


# --- resets of the whole transport ---------------------------------------------------


def test_transport_reset_event_and_connections_reset(guest, vsock):
    stream, _ = host_connect(guest, vsock, 5014)
    vsock.transport_reset()
    guest.run_until(lambda: guest.events == [EVENT_TRANSPORT_RESET])
    with pytest.raises(ConnectionResetError, match="transport reset"):
        stream.recv(1)
    assert not vsock._live
    stream2, conn2 = host_connect(guest, vsock, 5015)   # and it works again afterwards
    stream2.sendall(b"again")
    assert guest.read(conn2, 5) == b"again"
    stream.close()
    stream2.close()


def test_broken_ring_from_the_device_thread_needs_reset(guest, vsock):
    stream, _ = host_connect(guest, vsock, 5018)
    guest.memory.write_int(guest.rings[0].avail_ring + 2, 2, guest.rings[0].avail_idx + 1000)
    stream.sendall(b"data")    # the device thread now pops the rx ring and finds it overrun
    guest.run_until(lambda: guest.transport.broken, what="DEVICE_NEEDS_RESET")
    assert vsock._thread.is_alive()
    stream.close()


def test_driver_reset_resets_connections(guest, vsock):
    stream, _ = host_connect(guest, vsock, 5016)
    guest.reg(mmio.REG_STATUS, 0)
    with pytest.raises(ConnectionResetError, match="reset its vsock device"):
        stream.recv(1)
    stream.close()


def test_close_resets_streams_and_stops_the_thread(guest, vsock):
    stream, _ = host_connect(guest, vsock, 5017)
    vsock.close()
    assert not vsock._thread.is_alive()
    with pytest.raises(ConnectionResetError, match="machine stopped"):
        stream.recv(1)
    with pytest.raises(ConnectionRefusedError, match="closed"):
        vsock.connect(1)
    stream.close()
