"""Snapshots on disk: a directory with a ``state`` file and a sparse ``memory`` file.

A full snapshot's memory file holds every non-zero page; a diff's holds the pages
written since its parent (another snapshot directory, recorded by path) and the
state says which. :func:`save` writes into a temporary directory and renames it
into place only once everything is on disk, so a failed save leaves the previous
snapshot of that name as it was. :func:`load` checks the whole chain (format,
VMM version, this host's CPU, the disks, the files' sizes) before it maps the
root's memory file copy-on-write and lays the diffs over it.
"""

from __future__ import annotations

import base64
import fcntl
import functools
import os
import shutil
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from vmm.kvm import CpuidEntry, Kvm
from vmm.memory import GuestMemory
from vmm.microvm import MicroVm, RestorePoint
from vmm.snapshot.errors import CorruptSnapshot, IncompatibleSnapshot, SnapshotError
from vmm.snapshot.memory_file import read_pages, write_full, write_pages
from vmm.snapshot.state_file import read_state, write_state

STATE_FILE = "state"
MEMORY_FILE = "memory"
MAX_CHAIN = 64
# CPUID feature words a guest may have been using: (leaf, subleaf, register).
FEATURE_WORDS = ((1, 0, "ecx"), (1, 0, "edx"), (7, 0, "ebx"), (7, 0, "ecx"), (7, 0, "edx"),
                 (0x80000001, 0, "ecx"), (0x80000001, 0, "edx"), (0xD, 1, "eax"))
# Bits that say what the guest OS or the VMM set up, not what the CPU can do:
# OSXSAVE and "running under a hypervisor" in leaf 1, OSPKE in leaf 7.
NOT_FEATURES = {(1, 0, "ecx"): 1 << 27 | 1 << 31, (7, 0, "ecx"): 1 << 4}


@functools.cache
def vmm_version() -> str:
    try:
        return metadata.version("sm")
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class SnapshotInfo:
    path: Path
    created: float
    parent: Path | None
    cpus: int
    memory_mib: int
    disk_bytes: int           # blocks the two files really use
    meta: dict                # what the caller saved with it (image, …)


# ---- saving ---------------------------------------------------------------------------


def save(vm: MicroVm, path: str | os.PathLike, *, parent: Path | None, meta: dict) -> SnapshotInfo:
    """Snapshot the running ``vm`` into directory ``path``: a diff against ``parent`` (a
    snapshot of this same run, the last one taken) when given, else a full one.
    The vm is paused meanwhile and runs again afterwards, also on failure."""
    path = Path(path).absolute()
    if parent is not None and not vm.logging_dirty_pages:
        raise SnapshotError("a diff snapshot needs a full snapshot of this machine first")
    with _staged(path, "the snapshot") as work:
        vm.pause()
        try:
            record = _save_paused(vm, work, parent, meta)
        finally:
            vm.resume()
    return _info(path, record)


def _save_paused(vm: MicroVm, work: Path, parent: Path | None, meta: dict) -> dict:
    with vm.devices_held():
        state = vm.save_state()
        # Read (and restart) the dirty log even for a full snapshot: the next diff is
        # against this one.
        dirty = vm.dirty_pages() if vm.logging_dirty_pages else None
        if parent is None:
            _write_memory_file(work, lambda fd: write_full(vm.memory, fd))
        else:
            _write_memory_file(work, lambda fd: write_pages(vm.memory, fd, dirty))
        vm.log_dirty_pages()
    record = {
        "vmm_version": vmm_version(),
        "created": time.time(),
        "parent": str(parent) if parent is not None else None,
        "parent_created": info(parent).created if parent is not None else None,
        "pages": _pack_pages(dirty) if parent is not None else None,
        "machine": {
            "cpus": vm.config.cpus,
            "memory_mib": vm.config.memory_mib,
            "layout": vm.memory.layout,
            "cmdline": vm.config.cmdline,
            "disks": [_disk_identity(disk.path, disk.read_only) for disk in vm.config.disks],
        },
        "meta": meta,
        "state": state,
    }
    write_state(work / STATE_FILE, record)
    return record


