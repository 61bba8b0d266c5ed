"""Named machines on this host: ``sm start``, ``sm exec``, ``sm ps``, ``sm stop``.

Each named machine is a detached daemon process (this module run as
``python -m vmm.machines``) that owns one :class:`~vmm.machine.Machine` for its
life, as ``docker run -d`` leaves a container running. Its state lives in
``$SM_HOME/machines/NAME/``:

* ``lock``: held (flock) by the daemon while it lives, so a dead daemon is seen
  even after its pid was reused, and ``sm start`` claims a name atomically;
* ``machine.json``: name, image, cpus, memory, pid, start time, state, and the
  path of the vsock device's Unix socket;
* ``vsock.sock``: a symlink to that Unix socket (Firecracker's ``CONNECT <port>``
  protocol, docs/vsock.md). The socket itself is in a runtime directory on a
  local file system (``$XDG_RUNTIME_DIR/sm`` or ``/tmp/sm-UID``): Unix sockets
  do not work on network file systems, and their paths are limited to 107 bytes;
* ``control.sock``: a symlink to the daemon's control socket, beside the vsock one:
  one JSON request per connection, one JSON line back (:func:`control`);
* ``console.log`` (the guest's console) and ``daemon.log`` (the daemon's own errors).

Other processes reach the agent through the vsock socket (:func:`agent`) and ask the
daemon for what only the owner of the Machine can do (a snapshot) through the control
socket; stopping sends the daemon SIGTERM, and it powers the machine off and removes
its directory.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from vmm.agent_client import AgentClient
from vmm.paths import sm_home
from vmm.snapshot.errors import SnapshotError

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
START_TIMEOUT = 300.0      # s for the guest's agent to answer, as Machine.boot
STOP_TIMEOUT = 30.0        # s for a daemon to power off after SIGTERM, before SIGKILL
STATE_FILE = "machine.json"
LOCK_FILE = "lock"
SOCKET_LINK = "vsock.sock"
CONTROL_LINK = "control.sock"
CONSOLE_LOG = "console.log"
DAEMON_LOG = "daemon.log"
UNIX_PATH_MAX = 107        # sun_path holds 108 bytes with the terminating NUL
CONTROL_TIMEOUT = 1800.0   # s a control request may take: a snapshot writes all of guest RAM
REQUEST_TIMEOUT = 10.0     # s the daemon waits for a request, or to send its reply
REQUEST_LIMIT = 1 << 16    # bytes of one request or reply line


class MachinesError(Exception):
    """A named-machine operation failed; the message is the one line for the user."""


class UnknownMachine(MachinesError):
    """No machine has that name."""


class MachineNotRunning(MachinesError):
    """The machine's daemon is gone (or still starting): nothing answers for it."""


class ControlFailed(MachinesError):
    """The daemon could not do what it was asked (its reason is the message)."""


@dataclass(frozen=True)
class MachineInfo:
    name: str
    image: str
    cpus: int
    memory_mib: int
    pid: int
    started: float        # time.time() when the daemon started
    state: str            # "starting", "running", or "dead" (daemon gone; leftovers removed)
    vsock_uds: str        # the real path of the vsock device's Unix socket
    # What `sm exec` runs commands with unless told otherwise, from the image's config
    # (as docker exec does): NAME=VALUE entries, working directory, user ("" is root).
    env: tuple[str, ...] = ()
    workdir: str = "/"
    user: str = ""
    control_uds: str = ""  # the daemon's control socket
    snapshot: str = ""     # the snapshot it was restored from (`sm restore`), else ""

    @property
    def uptime(self) -> float:
        return max(0.0, time.time() - self.started)


def machines_dir() -> Path:
    return sm_home() / "machines"


