"""One vsock stream connection: its state machine and credit-based flow control
(virtio 1.2 §5.10.6.3 and §5.10.6.6).

The guest end is a socket in the guest kernel; the host end is a connected,
non-blocking host socket (one end of a socketpair handed to a Python caller, or
a Unix socket of another program). The device owns the scheduling (epoll, the
rx queue); a :class:`Connection` only keeps the state and moves bytes.

Flow control, both ways. Every header carries the sender's ``buf_alloc`` (its
receive buffer) and ``fwd_cnt`` (bytes it has consumed so far), so each side
knows how much the other can still take:

* host → guest: we read from the host socket at most
  ``peer_buf_alloc - (sent - peer_fwd_cnt)`` bytes, straight into a guest rx
  buffer, so nothing is buffered here;
* guest → host: we advertise ``BUF_ALLOC`` and hold what the host socket does
  not take at once in ``to_host``; ``fwd_cnt`` advances only as bytes enter the
  host socket, so a slow host reader stops the guest's credit and memory stays
  below ``BUF_ALLOC``. A guest that sends beyond its credit breaks the protocol
  and the connection is reset.

Counters are Python ints here; headers carry them modulo 2**32, and the peer's
counters are compared modulo 2**32, as the spec's free-running counters are.
"""

from __future__ import annotations

import enum
import fcntl
import socket
import struct
import termios
from collections.abc import Callable
from dataclasses import dataclass

from vmm.devices.virtio.queue import DescriptorChain
from vmm.devices.virtio.vsock.packet import (
    HEADER_SIZE,
    MAX_PKT_LEN,
    OP_CREDIT_REQUEST,
    OP_CREDIT_UPDATE,
    OP_REQUEST,
    OP_RESPONSE,
    OP_RST,
    OP_RW,
    OP_SHUTDOWN,
    SHUTDOWN_BOTH,
    SHUTDOWN_RCV,
    SHUTDOWN_SEND,
    Header,
    pack_header,
)

BUF_ALLOC = 256 * 1024                  # what we let the guest have in flight, per connection
CREDIT_UPDATE_THRESHOLD = BUF_ALLOC // 4  # tell the guest once this much credit came back

_U32 = 0xFFFFFFFF
_FIONREAD = struct.Struct("i")


class State(enum.Enum):
    REQUESTING = "requesting"     # host-initiated, waiting for the guest's RESPONSE
    ESTABLISHED = "established"


@dataclass(frozen=True)
class Plan:
    """The next packet a connection wants to send: its op, flags and at most ``length`` data bytes."""

    op: int
    flags: int = 0
    length: int = 0


