"""The snapshots ``sm snapshot``, ``sm restore``, ``sm snapshots`` and ``sm rm-snapshot``
work with: directories the VMM writes (docs/snapshots.md) in ``snapshots_dir()``.

A snapshot is named by its directory's name there (``NAME``), or given by a path (any
argument with a ``/``). The images' warm base snapshots live in ``base/`` and are named
``base/KEY``. Other directories there (a kernel session's snapshots, sm_kernel) are not
listed, but their diffs count as users of the snapshot they were taken against.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from vmm.images.errors import ImageError
from vmm.images.reference import parse_reference
from vmm.paths import snapshots_dir
from vmm.snapshot import snapshot as snapshots
from vmm.snapshot.errors import SnapshotError
from vmm.snapshot.state_file import read_state

BASE_DIR = "base"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class SnapshotsError(Exception):
    """A named-snapshot operation was refused; the message is the one line for the user."""


@dataclass(frozen=True)
class Listed:
    name: str           # as the user names it: "s1", "base/KEY"
    path: Path
    kind: str           # "full", "diff", "base", or "unusable" (``problem`` says why)
    image: str          # familiar name ("" when unusable)
    parent: str         # a diff's parent, as display_name() gives it; else ""
    disk_bytes: int     # blocks its files use
    created: float      # time.time() when it was taken (the directory's mtime when unusable)
    problem: str = ""


def _root() -> Path:
    return snapshots_dir().absolute()


def _path_of(ref: str) -> Path:
    """Where the snapshot ``ref`` (a name, ``base/KEY`` or a path) is, or would be."""
    if "/" not in ref:
        if not NAME_PATTERN.fullmatch(ref) or ref == BASE_DIR:
            raise SnapshotsError(f"bad snapshot name {ref!r}: use letters, digits, '_', '.' or "
                                 "'-', starting with a letter or digit (or give a path with a '/')")
        return _root() / ref
    head, _, key = ref.partition("/")
    if head == BASE_DIR and NAME_PATTERN.fullmatch(key):
        return _root() / BASE_DIR / key
    return Path(ref).absolute()


def display_name(path: Path) -> str:
    """``NAME`` or ``base/KEY`` for a snapshot in snapshots_dir(), else its path."""
    path, root = path.absolute(), _root()
    if path.parent == root:
        return path.name
    if path.parent == root / BASE_DIR:
        return f"{BASE_DIR}/{path.name}"
    return str(path)


def resolve(ref: str) -> Path:
    """The existing snapshot ``ref`` names."""
    path = _path_of(ref)
    if not (path / snapshots.STATE_FILE).is_file():
        raise SnapshotsError(f"no snapshot {ref!r} (see `sm snapshots`)")
    return path


def new_path(ref: str | None, machine: str) -> Path:
    """Where a new snapshot of ``machine`` goes: ``ref``, or ``MACHINE-YYYYmmdd-HHMMSS``.
    An existing snapshot is never replaced (a diff may depend on it)."""
    if ref is None:
        stamp = f"{machine}-{time.strftime('%Y%m%d-%H%M%S')}"
        path, count = _path_of(stamp), 1
        while path.exists():
            count += 1
            path = _path_of(f"{stamp}-{count}")
        return path
    path = _path_of(ref)
    if path.parent == _root() / BASE_DIR:
        raise SnapshotsError(f"{BASE_DIR}/ holds the images' warm base snapshots: choose "
                             "another name")
    if path.exists():
        raise SnapshotsError(f"snapshot {ref!r} already exists: choose another name, or "
                             f"`sm rm-snapshot {ref}` first")
    return path


def _snapshot_dirs(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(child for child in directory.iterdir() if not child.name.startswith(".")
                  and (child / snapshots.STATE_FILE).is_file())


def list_snapshots() -> list[Listed]:
    """The named snapshots, then the warm base ones; unusable ones too, with the reason."""
    listed = []
    for path in _snapshot_dirs(_root()) + _snapshot_dirs(_root() / BASE_DIR):
        try:
            info = snapshots.info(path)
        except SnapshotError as error:
            used = sum(child.stat().st_blocks * 512 for child in path.iterdir() if child.is_file())
            listed.append(Listed(display_name(path), path, "unusable", "", "", used,
                                 path.stat().st_mtime, str(error)))
            continue
        kind = ("base" if path.parent == _root() / BASE_DIR
                else "diff" if info.parent is not None else "full")
        listed.append(Listed(display_name(path), path, kind, image_label(info.meta),
                             display_name(info.parent) if info.parent is not None else "",
                             info.disk_bytes, info.created))
    return listed


def image_label(meta: dict) -> str:
    """The image a snapshot was taken of, as `sm images` names it."""
    name = str(meta.get("image") or "unknown")
    try:
        return parse_reference(name).familiar
    except ImageError:
        return name


def _diffs_by_parent() -> dict[Path, list[Path]]:
    """Every snapshot under snapshots_dir() (two levels deep) that is a diff, by its parent."""
    root = _root()
    if not root.is_dir():
        return {}
    groups = [root] + [child for child in sorted(root.iterdir()) if child.is_dir()
                       and not (child / snapshots.STATE_FILE).exists()]
    users: dict[Path, list[Path]] = {}
    for group in groups:
        for path in _snapshot_dirs(group):
            try:
                parent = read_state(path / snapshots.STATE_FILE).get("parent")
            except SnapshotError:
                continue   # unreadable: it cannot be restored anyway
            if isinstance(parent, str):
                users.setdefault(Path(parent).resolve(), []).append(path)
    return users


def remove(refs: list[str], force: bool = False) -> list[Path]:
    """Remove the snapshots ``refs`` name: all of them, or none (one unknown, or, without
    ``force``, one that a snapshot not being removed is a diff of)."""
    paths = [resolve(ref) for ref in refs]
    if not force:
        users = _diffs_by_parent()
        removing = {path.resolve() for path in paths}
        for ref, path in zip(refs, paths):
            blocked = [user for user in users.get(path.resolve(), []) if user.resolve() not in removing]
            if blocked:
                more = f" and {len(blocked) - 1} more" if len(blocked) > 1 else ""
                raise SnapshotsError(f"snapshot {ref!r} is the parent of {display_name(blocked[0])!r}"
                                     f"{more}: remove that too, or use --force (which leaves it "
                                     "unusable)")
    for path in paths:
        snapshots.remove(path)
    return paths
