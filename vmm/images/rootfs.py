"""An image's root filesystem: its layers merged and written as a read-only erofs image.

Cached as ``$SM_HOME/rootfs/<manifest digest>.erofs`` (``sha256-<hex>.erofs``):
a manifest digest names exactly one list of layers, so a cached file is never
stale. The layers are merged into a staging directory next to the cache
(:mod:`vmm.images.layers`), ``mkfs.erofs`` writes a temporary file, and a rename
publishes it; a file lock keeps two processes from building the same image.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from vmm.cli_support import say
from vmm.images.errors import ImageError
from vmm.images.layers import merge_layers
from vmm.images.store import ImageRecord, Store
from vmm.paths import sm_home

FS_TYPE = "erofs"
MKFS = "mkfs.erofs"


class RootfsError(ImageError):
    """The root filesystem image cannot be built (missing tool, mkfs failed, disk full)."""


def rootfs_dir() -> Path:
    return sm_home() / "rootfs"


def rootfs_path(record: ImageRecord) -> Path:
    """Where the image's root filesystem is cached (whether or not it is built yet)."""
    return rootfs_dir() / f"{record.manifest_digest.replace(':', '-')}.{FS_TYPE}"


_CACHED_NAME = re.compile(rf"sha256-[0-9a-f]{{64}}\.{FS_TYPE}")


def prune_rootfs(store: Store) -> list[Path]:
    """Delete root filesystem images (and their locks) of images no longer in the store."""
    directory = rootfs_dir()
    if not directory.is_dir():
        return []
    kept = {rootfs_path(record).name for record in store.images()}
    removed = []
    for entry in directory.iterdir():
        name = entry.name.lstrip(".").removesuffix(".lock")
        if _CACHED_NAME.fullmatch(name) and name not in kept:   # never a build in progress
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed



def rootfs_image(store: Store, record: ImageRecord, *, show_progress: bool = True) -> Path:
    """The path of ``record``'s root filesystem image, building it first if needed."""
    path = rootfs_path(record)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_file():   # another process may have built it while we waited
            _build(store, record, path, show_progress)
    return path


def _build(store: Store, record: ImageRecord, path: Path, show_progress: bool) -> None:
    if shutil.which(MKFS) is None:
        raise RootfsError(f"{MKFS} is missing: install erofs-utils (apt-get install erofs-utils)")
    layers = [store.blob_path(layer.digest) for layer in record.layers]
    total = sum(layer.stat().st_size for layer in layers)
    started = time.monotonic()
    if show_progress:
        say(f"building the root filesystem of {record.name} "
             f"({len(layers)} layer{'s' * (len(layers) != 1)}, {total / 1e6:.0f} MB)")
    from tqdm import tqdm  # loaded only to build: every `sm run` imports this module

    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=path.parent))
    temp = path.parent / f".tmp-{os.getpid()}-{path.name}"
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc="sm: unpacking layers",
                  file=sys.stderr, delay=1.0, leave=False, disable=not show_progress) as bar:
            report = merge_layers(layers, staging, bar.update)
        if show_progress:
            for warning in report.warnings():
                say(f"warning: {warning}")
            say(f"writing the {FS_TYPE} image")
        _mkfs(staging, temp, record.manifest_digest, all_root=os.geteuid() != 0)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    if show_progress:
        say(f"root filesystem ready: {path.stat().st_size / 1e6:.0f} MB in "
             f"{time.monotonic() - started:.1f} s")


def _mkfs(source: Path, output: Path, digest: str, all_root: bool) -> None:
    # The same image always gives the same file system UUID.
    fs_uuid = uuid.UUID(bytes=bytes.fromhex(digest.partition(":")[2])[:16], version=4)
    # Keep file times: Python's .pyc files are checked against their sources' mtimes.
    argv = [MKFS, "--quiet", "--preserve-mtime", f"-U{fs_uuid}"]
    if all_root:   # unprivileged staging: files belong to us; in the guest they are root's
        argv.append("--all-root")
    result = subprocess.run([*argv, str(output), str(source)], check=False, capture_output=True,
                            text=True)
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise RootfsError(f"{MKFS} failed ({detail}); is there room in {output.parent}?")
