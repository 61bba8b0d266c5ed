"""The zero page, command line, initramfs placement and e820 map."""

from __future__ import annotations

import ctypes
import shutil
import struct
import subprocess

import pytest

from tests.unit.boot_images import make_bzimage
from vmm.arch.x86_64 import layout
from vmm.arch.x86_64.bootparam_abi import BootParams, SetupHeader
from vmm.arch.x86_64.bootparams import (
    CommandLineTooLong,
    InitrdDoesNotFit,
    write_boot_params,
)
from vmm.arch.x86_64.bzimage import load_kernel
from vmm.arch.x86_64.e820 import E820_RAM, E820_RESERVED, E820Entry, e820_map
from vmm.memory import GuestMemory

MIB = layout.MIB
GIB = layout.GIB
ZP = layout.ZERO_PAGE_START


def _c_offsets_program() -> str:
    lines = ["#include <stddef.h>", "#include <stdio.h>", "#include <asm/bootparam.h>", "int main(void) {"]
    for struct_name, cls in (("setup_header", SetupHeader), ("boot_params", BootParams)):
        lines.append(f'printf("{struct_name} sizeof %zu\\n", sizeof(struct {struct_name}));')
        for field, *_ in cls._fields_:
            lines.append(
                f'printf("{struct_name} {field} %zu\\n", offsetof(struct {struct_name}, {field}));'
            )
    lines += ["return 0;", "}"]
    return "\n".join(lines)


def test_struct_layout_matches_kernel_header(tmp_path):
    """Every field offset of our ctypes mirror equals the one in <asm/bootparam.h>."""
    cc = shutil.which("cc") or shutil.which("gcc")
    assert cc, "a C compiler is needed to check bootparam.h offsets (apt-get install gcc)"
    source = tmp_path / "offsets.c"
    source.write_text(_c_offsets_program())
    build = subprocess.run([cc, str(source), "-o", str(tmp_path / "offsets")], capture_output=True, text=True)
    assert build.returncode == 0, f"cannot compile against <asm/bootparam.h> (linux-libc-dev):\n{build.stderr}"
    output = subprocess.run([str(tmp_path / "offsets")], capture_output=True, text=True, check=True).stdout
    ours = {"setup_header": SetupHeader, "boot_params": BootParams}
    for line in output.splitlines():
        struct_name, field, value = line.split()
        cls = ours[struct_name]
        actual = ctypes.sizeof(cls) if field == "sizeof" else getattr(cls, field).offset
        assert actual == int(value), f"{struct_name}.{field}: ours {actual:#x}, header {int(value):#x}"


# --- e820 ---------------------------------------------------------------------

def test_e820_512_mib():
    assert e820_map(512 * MIB) == [
        E820Entry(0, 0x9FC00, E820_RAM),
        E820Entry(0x9FC00, 0x100000 - 0x9FC00, E820_RESERVED),
        E820Entry(0x100000, 512 * MIB - 0x100000, E820_RAM),
    ]


def test_e820_5_gib_skips_the_mmio_gap():
    entries = e820_map(5 * GIB)
    assert entries[2] == E820Entry(0x100000, 3 * GIB - 0x100000, E820_RAM)
    assert entries[3] == E820Entry(4 * GIB, 2 * GIB, E820_RAM)
    assert len(entries) == 4
    assert sum(e.size for e in entries if e.type == E820_RAM) == 5 * GIB - (0x100000 - 0x9FC00)


def test_e820_covers_the_acpi_tables_with_a_reserved_range():
    reserved = [e for e in e820_map(512 * MIB) if e.type == E820_RESERVED]
    assert any(e.addr <= layout.ACPI_RSDP_START and layout.HIGH_MEMORY_START <= e.end for e in reserved)


def test_e820_needs_more_than_1_mib():
    with pytest.raises(ValueError):
        e820_map(MIB)


# --- the zero page --------------------------------------------------------------

@pytest.fixture
def synthetic_kernel(tmp_path):
    """A small bzImage loaded into 512 MiB of guest RAM."""
    path = tmp_path / "vmlinuz"
    path.write_bytes(make_bzimage(b"\x90" * 0x8000, cmdline_size=64))
    mem = GuestMemory(layout.ram_layout(512 * MIB))
    yield mem, load_kernel(mem, path)
    mem.close()


def u8(mem, offset):
    return mem.read_int(ZP + offset, 1)


def u16(mem, offset):
    return mem.read_int(ZP + offset, 2)


def u32(mem, offset):
    return mem.read_int(ZP + offset, 4)


def u64(mem, offset):
    return mem.read_int(ZP + offset, 8)


