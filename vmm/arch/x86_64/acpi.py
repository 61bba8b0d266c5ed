"""ACPI tables for a hardware-reduced x86 microVM: RSDP -> XSDT -> {FADT -> DSDT, MADT}.

As in Firecracker and Cloud Hypervisor: no legacy ACPI hardware (no PM timer,
no SCI, no GPEs; the FADT's HW_REDUCED_ACPI flag), power-off through the
FADT sleep control register with the sleep type of ``\\_S5_``, reboot through
the FADT reset register, one enabled local APIC per vCPU and one IOAPIC in
the MADT, and the virtio-mmio devices as ``LNRO0005`` nodes in the DSDT.
Layouts and field names follow the ACPI 6.5 specification, chapter 5.2.
"""

from __future__ import annotations

import ctypes

from vmm.arch.x86_64 import aml, layout
from vmm.memory import GuestMemory

OEM_ID = b"SMVMM "
OEM_TABLE_ID = b"SMVM    "
OEM_REVISION = 1
CREATOR_ID = b"SMVM"
CREATOR_REVISION = 1
HYPERVISOR_VENDOR_ID = b"SMVMKVM "

# 5.2.9 FADT (revision 6.5): flags and IA-PC boot architecture flags.
FADT_REVISION = 6
FADT_MINOR_REVISION = 5
FADT_PWR_BUTTON = 1 << 4            # no fixed power button
FADT_SLP_BUTTON = 1 << 5            # no fixed sleep button
FADT_RESET_REG_SUP = 1 << 10
FADT_HW_REDUCED_ACPI = 1 << 20
IAPC_VGA_NOT_PRESENT = 1 << 2
IAPC_MSI_NOT_SUPPORTED = 1 << 3
IAPC_PCIE_ASPM_CONTROLS = 1 << 4

# 5.2.12 MADT
MADT_REVISION = 6
MADT_LOCAL_APIC = 0
MADT_IO_APIC = 1
MADT_LAPIC_ENABLED = 1 << 0
MAX_CPUS = 254                       # xAPIC ids 0..254; 0xFF is the broadcast id

RSDP_REVISION = 2                    # ACPI 2.0+: has the XSDT address
XSDT_REVISION = 1
DSDT_REVISION = 2                    # >= 2: AML integers are 64-bit

# 5.2.3.2 Generic Address Structure
GAS_SYSTEM_IO = 1
GAS_ACCESS_BYTE = 1

# The sleep type the guest writes to the sleep control register to power off.
S5_SLEEP_TYPE = 5
TABLES_LIMIT = layout.HIGH_MEMORY_START


class Rsdp(ctypes.LittleEndianStructure):
    """5.2.5.3 Root System Description Pointer (revision 2)."""

    _pack_ = 1
    _fields_ = [
        ("signature", ctypes.c_char * 8),
        ("checksum", ctypes.c_uint8),           # over the first 20 bytes (ACPI 1.0 part)
        ("oem_id", ctypes.c_char * 6),
        ("revision", ctypes.c_uint8),
        ("rsdt_address", ctypes.c_uint32),
        ("length", ctypes.c_uint32),
        ("xsdt_address", ctypes.c_uint64),
        ("extended_checksum", ctypes.c_uint8),  # over the whole structure
        ("reserved", ctypes.c_uint8 * 3),
    ]


RSDP_V1_LENGTH = Rsdp.length.offset


class SdtHeader(ctypes.LittleEndianStructure):
    """5.2.6 System Description Table Header."""

    _pack_ = 1
    _fields_ = [
        ("signature", ctypes.c_char * 4),
        ("length", ctypes.c_uint32),
        ("revision", ctypes.c_uint8),
        ("checksum", ctypes.c_uint8),
        ("oem_id", ctypes.c_char * 6),
        ("oem_table_id", ctypes.c_char * 8),
        ("oem_revision", ctypes.c_uint32),
        ("creator_id", ctypes.c_char * 4),
        ("creator_revision", ctypes.c_uint32),
    ]


