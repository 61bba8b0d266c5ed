"""sm guest agent: runs inside the guest on the image's own python3 (3.8 or newer).

Standard library only, and self-contained: init copies this one file into the guest.
The host imports it too (``vmm.agent_client``) for the constants, the frame codec and
the tar reader, so both ends share one implementation of the wire format.

Protocol (docs/agent-protocol.md): on each stream connection, frames of
``u32 big-endian body length | u8 type | body``; control bodies are JSON objects, data
bodies raw bytes. The client says HELLO, then runs one operation at a time.

In the guest:  python3 -I -S agent.py            (vsock port AGENT_PORT)
On a host:     python3 agent.py --unix PATH       (tests, benchmarks)
"""

import argparse
import errno
import fcntl
import grp
import json
import os
import platform
import pwd
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import tarfile
import termios
import threading
import time
import traceback
from collections import deque

PROTOCOL_VERSION = 1
AGENT_PORT = 52
AGENT_NAME = "sm-agent"

# Largest frame body either side accepts; a bigger length is a protocol error, read no further.
MAX_FRAME = 1 << 20
# Data frames are sent in pieces of at most this size.
DATA_CHUNK = 256 * 1024
# Stdin bytes the client may have in flight to one exec before the agent acknowledges them.
STDIN_WINDOW = 1 << 20
# An exec with no output sends HEARTBEAT this often, so the host can tell a silent command
# from a dead guest.
HEARTBEAT_SECONDS = 5.0
# After the process exits, output pipes held open by its background children are read
# for at most this long before EXIT is sent.
EXIT_DRAIN_SECONDS = 0.5
# A forward op gives up connecting to the guest's TCP port after this long.
FORWARD_CONNECT_SECONDS = 5.0

# Frame types.
HELLO = 1      # JSON, both ways: version handshake, first frame of a connection
REQUEST = 2    # JSON, client -> agent: {"op": ...}
REPLY = 3      # JSON, agent -> client: success (ends the op, except exec's "started" reply)
ERROR = 4      # JSON, agent -> client: {"error": kind, "message": text}, ends the op
STDIN = 5      # bytes, client -> agent
STDIN_EOF = 6  # empty, client -> agent
STDOUT = 7     # bytes, agent -> client
STDERR = 8     # bytes, agent -> client
SIGNAL = 9     # JSON, client -> agent: {"signal": n, "group": bool}
RESIZE = 10    # JSON, client -> agent: {"rows": r, "cols": c}
WINDOW = 11    # JSON, agent -> client: {"bytes": n} stdin bytes consumed
EXIT = 12      # JSON, agent -> client: {"exit_code": n, "signal": n|null}
DONE = 13      # empty, client -> agent: the client has seen EXIT; the exec is over
DATA = 14      # bytes, both ways: tar stream of put/get
END = 15       # empty, both ways: end of the DATA stream
HEARTBEAT = 16  # empty, agent -> client: an exec is still running

FRAME_NAMES = {
    HELLO: "HELLO", REQUEST: "REQUEST", REPLY: "REPLY", ERROR: "ERROR", STDIN: "STDIN",
    STDIN_EOF: "STDIN_EOF", STDOUT: "STDOUT", STDERR: "STDERR", SIGNAL: "SIGNAL",
    RESIZE: "RESIZE", WINDOW: "WINDOW", EXIT: "EXIT", DONE: "DONE", DATA: "DATA", END: "END",
    HEARTBEAT: "HEARTBEAT",
}
JSON_FRAMES = frozenset((HELLO, REQUEST, REPLY, ERROR, SIGNAL, RESIZE, WINDOW, EXIT))

FRAME_HEADER = struct.Struct(">IB")
_RECV_SIZE = 256 * 1024

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class ProtocolError(Exception):
    """The peer broke the wire format; the connection cannot be used any more."""


class ConnectionLost(Exception):
    """The peer closed the connection or it failed."""


class OpError(Exception):
    """An operation failed in a way the peer is told about: ``kind`` is a stable name."""

    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind
        self.message = message


# ---------------------------------------------------------------- frames

class FrameReader:
    """Reads frames from ``recv(n) -> bytes`` (b"" at end of stream).

    The length is checked before anything is buffered for the body, so a peer can make
    this side hold at most MAX_FRAME + one receive of bytes.
    """

    def __init__(self, recv):
        self._recv = recv
        self._buf = bytearray()

    def read(self):
        """The next frame as ``(type, body)``, or None when the stream ends between frames."""
        buf = self._buf
        while len(buf) < FRAME_HEADER.size:
            if not self._fill():
                if buf:
                    raise ProtocolError("connection closed inside a frame header")
                return None
        length, frame_type = FRAME_HEADER.unpack_from(buf)
        if length > MAX_FRAME:
            raise ProtocolError(f"frame of {length} bytes exceeds the {MAX_FRAME}-byte limit")
        if frame_type not in FRAME_NAMES:
            raise ProtocolError(f"unknown frame type {frame_type}")
        end = FRAME_HEADER.size + length
        while len(buf) < end:
            if not self._fill(end - len(buf)):
                raise ProtocolError(f"connection closed inside a {FRAME_NAMES[frame_type]} frame")
        with memoryview(buf) as view:
            body = bytes(view[FRAME_HEADER.size:end])
        del buf[:end]
        return frame_type, body

    def take_buffer(self):
        """Bytes received but not yet returned as a frame (a connection leaving the protocol)."""
        data, self._buf = bytes(self._buf), bytearray()
        return data

    def _fill(self, wanted=0):
        chunk = self._recv(min(max(wanted, 65536), _RECV_SIZE))
        if not chunk:
            return False
        self._buf += chunk
        return True


