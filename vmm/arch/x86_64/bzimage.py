"""Loading a bzImage for the Linux x86 64-bit boot protocol.

Documentation/arch/x86/boot.rst: the image starts with the real-mode setup
code (``setup_sects`` 512-byte sectors after the boot sector), whose setup
header at 0x1F1 describes the kernel; the protected-mode kernel follows. For
the 64-bit entry we skip the real-mode code entirely: copy the protected-mode
part to ``HIGH_MEMORY_START`` and jump to its start + 0x200 in long mode with
``rsi`` pointing at the zero page (protocol >= 2.12 with ``XLF_KERNEL_64``).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from vmm.arch.x86_64 import layout
from vmm.arch.x86_64.bootparam_abi import (
    BOOT_FLAG_MAGIC,
    SETUP_HEADER_MAGIC,
    SETUP_HEADER_OFFSET,
    XLF_KERNEL_64,
    SetupHeader,
)
from vmm.memory import GuestMemory

SECTOR_SIZE = 512
MIN_BOOT_PROTOCOL = 0x020C          # 2.12: xloadflags, and with it XLF_KERNEL_64
ENTRY_64_OFFSET = 0x200             # boot.rst: 64-bit entry = protected-mode start + 0x200
DEFAULT_SETUP_SECTS = 4             # boot.rst: setup_sects == 0 means 4
# boot.rst: the setup header ends at 0x202 + the byte at 0x201 (the jump's displacement).
_JUMP_DISPLACEMENT_OFFSET = 0x201
_HEADER_END_BASE = 0x202
_MAGIC_OFFSET = SETUP_HEADER_OFFSET + SetupHeader.header.offset
# Enough of the file to hold the boot sector and any setup header.
_HEAD_SIZE = SETUP_HEADER_OFFSET + ctypes.sizeof(SetupHeader)


class BzImageError(Exception):
    """A kernel image cannot be booted."""


class NotABzImage(BzImageError):
    """The file is not a (well-formed) bzImage."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{os.fspath(path)} is not a Linux bzImage ({reason}); pass a kernel "
                         "such as /boot/vmlinuz-*")


class UnsupportedBootProtocol(BzImageError):
    """A bzImage too old for the 64-bit boot protocol."""


class KernelDoesNotFit(BzImageError):
    """Guest RAM is too small for the kernel (its image or its decompression buffer)."""


@dataclass(frozen=True)
class BzImage:
    """What the setup header of a bzImage says, plus where its kernel is in the file."""

    path: str
    header: SetupHeader
    header_bytes: bytes          # the setup header as the image has it (up to its own end)
    kernel_offset: int           # file offset of the protected-mode kernel
    kernel_size: int             # bytes of protected-mode kernel in the file

    @property
    def version(self) -> int:
        return self.header.version

    @property
    def relocatable(self) -> bool:
        return bool(self.header.relocatable_kernel)


@dataclass(frozen=True)
class LoadedKernel:
    """A kernel copied into guest RAM: where it is, where to enter it, what it needs."""

    image: BzImage
    load_address: int
    entry_point: int             # 64-bit entry (rip)
    end: int                     # first byte above the image and its decompression buffer

    @property
    def setup_header(self) -> bytes:
        return self.image.header_bytes


def parse_bzimage(path: str | os.PathLike) -> BzImage:
    """Read and check the setup header of the bzImage at ``path``."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD_SIZE)
            file_size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise NotABzImage(path, f"cannot read: {e.strerror}") from e
    if len(head) < _HEAD_SIZE:
        raise NotABzImage(path, f"only {len(head)} bytes, too short for a setup header")

    header = SetupHeader.from_buffer_copy(head, SETUP_HEADER_OFFSET)
    if header.header.to_bytes(4, "little") != SETUP_HEADER_MAGIC:
        raise NotABzImage(path, f"no {SETUP_HEADER_MAGIC.decode()!r} magic at {_MAGIC_OFFSET:#x}")
    if header.boot_flag != BOOT_FLAG_MAGIC:
        raise NotABzImage(path, f"boot_flag is {header.boot_flag:#x}, not {BOOT_FLAG_MAGIC:#x}")
    if header.version < MIN_BOOT_PROTOCOL:
        raise UnsupportedBootProtocol(
            f"{path}: boot protocol {header.version >> 8}.{header.version & 0xFF}, "
            f"the 64-bit entry needs >= {MIN_BOOT_PROTOCOL >> 8}.{MIN_BOOT_PROTOCOL & 0xFF}"
        )
    if not header.xloadflags & XLF_KERNEL_64:
        raise UnsupportedBootProtocol(f"{path}: no 64-bit entry point (XLF_KERNEL_64 clear)")

    header_end = _HEADER_END_BASE + head[_JUMP_DISPLACEMENT_OFFSET]
    header_bytes = head[SETUP_HEADER_OFFSET:min(header_end, _HEAD_SIZE)]

    setup_sects = header.setup_sects or DEFAULT_SETUP_SECTS
    kernel_offset = (setup_sects + 1) * SECTOR_SIZE
    kernel_size = file_size - kernel_offset
    if kernel_size <= 0 or header.syssize * 16 > kernel_size:
        raise NotABzImage(
            path,
            f"truncated: {header.syssize * 16:#x} bytes of kernel announced at "
            f"{kernel_offset:#x}, file is {file_size:#x} bytes",
        )
    return BzImage(path, header, header_bytes, kernel_offset, kernel_size)


def decompression_buffer(header: SetupHeader, load_address: int) -> tuple[int, int]:
    """Where the kernel decompresses itself: ``(start, size)``.

    arch/x86/boot/compressed/head_64.S: a relocatable kernel uses its load
    address rounded up to ``kernel_alignment``, but never below its preferred
    address (LOAD_PHYSICAL_ADDR); a fixed one always uses the preferred address.
    It needs ``init_size`` bytes from there.
    """
    start = header.pref_address
    if header.relocatable_kernel:
        alignment = header.kernel_alignment or 1
        aligned = -(-load_address // alignment) * alignment
        start = max(aligned, header.pref_address)
    return start, header.init_size


def load_kernel(memory: GuestMemory, path: str | os.PathLike) -> LoadedKernel:
    """Copy the protected-mode kernel of the bzImage at ``path`` to ``HIGH_MEMORY_START``."""
    image = parse_bzimage(path)
    load_address = layout.HIGH_MEMORY_START
    if not memory.contains(load_address, image.kernel_size):
        raise KernelDoesNotFit(
            f"{image.path}: {image.kernel_size:#x} bytes of kernel at {load_address:#x} "
            f"do not fit in guest RAM"
        )
    buffer_start, buffer_size = decompression_buffer(image.header, load_address)
    if not memory.contains(buffer_start, buffer_size):
        raise KernelDoesNotFit(
            f"{image.path}: the kernel decompresses into {buffer_start:#x}+{buffer_size:#x}, "
            f"which is not inside guest RAM"
        )

    target = memory.view(load_address, image.kernel_size)
    with open(image.path, "rb") as f:
        f.seek(image.kernel_offset)
        copied = f.readinto(target)
    if copied != image.kernel_size:
        raise NotABzImage(image.path, "file shrank while it was being loaded")

    end = max(load_address + image.kernel_size, buffer_start + buffer_size)
    return LoadedKernel(image, load_address, load_address + ENTRY_64_OFFSET, end)
