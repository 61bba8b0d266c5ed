"""Thin wrappers over KVM's three file descriptor levels: system (:class:`Kvm`),
VM (:class:`Vm`) and vCPU (:class:`Vcpu`). One method per ioctl, typed exits,
and :class:`KvmError` naming the ioctl that failed.

State getters return owning cffi structs (``regs.rip = ...`` then ``set_regs``);
:func:`to_bytes` / :func:`from_bytes` turn them into plain bytes for snapshots.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import signal
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Union

try:
    from vmm._kvm_cffi import ffi, lib
except ImportError as e:  # pragma: no cover - depends on the build
    raise ImportError(f"the KVM binding vmm._kvm_cffi is not built ({e}): rebuild with `make setup`") from e

KVM_DEVICE = "/dev/kvm"
# Real-time signal that knocks a vCPU thread out of KVM_RUN (Firecracker uses SIGRTMIN too).
# Its handler is a C no-op, so it never runs Python code nor wakes an event loop.
KICK_SIGNAL = signal.SIGRTMIN


def _expected_stamp() -> str:
    # Same digest as _build_kvm.binding_stamp(), without importing the builder (cffi parsing is slow).
    builder = Path(__file__).with_name("_build_kvm.py")
    return hashlib.sha256(builder.read_bytes()).hexdigest()[:16]


def _check_binding() -> None:
    built = ffi.string(lib.SM_KVM_BINDING_STAMP).decode()
    expected = _expected_stamp()
    if built != expected:
        raise ImportError(
            f"vmm._kvm_cffi was built from another vmm/_build_kvm.py (built {built}, source {expected}): "
            "rebuild with `make setup`"
        )


_check_binding()


# ---- errors --------------------------------------------------------------------------


class KvmError(OSError):
    """A KVM ioctl failed. ``errno`` is the kernel's; ``operation`` names the ioctl."""

    def __init__(self, operation: str, errno_: int, detail: str = ""):
        super().__init__(errno_, os.strerror(errno_))
        self.operation = operation
        self.detail = detail

    def __str__(self) -> str:
        text = f"{self.operation} failed: [Errno {self.errno}] {self.strerror}"
        return f"{text} ({self.detail})" if self.detail else text


class KvmUnavailable(KvmError):
    """This host's /dev/kvm cannot be used at all; ``advice`` says what to do."""

    def __init__(self, operation: str, errno_: int, advice: str):
        super().__init__(operation, errno_)
        self.advice = advice

    def __str__(self) -> str:
        return f"{super().__str__()}: {self.advice}"


def _unavailable(path: str, err: OSError) -> KvmUnavailable:
    if err.errno == errno.ENOENT:
        advice = (f"{path} does not exist: enable virtualization (VT-x/AMD-V, or nested virtualization "
                  "on a cloud VM) and load kvm_intel or kvm_amd (`sudo modprobe kvm_intel`)")
    elif err.errno in (errno.EACCES, errno.EPERM):
        advice = (f"no permission on {path}: add your user to the kvm group "
                  "(`sudo usermod -aG kvm $USER`, then log in again)")
    else:
        advice = f"{path} cannot be opened: check that the kvm module is loaded"
    return KvmUnavailable(f"open {path}", err.errno or errno.ENODEV, advice)


def _ioctl(fd: int, name: str, arg=ffi.NULL) -> int:
    """Issue ioctl ``name`` (looked up in the header) with a pointer argument."""
    result = lib.sm_ioctl_ptr(fd, getattr(lib, name), arg)
    if result < 0:
        raise KvmError(name, -result)
    return result


def _ioctl_int(fd: int, name: str, arg: int = 0) -> int:
    """Issue ioctl ``name`` with an integer argument (``_IO`` ioctls)."""
    result = lib.sm_ioctl_int(fd, getattr(lib, name), arg)
    if result < 0:
        raise KvmError(name, -result)
    return result


def to_bytes(state) -> bytes:
    """The raw bytes of an owning cffi struct (for snapshots)."""
    return bytes(ffi.buffer(state))


def from_bytes(ctype: str, data: bytes):
    """A new ``ctype`` struct (e.g. ``"struct kvm_regs"``) filled from ``data`` of exactly its size."""
    state = ffi.new(f"{ctype} *")
    if len(data) != ffi.sizeof(state[0]):
        raise ValueError(f"{ctype} is {ffi.sizeof(state[0])} bytes, got {len(data)}")
    ffi.memmove(state, data, len(data))
    return state


