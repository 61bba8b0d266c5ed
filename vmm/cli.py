"""The ``sm`` command: ``sm doctor``, ``sm boot``, named machines (``sm start``, ``exec``,
``ps``, ``stop``; :mod:`vmm.machines`), their snapshots (``sm snapshot``, ``restore``,
``snapshots``, ``rm-snapshot``; :mod:`vmm.named_snapshots`), and the image commands.

Errors a user can hit end with one ``sm: ...`` line saying what happened and
what to do, and a non-zero status (125 when sm itself could not run the guest,
124 on timeout, as ``docker run`` and ``timeout`` do); never a traceback.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from vmm import hostkvm, machines
from vmm.agent_client import AgentError, CommandNotFound, ExecFailed, ExecStream
from vmm.arch.x86_64.bootparams import BootParamsError
from vmm.arch.x86_64.bzimage import BzImageError
from vmm.cli_support import EXIT_SM_FAILED, CommandFailed, at_least, check_stop, say
from vmm.guest.cmdline import DEFAULT_KERNEL_CMDLINE, init_cmd_arg, parse_exit_status
from vmm.guest.initramfs import InitramfsError, build_initramfs, find_busybox
from vmm.guest.kernel import KernelError, cached_kernel, ensure_kernel
from vmm.images import ImageError
from vmm.images import commands as image_commands
from vmm.images import run as image_run
from vmm.microvm import Disk, MicroVm, MicroVmConfig
from vmm.vcpu import StopKind

# ---- sm doctor ----------------------------------------------------------------------

def doctor(args: argparse.Namespace) -> int:
    checks: list[tuple[bool, str]] = []
    kvm = hostkvm.probe()
    checks.append((kvm.usable, kvm.reason))
    kernel = cached_kernel()
    checks.append((True, f"guest kernel {kernel.version} in {kernel.vmlinuz.parent}") if kernel
                  else (True, "no guest kernel cached yet: the first `sm boot` fetches Debian's "
                              "cloud kernel (about 30 MB)"))
    try:
        checks.append((True, f"static busybox at {find_busybox()}"))
    except InitramfsError as error:
        checks.append((False, str(error)))
    for tool, package in (("mkfs.ext4", "e2fsprogs"), ("mkfs.erofs", "erofs-utils")):
        found = shutil.which(tool)
        checks.append((bool(found), f"{tool} at {found}" if found
                       else f"{tool} missing: apt-get install {package}"))
    for ok, text in checks:
        print(f"{'ok  ' if ok else 'FAIL'}  {text}")
    return 0 if all(ok for ok, _ in checks) else 1


# ---- sm fetch-kernel ----------------------------------------------------------------

def fetch_kernel(args: argparse.Namespace) -> int:
    kernel = ensure_kernel(update=args.update)
    print(f"{kernel.version} {kernel.vmlinuz}")
    return 0


# ---- sm boot --------------------------------------------------------------------------

def _parse_disk(spec: str) -> Disk:
    """``FILE`` (read-only) or ``FILE:rw`` / ``FILE:ro``."""
    path, _, mode = spec.rpartition(":") if spec.endswith((":rw", ":ro")) else (spec, "", "ro")
    disk = Disk(Path(path), read_only=(mode != "rw"))
    if not disk.path.is_file():
        raise CommandFailed(f"disk image {disk.path} does not exist")
    return disk


def _boot_config(args: argparse.Namespace, console) -> MicroVmConfig:
    if refused := hostkvm.refusal():
        raise CommandFailed(refused)
    disks = [_parse_disk(spec) for spec in args.disk]
    kernel = ensure_kernel(args.kernel)
    initrd = Path(args.initrd) if args.initrd else build_initramfs(kernel)
    if not initrd.is_file():
        raise CommandFailed(f"initramfs {initrd} does not exist")
    cmdline = args.cmdline if args.cmdline is not None else DEFAULT_KERNEL_CMDLINE
    if args.init_cmd is not None:
        try:
            cmdline += " " + init_cmd_arg(args.init_cmd)
        except ValueError as error:
            raise CommandFailed(str(error)) from None
    return MicroVmConfig(kernel=kernel.vmlinuz, initrd=initrd, cmdline=cmdline, cpus=args.cpus,
                         memory_mib=args.memory, disks=disks, console=console)


def boot(args: argparse.Namespace) -> int:
    out = sys.stdout.buffer

    def console(data: bytes) -> None:
        out.write(data)
        out.flush()

    started = time.monotonic()
    with MicroVm(_boot_config(args, console)) as vm:
        vm.start()
        if args.init_cmd is None and sys.stdin.isatty():
            vm.forward_console_input(sys.stdin.buffer)
        reason = vm.wait(args.timeout)
        elapsed = time.monotonic() - started
        check_stop(reason, elapsed, args.timeout)
        tail = vm.console_tail
    status = parse_exit_status(tail)
    say(f"guest {'powered off' if reason.kind is StopKind.POWEROFF else 'rebooted'} "
        f"after {elapsed:.2f} s")
    if args.init_cmd is not None and status is None:
        raise CommandFailed("the guest stopped before the command finished (console above)")
    return status or 0


# ---- named machines: sm start, exec, ps, stop ------------------------------------------

EXIT_CANNOT_RUN = 126    # as docker exec: the command exists but could not be started
EXIT_NOT_FOUND = 127
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def start(args: argparse.Namespace) -> int:
    if refused := hostkvm.refusal():
        raise CommandFailed(refused)
    print(machines.start(args.name, args.image, cpus=args.cpus, memory_mib=args.memory,
                         timeout=args.timeout))
    return 0


def _exec_env(entries: list[str], image_env) -> dict[str, str] | None:
    """The image's environment with ``--env NAME=VALUE`` entries over it."""
    env = dict(entry.partition("=")[::2] for entry in image_env)
    for entry in entries:
        name, equals, value = entry.partition("=")
        if not name or not equals:
            raise CommandFailed(f"--env {entry!r} is not NAME=VALUE")
        env[name] = value
    return env or None


