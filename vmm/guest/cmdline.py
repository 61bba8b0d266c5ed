"""The contract between the VMM and the guest's ``/init`` (share/guest/init).

The VMM passes requests on the kernel command line; init answers with marker
lines on the console.
"""

from __future__ import annotations

import base64
import re

INIT_STARTED = "sm: init started"
INIT_FAILED = "sm: init failed: "
EXIT_STATUS = "sm: exit-status "
INIT_CMD_PARAM = "sm.init_cmd"
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