# ---- CPUID as plain data -----------------------------------------------------------


@dataclass(frozen=True)
class CpuidEntry:
    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


_UNUSED_CPUID_ENTRY = CpuidEntry(0, 0, 0, 0, 0, 0, 0)


def cpuid_from_c(cpuid2) -> list[CpuidEntry]:
    """Entries of a ``struct kvm_cpuid2 *`` (only the first ``nent``)."""
    return [
        CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
        for e in (cpuid2.entries[i] for i in range(cpuid2.nent))
    ]


def cpuid_to_c(entries: Iterable[CpuidEntry]):
    """A new ``struct kvm_cpuid2 *`` holding ``entries``."""
    entries = list(entries)
    cpuid2 = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
    for slot, e in zip(cpuid2.entries, entries):
        slot.function, slot.index, slot.flags = e.function, e.index, e.flags
        slot.eax, slot.ebx, slot.ecx, slot.edx = e.eax, e.ebx, e.ecx, e.edx
    return cpuid2


# ---- vCPU exits ----------------------------------------------------------------------


class IoExit(NamedTuple):
    """Port I/O. ``data`` holds ``count * size`` bytes written by an OUT (empty for IN:
    answer with :meth:`Vcpu.complete_read`). ``count > 1`` is a string (``rep``) instruction."""

    port: int
    size: int
    count: int
    is_write: bool
    data: bytes


class MmioExit(NamedTuple):
    """An access to guest-physical ``address`` that no memory slot backs."""

    address: int
    size: int
    is_write: bool
    data: bytes


class HltExit(NamedTuple):
    pass


class ShutdownExit(NamedTuple):
    """The guest triple-faulted (or otherwise asked the CPU to shut down)."""


class IntrExit(NamedTuple):
    """KVM_RUN returned EINTR: a kick (or another signal) reached the vCPU thread."""


class SystemEventExit(NamedTuple):
    type: int  # KVM_SYSTEM_EVENT_{SHUTDOWN,RESET,CRASH,...}
    data: tuple[int, ...]


class InternalErrorExit(NamedTuple):
    suberror: int  # KVM_INTERNAL_ERROR_*
    data: tuple[int, ...]


class FailEntryExit(NamedTuple):
    hardware_reason: int
    cpu: int


class OtherExit(NamedTuple):
    """An exit reason the VMM does not expect (debug, exception, hypercall, ...)."""

    reason: int
    name: str


Exit = Union[IoExit, MmioExit, HltExit, ShutdownExit, IntrExit, SystemEventExit,
             InternalErrorExit, FailEntryExit, OtherExit]

_HLT, _SHUTDOWN, _INTR = HltExit(), ShutdownExit(), IntrExit()
EXIT_REASON_NAMES = {getattr(lib, n): n for n in dir(lib) if n.startswith("KVM_EXIT_") and not n.startswith("KVM_EXIT_IO_")}

_MMIO_DATA_OFFSET = ffi.offsetof("struct kvm_run", "mmio") + ffi.offsetof("sm_run_mmio", "data")
_MMIO_DATA_SIZE = ffi.sizeof(ffi.typeof(ffi.new("sm_run_mmio *").data))

# ---- the kick signal -------------------------------------------------------------------

_kick_handler_lock = threading.Lock()
_kick_handler_installed = False


def _install_kick_handler() -> None:
    global _kick_handler_installed
    with _kick_handler_lock:
        if not _kick_handler_installed:
            result = lib.sm_install_kick_handler(KICK_SIGNAL)
            if result < 0:
                raise OSError(-result, f"sigaction({KICK_SIGNAL}) failed: {os.strerror(-result)}")
            _kick_handler_installed = True


# ---- the three fd levels -------------------------------------------------------------


