"""The ``sm`` command: ``sm doctor``, ``sm boot`` and the image commands.

Errors a user can hit end with one ``sm: ...`` line saying what happened and
what to do, and a non-zero status (125 when sm itself could not run the guest,
124 on timeout, as ``docker run`` and ``timeout`` do); never a traceback.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from pathlib import Path

from vmm import hostkvm
from vmm.arch.x86_64.bootparams import BootParamsError
from vmm.arch.x86_64.bzimage import BzImageError
from vmm.guest.cmdline import init_cmd_arg, parse_exit_status
from vmm.guest.initramfs import InitramfsError, build_initramfs, find_busybox
from vmm.guest.kernel import KernelError, cached_kernel, ensure_kernel
from vmm.images import ImageError
from vmm.images import commands as image_commands
from vmm.microvm import Disk, MicroVm, MicroVmConfig
from vmm.vcpu import StopKind

EXIT_SM_FAILED = 125
EXIT_TIMEOUT = 124
DEFAULT_CMDLINE = "console=ttyS0 reboot=k panic=-1 pci=off quiet"


class CliError(Exception):
    """One line for the user; ``status`` is the exit status."""

    def __init__(self, message: str, status: int = EXIT_SM_FAILED):
        super().__init__(message)
        self.status = status


def _say(message: str) -> None:
    print(f"sm: {message}", file=sys.stderr, flush=True)


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


# ---- sm boot --------------------------------------------------------------------------

def _parse_disk(spec: str) -> Disk:
    """``FILE`` (read-only) or ``FILE:rw`` / ``FILE:ro``."""
    path, _, mode = spec.rpartition(":") if spec.endswith((":rw", ":ro")) else (spec, "", "ro")
    disk = Disk(Path(path), read_only=(mode != "rw"))
    if not disk.path.is_file():
        raise CliError(f"disk image {disk.path} does not exist")
    return disk


def _boot_config(args: argparse.Namespace, console) -> MicroVmConfig:
    kvm = hostkvm.probe()
    if not kvm.usable:
        raise CliError(f"cannot run a guest here: {kvm.reason} (see `sm doctor`)")
    disks = [_parse_disk(spec) for spec in args.disk]
    kernel = ensure_kernel(args.kernel)
    initrd = Path(args.initrd) if args.initrd else build_initramfs(kernel)
    if not initrd.is_file():
        raise CliError(f"initramfs {initrd} does not exist")
    cmdline = args.cmdline if args.cmdline is not None else DEFAULT_CMDLINE
    if args.init_cmd is not None:
        try:
            cmdline += " " + init_cmd_arg(args.init_cmd)
        except ValueError as error:
            raise CliError(str(error)) from None
    return MicroVmConfig(kernel=kernel.vmlinuz, initrd=initrd, cmdline=cmdline, cpus=args.cpus,
                         memory_mib=args.memory, disks=disks, console=console)


def _forward_stdin(vm: MicroVm) -> None:
    def pump() -> None:
        while chunk := sys.stdin.buffer.read1(4096):
            vm.serial.enqueue_input(chunk)
    threading.Thread(target=pump, name="console-input", daemon=True).start()


def boot(args: argparse.Namespace) -> int:
    out = sys.stdout.buffer

    def console(data: bytes) -> None:
        out.write(data)
        out.flush()

    started = time.monotonic()
    with MicroVm(_boot_config(args, console)) as vm:
        vm.start()
        if args.init_cmd is None and sys.stdin.isatty():
            _forward_stdin(vm)
        reason = vm.wait(args.timeout)
        elapsed = time.monotonic() - started
        if reason is None:
            raise CliError(f"the guest did not power off within {args.timeout:g} s; stopped it",
                           EXIT_TIMEOUT)
        tail = vm.console_tail
    if reason.kind is StopKind.CRASH:
        raise CliError(f"the guest kernel panicked after {elapsed:.2f} s: {reason.detail}")
    if reason.kind not in (StopKind.POWEROFF, StopKind.REBOOT):
        raise CliError(f"the guest stopped: {reason.kind.value} on vCPU {reason.vcpu} "
                       f"({reason.detail}) after {elapsed:.2f} s")
    status = parse_exit_status(tail)
    _say(f"guest {'powered off' if reason.kind is StopKind.POWEROFF else 'rebooted'} "
         f"after {elapsed:.2f} s")
    if args.init_cmd is not None and status is None:
        raise CliError("the guest stopped before the command finished (console above)")
    return status or 0


# ---- entry point ----------------------------------------------------------------------

def _at_least(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}")
        return value
    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sm", description="microVMs for notebooks")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("doctor", help="check that this host can run sm guests").set_defaults(
        handler=doctor)
    boot_cmd = commands.add_parser("boot", help="boot a guest on the console",
                                   description="Boot the guest kernel with sm's initramfs; with "
                                   "--init-cmd run that shell command in it, print its output and "
                                   "exit with its status when the guest powers off.")
    boot_cmd.add_argument("--cpus", type=_at_least(1), default=1)
    boot_cmd.add_argument("--memory", type=_at_least(64), default=512, metavar="MiB")
    boot_cmd.add_argument("--disk", action="append", default=[], metavar="FILE[:rw]",
                          help="a virtio-blk disk (read-only unless :rw); repeatable")
    boot_cmd.add_argument("--kernel", help="a bzImage (default: Debian's cloud kernel, fetched "
                                           "and cached)")
    boot_cmd.add_argument("--initrd", help="an initramfs (default: sm's, built and cached)")
    boot_cmd.add_argument("--cmdline", help=f"kernel command line (default: {DEFAULT_CMDLINE!r})")
    boot_cmd.add_argument("--init-cmd", metavar="'SHELL CMD'",
                          help="run this in the initramfs shell, then power off")
    boot_cmd.add_argument("--timeout", type=float, default=None, metavar="S",
                          help="stop the guest if it has not powered off after S seconds")
    boot_cmd.set_defaults(handler=boot)
    image_commands.add_subcommands(commands)
    return parser


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors whose message is the one line a user needs (imported late: the Debian
    fetcher is only loaded when a kernel is fetched)."""
    from vmm.guest.debian import DebianError

    return (OSError, BzImageError, BootParamsError, DebianError, KernelError, InitramfsError,
            ImageError)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.handler(args)
    except CliError as error:
        _say(str(error))
        return error.status
    except Exception as error:
        if not isinstance(error, _user_errors()):
            raise
        _say(str(error))
        return EXIT_SM_FAILED
    except KeyboardInterrupt:
        _say("interrupted; the guest was stopped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
