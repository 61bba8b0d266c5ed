"""Values vmm.arch.x86_64.cpu computes for the 64-bit boot (no VM needed)."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmm.arch.x86_64 import cpu, layout
from vmm.kvm import CpuidEntry, cpuid_from_c, ffi, lib
from vmm.memory import GuestMemory

# ---- GDT and segments ------------------------------------------------------------


def test_gdt_entries_encode_flat_segments():
    # The descriptors as the SDM lays them out: flat 4 GiB, 64-bit code, data, busy TSS.
    assert cpu.BOOT_GDT == (0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x008F8B000000FFFF)


def test_gdt_entry_places_base_and_limit():
    entry = cpu.gdt_entry(0xC093, 0x12345678, 0xABCDE)
    segment = ffi.new("struct kvm_segment *")
    cpu.fill_segment(segment, entry, 5)
    assert segment.base == 0x12345678
    assert segment.limit == 0xABCDEFFF  # 4 KiB granular
    assert segment.selector == 5 * 8


def test_code_segment_is_64_bit():
    segment = ffi.new("struct kvm_segment *")
    cpu.fill_segment(segment, cpu.BOOT_GDT[1], 1)
    assert (segment.type, segment.s, segment.dpl, segment.present) == (0xB, 1, 0, 1)
    assert (segment.l, segment.db, segment.g, segment.unusable) == (1, 0, 1, 0)
    assert segment.limit == 0xFFFFFFFF and segment.base == 0


def test_null_descriptor_is_unusable():
    segment = ffi.new("struct kvm_segment *")
    cpu.fill_segment(segment, cpu.BOOT_GDT[0], 0)
    assert segment.present == 0 and segment.unusable == 1


# ---- special registers -------------------------------------------------------------

RESET_CR0 = 0x60000010  # CD | NW | ET, what KVM_GET_SREGS returns for a new vCPU


def long_mode_sregs():
    sregs = ffi.new("struct kvm_sregs *")
    sregs.cr0 = RESET_CR0
    cpu.configure_long_mode_sregs(sregs)
    return sregs


def test_sregs_enable_paging_in_long_mode():
    sregs = long_mode_sregs()
    assert sregs.cr0 & (lib.X86_CR0_PE | lib.X86_CR0_PG | lib.X86_CR0_ET) == \
        lib.X86_CR0_PE | lib.X86_CR0_PG | lib.X86_CR0_ET
    assert sregs.cr0 & (lib.X86_CR0_CD | lib.X86_CR0_NW) == 0
    assert sregs.cr3 == layout.PML4_START
    assert sregs.cr4 & lib.X86_CR4_PAE
    assert sregs.efer & (cpu.EFER_LME | cpu.EFER_LMA) == cpu.EFER_LME | cpu.EFER_LMA


def test_sregs_segments_match_the_gdt():
    sregs = long_mode_sregs()
    assert sregs.cs.selector == 0x8 and sregs.cs.l == 1
    for name in ("ds", "es", "fs", "gs", "ss"):
        segment = getattr(sregs, name)
        assert (segment.selector, segment.type, segment.db) == (0x10, 0x3, 1)
    assert (sregs.tr.selector, sregs.tr.type) == (0x18, 0xB)
    assert (sregs.gdt.base, sregs.gdt.limit) == (layout.GDT_START, 4 * 8 - 1)
    assert (sregs.idt.base, sregs.idt.limit) == (layout.IDT_START, 7)


def test_boot_regs_follow_the_64_bit_boot_protocol():
    regs = ffi.new("struct kvm_regs *")
    cpu.configure_boot_regs(regs, 0x1000200)
    assert regs.rip == 0x1000200
    assert regs.rsi == layout.ZERO_PAGE_START
    assert regs.rsp == regs.rbp == layout.BOOT_STACK_POINTER
    assert regs.rflags == 0x2


def test_fpu_defaults():
    fpu = ffi.new("struct kvm_fpu *")
    cpu.configure_fpu(fpu)
    assert (fpu.fcw, fpu.mxcsr) == (0x37F, 0x1F80)


# ---- memory: GDT, IDT, page tables ------------------------------------------------------


@pytest.fixture
def low_memory():
    memory = GuestMemory([(0, 0x100000)])
    yield memory
    memory.close()


def test_gdt_and_idt_are_written(low_memory):
    cpu.write_gdt_and_idt(low_memory)
    assert low_memory.unpack("<4Q", layout.GDT_START) == cpu.BOOT_GDT
    assert low_memory.read(layout.IDT_START, 8) == bytes(8)


def translate(memory: GuestMemory, cr3: int, virtual: int) -> int:
    """A 4-level walk as the MMU does it, stopping at 2 MiB pages."""
    pml4e = memory.read_int(cr3 + ((virtual >> 39) & 0x1FF) * 8, 8)
    assert pml4e & 1, "PML4 entry not present"
    pdpte = memory.read_int((pml4e & ~0xFFF) + ((virtual >> 30) & 0x1FF) * 8, 8)
    assert pdpte & 1 and not pdpte & 0x80, "PDPT entry not present or a 1 GiB page"
    pde = memory.read_int((pdpte & ~0xFFF) + ((virtual >> 21) & 0x1FF) * 8, 8)
    assert pde & 0x83 == 0x83, "PD entry not a present writable 2 MiB page"
    return (pde & ~0x1FFFFF & ((1 << 52) - 1)) | (virtual & 0x1FFFFF)


@given(st.integers(0, 4 * layout.GIB - 1))
def test_first_4_gib_are_identity_mapped(address):
    memory = GuestMemory([(0, 0x10000)])
    try:
        cpu.write_page_tables(memory)
        assert translate(memory, layout.PML4_START, address) == address
    finally:
        memory.close()


def test_page_tables_stay_clear_of_other_boot_data():
    tables = cpu.page_tables()
    spans = [(address, address + len(data)) for address, data in tables.items()]
    spans += [(layout.GDT_START, layout.GDT_START + 8 * len(cpu.BOOT_GDT)), (layout.IDT_START, layout.IDT_START + 8),
              (layout.ZERO_PAGE_START, layout.ZERO_PAGE_START + layout.PAGE_SIZE),
              # the boot stack grows down from BOOT_STACK_POINTER into the page above the zero page
              (layout.ZERO_PAGE_START + layout.PAGE_SIZE, layout.BOOT_STACK_POINTER),
              (layout.CMDLINE_START, layout.CMDLINE_START + layout.CMDLINE_MAX_SIZE)]
    spans.sort()
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end <= start
    assert len(tables[layout.PDE_START]) == 4 * layout.PAGE_SIZE


# ---- CPUID ----------------------------------------------------------------------------

L1D_EAX = (1 << 5) | 1          # level 1, data cache
L3_EAX = (3 << 5) | 3           # level 3, unified cache


def fake_supported():
    """A supported-CPUID list as KVM_GET_SUPPORTED_CPUID fills it, with host topology in it."""
    rows = [
        (0x0, 0, 0, 0x1F, 0x756E6547, 0x6C65746E, 0x49656E69),
        (0x1, 0, 0, 0x000906EA, 0x12100800, 0x7FFAFBFF, 0x1FABFBFF),
        (0x4, 0, 1, L1D_EAX | (1 << 14) | (7 << 26), 0x01C0003F, 0x3F, 0),
        (0x4, 1, 1, L3_EAX | (15 << 14) | (7 << 26), 0x03C0003F, 0x2FFF, 6),
        (0x4, 2, 1, 0, 0, 0, 0),
        (0xB, 0, 1, 1, 2, 0x100, 7),
        (0xB, 1, 1, 4, 16, 0x201, 7),
        (0x80000008, 0, 0, 0x3027, 0, 0x0000700F, 0),
        (lib.KVM_CPUID_FEATURES, 0, 0, 0x01007AFB, 0, 0, 0),
    ]
    cpuid2 = ffi.new("struct kvm_cpuid2 *", {"nent": len(rows), "entries": len(rows)})
    for slot, (function, index, flags, eax, ebx, ecx, edx) in zip(cpuid2.entries, rows):
        slot.function, slot.index, slot.flags = function, index, flags
        slot.eax, slot.ebx, slot.ecx, slot.edx = eax, ebx, ecx, edx
    return cpuid_from_c(cpuid2)


def leaf(entries, function, index=0) -> CpuidEntry:
    (entry,) = [e for e in entries if e.function == function and e.index == index]
    return entry


@given(st.integers(1, cpu.MAX_VCPUS).flatmap(lambda n: st.tuples(st.integers(0, n - 1), st.just(n))))
def test_apic_ids_and_counts_describe_this_vcpu(index_and_count):
    index, num_cpus = index_and_count
    entries = cpu.vcpu_cpuid(fake_supported(), index, num_cpus)
    leaf1 = leaf(entries, 1)
    assert leaf1.ebx >> 24 == index
    assert (leaf1.ebx >> 16) & 0xFF >= min(num_cpus, 0xFF)
    assert leaf1.ebx & 0xFFFF == 0x0800  # CLFLUSH size and brand index kept
    assert bool(leaf1.edx & cpu.LEAF1_EDX_HTT) == (num_cpus > 1)
    for subleaf in (0, 1, 2):
        assert leaf(entries, 0xB, subleaf).edx == index
    core_level = leaf(entries, 0xB, 1)
    assert core_level.ebx == num_cpus
    assert 1 << core_level.eax >= num_cpus
    assert leaf(entries, 0x80000008).ecx & 0xFF == num_cpus - 1


def test_hypervisor_bit_is_set():
    entries = cpu.vcpu_cpuid(fake_supported(), 0, 1)
    assert leaf(entries, 1).ecx & (1 << 31)


def test_extended_topology_levels():
    entries = cpu.vcpu_cpuid(fake_supported(), 2, 4)
    smt, core, end = (leaf(entries, 0xB, i) for i in range(3))
    assert (smt.eax, smt.ebx, smt.ecx) == (0, 1, 0x100)         # one thread per core
    assert (core.eax, core.ebx, core.ecx) == (2, 4, 0x201)      # four cores: two id bits
    assert (end.ebx, (end.ecx >> 8) & 0xFF) == (0, 0)           # invalid level ends the list
    assert all(e.flags & lib.KVM_CPUID_FLAG_SIGNIFCANT_INDEX for e in (smt, core, end))
    assert not [e for e in entries if e.function == 0x1F]       # not invented when absent


def test_cache_sharing_follows_vcpu_count():
    entries = cpu.vcpu_cpuid(fake_supported(), 0, 4)
    l1, l3, terminator = (leaf(entries, 4, i) for i in range(3))
    assert ((l1.eax >> 14) & 0xFFF, l1.eax >> 26) == (0, 3)
    assert ((l3.eax >> 14) & 0xFFF, l3.eax >> 26) == (3, 3)
    assert l1.eax & 0x3FFF == L1D_EAX and l3.eax & 0x3FFF == L3_EAX
    assert terminator.eax == 0


def test_kvm_signature_is_added_and_features_kept():
    entries = cpu.vcpu_cpuid(fake_supported(), 0, 1)
    signature = leaf(entries, lib.KVM_CPUID_SIGNATURE)
    assert signature.eax >= lib.KVM_CPUID_FEATURES
    assert struct.pack("<3I", signature.ebx, signature.ecx, signature.edx) == b"KVMKVMKVM\0\0\0"
    assert leaf(entries, lib.KVM_CPUID_FEATURES).eax == 0x01007AFB


def test_existing_kvm_signature_is_not_duplicated():
    supported = fake_supported() + [CpuidEntry(lib.KVM_CPUID_SIGNATURE, 0, 0, lib.KVM_CPUID_FEATURES,
                                               *cpu.KVM_SIGNATURE)]
    entries = cpu.vcpu_cpuid(supported, 0, 1)
    assert len([e for e in entries if e.function == lib.KVM_CPUID_SIGNATURE]) == 1


def test_unrelated_leaves_pass_through():
    supported = fake_supported()
    assert leaf(cpu.vcpu_cpuid(supported, 1, 2), 0) == leaf(supported, 0)


@pytest.mark.parametrize("index, num_cpus", [(1, 1), (-1, 2), (0, 0), (0, cpu.MAX_VCPUS + 1)])
def test_bad_vcpu_numbers_are_refused(index, num_cpus):
    with pytest.raises(ValueError):
        cpu.vcpu_cpuid(fake_supported(), index, num_cpus)


# ---- MSRs and LAPIC ----------------------------------------------------------------------


def test_boot_msrs():
    assert cpu.BOOT_MSRS[cpu.MSR_MTRR_DEF_TYPE] == 0x806          # MTRRs on, default write-back
    assert cpu.BOOT_MSRS[cpu.MSR_IA32_MISC_ENABLE] & 1              # fast strings
    assert cpu.BOOT_MSRS[cpu.MSR_LSTAR] == cpu.BOOT_MSRS[cpu.MSR_IA32_TSC] == 0


def test_lapic_lint_pins_get_extint_and_nmi():
    lapic = ffi.new("struct kvm_lapic_state *")
    registers = ffi.buffer(lapic.regs)
    masked_fixed = (1 << 16).to_bytes(4, "little")  # the reset value: masked, fixed delivery
    registers[cpu.APIC_LVT_LINT0:cpu.APIC_LVT_LINT0 + 4] = masked_fixed
    registers[cpu.APIC_LVT_LINT1:cpu.APIC_LVT_LINT1 + 4] = masked_fixed
    cpu.configure_lapic(lapic)
    assert int.from_bytes(registers[0x350:0x354], "little") == 0x10700
    assert int.from_bytes(registers[0x360:0x364], "little") == 0x10400
