"""VcpuThread's exit loop and pause/resume/stop, driven by a scripted vCPU (no VM needed)."""

import signal
import threading
from types import SimpleNamespace

import pytest

from vmm.kvm import (
    FailEntryExit,
    HltExit,
    InternalErrorExit,
    IntrExit,
    IoExit,
    MmioExit,
    OtherExit,
    ShutdownExit,
    SystemEventExit,
    Vcpu,
    lib,
)
from vmm.vcpu import StopKind, StopReason, VcpuThread

WAIT = 5.0


class ScriptedVcpu:
    """Returns the scripted exits, then behaves like a spinning guest: ``run`` blocks
    until kicked. A kick outside ``run`` makes the next ``run`` return at once
    (what ``immediate_exit`` does)."""

    index = 3

    def __init__(self, exits=()):
        self._exits = list(exits)
        self._kicked = threading.Event()
        self.in_run = threading.Event()
        self.reads: list[bytes] = []
        self.released_by: threading.Thread | None = None

    def run(self):
        if self._exits:
            return self._exits.pop(0)
        self.in_run.set()
        self._kicked.wait(WAIT)
        self.in_run.clear()
        self._kicked.clear()
        return IntrExit()

    def complete_read(self, data: bytes) -> None:
        self.reads.append(data)

    def kick(self) -> None:
        self._kicked.set()

    def release_thread(self) -> None:
        self.released_by = threading.current_thread()

    def get_regs(self):
        raise OSError("no registers in a scripted vCPU")


class RecordingBus:
    def __init__(self):
        self.writes: list[tuple[int, bytes]] = []
        self.read_from: list[tuple[int, int]] = []

    def read(self, addr: int, size: int) -> bytes:
        self.read_from.append((addr, size))
        return bytes([len(self.read_from)]) * size

    def write(self, addr: int, data: bytes) -> None:
        self.writes.append((addr, bytes(data)))


def run_to_end(exits):
    vcpu, pio, mmio = ScriptedVcpu(exits), RecordingBus(), RecordingBus()
    reasons: list[StopReason] = []
    thread = VcpuThread(vcpu, pio, mmio, reasons.append)
    thread.start()
    thread.join(WAIT)
    assert not thread.alive
    return vcpu, pio, mmio, reasons


def test_port_io_goes_to_the_port_bus():
    vcpu, pio, mmio, reasons = run_to_end([
        IoExit(0x3F8, 1, 1, True, b"A"),
        IoExit(0x3FD, 1, 1, False, b""),
        IoExit(0x80, 2, 3, True, b"\x01\x02\x03\x04\x05\x06"),   # rep outsw
        IoExit(0x60, 1, 2, False, b""),                          # rep insb
        HltExit(),
    ])
    assert pio.writes == [(0x3F8, b"A"), (0x80, b"\x01\x02"), (0x80, b"\x03\x04"), (0x80, b"\x05\x06")]
    assert pio.read_from == [(0x3FD, 1), (0x60, 1), (0x60, 1)]
    assert vcpu.reads == [b"\x01", b"\x02\x03"]
    assert mmio.writes == [] and mmio.read_from == []
    assert reasons == [StopReason(StopKind.HALT, 3)]


def test_mmio_goes_to_the_mmio_bus():
    vcpu, pio, mmio, reasons = run_to_end([
        MmioExit(0xD0000070, 4, True, b"\x0f\x00\x00\x00"),
        MmioExit(0xD0000000, 4, False, b""),
        HltExit(),
    ])
    assert mmio.writes == [(0xD0000070, b"\x0f\x00\x00\x00")]
    assert mmio.read_from == [(0xD0000000, 4)]
    assert vcpu.reads == [b"\x01" * 4]
    assert pio.writes == []


@pytest.mark.parametrize("exit, kind", [
    (SystemEventExit(lib.KVM_SYSTEM_EVENT_SHUTDOWN, ()), StopKind.POWEROFF),
    (SystemEventExit(lib.KVM_SYSTEM_EVENT_RESET, ()), StopKind.REBOOT),
    (SystemEventExit(lib.KVM_SYSTEM_EVENT_CRASH, (1,)), StopKind.CRASH),
    (SystemEventExit(99, ()), StopKind.UNHANDLED_EXIT),
    (ShutdownExit(), StopKind.TRIPLE_FAULT),
    (InternalErrorExit(lib.KVM_INTERNAL_ERROR_EMULATION, (0x1, 0x2)), StopKind.INTERNAL_ERROR),
    (FailEntryExit(0x21, 7), StopKind.FAIL_ENTRY),
    (OtherExit(lib.KVM_EXIT_DEBUG, "KVM_EXIT_DEBUG"), StopKind.UNHANDLED_EXIT),
])
def test_guest_stops_are_reported_once(exit, kind):
    _, _, _, reasons = run_to_end([exit])
    assert [r.kind for r in reasons] == [kind]
    assert reasons[0].vcpu == 3


