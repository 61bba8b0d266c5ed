"""The zero page (``struct boot_params``), the command line and the initramfs in guest RAM.

Documentation/arch/x86/boot.rst ("64-bit boot protocol"): start from a zeroed
``boot_params``, copy the image's setup header into it, then fill in what the
loader decides: loader type, heap, command line, ramdisk, memory map.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from vmm.arch.x86_64 import layout
from vmm.arch.x86_64.bootparam_abi import (
    CAN_USE_HEAP,
    E820_MAX_ENTRIES_ZEROPAGE,
    LOADED_HIGH,
    LOADER_TYPE_UNDEFINED,
    BootParams,
)
from vmm.arch.x86_64.bzimage import LoadedKernel
from vmm.arch.x86_64.e820 import e820_map
from vmm.memory import GuestMemory

# boot.rst: heap_end_ptr is the end of the setup heap minus 0x200, relative to
# the real-mode segment; 0xFE00 is the customary value (a full 64 KiB segment).
HEAP_END_PTR = 0xFE00


class BootParamsError(Exception):
    """The command line or initramfs cannot be handed to this kernel."""


class CommandLineTooLong(BootParamsError):
    pass


class InitrdDoesNotFit(BootParamsError):
    pass


@dataclass(frozen=True)
class BootInfo:
    """Where the boot data went (for the vCPU setup, logs and tests)."""

    zero_page: int
    cmdline_address: int
    initrd_address: int | None
    initrd_size: int


def _split(value: int) -> tuple[int, int]:
    """A 64-bit address as the (low, high) 32-bit halves of a field and its ``ext_`` twin."""
    return value & 0xFFFF_FFFF, value >> 32


def _initrd_address(memory: GuestMemory, kernel: LoadedKernel, size: int) -> int:
    """The highest page-aligned home for ``size`` bytes: below the kernel's limit and the
    end of low RAM, above the kernel."""
    if size == 0:
        raise InitrdDoesNotFit("the initramfs is empty")
    header = kernel.image.header
    low_gpa, low_size = layout.ram_layout(memory.size)[0]
    # initrd_addr_max is the highest address the initrd may *occupy* (inclusive).
    limit = min(header.initrd_addr_max + 1, low_gpa + low_size)
    address = (limit - size) // layout.PAGE_SIZE * layout.PAGE_SIZE
    if address < kernel.end:
        raise InitrdDoesNotFit(
            f"initramfs of {size:#x} bytes does not fit between the kernel "
            f"(ends at {kernel.end:#x}) and {limit:#x}"
        )
    return address


def write_boot_params(
    memory: GuestMemory,
    kernel: LoadedKernel,
    cmdline: str | bytes,
    initrd: bytes | bytearray | memoryview | None = None,
) -> BootInfo:
    """Write the command line, the initramfs and the zero page for ``kernel`` into ``memory``."""
    header = kernel.image.header
    params = BootParams()
    ctypes.memmove(ctypes.addressof(params.hdr), kernel.setup_header, len(kernel.setup_header))

    cmdline_bytes = cmdline.encode() if isinstance(cmdline, str) else bytes(cmdline)
    limit = min(header.cmdline_size, layout.CMDLINE_MAX_SIZE - 1)
    if b"\0" in cmdline_bytes or len(cmdline_bytes) > limit:
        raise CommandLineTooLong(
            f"command line of {len(cmdline_bytes)} bytes (kernel accepts {limit}, no NUL inside)"
        )
    memory.write(layout.CMDLINE_START, cmdline_bytes + b"\0")

    hdr = params.hdr
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED
    hdr.loadflags |= LOADED_HIGH | CAN_USE_HEAP
    hdr.heap_end_ptr = HEAP_END_PTR
    hdr.cmd_line_ptr, params.ext_cmd_line_ptr = _split(layout.CMDLINE_START)

    initrd_address = None
    initrd_size = 0
    if initrd is not None:
        initrd_size = len(initrd)
        initrd_address = _initrd_address(memory, kernel, initrd_size)
        memory.write(initrd_address, initrd)
        hdr.ramdisk_image, params.ext_ramdisk_image = _split(initrd_address)
        hdr.ramdisk_size, params.ext_ramdisk_size = _split(initrd_size)

    params.acpi_rsdp_addr = layout.ACPI_RSDP_START
    entries = e820_map(memory.size)
    assert len(entries) <= E820_MAX_ENTRIES_ZEROPAGE
    for slot, entry in zip(params.e820_table, entries):
        slot.addr, slot.size, slot.type = entry
    params.e820_entries = len(entries)

    memory.write(layout.ZERO_PAGE_START, bytes(params))
    return BootInfo(layout.ZERO_PAGE_START, layout.CMDLINE_START, initrd_address, initrd_size)
