"""A tiny real-mode guest on /dev/kvm: the binding, Vcpu.run and VcpuThread end to end.

Runs on any /dev/kvm, kvm_pvm included (no Linux guest needed). Without a usable
/dev/kvm these tests fail with KvmUnavailable: they are never skipped.
"""

import threading
from contextlib import contextmanager

import pytest

from vmm.kvm import HltExit, IntrExit, IoExit, Kvm, KvmError, MmioExit, lib
from vmm.memory import GuestMemory
from vmm.vcpu import StopKind, VcpuThread

pytestmark = pytest.mark.kvm

RAM_SIZE = 0x10000
CODE = 0x1000
PORT = 0x3F8
WAIT = 10.0

# 16-bit real-mode machine code.
MOV_DX_PORT = bytes([0xBA]) + PORT.to_bytes(2, "little")
OUT_DX_AL, OUT_DX_AX, IN_AL_DX, HLT = b"\xee", b"\xef", b"\xec", b"\xf4"


def mov_al(value: int) -> bytes:
    return bytes([0xB0, value])


@contextmanager
def realmode_guest(code: bytes, data: dict[int, bytes] | None = None, memory_flags: int = 0):
    """A VM with 64 KiB of RAM at 0, ``code`` at CODE and one vCPU about to run it."""
    kvm = Kvm()
    vm = kvm.create_vm()
    memory = GuestMemory([(0, RAM_SIZE)])
    vcpu = None
    try:
        vm.map_memory(memory, memory_flags)
        memory.write(CODE, code)
        for address, blob in (data or {}).items():
            memory.write(address, blob)
        vcpu = vm.create_vcpu(0)
        sregs = vcpu.get_sregs()
        for segment in (sregs.cs, sregs.ds, sregs.es, sregs.ss):
            segment.base, segment.selector = 0, 0
        vcpu.set_sregs(sregs)
        regs = vcpu.get_regs()
        regs.rip, regs.rflags = CODE, 0x2
        vcpu.set_regs(regs)
        yield vcpu
    finally:
        if vcpu is not None:
            vcpu.close()
        vm.close()
        kvm.close()
        memory.close()


class RecordingBus:
    def __init__(self, answer: bytes = b"\x00"):
        self.answer = answer
        self.writes: list[tuple[int, bytes]] = []
        self.reads: list[tuple[int, int]] = []

    def read(self, addr: int, size: int) -> bytes:
        self.reads.append((addr, size))
        return self.answer[:size]

    def write(self, addr: int, data: bytes) -> None:
        self.writes.append((addr, bytes(data)))


def run_thread(vcpu, pio, mmio):
    stops = []
    thread = VcpuThread(vcpu, pio, mmio, stops.append)
    thread.start()
    thread.join(WAIT)
    assert not thread.alive, "the guest did not stop"
    return stops


def test_two_outs_and_a_hlt_through_the_vcpu_thread():
    code = MOV_DX_PORT + mov_al(ord("H")) + OUT_DX_AL + mov_al(ord("i")) + OUT_DX_AL + HLT
    with realmode_guest(code) as vcpu:
        pio = RecordingBus()
        stops = run_thread(vcpu, pio, RecordingBus())
        assert pio.writes == [(PORT, b"H"), (PORT, b"i")]
        assert [s.kind for s in stops] == [StopKind.HALT]
        assert vcpu.get_regs().rip == CODE + len(code)


def test_vcpu_run_decodes_in_and_out_exits():
    # in al, dx; add al, 1; out dx, al; mov ax, 0x1234; out dx, ax; hlt
    code = MOV_DX_PORT + IN_AL_DX + b"\x04\x01" + OUT_DX_AL + b"\xb8\x34\x12" + OUT_DX_AX + HLT
    with realmode_guest(code) as vcpu:
        assert vcpu.run() == IoExit(PORT, 1, 1, False, b"")
        vcpu.complete_read(b"\x41")
        assert vcpu.run() == IoExit(PORT, 1, 1, True, b"\x42")
        assert vcpu.run() == IoExit(PORT, 2, 1, True, b"\x34\x12")
        assert vcpu.run() == HltExit()


def test_rep_outsb_is_split_into_device_writes():
    # mov si, 0x2000; mov cx, 3; mov dx, PORT; rep outsb; hlt
    code = b"\xbe\x00\x20" + b"\xb9\x03\x00" + MOV_DX_PORT + b"\xf3\x6e" + HLT
    with realmode_guest(code, {0x2000: b"abc"}) as vcpu:
        pio = RecordingBus()
        stops = run_thread(vcpu, pio, RecordingBus())
        assert pio.writes == [(PORT, b"a"), (PORT, b"b"), (PORT, b"c")]
        assert [s.kind for s in stops] == [StopKind.HALT]


def test_unbacked_addresses_exit_as_mmio():
    # mov ax, 0x2000; mov ds, ax; mov byte [0x10], 0x5a; mov al, [0x10]; mov dx, PORT; out dx, al; hlt
    code = b"\xb8\x00\x20" + b"\x8e\xd8" + b"\xc6\x06\x10\x00\x5a" + b"\xa0\x10\x00" + MOV_DX_PORT + OUT_DX_AL + HLT
    with realmode_guest(code) as vcpu:
        assert vcpu.run() == MmioExit(0x20010, 1, True, b"\x5a")
        assert vcpu.run() == MmioExit(0x20010, 1, False, b"")
        vcpu.complete_read(b"\x77")
        assert vcpu.run() == IoExit(PORT, 1, 1, True, b"\x77")


def test_a_spinning_guest_can_be_paused_resumed_and_stopped():
    code = b"\xeb\xfe"  # jmp $
    with realmode_guest(code) as vcpu:
        stops = []
        thread = VcpuThread(vcpu, RecordingBus(), RecordingBus(), stops.append)
        thread.start()
        for _ in range(3):
            thread.pause()
            assert vcpu.get_regs().rip == CODE  # registers are readable only out of KVM_RUN
            thread.resume()
        thread.stop()
        assert not thread.alive
        assert stops == []


def test_kick_interrupts_a_blocked_run():
    with realmode_guest(b"\xeb\xfe") as vcpu:
        result = []
        runner = threading.Thread(target=lambda: result.append(vcpu.run()))
        runner.start()
        runner.join(0.2)
        assert runner.is_alive(), "a spinning guest should keep KVM_RUN busy"
        vcpu.kick()
        runner.join(WAIT)
        assert result == [IntrExit()]


def test_a_failed_ioctl_names_itself():
    with realmode_guest(HLT) as vcpu:
        with pytest.raises(KvmError, match=r"^KVM_CREATE_IRQCHIP failed: \[Errno 22\]"):
            vcpu.vm.create_irqchip()  # too late: vCPUs exist


def test_dirty_log_shows_the_page_the_guest_wrote():
    # mov byte [0x3004], 0x99; hlt
    code = b"\xc6\x06\x04\x30\x99" + HLT
    with realmode_guest(code, memory_flags=lib.KVM_MEM_LOG_DIRTY_PAGES) as vcpu:
        vcpu.vm.get_dirty_log(0, RAM_SIZE)  # start from a clean log
        assert vcpu.run() == HltExit()
        bitmap = int.from_bytes(vcpu.vm.get_dirty_log(0, RAM_SIZE), "little")
        assert bitmap & (1 << 3)
        assert not bitmap & (1 << 5)
        assert vcpu.vm.get_dirty_log(0, RAM_SIZE) == bytes(8)  # reading cleared it