def test_a_vcpu_thread_that_ends_releases_its_vcpu_first():
    for exits in ([ShutdownExit()], [FailEntryExit(0x21, 7)]):
        vcpu, *_ = run_to_end(exits)
        assert vcpu.released_by is not None and vcpu.released_by is not threading.current_thread()


def test_kick_signals_the_running_thread_and_never_one_that_left(monkeypatch):
    signalled = []
    monkeypatch.setattr(signal, "pthread_kill", lambda ident, signum: signalled.append(ident))
    vcpu = Vcpu.__new__(Vcpu)                   # the kick needs no VM, only its run page
    vcpu._run = SimpleNamespace(immediate_exit=0)
    vcpu._thread_lock = threading.Lock()
    vcpu._thread_id = threading.get_ident()     # as run() leaves it
    vcpu.kick()
    assert signalled == [threading.get_ident()] and vcpu._run.immediate_exit == 1
    vcpu.release_thread()
    vcpu.kick()                                  # pthread_kill on an ended thread would be UB
    assert signalled == [threading.get_ident()]


def test_stop_details_say_what_happened():
    _, _, _, reasons = run_to_end([FailEntryExit(0x21, 7)])
    assert reasons[0].detail == "hardware reason 0x21 on host cpu 7"
    _, _, _, reasons = run_to_end([OtherExit(lib.KVM_EXIT_DEBUG, "KVM_EXIT_DEBUG")])
    assert reasons[0].detail.startswith("KVM_EXIT_DEBUG at rip ")


def test_a_failing_device_stops_the_vcpu_with_an_error():
    class BrokenBus(RecordingBus):
        def write(self, addr, data):
            raise RuntimeError("device exploded")

    reasons = []
    thread = VcpuThread(ScriptedVcpu([IoExit(0x3F8, 1, 1, True, b"A")]), BrokenBus(), RecordingBus(), reasons.append)
    thread.start()
    thread.join(WAIT)
    assert reasons == [StopReason(StopKind.ERROR, 3, "RuntimeError: device exploded")]
    assert thread.stop_reason == reasons[0]


def test_pause_resume_stop():
    vcpu = ScriptedVcpu([IoExit(0x3F8, 1, 1, True, b"A")])
    reasons = []
    thread = VcpuThread(vcpu, RecordingBus(), RecordingBus(), reasons.append)
    thread.start()
    assert vcpu.in_run.wait(WAIT)

    thread.pause()
    assert not vcpu.in_run.is_set()  # out of run, parked
    thread.pause()                   # pausing a paused vCPU returns at once

    thread.resume()
    assert vcpu.in_run.wait(WAIT)

    thread.stop()
    assert not thread.alive
    assert reasons == []             # the owner stopped it: nothing to report
    assert thread.stop_reason is None


def test_stop_while_paused():
    vcpu = ScriptedVcpu()
    thread = VcpuThread(vcpu, RecordingBus(), RecordingBus(), lambda reason: None)
    thread.start()
    assert vcpu.in_run.wait(WAIT)
    thread.pause()
    thread.stop()
    assert not thread.alive


def test_on_exit_may_stop_its_own_thread():
    holder = {}
    thread = VcpuThread(ScriptedVcpu([HltExit()]), RecordingBus(), RecordingBus(),
                        lambda reason: holder["thread"].stop())
    holder["thread"] = thread
    thread.start()
    thread.join(WAIT)
    assert not thread.alive
    assert thread.stop_reason.kind is StopKind.HALT


def test_pause_after_the_guest_stopped_returns():
    thread = VcpuThread(ScriptedVcpu([HltExit()]), RecordingBus(), RecordingBus(), lambda reason: None)
    thread.start()
    thread.join(WAIT)
    thread.pause()
    thread.resume()
    thread.stop()
