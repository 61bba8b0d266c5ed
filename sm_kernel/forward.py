"""Host ends of guest TCP ports: a Unix socket on the host whose every connection is
carried over vsock to ``127.0.0.1:PORT`` inside the guest, through the agent's
``forward`` operation (docs/agent-protocol.md).

ZMQ sockets in the host kernel connect to ``ipc://`` paths served here as if the guest's
ipykernel were local. The paths live in a private directory (mode 0700): unlike a TCP
port on 127.0.0.1, no other local user can reach the guest's kernel through them.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable

from vmm.guest import agent as wire

# HELLO and REPLY frames of the handshake are small; a bigger one is a hostile agent.
HANDSHAKE_FRAME_LIMIT = 64 * 1024
HANDSHAKE_TIMEOUT = 10.0


class ForwardError(Exception):
    """The agent could not open a forward (old agent, nothing listening, broken reply)."""


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ForwardError("the guest agent closed the connection during the forward handshake")
        data += chunk
    return bytes(data)


def _read_frame(sock: socket.socket) -> tuple[int, dict]:
    """One control frame, read exactly: the bytes after it belong to the forwarded stream."""
    length, frame_type = wire.FRAME_HEADER.unpack(_recv_exact(sock, wire.FRAME_HEADER.size))
    if length > HANDSHAKE_FRAME_LIMIT or frame_type not in (wire.HELLO, wire.REPLY, wire.ERROR):
        raise ForwardError(f"the guest agent sent a bad frame (type {frame_type}, {length} bytes)")
    try:
        return frame_type, wire.decode_json(frame_type, _recv_exact(sock, length))
    except wire.ProtocolError as error:
        raise ForwardError(f"the guest agent broke the protocol: {error}") from None


def open_forward(sock: socket.socket, port: int) -> None:
    """Turn ``sock``, a fresh connection to the agent, into a byte pipe to guest port ``port``."""
    sock.settimeout(HANDSHAKE_TIMEOUT)
    try:
        wire.send_frame(sock, wire.HELLO, wire.encode_json({"protocol": wire.PROTOCOL_VERSION}))
        frame_type, hello = _read_frame(sock)
        if frame_type != wire.HELLO or hello.get("protocol") != wire.PROTOCOL_VERSION:
            raise ForwardError("the guest agent speaks another protocol: update the image's agent")
        if "forward" not in (hello.get("ops") or ()):
            raise ForwardError("the guest agent has no 'forward' operation: update the image's agent")
        wire.send_frame(sock, wire.REQUEST, wire.encode_json({"op": "forward", "port": port}))
        frame_type, reply = _read_frame(sock)
    except (OSError, ValueError) as error:
        raise ForwardError(f"forward to guest port {port}: {error}") from None
    if frame_type == wire.ERROR:
        raise ForwardError(f"forward to guest port {port}: {str(reply.get('message'))[:200]}")
    if frame_type != wire.REPLY:
        raise ForwardError(f"the guest agent answered a forward with {wire.FRAME_NAMES[frame_type]}")
    sock.settimeout(None)


class PortForward:
    """Serves ``path`` (a Unix socket); each connection is piped to ``guest_port``.

    ``connect_agent()`` opens a new connection to the guest agent. A connection that
    cannot be forwarded is closed at once (ZMQ then retries by itself).
    """

    def __init__(self, connect_agent: Callable[[], socket.socket], guest_port: int, path: str):
        self.guest_port = guest_port
        self.path = path
        self._connect_agent = connect_agent
        self._lock = threading.Lock()
        self._live: set[socket.socket] = set()
        self._closed = False
        self.last_error: str | None = None
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(16)
        threading.Thread(target=self._accept_forever, name=f"forward-{guest_port}", daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"ipc://{self.path}"

    def close(self) -> None:
        """Stop serving and cut every live connection (their ZMQ peers see a disconnect)."""
        with self._lock:
            self._closed = True
            live, self._live = list(self._live), set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        for sock in live:
            _cut(sock)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _accept_forever(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(client,), name=f"forward-{self.guest_port}-conn",
                             daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            guest = self._connect_agent()
        except Exception as error:  # noqa: BLE001 - any failure to reach the agent closes this connection only
            self.last_error = f"cannot reach the guest agent: {error}"
            client.close()
            return
        if not self._track(client, guest):
            return
        try:
            open_forward(guest, self.guest_port)
        except ForwardError as error:
            self.last_error = str(error)
            self._untrack(client, guest)
            return
        self.last_error = None
        wire.pipe_bytes(client, guest)
        self._untrack(client, guest)

    def _track(self, *socks: socket.socket) -> bool:
        with self._lock:
            if not self._closed:
                self._live.update(socks)
                return True
        for sock in socks:
            _cut(sock)
        return False

    def _untrack(self, *socks: socket.socket) -> None:
        with self._lock:
            self._live.difference_update(socks)
        for sock in socks:
            _cut(sock)


def _cut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def write_connection_file(path: str, ports: dict[str, int], key: str) -> None:
    """A Jupyter connection file for the guest's ipykernel (TCP on the guest's loopback)."""
    info = {"transport": "tcp", "ip": "127.0.0.1", "key": key, "signature_scheme": "hmac-sha256",
            "kernel_name": "", **{f"{name}_port": port for name, port in ports.items()}}
    with open(path, "w") as file:
        json.dump(info, file)