def exec_(args: argparse.Namespace) -> int:
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        raise CommandFailed("no command given: `sm exec NAME -- CMD [ARG...]`")
    info, client = machines.agent(args.name)
    with client:
        try:
            stream = client.exec_stream(argv, env=_exec_env(args.env, info.env),
                                        cwd=args.workdir or info.workdir,
                                        user=args.user or info.user or None)
        except CommandNotFound as error:
            raise CommandFailed(str(error), EXIT_NOT_FOUND) from None
        except ExecFailed as error:
            raise CommandFailed(str(error), EXIT_CANNOT_RUN) from None
        with stream:
            if args.interactive or not sys.stdin.isatty():
                threading.Thread(target=_copy_stdin, args=(stream,), daemon=True).start()
            else:
                stream.close_stdin()
            previous = {signum: signal.signal(signum, _forwarder(stream))
                        for signum in FORWARDED_SIGNALS}
            try:
                for chunk in stream:
                    out = sys.stdout.buffer if chunk.stream == "stdout" else sys.stderr.buffer
                    out.write(chunk.data)
                    out.flush()
            finally:
                for signum, handler in previous.items():
                    signal.signal(signum, handler)
            return stream.exit_code


def _copy_stdin(stream: ExecStream) -> None:
    """Our stdin to the command's, no faster than it reads (the agent's credit). Reads
    the descriptor, not sys.stdin: a daemon thread blocked in a buffered reader's lock
    makes the interpreter abort at exit."""
    try:
        while chunk := os.read(sys.stdin.fileno(), 1 << 16):
            stream.write(chunk)
            stream.wait_stdin_sent()
    except (AgentError, OSError, ValueError):
        pass   # the command ended or the connection broke: the output loop says which
    try:
        stream.close_stdin()
    except (AgentError, ValueError):
        pass


