"""A guest vsock driver for tests: plays Linux's virtio_transport over the
virtio-mmio transport of a :class:`Vsock`, on guest memory it lays out itself.

Buffers are recycled (rx: header + 4 KiB data descriptors, as Linux 6.1 posts
them; tx: header + data), so megabytes can flow through a small guest RAM. The
test thread drives it: :meth:`GuestVsock.run_until` polls the used rings,
handles packets like the guest kernel would and reposts buffers.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from tests.unit.virtio_driver import FakeDriver
from vmm.devices.virtio import mmio
from vmm.devices.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_F_VERSION_1, feature
from vmm.devices.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from vmm.devices.virtio.vsock.device import EVENT_QUEUE, RX_QUEUE, TX_QUEUE, Vsock
from vmm.devices.virtio.vsock.packet import (
    HEADER,
    HEADER_SIZE,
    HOST_CID,
    MAX_PKT_LEN,
    OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RESPONSE,
    OP_RST,
    OP_RW,
    OP_SHUTDOWN,
    TYPE_STREAM,
    Header,
)
from vmm.memory import GuestMemory

QUEUE_SIZE = 256
RX_DATA = 4096
RX_SLOTS = 64
TX_SLOTS = 64
TX_SLOT_SIZE = HEADER_SIZE + MAX_PKT_LEN
RX_BASE = 0x100000
TX_BASE = 0x200000
EVENT_BASE = 0x30000
MEMORY_SIZE = TX_BASE + TX_SLOTS * ((TX_SLOT_SIZE + 63) & ~63)


class GuestError(AssertionError):
    """The device broke the protocol as the guest sees it."""


@dataclass
class GuestConn:
    port: int            # the guest's port
    peer_port: int       # the host's port
    buf_alloc: int
    state: str = "connecting"
    data: bytearray = field(default_factory=bytearray)  # received, not yet read
    received: int = 0
    consumed: int = 0    # our fwd_cnt
    fwd_cnt_told: int = 0
    sent: int = 0        # our tx_cnt
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    peer_shutdown: int = 0
    reset: bool = False

    @property
    def credit(self) -> int:
        return max(0, self.peer_buf_alloc - ((self.sent - self.peer_fwd_cnt) & 0xFFFFFFFF))


class GuestVsock:
    def __init__(self, device: Vsock, cid: int = 3, event_idx: bool = False, buf_alloc: int = 256 * 1024):
        self.device = device
        self.cid = cid
        self.event_idx = event_idx
        self.buf_alloc = buf_alloc
        self.memory = GuestMemory([(0, MEMORY_SIZE)])
        self.irq = threading.Event()
        self.transport = mmio.MmioTransport(device, self.memory, self.irq.set)
        self.rings = [FakeDriver(self.memory, QUEUE_SIZE, base=0x1000 + 0x8000 * q) for q in range(3)]
        self.conns: dict[tuple[int, int], GuestConn] = {}   # (guest port, host port)
        self.listening: set[int] = set()
        self.ignore_requests = False      # play a guest that never answers a REQUEST
        self.packets: list[Header] = []   # every packet the device sent, in order
        self.events: list[int] = []
        self.free_tx = list(range(TX_SLOTS))
        self.next_port = 50000
        self._handshake(event_idx)
        for slot in range(RX_SLOTS):
            self._post_rx(slot)
        for slot in range(8):
            self._post_event(slot)
        self.kick(RX_QUEUE)
        self.kick(EVENT_QUEUE)

    # --- the transport --------------------------------------------------------------

    def reg(self, offset: int, value: int | None = None) -> int:
        if value is None:
            return int.from_bytes(self.transport.read(offset, 4), "little")
        self.transport.write(offset, value.to_bytes(4, "little"))
        return value

    def _handshake(self, event_idx: bool) -> None:
        self.reg(mmio.REG_STATUS, 1)
        self.reg(mmio.REG_STATUS, 3)
        self.reg(mmio.REG_DEVICE_FEATURES_SEL, 1)
        assert self.reg(mmio.REG_DEVICE_FEATURES) & 1  # VERSION_1
        features = feature(VIRTIO_F_VERSION_1) | (feature(VIRTIO_F_EVENT_IDX) if event_idx else 0)
        for word in (0, 1):
            self.reg(mmio.REG_DRIVER_FEATURES_SEL, word)
            self.reg(mmio.REG_DRIVER_FEATURES, (features >> (32 * word)) & 0xFFFFFFFF)
        self.reg(mmio.REG_STATUS, 11)
        for index, ring in enumerate(self.rings):
            self.reg(mmio.REG_QUEUE_SEL, index)
            self.reg(mmio.REG_QUEUE_NUM, QUEUE_SIZE)
            for low, gpa in ((mmio.REG_QUEUE_DESC_LOW, ring.desc_table),
                             (mmio.REG_QUEUE_DRIVER_LOW, ring.avail_ring),
                             (mmio.REG_QUEUE_DEVICE_LOW, ring.used_ring)):
                self.reg(low, gpa)
                self.reg(low + 4, 0)
            self.reg(mmio.REG_QUEUE_READY, 1)
        self.reg(mmio.REG_STATUS, 15)
        assert self.transport.activated

    def kick(self, queue: int) -> None:
        self.transport.notify(queue)

    # --- buffers ------------------------------------------------------------------------

    def _post_rx(self, slot: int) -> None:
        ring, gpa = self.rings[RX_QUEUE], RX_BASE + slot * (RX_DATA + 64)
        ring.write_desc(2 * slot, gpa, HEADER_SIZE, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2 * slot + 1)
        ring.write_desc(2 * slot + 1, gpa + 64, RX_DATA, VIRTQ_DESC_F_WRITE)
        ring.publish(2 * slot)

    def _post_event(self, slot: int) -> None:
        ring = self.rings[EVENT_QUEUE]
        ring.write_desc(slot, EVENT_BASE + 8 * slot, 4, VIRTQ_DESC_F_WRITE)
        ring.publish(slot)

    def send_raw(self, header: bytes, payload: bytes = b"", extra_descs: list[tuple[int, int, int]] = ()) -> None:
        """Put one packet on the tx queue as given (no checks) and kick."""
        self.run_until(lambda: self.free_tx, what="a free tx slot")
        slot = self.free_tx.pop()
        ring, gpa = self.rings[TX_QUEUE], TX_BASE + slot * ((TX_SLOT_SIZE + 63) & ~63)
        self.memory.write(gpa, header)
        if payload:
            self.memory.write(gpa + 64, payload)
            ring.write_desc(2 * slot, gpa, len(header), VIRTQ_DESC_F_NEXT, 2 * slot + 1)
            ring.write_desc(2 * slot + 1, gpa + 64, len(payload))
        else:
            ring.write_desc(2 * slot, gpa, len(header))
        ring.publish(2 * slot)
        self.kick(TX_QUEUE)

    def send(self, conn: GuestConn, op: int, payload: bytes = b"", flags: int = 0, **override) -> None:
        fields = {"src_cid": self.cid, "dst_cid": HOST_CID, "src_port": conn.port,
                  "dst_port": conn.peer_port, "len": len(payload), "type": TYPE_STREAM, "op": op,
                  "flags": flags, "buf_alloc": conn.buf_alloc, "fwd_cnt": conn.consumed & 0xFFFFFFFF,
                  **override}
        conn.fwd_cnt_told = conn.consumed
        if op == OP_RW:
            conn.sent += len(payload)
        self.send_raw(Header(**fields).pack(), payload)

    # --- the guest kernel's side ------------------------------------------------------------

    def poll(self) -> None:
        """Handle everything the device returned."""
        for head, length in self.rings[TX_QUEUE].take_used():
            self.free_tx.append(head // 2)
        for head, length in self.rings[EVENT_QUEUE].take_used():
            self.events.append(self.memory.read_int(EVENT_BASE + 8 * head, 4))
            self._post_event(head)
            self.kick(EVENT_QUEUE)
        used = self.rings[RX_QUEUE].take_used()
        for head, length in used:
            slot = head // 2
            gpa = RX_BASE + slot * (RX_DATA + 64)
            header = Header(*HEADER.unpack(self.memory.read(gpa, HEADER_SIZE)))
            if length != HEADER_SIZE + header.len:
                raise GuestError(f"used length {length} for a packet of len {header.len}")
            payload = self.memory.read(gpa + 64, header.len)
            self.packets.append(header)
            self._receive(header, payload)
            self._post_rx(slot)
        if used:
            self.kick(RX_QUEUE)
        if self.event_idx:   # ask for an interrupt at the next used buffer of each queue
            for ring in self.rings:
                ring.set_used_event(ring.used_seen)

    def _receive(self, h: Header, payload: bytes) -> None:
        if (h.src_cid, h.dst_cid, h.type) != (HOST_CID, self.cid, TYPE_STREAM):
            raise GuestError(f"bad header {h}")
        conn = self.conns.get((h.dst_port, h.src_port))
        if conn is None:
            if h.op == OP_REQUEST and self.ignore_requests:
                return
            if h.op == OP_REQUEST and h.dst_port in self.listening:
                conn = GuestConn(h.dst_port, h.src_port, self.buf_alloc, state="established")
                self.conns[(conn.port, conn.peer_port)] = conn
                self._credit(conn, h)
                self.send(conn, OP_RESPONSE)
            elif h.op != OP_RST:
                self.send(GuestConn(h.dst_port, h.src_port, 0), OP_RST)
            return
        self._credit(conn, h)
        if h.op == OP_RESPONSE:
            conn.state = "established"
        elif h.op == OP_RST:
            conn.reset = True
            conn.state = "closed"
        elif h.op == OP_RW:
            if conn.received + h.len - conn.consumed > conn.buf_alloc:
                raise GuestError(f"device sent {h.len} bytes beyond our credit")
            conn.received += h.len
            conn.data += payload
        elif h.op == OP_SHUTDOWN:
            conn.peer_shutdown |= h.flags
        elif h.op == OP_CREDIT_REQUEST:
            self.send(conn, OP_CREDIT_UPDATE)

    @staticmethod
    def _credit(conn: GuestConn, h: Header) -> None:
        conn.peer_buf_alloc, conn.peer_fwd_cnt = h.buf_alloc, h.fwd_cnt

    def run_until(self, condition, timeout: float = 10.0, what: str = "the condition") -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.irq.clear()
            self.poll()
            if condition():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"guest: waited {timeout} s for {what}")
            self.irq.wait(0.01)

    # --- sockets, as a guest program uses them -------------------------------------------------

    def listen(self, port: int) -> None:
        self.listening.add(port)

    def accepted(self, port: int) -> GuestConn:
        """Wait for a host connection to guest ``port``."""
        self.run_until(lambda: any(k[0] == port for k in self.conns), what=f"a connection to port {port}")
        return next(c for k, c in self.conns.items() if k[0] == port)

    def connect(self, host_port: int, buf_alloc: int | None = None) -> GuestConn:
        conn = GuestConn(self.next_port, host_port, buf_alloc or self.buf_alloc)
        self.next_port += 1
        self.conns[(conn.port, conn.peer_port)] = conn
        self.send(conn, OP_REQUEST)
        self.run_until(lambda: conn.state != "connecting", what="RESPONSE")
        return conn

    def write(self, conn: GuestConn, data: bytes, timeout: float = 10.0) -> None:
        """Send all of ``data`` within the host's credit."""
        view = memoryview(data)
        while view:
            self.run_until(lambda: conn.credit or conn.reset, timeout, what="credit")
            if conn.reset:
                raise ConnectionResetError("host reset the connection")
            chunk = min(conn.credit, MAX_PKT_LEN, len(view))
            self.send(conn, OP_RW, bytes(view[:chunk]))
            view = view[chunk:]

    def read(self, conn: GuestConn, size: int, timeout: float = 10.0) -> bytes:
        """Exactly ``size`` bytes (fewer at end of stream), giving credit back as Linux does."""
        out = bytearray()
        deadline = time.monotonic() + timeout
        while len(out) < size:
            self.run_until(lambda: conn.data or conn.peer_shutdown & 2 or conn.reset,
                           max(0.0, deadline - time.monotonic()), what="data")
            take = bytes(conn.data[: size - len(out)])
            if not take:
                break
            del conn.data[: len(take)]
            out += take
            conn.consumed += len(take)
            if conn.buf_alloc - (conn.consumed - conn.fwd_cnt_told) < MAX_PKT_LEN or \
                    conn.consumed - conn.fwd_cnt_told >= conn.buf_alloc // 2:
                self.send(conn, OP_CREDIT_UPDATE)
        return bytes(out)

    def close(self) -> None:
        """Reset the device (as a driver unloading does), then drop guest RAM."""
        self.reg(mmio.REG_STATUS, 0)
        self.memory.close()
