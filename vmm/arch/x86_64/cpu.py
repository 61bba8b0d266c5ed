"""vCPU state for the Linux x86_64 64-bit boot protocol.

The boot vCPU starts directly in long mode at the kernel's 64-bit entry:
flat GDT, identity-mapped first 4 GiB, ``rsi`` pointing at ``boot_params``
(Documentation/arch/x86/boot.rst, "64-bit Boot Protocol"). Application
processors get only CPUID, MSRs and LAPIC; the in-kernel LAPIC holds them in
wait-for-SIPI until the guest starts them.

The pure functions compute values from plain inputs and are unit-tested;
:func:`setup_boot_vcpu` applies them through the KVM ioctls.
"""

from __future__ import annotations

import struct
from dataclasses import replace

from vmm.arch.x86_64 import layout
from vmm.kvm import CpuidEntry, Kvm, Vcpu, ffi, lib
from vmm.memory import GuestMemory

# Architectural numbers the uapi headers do not export (Intel SDM vol. 3 / AMD APM vol. 2).
EFER_LME = 1 << 8                     # long mode enable
EFER_LMA = 1 << 10                    # long mode active

MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MISC_ENABLE_FAST_STRING = 1 << 0
MTRR_ENABLE = 1 << 11
MTRR_TYPE_WRITEBACK = 6

APIC_LVT_LINT0 = 0x350                # register offsets in the LAPIC page
APIC_LVT_LINT1 = 0x360
APIC_DELIVERY_MODE_MASK = 0x700
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7

FPU_CONTROL_WORD = 0x37F              # FNINIT state: all x87 exceptions masked
MXCSR_DEFAULT = 0x1F80                # all SSE exceptions masked

MAX_VCPUS = 254                       # xAPIC ids 0..254, 255 is broadcast

# GDT access/flags words (bits 8..15 access byte, 20..23 flags) in the layout gdt_entry takes.
GDT_CODE64 = 0xA09B                   # present, ring 0, code exec/read, L=1, G=1
GDT_DATA = 0xC093                     # present, ring 0, data read/write, D/B=1, G=1
GDT_TSS = 0x808B                      # present, busy 64-bit TSS, G=1
CODE_SELECTOR, DATA_SELECTOR, TSS_SELECTOR = 1, 2, 3   # GDT indices


# ---- GDT, IDT and page tables -------------------------------------------------------


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """A segment descriptor; ``flags`` holds the access byte in bits 0..7 and flags in 12..15."""
    return (
        ((base & 0xFF000000) << 32)
        | ((flags & 0xF0FF) << 40)
        | ((limit & 0xF0000) << 32)
        | ((base & 0xFFFFFF) << 16)
        | (limit & 0xFFFF)
    )


BOOT_GDT = (
    gdt_entry(0, 0, 0),
    gdt_entry(GDT_CODE64, 0, 0xFFFFF),
    gdt_entry(GDT_DATA, 0, 0xFFFFF),
    gdt_entry(GDT_TSS, 0, 0xFFFFF),
)


def fill_segment(segment, entry: int, index: int) -> None:
    """Fill a ``struct kvm_segment`` with what the CPU caches when loading GDT ``entry``."""
    limit = (entry & 0xFFFF) | ((entry >> 32) & 0xF0000)
    granular = (entry >> 55) & 1
    segment.base = ((entry >> 16) & 0xFFFFFF) | ((entry >> 32) & 0xFF000000)
    segment.limit = (limit << 12) | 0xFFF if granular else limit
    segment.selector = index * 8
    segment.type = (entry >> 40) & 0xF
    segment.s = (entry >> 44) & 1
    segment.dpl = (entry >> 45) & 3
    segment.present = (entry >> 47) & 1
    segment.avl = (entry >> 52) & 1
    segment.l = (entry >> 53) & 1
    segment.db = (entry >> 54) & 1
    segment.g = granular
    segment.unusable = 0 if segment.present else 1


def write_gdt_and_idt(memory: GuestMemory) -> None:
    memory.write(layout.GDT_START, struct.pack(f"<{len(BOOT_GDT)}Q", *BOOT_GDT))
    memory.write(layout.IDT_START, bytes(8))  # an empty IDT: the kernel installs its own


PAGE_PRESENT_WRITABLE = 0x3
PAGE_HUGE = 0x80
IDENTITY_MAPPED_GIB = 4


def page_tables() -> dict[int, bytes]:
    """Identity map of the first 4 GiB in 2 MiB pages: ``{guest address: table bytes}``."""
    pml4 = struct.pack("<Q", layout.PDPTE_START | PAGE_PRESENT_WRITABLE)
    pdpte = struct.pack(
        f"<{IDENTITY_MAPPED_GIB}Q",
        *(layout.PDE_START + i * layout.PAGE_SIZE | PAGE_PRESENT_WRITABLE for i in range(IDENTITY_MAPPED_GIB)),
    )
    pde = struct.pack(
        f"<{512 * IDENTITY_MAPPED_GIB}Q",
        *((i << 21) | PAGE_HUGE | PAGE_PRESENT_WRITABLE for i in range(512 * IDENTITY_MAPPED_GIB)),
    )
    return {layout.PML4_START: pml4, layout.PDPTE_START: pdpte, layout.PDE_START: pde}