def encode_frame(frame_type, body=b""):
    if len(body) > MAX_FRAME:
        raise ValueError(f"frame body of {len(body)} bytes exceeds MAX_FRAME")
    return FRAME_HEADER.pack(len(body), frame_type) + body


def send_frame(sock, frame_type, body=b""):
    """One frame in one system call where the socket allows it (no copy of the body)."""
    if len(body) > MAX_FRAME:
        raise ValueError(f"frame body of {len(body)} bytes exceeds MAX_FRAME")
    header = FRAME_HEADER.pack(len(body), frame_type)
    total = len(header) + len(body)
    sent = sock.sendmsg([header, body]) if body else sock.send(header)
    if sent < total:
        rest = memoryview(header + body)[sent:] if sent < len(header) else memoryview(body)[sent - len(header):]
        sock.sendall(rest)


def encode_json(obj):
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def decode_json(frame_type, body):
    """A control frame's body: a JSON object, or ProtocolError."""
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ProtocolError(f"{FRAME_NAMES[frame_type]} frame body is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{FRAME_NAMES[frame_type]} frame body is not a JSON object")
    return obj


# ---------------------------------------------------------------- tar

TAR_BLOCK = 512
# pax and GNU long-name records larger than this are refused rather than buffered.
MAX_TAR_EXTENSION = 64 * 1024
# Padding after the end-of-archive blocks (tarfile pads to 10 KiB records).
MAX_TAR_TRAILER = 64 * 1024


class TarMember:
    __slots__ = ("kind", "linkname", "mode", "mtime", "name", "size")

    def __init__(self, name, kind, mode, mtime, size, linkname):
        self.name = name
        self.kind = kind  # "file", "dir", "symlink", "hardlink"
        self.mode = mode
        self.mtime = mtime
        self.size = size
        self.linkname = linkname


def _tar_number(field):
    if field and field[0] & 0x80:  # GNU base-256
        if field[0] == 0xFF:
            raise OpError("bad_archive", "negative number in a tar header")
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise OpError("bad_archive", "bad number in a tar header") from None


def _tar_string(field):
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _parse_pax(data):
    records = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            raise OpError("bad_archive", "malformed pax record")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise OpError("bad_archive", "malformed pax record length") from None
        end = pos + length
        if length <= 0 or end > len(data) or data[end - 1:end] != b"\n":
            raise OpError("bad_archive", "malformed pax record")
        key, sep, value = data[space + 1:end - 1].partition(b"=")
        if not sep:
            raise OpError("bad_archive", "malformed pax record")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos = end
    return records


class TarReader:
    """A streaming reader of the tar subset put/get use: regular files, directories,
    symlinks, hard links, with pax ('x', 'g') and GNU long names ('L', 'K').

    Written here rather than using tarfile because the bytes may come from a hostile
    peer: every extension record is size-checked before it is buffered, and member
    data goes straight to its destination.
    """

    def __init__(self, read):
        self._read = read  # read(n) -> up to n bytes, b"" at end
        self._pending = 0  # unread data + padding of the current member

    def _read_exact(self, n):
        parts = []
        while n:
            chunk = self._read(n)
            if not chunk:
                raise OpError("bad_archive", "tar stream ends inside a member")
            parts.append(chunk)
            n -= len(chunk)
        return b"".join(parts)

    def members(self):
        overrides = {}
        while True:
            self._skip_pending()
            header = self._read_exact(TAR_BLOCK)
            if header == bytes(TAR_BLOCK):
                self._drain_trailer()
                return
            self._check_checksum(header)
            typeflag = header[156:157]
            size = _tar_number(header[124:136])
            if typeflag in (b"x", b"g", b"L", b"K"):
                if size > MAX_TAR_EXTENSION:
                    raise OpError("bad_archive", f"tar extension header of {size} bytes is too large")
                data = self._read_exact(size)
                self._read_exact(-size % TAR_BLOCK)
                if typeflag == b"x":
                    overrides.update(_parse_pax(data))
                elif typeflag == b"L":
                    overrides["path"] = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                elif typeflag == b"K":
                    overrides["linkpath"] = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                continue
            name = _tar_string(header[0:100])
            if header[257:263] == b"ustar\x00":
                prefix = _tar_string(header[345:500])
                if prefix:
                    name = prefix + "/" + name
            member = TarMember(
                name=overrides.get("path", name),
                kind=self._kind(typeflag),
                mode=_tar_number(header[100:108]) & 0o7777,
                mtime=_tar_number(header[136:148]),
                size=size,
                linkname=overrides.get("linkpath", _tar_string(header[157:257])),
            )
            try:
                if "size" in overrides:
                    member.size = int(overrides["size"])
                if "mtime" in overrides:
                    member.mtime = float(overrides["mtime"])
            except ValueError:
                raise OpError("bad_archive", "bad number in a pax header") from None
            if member.size < 0:
                raise OpError("bad_archive", "negative member size")
            overrides = {}
            self._pending = member.size + (-member.size % TAR_BLOCK) if member.kind == "file" else 0
            yield member

    def read_data(self, member, write):
        """Pass the current member's data to ``write`` in pieces."""
        remaining = member.size
        while remaining:
            chunk = self._read(min(remaining, DATA_CHUNK))
            if not chunk:
                raise OpError("bad_archive", f"tar stream ends inside {member.name}")
            write(chunk)
            remaining -= len(chunk)
            self._pending -= len(chunk)

    def _skip_pending(self):
        while self._pending:
            chunk = self._read(min(self._pending, DATA_CHUNK))
            if not chunk:
                raise OpError("bad_archive", "tar stream ends inside a member")
            self._pending -= len(chunk)

    def _drain_trailer(self):
        drained = 0
        while True:
            chunk = self._read(DATA_CHUNK)
            if not chunk:
                return
            drained += len(chunk)
            if drained > MAX_TAR_TRAILER or chunk.count(0) != len(chunk):
                raise OpError("bad_archive", "data after the end of the tar archive")

    @staticmethod
    def _check_checksum(header):
        stored = _tar_number(header[148:156])
        blanked = header[:148] + b" " * 8 + header[156:]
        if stored != sum(blanked) and stored != sum(struct.unpack("512b", blanked)):
            raise OpError("bad_archive", "tar header checksum mismatch")

    @staticmethod
    def _kind(typeflag):
        if typeflag in (b"0", b"\0", b"7"):
            return "file"
        kind = {b"5": "dir", b"2": "symlink", b"1": "hardlink"}.get(typeflag)
        if kind is None:
            raise OpError("bad_archive", f"unsupported tar member type {typeflag.decode('latin-1')!r}")
        return kind


