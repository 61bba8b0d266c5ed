"""bzImage parsing and loading (Linux boot protocol, 64-bit entry)."""

from __future__ import annotations

import pytest

from tests.unit.boot_images import make_bzimage
from vmm.arch.x86_64 import layout
from vmm.arch.x86_64.bootparam_abi import XLF_KERNEL_64
from vmm.arch.x86_64.bzimage import (
    KernelDoesNotFit,
    NotABzImage,
    UnsupportedBootProtocol,
    decompression_buffer,
    load_kernel,
    parse_bzimage,
)
from vmm.memory import GuestMemory

MIB = layout.MIB


@pytest.fixture
def memory():
    mem = GuestMemory(layout.ram_layout(128 * MIB))
    yield mem
    mem.close()


def write(tmp_path, data: bytes, name: str = "vmlinuz"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --- the real Debian kernel -------------------------------------------------

def test_debian_kernel_header(debian_vmlinuz):
    image = parse_bzimage(debian_vmlinuz)
    header = image.header
    assert header.version >= 0x020C
    assert header.xloadflags & XLF_KERNEL_64
    assert image.relocatable
    assert header.kernel_alignment == 2 * MIB
    assert header.pref_address == 16 * MIB     # CONFIG_PHYSICAL_START
    assert header.cmdline_size >= 255
    assert header.init_size > image.kernel_size  # it decompresses to something bigger
    assert image.kernel_offset == ((header.setup_sects or 4) + 1) * 512
    assert image.header_bytes[0x202 - 0x1F1:0x206 - 0x1F1] == b"HdrS"


def test_load_debian_kernel(debian_vmlinuz, memory):
    kernel = load_kernel(memory, debian_vmlinuz)
    data = debian_vmlinuz.read_bytes()
    image = kernel.image
    assert kernel.load_address == layout.HIGH_MEMORY_START
    assert kernel.entry_point == layout.HIGH_MEMORY_START + 0x200
    assert memory.read(kernel.load_address, image.kernel_size) == data[image.kernel_offset:]
    assert kernel.setup_header == data[0x1F1:0x1F1 + len(kernel.setup_header)]
    # The decompression buffer sits at the preferred 16 MiB and spans init_size.
    assert kernel.end == 16 * MIB + image.header.init_size


def test_debian_kernel_needs_ram_for_decompression(debian_vmlinuz):
    mem = GuestMemory(layout.ram_layout(32 * MIB))
    try:
        with pytest.raises(KernelDoesNotFit, match="decompresses"):
            load_kernel(mem, debian_vmlinuz)
    finally:
        mem.close()


# --- synthetic images: every refusal has a name ------------------------------

def test_synthetic_image_loads(tmp_path, memory):
    payload = bytes(range(256)) * 64
    path = write(tmp_path, make_bzimage(payload, setup_sects=3))
    kernel = load_kernel(memory, path)
    assert kernel.image.kernel_offset == 4 * 512
    assert memory.read(layout.HIGH_MEMORY_START, len(payload)) == payload
    assert kernel.entry_point == layout.HIGH_MEMORY_START + 0x200


def test_setup_sects_zero_means_four(tmp_path):
    image = parse_bzimage(write(tmp_path, make_bzimage(setup_sects=0)))
    assert image.kernel_offset == 5 * 512


@pytest.mark.parametrize("data", [b"", b"#!/bin/sh\necho hello\n", b"\x7fELF" + bytes(4096)])
def test_not_a_bzimage(tmp_path, data):
    path = write(tmp_path, data, "not-a-kernel")
    with pytest.raises(NotABzImage, match=f"^{path} is not a Linux bzImage "):
        parse_bzimage(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(NotABzImage, match="cannot read"):
        parse_bzimage(tmp_path / "nope")


def test_wrong_magic(tmp_path):
    with pytest.raises(NotABzImage, match="HdrS"):
        parse_bzimage(write(tmp_path, make_bzimage(magic=b"HdrT")))


def test_truncated_image(tmp_path):
    data = make_bzimage(b"\x90" * 0x3000)
    with pytest.raises(NotABzImage, match="truncated"):
        parse_bzimage(write(tmp_path, data[:-0x100]))


def test_setup_sects_beyond_file(tmp_path):
    with pytest.raises(NotABzImage, match="truncated"):
        parse_bzimage(write(tmp_path, make_bzimage(b"", setup_sects=200)[:4096]))


def test_old_boot_protocol_refused(tmp_path):
    with pytest.raises(UnsupportedBootProtocol, match="2.11"):
        parse_bzimage(write(tmp_path, make_bzimage(version=0x020B)))


def test_no_64bit_entry_refused(tmp_path):
    with pytest.raises(UnsupportedBootProtocol, match="XLF_KERNEL_64"):
        parse_bzimage(write(tmp_path, make_bzimage(xloadflags=0)))


def test_kernel_larger_than_ram(tmp_path):
    mem = GuestMemory([(0, 2 * MIB)])
    try:
        path = write(tmp_path, make_bzimage(b"\x90" * (2 * MIB), pref_address=0, init_size=0))
        with pytest.raises(KernelDoesNotFit, match="do not fit"):
            load_kernel(mem, path)
    finally:
        mem.close()


@pytest.mark.parametrize(
    "relocatable, load, expected_start",
    [
        (True, 1 * MIB, 16 * MIB),        # aligned load address below the preferred one
        (True, 17 * MIB, 18 * MIB),       # rounded up to kernel_alignment
        (False, 17 * MIB, 16 * MIB),      # a fixed kernel always uses its preferred address
    ],
)
def test_decompression_buffer(tmp_path, relocatable, load, expected_start):
    image = parse_bzimage(write(tmp_path, make_bzimage(relocatable=relocatable, init_size=0x123000)))
    assert decompression_buffer(image.header, load) == (expected_start, 0x123000)