def _forwarder(stream: ExecStream):
    """A signal handler passing the signal to the command's process group (from a thread:
    the main thread may be sending a frame when the signal arrives)."""
    def send(signum: int) -> None:
        try:
            stream.send_signal(signum, group=True)
        except AgentError:
            pass

    def handler(signum, frame) -> None:
        threading.Thread(target=send, args=(signum,), daemon=True).start()
    return handler


def _duration(seconds: float) -> str:
    """45s, 3m12s, 2h05m, 1d03h."""
    seconds = int(seconds)
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
    hours = seconds // 3600
    return f"{hours}h{seconds % 3600 // 60:02d}m" if hours < 24 else f"{hours // 24}d{hours % 24:02d}h"


def ps(args: argparse.Namespace) -> int:
    rows = [("NAME", "IMAGE", "CPUS", "MEMORY", "UPTIME", "STATE")]
    for info in machines.list_machines():
        state = "dead: daemon gone, leftovers removed" if info.state == "dead" else info.state
        rows.append((info.name, info.image, str(info.cpus), f"{info.memory_mib} MiB",
                     _duration(info.uptime), state))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return 0


def stop(args: argparse.Namespace) -> int:
    for name in args.names:
        if machines.stop(name):
            print(name)
        else:
            say(f"{name} was not running (its daemon had exited); removed what it left")
    return 0


# ---- snapshots: sm snapshot, restore, snapshots, rm-snapshot ----------------------------
# vmm.named_snapshots loads the snapshot code (and KVM's bindings): only these commands pay.

def snapshot(args: argparse.Namespace) -> int:
    from vmm import named_snapshots
    from vmm.images.commands import human_size

    machines.running(args.machine)   # an unknown machine is the error, not the name
    path = named_snapshots.new_path(args.snapshot, args.machine)
    taken = machines.snapshot(args.machine, path, diff=args.diff)
    parent = taken.get("parent")
    kind = f"diff of {named_snapshots.display_name(Path(parent))}" if parent else "full"
    print(f"{named_snapshots.display_name(path)}  {human_size(taken['disk_bytes'])}  {kind}  "
          f"{taken['seconds']:.2f} s")
    return 0


def balloon(args: argparse.Namespace) -> int:
    from vmm.images.commands import human_size

    machines.running(args.machine)
    state = machines.balloon(args.machine, args.target)
    if state["note"]:
        say(state["note"])
    print(f"balloon {state['actual_mib']} MiB (target {state['target_mib']} MiB) "
          f"of {state['memory_mib']} MiB guest RAM")
    for name, value in (state["stats"] or {}).items():
        if value is not None:
            shown = human_size(value) if name in BALLOON_BYTE_FIELDS else str(value)
            print(f"  {name.replace('_', ' ')}: {shown}")
    return 0


BALLOON_BYTE_FIELDS = {"free", "available", "total", "caches", "swap_in", "swap_out"}


def restore(args: argparse.Namespace) -> int:
    from vmm import named_snapshots
    from vmm.snapshot import snapshot as snapshots

    path = named_snapshots.resolve(args.snapshot)
    saved = snapshots.info(path)   # a damaged or foreign snapshot: one line, no daemon
    if refused := hostkvm.refusal():
        raise CommandFailed(refused)
    print(machines.start(args.name, named_snapshots.image_label(saved.meta), cpus=saved.cpus,
                         memory_mib=saved.memory_mib, timeout=args.timeout, snapshot=path))
    return 0