def member_components(name):
    """The path components of a member named "." or "./a/b", relative to the destination."""
    if name != "." and not name.startswith("./"):
        raise OpError("path_refused", f"archive member {name!r} is not under ./")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    for part in parts:
        if part == ".." or "\0" in part:
            raise OpError("path_refused", f"archive member {name!r} leaves the destination")
    return parts


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class TreeWriter:
    """Writes archive members under one destination path without following symlinks.

    The destination's parent is opened as named (the caller chose it); every component
    below it is opened relative to its parent's descriptor with O_NOFOLLOW, so a symlink
    in the tree, whether it was there before or came in the archive, is never followed.
    """

    def __init__(self, destination, mode_mask=0o7777):
        if not os.path.isabs(destination) or ".." in destination.split("/"):
            raise OpError("path_refused", f"destination {destination!r} is not an absolute path without '..'")
        destination = os.path.normpath(destination)
        self.destination = destination
        self._mode_mask = mode_mask
        parent, self._root_name = os.path.split(destination)
        try:
            self._parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as error:
            raise OpError(_errno_kind(error), f"cannot open {parent}: {error.strerror}") from None
        self._cached = None  # (components, fd) of the last directory opened
        self._dir_times = []  # (components, mode, mtime), applied at the end

    def close(self):
        self._drop_cache()
        os.close(self._parent_fd)

    def write(self, reader, member):
        parts = member_components(member.name)
        try:
            if member.kind == "dir":
                fd = self._open_dir(parts, create=True)
                self._dir_times.append((parts, member.mode, member.mtime))
                if fd != self._cached_fd():
                    os.close(fd)
                return
            if not parts and not self._root_name:
                raise OpError("path_refused", f"cannot replace / with a {member.kind}")
            dir_fd, name = self._entry(parts)
            self._remove_non_dir(dir_fd, name, member.name)
            if member.kind == "file":
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o600, dir_fd=dir_fd)
                try:
                    reader.read_data(member, lambda chunk: _write_all(fd, chunk))
                    os.fchmod(fd, member.mode & self._mode_mask)
                    os.utime(fd, (member.mtime, member.mtime))
                finally:
                    os.close(fd)
            elif member.kind == "symlink":
                os.symlink(member.linkname, name, dir_fd=dir_fd)
                os.utime(name, (member.mtime, member.mtime), dir_fd=dir_fd, follow_symlinks=False)
            else:
                self._hard_link(member, dir_fd, name)
        except OSError as error:
            raise OpError(_errno_kind(error), f"cannot write {member.name}: {error.strerror}") from None

    def _hard_link(self, member, dir_fd, name):
        source = member_components(member.linkname)
        if not source:
            source_dir, source_name = self._parent_fd, self._root_name
        else:
            source_dir, source_name = self._open_dir(source[:-1], create=False), source[-1]
        try:
            if stat.S_ISDIR(os.stat(source_name, dir_fd=source_dir, follow_symlinks=False).st_mode):
                raise OpError("path_refused", f"hard link {member.name} points to a directory")
            os.link(source_name, name, src_dir_fd=source_dir, dst_dir_fd=dir_fd, follow_symlinks=False)
        finally:
            if source_dir not in (self._parent_fd, self._cached_fd()):
                os.close(source_dir)

    def finish(self):
        """Directory modes and times last: children were written into them meanwhile."""
        for parts, mode, mtime in reversed(self._dir_times):
            try:
                fd = self._open_dir(parts, create=False)
                try:
                    os.fchmod(fd, mode & self._mode_mask)
                    os.utime(fd, (mtime, mtime))
                finally:
                    if fd != self._cached_fd():
                        os.close(fd)
            except OSError as error:
                shown = "./" + "/".join(parts)
                raise OpError(_errno_kind(error), f"cannot set the mode of {shown}: {error.strerror}") from None

    def _cached_fd(self):
        return self._cached[1] if self._cached else None

    def _drop_cache(self):
        if self._cached:
            os.close(self._cached[1])
            self._cached = None

    def _entry(self, parts):
        """(directory fd, name) of the entry ``parts`` names; the fd stays cached."""
        if not parts:
            return self._parent_fd, self._root_name
        fd = self._open_dir(parts[:-1], create=True)
        if fd != self._cached_fd():
            self._drop_cache()
            self._cached = (parts[:-1], fd)
        return fd, parts[-1]

    def _open_dir(self, parts, create):
        if self._cached and self._cached[0] == parts:
            return self._cached[1]
        if self._root_name:
            fd = self._open_child_dir(self._parent_fd, self._root_name, create, ".")
        else:
            fd = os.open("/", _DIR_FLAGS)
        for index, part in enumerate(parts):
            try:
                child = self._open_child_dir(fd, part, create, "./" + "/".join(parts[:index + 1]))
            finally:
                os.close(fd)
            fd = child
        return fd

    def _open_child_dir(self, dir_fd, name, create, shown):
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            if not create:
                raise
        except OSError as error:
            if error.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            if not create:
                raise OpError("path_refused", f"{shown} is not a directory") from None
            # A file or symlink where the archive has a directory: the archive wins,
            # but the old entry is removed, never followed.
            os.unlink(name, dir_fd=dir_fd)
        os.mkdir(name, 0o755, dir_fd=dir_fd)
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)

    @staticmethod
    def _remove_non_dir(dir_fd, name, shown):
        try:
            mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
        except FileNotFoundError:
            return
        if stat.S_ISDIR(mode):
            raise OpError("path_refused", f"{shown} would replace a directory")
        os.unlink(name, dir_fd=dir_fd)


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def extract_tar(read, writer):
    """Extract the tar stream ``read`` yields through ``writer`` (a TreeWriter), then close it."""
    try:
        reader = TarReader(read)
        for member in reader.members():
            writer.write(reader, member)
        writer.finish()
    finally:
        writer.close()


