"""A writer for cpio "newc" archives, the format of a Linux initramfs.

Every entry gets uid/gid 0 and mtime 0 and inode numbers in write order, so the
same entries always give the same bytes. Parent directories are added on
demand (the kernel's unpacker needs a directory before its contents). See the
kernel's Documentation/driver-api/early-userspace/buffer-format.rst.
"""

from __future__ import annotations

import gzip
import stat
from typing import BinaryIO

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"
_FIELD_MAX = 0xFFFFFFFF   # every header field is 8 hex digits


class CpioError(Exception):
    """An entry cannot be written (bad path, duplicate, too large)."""


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


class CpioWriter:
    """Write entries to ``out``; :meth:`close` appends the trailer (the file object stays open)."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._next_ino = 1
        self._types: dict[str, int] = {}   # archive path -> stat file type
        self._closed = False

    def __enter__(self) -> CpioWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        self._add(path, stat.S_IFDIR, mode, b"", nlink=2)

    def add_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self._add(path, stat.S_IFREG, mode, data)

    def add_symlink(self, path: str, target: str) -> None:
        if not target:
            raise CpioError(f"symlink {path} has an empty target")
        self._add(path, stat.S_IFLNK, 0o777, target.encode())

    def add_device(self, path: str, kind: str, major: int, minor: int, mode: int = 0o600) -> None:
        """A device node; ``kind`` is ``"c"`` (character) or ``"b"`` (block)."""
        file_type = {"c": stat.S_IFCHR, "b": stat.S_IFBLK}.get(kind)
        if file_type is None:
            raise CpioError(f"device kind must be 'c' or 'b', not {kind!r}")
        self._add(path, file_type, mode, b"", rdev=(major, minor))

    def __contains__(self, path: str) -> bool:
        return _normalize(path) in self._types

    def close(self) -> None:
        if not self._closed:
            self._write_entry(TRAILER, 0, b"", ino=0, nlink=1, rdev=(0, 0))
            self._closed = True

    def _add(self, path: str, file_type: int, permissions: int, data: bytes, nlink: int = 1,
             rdev: tuple[int, int] = (0, 0)) -> None:
        if self._closed:
            raise CpioError("archive already closed")
        name = _normalize(path)
        if name in self._types:
            raise CpioError(f"duplicate entry {name}")
        if not 0 <= permissions <= 0o7777:
            raise CpioError(f"bad permissions {permissions:o} for {name}")
        parent = name.rpartition("/")[0]
        if parent and parent not in self._types:
            self.add_dir(parent)
        if parent and self._types[parent] != stat.S_IFDIR:
            raise CpioError(f"{name}: parent {parent} is not a directory")
        self._types[name] = file_type
        self._write_entry(name, file_type | permissions, data, ino=self._next_ino, nlink=nlink, rdev=rdev)
        self._next_ino += 1

    def _write_entry(self, name: str, mode: int, data: bytes, *, ino: int, nlink: int,
                     rdev: tuple[int, int]) -> None:
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        if any(not 0 <= value <= _FIELD_MAX for value in fields):
            raise CpioError(f"entry {name} does not fit a newc header")
        header = NEWC_MAGIC + b"".join(b"%08X" % value for value in fields)
        self._out.write(header + encoded + _pad4(len(header) + len(encoded)))
        self._out.write(data + _pad4(len(data)))


def _normalize(path: str) -> str:
    """An archive name: relative, ``/``-separated, no empty, ``.`` or ``..`` parts."""
    parts = path.strip("/").split("/")
    if not path.strip("/") or any(part in ("", ".", "..") for part in parts):
        raise CpioError(f"bad archive path {path!r}")
    return "/".join(parts)


def gzip_bytes(data: bytes) -> bytes:
    """gzip with a zero timestamp and no file name, so the output is reproducible."""
    return gzip.compress(data, compresslevel=9, mtime=0)
