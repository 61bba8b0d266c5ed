"""Host side of the guest agent protocol (docs/agent-protocol.md).

``AgentClient`` runs operations on the agent over stream connections (vsock in a real
guest, a Unix socket in tests). One connection carries one operation at a time; given a
``connect`` callable instead of a socket, the client opens more connections when several
threads run operations at once, and a new one after a connection broke.

Everything the agent sends is checked: frame sizes (vmm.guest.agent.MAX_FRAME) before
anything is buffered, JSON shapes, credit, tar member paths. Every wait has a deadline:
the agent sends HEARTBEAT during a silent exec, so ``io_timeout`` of silence means the
agent is gone.
"""

from __future__ import annotations

import os
import signal as signals
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Self

from vmm.guest import agent as wire

AGENT_PORT = wire.AGENT_PORT
DEFAULT_IO_TIMEOUT = 30.0
# After an exec's deadline the process group is killed; EXIT is awaited this long.
KILL_GRACE_SECONDS = 2.0
# A running exec is declared lost after this much silence: the agent sends HEARTBEAT
# every HEARTBEAT_SECONDS, so a slow command is never mistaken for a dead guest.
EXEC_SILENCE_SECONDS = 3 * wire.HEARTBEAT_SECONDS
# Idle connections kept for reuse when the client opens its own.
MAX_IDLE_CONNECTIONS = 4
# The Firecracker-style Unix socket of a machine's vsock device (docs/vsock.md).
UDS_CONNECT_TIMEOUT = 10.0   # s for the OK line: the device gives the guest 5 s to answer
_OK_LINE_MAX = 32
_MESSAGE_LIMIT = 300


class AgentError(Exception):
    """Any failure talking to the guest agent; the message is one line."""

    kind = "agent_error"


class AgentUnavailable(AgentError):
    """No agent answers: cannot connect, the connection broke, or it went silent."""


class AgentProtocolError(AgentError):
    """The agent broke the protocol (bad frame, size, JSON or archive); it is not trusted further."""


class CommandNotFound(AgentError):
    """The command to exec does not exist in the guest."""


class ExecFailed(AgentError):
    """The command exists but could not be started (cwd, user, permission)."""


class ExecTimeout(AgentError):
    """The command ran past its timeout and was killed; the output so far is kept."""

    def __init__(self, message: str, stdout: bytes, stderr: bytes):
        super().__init__(message)
        self.stdout = stdout
        self.stderr = stderr


class PathRefused(AgentError):
    """A path is not absolute, leaves what was named, or goes through a symlink."""


class GuestFileError(AgentError):
    """A file operation failed in the guest (not found, permission, no space...)."""


class AgentRequestFailed(AgentError):
    """Any other failure the agent reported."""


_EXEC_ERRORS = {
    "command_not_found": CommandNotFound, "bad_cwd": ExecFailed, "unknown_user": ExecFailed,
    "exec_failed": ExecFailed, "permission_denied": ExecFailed, "path_refused": PathRefused,
}
_FILE_ERRORS = {"path_refused": PathRefused, "bad_archive": AgentProtocolError}
_FILE_ERROR_KINDS = {"not_found", "permission_denied", "exists", "no_space", "read_only", "io_error"}


def _one_line(text: str) -> str:
    """Agent text made safe to print: no control characters, bounded length."""
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= _MESSAGE_LIMIT else text[:_MESSAGE_LIMIT] + "..."


def _agent_error(op: str, message: dict) -> AgentError:
    kind = message.get("error")
    text = message.get("message")
    if not isinstance(kind, str) or not isinstance(text, str):
        return AgentProtocolError("agent sent a malformed ERROR frame")
    if op == "exec":
        cls = _EXEC_ERRORS.get(kind, AgentRequestFailed)
    else:
        cls = _FILE_ERRORS.get(kind) or (GuestFileError if kind in _FILE_ERROR_KINDS else AgentRequestFailed)
    error = cls(f"guest agent: {op}: {_one_line(text)}")
    error.kind = _one_line(kind)
    return error


def _field(message: dict, key: str, kind: type | tuple, frame: str):
    value = message.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise AgentProtocolError(f"agent sent a {frame} frame without a valid {key!r}")
    return value