def _plain_members(member):
    """tarfile filter: only what TreeWriter accepts."""
    return member if (member.isreg() or member.isdir() or member.issym() or member.islnk()) else None


def write_tar(source, write):
    """Stream ``source`` (a file, directory or symlink) as a tar archive whose root is "."."""

    class Sink:
        def write(self, data):
            write(data)
            return len(data)

    with tarfile.open(fileobj=Sink(), mode="w|", format=tarfile.PAX_FORMAT, bufsize=DATA_CHUNK) as archive:
        archive.add(source, arcname=".", recursive=True, filter=_plain_members)


def _errno_kind(error):
    return {
        errno.ENOENT: "not_found", errno.ENOTDIR: "not_found", errno.EACCES: "permission_denied",
        errno.EPERM: "permission_denied", errno.ELOOP: "path_refused", errno.EEXIST: "exists",
        errno.ENOSPC: "no_space", errno.EROFS: "read_only",
    }.get(error.errno, "io_error")


# ---------------------------------------------------------------- processes

class Child:
    """A process the agent started; its exit status is delivered by the ProcessTable."""

    def __init__(self, table, popen):
        self._table = table
        self.popen = popen
        self.pid = popen.pid
        self.status = None  # wait status, once reaped
        self._exited = threading.Event()
        self._on_exit = []

    def add_exit_callback(self, callback):
        with self._table.lock:
            if self.status is None:
                self._on_exit.append(callback)
                return
        callback()

    def wait(self, timeout=None):
        return self._exited.wait(timeout)

    def signal(self, signum, group=False):
        """Send a signal unless reaped (under the table lock, so the pid cannot be reused)."""
        with self._table.lock:
            if self.status is not None:
                return
            try:
                if group:
                    os.killpg(self.pid, signum)
                else:
                    os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def exit_info(self):
        """{"exit_code": n, "signal": n or None}; a signal gives the shell's 128 + n."""
        if os.WIFSIGNALED(self.status):
            signum = os.WTERMSIG(self.status)
            return {"exit_code": 128 + signum, "signal": signum}
        return {"exit_code": os.WEXITSTATUS(self.status), "signal": None}

    def _reaped(self, status):
        """Called by the reaper under the table lock; it then runs the callbacks and sets
        the event, in that order, so a waiter knows no callback is still to come."""
        self.status = status
        self.popen.returncode = status  # Popen must never wait for it itself
        callbacks, self._on_exit = self._on_exit, []
        return callbacks


class ProcessTable:
    """Starts the agent's children and reaps every child of the agent.

    One thread waits for any child (``waitid(WNOWAIT)``), then, holding the lock that
    spawn holds, reaps it: a status goes to the Child it belongs to, and orphans that
    the kernel re-parented to the agent (a child subreaper) are simply reaped. Nothing
    else in the agent may call wait; Popen's own wait is never used.
    """

    def __init__(self):
        self.lock = threading.Condition()
        self._children = {}
        self._generation = 0
        threading.Thread(target=self._reap_forever, name="reaper", daemon=True).start()

    def spawn(self, argv, **popen_args):
        with self.lock:
            popen = subprocess.Popen(argv, **popen_args)
            child = Child(self, popen)
            self._children[child.pid] = child
            self._generation += 1
            self.lock.notify_all()
        return child

    def _reap_forever(self):
        while True:
            with self.lock:
                generation = self._generation
            try:
                waitable = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
            except ChildProcessError:
                with self.lock:
                    while self._generation == generation:
                        self.lock.wait()
                continue
            if waitable is None:
                continue
            with self.lock:
                try:
                    pid, status = os.waitpid(waitable.si_pid, os.WNOHANG)
                except ChildProcessError:  # Popen reaped a child whose exec failed
                    continue
                child = self._children.pop(pid, None) if pid else None
                callbacks = child._reaped(status) if child is not None else ()
            if child is not None:
                for callback in callbacks:
                    callback()
                child._exited.set()


