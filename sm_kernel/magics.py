"""``%sm`` magics: parsing, and the text each one shows. The host kernel runs them
(sm_kernel/kernel.py) after every cell still running in the guest.

Each ``magic_*`` function's docstring is its help (first line: usage, then what it does).
"""

from __future__ import annotations

import html
import re
import shlex
from dataclasses import dataclass

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_TIMEOUT = 7 * 24 * 3600


class MagicUsageError(Exception):
    """A %sm line the user mistyped; the message is the one line the notebook shows."""


@dataclass(frozen=True)
class MagicCall:
    name: str
    args: tuple


def magic_help():
    """%sm help — this list."""


def magic_status():
    """%sm status — image, vCPUs, memory, balloon, uptime, cell timeout and snapshots of this machine."""


def magic_timeout(seconds):
    """%sm timeout SECONDS|off — stop cells after SECONDS of wall-clock time: interrupt, then restart."""


def magic_snapshot(name=None):
    """%sm snapshot [NAME] — save the whole machine (every variable, import, open file)."""


def magic_restore(name):
    """%sm restore NAME — go back to snapshot NAME; what happened since is gone."""


def magic_list():
    """%sm list — the snapshots of this session: name, cell, time, size."""


def magic_delete(name):
    """%sm delete NAME — delete snapshot NAME and its files."""


def magic_balloon(target_mib=None):
    """%sm balloon [MIB] — a panel: give guest memory back to the host (MIB sets the target, as its slider does), and watch the figures."""


MAGICS = {f.__name__.removeprefix("magic_"): f for f in (
    magic_help, magic_status, magic_timeout, magic_snapshot, magic_restore, magic_list, magic_delete,
    magic_balloon)}


def is_magic_cell(code: str) -> bool:
    """Whether a cell is for the host: its first non-blank line starts with %sm."""
    for line in code.splitlines():
        if line.strip():
            return line.strip() == "%sm" or line.strip().startswith(("%sm ", "%sm\t"))
    return False


def parse(code: str) -> MagicCall:
    """The call a %sm cell makes, or MagicUsageError with what to type instead."""
    lines = [line for line in code.strip().splitlines() if line.strip()]
    if len(lines) != 1:
        raise MagicUsageError("a %sm line must be alone in its cell: put the other code in its own cell")
    try:
        words = shlex.split(lines[0].strip()[len("%sm"):])
    except ValueError as error:
        raise MagicUsageError(f"cannot read the %sm line: {error}") from None
    if not words:
        raise MagicUsageError("%sm needs a command: " + ", ".join(MAGICS) + " (try %sm help)")
    name, args = words[0], words[1:]
    if name not in MAGICS:
        raise MagicUsageError(f"unknown %sm command {name!r}: try one of " + ", ".join(MAGICS))
    if name in ("help", "status", "list"):
        _arity(name, args, 0, 0)
        return MagicCall(name, ())
    if name == "balloon":
        _arity(name, args, 0, 1)
        return MagicCall(name, tuple(_mib(arg) for arg in args))
    if name == "timeout":
        _arity(name, args, 1, 1)
        return MagicCall(name, (_seconds(args[0]),))
    if name == "snapshot":
        _arity(name, args, 0, 1)
        return MagicCall(name, tuple(_name(arg) for arg in args))
    _arity(name, args, 1, 1)
    return MagicCall(name, (_name(args[0]),))


def _arity(name: str, args: list[str], low: int, high: int) -> None:
    if not low <= len(args) <= high:
        raise MagicUsageError(f"usage: {usage(name)}")


def _mib(text: str) -> int:
    try:
        mib = int(text)
    except ValueError:
        mib = -1
    if mib < 0:
        raise MagicUsageError(f"the balloon target is whole MiB, 0 or more, not {text!r} (e.g. %sm balloon 256)")
    return mib


def _seconds(text: str) -> float | None:
    if text.lower() in ("off", "none", "0"):
        return None
    try:
        seconds = float(text)
    except ValueError:
        raise MagicUsageError(f"%sm timeout: {text!r} is not a number of seconds (or 'off')") from None
    if not 0 < seconds <= MAX_TIMEOUT or seconds != seconds:
        raise MagicUsageError(f"%sm timeout: seconds must be between 0 and {MAX_TIMEOUT} (or 'off')")
    return seconds


def _name(text: str) -> str:
    if not NAME_PATTERN.fullmatch(text):
        raise MagicUsageError(f"snapshot name {text[:70]!r} is not valid: use up to 64 letters, digits, "
                              "'.', '_' or '-', starting with a letter or digit")
    return text


def usage(name: str) -> str:
    return MAGICS[name].__doc__.split(" — ")[0]


def help_rows() -> list[tuple[str, str]]:
    return [tuple(f.__doc__.split(" — ", 1)) for f in MAGICS.values()]


# ---------------------------------------------------------------- output

def table(headers: list[str], rows: list[list[str]], title: str = "") -> dict:
    """A display bundle: an HTML table and the same as aligned plain text."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    lines = [title] if title else []
    lines.append("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    head = "".join(f"<th style='text-align:left'>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td style='text-align:left'>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    caption = f"<caption style='text-align:left'><b>{html.escape(title)}</b></caption>" if title else ""
    return {"text/plain": "\n".join(lines),
            "text/html": f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"}


def note(text: str) -> dict:
    """A one-line result."""
    return {"text/plain": text, "text/html": f"<pre>{html.escape(text)}</pre>"}


def human_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def human_duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