def list_snapshots(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from vmm import named_snapshots
    from vmm.images.commands import human_age, human_size

    listed = named_snapshots.list_snapshots()
    rows = [("NAME", "TYPE", "IMAGE", "PARENT", "SIZE", "CREATED")]
    for entry in listed:
        rows.append((entry.name, entry.kind, entry.image or "-", entry.parent or "-",
                     human_size(entry.disk_bytes),
                     human_age(datetime.fromtimestamp(entry.created, UTC).isoformat())))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    for row in rows:
        print("   ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "   " + row[-1])
    for entry in listed:
        if entry.problem:
            say(f"snapshot {entry.name!r} cannot be restored: {entry.problem}")
    return 0


def rm_snapshot(args: argparse.Namespace) -> int:
    from vmm import named_snapshots

    for path in named_snapshots.remove(args.snapshots, force=args.force):
        print(named_snapshots.display_name(path))
    return 0


def _add_snapshot_commands(commands) -> None:
    snapshot_cmd = commands.add_parser(
        "snapshot", help="snapshot a running machine",
        description="Save the whole running machine MACHINE (processes, memory, devices) as "
                    "SNAPSHOT, a name in the snapshot directory or a path with a '/' "
                    "(default: MACHINE-YYYYmmdd-HHMMSS); the machine keeps running. Prints its "
                    "name, size on disk, kind and the time it took.")
    snapshot_cmd.add_argument("--diff", action="store_true",
                              help="only the memory written since the machine's last snapshot "
                                   "(taken, or restored from), which must stay")
    snapshot_cmd.add_argument("machine", metavar="MACHINE")
    snapshot_cmd.add_argument("snapshot", nargs="?", metavar="SNAPSHOT")
    snapshot_cmd.set_defaults(handler=snapshot)
    restore_cmd = commands.add_parser(
        "restore", help="start a named machine from a snapshot",
        description="Start a new named machine, as `sm start` does, from SNAPSHOT (a name from "
                    "`sm snapshots` or a path): every process and file in memory is as it was "
                    "when the snapshot was taken. Prints the machine's name.")
    restore_cmd.add_argument("--name", help="the machine's name (default: a generated one)")
    restore_cmd.add_argument("--timeout", type=float, default=machines.START_TIMEOUT, metavar="S",
                             help="give up if the agent has not answered after S seconds")
    restore_cmd.add_argument("snapshot", metavar="SNAPSHOT")
    restore_cmd.set_defaults(handler=restore)
    commands.add_parser("snapshots", help="list the snapshots").set_defaults(handler=list_snapshots)
    balloon_cmd = commands.add_parser(
        "balloon", help="show or set a running machine's memory balloon",
        description="Show the balloon of machine MACHINE and the guest's memory figures; with "
                    "--target, first inflate or deflate it to N MiB (guest memory handed back "
                    "to the host; clamped to the guest's RAM).")
    balloon_cmd.add_argument("machine", metavar="MACHINE")
    balloon_cmd.add_argument("--target", type=at_least(0), metavar="MiB")
    balloon_cmd.set_defaults(handler=balloon)
    rm_cmd = commands.add_parser(
        "rm-snapshot", help="remove snapshots",
        description="Remove each SNAPSHOT, or none of them if one is unknown or is the parent "
                    "of a diff snapshot that stays (unless --force).")
    rm_cmd.add_argument("--force", "-f", action="store_true",
                        help="remove it even if a diff snapshot needs it (that one becomes "
                             "unusable)")
    rm_cmd.add_argument("snapshots", nargs="+", metavar="SNAPSHOT")
    rm_cmd.set_defaults(handler=rm_snapshot)


def _add_machine_commands(commands) -> None:
    start_cmd = commands.add_parser(
        "start", help="start a named machine in the background",
        description="Boot IMAGE (default: the built-in default image) in a machine that keeps "
                    "running in the background, as `docker run -d`; print its name once its "
                    "agent answers. Use it with `sm exec`, `sm ps`, `sm stop`.")
    start_cmd.add_argument("--name", help="the machine's name (default: a generated one)")
    start_cmd.add_argument("--cpus", type=at_least(1), default=1)
    start_cmd.add_argument("--memory", type=at_least(64), default=512, metavar="MiB")
    start_cmd.add_argument("--timeout", type=float, default=machines.START_TIMEOUT, metavar="S",
                           help="give up if the agent has not answered after S seconds")
    start_cmd.add_argument("image", nargs="?", metavar="IMAGE")
    start_cmd.set_defaults(handler=start)
    exec_cmd = commands.add_parser(
        "exec", help="run a command in a running machine",
        description="Run CMD in machine NAME, as `docker exec`: its output streams here, our "
                    "stdin goes to it when it is not a terminal (or with -i), signals we get "
                    "are passed on, and we exit with its status (128+N if signal N killed it).")
    exec_cmd.add_argument("-i", "--interactive", action="store_true",
                          help="pass stdin on even when it is a terminal")
    exec_cmd.add_argument("-e", "--env", action="append", default=[], metavar="NAME=VALUE",
                          help="set an environment variable; repeatable")
    exec_cmd.add_argument("-w", "--workdir", "--cwd", metavar="DIR",
                          help="working directory (default: the image's)")
    exec_cmd.add_argument("-u", "--user", help="USER[:GROUP] or UID[:GID] (default: the image's)")
    exec_cmd.add_argument("name", metavar="NAME")
    exec_cmd.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD")
    exec_cmd.set_defaults(handler=exec_)
    commands.add_parser("ps", help="list the running machines").set_defaults(handler=ps)
    stop_cmd = commands.add_parser("stop", help="power named machines off and remove them")
    stop_cmd.add_argument("names", nargs="+", metavar="NAME")
    stop_cmd.set_defaults(handler=stop)


# ---- entry point ----------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sm", description="microVMs for notebooks")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("doctor", help="check that this host can run sm guests").set_defaults(
        handler=doctor)
    fetch = commands.add_parser("fetch-kernel", help="fetch and verify the guest kernel now "
                                "(otherwise the first boot does)")
    fetch.add_argument("--update", action="store_true", help="look for a newer one")
    fetch.set_defaults(handler=fetch_kernel)
    boot_cmd = commands.add_parser("boot", help="boot a guest on the console",
                                   description="Boot the guest kernel with sm's initramfs; with "
                                   "--init-cmd run that shell command in it, print its output and "
                                   "exit with its status when the guest powers off.")
    boot_cmd.add_argument("--cpus", type=at_least(1), default=1)
    boot_cmd.add_argument("--memory", type=at_least(64), default=512, metavar="MiB")
    boot_cmd.add_argument("--disk", action="append", default=[], metavar="FILE[:rw]",
                          help="a virtio-blk disk (read-only unless :rw); repeatable")
    boot_cmd.add_argument("--kernel", help="a bzImage (default: Debian's cloud kernel, fetched "
                                           "and cached)")
    boot_cmd.add_argument("--initrd", help="an initramfs (default: sm's, built and cached)")
    boot_cmd.add_argument("--cmdline", help=f"kernel command line (default: {DEFAULT_KERNEL_CMDLINE!r})")
    boot_cmd.add_argument("--init-cmd", metavar="'SHELL CMD'",
                          help="run this in the initramfs shell, then power off")
    boot_cmd.add_argument("--timeout", type=float, default=None, metavar="S",
                          help="stop the guest if it has not powered off after S seconds")
    boot_cmd.set_defaults(handler=boot)
    _add_machine_commands(commands)
    _add_snapshot_commands(commands)
    image_commands.add_subcommands(commands)
    image_run.add_subcommands(commands)
    return parser


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors whose message is the one line a user needs (imported late: the Debian
    fetcher is only loaded when a kernel is fetched)."""
    from vmm.guest.cmdline import RunSpecError
    from vmm.guest.debian import DebianError
    from vmm.named_snapshots import SnapshotsError
    from vmm.snapshot.errors import SnapshotError

    return (OSError, BzImageError, BootParamsError, DebianError, KernelError, InitramfsError,
            ImageError, RunSpecError, machines.MachinesError, AgentError, SnapshotsError,
            SnapshotError)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.handler(args)
    except CommandFailed as error:
        say(str(error))
        return error.status
    except Exception as error:
        if not isinstance(error, _user_errors()):
            raise
        say(str(error))
        return EXIT_SM_FAILED
    except KeyboardInterrupt:
        say("interrupted; the guest was stopped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