def become_subreaper():
    """Orphans of the commands we run become our children, so we reap them."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (ImportError, OSError, AttributeError):
        return False


class Identity:
    __slots__ = ("gid", "groups", "home", "uid")

    def __init__(self, uid, gid, groups, home):
        self.uid, self.gid, self.groups, self.home = uid, gid, groups, home


def resolve_user(spec):
    """``name``, ``uid``, ``name:group`` or ``uid:gid``, as Docker reads --user."""
    if spec is None:
        return None
    user, _, group = spec.partition(":")
    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        if not user.isdigit():
            raise OpError("unknown_user", f"no user {user!r} in the guest's /etc/passwd") from None
        entry = None
    uid = int(user) if entry is None else entry.pw_uid
    gid = 0 if entry is None else entry.pw_gid
    home = "/" if entry is None else entry.pw_dir
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise OpError("unknown_user", f"no group {group!r} in the guest's /etc/group") from None
    groups = [gid]
    if entry is not None and not group:
        try:
            groups = os.getgrouplist(entry.pw_name, gid)
        except OSError:
            pass
    return Identity(uid, gid, groups, home)


def _child_setup(identity, controlling_tty):
    """Runs in the child between fork and exec (after setsid): only async-safe calls."""

    def setup():
        if controlling_tty:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        if identity is not None:
            os.setgroups(identity.groups)
            os.setgid(identity.gid)
            os.setuid(identity.uid)

    return setup


# ---------------------------------------------------------------- operations

def _require(request, key, kind, optional=False):
    value = request.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise OpError("bad_request", f"{key!r} must be {kind.__name__}")
    return value


def _absolute_path(request):
    path = _require(request, "path", str)
    if not os.path.isabs(path) or "\0" in path or ".." in path.split("/"):
        raise OpError("path_refused", f"{path!r} is not an absolute path without '..'")
    return os.path.normpath(path)


def read_stats():
    meminfo = {}
    with open("/proc/meminfo") as lines:
        for line in lines:
            key, _, value = line.partition(":")
            parts = value.split()
            if parts and parts[0].isdigit():
                meminfo[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    with open("/proc/loadavg") as text:
        load = text.read().split()
    with open("/proc/uptime") as text:
        uptime = float(text.read().split()[0])
    running, _, total = load[3].partition("/")
    return {
        "mem_total": meminfo.get("MemTotal", 0),
        "mem_free": meminfo.get("MemFree", 0),
        "mem_available": meminfo.get("MemAvailable", meminfo.get("MemFree", 0)),
        "buffers": meminfo.get("Buffers", 0),
        "cached": meminfo.get("Cached", 0),
        "swap_total": meminfo.get("SwapTotal", 0),
        "swap_free": meminfo.get("SwapFree", 0),
        "load": [float(load[0]), float(load[1]), float(load[2])],
        "procs_running": int(running),
        "procs_total": int(total),
        "uptime": uptime,
    }


def set_clock_ctypes(seconds):
    import ctypes

    class Timespec(ctypes.Structure):
        _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

    libc = ctypes.CDLL(None, use_errno=True)
    whole = int(seconds)
    if libc.clock_settime(0, ctypes.byref(Timespec(whole, int((seconds - whole) * 1e9)))) != 0:  # CLOCK_REALTIME
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


# linux/random.h: credit entropy to the input pool, and make the CRNG reseed from it now.
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207
MAX_SEED = 512


def reseed_random(seed):
    """Mix ``seed`` into the kernel's pool and reseed its CRNG: a guest restored from a
    snapshot would otherwise give every clone the same "random" bytes."""
    with open("/dev/urandom", "wb") as pool:
        try:
            fcntl.ioctl(pool, RNDADDENTROPY, struct.pack("ii", len(seed) * 8, len(seed)) + seed)
            fcntl.ioctl(pool, RNDRESEEDCRNG)
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.EINVAL, errno.ENOTTY):
                raise
            pool.write(seed)    # not root, or an old kernel: mixed in, not credited


class Agent:
    def __init__(self, processes, clock_setter=None):
        self.processes = processes
        self.clock_setter = clock_setter or self._set_clock
        self.started = time.time()

    def serve_forever(self, listener):
        while True:
            try:
                sock, _ = listener.accept()
            except OSError as error:
                log(f"accept failed: {error}")
                time.sleep(0.1)
                continue
            threading.Thread(target=Connection(self, sock).serve, name="connection", daemon=True).start()

    def _set_clock(self, seconds):
        try:
            set_clock_ctypes(seconds)
            return
        except ImportError:
            pass
        except OSError as error:
            if error.errno == errno.EPERM:
                raise OpError("permission_denied", f"clock_settime: {error.strerror}") from None
        try:
            child = self.processes.spawn(["date", "-u", "-s", f"@{int(seconds)}"], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError as error:
            raise OpError("clock_failed", f"no clock_settime and no date: {error.strerror}") from None
        if not child.wait(5.0):
            child.signal(signal.SIGKILL)
            raise OpError("clock_failed", "date -s did not finish in 5 s")
        if child.exit_info()["exit_code"] != 0:
            raise OpError("clock_failed", "date -s failed")


class Connection:
    """One client connection: HELLO, then one operation after another."""

    def __init__(self, agent, sock):
        self.agent = agent
        self.sock = sock
        self.frames = FrameReader(sock.recv)
        self._send_lock = threading.Lock()
        self.handed_over = False  # a forward op made the connection a raw byte pipe

    def send(self, frame_type, body=b""):
        with self._send_lock:
            try:
                send_frame(self.sock, frame_type, body)
            except OSError as error:
                raise ConnectionLost(str(error)) from None

    def send_json(self, frame_type, obj):
        self.send(frame_type, encode_json(obj))

    def send_error(self, kind, message):
        self.send_json(ERROR, {"error": kind, "message": message})

    def read(self):
        try:
            frame = self.frames.read()
        except OSError as error:
            raise ConnectionLost(str(error)) from None
        if frame is None:
            raise ConnectionLost("closed by the client")
        return frame

    def serve(self):
        try:
            self._handshake()
            while not self.handed_over:
                frame = self.frames.read()
                if frame is None:
                    return
                frame_type, body = frame
                if frame_type != REQUEST:
                    raise ProtocolError(f"expected REQUEST, got {FRAME_NAMES[frame_type]}")
                self._run(decode_json(frame_type, body))
        except ProtocolError as error:
            log(f"protocol error: {error}")
            self._try_send_error("protocol", str(error))
        except (ConnectionLost, OSError):
            pass  # OSError here can only come from the socket: operations wrap their own
        except Exception:  # noqa: BLE001 - a bug in one operation must not end the agent
            log("internal error:\n" + traceback.format_exc())
            self._try_send_error("internal", f"agent error: {sys.exc_info()[1]}")
        finally:
            self.sock.close()

    def _try_send_error(self, kind, message):
        try:
            self.send_error(kind, message)
        except OSError:
            pass

    def _handshake(self):
        frame_type, body = self.read()
        if frame_type != HELLO:
            raise ProtocolError(f"expected HELLO, got {FRAME_NAMES[frame_type]}")
        hello = decode_json(frame_type, body)
        if hello.get("protocol") != PROTOCOL_VERSION:
            self.send_error("version", f"agent speaks protocol {PROTOCOL_VERSION}, "
                                       f"client asked for {hello.get('protocol')!r}")
            raise ConnectionLost("protocol version mismatch")
        self.send_json(HELLO, {
            "protocol": PROTOCOL_VERSION, "agent": AGENT_NAME, "pid": os.getpid(),
            "python": platform.python_version(), "max_frame": MAX_FRAME, "ops": sorted(self._handlers()),
        })

    def _handlers(self):
        return {
            "ping": self._op_ping, "stats": self._op_stats, "set_clock": self._op_set_clock,
            "exec": self._op_exec, "put": self._op_put, "get": self._op_get,
            "forward": self._op_forward, "reseed": self._op_reseed,
        }

    def _run(self, request):
        op = request.get("op")
        handler = self._handlers().get(op)
        try:
            if handler is None:
                raise OpError("bad_request", f"unknown operation {op!r}")
            try:
                handler(request)
            except OSError as error:  # a file system or process call; the socket's are ConnectionLost
                raise OpError(_errno_kind(error), f"{op}: {error}") from None
        except OpError as error:
            self.send_error(error.kind, error.message)

    def _op_ping(self, request):
        self.send_json(REPLY, {"uptime": time.time() - self.agent.started})

    def _op_stats(self, request):
        try:
            self.send_json(REPLY, read_stats())
        except (OSError, ValueError, IndexError) as error:
            raise OpError("io_error", f"cannot read /proc: {error}") from None

    def _op_set_clock(self, request):
        seconds = request.get("time")
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0 < seconds < 2 ** 40:
            raise OpError("bad_request", "'time' must be positive seconds since the epoch")
        self.agent.clock_setter(float(seconds))
        self.send_json(REPLY, {})

    def _op_reseed(self, request):
        try:
            seed = bytes.fromhex(request.get("seed", ""))
        except (TypeError, ValueError):
            seed = b""
        if not 16 <= len(seed) <= MAX_SEED:
            raise OpError("bad_request", f"'seed' must be 16 to {MAX_SEED} bytes, in hex")
        reseed_random(seed)
        self.send_json(REPLY, {})

    def _op_put(self, request):
        writer = TreeWriter(_absolute_path(request))
        try:
            self.send_json(REPLY, {"ready": True})
        except ConnectionLost:
            writer.close()
            raise
        stream = DataStream(self)
        try:
            extract_tar(stream.read, writer)
        except OpError:
            stream.drain()
            raise
        stream.drain()
        self.send_json(REPLY, {})

    def _op_get(self, request):
        source = _absolute_path(request)
        try:
            os.lstat(source)
        except OSError as error:
            raise OpError(_errno_kind(error), f"cannot read {source}: {error.strerror}") from None
        self.send_json(REPLY, {"ready": True})
        pending = bytearray()

        def write(data):
            pending.extend(data)
            while len(pending) >= DATA_CHUNK:
                self.send(DATA, bytes(pending[:DATA_CHUNK]))
                del pending[:DATA_CHUNK]

        try:
            write_tar(source, write)
        except OSError as error:
            # Mid-stream: ERROR instead of END tells the client the archive is incomplete.
            raise OpError(_errno_kind(error), f"cannot read {error.filename or source}: {error.strerror}") from None
        if pending:
            self.send(DATA, bytes(pending))
        self.send(END)

    def _op_exec(self, request):
        Exec(self, request).run()

    def _op_forward(self, request):
        """Connect to 127.0.0.1:port in the guest; after the REPLY the connection carries
        that TCP stream's bytes both ways, unframed, until either side closes."""
        port = _require(request, "port", int)
        if not 0 < port < 65536:
            raise OpError("bad_request", "'port' must be in 1..65535")
        try:
            target = socket.create_connection(("127.0.0.1", port), timeout=FORWARD_CONNECT_SECONDS)
        except OSError as error:
            raise OpError("connection_refused", f"cannot connect to 127.0.0.1:{port} in the guest: "
                                                f"{error.strerror or error}") from None
        target.settimeout(None)
        target.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.handed_over = True
        try:
            self.send_json(REPLY, {})
            leftover = self.frames.take_buffer()  # the client must wait for REPLY, but be exact
            if leftover:
                target.sendall(leftover)
        except (ConnectionLost, OSError):
            target.close()
            raise ConnectionLost("closed during forward setup") from None
        pipe_bytes(self.sock, target)