def write_page_tables(memory: GuestMemory) -> None:
    for address, table in page_tables().items():
        memory.write(address, table)


# ---- registers -------------------------------------------------------------------


def configure_long_mode_sregs(sregs) -> None:
    """Turn a ``struct kvm_sregs`` (as KVM_GET_SREGS returned it) into the 64-bit boot state."""
    fill_segment(sregs.cs, BOOT_GDT[CODE_SELECTOR], CODE_SELECTOR)
    for name in ("ds", "es", "fs", "gs", "ss"):
        fill_segment(getattr(sregs, name), BOOT_GDT[DATA_SELECTOR], DATA_SELECTOR)
    fill_segment(sregs.tr, BOOT_GDT[TSS_SELECTOR], TSS_SELECTOR)
    sregs.gdt.base = layout.GDT_START
    sregs.gdt.limit = len(BOOT_GDT) * 8 - 1
    sregs.idt.base = layout.IDT_START
    sregs.idt.limit = 8 - 1
    # Caching on (clear CD/NW from the reset value), protected mode, paging.
    sregs.cr0 = (sregs.cr0 | lib.X86_CR0_PE | lib.X86_CR0_PG | lib.X86_CR0_ET) & ~(lib.X86_CR0_CD | lib.X86_CR0_NW)
    sregs.cr3 = layout.PML4_START
    sregs.cr4 |= lib.X86_CR4_PAE
    sregs.efer |= EFER_LME | EFER_LMA


def configure_boot_regs(regs, entry: int) -> None:
    """General registers at the 64-bit entry: ``rsi`` = boot_params, a small stack, IF clear."""
    regs.rflags = lib.X86_EFLAGS_FIXED
    regs.rip = entry
    regs.rsp = regs.rbp = layout.BOOT_STACK_POINTER
    regs.rsi = layout.ZERO_PAGE_START


def configure_fpu(fpu) -> None:
    fpu.fcw = FPU_CONTROL_WORD
    fpu.mxcsr = MXCSR_DEFAULT


# ---- CPUID --------------------------------------------------------------------------

LEAF_FEATURES = 0x1
LEAF_CACHE_PARAMETERS = 0x4
LEAF_EXTENDED_TOPOLOGY = 0xB
LEAF_V2_EXTENDED_TOPOLOGY = 0x1F
LEAF_AMD_SIZE_IDENTIFIERS = 0x80000008
LEAF_AMD_EXTENDED_APIC_ID = 0x8000001E

LEAF1_ECX_HYPERVISOR = 1 << 31
LEAF1_EDX_HTT = 1 << 28
TOPOLOGY_LEVEL_SMT = 1                # leaf 0xB/0x1F ECX[15:8] level types
TOPOLOGY_LEVEL_CORE = 2
KVM_SIGNATURE = struct.unpack("<3I", b"KVMKVMKVM\0\0\0")


def _apic_id_bits(num_cpus: int) -> int:
    """Bits of APIC id that number the cores: one package, one thread per core."""
    return (num_cpus - 1).bit_length()


def _set_bits(value: int, high: int, low: int, field: int) -> int:
    mask = ((1 << (high - low + 1)) - 1) << low
    return (value & ~mask) | ((field << low) & mask)


def _topology_entries(function: int, apic_id: int, num_cpus: int) -> list[CpuidEntry]:
    """Leaf 0xB / 0x1F: an SMT level of one thread, a core level of ``num_cpus``, then the end."""
    flags = lib.KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    return [
        CpuidEntry(function, 0, flags, 0, 1, (TOPOLOGY_LEVEL_SMT << 8) | 0, apic_id),
        CpuidEntry(function, 1, flags, _apic_id_bits(num_cpus), num_cpus, (TOPOLOGY_LEVEL_CORE << 8) | 1, apic_id),
        CpuidEntry(function, 2, flags, 0, 0, 2, apic_id),
    ]