@contextmanager
def saving_alone(path: Path) -> Iterator[bool]:
    """For a snapshot many processes may want to save at once (a warm snapshot): True
    inside the block if this process holds the lock to save ``path``, False if another does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


@contextmanager
def _staged(target: Path, what: str) -> Iterator[Path]:
    """A fresh directory beside ``target`` to write into, put in its place when the block
    ends without error, removed otherwise: what was at ``target`` is untouched until then."""
    target.parent.mkdir(parents=True, exist_ok=True)
    work = target.parent / f".{target.name}.saving-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        yield work
    except OSError as error:
        shutil.rmtree(work, ignore_errors=True)
        raise SnapshotError(f"could not write {what} to {target}: {error.strerror or error} "
                            f"(an earlier snapshot there is unchanged)") from None
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    _replace_directory(work, target)


def _write_memory_file(work: Path, write: Callable[[int], None]) -> None:
    fd = os.open(work / MEMORY_FILE, os.O_CREAT | os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        write(fd)
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_directory(new: Path, path: Path) -> None:
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.rename(path, old)
        os.rename(new, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(new, path)


def _pack_pages(pages: bytes) -> str:
    return base64.b64encode(zlib.compress(pages, 6)).decode()


def _unpack_pages(text: str, count: int, where: Path) -> bytes:
    try:
        pages = zlib.decompress(base64.b64decode(text, validate=True))
    except (ValueError, zlib.error):
        raise CorruptSnapshot(f"{where}: the page list is damaged") from None
    if len(pages) != count:
        raise CorruptSnapshot(f"{where}: the page list covers {len(pages)} pages, RAM has {count}")
    return pages


def _disk_identity(path: Path, read_only: bool) -> dict:
    stat = os.stat(path)
    return {"path": str(path), "read_only": read_only, "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns}


# ---- reading --------------------------------------------------------------------------


def _read_record(path: Path) -> dict:
    if not path.is_dir():
        raise CorruptSnapshot(f"no snapshot at {path}")
    record = read_state(path / STATE_FILE)
    version = record.get("vmm_version")
    if version != vmm_version():
        raise IncompatibleSnapshot(
            f"{path} was taken by sm {version}, this is sm {vmm_version()}: "
            "take it again with this version")
    try:
        machine = record["machine"]
        memory_bytes = sum(size for _, size in machine["layout"])
        if memory_bytes != machine["memory_mib"] << 20:
            raise CorruptSnapshot(f"{path}/{STATE_FILE}: the memory layout does not add up")
        size = os.stat(path / MEMORY_FILE).st_size
    except FileNotFoundError:
        raise CorruptSnapshot(f"{path}/{MEMORY_FILE} is missing: the snapshot is incomplete") from None
    except (KeyError, TypeError, ValueError):
        raise CorruptSnapshot(f"{path}/{STATE_FILE} lacks parts of a machine state") from None
    if size != memory_bytes:
        raise CorruptSnapshot(f"{path}/{MEMORY_FILE} holds {size / 2**20:g} MiB, the machine had "
                              f"{memory_bytes >> 20} MiB: the file is truncated or not this snapshot's")
    return record


def info(path: str | os.PathLike) -> SnapshotInfo:
    path = Path(path).absolute()
    return _info(path, _read_record(path))


def _info(path: Path, record: dict) -> SnapshotInfo:
    used = sum(os.stat(path / name).st_blocks * 512 for name in (STATE_FILE, MEMORY_FILE))
    machine = record["machine"]
    return SnapshotInfo(path, record["created"], Path(record["parent"]) if record["parent"] else None,
                        machine["cpus"], machine["memory_mib"], used, record.get("meta", {}))


def _chain(path: Path) -> list[tuple[Path, dict]]:
    """The snapshot and its ancestors, the full one first."""
    chain = []
    while True:
        if len(chain) >= MAX_CHAIN:
            raise CorruptSnapshot(f"{path}: diff chain longer than {MAX_CHAIN} (a loop?)")
        try:
            record = _read_record(path)
        except CorruptSnapshot as error:
            if chain:
                raise CorruptSnapshot(f"the parent snapshot {path} of {chain[-1][0]} cannot be "
                                      f"used: {error}") from None
            raise
        if chain and record["created"] != chain[-1][1]["parent_created"]:
            raise CorruptSnapshot(f"the parent snapshot {path} of {chain[-1][0]} was replaced "
                                  "by another: the diff cannot be restored")
        chain.append((path, record))
        if record["parent"] is None:
            return chain[::-1]
        path = Path(record["parent"])


def _check_same_machine(chain: list[tuple[Path, dict]]) -> None:
    layout = chain[-1][1]["machine"]["layout"]
    for path, record in chain:
        if record["machine"]["layout"] != layout:
            raise CorruptSnapshot(f"{path} has another memory layout than its diff {chain[-1][0]}")


def _check_cpu(kvm: Kvm, record: dict, path: Path) -> None:
    """Refuse a snapshot whose guest may use CPU features this host lacks."""
    supported = {(e.function, e.index): e for e in kvm.supported_cpuid()}
    saved = {(entry[0], entry[1]): CpuidEntry(*entry) for entry in record["state"]["vcpus"][0]["cpuid"]}
    missing = []
    for leaf, subleaf, register in FEATURE_WORDS:
        want = getattr(saved.get((leaf, subleaf)), register, 0) & ~NOT_FEATURES.get((leaf, subleaf, register), 0)
        have = getattr(supported.get((leaf, subleaf)), register, 0)
        if want & ~have:
            missing.append(f"CPUID {leaf:#x}.{subleaf} {register} {want & ~have:#x}")
    if missing:
        raise IncompatibleSnapshot(f"{path} was taken on a CPU with features this host lacks "
                                   f"({', '.join(missing)}): restore it on a like machine")


def _check_disks(record: dict, path: Path) -> None:
    for disk in record["machine"]["disks"]:
        try:
            now = _disk_identity(Path(disk["path"]), disk["read_only"])
        except FileNotFoundError:
            raise SnapshotError(f"{path} needs the disk {disk['path']}, which is gone "
                                "(was its image removed?)") from None
        if (now["size"], now["mtime_ns"]) != (disk["size"], disk["mtime_ns"]):
            raise SnapshotError(f"{path} needs the disk {disk['path']} as it was, and it has "
                                "changed since: the snapshot cannot be used")


def load(path: str | os.PathLike, kvm: Kvm) -> tuple[dict, RestorePoint]:
    """The snapshot at ``path``'s record and guest RAM, ready for ``MicroVm(config,
    restore=...)``; raises SnapshotError (or a subclass) saying why it cannot be used."""
    path = Path(path).absolute()
    chain = _chain(path)
    _check_same_machine(chain)
    record = chain[-1][1]
    try:
        _check_cpu(kvm, record, path)
    except (KeyError, TypeError, IndexError):
        raise CorruptSnapshot(f"{path}/{STATE_FILE} has no usable vCPU state") from None
    _check_disks(record, path)
    return record, RestorePoint(_layered_memory(chain), record["state"])


def _layered_memory(chain: list[tuple[Path, dict]]) -> GuestMemory:
    """Guest RAM of the last snapshot of ``chain``: the root's memory file mapped
    copy-on-write, each diff's pages read over it."""
    layout = [tuple(pair) for pair in chain[-1][1]["machine"]["layout"]]
    with open(chain[0][0] / MEMORY_FILE, "rb") as root:
        memory = GuestMemory(layout, backing=root.fileno())
    try:
        page_total = memory.size // os.sysconf("SC_PAGE_SIZE")
        for layer, layer_record in chain[1:]:
            pages = _unpack_pages(layer_record["pages"], page_total, layer)
            with open(layer / MEMORY_FILE, "rb") as file:
                read_pages(memory, file.fileno(), pages)
    except BaseException:
        memory.close()
        raise
    return memory


def flatten(path: str | os.PathLike, target: str | os.PathLike) -> SnapshotInfo:
    """Write the snapshot at ``path`` (a diff and its parents) as one full snapshot at
    ``target``, which needs no parent; ``path`` itself is left as it is."""
    path, target = Path(path).absolute(), Path(target).absolute()
    chain = _chain(path)
    _check_same_machine(chain)
    record = {**chain[-1][1], "parent": None, "parent_created": None, "pages": None}
    memory = _layered_memory(chain)
    try:
        with _staged(target, "the flattened snapshot") as work:
            _write_memory_file(work, lambda fd: write_full(memory, fd))
            write_state(work / STATE_FILE, record)
    finally:
        memory.close()
    return _info(target, record)


def remove(path: str | os.PathLike) -> None:
    path = Path(path)
    if not (path / STATE_FILE).exists():
        raise SnapshotError(f"no snapshot at {path}")
    shutil.rmtree(path)