class DataStream:
    """The DATA frames of a put, read as a byte stream until END."""

    def __init__(self, connection):
        self._connection = connection
        self._chunk = memoryview(b"")
        self._ended = False

    def read(self, size):
        while not self._chunk and not self._ended:
            frame_type, body = self._connection.read()
            if frame_type == END:
                self._ended = True
            elif frame_type == DATA:
                self._chunk = memoryview(body)
            else:
                raise ProtocolError(f"expected DATA or END, got {FRAME_NAMES[frame_type]}")
        data = bytes(self._chunk[:size])
        self._chunk = self._chunk[size:]
        return data

    def drain(self):
        while self.read(DATA_CHUNK):
            pass


class Exec:
    """One exec: the connection's thread reads the client's frames, an output thread
    sends stdout/stderr and then EXIT, a stdin thread feeds the process."""

    def __init__(self, connection, request):
        self.connection = connection
        self.argv = _require(request, "argv", list)
        if not self.argv or not all(isinstance(arg, str) for arg in self.argv):
            raise OpError("bad_request", "'argv' must be a non-empty list of strings")
        env = _require(request, "env", dict, optional=True)
        if env is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise OpError("bad_request", "'env' must map strings to strings")
        self.cwd = _require(request, "cwd", str, optional=True) or "/"
        self.identity = resolve_user(_require(request, "user", str, optional=True))
        pty_size = _require(request, "pty", dict, optional=True)
        self.pty_size = None if pty_size is None else _pty_size(pty_size)
        self.env = self._environment(env)
        self.child = None
        self.stdin = None
        self.exit_sent = False

    def _environment(self, env):
        env = dict(env) if env is not None else {}
        env.setdefault("PATH", DEFAULT_PATH)
        env.setdefault("HOME", self.identity.home if self.identity else "/root")
        if self.pty_size is not None:
            env.setdefault("TERM", "xterm")
        return env

    def run(self):
        parent_fds, child_fds = self._open_stdio()
        try:
            try:
                self.child = self.connection.agent.processes.spawn(
                    self.argv, stdin=child_fds[0], stdout=child_fds[1], stderr=child_fds[2],
                    cwd=self.cwd, env=self.env, start_new_session=True, close_fds=True,
                    preexec_fn=_child_setup(self.identity, self.pty_size is not None)
                    if self.identity or self.pty_size is not None else None)
            finally:
                for fd in set(child_fds):
                    os.close(fd)
        except (OSError, ValueError, subprocess.SubprocessError) as error:
            for fd in set(parent_fds) - {None}:
                os.close(fd)
            raise self._spawn_error(error) from None
        self._serve(parent_fds)

    def _open_stdio(self):
        """(stdin, stdout, stderr) descriptors for the agent and for the child."""
        if self.pty_size is None:
            stdin_r, stdin_w = os.pipe()
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            _grow_pipe(out_w)
            return (stdin_w, out_r, err_r), (stdin_r, out_w, err_w)
        import pty
        master, slave = pty.openpty()
        self._resize(master, self.pty_size)
        return (master, master, None), (slave, slave, slave)

    def _spawn_error(self, error):
        if isinstance(error, ValueError):  # a NUL byte in argv, env or cwd
            return OpError("bad_request", f"cannot start {self.argv[0]!r}: {error}")
        if isinstance(error, OSError) and error.filename == self.cwd and self.cwd != self.argv[0]:
            return OpError("bad_cwd", f"working directory {self.cwd}: {error.strerror}")
        if isinstance(error, FileNotFoundError):
            return OpError("command_not_found", f"{self.argv[0]}: command not found")
        if isinstance(error, PermissionError):
            return OpError("permission_denied", f"{self.argv[0]}: permission denied")
        if isinstance(error, OSError):
            return OpError("exec_failed", f"{self.argv[0]}: {error.strerror}")
        return OpError("exec_failed", f"cannot start {self.argv[0]} as user {self.identity and self.identity.uid}")

    def _serve(self, fds):
        stdin_fd, out_fd, err_fd = fds
        waker = Waker()
        self.child.add_exit_callback(waker.wake)
        self.stdin = StdinFeeder(self.connection, stdin_fd, is_pty=self.pty_size is not None)
        outputs = {out_fd: STDOUT}
        if err_fd is not None:
            outputs[err_fd] = STDERR
        output = threading.Thread(target=self._send_output, args=(outputs, waker.fd), name="exec-output", daemon=True)
        try:
            self.connection.send_json(REPLY, {"pid": self.child.pid, "stdin_window": STDIN_WINDOW})
            output.start()  # after the REPLY: no output may come before it
            self._read_client()
        finally:
            # Client gone or finished: a process still running has nobody to talk to.
            self.child.signal(signal.SIGKILL, group=True)
            self.stdin.close()
            if output.is_alive():
                output.join()
            waker.close()
            for fd in {stdin_fd, out_fd, err_fd} - {None}:
                os.close(fd)

    def _read_client(self):
        while True:
            frame_type, body = self.connection.read()
            if frame_type == STDIN:
                self.stdin.feed(body)
            elif frame_type == STDIN_EOF:
                self.stdin.feed_eof()
            elif frame_type == SIGNAL:
                message = decode_json(frame_type, body)
                signum = message.get("signal")
                if not isinstance(signum, int) or not 0 < signum < 65:
                    raise ProtocolError(f"bad signal number {signum!r}")
                self.child.signal(signum, group=bool(message.get("group")))
            elif frame_type == RESIZE:
                try:
                    size = _pty_size(decode_json(frame_type, body))
                except OpError as error:
                    raise ProtocolError(error.message) from None
                if self.pty_size is not None:
                    self._resize(self.stdin.fd, size)
            elif frame_type == DONE:
                if not self.exit_sent:
                    raise ProtocolError("DONE before EXIT")
                return
            else:
                raise ProtocolError(f"unexpected {FRAME_NAMES[frame_type]} frame during exec")

    def _send_output(self, outputs, wake_r):
        try:
            self._pump(dict(outputs), wake_r)
            while not self.child.wait(HEARTBEAT_SECONDS):
                self.connection.send(HEARTBEAT)
            self.exit_sent = True  # before EXIT: the client's DONE may come back at once
            self.connection.send_json(EXIT, self.child.exit_info())
        except (ConnectionLost, OSError):
            pass  # the connection is gone; the reading thread ends the exec

    def _pump(self, outputs, wake_r):
        drain_deadline = None
        watched = list(outputs) + [wake_r]
        while outputs:
            if drain_deadline is None:
                timeout = HEARTBEAT_SECONDS
            else:
                timeout = drain_deadline - time.monotonic()
                if timeout <= 0:
                    return
            readable, _, _ = select.select(watched, [], [], timeout)
            if not readable and drain_deadline is None:
                self.connection.send(HEARTBEAT)
            for fd in readable:
                if fd == wake_r:
                    os.read(wake_r, 64)
                    watched.remove(wake_r)
                    drain_deadline = time.monotonic() + EXIT_DRAIN_SECONDS
                    continue
                try:
                    data = os.read(fd, DATA_CHUNK)
                except OSError as error:
                    if error.errno != errno.EIO:  # EIO: a pty whose other side closed
                        raise
                    data = b""
                if data:
                    self.connection.send(outputs[fd], data)
                else:
                    del outputs[fd]
                    watched.remove(fd)

    @staticmethod
    def _resize(fd, size):
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", size[0], size[1], 0, 0))