class GenericAddress(ctypes.LittleEndianStructure):
    """5.2.3.2 Generic Address Structure."""

    _pack_ = 1
    _fields_ = [
        ("space_id", ctypes.c_uint8),
        ("bit_width", ctypes.c_uint8),
        ("bit_offset", ctypes.c_uint8),
        ("access_size", ctypes.c_uint8),
        ("address", ctypes.c_uint64),
    ]


class Fadt(ctypes.LittleEndianStructure):
    """5.2.9 Fixed ACPI Description Table (FADT), signature "FACP"."""

    _pack_ = 1
    _fields_ = [
        ("header", SdtHeader),
        ("firmware_ctrl", ctypes.c_uint32),
        ("dsdt", ctypes.c_uint32),
        ("reserved0", ctypes.c_uint8),
        ("preferred_pm_profile", ctypes.c_uint8),
        ("sci_int", ctypes.c_uint16),
        ("smi_cmd", ctypes.c_uint32),
        ("acpi_enable", ctypes.c_uint8),
        ("acpi_disable", ctypes.c_uint8),
        ("s4bios_req", ctypes.c_uint8),
        ("pstate_cnt", ctypes.c_uint8),
        ("pm1a_evt_blk", ctypes.c_uint32),
        ("pm1b_evt_blk", ctypes.c_uint32),
        ("pm1a_cnt_blk", ctypes.c_uint32),
        ("pm1b_cnt_blk", ctypes.c_uint32),
        ("pm2_cnt_blk", ctypes.c_uint32),
        ("pm_tmr_blk", ctypes.c_uint32),
        ("gpe0_blk", ctypes.c_uint32),
        ("gpe1_blk", ctypes.c_uint32),
        ("pm1_evt_len", ctypes.c_uint8),
        ("pm1_cnt_len", ctypes.c_uint8),
        ("pm2_cnt_len", ctypes.c_uint8),
        ("pm_tmr_len", ctypes.c_uint8),
        ("gpe0_blk_len", ctypes.c_uint8),
        ("gpe1_blk_len", ctypes.c_uint8),
        ("gpe1_base", ctypes.c_uint8),
        ("cst_cnt", ctypes.c_uint8),
        ("p_lvl2_lat", ctypes.c_uint16),
        ("p_lvl3_lat", ctypes.c_uint16),
        ("flush_size", ctypes.c_uint16),
        ("flush_stride", ctypes.c_uint16),
        ("duty_offset", ctypes.c_uint8),
        ("duty_width", ctypes.c_uint8),
        ("day_alrm", ctypes.c_uint8),
        ("mon_alrm", ctypes.c_uint8),
        ("century", ctypes.c_uint8),
        ("iapc_boot_arch", ctypes.c_uint16),
        ("reserved1", ctypes.c_uint8),
        ("flags", ctypes.c_uint32),
        ("reset_reg", GenericAddress),
        ("reset_value", ctypes.c_uint8),
        ("arm_boot_arch", ctypes.c_uint16),
        ("minor_version", ctypes.c_uint8),
        ("x_firmware_ctrl", ctypes.c_uint64),
        ("x_dsdt", ctypes.c_uint64),
        ("x_pm1a_evt_blk", GenericAddress),
        ("x_pm1b_evt_blk", GenericAddress),
        ("x_pm1a_cnt_blk", GenericAddress),
        ("x_pm1b_cnt_blk", GenericAddress),
        ("x_pm2_cnt_blk", GenericAddress),
        ("x_pm_tmr_blk", GenericAddress),
        ("x_gpe0_blk", GenericAddress),
        ("x_gpe1_blk", GenericAddress),
        ("sleep_control_reg", GenericAddress),
        ("sleep_status_reg", GenericAddress),
        ("hypervisor_vendor_id", ctypes.c_char * 8),
    ]


