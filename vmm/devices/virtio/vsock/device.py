"""virtio-vsock in userspace (virtio 1.2 §5.10), host side of guest CID ``guest_cid``.

Queues: 0 rx (device → guest packets), 1 tx (guest → device), 2 event.
Config space: ``le64 guest_cid``. Each connection's host end is a socket
(:mod:`.connection`); Python callers get :class:`.host.VsockStream` objects
from :meth:`Vsock.connect` and :meth:`Vsock.listen`, other programs use the
Firecracker-compatible Unix socket at ``uds_path``:

* host → guest: connect to ``uds_path``, send ``CONNECT <port>\\n``, read
  ``OK <host port>\\n``, then the stream is the connection;
* guest → host port P: the device connects to ``<uds_path>_<P>`` if a listener
  is there (a Python listener on P comes first).

Threading. Everything runs under :attr:`lock` (the transport's lock): the
notifier thread calls :meth:`process` for guest kicks; the device's own thread
(``vsock-<cid>``) waits in epoll for host sockets (data to read, room to write,
hang-ups) and the Unix socket, and runs timeouts; callers of :meth:`connect`
take the lock briefly. Host sockets are non-blocking, so no one blocks while
holding the lock. Host data goes straight from a host socket into a guest rx
buffer, and guest data straight from the tx buffer into the host socket.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import threading
import time
from collections import Counter, deque
from functools import partial
from typing import Self

from vmm.devices.virtio.device import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_ID_VSOCK,
    VirtioDevice,
    feature,
)
from vmm.devices.virtio.errors import VirtioError
from vmm.devices.virtio.queue import DescriptorChain, Queue
from vmm.devices.virtio.vsock.connection import Connection, Plan, State
from vmm.devices.virtio.vsock.host import (
    MAX_PORT,
    BadConnectLine,
    VsockListener,
    VsockStream,
    read_connect_line,
    reset_hook,
)
from vmm.devices.virtio.vsock.packet import (
    EVENT_TRANSPORT_RESET,
    HEADER_SIZE,
    MAX_GUEST_CID,
    MIN_GUEST_CID,
    OP_REQUEST,
    OP_RST,
    SHUTDOWN_BOTH,
    Header,
    InvalidPacket,
    pack_header,
    parse_tx,
)

log = logging.getLogger(__name__)
CLOSE_TIMEOUT = 5.0   # seconds to wait for the device thread on close()

RX_QUEUE, TX_QUEUE, EVENT_QUEUE = 0, 1, 2
QUEUE_SIZE = 256
TX_BATCH = 256                # tx chains handled per turn, so a flooding guest cannot starve the host side
MAX_CONNECTIONS = 1024
STRAY_RST_LIMIT = 256         # RSTs owed for packets to unknown connections; beyond, they are dropped
MAX_UDS_WAITING = 64          # Unix-socket clients that have not sent CONNECT yet
FIRST_LOCAL_PORT = 1 << 30    # host-initiated connections take host ports from here
CONNECT_TIMEOUT = 5.0         # s: default for connect(), and for CONNECT on the Unix socket
CONNECT_LINE_TIMEOUT = 5.0    # s: a Unix-socket client must send its CONNECT line by then
CLOSE_TIMEOUT = 2.0           # s: after our SHUTDOWN(both), the guest's RST is due
POLL_INTERVAL = 0.5           # s: how late a timeout may fire

_CONFIG = struct.Struct("<Q")
_EVENT = struct.Struct("<I")
_HANGUP = select.EPOLLHUP | select.EPOLLERR


def _hung_up(sock: socket.socket) -> bool:
    """Confirm a hang-up epoll reported: the event may predate the fd's reuse."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return any(events & (select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))


