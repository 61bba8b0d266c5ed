"""Synthetic bzImages for the boot tests (the real kernel is the ``guest_kernel`` fixture)."""

from __future__ import annotations

import ctypes

from vmm.arch.x86_64.bootparam_abi import (
    SETUP_HEADER_OFFSET,
    XLF_KERNEL_64,
    SetupHeader,
)


def make_bzimage(
    payload: bytes = b"\x90" * 0x3000,
    *,
    setup_sects: int = 1,
    version: int = 0x020F,
    xloadflags: int = XLF_KERNEL_64,
    magic: bytes = b"HdrS",
    init_size: int = 0x100000,
    pref_address: int = 0x1000000,
    kernel_alignment: int = 0x200000,
    relocatable: bool = True,
    cmdline_size: int = 0x7FF,
    initrd_addr_max: int = 0x7FFFFFFF,
) -> bytes:
    """A minimal well-formed bzImage: boot sector + setup sectors + ``payload``."""
    header = SetupHeader(
        setup_sects=setup_sects,
        syssize=-(-len(payload) // 16),
        boot_flag=0xAA55,
        jump=((ctypes.sizeof(SetupHeader) + SETUP_HEADER_OFFSET - 0x202) << 8) | 0xEB,
        header=int.from_bytes(magic, "little"),
        version=version,
        loadflags=0x01,
        code32_start=0x100000,
        initrd_addr_max=initrd_addr_max,
        kernel_alignment=kernel_alignment,
        relocatable_kernel=int(relocatable),
        xloadflags=xloadflags,
        cmdline_size=cmdline_size,
        pref_address=pref_address,
        init_size=init_size,
    )
    setup = bytearray(((setup_sects or 4) + 1) * 512)  # boot.rst: setup_sects 0 means 4
    setup[SETUP_HEADER_OFFSET:SETUP_HEADER_OFFSET + ctypes.sizeof(header)] = bytes(header)
    padded = payload + b"\0" * (header.syssize * 16 - len(payload))
    return bytes(setup) + padded