@dataclass(frozen=True)
class ExecResult:
    stdout: bytes
    stderr: bytes
    exit_code: int
    signal: int | None  # the signal that ended the process (exit_code is then 128 + it)


@dataclass(frozen=True)
class OutputChunk:
    stream: str  # "stdout" or "stderr"
    data: bytes


@dataclass(frozen=True)
class GuestStats:
    mem_total: int       # bytes
    mem_available: int
    mem_free: int
    load: tuple[float, float, float]
    uptime: float        # seconds since the guest booted
    procs_running: int
    procs_total: int


def connect_vsock_uds(path: str | os.PathLike, port: int = AGENT_PORT,
                      timeout: float = UDS_CONNECT_TIMEOUT) -> socket.socket:
    """A stream to guest ``port`` through a vsock device's Unix socket: ``CONNECT <port>``,
    then ``OK <host port>``. OSError (ConnectionRefusedError when the guest refused) if not."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
        sock.sendall(b"CONNECT %d\n" % port)
        line = b""
        while not line.endswith(b"\n"):   # byte by byte: what follows the line is the stream's
            byte = sock.recv(1)
            if not byte:
                raise ConnectionRefusedError(f"nothing listens on guest vsock port {port}")
            line += byte
            if len(line) > _OK_LINE_MAX:
                raise ConnectionError(f"{os.fspath(path)} is not a vsock socket (no OK line)")
        if not line.startswith(b"OK "):
            raise ConnectionError(f"{os.fspath(path)} is not a vsock socket (it answered "
                                  f"{_one_line(line.decode('ascii', 'replace'))!r})")
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    return sock


class _Channel:
    """One connection to the agent, after HELLO."""

    def __init__(self, sock: socket.socket, io_timeout: float):
        self.sock = sock
        self.io_timeout = io_timeout
        self.frames = wire.FrameReader(self._recv)
        self.send_lock = threading.Lock()
        self.in_op = False  # mid-operation: unusable for another until the op ends by protocol
        self.info: dict = {}
        self._deadline: float | None = None
        self._silence = io_timeout
        self._deadline_bound = False  # the last receive waited for the deadline, not the silence limit

    def handshake(self) -> None:
        self.send_json(wire.HELLO, {"protocol": wire.PROTOCOL_VERSION})
        frame_type, body = self.read()
        message = self.read_json(frame_type, body) if frame_type in wire.JSON_FRAMES else {}
        if frame_type == wire.ERROR:
            raise AgentProtocolError(f"guest agent refused the connection: {_one_line(str(message.get('message')))}")
        if frame_type != wire.HELLO:
            raise AgentProtocolError(f"agent answered HELLO with {wire.FRAME_NAMES[frame_type]}")
        if message.get("protocol") != wire.PROTOCOL_VERSION:
            raise AgentProtocolError(f"agent speaks protocol {_one_line(repr(message.get('protocol')))}, "
                                     f"this host speaks {wire.PROTOCOL_VERSION}: update the image's agent")
        self.info = message

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def _recv(self, size: int) -> bytes:
        timeout = self._silence
        self._deadline_bound = False
        if self._deadline is not None and self._deadline - time.monotonic() < timeout:
            timeout = max(self._deadline - time.monotonic(), 0.0)
            self._deadline_bound = True
        self.sock.settimeout(timeout)
        return self.sock.recv(size)

    def read(self, deadline: float | None = None, silence: float | None = None) -> tuple[int, bytes]:
        """The next frame; socket.timeout when ``deadline`` (monotonic) passes first,
        AgentUnavailable after ``silence`` seconds (default io_timeout) without a byte."""
        self._deadline = deadline
        self._silence = self.io_timeout if silence is None else silence
        try:
            frame = self.frames.read()
        except TimeoutError:
            if self._deadline_bound:
                raise
            raise AgentUnavailable(f"guest agent sent nothing for {self._silence:g} s; "
                                   "the guest may be hung or out of memory") from None
        except wire.ProtocolError as error:
            raise AgentProtocolError(f"guest agent broke the protocol: {error}") from None
        except OSError as error:
            raise AgentUnavailable(f"connection to the guest agent failed: {error}") from None
        if frame is None:
            raise AgentUnavailable("the guest agent closed the connection (did it exit or get killed?)")
        return frame

    def read_json(self, frame_type: int, body: bytes) -> dict:
        try:
            return wire.decode_json(frame_type, body)
        except wire.ProtocolError as error:
            raise AgentProtocolError(f"guest agent broke the protocol: {error}") from None

    def send(self, frame_type: int, body: bytes = b"") -> None:
        with self.send_lock:
            try:
                self.sock.settimeout(self.io_timeout)
                wire.send_frame(self.sock, frame_type, body)
            except TimeoutError:
                raise AgentUnavailable(f"guest agent did not take data for {self.io_timeout:g} s") from None
            except OSError as error:
                raise AgentUnavailable(f"connection to the guest agent failed: {error}") from None

    def send_json(self, frame_type: int, message: dict) -> None:
        self.send(frame_type, wire.encode_json(message))

    def request(self, op: str, message: dict) -> dict:
        """Send a REQUEST and return its first REPLY, or raise the agent's ERROR."""
        self.in_op = True
        self.send_json(wire.REQUEST, dict(message, op=op))
        return self.reply(op)

    def reply(self, op: str) -> dict:
        frame_type, body = self.read()
        if frame_type == wire.ERROR:
            self.in_op = False
            raise _agent_error(op, self.read_json(frame_type, body))
        if frame_type != wire.REPLY:
            raise AgentProtocolError(f"agent answered {op} with {wire.FRAME_NAMES[frame_type]}")
        return self.read_json(frame_type, body)


