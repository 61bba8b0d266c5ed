"""Just enough of ELF64 to read a kernel module's ``.modinfo`` and to tell a static binary.

The bytes come from files we did not build (a kernel package, a user's module
tree, the host's busybox), so every offset is checked and a malformed file
raises :class:`ElfError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB, ELFDATA2MSB = 1, 2
EM_X86_64 = 62
PT_INTERP = 3

# Elf64_Ehdr after e_ident: type, machine, version, entry, phoff, shoff, flags,
# ehsize, phentsize, phnum, shentsize, shnum, shstrndx.
_EHDR = "HHIQQQIHHHHHH"
_SHDR = "IIQQQQIIQQ"   # name, type, flags, addr, offset, size, link, info, addralign, entsize
_PHDR = "IIQQQQQQ"     # type, flags, offset, vaddr, paddr, filesz, memsz, align


class ElfError(Exception):
    """The bytes are not a well-formed ELF64 file."""


@dataclass(frozen=True)
class Section:
    name: str
    offset: int
    size: int


class Elf64:
    """A parsed ELF64 image held in memory."""

    def __init__(self, data: bytes) -> None:
        if len(data) < 64 or data[:4] != ELF_MAGIC:
            raise ElfError("not an ELF file")
        if data[4] != ELFCLASS64:
            raise ElfError("not a 64-bit ELF file")
        if data[5] not in (ELFDATA2LSB, ELFDATA2MSB):
            raise ElfError(f"unknown ELF byte order {data[5]}")
        self._data = data
        self._endian = "<" if data[5] == ELFDATA2LSB else ">"
        (_, self.machine, _, _, self._phoff, self._shoff, _, _,
         self._phentsize, self._phnum, self._shentsize, self._shnum,
         self._shstrndx) = self._unpack(_EHDR, 16)

    def _unpack(self, fmt: str, offset: int) -> tuple:
        fmt = self._endian + fmt
        if offset < 0 or offset + struct.calcsize(fmt) > len(self._data):
            raise ElfError(f"structure at offset {offset:#x} runs past the end of the file")
        return struct.unpack_from(fmt, self._data, offset)

    def _table(self, offset: int, entsize: int, count: int, fmt: str) -> list[tuple]:
        if count and entsize < struct.calcsize(fmt):
            raise ElfError(f"table entry size {entsize} too small")
        return [self._unpack(fmt, offset + i * entsize) for i in range(count)]

    def _bytes(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0 or offset + size > len(self._data):
            raise ElfError(f"range {offset:#x}+{size:#x} runs past the end of the file")
        return self._data[offset:offset + size]

    def sections(self) -> list[Section]:
        headers = self._table(self._shoff, self._shentsize, self._shnum, _SHDR)
        if not headers:
            return []
        if self._shstrndx >= len(headers):
            raise ElfError("section name table index out of range")
        names = self._bytes(headers[self._shstrndx][4], headers[self._shstrndx][5])
        result = []
        for name_off, _, _, _, offset, size, *_ in headers:
            end = names.find(b"\0", name_off)
            if name_off >= len(names) or end < 0:
                raise ElfError("section name outside the name table")
            result.append(Section(names[name_off:end].decode("ascii", "replace"), offset, size))
        return result

    def section_data(self, name: str) -> bytes | None:
        for section in self.sections():
            if section.name == name:
                return self._bytes(section.offset, section.size)
        return None

    def has_interpreter(self) -> bool:
        """True for a dynamically linked executable (it names a program loader)."""
        headers = self._table(self._phoff, self._phentsize, self._phnum, _PHDR)
        return any(header[0] == PT_INTERP for header in headers)