class MadtHeader(ctypes.LittleEndianStructure):
    """5.2.12 MADT fixed part, signature "APIC"."""

    _pack_ = 1
    _fields_ = [
        ("header", SdtHeader),
        ("local_apic_address", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    ]


class MadtLocalApic(ctypes.LittleEndianStructure):
    """5.2.12.2 Processor Local APIC Structure."""

    _pack_ = 1
    _fields_ = [
        ("type", ctypes.c_uint8),
        ("length", ctypes.c_uint8),
        ("processor_uid", ctypes.c_uint8),
        ("apic_id", ctypes.c_uint8),
        ("flags", ctypes.c_uint32),
    ]


class MadtIoApic(ctypes.LittleEndianStructure):
    """5.2.12.3 I/O APIC Structure."""

    _pack_ = 1
    _fields_ = [
        ("type", ctypes.c_uint8),
        ("length", ctypes.c_uint8),
        ("io_apic_id", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8),
        ("io_apic_address", ctypes.c_uint32),
        ("global_system_interrupt_base", ctypes.c_uint32),
    ]


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` (with that byte zero) sum to 0 mod 256."""
    return -sum(data) & 0xFF


def _table(signature: bytes, revision: int, fixed: ctypes.Structure | None, body: bytes = b"") -> bytes:
    """A complete SDT: header (length and checksum computed) + fixed part + variable body.

    ``fixed``, if given, is a structure that starts with the ``SdtHeader`` to fill in.
    """
    if fixed is None:
        fixed = SdtHeader()
        header = fixed
    else:
        header = fixed.header
    header.signature = signature
    header.length = ctypes.sizeof(fixed) + len(body)
    header.revision = revision
    header.checksum = 0
    header.oem_id = OEM_ID
    header.oem_table_id = OEM_TABLE_ID
    header.oem_revision = OEM_REVISION
    header.creator_id = CREATOR_ID
    header.creator_revision = CREATOR_REVISION
    data = bytearray(bytes(fixed) + body)
    data[SdtHeader.checksum.offset] = checksum(data)
    return bytes(data)


def _io_port(port: int) -> GenericAddress:
    return GenericAddress(
        space_id=GAS_SYSTEM_IO, bit_width=8, bit_offset=0, access_size=GAS_ACCESS_BYTE, address=port
    )


def build_dsdt(virtio_devices: list[tuple[int, int]]) -> bytes:
    """The DSDT: ``\\_S5_``, COM1 and one ``LNRO0005`` device per ``(mmio_base, gsi)``."""
    if len(virtio_devices) > 100:
        raise ValueError(f"{len(virtio_devices)} virtio devices: at most 100 get a VRnn name")
    devices = [
        aml.device(
            "COM1",
            aml.name("_HID", aml.eisa_id("PNP0501")),
            aml.name("_UID", aml.integer(0)),
            aml.name("_CRS", aml.resource_template(
                aml.io(layout.COM1_PORT, 8),
                aml.irq_no_flags(layout.COM1_IRQ),
            )),
        )
    ]
    for index, (mmio_base, gsi) in enumerate(virtio_devices):
        devices.append(aml.device(
            f"VR{index:02d}",
            aml.name("_HID", aml.string("LNRO0005")),
            aml.name("_UID", aml.integer(index)),
            aml.name("_CRS", aml.resource_template(
                aml.memory32_fixed(mmio_base, layout.VIRTIO_MMIO_SIZE),
                # Edge-triggered: the in-kernel IOAPIC gets these through irqfd.
                aml.extended_interrupt(gsi, edge=True, active_low=False, shared=False),
            )),
        ))
    s5 = aml.name("\\_S5_", aml.package(*(aml.integer(v) for v in (S5_SLEEP_TYPE, 0, 0, 0))))
    return _table(b"DSDT", DSDT_REVISION, None, s5 + aml.scope("\\_SB_", *devices))


def build_fadt(dsdt_address: int) -> bytes:
    fadt = Fadt()
    fadt.flags = FADT_HW_REDUCED_ACPI | FADT_PWR_BUTTON | FADT_SLP_BUTTON | FADT_RESET_REG_SUP
    fadt.iapc_boot_arch = IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED | IAPC_PCIE_ASPM_CONTROLS
    fadt.minor_version = FADT_MINOR_REVISION
    fadt.x_dsdt = dsdt_address
    fadt.reset_reg = _io_port(layout.ACPI_RESET_PORT)
    fadt.reset_value = layout.ACPI_RESET_VALUE
    fadt.sleep_control_reg = _io_port(layout.ACPI_SLEEP_CONTROL_PORT)
    fadt.sleep_status_reg = _io_port(layout.ACPI_SLEEP_STATUS_PORT)
    fadt.hypervisor_vendor_id = HYPERVISOR_VENDOR_ID
    return _table(b"FACP", FADT_REVISION, fadt)


def build_madt(num_cpus: int) -> bytes:
    """One IOAPIC (id 0, GSI base 0) and one enabled local APIC per vCPU (APIC id = index).

    No interrupt source overrides, as Firecracker: KVM's default routing wires
    GSI n to IOAPIC pin n, and Linux assumes that identity (edge, active high)
    for ISA IRQs 0..15 when the MADT names no override.
    """
    if not 1 <= num_cpus <= MAX_CPUS:
        raise ValueError(f"{num_cpus} vCPUs: the MADT describes 1..{MAX_CPUS}")
    entries = bytes(MadtIoApic(
        type=MADT_IO_APIC,
        length=ctypes.sizeof(MadtIoApic),
        io_apic_id=0,
        io_apic_address=layout.IOAPIC_START,
        global_system_interrupt_base=0,
    ))
    for cpu in range(num_cpus):
        entries += bytes(MadtLocalApic(
            type=MADT_LOCAL_APIC,
            length=ctypes.sizeof(MadtLocalApic),
            processor_uid=cpu,
            apic_id=cpu,
            flags=MADT_LAPIC_ENABLED,
        ))
    return _table(b"APIC", MADT_REVISION, MadtHeader(local_apic_address=layout.APIC_START), entries)


def build_xsdt(table_addresses: list[int]) -> bytes:
    body = b"".join(address.to_bytes(8, "little") for address in table_addresses)
    return _table(b"XSDT", XSDT_REVISION, None, body)


def build_rsdp(xsdt_address: int) -> bytes:
    rsdp = Rsdp(
        signature=b"RSD PTR ",
        oem_id=OEM_ID,
        revision=RSDP_REVISION,
        length=ctypes.sizeof(Rsdp),
        xsdt_address=xsdt_address,
    )
    rsdp.checksum = checksum(bytes(rsdp)[:RSDP_V1_LENGTH])
    rsdp.extended_checksum = checksum(bytes(rsdp))
    return bytes(rsdp)


def write_acpi_tables(memory: GuestMemory, num_cpus: int, virtio_devices: list[tuple[int, int]]) -> None:
    """Write the RSDP at ``ACPI_RSDP_START`` and the tables from ``ACPI_TABLES_START`` up."""
    next_address = layout.ACPI_TABLES_START

    def place(table: bytes) -> int:
        nonlocal next_address
        address = next_address
        next_address += len(table)
        assert next_address <= TABLES_LIMIT, "ACPI tables overflow the BIOS area below 1 MiB"
        memory.write(address, table)
        return address

    dsdt = place(build_dsdt(virtio_devices))
    fadt = place(build_fadt(dsdt))
    madt = place(build_madt(num_cpus))
    xsdt = place(build_xsdt([fadt, madt]))
    rsdp = build_rsdp(xsdt)
    assert layout.ACPI_RSDP_START + len(rsdp) <= layout.ACPI_TABLES_START
    memory.write(layout.ACPI_RSDP_START, rsdp)
