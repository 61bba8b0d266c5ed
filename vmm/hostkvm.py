"""Can this host's /dev/kvm run an unmodified Linux guest?"""

from __future__ import annotations

import os
from dataclasses import dataclass

KVM_DEVICE = "/dev/kvm"


@dataclass(frozen=True)
class HostKvm:
    usable: bool
    reason: str


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def probe() -> HostKvm:
    """Hardware KVM (VMX/SVM) → usable; no /dev/kvm, no access, or ``kvm_pvm`` → not, and why."""
    if not os.path.exists(KVM_DEVICE):
        return HostKvm(False, f"{KVM_DEVICE} does not exist: enable virtualization and load "
                              "kvm_intel or kvm_amd")
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return HostKvm(False, f"no permission on {KVM_DEVICE}: add your user to the 'kvm' group")
    if os.path.isdir("/sys/module/kvm_pvm"):
        return HostKvm(False, f"{KVM_DEVICE} is kvm_pvm (a software hypervisor that runs only "
                              "PVM-built guest kernels): use a host with hardware KVM (VMX/SVM)")
    flags = _cpu_flags()
    if not flags & {"vmx", "svm"}:
        return HostKvm(False, "the CPU shows no hardware virtualization (vmx/svm)")
    return HostKvm(True, f"{KVM_DEVICE} is hardware KVM ({'VMX' if 'vmx' in flags else 'SVM'})")


def refusal() -> str | None:
    """The one line a command that needs a guest says on this host, or None if it can run."""
    kvm = probe()
    return None if kvm.usable else f"cannot run a guest here: {kvm.reason} (see `sm doctor`)"
