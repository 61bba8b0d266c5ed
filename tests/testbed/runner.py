"""Boot the test bed under QEMU TCG and run one command inside it.

The command's output streams to our stdout as it runs; its exit status becomes
ours. QEMU never outlives the runner (it gets SIGKILL when we die), and every
way of not finishing ends with one ``testbed:`` line and a non-zero status.
"""

from __future__ import annotations

import ctypes
import os
import select
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from vmm.paths import sm_home

from .image import VENV, TestbedImage

# Exit statuses of our own, beside the command's.
EXIT_TIMEOUT = 124
EXIT_TESTBED_FAILED = 125
EXIT_STALLED = 126

READY_MARKER = b"testbed: ready"
PASSED_ENVIRONMENT = ("CI", "PYTEST_ADDOPTS", "TERM")
# The test bed's address on QEMU's user network, where forwarded ports arrive.
GUEST_ADDRESS = "10.0.2.15"
_PR_SET_PDEATHSIG = 1


class TestbedError(Exception):
    """The test bed could not run the command; the message is the one line to show."""

    def __init__(self, message: str, status: int = EXIT_TESTBED_FAILED, died: bool = False):
        super().__init__(message)
        self.status = status
        self.died = died    # the test bed wedged or crashed under a running command


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def host_tsc_khz() -> int:
    """The host's TSC rate: under TCG the guest's TSC runs at it, and telling
    the guest avoids calibrating against the emulated PIT (which can hang)."""
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    raise TestbedError("cannot read the host CPU frequency from /proc/cpuinfo")


def _shares(run_dir: Path, project: Path) -> dict[str, Path]:
    """9p mount tag → host directory shared at the same path inside."""
    home = sm_home()
    home.mkdir(parents=True, exist_ok=True)
    return {"testbed-run": run_dir, "project": project, "smhome": home}


@dataclass(frozen=True)
class Forward:
    """A TCP port of the host's 127.0.0.1 forwarded to a port of the test bed."""

    host_port: int
    guest_port: int

    @classmethod
    def parse(cls, text: str) -> Forward:
        """``HOSTPORT:GUESTPORT``, or one port for both."""
        host, _, guest = text.partition(":")
        try:
            ports = int(host), int(guest or host)
        except ValueError:
            raise ValueError(f"{text!r} is not HOSTPORT:GUESTPORT") from None
        if not all(0 < port < 65536 for port in ports):
            raise ValueError(f"{text!r}: ports are 1 to 65535")
        return cls(*ports)


def _check_free(forwards: tuple[Forward, ...]) -> None:
    """QEMU would only say it could not set up the rule; say which port and why."""
    for forward in forwards:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", forward.host_port))
            except OSError as error:
                raise TestbedError(f"cannot forward 127.0.0.1:{forward.host_port} into the test "
                                   f"bed: {error.strerror}; choose another port") from None


def _network_lines(forwards: tuple[Forward, ...]) -> list[str]:
    """Bring up the one NIC the forwards arrive on (no udev inside: load its driver)."""
    if not forwards:
        return []
    return [
        "modprobe virtio_net || { echo 'testbed: virtio_net did not load: no forwarded ports'; "
        "exit 125; }",
        "nic=$(ls /sys/class/net | grep -vx lo | head -n1)",
        f"ip addr add {GUEST_ADDRESS}/24 dev $nic",
        "ip link set $nic up",
        f"export SM_TESTBED_ADDRESS={GUEST_ADDRESS}",   # where a server inside should listen
    ]


def _job_script(command: list[str], project: Path, shares: dict[str, Path],
                forwards: tuple[Forward, ...]) -> str:
    lines = ["set -e", *_network_lines(forwards)]
    for tag, path in shares.items():
        if tag == "testbed-run":
            continue
        lines.append(f"mkdir -p {shlex.quote(str(path))}")
        lines.append(f"mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 {tag} "
                     f"{shlex.quote(str(path))}")
    site = f"{VENV}/lib/python3*/site-packages"
    lines += [
        f"echo {shlex.quote(str(project))} > $(echo {site})/sm-project.pth",
        f"export VIRTUAL_ENV={VENV} PATH={VENV}/bin:$PATH",
        f"export SM_HOME={shlex.quote(str(shares['smhome']))} SM_IN_TESTBED=1",
        # Snapshots are mapped into guests page by page: keep them off the 9p share.
        "export SM_SNAPSHOTS=/var/tmp/sm-snapshots",
        "export PYTHONUNBUFFERED=1",  # stream Python's output as it comes, not at exit
        "export SM_TESTBED_PROGRESS=/testbed/progress",   # survives a reboot: see run()
    ]
    if not sys.stdout.isatty():
        lines.append("export PY_COLORS=0 NO_COLOR=1")
    for name in PASSED_ENVIRONMENT:
        if name in os.environ:
            lines.append(f"export {name}={shlex.quote(os.environ[name])}")
    lines += [f"cd {shlex.quote(str(project))}", "set +e", shlex.join(command)]
    return "\n".join(lines) + "\n"


