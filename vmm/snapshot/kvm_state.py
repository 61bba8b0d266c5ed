"""What KVM holds of a paused machine, as plain JSON-able data: each vCPU and the VM.

Order follows what KVM needs (and Firecracker does): on save MP state first and
vCPU events last; on restore CPUID first, the TSC before the TSC deadline (MSRs
are set in index order, 0x10 before 0x6e0) and the events last. The VM's
in-kernel PIT, PICs, IOAPIC and kvm-clock travel beside the vCPUs.
"""

from __future__ import annotations

import base64
import errno
from dataclasses import asdict

from vmm.kvm import CpuidEntry, KvmError, Vcpu, Vm, from_bytes, to_bytes
from vmm.snapshot.errors import IncompatibleSnapshot

# struct kvm_irqchip chip ids (KVM_IRQCHIP_PIC_MASTER, _PIC_SLAVE, _IOAPIC).
IRQCHIPS = (0, 1, 2)

# Raw KVM structs saved as bytes: (state key, getter, setter, C type).
_VCPU_STRUCTS = (
    ("regs", "get_regs", "set_regs", "struct kvm_regs"),
    ("sregs", "get_sregs", "set_sregs", "struct kvm_sregs"),
    ("xcrs", "get_xcrs", "set_xcrs", "struct kvm_xcrs"),
    ("debugregs", "get_debugregs", "set_debugregs", "struct kvm_debugregs"),
    ("lapic", "get_lapic", "set_lapic", "struct kvm_lapic_state"),
)


class StateMismatch(IncompatibleSnapshot):
    """Saved state this host's KVM will not take (another CPU, kernel or VMM)."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def _struct(ctype: str, text: str):
    try:
        return from_bytes(ctype, _unb64(text))
    except ValueError as error:
        raise StateMismatch(f"{ctype}: {error}") from None


def readable_msrs(vcpu: Vcpu, indices: list[int]) -> dict[int, int]:
    """The MSRs of ``indices`` KVM lets us read on this vCPU. KVM_GET_MSRS stops at the
    first one it refuses; skip that one and go on."""
    values: dict[int, int] = {}
    rest = list(indices)
    while rest:
        got = vcpu.get_msrs(rest)
        values.update(got)
        rest = rest[len(got) + 1:]
    return values


def save_vcpu(vcpu: Vcpu, msr_indices: list[int]) -> dict:
    state: dict = {"mp_state": vcpu.get_mp_state()}
    for key, getter, _, _ in _VCPU_STRUCTS:
        state[key] = _b64(to_bytes(getattr(vcpu, getter)()))
    state["xsave"] = _b64(vcpu.get_xsave())
    state["tsc_khz"] = vcpu.get_tsc_khz()
    state["cpuid"] = [list(asdict(entry).values()) for entry in vcpu.get_cpuid2()]
    state["msrs"] = [[index, value] for index, value in readable_msrs(vcpu, msr_indices).items()]
    state["events"] = _b64(to_bytes(vcpu.get_vcpu_events()))
    return state


def restore_vcpu(vcpu: Vcpu, state: dict) -> None:
    """Load ``state`` into a new, never-run vCPU of a VM whose irqchip exists."""
    try:
        vcpu.set_cpuid2(CpuidEntry(*entry) for entry in state["cpuid"])
        if state["tsc_khz"] != vcpu.get_tsc_khz():
            vcpu.set_tsc_khz(state["tsc_khz"])
        vcpu.set_mp_state(state["mp_state"])
        for key, _, setter, ctype in _VCPU_STRUCTS:
            if key != "lapic":
                getattr(vcpu, setter)(_struct(ctype, state[key]))
        vcpu.set_xsave(_unb64(state["xsave"]))
        vcpu.set_lapic(_struct("struct kvm_lapic_state", state["lapic"]))
        vcpu.set_msrs({index: value for index, value in state["msrs"]})
        vcpu.set_vcpu_events(_struct("struct kvm_vcpu_events", state["events"]))
    except (KvmError, ValueError) as error:
        raise StateMismatch(f"vCPU {vcpu.index}: {error}") from None


def save_vm(vm: Vm) -> dict:
    return {
        "pit2": _b64(to_bytes(vm.get_pit2())),
        "clock": vm.get_clock().clock,
        "irqchips": [_b64(to_bytes(vm.get_irqchip(chip))) for chip in IRQCHIPS],
    }


def restore_vm(vm: Vm, state: dict) -> None:
    """Load ``state`` into a new VM with its irqchip and PIT created."""
    try:
        vm.set_pit2(_struct("struct kvm_pit_state2", state["pit2"]))
        for text in state["irqchips"]:
            vm.set_irqchip(_struct("struct kvm_irqchip", text))
        clock = vm.get_clock()
        clock.clock, clock.flags = state["clock"], 0
        vm.set_clock(clock)
    except KvmError as error:
        raise StateMismatch(f"VM: {error}") from None


def tell_guest_it_was_paused(vcpus: list[Vcpu]) -> None:
    """KVM_KVMCLOCK_CTRL, so the guest's soft-lockup watchdog ignores the pause."""
    for vcpu in vcpus:
        try:
            vcpu.kvmclock_ctrl()
        except KvmError as error:
            if error.errno != errno.EINVAL:   # the guest has not enabled kvm-clock yet
                raise