class AgentClient:
    """Talks to one guest's agent.

    ``connection`` is a connected socket (one connection: operations wait for each other)
    or a callable returning a new connected socket (as many connections as threads need).
    """

    def __init__(self, connection: socket.socket | Callable[[], socket.socket], *,
                 io_timeout: float = DEFAULT_IO_TIMEOUT):
        self.io_timeout = io_timeout
        self._connect = connection if callable(connection) else None
        self._socket = None if callable(connection) else connection
        self._idle: list[_Channel] = []
        self._open = 0
        self._cond = threading.Condition()
        self._closed = False

    @classmethod
    def over_vsock_uds(cls, path: str | os.PathLike, port: int = AGENT_PORT, *,
                       io_timeout: float = DEFAULT_IO_TIMEOUT) -> Self:
        """A client of the agent of a machine whose vsock device listens on the Unix
        socket ``path`` (another process's machine, e.g. one `sm start` runs)."""
        return cls(lambda: connect_vsock_uds(path, port), io_timeout=io_timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            if self._socket is not None:
                self._socket.close()
            self._cond.notify_all()
        for channel in idle:
            channel.close()

    # -- connections

    def _new_channel(self) -> _Channel:
        if self._connect is not None:
            try:
                sock = self._connect()
            except OSError as error:
                raise AgentUnavailable(f"cannot connect to the guest agent: {error}") from None
        else:
            sock, self._socket = self._socket, None
            if sock is None:
                raise AgentUnavailable("the connection to the guest agent was lost and this client "
                                       "cannot reconnect (give AgentClient a connect function)")
        channel = _Channel(sock, self.io_timeout)
        try:
            channel.handshake()
        except BaseException:
            channel.close()
            raise
        return channel

    def _acquire(self) -> _Channel:
        deadline = time.monotonic() + self.io_timeout
        with self._cond:
            while True:
                if self._closed:
                    raise AgentUnavailable("this AgentClient is closed")
                if self._idle:
                    return self._idle.pop()
                if self._connect is not None or self._open == 0:
                    self._open += 1
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AgentUnavailable(f"the agent connection stayed busy for {self.io_timeout:g} s")
                self._cond.wait(remaining)
        try:
            return self._new_channel()
        except BaseException:
            with self._cond:
                self._open -= 1
                self._cond.notify()
            raise

    def _release(self, channel: _Channel) -> None:
        with self._cond:
            if not channel.in_op and not self._closed and len(self._idle) < MAX_IDLE_CONNECTIONS:
                self._idle.append(channel)
                self._cond.notify()
                return
            self._open -= 1
            self._cond.notify()
        channel.close()

    def _run(self, op: str, message: dict) -> dict:
        channel = self._acquire()
        try:
            reply = channel.request(op, message)
            channel.in_op = False
            return reply
        finally:
            self._release(channel)

    # -- operations

    def hello(self) -> dict:
        """The agent's HELLO: protocol, agent name, pid, python version."""
        channel = self._acquire()
        self._release(channel)
        return dict(channel.info)

    def ping(self) -> float:
        """One request round trip; returns the agent's uptime in seconds."""
        return float(_field(self._run("ping", {}), "uptime", (int, float), "REPLY"))

    def stats(self) -> GuestStats:
        reply = self._run("stats", {})
        load = reply.get("load")
        if not (isinstance(load, list) and len(load) == 3 and all(isinstance(x, (int, float)) for x in load)):
            raise AgentProtocolError("agent sent stats without a valid 'load'")
        return GuestStats(
            mem_total=_field(reply, "mem_total", int, "REPLY"),
            mem_available=_field(reply, "mem_available", int, "REPLY"),
            mem_free=_field(reply, "mem_free", int, "REPLY"),
            load=(float(load[0]), float(load[1]), float(load[2])),
            uptime=float(_field(reply, "uptime", (int, float), "REPLY")),
            procs_running=_field(reply, "procs_running", int, "REPLY"),
            procs_total=_field(reply, "procs_total", int, "REPLY"),
        )

    def set_clock(self, ts: float | None = None) -> None:
        """Set the guest's wall clock (default: this host's time), e.g. after a restore."""
        self._run("set_clock", {"time": time.time() if ts is None else float(ts)})

    def reseed(self, seed: bytes | None = None) -> None:
        """Reseed the guest kernel's random generator (default: 64 bytes from this host's),
        e.g. after a restore, so that clones of one snapshot do not share it."""
        self._run("reseed", {"seed": (os.urandom(64) if seed is None else seed).hex()})

    def exec(self, argv: list[str], stdin: bytes | None = None, env: dict[str, str] | None = None,
             cwd: str | None = None, user: str | None = None, timeout: float | None = None,
             pty: bool = False) -> ExecResult:
        """Run ``argv`` to completion; a command past ``timeout`` is killed (ExecTimeout)."""
        with self.exec_stream(argv, env=env, cwd=cwd, user=user, pty=pty) as stream:
            if stdin:
                stream.write(stdin)
            stream.close_stdin()
            return stream.result(timeout)

    def exec_stream(self, argv: list[str], env: dict[str, str] | None = None, cwd: str | None = None,
                    user: str | None = None, pty: bool | tuple[int, int] = False) -> ExecStream:
        """Start ``argv`` and return its ExecStream (iterate it for output chunks).

        ``pty``: True, or (rows, cols), runs the command on a terminal; stdout then carries
        everything the terminal shows and there is no separate stderr.
        """
        if isinstance(argv, (str, bytes)):
            raise TypeError("argv is a list of strings, e.g. ['sh', '-c', 'echo hi']")
        request: dict = {"argv": list(argv), "env": env, "cwd": cwd, "user": user}
        if pty:
            rows, cols = pty if isinstance(pty, tuple) else (24, 80)
            request["pty"] = {"rows": rows, "cols": cols}
        channel = self._acquire()
        try:
            reply = channel.request("exec", request)
            stream = ExecStream(self, channel, reply, argv)
        except BaseException:
            self._release(channel)
            raise
        return stream

    def put(self, host_path: str | os.PathLike, guest_path: str) -> None:
        """Copy a host file, directory or symlink to exactly ``guest_path`` (absolute)."""
        host_path = os.fspath(host_path)
        os.lstat(host_path)  # a missing source is the caller's FileNotFoundError, before any traffic
        channel = self._acquire()
        try:
            channel.request("put", {"path": guest_path})
            pending = bytearray()

            def write(data: bytes) -> None:
                pending.extend(data)
                while len(pending) >= wire.DATA_CHUNK:
                    channel.send(wire.DATA, bytes(pending[:wire.DATA_CHUNK]))
                    del pending[:wire.DATA_CHUNK]

            wire.write_tar(host_path, write)
            if pending:
                channel.send(wire.DATA, bytes(pending))
            channel.send(wire.END)
            channel.reply("put")
            channel.in_op = False
        finally:
            self._release(channel)

    def get(self, guest_path: str, host_path: str | os.PathLike, max_bytes: int | None = None) -> None:
        """Copy ``guest_path`` to exactly ``host_path``; symlinks in the tree stay symlinks,
        setuid/setgid bits are dropped, nothing is written outside ``host_path``.
        ``max_bytes`` bounds the archive a (hostile) guest may send."""
        host_path = os.path.abspath(os.fspath(host_path))
        try:
            writer = wire.TreeWriter(host_path, mode_mask=0o777)
        except wire.OpError as error:
            raise GuestFileError(f"cannot write {host_path}: {error.message}") from None
        try:
            channel = self._acquire()
        except BaseException:
            writer.close()
            raise
        try:
            try:
                channel.request("get", {"path": guest_path})
            except BaseException:
                writer.close()
                raise
            source = _DataSource(channel, max_bytes)
            try:
                wire.extract_tar(source.read, writer)
            except wire.OpError as error:
                if error.kind in ("path_refused", "bad_archive"):
                    raise (PathRefused if error.kind == "path_refused" else AgentProtocolError)(
                        f"guest agent sent a bad archive for {_one_line(guest_path)}: {_one_line(error.message)}") from None
                raise GuestFileError(f"cannot write under {host_path}: {error.message}") from None
            channel.in_op = not source.ended
        finally:
            self._release(channel)


class _DataSource:
    """The DATA frames of a get as a byte stream; an ERROR frame raises the agent's error."""

    def __init__(self, channel: _Channel, max_bytes: int | None):
        self._channel = channel
        self._max_bytes = max_bytes
        self._received = 0
        self._chunk = memoryview(b"")
        self.ended = False

    def read(self, size: int) -> bytes:
        while not self._chunk and not self.ended:
            frame_type, body = self._channel.read()
            if frame_type == wire.END:
                self.ended = True
            elif frame_type == wire.DATA:
                self._received += len(body)
                if self._max_bytes is not None and self._received > self._max_bytes:
                    raise GuestFileError(f"guest sent more than max_bytes={self._max_bytes}")
                self._chunk = memoryview(body)
            elif frame_type == wire.ERROR:
                self.ended = True
                self._channel.in_op = False
                raise _agent_error("get", self._channel.read_json(frame_type, body))
            else:
                raise AgentProtocolError(f"agent sent {wire.FRAME_NAMES[frame_type]} inside a get")
        data = bytes(self._chunk[:size])
        self._chunk = self._chunk[size:]
        return data


class ExecStream:
    """A running exec: iterate for OutputChunk, write stdin, signal, then ``result()``.

    Iterate from one thread; ``write``, ``close_stdin``, ``send_signal`` and ``resize``
    may be called from others. Stdin beyond the agent's window waits in this object and
    goes out as the process consumes it.
    """

    def __init__(self, client: AgentClient, channel: _Channel, reply: dict, argv: list[str]):
        self._client = client
        self.argv = list(argv)
        self._channel = channel
        self.pid: int = _field(reply, "pid", int, "REPLY")
        window = _field(reply, "stdin_window", int, "REPLY")
        self._credit = window
        self._window = window
        self._stdin_lock = threading.Lock()
        self._stdin_sent = threading.Condition(self._stdin_lock)  # _pending emptied, or the exec ended
        self._pending = bytearray()
        self._eof_wanted = False
        self._eof_sent = False
        self.exit_code: int | None = None
        self.signal: int | None = None
        self._finished = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __iter__(self) -> Iterator[OutputChunk]:
        while True:
            chunk = self._next_chunk(None)
            if chunk is None:
                return
            yield chunk

    # -- input

    def write(self, data: bytes) -> None:
        with self._stdin_lock:
            if self._eof_wanted:
                raise ValueError("stdin is already closed")
            if not self._finished:
                self._pending.extend(data)
                self._flush_stdin()

    def wait_stdin_sent(self, timeout: float | None = None) -> bool:
        """Wait until everything written has gone to the agent (the process is reading its
        stdin) or the exec ended; False after ``timeout`` s. A thread that copies an endless
        stdin calls this between writes, so this object does not buffer without bound;
        the output must meanwhile be read by another thread (that is where credit comes back)."""
        with self._stdin_sent:
            return self._stdin_sent.wait_for(lambda: not self._pending or self._finished, timeout)

    def close_stdin(self) -> None:
        with self._stdin_lock:
            self._eof_wanted = True
            if not self._finished:
                self._flush_stdin()

    def send_signal(self, signum: int, group: bool = False) -> None:
        """Signal the process (``group``: its whole process group); no-op once it exited."""
        if not self._finished:
            self._channel.send_json(wire.SIGNAL, {"signal": int(signum), "group": bool(group)})

    def resize(self, rows: int, cols: int) -> None:
        if not self._finished:
            self._channel.send_json(wire.RESIZE, {"rows": int(rows), "cols": int(cols)})

    def _flush_stdin(self) -> None:
        while self._pending and self._credit > 0:
            size = min(len(self._pending), self._credit, wire.DATA_CHUNK)
            self._channel.send(wire.STDIN, bytes(self._pending[:size]))
            del self._pending[:size]
            self._credit -= size
        if not self._pending:
            self._stdin_sent.notify_all()
        if self._eof_wanted and not self._pending and not self._eof_sent:
            self._channel.send(wire.STDIN_EOF)
            self._eof_sent = True

    # -- output

    def result(self, timeout: float | None = None) -> ExecResult:
        """Read to the end; the output not already iterated is in the result."""
        deadline = None if timeout is None else time.monotonic() + timeout
        stdout: list[bytes] = []
        stderr: list[bytes] = []
        try:
            while True:
                chunk = self._next_chunk(deadline)
                if chunk is None:
                    break
                (stdout if chunk.stream == "stdout" else stderr).append(chunk.data)
        except TimeoutError:
            self._kill_after_timeout(stdout, stderr)
            raise ExecTimeout(f"{_one_line(' '.join(self.argv))[:80]}: still running after {timeout:g} s, killed",
                              b"".join(stdout), b"".join(stderr)) from None
        return ExecResult(b"".join(stdout), b"".join(stderr), self.exit_code, self.signal)

    def close(self) -> None:
        """Kill the process if it still runs and give the connection back."""
        if self._finished:
            return
        try:
            self._kill_after_timeout([], [])
        except AgentError:
            self._abandon()

    def _kill_after_timeout(self, stdout: list[bytes], stderr: list[bytes]) -> None:
        self.send_signal(signals.SIGKILL, group=True)
        deadline = time.monotonic() + KILL_GRACE_SECONDS
        try:
            while True:
                chunk = self._next_chunk(deadline)
                if chunk is None:
                    return
                (stdout if chunk.stream == "stdout" else stderr).append(chunk.data)
        except TimeoutError:
            self._abandon()

    def _abandon(self) -> None:
        if not self._finished:
            with self._stdin_lock:
                self._finished = True
                self._stdin_sent.notify_all()
            self._client._release(self._channel)  # still in_op: closed, not reused

    def _next_chunk(self, deadline: float | None) -> OutputChunk | None:
        if self._finished:
            return None
        try:
            while True:
                frame_type, body = self._channel.read(deadline, max(self._channel.io_timeout, EXEC_SILENCE_SECONDS))
                if frame_type == wire.STDOUT:
                    return OutputChunk("stdout", body)
                if frame_type == wire.STDERR:
                    return OutputChunk("stderr", body)
                if frame_type == wire.HEARTBEAT:
                    continue
                if frame_type == wire.WINDOW:
                    self._credit_back(_field(self._channel.read_json(frame_type, body), "bytes", int, "WINDOW"))
                    continue
                if frame_type == wire.EXIT:
                    self._exited(self._channel.read_json(frame_type, body))
                    return None
                raise AgentProtocolError(f"agent sent {wire.FRAME_NAMES[frame_type]} during exec")
        except AgentError:
            self._abandon()
            raise

    def _credit_back(self, size: int) -> None:
        with self._stdin_lock:
            if size <= 0 or self._credit + size > self._window:
                raise AgentProtocolError("agent returned stdin credit it was never given")
            self._credit += size
            self._flush_stdin()

    def _exited(self, message: dict) -> None:
        exit_code = _field(message, "exit_code", int, "EXIT")
        signum = message.get("signal")
        if signum is not None and (not isinstance(signum, int) or isinstance(signum, bool)):
            raise AgentProtocolError("agent sent an EXIT frame with a bad 'signal'")
        self.exit_code, self.signal = exit_code, signum
        with self._stdin_lock:
            self._finished = True
            self._stdin_sent.notify_all()
        try:
            self._channel.send(wire.DONE)
            self._channel.in_op = False
        except AgentError:
            pass  # the result is complete; a dead connection is just not reused
        finally:
            self._client._release(self._channel)