def test_zero_page_fields_at_bootparam_h_offsets(synthetic_kernel):
    mem, kernel = synthetic_kernel
    mem.write(ZP, b"\xAA" * 4096)  # stale bytes must not survive
    initrd = bytes(range(256)) * 40
    info = write_boot_params(mem, kernel, "console=ttyS0 panic=-1", initrd)

    # Offsets below are the comments of bootparam.h / the table of boot.rst.
    assert mem.read(ZP + 0x202, 4) == b"HdrS"
    assert u16(mem, 0x1FE) == 0xAA55                       # boot_flag, copied from the image
    assert u8(mem, 0x210) == 0xFF                          # type_of_loader
    assert u8(mem, 0x211) & 0x81 == 0x81                   # loadflags: LOADED_HIGH | CAN_USE_HEAP
    assert u16(mem, 0x224) == 0xFE00                       # heap_end_ptr
    assert u32(mem, 0x228) == layout.CMDLINE_START         # cmd_line_ptr
    assert u32(mem, 0x0C8) == 0                            # ext_cmd_line_ptr
    assert u32(mem, 0x218) == info.initrd_address          # ramdisk_image
    assert u32(mem, 0x21C) == len(initrd)                  # ramdisk_size
    assert u32(mem, 0x0C0) == 0 and u32(mem, 0x0C4) == 0   # ext_ramdisk_image / _size
    assert u64(mem, 0x070) == layout.ACPI_RSDP_START       # acpi_rsdp_addr
    assert u8(mem, 0x1EF) == 0                             # sentinel: zero, we built a clean page
    assert u8(mem, 0x1E8) == 3                             # e820_entries
    table = [struct.unpack_from("<QQI", mem.read(ZP + 0x2D0 + 20 * i, 20)) for i in range(3)]
    assert table == [tuple(e) for e in e820_map(512 * MIB)]
    assert mem.read(ZP + 0x2D0 + 20 * 3, 20) == bytes(20)
    assert mem.read(ZP, 0x70) == bytes(0x70)               # screen_info .. ist_info untouched
    assert mem.read(ZP + 0x78, 0xC0 - 0x78) == bytes(0xC0 - 0x78)

    assert mem.read(layout.CMDLINE_START, 23) == b"console=ttyS0 panic=-1\0"
    assert mem.read(info.initrd_address, len(initrd)) == initrd


def test_initrd_is_placed_as_high_as_possible(synthetic_kernel):
    mem, kernel = synthetic_kernel
    info = write_boot_params(mem, kernel, "", b"x" * 5000)
    assert info.initrd_address % layout.PAGE_SIZE == 0
    assert info.initrd_address == 512 * MIB - 2 * layout.PAGE_SIZE
    assert info.initrd_address >= kernel.end


def test_initrd_respects_initrd_addr_max(tmp_path):
    path = tmp_path / "vmlinuz"
    path.write_bytes(make_bzimage(initrd_addr_max=0x0FFF_FFFF))  # 256 MiB - 1
    mem = GuestMemory(layout.ram_layout(512 * MIB))
    try:
        info = write_boot_params(mem, load_kernel(mem, path), "", b"y" * 0x1000)
        assert info.initrd_address == 256 * MIB - 0x1000
    finally:
        mem.close()


def test_initrd_below_the_mmio_gap_with_5_gib(tmp_path):
    path = tmp_path / "vmlinuz"
    path.write_bytes(make_bzimage(initrd_addr_max=0xFFFF_FFFF))
    mem = GuestMemory(layout.ram_layout(5 * GIB))
    try:
        info = write_boot_params(mem, load_kernel(mem, path), "", b"z" * 0x2000)
        assert info.initrd_address == layout.MMIO_GAP_START - 0x2000
        assert mem.read_int(ZP + 0x1E8, 1) == 4
    finally:
        mem.close()


def test_initrd_that_would_overlap_the_kernel(synthetic_kernel):
    mem, kernel = synthetic_kernel
    with pytest.raises(InitrdDoesNotFit):
        write_boot_params(mem, kernel, "", bytes(512 * MIB - kernel.end + layout.PAGE_SIZE))


def test_empty_initrd_refused(synthetic_kernel):
    mem, kernel = synthetic_kernel
    with pytest.raises(InitrdDoesNotFit, match="empty"):
        write_boot_params(mem, kernel, "", b"")


def test_no_initrd_leaves_ramdisk_fields_zero(synthetic_kernel):
    mem, kernel = synthetic_kernel
    info = write_boot_params(mem, kernel, "quiet")
    assert info.initrd_address is None
    assert u32(mem, 0x218) == 0 and u32(mem, 0x21C) == 0


def test_command_line_length_is_checked_against_cmdline_size(synthetic_kernel):
    mem, kernel = synthetic_kernel
    write_boot_params(mem, kernel, "a" * 64)  # cmdline_size excludes the NUL
    assert mem.read(layout.CMDLINE_START + 64, 1) == b"\0"
    with pytest.raises(CommandLineTooLong):
        write_boot_params(mem, kernel, "a" * 65)


def test_command_line_with_nul_refused(synthetic_kernel):
    mem, kernel = synthetic_kernel
    with pytest.raises(CommandLineTooLong):
        write_boot_params(mem, kernel, b"root=/dev/vda\0init=/bin/sh")


def test_debian_kernel_boot_params(debian_vmlinuz):
    mem = GuestMemory(layout.ram_layout(512 * MIB))
    try:
        kernel = load_kernel(mem, debian_vmlinuz)
        initrd = b"\x1f\x8b" + bytes(3 * MIB)
        info = write_boot_params(mem, kernel, "console=ttyS0 reboot=k panic=1", initrd)
        header = SetupHeader.from_buffer_copy(mem.read(ZP + 0x1F1, ctypes.sizeof(SetupHeader)))
        assert header.version == kernel.image.header.version
        assert header.init_size == kernel.image.header.init_size
        assert header.type_of_loader == 0xFF
        assert header.ramdisk_image == info.initrd_address >= kernel.end
        assert header.ramdisk_image + header.ramdisk_size <= min(header.initrd_addr_max + 1, 512 * MIB)
    finally:
        mem.close()
