"""A snapshot's memory file: guest RAM as one sparse file, regions back to back at
their :attr:`Region.offset`, so it can be mapped copy-on-write on restore.

Pages are handled as a *page set*: one byte per guest page (all regions in order),
non-zero for a page that is in the file. A full snapshot writes every non-zero page
and leaves zero pages as holes; a diff writes the pages of its set, a zero one
included as a hole — the set, not the holes, says which pages a layer holds.
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Iterator

from vmm.memory import PAGE_SIZE, GuestMemory, Region

CHUNK_PAGES = 256                      # zero-detection and write granularity: 1 MiB
_ZERO_CHUNK = bytes(CHUNK_PAGES * PAGE_SIZE)
_ZERO_PAGE = bytes(PAGE_SIZE)
_RUN = re.compile(rb"[^\x00]+")
# Byte b of a KVM dirty bitmap (little-endian bits) → 8 page-set bytes.
_BITS_TO_PAGES = [bytes((b >> bit) & 1 for bit in range(8)) for b in range(256)]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)


def page_count(memory: GuestMemory) -> int:
    return memory.size // PAGE_SIZE


def runs(pages: bytes | bytearray, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
    """``(first, end)`` page ranges of consecutive non-zero bytes of ``pages``."""
    for match in _RUN.finditer(pages, start, len(pages) if end is None else end):
        yield match.start(), match.end()


def pages_from_dirty_bitmap(bitmap: bytes, count: int) -> bytes:
    """A KVM_GET_DIRTY_LOG bitmap as a page set of ``count`` pages (work in proportion to
    the dirty part: most of a bitmap is zero)."""
    pages = bytearray(max(count, len(bitmap) * 8))
    for first, end in runs(bitmap):
        pages[first * 8:end * 8] = b"".join(_BITS_TO_PAGES[b] for b in bitmap[first:end])
    return bytes(pages[:count])


def union(a: bytes, b: bytes) -> bytes:
    """Pages in either of two page sets of 0/1 bytes."""
    return (int.from_bytes(a, "little") | int.from_bytes(b, "little")).to_bytes(len(a), "little")


def _resident(region: Region) -> bytes:
    """One byte per page of ``region``: non-zero if it may hold data (mincore); pages
    never touched in an anonymous mapping read as zero and are skipped."""
    vector = ctypes.create_string_buffer(region.size // PAGE_SIZE)
    if _libc.mincore(region.host_address, region.size, vector) != 0:
        return b"\x01" * (region.size // PAGE_SIZE)   # cannot tell: look at every page
    return bytes(ctypes.string_at(vector, region.size // PAGE_SIZE))


def _pwrite_all(fd: int, data: memoryview, offset: int) -> int:
    # Every slice of guest RAM is released on the way out, also when a write fails:
    # an exception's traceback would otherwise keep the mapping from being closed.
    done = 0
    while done < len(data):
        with data[done:] as rest:
            done += os.pwrite(fd, rest, offset + done)
    return done


def _write_run(fd: int, region: Region, first: int, end: int) -> int:
    """Write pages ``[first, end)`` of ``region``, skipping zero ones; bytes written."""
    written = 0
    with memoryview(region._map) as view:
        for chunk_start in range(first, end, CHUNK_PAGES):
            chunk_end = min(chunk_start + CHUNK_PAGES, end)
            data = region._map[chunk_start * PAGE_SIZE:chunk_end * PAGE_SIZE]
            if data == _ZERO_CHUNK[:len(data)]:
                continue
            page = 0
            pages = chunk_end - chunk_start
            while page < pages:
                if data[page * PAGE_SIZE:(page + 1) * PAGE_SIZE] == _ZERO_PAGE:
                    page += 1
                    continue
                run_end = page + 1
                while run_end < pages and data[run_end * PAGE_SIZE:(run_end + 1) * PAGE_SIZE] != _ZERO_PAGE:
                    run_end += 1
                start = (chunk_start + page) * PAGE_SIZE
                length = (run_end - page) * PAGE_SIZE
                with view[start:start + length] as run:
                    written += _pwrite_all(fd, run, region.offset + start)
                page = run_end
    return written


def write_full(memory: GuestMemory, fd: int) -> int:
    """Every non-zero page of guest RAM into ``fd`` (sized and sparse); bytes written."""
    os.ftruncate(fd, memory.size)
    written = 0
    for region in memory.regions:
        for first, end in runs(_resident(region)):
            written += _write_run(fd, region, first, end)
    return written


def write_pages(memory: GuestMemory, fd: int, pages: bytes) -> int:
    """The pages of ``pages`` into ``fd`` (sized and sparse; zero pages stay holes)."""
    os.ftruncate(fd, memory.size)
    written = 0
    for region in memory.regions:
        base = region.offset // PAGE_SIZE
        for first, end in runs(pages, base, base + region.size // PAGE_SIZE):
            written += _write_run(fd, region, first - base, end - base)
    return written


def read_pages(memory: GuestMemory, fd: int, pages: bytes) -> None:
    """Load the pages of ``pages`` from ``fd`` over guest RAM (a diff layer on its base)."""
    for region in memory.regions:
        base = region.offset // PAGE_SIZE
        with memoryview(region._map) as view:
            for first, end in runs(pages, base, base + region.size // PAGE_SIZE):
                start, stop = (first - base) * PAGE_SIZE, (end - base) * PAGE_SIZE
                while start < stop:
                    with view[start:stop] as run:
                        got = os.preadv(fd, [run], region.offset + start)
                    if got <= 0:
                        raise EOFError(f"memory file ends at {region.offset + start:#x}")
                    start += got
