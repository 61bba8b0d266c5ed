"""KVM accepts the 64-bit boot state vmm.arch.x86_64.cpu computes (set, then read back).

Nothing runs: this checks the ioctls and values on any /dev/kvm, kvm_pvm included.
A real boot is tested in the test bed.
"""

import os

import pytest

from vmm.arch.x86_64 import cpu, layout
from vmm.kvm import Kvm, ffi, lib
from vmm.memory import GuestMemory

pytestmark = pytest.mark.kvm

NUM_CPUS = 2
ENTRY = layout.HIGH_MEMORY_START + 0x200


@pytest.fixture
def machine():
    kvm = Kvm()
    vm = kvm.create_vm()
    memory = GuestMemory(layout.ram_layout(64 * layout.MIB))
    vcpus = []
    try:
        vm.set_tss_address(layout.KVM_TSS_START)
        vm.set_identity_map_address(layout.KVM_IDENTITY_MAP_START)
        vm.create_irqchip()
        vm.create_pit2()
        vm.map_memory(memory)
        vcpus = [vm.create_vcpu(i) for i in range(NUM_CPUS)]
        for index, vcpu in enumerate(vcpus):
            cpu.setup_boot_vcpu(vcpu, kvm, memory, index, NUM_CPUS, ENTRY)
        yield vm, vcpus
    finally:
        for vcpu in vcpus:
            vcpu.close()
        vm.close()
        kvm.close()
        memory.close()


def test_boot_vcpu_is_in_long_mode_at_the_entry(machine):
    _, (boot, _) = machine
    sregs = boot.get_sregs()
    assert sregs.cr0 & lib.X86_CR0_PG and sregs.cr4 & lib.X86_CR4_PAE
    assert sregs.efer & cpu.EFER_LMA and sregs.cs.l == 1
    assert sregs.cr3 == layout.PML4_START
    regs = boot.get_regs()
    assert (regs.rip, regs.rsi) == (ENTRY, layout.ZERO_PAGE_START)


def test_msrs_cpuid_and_lapic_are_set_on_every_vcpu(machine):
    _, vcpus = machine
    for index, vcpu in enumerate(vcpus):
        msrs = vcpu.get_msrs([cpu.MSR_MTRR_DEF_TYPE, cpu.MSR_IA32_MISC_ENABLE])
        assert msrs[cpu.MSR_MTRR_DEF_TYPE] == 0x806
        assert msrs[cpu.MSR_IA32_MISC_ENABLE] & 1
        leaf1 = [e for e in vcpu.get_cpuid2() if e.function == 1][0]
        assert leaf1.ebx >> 24 == index
        registers = ffi.buffer(vcpu.get_lapic().regs)
        assert (int.from_bytes(registers[0x350:0x354], "little") >> 8) & 7 == cpu.APIC_MODE_EXTINT
        assert (int.from_bytes(registers[0x360:0x364], "little") >> 8) & 7 == cpu.APIC_MODE_NMI


def test_application_processors_wait_for_sipi(machine):
    _, (boot, ap) = machine
    assert boot.get_mp_state() == lib.KVM_MP_STATE_RUNNABLE
    assert ap.get_mp_state() == lib.KVM_MP_STATE_UNINITIALIZED


def test_vm_and_vcpu_state_round_trips(machine):
    vm, (boot, _) = machine
    boot.set_xsave(boot.get_xsave())
    boot.set_xcrs(boot.get_xcrs())
    boot.set_debugregs(boot.get_debugregs())
    boot.set_vcpu_events(boot.get_vcpu_events())
    boot.set_lapic(boot.get_lapic())
    vm.set_pit2(vm.get_pit2())
    for chip in (lib.KVM_IRQCHIP_PIC_MASTER, lib.KVM_IRQCHIP_PIC_SLAVE, lib.KVM_IRQCHIP_IOAPIC):
        vm.set_irqchip(vm.get_irqchip(chip))
    assert boot.get_tsc_khz() > 0
    clock = vm.get_clock()
    clock.flags = 0  # set the kvmclock value as is, no realtime adjustment
    vm.set_clock(clock)
    assert vm.get_clock().clock >= clock.clock


def test_eventfds_wire_to_the_vm(machine):
    vm, _ = machine
    eventfd = os.eventfd(0)
    try:
        vm.irqfd(eventfd, layout.VIRTIO_IRQ_BASE)
        vm.ioeventfd(eventfd, layout.VIRTIO_MMIO_START + 0x50, 4, datamatch=0)
        vm.ioeventfd(eventfd, layout.VIRTIO_MMIO_START + 0x50, 4, datamatch=0, deassign=True)
        vm.irqfd(eventfd, layout.VIRTIO_IRQ_BASE, deassign=True)
        vm.irq_line(layout.COM1_IRQ, 1)
        vm.irq_line(layout.COM1_IRQ, 0)
    finally:
        os.close(eventfd)
