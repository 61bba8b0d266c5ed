"""Merge an image's layers, in order, into one directory tree (the OCI image layer spec).

Each layer is a tar archive (gzip, zstd or uncompressed; told apart by its first
bytes, since Docker's media types do not always say). Entries are applied with
the OCI change-set rules: ``.wh.NAME`` deletes ``NAME`` from the lower layers,
``.wh..wh..opq`` empties its directory of everything the lower layers put
there, and a later entry replaces an earlier one of the same path.

Every file is created relative to an open directory descriptor, walking the
path one component at a time with ``O_NOFOLLOW``: an entry whose path is
absolute, climbs with ``..``, or passes through a symlink that an earlier entry
planted is refused with a named error, so nothing is ever written outside the
target, whatever the archive holds.

As root, owners, modes (setuid too), device nodes and xattrs are kept. As
another user (or on a file system without device nodes), files belong to that
user, device nodes are skipped, and the counts are reported in :class:`MergeReport`.
"""

from __future__ import annotations

import errno
import gzip
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import zstandard

from vmm.images.errors import ImageError

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# overlayfs reads these from its lower layer: an image must not steer the guest's overlay.
FORBIDDEN_XATTR_PREFIX = "trusted.overlay."
PAX_XATTR_PREFIX = "SCHILY.xattr."
_COPY_CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class LayerError(ImageError):
    """A layer cannot be applied: not a readable tar, or an entry that cannot be written."""


class UnsafeLayerPath(LayerError):
    """A layer entry (or a hard link's target) would reach outside the root."""


class PathEscapesRoot(UnsafeLayerPath):
    """An absolute path, or one with a ``..`` component."""


class PathThroughSymlink(UnsafeLayerPath):
    """A path whose parent directory is a symlink (planted by an earlier entry or layer)."""


@dataclass
class MergeReport:
    """What was applied, and what this process was not allowed to keep."""
    entries: int = 0
    skipped_owners: int = 0    # not root: files kept this user's ownership
    skipped_devices: int = 0   # device nodes and FIFOs this file system or user cannot make
    skipped_xattrs: int = 0    # the host file system or our privileges refused them

    def warnings(self) -> list[str]:
        notes = []
        if self.skipped_owners:
            notes.append(f"{self.skipped_owners} files kept your ownership instead of the image's "
                         "(run as root to keep owners)")
        if self.skipped_devices:
            notes.append(f"{self.skipped_devices} device nodes or FIFOs were left out (they "
                         "need root and a local file system)")
        if self.skipped_xattrs:
            notes.append(f"{self.skipped_xattrs} extended attributes could not be kept")
        return notes


def split_path(name: str) -> list[str]:
    """The components of a layer path, ``./`` and empty parts dropped; unsafe ones refused."""
    if "\0" in name:
        raise LayerError(f"layer path {name!r} contains a NUL byte")
    if name.startswith("/"):
        raise PathEscapesRoot(f"layer path {name!r} is absolute")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise PathEscapesRoot(f"layer path {name!r} climbs out with '..'")
    return parts


class _CountingReader:
    """A file wrapper that reports how many (compressed) bytes have been read."""

    def __init__(self, raw, progress: Callable[[int], None] | None):
        self._raw = raw
        self._progress = progress

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        if self._progress and data:
            self._progress(len(data))
        return data

    def readable(self) -> bool:
        return True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        pass   # the caller closes the underlying file


def open_layer_stream(raw, progress: Callable[[int], None] | None = None):
    """A readable stream of the uncompressed tar in ``raw`` (a seekable binary file)."""
    magic = raw.read(4)
    raw.seek(0)
    counted = _CountingReader(raw, progress)
    if magic.startswith(GZIP_MAGIC):
        return gzip.GzipFile(fileobj=counted, mode="rb")
    if magic == ZSTD_MAGIC:
        return zstandard.ZstdDecompressor().stream_reader(counted, read_across_frames=True)
    return counted


def merge_layers(layers: Iterable[Path], target: Path,
                 progress: Callable[[int], None] | None = None) -> MergeReport:
    """Apply each layer file in order on top of ``target`` (an existing directory).

    ``progress`` is called with the number of layer-file bytes read so far, as they are read.
    """
    report = MergeReport()
    with _TreeWriter(target, report) as writer:
        for layer in layers:
            writer.apply_layer(Path(layer), progress)
        writer.finish()
    return report