class Connection:
    """The state of one stream, keyed by (``local_port``, ``peer_port``) in the device."""

    def __init__(self, guest_cid: int, local_port: int, peer_port: int, host: socket.socket,
                 initiated_by_host: bool, peer_buf_alloc: int = 0, peer_fwd_cnt: int = 0):
        self.guest_cid = guest_cid
        self.local_port = local_port
        self.peer_port = peer_port
        self.host = host
        host.setblocking(False)
        self.state = State.REQUESTING if initiated_by_host else State.ESTABLISHED
        # Control packets owed to the guest.
        self.need_request = initiated_by_host
        self.need_response = not initiated_by_host
        self.need_rst = False
        self.need_credit_update = False
        self.credit_requested = False  # a CREDIT_REQUEST is out for the current stall
        self.shutdown_sent = 0         # SHUTDOWN flags we told the guest
        self.peer_shutdown = 0         # SHUTDOWN flags the guest told us
        self.guest_done = False        # RST sent or received: the guest end is gone
        # The host end.
        self.host_readable = False     # epoll said readable and we have not seen it drained
        self.host_buffered = 0         # bytes FIONREAD last saw in the host socket, not read yet
        self.host_eof = False          # the host will send nothing more
        self.host_closed = False       # the host end is gone both ways
        self.reset_reason: str | None = None
        # guest → host
        self.received = 0              # bytes the guest sent us
        self.forwarded = 0             # bytes written into the host socket (our fwd_cnt)
        self.fwd_cnt_told = 0          # our fwd_cnt as the guest last saw it
        self.to_host = bytearray()     # received, not yet forwarded; at most BUF_ALLOC
        # host → guest
        self.sent = 0                  # our tx_cnt
        self.peer_buf_alloc = peer_buf_alloc
        self.peer_fwd_cnt = peer_fwd_cnt
        # Hooks set by the device or the API; called under the device lock.
        self.on_established: Callable[[], None] | None = None
        self.on_refused: Callable[[], None] | None = None
        self.on_reset: Callable[[str], None] | None = None
        # Bookkeeping owned by the device.
        self.scheduled = False
        self.epoll_mask: int | None = None
        self.deadline: float | None = None

    def __repr__(self) -> str:
        return f"Connection({self.local_port}<->{self.peer_port}, {self.state.value})"

    @property
    def key(self) -> tuple[int, int]:
        return self.local_port, self.peer_port

    # --- credit --------------------------------------------------------------------

    @property
    def peer_credit(self) -> int:
        """Bytes the guest can still take; a guest lying about its counters gets 0."""
        in_flight = (self.sent - self.peer_fwd_cnt) & _U32
        return max(0, self.peer_buf_alloc - in_flight)

    @property
    def finished(self) -> bool:
        """Both ends are done: the device may close the host socket and forget us."""
        return self.guest_done and (self.host_closed or not self.to_host)

    def _sending_data(self) -> bool:
        return (self.state is State.ESTABLISHED and not self.guest_done
                and not self.peer_shutdown & SHUTDOWN_RCV and not self.shutdown_sent & SHUTDOWN_SEND)

    def wants_host_input(self) -> bool:
        """Whether to watch the host socket for data (EPOLLIN)."""
        return (self._sending_data() and not self.host_eof and not self.host_readable
                and (self.peer_credit > 0 or not self.credit_requested))

    def _shutdown_due(self) -> int:
        """SHUTDOWN flags the guest should hear about and has not."""
        if self.state is not State.ESTABLISHED or self.guest_done:
            return 0
        flags = SHUTDOWN_SEND if self.host_eof else 0
        if self.host_closed and (self.host_eof or not self._sending_data()):
            flags = SHUTDOWN_BOTH
        return flags & ~self.shutdown_sent

    def has_work(self) -> bool:
        """Something may be ready for the guest (cheap: no system calls)."""
        if self.guest_done:
            return False
        if self.need_rst or self.need_request or self.need_response or self.need_credit_update:
            return True
        if self._sending_data() and self.host_readable and (self.peer_credit or not self.credit_requested):
            return True
        return bool(self._shutdown_due())

    # --- packets to the guest --------------------------------------------------------

    def plan(self) -> Plan | None:
        """What to send next, or None. May look at the host socket, never consumes it."""
        if self.guest_done:
            return None
        if self.need_rst:
            return Plan(OP_RST)
        if self.need_request:
            return Plan(OP_REQUEST)
        if self.need_response:
            return Plan(OP_RESPONSE)
        if self._sending_data() and self.host_readable:
            available = self._host_bytes_available()
            if available:
                credit = self.peer_credit
                if credit:
                    return Plan(OP_RW, length=min(available, credit, MAX_PKT_LEN))
                if not self.credit_requested:
                    return Plan(OP_CREDIT_REQUEST)
        flags = self._shutdown_due()
        if flags:
            return Plan(OP_SHUTDOWN, flags=self.shutdown_sent | flags)
        if self.need_credit_update:
            return Plan(OP_CREDIT_UPDATE)
        return None

    def _host_bytes_available(self) -> int:
        """Bytes waiting in the host socket; notes end of file and a drained socket. Only
        we read the socket, so what FIONREAD saw is there until we read it: one ioctl per
        socket buffer rather than one per (4 KiB) guest packet."""
        if self.host_buffered:
            return self.host_buffered
        try:
            available = _FIONREAD.unpack(fcntl.ioctl(self.host.fileno(), termios.FIONREAD, b"\0" * 4))[0]
            if available:
                self.host_buffered = available
                return available
            if self.host.recv(1, socket.MSG_PEEK) == b"":
                self.host_eof = True
        except BlockingIOError:
            pass
        except OSError:
            self.host_eof = self.host_closed = True
        self.host_readable = False
        return 0

    def emit(self, plan: Plan, chain: DescriptorChain) -> int:
        """Write the planned packet into an rx chain (at least a header long); returns its length."""
        op, length = plan.op, 0
        room = min(plan.length, chain.writable_length - HEADER_SIZE) if op == OP_RW else 0
        header_views, data_views = _split(chain.writable_views(0, HEADER_SIZE + room), HEADER_SIZE)
        if room:
            length = self._read_host_into(data_views)
        if op == OP_RW and length == 0:
            op = OP_CREDIT_UPDATE  # the data vanished; the buffer still carries our credit
        _copy_into(header_views, pack_header(self.local_port, self.peer_port, self.guest_cid, op,
                                             length, plan.flags, BUF_ALLOC, self.forwarded))
        self.fwd_cnt_told = self.forwarded
        self.need_credit_update = False
        if op == OP_RST:
            self.need_rst = False
            self.guest_done = True
        elif op == OP_REQUEST:
            self.need_request = False
        elif op == OP_RESPONSE:
            self.need_response = False
        elif op == OP_SHUTDOWN:
            self.shutdown_sent = plan.flags
        elif op == OP_CREDIT_REQUEST:
            self.credit_requested = True
        return HEADER_SIZE + length

    def _read_host_into(self, views: list[memoryview]) -> int:
        try:
            count = self.host.recvmsg_into(views)[0]
        except BlockingIOError:
            count = 0
        except OSError:
            self.host_eof = self.host_closed = True
            count = 0
        if count == 0:
            self.host_readable = False
        self.host_buffered = max(0, self.host_buffered - count)
        self.sent += count
        return count

    # --- packets from the guest -------------------------------------------------------

    def receive(self, header: Header, chain: DescriptorChain) -> None:
        """A guest packet addressed to this connection (already validated)."""
        if (header.buf_alloc, header.fwd_cnt) != (self.peer_buf_alloc, self.peer_fwd_cnt):
            self.credit_requested = False
        self.peer_buf_alloc = header.buf_alloc
        self.peer_fwd_cnt = header.fwd_cnt
        op = header.op
        if op == OP_RST:
            self._guest_reset()
        elif op == OP_RESPONSE:
            if self.state is not State.REQUESTING:
                self.abort("guest sent RESPONSE on an established connection")
                return
            self.state = State.ESTABLISHED
            if self.on_established:
                self.on_established()
        elif self.state is State.REQUESTING or op == OP_REQUEST:
            self.abort(f"guest sent op {op} before the handshake finished" if op != OP_REQUEST
                       else "guest sent REQUEST on an open connection")
        elif op == OP_RW:
            self._receive_data(chain, header.len)
        elif op == OP_SHUTDOWN:
            self._peer_shutdown(header.flags & SHUTDOWN_BOTH)
        elif op == OP_CREDIT_REQUEST:
            self.need_credit_update = True
        # OP_CREDIT_UPDATE: the counters above are all it carries.

    def _guest_reset(self) -> None:
        self.guest_done = True
        if self.state is State.REQUESTING:
            self.host_closed = True
            if self.on_refused:
                self.on_refused()
        elif not (self.peer_shutdown & SHUTDOWN_SEND or self.shutdown_sent == SHUTDOWN_BOTH):
            self.abort("the guest reset the vsock connection")
        # Otherwise a graceful end: what is left in ``to_host`` still reaches the host.

    def _receive_data(self, chain: DescriptorChain, length: int) -> None:
        if self.peer_shutdown & SHUTDOWN_SEND:
            self.abort("guest sent data after shutting down its send side")
            return
        if self.received + length - self.forwarded > BUF_ALLOC:
            self.abort(f"guest sent {self.received + length - self.forwarded} bytes "
                       f"against a credit of {BUF_ALLOC}")
            return
        self.received += length
        if self.host_closed:
            self.forwarded += length  # nobody reads any more: keep the guest's credit flowing
        elif self.to_host:
            self.to_host += b"".join(chain.readable_views(HEADER_SIZE, length))
        elif length:
            views = chain.readable_views(HEADER_SIZE, length)
            written = self._write_host(views)
            if written < length:
                self.to_host += b"".join(views)[written:]
        self._maybe_credit_update()

    def _write_host(self, data) -> int:
        """Write to the host socket without blocking; counts what went in as forwarded."""
        try:
            if isinstance(data, list):
                written = self.host.sendmsg(data, [], socket.MSG_NOSIGNAL)
            else:
                written = self.host.send(data, socket.MSG_NOSIGNAL)
        except BlockingIOError:
            written = 0
        except OSError:  # EPIPE, ECONNRESET: the host end went away
            self._host_gone()
            return 0
        self.forwarded += written
        return written

    def flush_to_host(self) -> None:
        """The host socket can take more (EPOLLOUT)."""
        if self.to_host and not self.host_closed:
            written = self._write_host(memoryview(self.to_host))
            del self.to_host[:written]
        if not self.to_host and self.peer_shutdown & SHUTDOWN_SEND:
            self._close_host_send_side()
        self._maybe_credit_update()

    def _maybe_credit_update(self) -> None:
        if self.forwarded - self.fwd_cnt_told >= CREDIT_UPDATE_THRESHOLD:
            self.need_credit_update = True

    def _peer_shutdown(self, flags: int) -> None:
        new = flags & ~self.peer_shutdown
        self.peer_shutdown |= flags
        if new & SHUTDOWN_RCV:
            self._shutdown_host(socket.SHUT_RD)  # host writes now fail with EPIPE
        if new & SHUTDOWN_SEND and not self.to_host:
            self._close_host_send_side()
        if self.peer_shutdown == SHUTDOWN_BOTH:
            # The guest is closing and waits for our RST; what it sent is still
            # delivered to the host from ``to_host``.
            self.need_rst = True

    def _close_host_send_side(self) -> None:
        self._shutdown_host(socket.SHUT_WR)  # the host reader sees end of file

    def _shutdown_host(self, how: int) -> None:
        try:
            self.host.shutdown(how)
        except OSError:
            pass

    # --- host events and endings -------------------------------------------------------

    def host_hung_up(self) -> None:
        """EPOLLHUP/EPOLLERR: the host end closed both ways."""
        if self.state is State.REQUESTING:
            self.abort("the host end closed before the guest answered")
            return
        self._host_gone()
        self.host_readable = True  # read what is left, then tell the guest

    def _host_gone(self) -> None:
        self.host_closed = True
        self.to_host.clear()

    def abort(self, reason: str) -> None:
        """End the connection abruptly: RST to the guest (if it knows the
        connection), and the host side sees a reset."""
        if self.reset_reason is None:
            self.reset_reason = reason
            if self.on_reset:
                self.on_reset(reason)
        self._host_gone()
        if self.guest_done or (self.state is State.REQUESTING and self.need_request):
            self.guest_done = True
        else:
            self.need_rst = True

    def drop(self, reason: str) -> None:
        """End the connection without telling the guest (its driver or transport was reset)."""
        self.abort(reason)
        self.need_rst = False
        self.guest_done = True


def _split(views: list[memoryview], offset: int) -> tuple[list[memoryview], list[memoryview]]:
    """``views`` cut at byte ``offset``: the header's buffers and the data's (one
    writable_views call per packet, not two)."""
    for index, view in enumerate(views):
        if offset < len(view):
            head = [*views[:index], view[:offset]] if offset else views[:index]
            return head, [view[offset:], *views[index + 1:]]
        offset -= len(view)
    return views, []


def _copy_into(views: list[memoryview], data: bytes) -> None:
    position = 0
    for view in views:
        view[:] = data[position:position + len(view)]
        position += len(view)
