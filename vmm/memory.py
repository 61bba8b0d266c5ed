"""Guest RAM: host mappings addressed by guest physical address (GPA).

Devices and loaders see guest addresses and this bounds-checked interface,
never the mmap itself. Every access is checked against the regions before
any byte moves, so an address the guest made up raises
:class:`GuestMemoryError` instead of touching host memory.

RAM is anonymous memory, or a snapshot's memory file mapped copy-on-write
(``MAP_PRIVATE``): pages load lazily and writes stay in this process (ranges the balloon
gives back become anonymous zero pages). For diff
snapshots the host's own writes (devices filling buffers) are tracked here,
page by page, since KVM's dirty log sees only the guest's.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from dataclasses import dataclass, field


class GuestMemoryError(Exception):
    """A guest physical range is not (wholly) inside one RAM region."""


PAGE_SIZE = mmap.PAGESIZE


@dataclass
class Region:
    """One contiguous block of guest RAM. ``offset`` is where it starts in the flat
    page numbering (and in a snapshot's memory file): regions follow each other."""

    gpa: int
    size: int
    offset: int
    _map: mmap.mmap = field(repr=False)
    host_address: int = field(repr=False)
    dirty: bytearray | None = field(default=None, repr=False)   # one byte per page
    file_backed: bool = False       # a snapshot's memory file, mapped copy-on-write

    @property
    def end(self) -> int:
        return self.gpa + self.size


def _map(size: int, backing: int, offset: int) -> tuple[mmap.mmap, int]:
    flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_NORESERVE", 0)
    if backing < 0:
        flags |= mmap.MAP_ANONYMOUS
    mapping = mmap.mmap(backing, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                        offset=offset if backing >= 0 else 0)
    anchor = ctypes.c_char.from_buffer(mapping)
    address = ctypes.addressof(anchor)
    del anchor  # release the buffer export so the map can be closed later
    return mapping, address


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_MAP_FIXED = 0x10
_MAP_FAILED = ctypes.c_void_p(-1).value


def _map_zeros(address: int, length: int) -> bool:
    """Replace ``length`` bytes of our own mapping at ``address`` with anonymous zero pages;
    False if the kernel refused (too many mappings, say: the caller falls back)."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED | getattr(mmap, "MAP_NORESERVE", 0)
    result = _libc.mmap(address, length, mmap.PROT_READ | mmap.PROT_WRITE, flags, -1, 0)
    return result not in (None, _MAP_FAILED) and result == address


class GuestMemory:
    """Guest RAM made of non-overlapping regions, each page-aligned."""

    def __init__(self, layout: list[tuple[int, int]], backing: int = -1):
        """``layout`` is a list of ``(gpa, size)`` pairs; ``backing`` an open memory file
        (regions back to back, mapped copy-on-write) or -1 for fresh zeroed RAM."""
        self.regions: list[Region] = []
        offset = 0
        for gpa, size in sorted(layout):
            if gpa % PAGE_SIZE or size % PAGE_SIZE or size <= 0:
                raise ValueError(f"region {gpa:#x}+{size:#x} is not page aligned")
            if self.regions and gpa < self.regions[-1].end:
                raise ValueError(f"region {gpa:#x}+{size:#x} overlaps another")
            mapping, address = _map(size, backing, offset)
            self.regions.append(Region(gpa, size, offset, mapping, address,
                                       file_backed=backing >= 0))
            offset += size

    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    @property
    def layout(self) -> list[tuple[int, int]]:
        return [(r.gpa, r.size) for r in self.regions]

    # ---- host writes, for diff snapshots ------------------------------------------------

    def track_host_writes(self) -> None:
        """From now on remember which pages the host writes (or hands out views of)."""
        for region in self.regions:
            region.dirty = bytearray(region.size // PAGE_SIZE)

    def take_host_writes(self) -> bytes:
        """One byte per page (all regions in order), non-zero where the host wrote since
        the last call; starts over."""
        pages = []
        for region in self.regions:
            pages.append(bytes(region.dirty) if region.dirty is not None
                         else bytes(region.size // PAGE_SIZE))
            if region.dirty is not None:
                region.dirty = bytearray(len(region.dirty))
        return b"".join(pages)

    @staticmethod
    def _mark(region: Region, offset: int, length: int) -> None:
        if length:
            first, last = offset // PAGE_SIZE, (offset + length - 1) // PAGE_SIZE
            if first == last:
                region.dirty[first] = 1
            else:
                region.dirty[first:last + 1] = b"\x01" * (last + 1 - first)

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
        if region.dirty is not None:
            self._mark(region, offset, length)
        return memoryview(region._map)[offset : offset + length]

    def read(self, gpa: int, length: int) -> bytes:
        region, offset = self._locate(gpa, length)
        return region._map[offset : offset + length]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        region, offset = self._locate(gpa, len(data))
        if region.dirty is not None:
            self._mark(region, offset, len(data))
        region._map[offset : offset + len(data)] = data

    def read_int(self, gpa: int, size: int) -> int:
        return int.from_bytes(self.read(gpa, size), "little")

    def write_int(self, gpa: int, size: int, value: int) -> None:
        self.write(gpa, value.to_bytes(size, "little"))

    def unpack(self, fmt: str, gpa: int) -> tuple:
        return struct.unpack(fmt, self.read(gpa, struct.calcsize(fmt)))

    def discard(self, gpa: int, length: int) -> None:
        """Give the host pages of a page-aligned range back (the balloon's job): they leave
        the VMM's RSS and read as zeros until the guest writes them again, so the next
        snapshot has holes there. Under a copy-on-write mapping of a snapshot file, dropping
        the pages (``MADV_DONTNEED``) would bring the file's back: the range is mapped over
        with fresh anonymous memory instead (KVM follows through its MMU notifier)."""
        if gpa % PAGE_SIZE or length % PAGE_SIZE:
            raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is not page aligned")
        region, offset = self._locate(gpa, length)
        if not length:
            return
        if not (region.file_backed and _map_zeros(region.host_address + offset, length)):
            region._map.madvise(mmap.MADV_DONTNEED, offset, length)
        if region.dirty is not None:   # changed behind KVM's dirty log, like a device write
            self._mark(region, offset, length)

    def close(self) -> None:
        for region in self.regions:
            region._map.close()
        self.regions = []