def _pty_size(message):
    rows, cols = message.get("rows", 24), message.get("cols", 80)
    if not all(isinstance(n, int) and not isinstance(n, bool) and 0 < n < 65536 for n in (rows, cols)):
        raise OpError("bad_request", "pty rows and cols must be integers in 1..65535")
    return rows, cols


def _grow_pipe(fd):
    """A bigger stdout pipe: fewer, larger DATA frames for a chatty command."""
    try:
        fcntl.fcntl(fd, 1031, DATA_CHUNK)  # F_SETPIPE_SZ (the fcntl constant is 3.10+)
    except OSError:
        pass  # over /proc/sys/fs/pipe-max-size for an unprivileged agent: keep the default


class Waker:
    """A self-pipe the output thread selects on, written when the process exits; writes
    after close are dropped (the reaper may run late), never sent to a reused descriptor."""

    def __init__(self):
        self.fd, self._write_fd = os.pipe()
        self._lock = threading.Lock()
        self._closed = False

    def wake(self):
        with self._lock:
            if not self._closed:
                os.write(self._write_fd, b"x")

    def close(self):
        with self._lock:
            self._closed = True
            os.close(self.fd)
            os.close(self._write_fd)


class StdinFeeder:
    """Writes STDIN frames to the process from its own thread, so the connection's
    thread always keeps reading (signals get through while the pipe is full); WINDOW
    frames give the client credit back as bytes reach the process."""

    def __init__(self, connection, fd, is_pty):
        self.connection = connection
        self.fd = fd
        self._is_pty = is_pty
        self._cond = threading.Condition()
        self._chunks = deque()
        self._outstanding = 0
        self._eof = False
        self._closed = False
        self._thread = threading.Thread(target=self._write_forever, name="exec-stdin", daemon=True)
        self._thread.start()

    def feed(self, data):
        with self._cond:
            if self._eof:
                raise ProtocolError("STDIN after STDIN_EOF")
            self._outstanding += len(data)
            if self._outstanding > STDIN_WINDOW:
                raise ProtocolError("client sent more stdin than its window")
            self._chunks.append(data)
            self._cond.notify()

    def feed_eof(self):
        with self._cond:
            self._eof = True
            self._cond.notify()

    def close(self):
        with self._cond:
            self._closed = True
            self._chunks.clear()
            self._cond.notify()
        self._thread.join()

    def _write_forever(self):
        broken = False
        while True:
            with self._cond:
                while not self._chunks and not self._eof and not self._closed:
                    self._cond.wait()
                if self._closed or (self._eof and not self._chunks):
                    break
                chunk = self._chunks.popleft()
            if broken:
                continue
            try:
                _write_all(self.fd, chunk)
            except OSError:
                broken = True  # the process closed its stdin or exited; the rest is dropped
                continue
            with self._cond:
                self._outstanding -= len(chunk)
            try:
                self.connection.send_json(WINDOW, {"bytes": len(chunk)})
            except ConnectionLost:
                return
        if self._eof and not broken and not self._closed:
            self._send_eof()

    def _send_eof(self):
        if self._is_pty:
            try:
                os.write(self.fd, b"\x04")  # ^D: the terminal's end of input
            except OSError:
                pass
        else:
            # The process sees EOF now; the descriptor itself is closed with the exec.
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self.fd)
                os.close(devnull)
            except OSError:
                pass


