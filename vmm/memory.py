"""Guest RAM: host mappings addressed by guest physical address (GPA).

Devices and loaders see guest addresses and this bounds-checked interface,
never the mmap itself. Every access is checked against the regions before
any byte moves, so an address the guest made up raises
:class:`GuestMemoryError` instead of touching host memory.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from dataclasses import dataclass, field


class GuestMemoryError(Exception):
    """A guest physical range is not (wholly) inside one RAM region."""


@dataclass
class Region:
    """One contiguous block of guest RAM backed by an anonymous host mapping."""

    gpa: int
    size: int
    _map: mmap.mmap = field(repr=False)
    host_address: int = field(repr=False)

    @property
    def end(self) -> int:
        return self.gpa + self.size


def _map_anonymous(size: int) -> tuple[mmap.mmap, int]:
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
    mapping = mmap.mmap(-1, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    anchor = ctypes.c_char.from_buffer(mapping)
    address = ctypes.addressof(anchor)
    del anchor  # release the buffer export so the map can be closed later
    return mapping, address


class GuestMemory:
    """Guest RAM made of non-overlapping regions, each page-aligned."""

    def __init__(self, layout: list[tuple[int, int]]):
        """``layout`` is a list of ``(gpa, size)`` pairs."""
        self.regions: list[Region] = []
        for gpa, size in sorted(layout):
            if gpa % mmap.PAGESIZE or size % mmap.PAGESIZE or size <= 0:
                raise ValueError(f"region {gpa:#x}+{size:#x} is not page aligned")
            if self.regions and gpa < self.regions[-1].end:
                raise ValueError(f"region {gpa:#x}+{size:#x} overlaps another")
            mapping, address = _map_anonymous(size)
            self.regions.append(Region(gpa, size, mapping, address))

    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    def _locate(self, gpa: int, length: int) -> tuple[Region, int]:
        if length < 0 or gpa < 0:
            raise GuestMemoryError(f"bad guest range {gpa:#x}+{length:#x}")
        for region in self.regions:
            if region.gpa <= gpa < region.end or (length == 0 and gpa == region.end):
                if gpa + length > region.end:
                    break
                return region, gpa - region.gpa
        raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is outside guest RAM")

    def contains(self, gpa: int, length: int) -> bool:
        try:
            self._locate(gpa, length)
        except GuestMemoryError:
            return False
        return True

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable zero-copy view of ``length`` bytes at ``gpa``."""
        region, offset = self._locate(gpa, length)
        return memoryview(region._map)[offset : offset + length]

    def read(self, gpa: int, length: int) -> bytes:
        region, offset = self._locate(gpa, length)
        return region._map[offset : offset + length]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        region, offset = self._locate(gpa, len(data))
        region._map[offset : offset + len(data)] = data

    def read_int(self, gpa: int, size: int) -> int:
        return int.from_bytes(self.read(gpa, size), "little")

    def write_int(self, gpa: int, size: int, value: int) -> None:
        self.write(gpa, value.to_bytes(size, "little"))

    def unpack(self, fmt: str, gpa: int) -> tuple:
        return struct.unpack(fmt, self.read(gpa, struct.calcsize(fmt)))

    def discard(self, gpa: int, length: int) -> None:
        """Give the host pages of a page-aligned range back (the balloon's job): they
        leave the VMM's RSS and read as zeros, or as the snapshot file under a
        copy-on-write mapping, until the guest writes them again."""
        if gpa % mmap.PAGESIZE or length % mmap.PAGESIZE:
            raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is not page aligned")
        region, offset = self._locate(gpa, length)
        if length:
            region._map.madvise(mmap.MADV_DONTNEED, offset, length)

    def close(self) -> None:
        for region in self.regions:
            region._map.close()
        self.regions = []