def qemu_command(image: TestbedImage, shares: dict[str, Path], console_log: Path,
                 memory_mib: int, forwards: tuple[Forward, ...] = ()) -> list[str]:
    argv = [
        "qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2",
        "-m", str(memory_mib), "-nodefaults", "-no-user-config", "-display", "none",
        # ttyS0 is the guest kernel's console (kept in a file, shown when things go
        # wrong); ttyS1 carries only the command's output to our stdout.
        "-serial", f"file:{console_log}", "-serial", "stdio", "-no-reboot",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd),
        "-append", f"console=ttyS0 quiet loglevel=3 panic=-1 tsc_early_khz={host_tsc_khz()}",
        "-drive", f"if=none,id=root,file={image.root_disk},format=raw,snapshot=on",
        "-device", "virtio-blk-pci,drive=root",
    ]
    for index, (tag, path) in enumerate(shares.items()):
        argv += ["-fsdev", f"local,id=fs{index},path={path},security_model=none",
                 "-device", f"virtio-9p-pci,fsdev=fs{index},mount_tag={tag}"]
    if forwards:
        # restrict=on: the test bed reaches nothing outside; only the forwards come in,
        # and only from the host's loopback.
        rules = "".join(f",hostfwd=tcp:127.0.0.1:{f.host_port}-{GUEST_ADDRESS}:{f.guest_port}"
                        for f in forwards)
        argv += ["-netdev", f"user,id=net0,restrict=on,ipv6=off{rules}",
                 "-device", "virtio-net-pci,netdev=net0"]
    return argv


def _show_console_tail(console_log: Path, lines: int = 40) -> None:
    """The last lines of the test bed's console, after the line that says why it panicked
    when that scrolled out of them (a stack trace follows it)."""
    if console_log.exists():
        text = console_log.read_bytes().replace(b"\r", b"").decode(errors="replace")
        all_lines = text.splitlines(keepends=True)
        tail = all_lines[-lines:]
        panics = [line for line in all_lines[:-lines] if "Kernel panic - not syncing" in line]
        print("".join(panics[-1:] + (["...\n"] if panics else []) + tail), file=sys.stderr, flush=True)


def _stream(qemu: subprocess.Popen, boot_timeout: float, timeout: float, end: float,
            stall_timeout: float) -> None:
    """Copy QEMU's console to stdout until it exits, enforcing the deadlines: ``end`` is
    when the command's ``timeout`` runs out, over every attempt."""
    started = time.monotonic()
    last_output = started
    deadline = min(started + boot_timeout, end)
    booted_at = 0.0
    seen = b""
    out = sys.stdout.buffer
    fd = qemu.stdout.fileno()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if booted_at or deadline == end:
                raise TestbedError(f"the command ran past its timeout of {timeout:.0f} s; "
                                   "stopped the test bed", EXIT_TIMEOUT)
            raise TestbedError(f"the test bed did not boot within {boot_timeout:.0f} s "
                               "(its console is above)")
        if booted_at and time.monotonic() - last_output > stall_timeout:
            raise TestbedError(f"no output for {stall_timeout:.0f} s: the test bed seems wedged",
                               EXIT_STALLED, died=True)
        ready, _, _ = select.select([fd], [], [], min(remaining, stall_timeout))
        if not ready:
            continue
        last_output = time.monotonic()
        chunk = os.read(fd, 65536)
        if not chunk:
            return
        out.write(chunk.replace(b"\r", b""))
        out.flush()
        if not booted_at:
            seen = (seen + chunk)[-4096:]
            if READY_MARKER in seen:
                booted_at = time.monotonic()
                deadline = end
                print(f"testbed: booted in {booted_at - started:.1f} s", file=sys.stderr,
                      flush=True)


def run(image: TestbedImage, command: list[str], memory_mib: int = 4096,
        timeout: float = 3600.0, boot_timeout: float = 300.0, stall_timeout: float = 600.0,
        attempts: int = 3, project: Path | None = None,
        forwards: tuple[Forward, ...] = ()) -> int:
    """Run ``command`` in the test bed and return its exit status.

    A test bed that prints nothing for ``stall_timeout`` seconds is taken as wedged, and one
    that stops before the command finished as crashed (both seen under QEMU's emulator of
    nested SVM); either is booted again, up to ``attempts`` times in all, within the one
    ``timeout``. The command sees the same run directory (``/testbed``) each time, and in
    ``$SM_TESTBED_PROGRESS`` a file there that a resumable command (our pytest suite, through
    tests/progress.py) uses to pick up where the last attempt stopped.

    Each of ``forwards`` makes a port of the test bed reachable at the host's 127.0.0.1
    (a server inside listens on ``GUEST_ADDRESS``, exported as ``$SM_TESTBED_ADDRESS``).
    """
    project = (project or Path.cwd()).resolve()
    forwards = tuple(forwards)
    _check_free(forwards)
    end = time.monotonic() + timeout
    with tempfile.TemporaryDirectory(prefix="testbed-run-") as run_name:
        run_dir = Path(run_name)
        shares = _shares(run_dir, project)
        (run_dir / "job.sh").write_text(_job_script(command, project, shares, forwards))
        for attempt in range(1, attempts + 1):
            try:
                return _boot_and_run(image, run_dir, shares, memory_mib, boot_timeout, timeout,
                                     end, stall_timeout, forwards)
            except TestbedError as error:
                if not error.died or attempt == attempts:
                    raise
                print(f"testbed: {error}; booting it again (attempt {attempt + 1} of {attempts})",
                      file=sys.stderr, flush=True)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _boot_and_run(image: TestbedImage, run_dir: Path, shares: dict[str, Path], memory_mib: int,
                  boot_timeout: float, timeout: float, end: float, stall_timeout: float,
                  forwards: tuple[Forward, ...]) -> int:
    console_log = run_dir / "console.log"
    qemu = subprocess.Popen(qemu_command(image, shares, console_log, memory_mib, forwards),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    try:
        _stream(qemu, boot_timeout, timeout, end, stall_timeout)
    except TestbedError:
        _show_console_tail(console_log)
        raise
    finally:
        if qemu.poll() is None:
            qemu.kill()
        qemu.wait()
    status_file = run_dir / "status"
    if not status_file.exists():
        _show_console_tail(console_log)
        raise TestbedError(f"the test bed stopped before the command finished "
                           f"(QEMU exit status {qemu.returncode}; its console is above)", died=True)
    return int(status_file.read_text().strip() or EXIT_TESTBED_FAILED)
