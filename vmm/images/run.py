"""``sm run`` and ``sm build-default``: boot an image and run its command, as ``docker run``.

The image's root filesystem (:mod:`vmm.images.rootfs`) is the guest's read-only
``/dev/vda``; what to run travels as a :class:`~vmm.guest.cmdline.RunSpec` file
appended to the cached initramfs, and init runs it after switching into the image
(share/guest/init). The command's output streams to stdout, and its exit status
becomes ours.
"""

from __future__ import annotations

import argparse
import re
import sys
import time

from vmm import hostkvm
from vmm.cli_support import CommandFailed, at_least, check_stop
from vmm.guest.cmdline import (
    COMMAND_STARTED,
    DEFAULT_KERNEL_CMDLINE,
    INIT_FAILED,
    RUN_SPEC_FILE,
    RunSpec,
    RunSpecError,
    parse_exit_status,
    root_args,
)
from vmm.guest.initramfs import build_initramfs, with_files
from vmm.guest.kernel import ensure_kernel
from vmm.images.default import DEFAULT_IMAGE, default_image, is_default_reference
from vmm.images.rootfs import FS_TYPE, rootfs_image
from vmm.images.store import Store
from vmm.microvm import Disk, MicroVm, MicroVmConfig

# What docker gives a container whose image sets no PATH.
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BOOT_LOG_BYTES = 64 * 1024


# ---- the image config → what init runs ------------------------------------------------