def runtime_dir() -> Path:
    """A private directory on a local file system for the machines' Unix sockets."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = Path(base) / "sm" if base else Path("/tmp") / f"sm-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    info = path.lstat()
    if not path.is_dir() or path.is_symlink() or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise MachinesError(f"{path} is not a private directory of this user: remove it and retry")
    return path


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise MachinesError(f"bad machine name {name!r}: use 1-63 letters, digits, '_', '.' or "
                            "'-', starting with a letter or digit")
    return name


# ---- the registry: reading and cleaning machine directories -----------------------------

def _daemon_alive(directory: Path) -> bool:
    """Whether a daemon holds the directory's lock (a missing lock file: being removed)."""
    try:
        fd = os.open(directory / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _read_info(directory: Path) -> MachineInfo | None:
    try:
        data = json.loads((directory / STATE_FILE).read_text())
        return MachineInfo(**data)
    except (OSError, ValueError, TypeError):
        return None


def _remove(directory: Path, info: MachineInfo | None) -> None:
    for socket_path in (info.vsock_uds, info.control_uds) if info is not None else ():
        try:
            os.unlink(socket_path)
        except OSError:
            pass
    shutil.rmtree(directory, ignore_errors=True)


def _lookup(name: str) -> tuple[Path, MachineInfo | None, bool]:
    """The machine's directory, its recorded state, and whether its daemon lives."""
    directory = machines_dir() / check_name(name)
    if not directory.is_dir():
        raise UnknownMachine(f"no machine named {name!r} (see `sm ps`)")
    return directory, _read_info(directory), _daemon_alive(directory)


def list_machines() -> list[MachineInfo]:
    """Every machine of this host, by name. Those whose daemon died are removed and
    listed once more with state "dead"."""
    machines = []
    root = machines_dir()
    for directory in sorted(root.iterdir()) if root.is_dir() else []:
        if not NAME_PATTERN.fullmatch(directory.name) or not directory.is_dir():
            continue   # a name being claimed (.new-*), or not ours
        info = _read_info(directory)
        if _daemon_alive(directory):
            if info is not None:
                machines.append(info)
            continue
        _remove(directory, info)
        if info is not None:
            machines.append(_with_state(info, "dead"))
    return machines


def _with_state(info: MachineInfo, state: str) -> MachineInfo:
    return MachineInfo(**{**asdict(info), "state": state})


def running(name: str) -> MachineInfo:
    """The named machine, if it is up (UnknownMachine or MachineNotRunning otherwise)."""
    directory, info, alive = _lookup(name)
    if not alive:
        raise MachineNotRunning(f"machine {name!r} is not running (its daemon exited; "
                                "`sm ps` removes what it left)")
    if info is None or info.state != "running":
        raise MachineNotRunning(f"machine {name!r} is still starting; retry in a moment")
    return info


def agent(name: str, io_timeout: float | None = None) -> tuple[MachineInfo, AgentClient]:
    """The named machine and a client of its agent (through its vsock Unix socket)."""
    info = running(name)
    options = {} if io_timeout is None else {"io_timeout": io_timeout}
    return info, AgentClient.over_vsock_uds(info.vsock_uds, **options)


def control(name: str, request: dict, timeout: float = CONTROL_TIMEOUT) -> dict:
    """Send one request to the machine's daemon; its reply (ControlFailed with the
    daemon's reason if it could not do it). The protocol is :class:`_ControlServer`'s."""
    info = running(name)
    if not info.control_uds:
        raise MachinesError(f"machine {name!r} was started by an older sm and has no control "
                            "socket: `sm stop` and start it again")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(info.control_uds)
            sock.sendall(json.dumps(request).encode() + b"\n")
            line = sock.makefile("rb").readline(REQUEST_LIMIT)
        except TimeoutError:
            raise MachinesError(f"the daemon of machine {name!r} did not answer within "
                                f"{timeout:g} s") from None
        except OSError as error:
            raise MachineNotRunning(f"cannot reach the daemon of machine {name!r}: "
                                    f"{error.strerror or error}") from None
    try:
        reply = json.loads(line)
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise MachinesError(f"the daemon of machine {name!r} closed the connection without an "
                            f"answer (see {machines_dir() / name / DAEMON_LOG})")
    if reply.get("ok") is not True:
        raise ControlFailed(str(reply.get("error") or "the daemon gave no reason"))
    return reply


def balloon(name: str, target_mib: int | None = None) -> dict:
    """Set the machine's balloon target (when given) and read it back with guest memory
    figures: ``target_mib``, ``actual_mib``, ``memory_mib``, ``note``, ``stats``."""
    return control(name, {"op": "balloon", "target_mib": target_mib})


def snapshot(name: str, path: Path, diff: bool = False) -> dict:
    """Snapshot the running machine into directory ``path`` (absolute); it keeps running.
    The reply: ``path``, ``parent`` (a diff's, else None), ``disk_bytes``, ``seconds``."""
    return control(name, {"op": "snapshot", "path": str(path), "diff": diff})


def stop(name: str, timeout: float = STOP_TIMEOUT) -> bool:
    """Power the machine off and remove its directory. False if its daemon was already
    dead (its leftovers are removed all the same)."""
    directory, info, alive = _lookup(name)
    if not alive:
        _remove(directory, info)
        return False
    if info is None or info.pid <= 0:
        raise MachineNotRunning(f"machine {name!r} is still starting; retry in a moment")
    _signal(info.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _daemon_alive(directory) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _daemon_alive(directory):
        _signal(info.pid, signal.SIGKILL)
        while _daemon_alive(directory):
            time.sleep(0.05)
    _remove(directory, info)
    return True


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


# ---- starting: claim the name, spawn the daemon, wait for its word ------------------------

def start(name: str | None, image: str | None, cpus: int = 1, memory_mib: int = 512,
          timeout: float = START_TIMEOUT, snapshot: Path | None = None) -> str:
    """Start a named machine in a detached daemon; returns its name once the agent answers.
    With ``snapshot``, the daemon restores that snapshot instead of booting ``image``
    (which only names the image then, as do ``cpus`` and ``memory_mib`` its size)."""
    root = machines_dir()
    root.mkdir(parents=True, exist_ok=True)
    if name is None:
        name = "vm-" + secrets.token_hex(3)
    check_name(name)
    socket_path = runtime_dir() / f"{name}.sock"
    control_path = runtime_dir() / f"{name}.ctl"
    if len(os.fsencode(socket_path)) > UNIX_PATH_MAX:
        raise MachinesError(f"the socket path {socket_path} is longer than {UNIX_PATH_MAX} bytes: "
                            "set XDG_RUNTIME_DIR to a shorter directory")
    directory, lock_fd = _claim(root, name)
    try:
        for path in (socket_path, control_path):
            if path.exists() or path.is_symlink():
                path.unlink()   # left by a daemon that was killed: the name is ours
        (directory / SOCKET_LINK).symlink_to(socket_path)
        (directory / CONTROL_LINK).symlink_to(control_path)
        info = MachineInfo(name, image or "default", cpus, memory_mib, 0, time.time(),
                           "starting", str(socket_path), control_uds=str(control_path),
                           snapshot=str(snapshot) if snapshot is not None else "")
        _write_info(directory, info)   # the daemon writes its pid in it first thing
        _spawn_and_wait(directory, info, lock_fd, timeout)
    except BaseException:
        _remove(directory, _read_info(directory))
        raise
    finally:
        os.close(lock_fd)
    return name


def _claim(root: Path, name: str) -> tuple[Path, int]:
    """Create ``root/name`` with its lock held, atomically; refuse a name in use."""
    directory = root / name
    if directory.is_dir() and not _daemon_alive(directory):
        _remove(directory, _read_info(directory))   # leftovers of a dead daemon
    staging = root / f".new-{name}-{secrets.token_hex(4)}"
    staging.mkdir()
    lock_fd = os.open(staging / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    try:
        os.rename(staging, directory)   # fails on a non-empty directory: someone else's machine
    except OSError as error:
        os.close(lock_fd)
        shutil.rmtree(staging, ignore_errors=True)
        if error.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise MachinesError(f"a machine named {name!r} already exists: choose another "
                                "--name, or `sm stop` it first") from None
        raise
    return directory, lock_fd


def _spawn_and_wait(directory: Path, info: MachineInfo, lock_fd: int, timeout: float) -> None:
    """Start the daemon with the lock and a status pipe; wait for ``ok`` or its reason."""
    status_read, status_write = os.pipe()
    try:
        with open(directory / DAEMON_LOG, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "vmm.machines", str(directory), json.dumps(asdict(info)),
                 str(status_write), str(lock_fd), str(timeout)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                pass_fds=(status_write, lock_fd))
        os.close(status_write)
        status_write = -1
        try:
            with os.fdopen(status_read, "rb") as status:
                status_read = -1
                word = status.readline().decode("utf-8", "replace").strip()
        except BaseException:   # ^C while booting: the daemon stops the guest and cleans up
            process.terminate()
            process.wait()
            raise
    finally:
        for fd in (status_read, status_write):
            if fd >= 0:
                os.close(fd)
    if word == "ok":
        return
    process.wait()
    if word.startswith("error "):
        raise MachinesError(word[len("error "):])
    tail = (directory / DAEMON_LOG).read_text(errors="replace").strip().splitlines()[-1:]
    raise MachinesError(f"the machine's daemon exited with status {process.returncode} before "
                        f"its guest answered ({tail[0] if tail else 'no message'})")


# ---- the daemon ----------------------------------------------------------------------------

class _Stop(Exception):
    """SIGTERM (or SIGINT, SIGHUP) arrived while the guest was booting."""


def _daemon(directory: Path, info: MachineInfo, status_fd: int, timeout: float) -> int:
    from vmm.images.run import image_run_spec  # the VMM loads only in the daemon
    from vmm.machine import Machine, MachineError

    stopping = threading.Event()
    booting = True

    def on_signal(signum, frame) -> None:
        stopping.set()
        if booting:
            raise _Stop

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    status = os.fdopen(status_fd, "w")
    console = open(directory / CONSOLE_LOG, "ab", buffering=0)
    info = MachineInfo(**{**asdict(info), "pid": os.getpid()})
    _write_info(directory, info)
    try:
        try:
            if info.snapshot:
                machine = Machine.restore(info.snapshot, console=console.write,
                                          vsock_uds=info.vsock_uds, timeout=timeout)
            else:
                machine = Machine.boot(info.image if info.image != "default" else None,
                                       cpus=info.cpus, memory_mib=info.memory_mib, timeout=timeout,
                                       console=console.write, vsock_uds=info.vsock_uds)
        except (MachineError, SnapshotError) as error:
            status.write(f"error {_first_line(error)}\n")
            return 1
        except Exception as error:   # a missing image, kernel, tool: still one line
            status.write(f"error {_first_line(error)}\n")
            raise
        control = None
        try:
            booting = False
            if stopping.is_set():
                return 0
            control = _ControlServer(Path(info.control_uds), machine)
            spec = image_run_spec(machine.image.config, ["true"])
            info = MachineInfo(**{**asdict(info), "state": "running", "env": tuple(spec.env),
                                  "workdir": spec.workdir, "user": spec.user})
            _write_info(directory, info)
            status.write("ok\n")
            status.close()
            # Until `sm stop` (SIGTERM) or the guest powers off by itself.
            while not stopping.is_set() and machine.wait(0.5) is None:
                pass
        finally:
            if control is not None:
                control.close()   # waits for a snapshot being taken
            machine.stop()
        return 0
    except _Stop:
        return 0
    finally:
        if not status.closed:
            status.close()
        console.close()
        _remove(directory, info)


class _ControlServer:
    """The daemon's control socket. A client connects, sends one JSON object on one line,
    and reads one JSON line back; requests are served one at a time, in a thread.

    ``{"op": "snapshot", "path": ABSOLUTE_DIR, "diff": BOOL}`` → ``{"ok": true, "path",
    "parent" (a diff's, else null), "disk_bytes", "seconds"}``;
    ``{"op": "balloon", "target_mib": N or null}`` → ``{"ok": true, "target_mib",
    "actual_mib", "memory_mib", "note", "stats": {...} or null}`` (sets the target first,
    when one is given); any failure → ``{"ok": false, "error": ONE_LINE}``.
    """

    def __init__(self, path: Path, machine):
        self._machine = machine
        self._path = path
        self._busy = threading.Lock()   # one request at a time; close() waits for it
        self._closed = False
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))   # in the private runtime directory
        self._server.listen(4)
        threading.Thread(target=self._serve, name="control", daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._server.accept()
            except OSError:
                return   # closed
            with connection:
                connection.settimeout(REQUEST_TIMEOUT)
                try:
                    line = connection.makefile("rb").readline(REQUEST_LIMIT)
                    reply = self._answer(line)
                    connection.sendall(json.dumps(reply).encode() + b"\n")
                except OSError:
                    pass   # the client went away: nothing to tell it

    def _answer(self, line: bytes) -> dict:
        try:
            request = json.loads(line)
        except ValueError:
            request = None
        if isinstance(request, dict) and request.get("op") == "balloon":
            return self._balloon(request.get("target_mib"))
        if not isinstance(request, dict) or request.get("op") != "snapshot":
            return _refusal("the daemon understands one JSON request per line: "
                            '{"op": "snapshot", "path": ..., "diff": ...} or '
                            '{"op": "balloon", "target_mib": ...}')
        path, diff = request.get("path"), request.get("diff", False)
        if not isinstance(path, str) or not os.path.isabs(path) or not isinstance(diff, bool):
            return _refusal("a snapshot request needs an absolute path and a boolean diff")
        with self._busy:
            if self._closed:
                return _refusal("the machine is stopping")
            started = time.monotonic()
            try:
                saved = self._machine.snapshot(path, diff=diff)
            except Exception as error:
                # Loaded already: the daemon runs a Machine.
                from vmm.machine import MachineError

                if not isinstance(error, (SnapshotError, MachineError, OSError)):
                    traceback.print_exc()   # into daemon.log: a bug, not the user's doing
                return _refusal(_first_line(error))
            return {"ok": True, "path": str(saved.path),
                    "parent": str(saved.parent) if saved.parent is not None else None,
                    "disk_bytes": saved.disk_bytes, "seconds": time.monotonic() - started}

    def _balloon(self, target_mib) -> dict:
        from vmm.balloon import BalloonError

        if target_mib is not None and (isinstance(target_mib, bool) or not isinstance(target_mib, int)):
            return _refusal("a balloon target is a whole number of MiB")
        balloon = self._machine.balloon
        note = ""
        if target_mib is not None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                balloon.target_mib = target_mib
            note = "; ".join(str(w.message) for w in caught)
        try:
            stats = asdict(balloon.stats())
        except BalloonError as error:
            stats, note = None, note or _first_line(error)
        return {"ok": True, "target_mib": balloon.target_mib, "actual_mib": balloon.actual_mib,
                "memory_mib": balloon.memory_mib, "note": note, "stats": stats}

    def close(self) -> None:
        with self._busy:
            self._closed = True
        try:
            self._server.shutdown(socket.SHUT_RDWR)   # wakes the accept()
        except OSError:
            pass
        self._server.close()
        try:
            self._path.unlink()
        except OSError:
            pass


def _refusal(reason: str) -> dict:
    return {"ok": False, "error": reason}


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return lines[0]


def _write_info(directory: Path, info: MachineInfo) -> None:
    staging = directory / f".{STATE_FILE}.new"
    staging.write_text(json.dumps(asdict(info)))
    os.replace(staging, directory / STATE_FILE)


def _daemon_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmm.machines",
                                     description="the daemon of one named machine (sm start runs it)")
    parser.add_argument("directory", type=Path)
    parser.add_argument("info", type=lambda text: MachineInfo(**json.loads(text)))
    parser.add_argument("status_fd", type=int)
    parser.add_argument("lock_fd", type=int)   # held for our whole life; never closed
    parser.add_argument("timeout", type=float)
    args = parser.parse_args(argv)
    return _daemon(args.directory, args.info, args.status_fd, args.timeout)


if __name__ == "__main__":
    sys.exit(_daemon_main(sys.argv[1:]))
