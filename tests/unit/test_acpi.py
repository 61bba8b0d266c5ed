"""ACPI tables in guest memory: checksums, the RSDP -> XSDT -> FADT -> DSDT chain, the MADT,
and ACPICA's own disassembler (iasl, from acpica-tools) reading what we wrote."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess

import pytest

from vmm.arch.x86_64 import layout
from vmm.arch.x86_64.acpi import write_acpi_tables
from vmm.memory import GuestMemory

MIB = layout.MIB
NUM_VIRTIO = 3
VIRTIO = [layout.virtio_mmio_slot(i) for i in range(NUM_VIRTIO)]


@pytest.fixture
def memory():
    mem = GuestMemory(layout.ram_layout(128 * MIB))
    yield mem
    mem.close()


def read_table(mem: GuestMemory, address: int) -> bytes:
    length = mem.read_int(address + 4, 4)
    return mem.read(address, length)


def tables(mem: GuestMemory) -> dict[bytes, tuple[int, bytes]]:
    """Follow RSDP -> XSDT -> {FADT -> DSDT, others}; signature -> (address, bytes)."""
    rsdp = mem.read(layout.ACPI_RSDP_START, 36)
    xsdt_address = struct.unpack_from("<Q", rsdp, 24)[0]
    xsdt = read_table(mem, xsdt_address)
    found = {b"XSDT": (xsdt_address, xsdt)}
    for (address,) in struct.iter_unpack("<Q", xsdt[36:]):
        table = read_table(mem, address)
        found[table[:4]] = (address, table)
    fadt = found[b"FACP"][1]
    dsdt_address = struct.unpack_from("<Q", fadt, 140)[0]   # X_DSDT
    found[b"DSDT"] = (dsdt_address, read_table(mem, dsdt_address))
    return found


def test_rsdp(memory):
    write_acpi_tables(memory, 2, VIRTIO)
    rsdp = memory.read(layout.ACPI_RSDP_START, 36)
    assert rsdp[:8] == b"RSD PTR "
    assert sum(rsdp[:20]) % 256 == 0                        # ACPI 1.0 checksum
    assert sum(rsdp) % 256 == 0                             # extended checksum
    assert rsdp[15] == 2                                    # revision
    assert struct.unpack_from("<I", rsdp, 16)[0] == 0       # no RSDT
    assert struct.unpack_from("<I", rsdp, 20)[0] == 36      # length
    assert layout.ACPI_RSDP_START % 16 == 0                 # the kernel scans on 16-byte boundaries


def test_chain_and_checksums(memory):
    write_acpi_tables(memory, 2, VIRTIO)
    found = tables(memory)
    assert set(found) == {b"XSDT", b"FACP", b"APIC", b"DSDT"}
    for signature, (address, table) in found.items():
        assert sum(table) % 256 == 0, f"{signature} checksum"
        assert layout.ACPI_TABLES_START <= address
        assert address + len(table) <= layout.HIGH_MEMORY_START
    spans = sorted((a, a + len(t)) for a, t in found.values())
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:])), "tables overlap"


def test_fadt_fields(memory):
    write_acpi_tables(memory, 1, VIRTIO)
    fadt = tables(memory)[b"FACP"][1]
    assert len(fadt) == 276 and fadt[8] == 6 and fadt[131] == 5   # revision 6.5
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags & (1 << 20)                                       # HW_REDUCED_ACPI
    assert flags & (1 << 10)                                       # RESET_REG_SUP
    assert struct.unpack_from("<H", fadt, 109)[0] == 0b11100       # no VGA, no MSI, no ASPM
    # GAS: space 1 (SystemIO), 8 bits, offset 0, byte access, address
    assert struct.unpack_from("<BBBBQ", fadt, 116) == (1, 8, 0, 1, layout.ACPI_RESET_PORT)
    assert fadt[128] == layout.ACPI_RESET_VALUE
    assert struct.unpack_from("<BBBBQ", fadt, 244) == (1, 8, 0, 1, layout.ACPI_SLEEP_CONTROL_PORT)
    assert struct.unpack_from("<BBBBQ", fadt, 256) == (1, 8, 0, 1, layout.ACPI_SLEEP_STATUS_PORT)


@pytest.mark.parametrize("num_cpus", [1, 4, 254])
def test_madt_entries(memory, num_cpus):
    write_acpi_tables(memory, num_cpus, VIRTIO)
    madt = tables(memory)[b"APIC"][1]
    assert struct.unpack_from("<II", madt, 36) == (layout.APIC_START, 0)
    lapics, ioapics, offset = [], [], 44
    while offset < len(madt):
        kind, length = madt[offset], madt[offset + 1]
        assert length >= 2
        if kind == 0:
            lapics.append(struct.unpack_from("<BBI", madt, offset + 2))
        elif kind == 1:
            ioapics.append(struct.unpack_from("<BxII", madt, offset + 2))
        offset += length
    assert offset == len(madt)
    assert lapics == [(cpu, cpu, 1) for cpu in range(num_cpus)]
    assert ioapics == [(0, layout.IOAPIC_START, 0)]


def test_bad_cpu_counts(memory):
    for num_cpus in (0, 255):
        with pytest.raises(ValueError):
            write_acpi_tables(memory, num_cpus, VIRTIO)


def test_largest_configuration_stays_below_1_mib(memory):
    every_slot = [layout.virtio_mmio_slot(i) for i in range(layout.VIRTIO_IRQ_MAX - layout.VIRTIO_IRQ_BASE + 1)]
    write_acpi_tables(memory, 254, every_slot)
    for address, table in tables(memory).values():
        assert address + len(table) <= layout.HIGH_MEMORY_START


# --- ACPICA's disassembler reads what we wrote --------------------------------------------

@pytest.fixture(scope="module")
def iasl():
    path = shutil.which("iasl")
    assert path, "iasl is needed to validate the ACPI tables: apt-get install acpica-tools"
    return path


def disassemble(iasl: str, tmp_path, name: str, table: bytes) -> str:
    binary = tmp_path / f"{name}.dat"
    binary.write_bytes(table)
    run = subprocess.run([iasl, "-d", binary.name], cwd=tmp_path, capture_output=True, text=True)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log
    assert not re.search(r"error|warning", log, re.IGNORECASE), log
    listing = (tmp_path / f"{name}.dsl").read_text()
    assert not re.search(r"incorrect|warning|error|External \(", listing, re.IGNORECASE), listing
    return listing


def test_dsdt_disassembles_cleanly(memory, iasl, tmp_path):
    write_acpi_tables(memory, 2, VIRTIO)
    listing = disassemble(iasl, tmp_path, "dsdt", tables(memory)[b"DSDT"][1])

    assert re.search(r"Name \(\\_S5, Package \(0x04\)\s*//[^\n]*\n\s*\{\s*0x05,\s*Zero,\s*Zero,\s*Zero\s*\}", listing)
    devices = re.findall(r"Device \((VR\d\d)\)\s*\{(.*?)\n        \}", listing, re.DOTALL)
    assert [name for name, _ in devices] == [f"VR{i:02d}" for i in range(NUM_VIRTIO)]
    for index, ((_, body), (base, gsi)) in enumerate(zip(devices, VIRTIO)):
        assert 'Name (_HID, "LNRO0005")' in body
        assert re.search(rf"Memory32Fixed \(ReadWrite,\s*0x{base:08X},\s*// Address Base\s*0x00001000,", body)
        assert re.search(rf"Interrupt \(ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, \)\s*\{{\s*0x{gsi:08X},", body)
    assert 'EisaId ("PNP0501")' in listing
    assert re.search(r"IO \(Decode16,\s*0x03F8,\s*// Range Minimum\s*0x03F8,", listing)
    assert re.search(r"IRQNoFlags \(\)\s*\{4\}", listing)


def test_dsdt_recompiles_to_the_same_aml(memory, iasl, tmp_path):
    """iasl, compiling its own disassembly without optimisations, produces our exact bytes."""
    write_acpi_tables(memory, 2, VIRTIO)
    dsdt = tables(memory)[b"DSDT"][1]
    disassemble(iasl, tmp_path, "dsdt", dsdt)
    run = subprocess.run([iasl, "-oa", "-p", "again", "dsdt.dsl"], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "again.aml").read_bytes()[36:] == dsdt[36:]


def test_fadt_disassembles_cleanly(memory, iasl, tmp_path):
    write_acpi_tables(memory, 2, VIRTIO)
    fadt = tables(memory)[b"FACP"][1]
    dsdt_address = tables(memory)[b"DSDT"][0]
    listing = disassemble(iasl, tmp_path, "facp", fadt)
    assert re.search(r"Hardware Reduced \(V5\) : 1", listing)
    assert re.search(r"Reset Register Supported \(V2\) : 1", listing)
    assert re.search(r"VGA Not Present \(V4\) : 1", listing)
    assert re.search(rf"DSDT Address : {dsdt_address:016X}", listing)
    assert re.search(rf"Value to cause reset : {layout.ACPI_RESET_VALUE:02X}", listing)
    for register, port in (
        ("Reset Register", layout.ACPI_RESET_PORT),
        ("Sleep Control Register", layout.ACPI_SLEEP_CONTROL_PORT),
        ("Sleep Status Register", layout.ACPI_SLEEP_STATUS_PORT),
    ):
        assert re.search(
            rf"{register} : \[Generic Address Structure\]\n.*Space ID : 01 \[SystemIO\]\n"
            rf".*Bit Width : 08\n.*Bit Offset : 00\n.*Encoded Access Width : 01 \[Byte Access:8\]\n"
            rf".*Address : {port:016X}\n",
            listing,
        ), register


def test_madt_disassembles_cleanly(memory, iasl, tmp_path):
    write_acpi_tables(memory, 3, VIRTIO)
    listing = disassemble(iasl, tmp_path, "apic", tables(memory)[b"APIC"][1])
    assert listing.count("[Processor Local APIC]") == 3
    assert listing.count("[I/O APIC]") == 1
    assert re.findall(r"Local Apic ID : (\w+)", listing) == ["00", "01", "02"]
    assert listing.count("Processor Enabled : 1") == 3
    assert re.search(r"Address : FEC00000", listing)
    assert re.search(r"Local Apic Address : FEE00000", listing)