def _strings(value, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise RunSpecError(f"the image's {what} is not a list of strings")
    return value


def image_run_spec(image_config: dict, command: list[str] | None = None, *,
                   entrypoint: str | None = None, env: list[str] = (), workdir: str | None = None,
                   user: str | None = None, interactive: bool = False) -> RunSpec:
    """Docker's rules: Entrypoint + (``command`` or Cmd); ``env`` entries add to and override
    the image's Env; ``entrypoint=""`` drops the image's Entrypoint."""
    config = image_config.get("config")
    config = {} if config is None else config
    if not isinstance(config, dict):
        raise RunSpecError("the image config's 'config' is not an object")
    if entrypoint is not None:
        entry_argv = [entrypoint] if entrypoint else []
    else:
        entry_argv = _strings(config.get("Entrypoint"), "Entrypoint")
    if command:
        cmd = list(command)
    elif entrypoint is not None:   # docker: --entrypoint also drops the image's Cmd
        cmd = []
    else:
        cmd = _strings(config.get("Cmd"), "Cmd")
    argv = [*entry_argv, *cmd]
    if not argv:
        raise RunSpecError("the image names no command (no Entrypoint or Cmd): give one "
                           "after --, as in `sm run IMAGE -- CMD`")
    merged: dict[str, str] = {}
    for entry in [*_strings(config.get("Env"), "Env"), *env]:
        name, equals, _ = entry.partition("=")
        if not equals or not name:
            raise RunSpecError(f"environment entry {entry!r} is not NAME=VALUE")
        merged[name] = entry
    merged.setdefault("PATH", DEFAULT_PATH)
    image_workdir, image_user = config.get("WorkingDir"), config.get("User")
    for value, what in ((image_workdir, "WorkingDir"), (image_user, "User")):
        if value is not None and not isinstance(value, str):
            raise RunSpecError(f"the image's {what} is not a string")
    return RunSpec(argv=argv, env=list(merged.values()),
                   workdir=workdir or image_workdir or "/", user=user or image_user or "",
                   interactive=interactive)


# ---- the console → stdout ---------------------------------------------------------------

_EXIT_LINE = re.compile(rb"\r?\nsm: exit-status \d+\r?\n")
_EXIT_PREFIX = b"sm: exit-status "


def _could_start_exit_line(tail: bytes) -> bool:
    """Whether ``tail`` may be the beginning of init's ``\\nsm: exit-status N\\n``."""
    if tail.startswith(b"\r"):
        tail = tail[1:]
        if not tail:
            return True
    if not tail.startswith(b"\n"):
        return False
    rest = tail[1:]
    if len(rest) <= len(_EXIT_PREFIX):
        return _EXIT_PREFIX.startswith(rest)
    return rest.startswith(_EXIT_PREFIX) and re.fullmatch(rb"\d*\r?", rest[len(_EXIT_PREFIX):])


class CommandOutput:
    """Relays the guest console to ``out`` as the command's output: the boot log before
    init's "command started" line is held back (see :attr:`boot_log`), and init's exit-status
    line after the command ends the output (what follows is the kernel powering off)."""

    def __init__(self, out):
        self.out = out
        self.started = False
        self.finished = False
        self.boot_log = b""
        self._pending = b""

    def __call__(self, data: bytes) -> None:
        if not self.started:
            self.boot_log = (self.boot_log + data)[-BOOT_LOG_BYTES:]
            marker = self.boot_log.find(COMMAND_STARTED.encode())
            end = self.boot_log.find(b"\n", marker)
            if marker < 0 or end < 0:
                return
            self.started = True
            data = self.boot_log[end + 1:]
        self._emit(data)

    def _emit(self, data: bytes) -> None:
        if self.finished:
            return   # after init's exit-status line comes only the kernel powering off
        buffer = self._pending + data
        end = _EXIT_LINE.search(buffer)
        if end:
            self.finished = True
            self._pending = b""
            buffer = buffer[:end.start()]
            if buffer:
                self.out.write(buffer)
                self.out.flush()
            return
        hold = len(buffer)
        newline = buffer.rfind(b"\n")
        for start in (newline - 1, newline, len(buffer) - 1):
            if 0 <= start < hold and _could_start_exit_line(buffer[start:]):
                hold = start
                break
        self._pending = buffer[hold:]
        if hold:
            self.out.write(buffer[:hold])
            self.out.flush()

    def close(self) -> None:
        if self._pending:
            self.out.write(self._pending)
            self.out.flush()
            self._pending = b""


# ---- sm run / sm build-default ------------------------------------------------------------

def _image(store: Store, ref: str | None):
    return default_image(store) if is_default_reference(ref) else store.resolve(ref)


def _init_failure(boot_log: bytes) -> str | None:
    text = boot_log.decode("utf-8", "replace")
    at = text.rfind(INIT_FAILED)
    return text[at + len(INIT_FAILED):].splitlines()[0].strip() if at >= 0 else None


def run(args: argparse.Namespace) -> int:
    """``sm run``: the command's exit status; failures raise CommandFailed (124/125)."""
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    interactive = sys.stdin.isatty()
    store = Store()
    record = _image(store, args.image)
    spec = image_run_spec(record.config, command, entrypoint=args.entrypoint, env=args.env,
                          workdir=args.workdir, user=args.user, interactive=interactive)
    if refused := hostkvm.refusal():
        raise CommandFailed(refused)
    rootfs = rootfs_image(store, record)
    kernel = ensure_kernel()
    output = CommandOutput(sys.stdout.buffer)
    cmdline = " ".join([DEFAULT_KERNEL_CMDLINE, *root_args("/dev/vda", FS_TYPE)])
    started = time.monotonic()
    initrd = with_files(build_initramfs(kernel), {RUN_SPEC_FILE: spec.to_shell()})
    vm = MicroVm(MicroVmConfig(kernel=kernel.vmlinuz, initrd=initrd, cmdline=cmdline,
                               cpus=args.cpus, memory_mib=args.memory,
                               disks=[Disk(rootfs, read_only=True)], console=output))
    with vm:
        vm.start()
        if interactive:
            vm.forward_console_input(sys.stdin.buffer)
        reason = vm.wait(args.timeout)
        output.close()
        check_stop(reason, time.monotonic() - started, args.timeout,
                   what="the command did not finish")
        tail = vm.console_tail
    status = parse_exit_status(tail)
    if status is None:
        failure = _init_failure(output.boot_log)
        if not output.started and not failure:
            sys.stderr.buffer.write(output.boot_log)   # the boot log tells what went wrong
        raise CommandFailed(f"the guest could not run {record.name}: {failure}" if failure else
                            f"the guest stopped ({reason.kind.value}) before the command finished")
    return status


def build_default(args: argparse.Namespace) -> int:
    """``sm build-default``: build (or find) the default image and its root filesystem."""
    store = Store()
    record = default_image(store, rebuild=args.rebuild)
    rootfs = rootfs_image(store, record)
    print(f"{DEFAULT_IMAGE} {record.manifest_digest} ({rootfs.stat().st_size / 1e6:.0f} MB "
          "root filesystem)")
    return 0


def add_subcommands(subparsers) -> None:
    """Add ``run`` and ``build-default`` to the ``sm`` parser's subcommands."""
    run_cmd = subparsers.add_parser(
        "run", help="run a command in an image, in its own microVM",
        description="Boot IMAGE (default: the built-in python-default, built on first use) "
                    "with its root filesystem read-only and writes kept in guest RAM, run CMD "
                    "(or the image's Entrypoint/Cmd) as docker run does, stream its output "
                    "and exit with its status.")
    run_cmd.add_argument("--cpus", type=at_least(1), default=1)
    run_cmd.add_argument("--memory", type=at_least(64), default=512, metavar="MiB")
    run_cmd.add_argument("-e", "--env", action="append", default=[], metavar="NAME=VALUE",
                         help="set an environment variable; repeatable")
    run_cmd.add_argument("-w", "--workdir", help="working directory (absolute) for the command")
    run_cmd.add_argument("-u", "--user", help="USER[:GROUP] or UID[:GID] to run the command as")
    run_cmd.add_argument("--entrypoint", help="replace the image's Entrypoint ('' removes it)")
    run_cmd.add_argument("--timeout", type=float, default=None, metavar="S",
                         help="stop the guest if the command has not finished after S seconds")
    run_cmd.add_argument("image", nargs="?", metavar="IMAGE",
                         help="an image in the store, or python-default")
    run_cmd.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD",
                         help="the command and its arguments (replaces the image's Cmd)")
    run_cmd.set_defaults(handler=run)

    build_cmd = subparsers.add_parser(
        "build-default", help=f"build the default image {DEFAULT_IMAGE}",
        description="Build the built-in default image from Debian packages with mmdebstrap "
                    "(share/images/default.toml), and its root filesystem. Done once; later "
                    "runs reuse it until the recipe changes.")
    build_cmd.add_argument("--rebuild", action="store_true", help="build even if it is current")
    build_cmd.set_defaults(handler=build_default)