def vcpu_cpuid(supported: list[CpuidEntry], index: int, num_cpus: int) -> list[CpuidEntry]:
    """KVM's supported CPUID, adjusted for vCPU ``index`` of ``num_cpus`` (APIC id = index):
    ids and counts in leaves 1, 4, 0xB, 0x1F and AMD's 0x80000008/0x8000001E, the hypervisor
    bit, and KVM's paravirtual signature so the guest finds kvmclock."""
    if not 1 <= num_cpus <= MAX_VCPUS:
        raise ValueError(f"{num_cpus} vCPUs: between 1 and {MAX_VCPUS} are supported")
    if not 0 <= index < num_cpus:
        raise ValueError(f"vCPU index {index} is not below {num_cpus}")
    addressable = 1 << _apic_id_bits(num_cpus)
    result: list[CpuidEntry] = []
    functions = {e.function for e in supported}
    for entry in supported:
        function = entry.function
        if function in (LEAF_EXTENDED_TOPOLOGY, LEAF_V2_EXTENDED_TOPOLOGY):
            continue  # regenerated whole below
        if function == LEAF_FEATURES:
            ebx = _set_bits(entry.ebx, 31, 24, index)
            ebx = _set_bits(ebx, 23, 16, min(addressable, 0xFF))
            edx = entry.edx | LEAF1_EDX_HTT if num_cpus > 1 else entry.edx & ~LEAF1_EDX_HTT
            entry = replace(entry, ebx=ebx, ecx=entry.ecx | LEAF1_ECX_HYPERVISOR, edx=edx)
        elif function == LEAF_CACHE_PARAMETERS and entry.eax & 0x1F:  # type 0: no more caches
            level = (entry.eax >> 5) & 0x7
            sharing = addressable - 1 if level >= 3 else 0  # L1/L2 per core, L3 per package
            eax = _set_bits(entry.eax, 25, 14, sharing)
            entry = replace(entry, eax=_set_bits(eax, 31, 26, min(addressable - 1, 0x3F)))
        elif function == LEAF_AMD_SIZE_IDENTIFIERS:
            ecx = _set_bits(entry.ecx, 7, 0, num_cpus - 1)
            entry = replace(entry, ecx=_set_bits(ecx, 15, 12, _apic_id_bits(num_cpus)))
        elif function == LEAF_AMD_EXTENDED_APIC_ID:
            entry = replace(entry, eax=index, ebx=index & 0xFF, ecx=0, edx=0)
        result.append(entry)
    for function in (LEAF_EXTENDED_TOPOLOGY, LEAF_V2_EXTENDED_TOPOLOGY):
        if function in functions:
            result.extend(_topology_entries(function, index, num_cpus))
    if lib.KVM_CPUID_SIGNATURE not in functions:
        result.append(CpuidEntry(lib.KVM_CPUID_SIGNATURE, 0, 0, lib.KVM_CPUID_FEATURES, *KVM_SIGNATURE))
    return result


# ---- MSRs and LAPIC -----------------------------------------------------------------

BOOT_MSRS = {
    MSR_IA32_SYSENTER_CS: 0,
    MSR_IA32_SYSENTER_ESP: 0,
    MSR_IA32_SYSENTER_EIP: 0,
    MSR_STAR: 0,
    MSR_CSTAR: 0,
    MSR_KERNEL_GS_BASE: 0,
    MSR_SYSCALL_MASK: 0,
    MSR_LSTAR: 0,
    MSR_IA32_TSC: 0,
    MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
    MSR_MTRR_DEF_TYPE: MTRR_ENABLE | MTRR_TYPE_WRITEBACK,  # all RAM write-back unless MTRRs say otherwise
}


def _with_delivery_mode(register: int, mode: int) -> int:
    return (register & ~APIC_DELIVERY_MODE_MASK) | (mode << 8)


def configure_lapic(lapic) -> None:
    """LINT0 = ExtINT (the PIC's output), LINT1 = NMI, as on a PC: in a ``struct kvm_lapic_state``."""
    registers = ffi.buffer(lapic.regs)
    for offset, mode in ((APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)):
        value = int.from_bytes(registers[offset:offset + 4], "little")
        registers[offset:offset + 4] = _with_delivery_mode(value, mode).to_bytes(4, "little")


# ---- putting it together ------------------------------------------------------------


def setup_boot_vcpu(vcpu: Vcpu, kvm: Kvm, memory: GuestMemory, index: int, num_cpus: int, entry: int) -> None:
    """Prepare vCPU ``index`` of ``num_cpus`` to boot Linux at 64-bit ``entry``.

    Needs the in-kernel irqchip (KVM_CREATE_IRQCHIP) for the LAPIC. vCPU 0 also gets
    the long-mode registers, and the GDT, IDT and page tables are written to ``memory``.
    """
    # CPUID first: KVM checks later register values against the guest's CPUID.
    vcpu.set_cpuid2(vcpu_cpuid(kvm.supported_cpuid(), index, num_cpus))
    vcpu.set_msrs(BOOT_MSRS)
    if index == 0:
        write_gdt_and_idt(memory)
        write_page_tables(memory)
        regs = vcpu.get_regs()
        configure_boot_regs(regs, entry)
        vcpu.set_regs(regs)
        fpu = vcpu.get_fpu()
        configure_fpu(fpu)
        vcpu.set_fpu(fpu)
        sregs = vcpu.get_sregs()
        configure_long_mode_sregs(sregs)
        vcpu.set_sregs(sregs)
    lapic = vcpu.get_lapic()
    configure_lapic(lapic)
    vcpu.set_lapic(lapic)
