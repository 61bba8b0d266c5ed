"""The host's ends of vsock connections: streams, listeners, and the
Firecracker-compatible ``CONNECT <port>`` handshake on a Unix socket.

A :class:`VsockStream` is a real connected socket (one end of a socketpair
whose other end the device pumps), so it works with ``selectors``, ``asyncio``
and ``makefile``. The one thing a socketpair cannot say is "the guest reset the
connection"; the stream remembers the reason the device gave and turns the end
of file or broken pipe that follows into :class:`ConnectionResetError`.
"""

from __future__ import annotations

import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Self

CONNECT_LINE_MAX = 32  # "CONNECT 4294967295\n" is 19 bytes
MAX_PORT = 0xFFFFFFFF


class VsockStream(socket.socket):
    """A connected stream to a guest port. ``guest_port`` and ``host_port`` name its ends."""

    host_port = 0
    guest_port = 0
    reset_reason: str | None = None

    @classmethod
    def wrap(cls, sock: socket.socket, host_port: int, guest_port: int) -> VsockStream:
        """Take over ``sock`` (its file descriptor moves to the stream)."""
        stream = cls(fileno=sock.detach())
        stream.host_port = host_port
        stream.guest_port = guest_port
        return stream

    def __repr__(self) -> str:
        return f"<VsockStream host port {self.host_port} <-> guest port {self.guest_port}>"

    def _check_reset(self, error: OSError | None = None) -> None:
        if self.reset_reason is not None:
            raise ConnectionResetError(f"vsock port {self.guest_port}: {self.reset_reason}") from error

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        try:
            data = super().recv(bufsize, flags)
        except ConnectionError as error:
            self._check_reset(error)
            raise
        if not data and bufsize:
            self._check_reset()
        return data

    def recv_into(self, buffer, nbytes: int = 0, flags: int = 0) -> int:
        try:
            count = super().recv_into(buffer, nbytes, flags)
        except ConnectionError as error:
            self._check_reset(error)
            raise
        if count == 0 and (nbytes or len(memoryview(buffer))):
            self._check_reset()
        return count

    def send(self, data, flags: int = 0) -> int:
        try:
            return super().send(data, flags)
        except ConnectionError as error:
            self._check_reset(error)
            raise

    def sendall(self, data, flags: int = 0) -> None:
        try:
            super().sendall(data, flags)
        except ConnectionError as error:
            self._check_reset(error)
            raise


def reset_hook(stream: VsockStream) -> Callable[[str], None]:
    """A connection's ``on_reset`` that does not keep the stream alive."""
    ref = weakref.ref(stream)

    def on_reset(reason: str) -> None:
        target = ref()
        if target is not None:
            target.reset_reason = reason

    return on_reset


class VsockListener:
    """Connections the guest opens to one host port; :meth:`accept` them.

    The guest's connection is answered as soon as it arrives (as a listening
    socket's backlog does); past ``backlog`` waiting streams it is refused.
    """

    def __init__(self, port: int, backlog: int, on_close: Callable[[VsockListener], None]):
        self.port = port
        self.backlog = backlog
        self._on_close = on_close
        self._waiting: deque[VsockStream] = deque()
        self._cond = threading.Condition()
        self.closed = False

    def offer(self, stream: VsockStream) -> bool:
        with self._cond:
            if self.closed or len(self._waiting) >= self.backlog:
                return False
            self._waiting.append(stream)
            self._cond.notify()
            return True

    def accept(self, timeout: float | None = None) -> VsockStream:
        """The next connection from the guest; TimeoutError after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._waiting:
                if self.closed:
                    raise OSError(f"vsock listener on port {self.port} is closed")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"no guest connection to vsock port {self.port} within {timeout} s")
                self._cond.wait(remaining)
            return self._waiting.popleft()

    def close(self) -> None:
        with self._cond:
            if self.closed:
                return
            self.closed = True
            waiting, self._waiting = list(self._waiting), deque()
            self._cond.notify_all()
        for stream in waiting:
            stream.close()
        self._on_close(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class BadConnectLine(Exception):
    """A Unix-socket client did not start with ``CONNECT <port>\\n``."""


def read_connect_line(sock: socket.socket) -> int | None:
    """The port of a client's ``CONNECT <port>\\n``, consuming exactly that line
    (bytes after it belong to the stream); None while the line is incomplete."""
    peeked = sock.recv(CONNECT_LINE_MAX, socket.MSG_PEEK)
    if not peeked:
        raise BadConnectLine("the client closed before sending CONNECT")
    end = peeked.find(b"\n")
    if end < 0:
        if len(peeked) >= CONNECT_LINE_MAX:
            raise BadConnectLine(f"no newline in the first {CONNECT_LINE_MAX} bytes")
        return None
    line = sock.recv(end + 1)
    verb, _, port = line.rstrip(b"\r\n").partition(b" ")
    if verb != b"CONNECT" or not port.isdigit() or int(port) > MAX_PORT:
        raise BadConnectLine(f"expected 'CONNECT <port>', got {line[:CONNECT_LINE_MAX]!r}")
    return int(port)
