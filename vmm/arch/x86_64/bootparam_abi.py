"""The Linux x86 boot protocol ABI: ``struct setup_header`` and ``struct boot_params``.

Field names, order and offsets follow the kernel's
``arch/x86/include/uapi/asm/bootparam.h`` (Linux 6.1); the offset comments are
the header's own. Sub-structures the VMM never fills (screen_info, edid_info,
EDD buffers...) are kept as opaque byte arrays of the header's size so every
offset stays where the header puts it. ``tests/unit/test_boot_params.py``
checks these offsets against the real header with a C compiler.
"""

from __future__ import annotations

import ctypes

# loadflags (bootparam.h)
LOADED_HIGH = 1 << 0
KASLR_FLAG = 1 << 1
QUIET_FLAG = 1 << 5
KEEP_SEGMENTS = 1 << 6
CAN_USE_HEAP = 1 << 7

# xloadflags (bootparam.h)
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1

# E820_MAX_ENTRIES_ZEROPAGE (bootparam.h)
E820_MAX_ENTRIES_ZEROPAGE = 128

# Documentation/arch/x86/boot.rst: where the setup header sits in the image
# and in the zero page, and the magic that marks it.
SETUP_HEADER_OFFSET = 0x1F1
SETUP_HEADER_MAGIC = b"HdrS"
BOOT_FLAG_MAGIC = 0xAA55
# boot.rst: type_of_loader 0xFF means "undefined" (a loader without an assigned ID).
LOADER_TYPE_UNDEFINED = 0xFF


class SetupHeader(ctypes.LittleEndianStructure):
    """``struct setup_header`` (bootparam.h)."""

    _pack_ = 1
    _fields_ = [
        ("setup_sects", ctypes.c_uint8),
        ("root_flags", ctypes.c_uint16),
        ("syssize", ctypes.c_uint32),
        ("ram_size", ctypes.c_uint16),
        ("vid_mode", ctypes.c_uint16),
        ("root_dev", ctypes.c_uint16),
        ("boot_flag", ctypes.c_uint16),
        ("jump", ctypes.c_uint16),
        ("header", ctypes.c_uint32),
        ("version", ctypes.c_uint16),
        ("realmode_swtch", ctypes.c_uint32),
        ("start_sys_seg", ctypes.c_uint16),
        ("kernel_version", ctypes.c_uint16),
        ("type_of_loader", ctypes.c_uint8),
        ("loadflags", ctypes.c_uint8),
        ("setup_move_size", ctypes.c_uint16),
        ("code32_start", ctypes.c_uint32),
        ("ramdisk_image", ctypes.c_uint32),
        ("ramdisk_size", ctypes.c_uint32),
        ("bootsect_kludge", ctypes.c_uint32),
        ("heap_end_ptr", ctypes.c_uint16),
        ("ext_loader_ver", ctypes.c_uint8),
        ("ext_loader_type", ctypes.c_uint8),
        ("cmd_line_ptr", ctypes.c_uint32),
        ("initrd_addr_max", ctypes.c_uint32),
        ("kernel_alignment", ctypes.c_uint32),
        ("relocatable_kernel", ctypes.c_uint8),
        ("min_alignment", ctypes.c_uint8),
        ("xloadflags", ctypes.c_uint16),
        ("cmdline_size", ctypes.c_uint32),
        ("hardware_subarch", ctypes.c_uint32),
        ("hardware_subarch_data", ctypes.c_uint64),
        ("payload_offset", ctypes.c_uint32),
        ("payload_length", ctypes.c_uint32),
        ("setup_data", ctypes.c_uint64),
        ("pref_address", ctypes.c_uint64),
        ("init_size", ctypes.c_uint32),
        ("handover_offset", ctypes.c_uint32),
        ("kernel_info_offset", ctypes.c_uint32),
    ]


class BootE820Entry(ctypes.LittleEndianStructure):
    """``struct boot_e820_entry`` (bootparam.h)."""

    _pack_ = 1
    _fields_ = [
        ("addr", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("type", ctypes.c_uint32),
    ]


def _opaque(size: int) -> type:
    return ctypes.c_uint8 * size


class BootParams(ctypes.LittleEndianStructure):
    """``struct boot_params``, the "zero page" (bootparam.h)."""

    _pack_ = 1
    _fields_ = [
        ("screen_info", _opaque(0x40)),                  # 0x000
        ("apm_bios_info", _opaque(0x14)),                # 0x040
        ("_pad2", _opaque(4)),                           # 0x054
        ("tboot_addr", ctypes.c_uint64),                 # 0x058
        ("ist_info", _opaque(0x10)),                     # 0x060
        ("acpi_rsdp_addr", ctypes.c_uint64),             # 0x070
        ("_pad3", _opaque(8)),                           # 0x078
        ("hd0_info", _opaque(16)),                       # 0x080
        ("hd1_info", _opaque(16)),                       # 0x090
        ("sys_desc_table", _opaque(0x10)),               # 0x0a0
        ("olpc_ofw_header", _opaque(0x10)),              # 0x0b0
        ("ext_ramdisk_image", ctypes.c_uint32),          # 0x0c0
        ("ext_ramdisk_size", ctypes.c_uint32),           # 0x0c4
        ("ext_cmd_line_ptr", ctypes.c_uint32),           # 0x0c8
        ("_pad4", _opaque(116)),                         # 0x0cc
        ("edid_info", _opaque(0x80)),                    # 0x140
        ("efi_info", _opaque(0x20)),                     # 0x1c0
        ("alt_mem_k", ctypes.c_uint32),                  # 0x1e0
        ("scratch", ctypes.c_uint32),                    # 0x1e4
        ("e820_entries", ctypes.c_uint8),                # 0x1e8
        ("eddbuf_entries", ctypes.c_uint8),              # 0x1e9
        ("edd_mbr_sig_buf_entries", ctypes.c_uint8),     # 0x1ea
        ("kbd_status", ctypes.c_uint8),                  # 0x1eb
        ("secure_boot", ctypes.c_uint8),                 # 0x1ec
        ("_pad5", _opaque(2)),                           # 0x1ed
        ("sentinel", ctypes.c_uint8),                    # 0x1ef
        ("_pad6", _opaque(1)),                           # 0x1f0
        ("hdr", SetupHeader),                            # 0x1f1
        ("_pad7", _opaque(0x290 - 0x1F1 - ctypes.sizeof(SetupHeader))),
        ("edd_mbr_sig_buffer", ctypes.c_uint32 * 16),    # 0x290
        ("e820_table", BootE820Entry * E820_MAX_ENTRIES_ZEROPAGE),  # 0x2d0
        ("_pad8", _opaque(48)),                          # 0xcd0
        ("eddbuf", _opaque(6 * 0x52)),                   # 0xd00
        ("_pad9", _opaque(276)),                         # 0xeec
    ]


assert ctypes.sizeof(BootParams) == 0x1000
assert BootParams.hdr.offset == SETUP_HEADER_OFFSET
