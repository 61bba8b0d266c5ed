"""The contract between the VMM and the guest's ``/init`` (share/guest/init).

The VMM passes requests on the kernel command line, and what to run in an image
as a file in the initramfs (:data:`RUN_SPEC_FILE`); init answers with marker
lines on the console.
"""

from __future__ import annotations

import base64
import re
import shlex
from dataclasses import dataclass, field

# reboot=k: a reset through the i8042; panic=-1: reset at once, which the VMM reports as a panic.
DEFAULT_KERNEL_CMDLINE = "console=ttyS0 reboot=k panic=-1 pci=off quiet"
INIT_STARTED = "sm: init started"
INIT_FAILED = "sm: init failed: "
EXIT_STATUS = "sm: exit-status "
INIT_CMD_PARAM = "sm.init_cmd"
# Printed by init just before it runs the image's command: what follows is the command's.
COMMAND_STARTED = "sm: command started"
# In the initramfs: with root=, init runs the command this file describes (RunSpec.to_shell).
RUN_SPEC_FILE = "sm/run"
# Inside the image after switch_root: a read-only tmpfs with init's busybox and the spec,
# so images without a shell (or without the applets init needs) still run.
GUEST_TOOLS_DIR = "/.sm"
# x86 COMMAND_LINE_SIZE: the whole command line, NUL included, must fit in it.
KERNEL_CMDLINE_MAX = 2048

_EXIT_STATUS_RE = re.compile(r"^" + re.escape(EXIT_STATUS) + r"(\d+)\r?$", re.MULTILINE)


def init_cmd_arg(command: str) -> str:
    """``sm.init_cmd=<base64>``: init runs ``command`` with ``sh -c`` and powers off.

    Base64 keeps spaces, quotes and newlines out of the kernel's parser.
    """
    arg = f"{INIT_CMD_PARAM}={base64.b64encode(command.encode()).decode('ascii')}"
    if len(arg) >= KERNEL_CMDLINE_MAX:
        raise ValueError(f"init command too long for the kernel command line ({len(arg)} bytes encoded)")
    return arg


def root_args(device: str = "/dev/vda", fstype: str | None = None, init: str | None = None) -> list[str]:
    """Arguments that make init boot into a read-only block root with a tmpfs overlay."""
    args = [f"root={device}"]
    if fstype:
        args.append(f"rootfstype={fstype}")
    if init:
        args.append(f"init={init}")
    return args


def parse_exit_status(console: str | bytes) -> int | None:
    """The status of the ``sm.init_cmd`` command from the console output, if it finished."""
    if isinstance(console, bytes):
        console = console.decode("utf-8", "replace")
    matches = _EXIT_STATUS_RE.findall(console)
    return int(matches[-1]) if matches else None


class RunSpecError(ValueError):
    """A command or environment that cannot be handed to init (NUL bytes, bad names)."""


_USER_SPEC = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(:[A-Za-z0-9_][A-Za-z0-9_.-]*)?")


@dataclass(frozen=True)
class RunSpec:
    """What init runs after switching into the image, as ``docker run`` would.

    ``argv[0]`` is looked up in the ``PATH`` of ``env`` (which must set it); ``user`` is
    ``""`` (root), ``UID[:GID]`` or names from the image's /etc/passwd and /etc/group.
    ``interactive``: the command gets the console as its controlling terminal; otherwise
    its stdin is /dev/null and its output reaches the host byte for byte.
    """
    argv: list[str]
    env: list[str] = field(default_factory=list)
    workdir: str = "/"
    user: str = ""
    interactive: bool = False

    def __post_init__(self) -> None:
        if not self.argv or not self.argv[0]:
            raise RunSpecError("no command to run")
        for text in (*self.argv, *self.env, self.workdir, self.user):
            if "\0" in text:
                raise RunSpecError(f"{text!r} contains a NUL byte")
        for entry in self.env:
            if entry.partition("=")[0] == "" or "=" not in entry:
                raise RunSpecError(f"environment entry {entry!r} is not NAME=VALUE")
        if not any(entry.startswith("PATH=") for entry in self.env):
            raise RunSpecError("the environment must set PATH")
        if not self.workdir.startswith("/"):
            raise RunSpecError(f"working directory {self.workdir!r} is not an absolute path")
        if self.user and not _USER_SPEC.fullmatch(self.user):
            raise RunSpecError(f"user {self.user!r} is not NAME, UID, NAME:GROUP or UID:GID")

    def to_shell(self) -> bytes:
        """The spec as shell assignments that init sources (busybox sh has no JSON parser)."""
        lines = [f"sm_workdir={shlex.quote(self.workdir)}",
                 f"sm_user={shlex.quote(self.user)}",
                 f"sm_interactive={int(self.interactive)}",
                 f"sm_env_count={len(self.env)}",
                 *(f"sm_env_{i}={shlex.quote(entry)}" for i, entry in enumerate(self.env, 1)),
                 f"sm_argc={len(self.argv)}",
                 *(f"sm_arg_{i}={shlex.quote(arg)}" for i, arg in enumerate(self.argv, 1))]
        return ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")
