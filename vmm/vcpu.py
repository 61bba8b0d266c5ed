"""One thread per vCPU: run the guest, hand its I/O to the buses, obey pause/resume/stop.

The owner talks to a :class:`VcpuThread` only through its methods (requests plus a
kick that knocks the vCPU out of KVM_RUN); the thread reports why the guest stopped
through the ``on_exit`` callback, called once, from the vCPU thread.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

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

log = logging.getLogger(__name__)

DEFAULT_PAUSE_TIMEOUT = 5.0  # seconds; a kicked vCPU leaves KVM_RUN in microseconds


class Bus(Protocol):
    """What the exit loop needs of a bus (vmm.devices.bus.Bus)."""

    def read(self, addr: int, size: int) -> bytes: ...

    def write(self, addr: int, data: bytes) -> None: ...


class StopKind(enum.Enum):
    POWEROFF = "poweroff"              # guest asked to power off (KVM_SYSTEM_EVENT_SHUTDOWN)
    REBOOT = "reboot"                  # guest asked to reset (KVM_SYSTEM_EVENT_RESET)
    CRASH = "crash"                    # guest reported a panic (KVM_SYSTEM_EVENT_CRASH)
    TRIPLE_FAULT = "triple-fault"      # KVM_EXIT_SHUTDOWN
    HALT = "halt"                      # HLT reached userspace (only without an in-kernel irqchip)
    INTERNAL_ERROR = "internal-error"  # KVM could not emulate or deliver something
    FAIL_ENTRY = "fail-entry"          # the hardware refused to enter the guest
    UNHANDLED_EXIT = "unhandled-exit"  # an exit reason the VMM does not handle
    ERROR = "error"                    # the VMM itself failed on this vCPU thread


@dataclass(frozen=True)
class StopReason:
    kind: StopKind
    vcpu: int
    detail: str = ""


_SYSTEM_EVENT_KINDS = {
    lib.KVM_SYSTEM_EVENT_SHUTDOWN: StopKind.POWEROFF,
    lib.KVM_SYSTEM_EVENT_RESET: StopKind.REBOOT,
    lib.KVM_SYSTEM_EVENT_CRASH: StopKind.CRASH,
}


class _State(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


class VcpuThread:
    """Runs ``vcpu`` in its own thread until the guest stops or :meth:`stop` is called."""

    def __init__(self, vcpu: Vcpu, pio_bus: Bus, mmio_bus: Bus,
                 on_exit: Callable[[StopReason], None]):
        self.vcpu = vcpu
        self._pio = pio_bus
        self._mmio = mmio_bus
        self._on_exit = on_exit
        self._cond = threading.Condition()
        self._wanted = _State.RUNNING   # what the owner asked for
        self._state = _State.RUNNING    # where the thread is; STOPPED once it has ended
        self.stop_reason: StopReason | None = None
        self._thread = threading.Thread(target=self._main, name=f"vcpu{vcpu.index}", daemon=True)

    # ---- owner side ---------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def pause(self, timeout: float = DEFAULT_PAUSE_TIMEOUT) -> None:
        """Return once the vCPU is out of KVM_RUN with its last I/O completed (or has ended)."""
        with self._cond:
            if self._state is _State.STOPPED:
                return
            self._wanted = _State.PAUSED
        self.vcpu.kick()
        with self._cond:
            if not self._cond.wait_for(lambda: self._state is not _State.RUNNING, timeout):
                raise TimeoutError(f"vCPU {self.vcpu.index} did not pause within {timeout} s")

    def resume(self) -> None:
        with self._cond:
            if self._wanted is _State.PAUSED:
                self._wanted = _State.RUNNING
                self._cond.notify_all()

    def stop(self, timeout: float = DEFAULT_PAUSE_TIMEOUT) -> None:
        """End the thread (without calling ``on_exit``) and wait for it, unless called from it."""
        with self._cond:
            self._wanted = _State.STOPPED
            self._cond.notify_all()
        self.vcpu.kick()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"vCPU {self.vcpu.index} did not stop within {timeout} s")

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ---- vCPU thread ----------------------------------------------------------------

    def _main(self) -> None:
        try:
            reason = self._loop()
        except Exception as e:  # a VMM bug or a failed ioctl: report it, never die silently
            log.exception("vCPU %d failed", self.vcpu.index)
            reason = StopReason(StopKind.ERROR, self.vcpu.index, f"{type(e).__name__}: {e}")
        self.vcpu.release_thread()
        with self._cond:
            self.stop_reason = reason
            self._state = _State.STOPPED
            self._cond.notify_all()
        if reason is not None:
            self._on_exit(reason)

    def _loop(self) -> StopReason | None:
        run = self.vcpu.run
        while True:
            exit = run()
            kind = type(exit)
            if kind is IoExit:
                self._port_io(exit)
            elif kind is MmioExit:
                self._mmio_access(exit)
            elif kind is IntrExit:
                # Only here is the guest consistent: a kick makes the run after an
                # I/O exit complete that I/O and return at once (immediate_exit).
                if self._wanted is not _State.RUNNING and not self._park():
                    return None
            else:
                return self._stop_reason(exit)

    def _park(self) -> bool:
        """Wait while paused; False when asked to stop."""
        with self._cond:
            self._state = _State.PAUSED
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._wanted is not _State.PAUSED)
            if self._wanted is _State.STOPPED:
                return False
            self._state = _State.RUNNING
            return True

    def _port_io(self, exit: IoExit) -> None:
        port, size, count = exit.port, exit.size, exit.count
        if exit.is_write:
            if count == 1:
                self._pio.write(port, exit.data)
            else:  # rep outs: one device write per element
                data = exit.data
                for offset in range(0, count * size, size):
                    self._pio.write(port, data[offset:offset + size])
        elif count == 1:
            self.vcpu.complete_read(self._pio.read(port, size))
        else:
            self.vcpu.complete_read(b"".join(self._pio.read(port, size) for _ in range(count)))

    def _mmio_access(self, exit: MmioExit) -> None:
        if exit.is_write:
            self._mmio.write(exit.address, exit.data)
        else:
            self.vcpu.complete_read(self._mmio.read(exit.address, exit.size))

    def _stop_reason(self, exit) -> StopReason:
        index = self.vcpu.index
        if isinstance(exit, HltExit):
            return StopReason(StopKind.HALT, index)
        if isinstance(exit, ShutdownExit):
            return StopReason(StopKind.TRIPLE_FAULT, index, f"at rip {self._rip()}")
        if isinstance(exit, SystemEventExit):
            kind = _SYSTEM_EVENT_KINDS.get(exit.type)
            if kind is None:
                return StopReason(StopKind.UNHANDLED_EXIT, index, f"system event {exit.type}")
            return StopReason(kind, index, f"data {[hex(d) for d in exit.data]}" if exit.data else "")
        if isinstance(exit, InternalErrorExit):
            return StopReason(StopKind.INTERNAL_ERROR, index,
                              f"suberror {exit.suberror} data {[hex(d) for d in exit.data]} at rip {self._rip()}")
        if isinstance(exit, FailEntryExit):
            return StopReason(StopKind.FAIL_ENTRY, index,
                              f"hardware reason {exit.hardware_reason:#x} on host cpu {exit.cpu}")
        assert isinstance(exit, OtherExit)
        return StopReason(StopKind.UNHANDLED_EXIT, index, f"{exit.name} at rip {self._rip()}")

    def _rip(self) -> str:
        try:
            return hex(self.vcpu.get_regs().rip)
        except OSError:
            return "unknown"
