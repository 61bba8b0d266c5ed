"""The cffi binding and the error types of vmm.kvm (no VM needed)."""

import errno

import pytest

from vmm import _build_kvm, kvm
from vmm.kvm import CpuidEntry, Kvm, KvmError, KvmUnavailable, ffi, lib

IOC_SIZE_SHIFT, IOC_SIZE_MASK = 16, 0x3FFF  # asm-generic/ioctl.h


def test_built_module_matches_builder_source():
    assert ffi.string(lib.SM_KVM_BINDING_STAMP).decode() == _build_kvm.binding_stamp()


def test_stale_build_is_refused(monkeypatch):
    monkeypatch.setattr(kvm, "_expected_stamp", lambda: "0" * 16)
    with pytest.raises(ImportError, match="rebuild with `make setup`"):
        kvm._check_binding()


@pytest.mark.parametrize("name, ctype", [
    ("KVM_GET_REGS", "struct kvm_regs"),
    ("KVM_SET_SREGS", "struct kvm_sregs"),
    ("KVM_GET_FPU", "struct kvm_fpu"),
    ("KVM_SET_LAPIC", "struct kvm_lapic_state"),
    ("KVM_GET_XCRS", "struct kvm_xcrs"),
    ("KVM_GET_VCPU_EVENTS", "struct kvm_vcpu_events"),
    ("KVM_SET_USER_MEMORY_REGION", "struct kvm_userspace_memory_region"),
    ("KVM_IOEVENTFD", "struct kvm_ioeventfd"),
    ("KVM_GET_PIT2", "struct kvm_pit_state2"),
])
def test_ioctl_numbers_encode_the_header_struct_size(name, ctype):
    number = getattr(lib, name)
    assert (number >> IOC_SIZE_SHIFT) & IOC_SIZE_MASK == ffi.sizeof(ctype)


def test_kvm_run_union_members_share_one_offset():
    offsets = {ffi.offsetof("struct kvm_run", m) for m in ("io", "mmio", "system_event", "internal", "fail_entry")}
    assert len(offsets) == 1
    assert ffi.offsetof("struct kvm_run", "immediate_exit") == 1


def test_kvm_error_names_the_ioctl_and_keeps_errno():
    error = KvmError("KVM_CREATE_VM", errno.EACCES)
    assert isinstance(error, OSError)
    assert error.errno == errno.EACCES
    assert str(error) == "KVM_CREATE_VM failed: [Errno 13] Permission denied"


def test_kvm_error_detail_is_appended():
    error = KvmError("KVM_SET_MSRS", errno.EINVAL, "MSR 0x2ff rejected, 3 of 4 set")
    assert str(error).endswith("(MSR 0x2ff rejected, 3 of 4 set)")


def test_missing_device_is_unavailable_with_advice(tmp_path):
    with pytest.raises(KvmUnavailable) as info:
        Kvm(str(tmp_path / "kvm"))
    assert info.value.errno == errno.ENOENT
    assert "kvm_intel or kvm_amd" in str(info.value)
    assert "\n" not in str(info.value)


def test_permission_denied_advice_names_the_kvm_group():
    error = kvm._unavailable("/dev/kvm", PermissionError(errno.EACCES, "Permission denied"))
    assert isinstance(error, KvmError)
    assert error.errno == errno.EACCES
    assert "add your user to the kvm group" in str(error)
    assert str(error).startswith("open /dev/kvm failed: [Errno 13] Permission denied: ")


def test_a_device_that_is_not_kvm_fails_the_version_ioctl():
    with pytest.raises(KvmError, match=r"^KVM_GET_API_VERSION failed: \[Errno 25\]") as info:
        Kvm("/dev/null")
    assert info.value.errno == errno.ENOTTY


def test_state_bytes_round_trip():
    regs = ffi.new("struct kvm_regs *")
    regs.rip, regs.rsi, regs.rflags = 0x1000000, 0x7000, 2
    copy = kvm.from_bytes("struct kvm_regs", kvm.to_bytes(regs))
    assert (copy.rip, copy.rsi, copy.rflags) == (0x1000000, 0x7000, 2)


def test_state_bytes_of_the_wrong_size_are_refused():
    with pytest.raises(ValueError, match="struct kvm_regs is 144 bytes"):
        kvm.from_bytes("struct kvm_regs", bytes(100))


def test_cpuid_round_trips_through_the_c_struct():
    entries = [CpuidEntry(0, 0, 0, 0xD, 1, 2, 3), CpuidEntry(0xB, 1, 1, 4, 5, 6, 7)]
    cpuid2 = kvm.cpuid_to_c(entries)
    assert cpuid2.nent == 2
    assert kvm.cpuid_from_c(cpuid2) == entries


def test_exit_reason_names_come_from_the_header():
    assert kvm.EXIT_REASON_NAMES[lib.KVM_EXIT_DEBUG] == "KVM_EXIT_DEBUG"
    # KVM_EXIT_IO_OUT (a direction, 1) must not shadow the reason KVM_EXIT_EXCEPTION (1).
    assert kvm.EXIT_REASON_NAMES[lib.KVM_EXIT_EXCEPTION] == "KVM_EXIT_EXCEPTION"