class Kvm:
    """The system fd (/dev/kvm): capabilities and VM creation."""

    def __init__(self, path: str = KVM_DEVICE):
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise _unavailable(path, e) from None
        try:
            version = _ioctl_int(self.fd, "KVM_GET_API_VERSION")
            if version != lib.KVM_API_VERSION:
                raise KvmUnavailable("KVM_GET_API_VERSION", errno.EPROTO,
                                     f"{path} speaks KVM API {version}, sm needs {lib.KVM_API_VERSION}")
        except KvmError:
            os.close(self.fd)
            raise

    def check_extension(self, cap: int) -> int:
        return _ioctl_int(self.fd, "KVM_CHECK_EXTENSION", cap)

    def vcpu_mmap_size(self) -> int:
        return _ioctl_int(self.fd, "KVM_GET_VCPU_MMAP_SIZE")

    def supported_cpuid(self) -> list[CpuidEntry]:
        entries = 256
        while True:
            cpuid2 = ffi.new("struct kvm_cpuid2 *", {"nent": entries, "entries": entries})
            try:
                _ioctl(self.fd, "KVM_GET_SUPPORTED_CPUID", cpuid2)
            except KvmError as e:
                if e.errno == errno.E2BIG and entries < 4096:
                    entries *= 2
                    continue
                raise
            return cpuid_from_c(cpuid2)

    def msr_index_list(self) -> list[int]:
        probe = ffi.new("struct kvm_msr_list *", {"nmsrs": 0})
        try:
            _ioctl(self.fd, "KVM_GET_MSR_INDEX_LIST", probe)
        except KvmError as e:
            if e.errno != errno.E2BIG:
                raise
        count = probe.nmsrs  # the kernel wrote the needed count
        msr_list = ffi.new("struct kvm_msr_list *", {"nmsrs": count, "indices": count})
        _ioctl(self.fd, "KVM_GET_MSR_INDEX_LIST", msr_list)
        return list(msr_list.indices[0:msr_list.nmsrs])

    def create_vm(self) -> Vm:
        return Vm(self, _ioctl_int(self.fd, "KVM_CREATE_VM"))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Vm:
    """A VM fd: memory slots, vCPUs, the in-kernel irqchip/PIT, eventfd wiring, VM state."""

    def __init__(self, kvm: Kvm, fd: int):
        self.kvm = kvm
        self.fd = fd
        self._xsave_size: int | None = None
        self._vcpu_mmap_size: int | None = None

    def check_extension(self, cap: int) -> int:
        return _ioctl_int(self.fd, "KVM_CHECK_EXTENSION", cap)

    # memory
    def set_user_memory_region(self, slot: int, gpa: int, size: int, host_address: int, flags: int = 0) -> None:
        region = ffi.new("struct kvm_userspace_memory_region *", {
            "slot": slot, "flags": flags, "guest_phys_addr": gpa,
            "memory_size": size, "userspace_addr": host_address,
        })
        _ioctl(self.fd, "KVM_SET_USER_MEMORY_REGION", region)

    def map_memory(self, memory, flags: int = 0) -> list[int]:
        """Register every region of a :class:`vmm.memory.GuestMemory` as slots 0..n-1."""
        for slot, region in enumerate(memory.regions):
            self.set_user_memory_region(slot, region.gpa, region.size, region.host_address, flags)
        return list(range(len(memory.regions)))

    def get_dirty_log(self, slot: int, size: int) -> bytes:
        """The dirty-page bitmap of ``slot`` (``size`` bytes of guest RAM), one bit per page; clears it."""
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        bitmap = ffi.new("__u64[]", (pages + 63) // 64)
        log = ffi.new("struct kvm_dirty_log *", {"slot": slot, "dirty_bitmap": bitmap})
        _ioctl(self.fd, "KVM_GET_DIRTY_LOG", log)
        return bytes(ffi.buffer(bitmap))

    # vCPUs
    def create_vcpu(self, index: int) -> Vcpu:
        if self._vcpu_mmap_size is None:
            self._vcpu_mmap_size = self.kvm.vcpu_mmap_size()
        fd = _ioctl_int(self.fd, "KVM_CREATE_VCPU", index)
        return Vcpu(self, index, fd, self._vcpu_mmap_size)

    def xsave_size(self) -> int:
        """Bytes of the XSAVE area KVM_GET_XSAVE2 fills (4096 without KVM_CAP_XSAVE2)."""
        if self._xsave_size is None:
            size = self.check_extension(lib.KVM_CAP_XSAVE2) if lib.SM_HAVE_XSAVE2 else 0
            self._xsave_size = max(size, ffi.sizeof("struct kvm_xsave"))
        return self._xsave_size

    # interrupt controller, timer, special addresses
    def create_irqchip(self) -> None:
        _ioctl_int(self.fd, "KVM_CREATE_IRQCHIP")

    def create_pit2(self, flags: int = lib.KVM_PIT_SPEAKER_DUMMY) -> None:
        _ioctl(self.fd, "KVM_CREATE_PIT2", ffi.new("struct kvm_pit_config *", {"flags": flags}))

    def set_tss_address(self, address: int) -> None:
        _ioctl_int(self.fd, "KVM_SET_TSS_ADDR", address)

    def set_identity_map_address(self, address: int) -> None:
        _ioctl(self.fd, "KVM_SET_IDENTITY_MAP_ADDR", ffi.new("__u64 *", address))

    def irq_line(self, irq: int, level: int) -> None:
        _ioctl(self.fd, "KVM_IRQ_LINE", ffi.new("struct kvm_irq_level *", {"irq": irq, "level": level}))

    # eventfd wiring
    def irqfd(self, eventfd: int, gsi: int, deassign: bool = False) -> None:
        """Signalling ``eventfd`` raises (edge) interrupt line ``gsi``."""
        flags = lib.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        _ioctl(self.fd, "KVM_IRQFD", ffi.new("struct kvm_irqfd *", {"fd": eventfd, "gsi": gsi, "flags": flags}))

    def ioeventfd(self, eventfd: int, address: int, length: int, datamatch: int | None = None,
                  pio: bool = False, deassign: bool = False) -> None:
        """A guest write of ``length`` bytes to ``address`` (MMIO, or a port with ``pio``) signals
        ``eventfd`` in the kernel instead of exiting; with ``datamatch``, only writes of that value."""
        flags = 0
        if datamatch is not None:
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
        if pio:
            flags |= lib.KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= lib.KVM_IOEVENTFD_FLAG_DEASSIGN
        _ioctl(self.fd, "KVM_IOEVENTFD", ffi.new("struct kvm_ioeventfd *", {
            "datamatch": datamatch or 0, "addr": address, "len": length, "fd": eventfd, "flags": flags,
        }))

    # VM state (snapshots)
    def get_clock(self):
        clock = ffi.new("struct kvm_clock_data *")
        _ioctl(self.fd, "KVM_GET_CLOCK", clock)
        return clock

    def set_clock(self, clock) -> None:
        _ioctl(self.fd, "KVM_SET_CLOCK", clock)

    def get_irqchip(self, chip_id: int):
        chip = ffi.new("struct kvm_irqchip *", {"chip_id": chip_id})
        _ioctl(self.fd, "KVM_GET_IRQCHIP", chip)
        return chip

    def set_irqchip(self, chip) -> None:
        _ioctl(self.fd, "KVM_SET_IRQCHIP", chip)

    def get_pit2(self):
        pit = ffi.new("struct kvm_pit_state2 *")
        _ioctl(self.fd, "KVM_GET_PIT2", pit)
        return pit

    def set_pit2(self, pit) -> None:
        _ioctl(self.fd, "KVM_SET_PIT2", pit)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Vcpu:
    """A vCPU fd and its shared ``struct kvm_run`` page.

    :meth:`run` is meant for one thread; :meth:`kick` may be called from any other
    thread to make that ``run`` return :class:`IntrExit` promptly.
    """

    def __init__(self, vm: Vm, index: int, fd: int, mmap_size: int):
        self.vm = vm
        self.index = index
        self.fd = fd
        _install_kick_handler()
        self._map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._run = ffi.from_buffer("struct kvm_run *", self._map)
        self._thread_id: int | None = None     # the thread in run(), while it may be
        self._thread_lock = threading.Lock()    # held while signalling it, or forgetting it
        self._pending_read: tuple[int, int] | None = None  # (offset in kvm_run, length)

    # running
    def run(self) -> Exit:
        """Enter the guest until the next exit, and decode it."""
        if self._thread_id is None:
            with self._thread_lock:
                self._thread_id = threading.get_ident()
        result = lib.sm_ioctl_int(self.fd, lib.KVM_RUN, 0)
        # An AP waiting for INIT/SIPI returns EAGAIN when it wakes: enter again.
        while result == -errno.EAGAIN:
            result = lib.sm_ioctl_int(self.fd, lib.KVM_RUN, 0)
        if result < 0:
            if result == -errno.EINTR:
                # Clear before the caller looks at why it was kicked: a later kick sets it again.
                self._run.immediate_exit = 0
                return _INTR
            raise KvmError("KVM_RUN", -result)
        return self._decode_exit()

    def _decode_exit(self) -> Exit:
        run = self._run
        reason = run.exit_reason
        if reason == lib.KVM_EXIT_IO:
            io = run.io
            length = io.count * io.size
            if io.direction == lib.KVM_EXIT_IO_OUT:
                start = io.data_offset
                return IoExit(io.port, io.size, io.count, True, self._map[start:start + length])
            self._pending_read = (io.data_offset, length)
            return IoExit(io.port, io.size, io.count, False, b"")
        if reason == lib.KVM_EXIT_MMIO:
            mmio = run.mmio
            length = min(mmio.len, _MMIO_DATA_SIZE)
            if mmio.is_write:
                return MmioExit(mmio.phys_addr, length, True, self._map[_MMIO_DATA_OFFSET:_MMIO_DATA_OFFSET + length])
            self._pending_read = (_MMIO_DATA_OFFSET, length)
            return MmioExit(mmio.phys_addr, length, False, b"")
        if reason == lib.KVM_EXIT_HLT:
            return _HLT
        if reason == lib.KVM_EXIT_SHUTDOWN:
            return _SHUTDOWN
        if reason == lib.KVM_EXIT_INTR:
            return _INTR
        if reason == lib.KVM_EXIT_SYSTEM_EVENT:
            event = run.system_event
            return SystemEventExit(event.type, tuple(event.data[0:min(event.ndata, len(event.data))]))
        if reason == lib.KVM_EXIT_INTERNAL_ERROR:
            internal = run.internal
            return InternalErrorExit(internal.suberror, tuple(internal.data[0:min(internal.ndata, len(internal.data))]))
        if reason == lib.KVM_EXIT_FAIL_ENTRY:
            return FailEntryExit(run.fail_entry.hardware_entry_failure_reason, run.fail_entry.cpu)
        return OtherExit(reason, EXIT_REASON_NAMES.get(reason, f"exit {reason}"))

    def complete_read(self, data: bytes) -> None:
        """Give the bytes an IN / MMIO read asked for; the guest sees them on the next :meth:`run`."""
        if self._pending_read is None:
            raise RuntimeError(f"vCPU {self.index}: no I/O read is pending")
        offset, length = self._pending_read
        if len(data) != length:
            raise ValueError(f"vCPU {self.index}: read wants {length} bytes, got {len(data)}")
        self._map[offset:offset + length] = data
        self._pending_read = None

    def kick(self) -> None:
        """Make the thread in (or about to enter) :meth:`run` return :class:`IntrExit`."""
        run = self._run
        if run is None:
            return  # closed
        run.immediate_exit = 1
        with self._thread_lock:
            if self._thread_id is not None:
                signal.pthread_kill(self._thread_id, KICK_SIGNAL)

    def release_thread(self) -> None:
        """Called by the thread that ran this vCPU before it ends: kicks stop signalling it.
        ``pthread_kill`` on a thread that has ended is undefined (it crashed the VMM when
        the owner stopped a guest whose vCPU thread had already left after a triple fault)."""
        with self._thread_lock:
            self._thread_id = None

    # registers
    def _get(self, name: str, ctype: str):
        state = ffi.new(f"{ctype} *")
        _ioctl(self.fd, name, state)
        return state

    def get_regs(self):
        return self._get("KVM_GET_REGS", "struct kvm_regs")

    def set_regs(self, regs) -> None:
        _ioctl(self.fd, "KVM_SET_REGS", regs)

    def get_sregs(self):
        return self._get("KVM_GET_SREGS", "struct kvm_sregs")

    def set_sregs(self, sregs) -> None:
        _ioctl(self.fd, "KVM_SET_SREGS", sregs)

    def get_fpu(self):
        return self._get("KVM_GET_FPU", "struct kvm_fpu")

    def set_fpu(self, fpu) -> None:
        _ioctl(self.fd, "KVM_SET_FPU", fpu)

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """Values of the MSRs KVM could read, in order; an unreadable one ends the list."""
        indices = list(indices)
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(indices), "entries": len(indices)})
        for slot, index in zip(msrs.entries, indices):
            slot.index = index
        count = _ioctl(self.fd, "KVM_GET_MSRS", msrs)
        return {msrs.entries[i].index: msrs.entries[i].data for i in range(count)}

    def set_msrs(self, values: Mapping[int, int]) -> None:
        items = list(values.items())
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(items), "entries": len(items)})
        for slot, (index, value) in zip(msrs.entries, items):
            slot.index, slot.data = index, value
        count = _ioctl(self.fd, "KVM_SET_MSRS", msrs)
        if count != len(items):
            raise KvmError("KVM_SET_MSRS", errno.EINVAL,
                           f"MSR {items[count][0]:#x} rejected, {count} of {len(items)} set")

    def get_cpuid2(self, max_entries: int = 256) -> list[CpuidEntry]:
        cpuid2 = ffi.new("struct kvm_cpuid2 *", {"nent": max_entries, "entries": max_entries})
        _ioctl(self.fd, "KVM_GET_CPUID2", cpuid2)
        # Not every kernel writes nent back; the unused slots stay zeroed, and no real entry
        # is all zero (leaf 0 carries the vendor string), so drop those.
        return [e for e in cpuid_from_c(cpuid2) if e != _UNUSED_CPUID_ENTRY]

    def set_cpuid2(self, entries: Iterable[CpuidEntry]) -> None:
        _ioctl(self.fd, "KVM_SET_CPUID2", cpuid_to_c(entries))

    def get_lapic(self):
        return self._get("KVM_GET_LAPIC", "struct kvm_lapic_state")

    def set_lapic(self, lapic) -> None:
        _ioctl(self.fd, "KVM_SET_LAPIC", lapic)

    def get_mp_state(self) -> int:
        return self._get("KVM_GET_MP_STATE", "struct kvm_mp_state").mp_state

    def set_mp_state(self, mp_state: int) -> None:
        _ioctl(self.fd, "KVM_SET_MP_STATE", ffi.new("struct kvm_mp_state *", {"mp_state": mp_state}))

    def get_vcpu_events(self):
        return self._get("KVM_GET_VCPU_EVENTS", "struct kvm_vcpu_events")

    def set_vcpu_events(self, events) -> None:
        _ioctl(self.fd, "KVM_SET_VCPU_EVENTS", events)

    def get_debugregs(self):
        return self._get("KVM_GET_DEBUGREGS", "struct kvm_debugregs")

    def set_debugregs(self, debugregs) -> None:
        _ioctl(self.fd, "KVM_SET_DEBUGREGS", debugregs)

    def get_xsave(self) -> bytes:
        """The XSAVE area; larger than 4 KiB when KVM_CAP_XSAVE2 says so (KVM_GET_XSAVE2)."""
        size = self.vm.xsave_size()
        if size > ffi.sizeof("struct kvm_xsave"):
            area = ffi.new("char[]", size)
            _ioctl(self.fd, "KVM_GET_XSAVE2", area)
            return bytes(ffi.buffer(area))
        return to_bytes(self._get("KVM_GET_XSAVE", "struct kvm_xsave"))

    def set_xsave(self, data: bytes) -> None:
        # The kernel reads as many bytes as KVM_CAP_XSAVE2 announced, whatever we pass.
        if len(data) != self.vm.xsave_size():
            raise ValueError(f"this VM's XSAVE area is {self.vm.xsave_size()} bytes, got {len(data)}")
        _ioctl(self.fd, "KVM_SET_XSAVE", ffi.from_buffer(data))

    def get_xcrs(self):
        return self._get("KVM_GET_XCRS", "struct kvm_xcrs")

    def set_xcrs(self, xcrs) -> None:
        _ioctl(self.fd, "KVM_SET_XCRS", xcrs)

    def get_tsc_khz(self) -> int:
        return _ioctl_int(self.fd, "KVM_GET_TSC_KHZ")

    def set_tsc_khz(self, khz: int) -> None:
        _ioctl_int(self.fd, "KVM_SET_TSC_KHZ", khz)

    def kvmclock_ctrl(self) -> None:
        """Tell the guest it was paused, so its watchdogs do not count the pause (EINVAL if
        the guest has not enabled kvmclock)."""
        _ioctl_int(self.fd, "KVM_KVMCLOCK_CTRL")

    def close(self) -> None:
        if self.fd < 0:
            return
        run, self._run = self._run, None
        ffi.release(run)
        self._map.close()
        os.close(self.fd)
        self.fd = -1
