"""The host's side of the built-in executor (sm_kernel/executor.py, in the guest): one
line-JSON connection through the agent's forward operation, read on a thread."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable

from sm_kernel.forward import ForwardError, open_forward

# A line from the guest longer than this (a huge display) ends the connection.
MAX_LINE = 256 << 20
MESSAGE_TYPES = {"stream", "display", "result", "error", "done", "complete", "is_complete"}


class ExecutorLink:
    """Messages from the executor go to ``on_message(dict)``; ``on_lost(reason)`` once when
    the connection ends."""

    sockets: dict = {}  # no ZMQ sockets: the loop gets messages as events

    def __init__(self, connect_agent: Callable[[], socket.socket], port: int,
                 on_message: Callable[[dict], None], on_lost: Callable[[str], None]):
        sock = connect_agent()
        try:
            open_forward(sock, port)
        except ForwardError:
            sock.close()
            raise
        self._sock = sock
        self._closed = False
        self._lock = threading.Lock()
        self._on_message = on_message
        self._on_lost = on_lost
        threading.Thread(target=self._read, name="executor-link", daemon=True).start()

    def send(self, **request) -> None:
        with self._lock:
            try:
                self._sock.sendall(json.dumps(request).encode() + b"\n")
            except OSError:
                pass  # the reader sees the connection end and reports it

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    def _read(self) -> None:
        reason = "the built-in executor closed its connection"
        buffer = bytearray()
        try:
            while True:
                chunk = self._sock.recv(1 << 20)
                if not chunk:
                    break
                buffer += chunk
                while (end := buffer.find(b"\n")) >= 0:
                    line = bytes(buffer[:end])
                    del buffer[:end + 1]
                    self._on_message(parse(line))
                if len(buffer) > MAX_LINE:
                    reason = "the built-in executor sent an overlong message"
                    break
        except (OSError, ValueError) as error:
            reason = f"the connection to the built-in executor failed ({error})"
        if not self._closed:
            self._on_lost(reason)


def parse(line: bytes) -> dict:
    """A message from the (hostile) guest: a JSON object with a known type, or ValueError."""
    message = json.loads(line)
    if not isinstance(message, dict) or message.get("type") not in MESSAGE_TYPES:
        raise ValueError("the built-in executor sent a malformed message")
    return message