class _TreeWriter:
    """Writes entries below one root directory, never following a symlink on the way."""

    def __init__(self, root: Path, report: MergeReport):
        self.root_fd = os.open(root, _DIR_FLAGS)
        self.report = report
        self.privileged = os.geteuid() == 0
        # The last directory opened: consecutive entries of a layer usually share it.
        self._dir_cache: tuple[tuple[str, ...], int] | None = None
        self._written: set[tuple[str, ...]] = set()            # paths this layer wrote
        self._written_ancestors: set[tuple[str, ...]] = set()  # directories above them
        # Directory modes and times are set last: adding children changes a directory's
        # mtime, and a read-only directory would stop a non-root writer.
        self._dir_metadata: dict[tuple[str, ...], tarfile.TarInfo] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self._drop_dir_cache()
        os.close(self.root_fd)

    # ---- layers ----------------------------------------------------------------------

    def apply_layer(self, layer: Path, progress: Callable[[int], None] | None) -> None:
        self._written.clear()
        self._written_ancestors.clear()
        member = None
        try:
            with open(layer, "rb") as raw, open_layer_stream(raw, progress) as stream, \
                    tarfile.open(fileobj=stream, mode="r|") as archive:
                for member in archive:
                    self._apply(member, archive)
                    self.report.entries += 1
        except (tarfile.TarError, EOFError, zlib.error, zstandard.ZstdError,
                gzip.BadGzipFile) as exc:
            raise LayerError(f"layer {layer.name} is not a readable tar archive: {exc}") from None
        except OSError as exc:
            where = f"entry {member.name!r}" if member else "the file"
            raise LayerError(f"layer {layer.name}: cannot apply {where}: "
                             f"{exc.strerror or exc}") from exc

    def _apply(self, member: tarfile.TarInfo, archive: tarfile.TarFile) -> None:
        parts = tuple(split_path(member.name))
        if not parts:   # the root directory itself
            self._set_owner_and_xattrs(self.root_fd, None, member)
            self._dir_metadata[()] = member
            return
        name = parts[-1]
        if name.startswith(WHITEOUT_PREFIX):
            self._apply_whiteout(parts[:-1], name)
            return
        parent_fd = self._open_dir(parts[:-1], member.name)
        try:
            self._mark_written(parts)
            if member.isdir():
                self._make_dir(parent_fd, name, member, parts)
            elif member.islnk():
                self._make_hard_link(parent_fd, name, member, parts)
            elif member.isreg():
                self._replace(parent_fd, name, parts)
                self._make_file(parent_fd, name, member, archive)
            elif member.issym():
                self._replace(parent_fd, name, parts)
                self._make_symlink(parent_fd, name, member)
            elif member.ischr() or member.isblk() or member.isfifo():
                self._replace(parent_fd, name, parts)
                self._make_node(parent_fd, name, member)
            else:
                raise LayerError(f"layer entry {member.name!r} has an unsupported type "
                                 f"{member.type!r}")
        finally:
            os.close(parent_fd)

    def finish(self) -> None:
        """Set directory modes and times, deepest first."""
        for parts in sorted(self._dir_metadata, key=len, reverse=True):
            member = self._dir_metadata[parts]
            try:
                fd = self._open_dir(parts, "/".join(parts), create=False)
            except (UnsafeLayerPath, LayerError):
                continue   # replaced by a later layer
            if fd is None:
                continue   # removed by a later layer
            try:
                os.chmod(fd, stat.S_IMODE(member.mode))
                os.utime(fd, ns=(_mtime_ns(member),) * 2)
            finally:
                os.close(fd)

    # ---- whiteouts ---------------------------------------------------------------------

    def _apply_whiteout(self, parent: tuple[str, ...], marker: str) -> None:
        entry = "/".join((*parent, marker))
        if marker == OPAQUE_MARKER:
            fd = self._open_dir(parent, entry)
            try:
                for child in os.listdir(fd):
                    self._remove_lower(fd, child, (*parent, child))
            finally:
                os.close(fd)
            return
        if marker.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            return   # other AUFS metadata (.wh..wh..plnk): nothing to apply
        victim = marker[len(WHITEOUT_PREFIX):]
        if victim in (".", ".."):
            raise PathEscapesRoot(f"whiteout {entry!r} names {victim!r}")
        if not victim:
            raise LayerError(f"whiteout {entry!r} names no file")
        fd = self._open_dir(parent, entry, create=False)
        if fd is not None:
            try:
                self._remove_lower(fd, victim, (*parent, victim))
            finally:
                os.close(fd)

    def _remove_lower(self, parent_fd: int, name: str, parts: tuple[str, ...]) -> None:
        """Remove what lower layers put at ``parts``, keeping what this layer wrote."""
        if parts in self._written:
            return
        if parts not in self._written_ancestors:
            self._remove(parent_fd, name)
            self._dir_metadata.pop(parts, None)
            return
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        try:
            for child in os.listdir(fd):
                self._remove_lower(fd, child, (*parts, child))
        finally:
            os.close(fd)

    # ---- walking and removing ----------------------------------------------------------

    def _open_dir(self, parts: tuple[str, ...], entry: str, create: bool = True) -> int | None:
        """A new descriptor (the caller closes it) of directory ``parts`` below the root.

        Missing directories are created (mode 0755) when ``create``, else None is returned.
        A symlink on the way raises :class:`PathThroughSymlink`.
        """
        if self._dir_cache and self._dir_cache[0] == parts:
            return os.dup(self._dir_cache[1])
        fd = os.dup(self.root_fd)
        try:
            for depth, part in enumerate(parts):
                try:
                    next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        os.close(fd)
                        return None
                    os.mkdir(part, 0o755, dir_fd=fd)
                    next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    where = "/".join(parts[:depth + 1])
                    if stat.S_ISLNK(os.lstat(part, dir_fd=fd).st_mode):
                        raise PathThroughSymlink(
                            f"layer path {entry!r} goes through the symlink {where!r}") from None
                    raise LayerError(f"layer path {entry!r}: {where!r} is not a directory") from None
                os.close(fd)
                fd = next_fd
        except BaseException:
            os.close(fd)
            raise
        self._drop_dir_cache()
        self._dir_cache = (parts, os.dup(fd))
        return fd

    def _drop_dir_cache(self) -> None:
        if self._dir_cache:
            os.close(self._dir_cache[1])
            self._dir_cache = None

    def _remove(self, parent_fd: int, name: str) -> None:
        try:
            mode = os.lstat(name, dir_fd=parent_fd).st_mode
        except FileNotFoundError:
            return
        if stat.S_ISDIR(mode):
            self._drop_dir_cache()   # it may be this directory or one inside it
            shutil.rmtree(name, dir_fd=parent_fd)
        else:
            os.unlink(name, dir_fd=parent_fd)

    def _replace(self, parent_fd: int, name: str, parts: tuple[str, ...]) -> None:
        """Clear the way for a new non-directory entry at ``parts``."""
        self._remove(parent_fd, name)
        self._dir_metadata.pop(parts, None)

    def _mark_written(self, parts: tuple[str, ...]) -> None:
        self._written.add(parts)
        for depth in range(1, len(parts)):
            self._written_ancestors.add(parts[:depth])

    # ---- making entries ----------------------------------------------------------------

    def _make_dir(self, parent_fd: int, name: str, member: tarfile.TarInfo,
                  parts: tuple[str, ...]) -> None:
        try:
            if not stat.S_ISDIR(os.lstat(name, dir_fd=parent_fd).st_mode):
                self._replace(parent_fd, name, parts)
        except FileNotFoundError:
            pass
        try:
            os.mkdir(name, 0o700, dir_fd=parent_fd)
        except FileExistsError:
            pass   # an existing directory keeps its contents; its metadata is replaced
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        try:
            self._set_owner_and_xattrs(fd, None, member)
        finally:
            os.close(fd)
        self._dir_metadata[parts] = member

    def _make_file(self, parent_fd: int, name: str, member: tarfile.TarInfo,
                   archive: tarfile.TarFile) -> None:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=parent_fd)
        try:
            source = archive.extractfile(member)
            while chunk := source.read(_COPY_CHUNK):
                _write_all(fd, chunk)
            self._set_owner_and_xattrs(fd, None, member)
            os.chmod(fd, stat.S_IMODE(member.mode))   # after chown, which clears setuid
            os.utime(fd, ns=(_mtime_ns(member),) * 2)
        finally:
            os.close(fd)

    def _make_symlink(self, parent_fd: int, name: str, member: tarfile.TarInfo) -> None:
        if "\0" in member.linkname:
            raise LayerError(f"symlink {member.name!r} has a NUL byte in its target")
        os.symlink(member.linkname, name, dir_fd=parent_fd)
        self._set_owner_and_xattrs(parent_fd, name, member)
        os.utime(name, ns=(_mtime_ns(member),) * 2, dir_fd=parent_fd, follow_symlinks=False)

    def _make_node(self, parent_fd: int, name: str, member: tarfile.TarInfo) -> None:
        kind = (stat.S_IFIFO if member.isfifo() else
                stat.S_IFCHR if member.ischr() else stat.S_IFBLK)
        device = 0 if member.isfifo() else os.makedev(member.devmajor, member.devminor)
        try:
            os.mknod(name, kind | 0o600, device, dir_fd=parent_fd)
        except OSError:
            # Not root, or a file system without them (9p, nodev). The guest mounts
            # devtmpfs on /dev, where images keep theirs.
            self.report.skipped_devices += 1
            return
        self._set_owner_and_xattrs(parent_fd, name, member)
        os.chmod(name, stat.S_IMODE(member.mode), dir_fd=parent_fd)
        os.utime(name, ns=(_mtime_ns(member),) * 2, dir_fd=parent_fd, follow_symlinks=False)

    def _make_hard_link(self, parent_fd: int, name: str, member: tarfile.TarInfo,
                        parts: tuple[str, ...]) -> None:
        target = tuple(split_path(member.linkname))
        if not target:
            raise LayerError(f"hard link {member.name!r} points at the root directory")
        missing = LayerError(f"hard link {member.name!r} points at {member.linkname!r}, "
                             "which no layer has created")
        target_fd = self._open_dir(target[:-1], member.linkname, create=False)
        if target_fd is None:
            raise missing
        try:
            try:
                target_stat = os.lstat(target[-1], dir_fd=target_fd)
            except FileNotFoundError:
                raise missing from None
            if stat.S_ISDIR(target_stat.st_mode):
                raise LayerError(f"hard link {member.name!r} points at a directory")
            try:
                existing = os.lstat(name, dir_fd=parent_fd)
                if (existing.st_dev, existing.st_ino) == (target_stat.st_dev, target_stat.st_ino):
                    return
            except FileNotFoundError:
                pass
            self._replace(parent_fd, name, parts)
            os.link(target[-1], name, src_dir_fd=target_fd, dst_dir_fd=parent_fd,
                    follow_symlinks=False)
        finally:
            os.close(target_fd)

    def _set_owner_and_xattrs(self, fd: int, name: str | None, member: tarfile.TarInfo) -> None:
        """Owner and xattrs of the open file ``fd``, or of ``name`` in directory ``fd``
        (symlinks and device nodes, which must not be opened)."""
        if self.privileged:
            if name is None:
                os.chown(fd, member.uid, member.gid)
            else:
                os.chown(name, member.uid, member.gid, dir_fd=fd, follow_symlinks=False)
        elif (member.uid, member.gid) != (os.getuid(), os.getgid()):
            self.report.skipped_owners += 1
        for key, value in member.pax_headers.items():
            if not key.startswith(PAX_XATTR_PREFIX):
                continue
            attribute = key[len(PAX_XATTR_PREFIX):]
            if attribute.startswith(FORBIDDEN_XATTR_PREFIX):
                continue
            data = value.encode("utf-8", "surrogateescape")
            try:
                if name is None:
                    os.setxattr(fd, attribute, data)
                else:
                    os.setxattr(f"/proc/self/fd/{fd}/{name}", attribute, data,
                                follow_symlinks=False)
            except OSError:
                self.report.skipped_xattrs += 1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _mtime_ns(member: tarfile.TarInfo) -> int:
    return int(member.mtime * 1_000_000_000)
