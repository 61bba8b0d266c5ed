"""The snapshots of one kernel session, under ``$SM_SNAPSHOTS/kernel-<pid>-<token>/``
(default ``$SM_HOME/snapshots``).

Each snapshot is a directory the VMM writes (``Machine.snapshot(path, diff=...)``) plus
``sm-kernel.json``: what the relay needs to reattach to the guest's kernel after a
restore (its pid, connection key and ports), and what ``%sm list`` shows. The session's
directory is removed when the kernel shuts down; one left by a kernel that was killed is
removed by the next kernel that starts.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vmm.paths import snapshots_dir

META_FILE = "sm-kernel.json"
WARM_BASE = "(image base)"  # the parent of a first diff when the machine came from the warm snapshot


@dataclass
class SnapshotEntry:
    name: str
    cell: int               # the execution count when it was taken
    created: float          # unix time
    size: int               # bytes on disk
    parent: str | None      # the snapshot a diff builds on (WARM_BASE: the image's base snapshot)
    kernel_pid: int
    kernel_key: str
    kernel_ports: dict
    builtin_executor: bool
    path: str = ""


class SnapshotStore:
    def __init__(self, root: Path | None = None):
        base = root or snapshots_dir()
        base.mkdir(parents=True, exist_ok=True)
        remove_abandoned(base)
        self.root = base / f"kernel-{os.getpid()}-{secrets.token_hex(4)}"
        self.root.mkdir(mode=0o700)
        self.entries: dict[str, SnapshotEntry] = {}
        self._counter = 0

    def new_name(self) -> str:
        while True:
            self._counter += 1
            name = f"snap{self._counter}"
            if name not in self.entries:
                return name

    def path(self, name: str) -> Path:
        return self.root / name

    def add(self, entry: SnapshotEntry) -> None:
        path = self.path(entry.name)
        entry.path = str(path)
        entry.size = directory_size(path)
        (path / META_FILE).write_text(json.dumps(asdict(entry)))
        self.entries[entry.name] = entry

    def children(self, name: str) -> list[str]:
        return [e.name for e in self.entries.values() if e.parent == name]

    def delete(self, name: str) -> None:
        shutil.rmtree(self.path(name), ignore_errors=True)
        self.entries.pop(name, None)

    def total_size(self) -> int:
        return sum(e.size for e in self.entries.values())

    def remove_all(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        self.entries.clear()


def directory_size(path: Path) -> int:
    """Bytes actually on disk (memory files are sparse)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                pass
    return total


def remove_abandoned(base: Path) -> None:
    """Session directories of kernels that no longer run (killed without a shutdown)."""
    for entry in base.glob("kernel-*-*"):
        try:
            pid = int(entry.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if not _running(pid) and time.time() - entry.stat().st_mtime > 60:
            shutil.rmtree(entry, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