class Vsock(VirtioDevice):
    """The vsock device of one machine. Call :meth:`close` when the machine is gone."""

    device_id = VIRTIO_ID_VSOCK
    queue_max_sizes = (QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, guest_cid: int, uds_path: str | os.PathLike | None = None):
        super().__init__()
        if not MIN_GUEST_CID <= guest_cid <= MAX_GUEST_CID:
            raise ValueError(f"guest CID {guest_cid} is reserved or too large: use {MIN_GUEST_CID}..{MAX_GUEST_CID}")
        self.guest_cid = guest_cid
        self.avail_features |= feature(VIRTIO_F_EVENT_IDX) | feature(VIRTIO_F_INDIRECT_DESC)
        self.dropped_packets: Counter[str] = Counter()  # refused guest packets, by error name
        self.bad_rx_chains = 0                            # rx/event buffers too small to use
        self._connections: dict[tuple[int, int], Connection] = {}
        self._live: set[Connection] = set()  # incl. those whose guest end is gone but which still write to the host
        self._scheduled: deque[Connection] = deque()
        self._stray_rsts: deque[tuple[int, int]] = deque(maxlen=STRAY_RST_LIMIT)
        self._deadlines: set[Connection] = set()
        self._listeners: dict[int, VsockListener] = {}
        self._next_local_port = FIRST_LOCAL_PORT
        self._active = False
        self._event_pending = False
        self._tx_backlog = False
        self._closed = False
        self._handlers: dict[int, object] = {}
        self._epoll = select.epoll()
        self._wakeup = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll.register(self._wakeup, select.EPOLLIN)
        self.uds_path = os.fspath(uds_path) if uds_path is not None else None
        self._uds_server: socket.socket | None = None
        self._uds_waiting: dict[socket.socket, float] = {}
        try:
            if self.uds_path is not None:
                self._listen_uds(self.uds_path)
        except BaseException:
            self._epoll.close()
            os.close(self._wakeup)
            raise
        self._thread = threading.Thread(target=self._run, name=f"vsock-{guest_cid}", daemon=True)
        self._thread.start()

    # --- the virtio device ------------------------------------------------------------

    def config_bytes(self) -> bytes:
        return _CONFIG.pack(self.guest_cid)

    def activate(self, memory, queues: list[Queue], interrupt) -> None:
        super().activate(memory, queues, interrupt)
        self._active = True
        self._deliver_event()
        self._fill_rx()

    def process(self, queue_index: int) -> None:
        if queue_index == TX_QUEUE:
            self._process_tx()
        elif queue_index == EVENT_QUEUE:
            self._deliver_event()
        self._fill_rx()

    def reset(self) -> None:
        super().reset()
        self._active = False
        self._drop_connections("the guest reset its vsock device")

    def resumed(self) -> None:
        self.transport_reset()

    def transport_reset(self) -> None:
        """Tell the guest every connection is gone (after a snapshot restore) and drop them."""
        with self.lock:
            self._drop_connections("vsock transport reset (the machine was restored)")
            self._event_pending = True
            self._guarded(self._deliver_event)
            if self._active:
                self._guarded(self._process_tx)  # a stale avail_event may have hidden a tx kick
            self._guarded(self._fill_rx)

    # --- host API -----------------------------------------------------------------

    def connect(self, port: int, timeout: float | None = CONNECT_TIMEOUT) -> VsockStream:
        """A stream to guest ``port``. Raises ConnectionRefusedError if nothing
        listens there, TimeoutError if the guest does not answer in ``timeout`` s."""
        if not 0 <= port <= MAX_PORT:
            raise ValueError(f"vsock port {port} is outside 0..{MAX_PORT}")
        answered = threading.Event()
        outcome: dict[str, str] = {}

        def refused() -> None:
            outcome["refused"] = f"vsock: nothing listens on guest port {port}"
            answered.set()

        user, pump = socket.socketpair()
        with self.lock:
            if self._closed or len(self._live) >= MAX_CONNECTIONS:
                user.close()
                pump.close()
                raise ConnectionRefusedError(
                    "vsock: the device is closed" if self._closed
                    else f"vsock: {MAX_CONNECTIONS} connections are open; close some first")
            local_port = self._allocate_local_port(port)
            stream = VsockStream.wrap(user, local_port, port)
            conn = Connection(self.guest_cid, local_port, port, pump, initiated_by_host=True)
            mark_reset = reset_hook(stream)

            def reset(reason: str) -> None:
                mark_reset(reason)
                outcome.setdefault("reset", reason)
                answered.set()

            conn.on_established = answered.set
            conn.on_refused = refused
            conn.on_reset = reset
            self._add(conn)
            self._guarded(self._fill_rx)
        if not answered.wait(timeout):
            with self.lock:
                if not answered.is_set():
                    outcome["timeout"] = (f"vsock: guest port {port} did not answer within {timeout} s "
                                          "(is the guest's vsock driver up?)")
                    conn.abort("connect timed out")
                    self._update(conn)
                    self._guarded(self._fill_rx)
        if outcome:
            stream.close()
            if "timeout" in outcome:
                raise TimeoutError(outcome["timeout"])
            if "refused" in outcome:
                raise ConnectionRefusedError(outcome["refused"])
            raise ConnectionResetError(f"vsock: connect to guest port {port}: {outcome['reset']}")
        return stream

    def listen(self, port: int, backlog: int = 128) -> VsockListener:
        """Accept the guest's connections to host ``port``."""
        if not 0 <= port <= MAX_PORT:
            raise ValueError(f"vsock port {port} is outside 0..{MAX_PORT}")
        with self.lock:
            if self._closed:
                raise OSError("vsock: the device is closed")
            if port in self._listeners:
                raise OSError(f"vsock: host port {port} already has a listener")
            listener = VsockListener(port, backlog, self._forget_listener)
            self._listeners[port] = listener
            return listener

    def _forget_listener(self, listener: VsockListener) -> None:
        with self.lock:
            if self._listeners.get(listener.port) is listener:
                del self._listeners[listener.port]

    def close(self) -> None:
        """Stop the device thread, reset every connection, remove the Unix socket."""
        with self.lock:
            if self._closed:
                return
            self._closed = True
            self._drop_connections("the machine stopped", everything=True)
            listeners = list(self._listeners.values())
        for listener in listeners:
            listener.close()
        os.eventfd_write(self._wakeup, 1)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(CLOSE_TIMEOUT)
            if self._thread.is_alive():
                log.warning("vsock device thread did not stop within %s s", CLOSE_TIMEOUT)
        for client in list(self._uds_waiting):
            client.close()
        self._uds_waiting.clear()
        if self._uds_server is not None:
            self._uds_server.close()
            try:
                os.unlink(self.uds_path)
            except FileNotFoundError:
                pass
        self._epoll.close()
        os.close(self._wakeup)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the device thread ----------------------------------------------------------

    def _run(self) -> None:
        while True:
            events = self._epoll.poll(0 if self._tx_backlog else POLL_INTERVAL)
            with self.lock:
                if self._closed:
                    return
                for fd, mask in events:
                    if fd == self._wakeup:
                        try:
                            os.eventfd_read(fd)
                        except BlockingIOError:
                            pass
                        continue
                    handler = self._handlers.get(fd)
                    if handler is not None:
                        handler(mask)
                self._expire(time.monotonic())
                if self._tx_backlog and self._active:
                    self._guarded(self._process_tx)
                self._guarded(self._fill_rx)

    def _guarded(self, work) -> None:
        """Queue work outside a transport call: a driver error stops the device until reset."""
        try:
            work()
        except VirtioError as error:
            self._active = False
            self._tx_backlog = False
            self.interrupt.device_error(error)

    def _watch(self, fd: int, handler, mask: int) -> None:
        self._handlers[fd] = handler
        self._epoll.register(fd, mask)

    def _unwatch(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    def _expire(self, now: float) -> None:
        for conn in [c for c in self._deadlines if c.deadline <= now]:
            self._deadlines.discard(conn)
            what = "the guest did not answer" if conn.state is State.REQUESTING else "the guest did not finish closing"
            conn.abort(f"{what} within the timeout")
            self._update(conn)
        for client in [c for c, deadline in self._uds_waiting.items() if deadline <= now]:
            log.debug("vsock: Unix-socket client sent no CONNECT line in time")
            self._forget_uds_client(client, close=True)

    # --- connections ---------------------------------------------------------------

    def _allocate_local_port(self, peer_port: int) -> int:
        while True:
            port = self._next_local_port
            self._next_local_port = FIRST_LOCAL_PORT + (port + 1 - FIRST_LOCAL_PORT) % FIRST_LOCAL_PORT
            if (port, peer_port) not in self._connections:
                return port

    def _add(self, conn: Connection) -> None:
        self._connections[conn.key] = conn
        self._live.add(conn)
        self._watch(conn.host.fileno(), partial(self._on_host_event, conn), 0)
        conn.epoll_mask = 0
        self._update(conn)

    def _on_host_event(self, conn: Connection, mask: int) -> None:
        if mask & _HANGUP and _hung_up(conn.host):
            # Level-triggered hang-ups repeat: stop watching; what is left is read without epoll.
            self._unwatch(conn.host.fileno())
            conn.epoll_mask = None
            conn.host_hung_up()
        else:
            if mask & select.EPOLLIN:
                conn.host_readable = True
            if mask & select.EPOLLOUT:
                conn.flush_to_host()
        self._update(conn)

    def _update(self, conn: Connection, reschedule: bool = True) -> None:
        """Bring the device's bookkeeping in line with ``conn``'s state."""
        if conn.finished:
            self._retire(conn)
            return
        if conn.guest_done and self._connections.get(conn.key) is conn:
            del self._connections[conn.key]
        if reschedule and not conn.scheduled and conn.has_work():
            conn.scheduled = True
            self._scheduled.append(conn)
        if conn.epoll_mask is not None:
            mask = select.EPOLLIN if conn.wants_host_input() else 0
            if conn.to_host and not conn.host_closed:
                mask |= select.EPOLLOUT
            if mask != conn.epoll_mask:
                self._epoll.modify(conn.host.fileno(), mask)
                conn.epoll_mask = mask
        if conn.state is State.ESTABLISHED and conn.shutdown_sent != SHUTDOWN_BOTH:
            conn.deadline = None
        elif conn.shutdown_sent == SHUTDOWN_BOTH and conn.deadline is None:
            conn.deadline = time.monotonic() + CLOSE_TIMEOUT
        if conn.deadline is not None and conn.reset_reason is None and not conn.guest_done:
            self._deadlines.add(conn)
        else:
            self._deadlines.discard(conn)

    def _retire(self, conn: Connection) -> None:
        if self._connections.get(conn.key) is conn:
            del self._connections[conn.key]
        self._live.discard(conn)
        self._deadlines.discard(conn)
        if conn.epoll_mask is not None:
            self._unwatch(conn.host.fileno())
            conn.epoll_mask = None
        conn.host.close()

    def _drop_connections(self, reason: str, everything: bool = False) -> None:
        for conn in list(self._live):
            if everything or not conn.guest_done:
                conn.drop(reason)
                self._update(conn)
        self._stray_rsts.clear()

    # --- guest → host: the tx queue -------------------------------------------------

    def _process_tx(self) -> None:
        queue = self.queues[TX_QUEUE]
        self._tx_backlog = False
        for handled, chain in enumerate(queue.drain(), 1):
            self._handle_tx(chain)
            queue.add_used(chain.head, 0)
            if handled == TX_BATCH:
                self._tx_backlog = True  # the device thread goes on after the host side had a turn
                os.eventfd_write(self._wakeup, 1)
                break
        if queue.needs_notification():
            self.interrupt.signal_used_queue()

    def _handle_tx(self, chain: DescriptorChain) -> None:
        try:
            header = parse_tx(chain, self.guest_cid)
        except InvalidPacket as error:
            self.dropped_packets[type(error).__name__] += 1
            log.debug("vsock: dropped a guest packet: %s: %s", type(error).__name__, error)
            return
        conn = self._connections.get((header.dst_port, header.src_port))
        if conn is not None:
            conn.receive(header, chain)
            self._update(conn)
        elif header.op == OP_RST:
            pass  # never answer a reset
        elif not (header.op == OP_REQUEST and self._accept(header)):
            self._stray_rsts.append((header.dst_port, header.src_port))

    def _accept(self, header: Header) -> bool:
        """A guest connection request to host port ``dst_port``: find who takes it."""
        if self._closed:
            return False
        if len(self._live) >= MAX_CONNECTIONS:
            log.debug("vsock: refused guest connection to port %d: too many connections", header.dst_port)
            return False
        port, stream = header.dst_port, None
        listener = self._listeners.get(port)
        if listener is not None:
            user, host = socket.socketpair()
            stream = VsockStream.wrap(user, port, header.src_port)
            if not listener.offer(stream):
                stream.close()
                host.close()
                return False
        elif self.uds_path is not None:
            host = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            try:
                host.connect(f"{self.uds_path}_{port}")
            except OSError:  # nothing there, or its backlog is full
                host.close()
                return False
        else:
            return False
        conn = Connection(self.guest_cid, port, header.src_port, host, initiated_by_host=False,
                          peer_buf_alloc=header.buf_alloc, peer_fwd_cnt=header.fwd_cnt)
        if stream is not None:
            conn.on_reset = reset_hook(stream)
        self._add(conn)
        return True

    # --- host → guest: the rx and event queues -----------------------------------------

    def _fill_rx(self) -> None:
        """Give the guest every packet that is ready, while it has rx buffers."""
        if not self._active:
            return
        queue = self.queues[RX_QUEUE]
        while True:
            plan, conn = self._next_plan()
            if plan is None:
                break
            chain = self._pop_writable(queue, HEADER_SIZE)
            if chain is None:
                break  # the guest kicks the rx queue when it adds buffers
            if conn is None:
                local_port, peer_port = self._stray_rsts.popleft()
                chain.write(0, pack_header(local_port, peer_port, self.guest_cid, OP_RST))
                queue.add_used(chain.head, HEADER_SIZE)
                continue
            queue.add_used(chain.head, conn.emit(plan, chain))
            self._scheduled.popleft()
            conn.scheduled = False
            self._update(conn)
        if queue.needs_notification():
            self.interrupt.signal_used_queue()

    def _next_plan(self) -> tuple[Plan | None, Connection | None]:
        if self._stray_rsts:
            return Plan(OP_RST), None
        while self._scheduled:
            conn = self._scheduled[0]
            plan = conn.plan() if conn in self._live else None
            if plan is not None:
                return plan, conn
            self._scheduled.popleft()
            conn.scheduled = False
            if conn in self._live:
                self._update(conn, reschedule=False)
        return None, None

    def _pop_writable(self, queue: Queue, minimum: int) -> DescriptorChain | None:
        """The next available chain with at least ``minimum`` writable bytes; smaller ones
        go back unused."""
        while True:
            chain = queue.pop()
            if chain is None:
                if queue.enable_notification():
                    continue
                return None
            if chain.writable_length >= minimum:
                return chain
            self.bad_rx_chains += 1
            queue.add_used(chain.head, 0)

    def _deliver_event(self) -> None:
        if not (self._active and self._event_pending):
            return
        queue = self.queues[EVENT_QUEUE]
        chain = self._pop_writable(queue, _EVENT.size)
        if chain is not None:
            chain.write(0, _EVENT.pack(EVENT_TRANSPORT_RESET))
            queue.add_used(chain.head, _EVENT.size)
            self._event_pending = False
        if queue.needs_notification():
            self.interrupt.signal_used_queue()

    # --- the Firecracker-compatible Unix socket ------------------------------------------

    def _listen_uds(self, path: str) -> None:
        if os.path.lexists(path):
            raise FileExistsError(f"vsock socket {path} already exists: remove it or choose another path")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            server.bind(path)
            server.listen(128)
        except OSError:
            server.close()
            raise
        self._uds_server = server
        self._watch(server.fileno(), self._on_uds_accept, select.EPOLLIN)

    def _on_uds_accept(self, mask: int) -> None:
        while True:
            try:
                client, _ = self._uds_server.accept()
            except OSError:  # drained (EAGAIN) or the client already left
                return
            if len(self._uds_waiting) >= MAX_UDS_WAITING:
                client.close()
                continue
            client.setblocking(False)
            self._uds_waiting[client] = time.monotonic() + CONNECT_LINE_TIMEOUT
            self._watch(client.fileno(), partial(self._on_uds_line, client), select.EPOLLIN)

    def _forget_uds_client(self, client: socket.socket, close: bool) -> None:
        self._uds_waiting.pop(client, None)
        self._unwatch(client.fileno())
        if close:
            client.close()

    def _on_uds_line(self, client: socket.socket, mask: int) -> None:
        try:
            port = read_connect_line(client)
        except BlockingIOError:
            return
        except (BadConnectLine, OSError) as error:
            log.debug("vsock: Unix-socket client dropped: %s", error)
            self._forget_uds_client(client, close=True)
            return
        if port is None:
            return
        self._forget_uds_client(client, close=False)
        if len(self._live) >= MAX_CONNECTIONS:
            client.close()
            return
        conn = Connection(self.guest_cid, self._allocate_local_port(port), port, client, initiated_by_host=True)
        conn.on_established = partial(self._send_ok_line, conn)
        conn.deadline = time.monotonic() + CONNECT_TIMEOUT
        self._add(conn)

    @staticmethod
    def _send_ok_line(conn: Connection) -> None:
        line = f"OK {conn.local_port}\n".encode()
        try:
            sent = conn.host.send(line, socket.MSG_NOSIGNAL)
        except OSError:
            sent = 0
        if sent != len(line):
            conn.abort("the Unix-socket client did not take the OK line")