def pipe_bytes(a, b):
    """Copy bytes both ways between two connected stream sockets until both directions
    end; an end of file is passed on as a half close, an error closes both."""

    def copy(source, sink):
        try:
            while True:
                data = source.recv(_RECV_SIZE)
                if not data:
                    break
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    other = threading.Thread(target=copy, args=(b, a), name="forward", daemon=True)
    other.start()
    copy(a, b)
    other.join()
    b.close()


# ---------------------------------------------------------------- main

def log(message):
    sys.stderr.write(f"{AGENT_NAME}: {message}\n")
    sys.stderr.flush()


def vsock_listener(port):
    listener = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    listener.bind((socket.VMADDR_CID_ANY, port))
    listener.listen(64)
    return listener


def unix_listener(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    return listener


def main(argv=None):
    parser = argparse.ArgumentParser(prog=AGENT_NAME, description="sm guest agent")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--port", type=int, default=AGENT_PORT, help="vsock port (default %(default)s)")
    where.add_argument("--unix", metavar="PATH", help="listen on a Unix socket instead (tests)")
    args = parser.parse_args(argv)
    # An inherited SIG_IGN would make the kernel reap children before we see their status.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    listener = unix_listener(args.unix) if args.unix else vsock_listener(args.port)
    subreaper = become_subreaper()
    where = args.unix or f"vsock port {args.port}"
    log(f"listening on {where} (protocol {PROTOCOL_VERSION}, python {platform.python_version()}, "
        f"subreaper {'yes' if subreaper else 'no'})")
    Agent(ProcessTable()).serve_forever(listener)


if __name__ == "__main__":
    main()
