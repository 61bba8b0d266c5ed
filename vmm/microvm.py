"""A running x86_64 microVM: KVM, guest RAM, the boot data, devices and vCPU threads.

:class:`MicroVm` wires the parts together and knows when the guest has stopped
and why. It boots a kernel, or takes up a machine where a snapshot left it
(:class:`RestorePoint`: RAM already holding the guest, plus the saved state), and
it can pause, hand out its whole state, and resume. It does not know about
files, images, agents or Jupyter.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from vmm.arch.x86_64 import layout
from vmm.arch.x86_64.acpi import write_acpi_tables
from vmm.arch.x86_64.bootparams import write_boot_params
from vmm.arch.x86_64.bzimage import load_kernel
from vmm.arch.x86_64.cpu import setup_boot_vcpu
from vmm.devices.bus import Bus
from vmm.devices.legacy import ACPI_PORT_SPAN, I8042, I8042_PORT_SPAN, AcpiSleepPorts
from vmm.devices.rtc import PORT_SPAN as RTC_PORT_SPAN
from vmm.devices.rtc import CmosRtc
from vmm.devices.serial import Serial
from vmm.devices.virtio.balloon import Balloon
from vmm.devices.virtio.blk import Block
from vmm.devices.virtio.device import VirtioDevice
from vmm.devices.virtio.mmio import REG_QUEUE_NOTIFY, MmioTransport
from vmm.devices.virtio.vsock import Vsock
from vmm.kvm import Kvm
from vmm.kvm import lib as kvm_lib
from vmm.memory import PAGE_SIZE, GuestMemory
from vmm.snapshot import kvm_state
from vmm.snapshot.memory_file import pages_from_dirty_bitmap, union
from vmm.vcpu import StopKind, StopReason, VcpuThread

log = logging.getLogger(__name__)

SERIAL_PORT_SPAN = 8
JOIN_TIMEOUT = 5.0                   # seconds to wait for a device thread to stop
PANIC_MARKER = b"Kernel panic - not syncing"
CONSOLE_TAIL_BYTES = 4096


@dataclass(frozen=True)
class Disk:
    path: Path
    read_only: bool = True


@dataclass
class MicroVmConfig:
    kernel: Path | None = None           # None when restoring: the guest is in RAM already
    cmdline: str = ""
    initrd: Path | bytes | None = None   # a file, or the archive itself
    cpus: int = 1
    memory_mib: int = 512
    disks: list[Disk] = field(default_factory=list)
    console: Callable[[bytes], None] = lambda data: None
    vsock_cid: int = 3               # the device is per VM, so every VM can use the same CID
    vsock_uds: Path | None = None    # Firecracker-style Unix socket for other tools


@dataclass
class RestorePoint:
    """A machine to take up: guest RAM as the snapshot left it, and the saved state
    (:meth:`MicroVm.save_state`)."""
    memory: GuestMemory
    state: dict


class GuestStopped(Exception):
    """How a guest ended: ``reason.kind`` says poweroff, reboot, panic, crash…"""

    def __init__(self, reason: StopReason):
        super().__init__(f"{reason.kind.value}{': ' + reason.detail if reason.detail else ''}")
        self.reason = reason


class _IrqLine:
    """Raising a guest interrupt line from any thread: a write to an irqfd."""

    def __init__(self, vm, gsi: int):
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        vm.irqfd(self.fd, gsi)

    def __call__(self) -> None:
        os.eventfd_write(self.fd, 1)


class _QueueNotifier(threading.Thread):
    """Turns guest QueueNotify writes (caught in the kernel by ioeventfds) into
    ``transport.notify(queue)`` calls, so the vCPU never leaves the guest for them."""

    def __init__(self):
        super().__init__(name="virtio-notify", daemon=True)
        self._epoll = select.epoll()
        self._targets: dict[int, tuple[MmioTransport, int]] = {}
        self._wakeup = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll.register(self._wakeup, select.EPOLLIN)
        self._stopping = False

    def watch(self, vm, transport: MmioTransport, base: int, queues: int) -> None:
        for queue in range(queues):
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            vm.ioeventfd(fd, base + REG_QUEUE_NOTIFY, 4, datamatch=queue)
            self._targets[fd] = (transport, queue)
            self._epoll.register(fd, select.EPOLLIN)

    def run(self) -> None:
        while not self._stopping:
            for fd, _ in self._epoll.poll():
                if fd == self._wakeup:
                    continue
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    continue
                transport, queue = self._targets[fd]
                transport.notify(queue)

    def stop(self) -> None:
        self._stopping = True
        os.eventfd_write(self._wakeup, 1)
        if self.is_alive():
            self.join(JOIN_TIMEOUT)
            if self.is_alive():
                log.warning("the virtio notifier thread did not stop within %s s", JOIN_TIMEOUT)
                return   # leave its fds open: it may still be using them
        for fd in (*self._targets, self._wakeup):
            os.close(fd)
        self._epoll.close()


class MicroVm:
    """Build with a config, :meth:`start`, then :meth:`wait` for the guest to stop."""

    def __init__(self, config: MicroVmConfig, restore: RestorePoint | None = None):
        if config.cpus < 1 or config.memory_mib < 64:
            raise ValueError("a guest needs at least 1 vCPU and 64 MiB of memory")
        self.config = config
        self._stopped = threading.Event()
        self._stop_reason: StopReason | None = None
        self._console_tail = b""
        # Closed in reverse order on close(): device threads first, then the fds and
        # memory they use (an irq fd closed under a running device could be reused).
        self._device_closers: list[Callable[[], None]] = []
        self._closers: list[Callable[[], None]] = []
        self._logging_dirty = False
        self._restored = restore is not None
        try:
            if restore is not None:
                self._closers.append(restore.memory.close)
            self._build(restore)
        except BaseException:
            self.close()
            raise

    # ---- building ---------------------------------------------------------------

    def _build(self, restore: RestorePoint | None) -> None:
        config = self.config
        self.kvm = Kvm()
        self._closers.append(self.kvm.close)
        self.vm = self.kvm.create_vm()
        self._closers.append(self.vm.close)
        self.vm.set_tss_address(layout.KVM_TSS_START)
        self.vm.set_identity_map_address(layout.KVM_IDENTITY_MAP_START)
        self.vm.create_irqchip()
        self.vm.create_pit2()

        if restore is None:
            self.memory = GuestMemory(layout.ram_layout(config.memory_mib << 20))
            self._closers.append(self.memory.close)
        else:
            self.memory = restore.memory
        self.vm.map_memory(self.memory)

        if restore is None:
            kernel = load_kernel(self.memory, config.kernel)
            initrd = config.initrd
            if initrd is not None and not isinstance(initrd, bytes):
                initrd = Path(initrd).read_bytes()
            write_boot_params(self.memory, kernel, config.cmdline, initrd)

        self.pio_bus = Bus("pio")
        self.mmio_bus = Bus("mmio")
        self.serial = Serial(self._on_console, self._irq_line(layout.COM1_IRQ))
        self.pio_bus.register(layout.COM1_PORT, SERIAL_PORT_SPAN, self.serial)
        rtc = CmosRtc()
        self.pio_bus.register(layout.CMOS_RTC_PORT, RTC_PORT_SPAN, rtc)
        i8042 = I8042(on_reset=lambda: self._guest_request(StopKind.REBOOT))
        self.pio_bus.register(layout.I8042_DATA_PORT, I8042_PORT_SPAN, i8042)
        # Legacy devices with state, by the name their state is saved under.
        self._legacy = {"serial": self.serial, "rtc": rtc, "i8042": i8042}
        self.pio_bus.register(layout.ACPI_SLEEP_CONTROL_PORT, ACPI_PORT_SPAN, AcpiSleepPorts(
            on_poweroff=lambda: self._guest_request(StopKind.POWEROFF),
            on_reset=lambda: self._guest_request(StopKind.REBOOT)))

        self._notifier = _QueueNotifier()
        self._device_closers.append(self._notifier.stop)
        self.virtio_devices: list[VirtioDevice] = []
        self._transports: list[MmioTransport] = []
        for disk in config.disks:
            block = Block(disk.path, read_only=disk.read_only)
            self._device_closers.append(block.close)
            self._add_virtio(block)
        self.vsock = Vsock(config.vsock_cid, uds_path=config.vsock_uds)
        self._device_closers.append(self.vsock.close)
        self._add_virtio(self.vsock)
        self.balloon = Balloon()
        self._add_virtio(self.balloon)
        if restore is None:
            write_acpi_tables(self.memory, config.cpus,
                              [layout.virtio_mmio_slot(i) for i in range(len(self.virtio_devices))])
        else:
            kvm_state.restore_vm(self.vm, restore.state["vm"])

        self.vcpus = []
        for index in range(config.cpus):
            vcpu = self.vm.create_vcpu(index)
            self._closers.append(vcpu.close)
            if restore is None:
                setup_boot_vcpu(vcpu, self.kvm, self.memory, index, config.cpus, kernel.entry_point)
            else:
                kvm_state.restore_vcpu(vcpu, restore.state["vcpus"][index])
            self.vcpus.append(VcpuThread(vcpu, self.pio_bus, self.mmio_bus, self._on_vcpu_exit))
        if restore is not None:
            self._restore_devices(restore.state["devices"])

    def _irq_line(self, gsi: int) -> _IrqLine:
        line = _IrqLine(self.vm, gsi)
        self._closers.append(lambda: os.close(line.fd))
        return line

    def _add_virtio(self, device: VirtioDevice) -> None:
        base, gsi = layout.virtio_mmio_slot(len(self.virtio_devices))
        transport = MmioTransport(device, self.memory, self._irq_line(gsi))
        self._transports.append(transport)
        self.mmio_bus.register(base, layout.VIRTIO_MMIO_SIZE, transport)
        self._notifier.watch(self.vm, transport, base, len(device.queue_max_sizes))
        self.virtio_devices.append(device)

    # ---- events from the guest (vCPU and device threads) ------------------------

    def _on_console(self, data: bytes) -> None:
        self._console_tail = (self._console_tail + data)[-CONSOLE_TAIL_BYTES:]
        self.config.console(data)

    def _guest_request(self, kind: StopKind) -> None:
        # A reboot right after a panic (panic=-1) is the panic: say so.
        if kind is StopKind.REBOOT and PANIC_MARKER in self._console_tail:
            tail = self._console_tail[self._console_tail.rfind(PANIC_MARKER):]
            detail = tail.split(b"\n", 1)[0].decode(errors="replace").strip()
            self._finish(StopReason(StopKind.CRASH, -1, detail))
        else:
            self._finish(StopReason(kind, -1))

    def _on_vcpu_exit(self, reason: StopReason) -> None:
        self._finish(reason)

    def _finish(self, reason: StopReason) -> None:
        if self._stop_reason is None:
            self._stop_reason = reason
        self._stopped.set()  # the owner, in wait(), stops the vCPUs

    # ---- owner side --------------------------------------------------------------

    def forward_console_input(self, stream) -> None:
        """Copy ``stream`` (a binary file, e.g. stdin) to the guest's console from a thread."""
        def pump() -> None:
            while chunk := stream.read1(4096):
                self.serial.enqueue_input(chunk)
        threading.Thread(target=pump, name="console-input", daemon=True).start()

    @property
    def console_tail(self) -> bytes:
        """The last few KiB the guest wrote to its console."""
        return self._console_tail

    def start(self) -> None:
        self._notifier.start()
        if self._restored:
            self._resumed()
        for thread in self.vcpus:
            thread.start()

    # ---- snapshots (see vmm/snapshot) ----------------------------------------------------

    def pause(self) -> None:
        """Stop every vCPU with its I/O complete. Devices keep running until
        :meth:`save_state` holds them still."""
        for thread in self.vcpus:
            thread.pause()

    def resume(self) -> None:
        self._resumed()
        for thread in self.vcpus:
            thread.resume()

    def _resumed(self) -> None:
        kvm_state.tell_guest_it_was_paused([thread.vcpu for thread in self.vcpus])
        if self._restored:
            self._restored = False
            for device in self.virtio_devices:
                device.resumed()

    @contextmanager
    def devices_held(self) -> Iterator[None]:
        """Hold every virtio device's lock: no device thread touches guest RAM meanwhile."""
        with ExitStack() as stack:
            for device in self.virtio_devices:
                stack.enter_context(device.lock)
            yield

    def save_state(self) -> dict:
        """Every vCPU, the VM and every device, as JSON-able data. Call while paused and
        inside :meth:`devices_held`."""
        msrs = self.kvm.msr_index_list()
        return {
            "vcpus": [kvm_state.save_vcpu(thread.vcpu, msrs) for thread in self.vcpus],
            "vm": kvm_state.save_vm(self.vm),
            "devices": {
                **{name: device.save_state() for name, device in self._legacy.items()},
                "virtio": [transport.save_state() for transport in self._transports],
            },
        }

    def _restore_devices(self, state: dict) -> None:
        for name, device in self._legacy.items():
            device.restore_state(state[name])
        saved = state["virtio"]
        if len(saved) != len(self._transports):
            raise ValueError(f"{len(saved)} virtio devices saved, this machine has {len(self._transports)}")
        for transport, device_state in zip(self._transports, saved):
            transport.restore_state(device_state)

    def log_dirty_pages(self) -> None:
        """Start tracking the pages written from now on (the guest's through KVM's dirty
        log, the devices' in guest memory), for :meth:`dirty_pages`."""
        if not self._logging_dirty:
            self.vm.map_memory(self.memory, kvm_lib.KVM_MEM_LOG_DIRTY_PAGES)
            self.memory.track_host_writes()
            self._logging_dirty = True

    @property
    def logging_dirty_pages(self) -> bool:
        return self._logging_dirty

    def dirty_pages(self) -> bytes:
        """One byte per page, non-zero where written since the last call (or since
        :meth:`log_dirty_pages`); starts over."""
        guest = b"".join(
            pages_from_dirty_bitmap(self.vm.get_dirty_log(slot, region.size), region.size // PAGE_SIZE)
            for slot, region in enumerate(self.memory.regions))
        return union(guest, self.memory.take_host_writes())

    def wait(self, timeout: float | None = None) -> StopReason | None:
        """The reason the guest stopped, or None if it still runs after ``timeout`` s."""
        if not self._stopped.wait(timeout):
            return None
        for thread in self.vcpus:
            thread.stop()
        return self._stop_reason

    def stop(self) -> None:
        self._finish(StopReason(StopKind.POWEROFF, -1, "stopped by the host"))
        self.wait()

    def close(self) -> None:
        """Stop the guest if it runs and release every host resource, in reverse order."""
        if getattr(self, "vcpus", None):
            for thread in self.vcpus:
                thread.stop()
        for closers in (self._device_closers, self._closers):
            while closers:
                closers.pop()()

    def __enter__(self) -> MicroVm:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
