"""The virtio-mmio transport, version 2 register layout (virtio 1.2 §4.2.2).

One :class:`MmioTransport` wraps one :class:`VirtioDevice` and sits on the MMIO
bus at its slot (``layout.virtio_mmio_slot``). It runs the status handshake,
keeps queue configuration, and refuses anything out of order: queue fields
change only between FEATURES_OK and DRIVER_OK, features only before
FEATURES_OK, and FEATURES_OK only if the driver accepted a subset of what was
offered that includes VIRTIO_F_VERSION_1. Odd-sized or unaligned register
accesses are dropped and counted.

When the device hits a :class:`VirtioError` the transport sets
DEVICE_NEEDS_RESET, raises a configuration-change interrupt and ignores the
device's queues until the driver writes 0 to Status.
"""

from __future__ import annotations

import logging
from typing import Callable

from vmm.devices.virtio.device import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_VERSION_1,
    VirtioDevice,
    feature,
)
from vmm.devices.virtio.errors import VirtioError
from vmm.devices.virtio.queue import Queue
from vmm.memory import GuestMemory

log = logging.getLogger(__name__)

MAGIC_VALUE = 0x74726976     # "virt"
VERSION = 2
VENDOR_ID = 0

# Register offsets (§4.2.2, table "MMIO Device Register Layout").
REG_MAGIC_VALUE = 0x000
REG_VERSION = 0x004
REG_DEVICE_ID = 0x008
REG_VENDOR_ID = 0x00C
REG_DEVICE_FEATURES = 0x010
REG_DEVICE_FEATURES_SEL = 0x014
REG_DRIVER_FEATURES = 0x020
REG_DRIVER_FEATURES_SEL = 0x024
REG_QUEUE_SEL = 0x030
REG_QUEUE_NUM_MAX = 0x034
REG_QUEUE_NUM = 0x038
REG_QUEUE_READY = 0x044
REG_QUEUE_NOTIFY = 0x050
REG_INTERRUPT_STATUS = 0x060
REG_INTERRUPT_ACK = 0x064
REG_STATUS = 0x070
REG_QUEUE_DESC_LOW = 0x080
REG_QUEUE_DESC_HIGH = 0x084
REG_QUEUE_DRIVER_LOW = 0x090
REG_QUEUE_DRIVER_HIGH = 0x094
REG_QUEUE_DEVICE_LOW = 0x0A0
REG_QUEUE_DEVICE_HIGH = 0x0A4
REG_SHM_SEL = 0x0AC
REG_SHM_LEN_LOW = 0x0B0
REG_SHM_BASE_HIGH = 0x0BC
REG_CONFIG_GENERATION = 0x0FC
CONFIG_SPACE = 0x100

# Device status bits (§2.1).
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 64
STATUS_FAILED = 128

# The handshake, in the order the driver must add the bits (§3.1.1).
_HANDSHAKE = (STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_FEATURES_OK, STATUS_DRIVER_OK)

INTERRUPT_USED_BUFFER = 1
INTERRUPT_CONFIG_CHANGE = 2

FEATURE_SELECT_LIMIT = 4     # feature words the driver may write (bits 0..127)

# Ring address registers: offset -> (queue attribute, shift of the 32-bit half).
_QUEUE_ADDRESS_REGS = {
    REG_QUEUE_DESC_LOW: ("desc_table", 0),
    REG_QUEUE_DESC_HIGH: ("desc_table", 32),
    REG_QUEUE_DRIVER_LOW: ("avail_ring", 0),
    REG_QUEUE_DRIVER_HIGH: ("avail_ring", 32),
    REG_QUEUE_DEVICE_LOW: ("used_ring", 0),
    REG_QUEUE_DEVICE_HIGH: ("used_ring", 32),
}


class MmioTransport:
    """Registers of one virtio-mmio device; a bus device for the MMIO bus."""

    def __init__(self, device: VirtioDevice, memory: GuestMemory, irq: Callable[[], None]):
        self.device = device
        self.memory = memory
        self._irq = irq
        self.queues = [Queue(size) for size in device.queue_max_sizes]
        self.bad_accesses = 0     # wrong size, unaligned, unknown register
        self.refused_writes = 0   # right register, wrong moment or value
        self._reset_state()

    def _reset_state(self) -> None:
        self.status = 0
        self.interrupt_status = 0
        self.config_generation = 0
        self.device_features_select = 0
        self.driver_features_select = 0
        self.driver_features = 0
        self.queue_select = 0
        for queue in self.queues:
            queue.reset()

    @property
    def broken(self) -> bool:
        """DEVICE_NEEDS_RESET is set: the device waits for the driver to reset it."""
        return bool(self.status & STATUS_DEVICE_NEEDS_RESET)

    @property
    def activated(self) -> bool:
        return bool(self.status & STATUS_DRIVER_OK) and not self.broken

    def _selected_queue(self) -> Queue | None:
        return self.queues[self.queue_select] if self.queue_select < len(self.queues) else None

    def _bad(self, what: str) -> None:
        self.bad_accesses += 1
        if self.bad_accesses == 1:
            log.debug("virtio-mmio device %d: %s", self.device.device_id, what)

    def _refuse(self, what: str) -> None:
        self.refused_writes += 1
        log.debug("virtio-mmio device %d: refused %s (status %#x)", self.device.device_id, what, self.status)

    # --- bus device --------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        with self.device.lock:
            if offset >= CONFIG_SPACE:
                if size not in (1, 2, 4):
                    self._bad(f"config read of {size} bytes")
                    return b"\x00" * size
                return self.device.read_config(offset - CONFIG_SPACE, size)
            if size != 4 or offset % 4:
                self._bad(f"register read of {size} bytes at {offset:#x}")
                return b"\x00" * size
            return self._read_register(offset).to_bytes(4, "little")

    def write(self, offset: int, data: bytes) -> None:
        with self.device.lock:
            if offset >= CONFIG_SPACE:
                if len(data) not in (1, 2, 4):
                    self._bad(f"config write of {len(data)} bytes")
                elif self.broken or not self.status & STATUS_DRIVER:
                    self._refuse("config write")
                else:
                    self.device.write_config(offset - CONFIG_SPACE, bytes(data))
                return
            if len(data) != 4 or offset % 4:
                self._bad(f"register write of {len(data)} bytes at {offset:#x}")
                return
            self._write_register(offset, int.from_bytes(data, "little"))

    # --- registers -----------------------------------------------------------

    def _read_register(self, offset: int) -> int:
        queue = self._selected_queue()
        if offset == REG_MAGIC_VALUE:
            return MAGIC_VALUE
        if offset == REG_VERSION:
            return VERSION
        if offset == REG_DEVICE_ID:
            return self.device.device_id
        if offset == REG_VENDOR_ID:
            return VENDOR_ID
        if offset == REG_DEVICE_FEATURES:
            if self.device_features_select >= FEATURE_SELECT_LIMIT:
                return 0
            return (self.device.avail_features >> (32 * self.device_features_select)) & 0xFFFFFFFF
        if offset == REG_QUEUE_NUM_MAX:
            return queue.max_size if queue else 0
        if offset == REG_QUEUE_READY:
            return int(bool(queue and queue.ready))
        if offset == REG_INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == REG_STATUS:
            return self.status
        if offset == REG_CONFIG_GENERATION:
            return self.config_generation
        if REG_SHM_LEN_LOW <= offset <= REG_SHM_BASE_HIGH:
            return 0xFFFFFFFF  # no shared memory regions: length and base read as ~0
        self._bad(f"read of register {offset:#x}")
        return 0

    def _write_register(self, offset: int, value: int) -> None:
        if offset == REG_DEVICE_FEATURES_SEL:
            self.device_features_select = value
        elif offset == REG_DRIVER_FEATURES:
            self._write_driver_features(value)
        elif offset == REG_DRIVER_FEATURES_SEL:
            self.driver_features_select = value
        elif offset == REG_QUEUE_SEL:
            self.queue_select = value
        elif offset == REG_QUEUE_NUM:
            queue = self._configurable_queue("QueueNum")
            if queue:
                queue.size = value
        elif offset == REG_QUEUE_READY:
            queue = self._queue_in_setup("QueueReady")
            if queue:
                queue.ready = bool(value & 1)
        elif offset in _QUEUE_ADDRESS_REGS:
            queue = self._configurable_queue(f"queue address register {offset:#x}")
            if queue:
                name, shift = _QUEUE_ADDRESS_REGS[offset]
                old = getattr(queue, name)
                setattr(queue, name, (old & ~(0xFFFFFFFF << shift)) | (value << shift))
        elif offset == REG_QUEUE_NOTIFY:
            self.notify(value)
        elif offset == REG_INTERRUPT_ACK:
            self.interrupt_status &= ~value
        elif offset == REG_STATUS:
            self._write_status(value)
        elif offset == REG_SHM_SEL:
            pass  # no regions to select
        else:
            self._bad(f"write of register {offset:#x}")

    def _write_driver_features(self, value: int) -> None:
        if self.status & (STATUS_FEATURES_OK | STATUS_DEVICE_NEEDS_RESET) or not self.status & STATUS_DRIVER:
            self._refuse("DriverFeatures")
            return
        if self.driver_features_select >= FEATURE_SELECT_LIMIT:
            if value:
                self._refuse(f"DriverFeatures word {self.driver_features_select}")
            return
        shift = 32 * self.driver_features_select
        self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)

    def _queue_in_setup(self, what: str) -> Queue | None:
        """The selected queue, if the driver may configure queues now."""
        setup = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
        queue = self._selected_queue()
        if self.status != setup or queue is None:
            self._refuse(what)
            return None
        return queue

    def _configurable_queue(self, what: str) -> Queue | None:
        """Like :meth:`_queue_in_setup`, and the queue is not ready yet."""
        queue = self._queue_in_setup(what)
        if queue is not None and queue.ready:
            self._refuse(f"{what} on a ready queue")
            return None
        return queue

    # --- status handshake ----------------------------------------------------

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        if value & self.status != self.status:
            self._refuse(f"Status {value:#x} clearing bits without a reset")
            return
        added = value & ~self.status
        if added & STATUS_FAILED:
            self.status |= STATUS_FAILED
            added &= ~STATUS_FAILED
        for bit in _HANDSHAKE:
            if added & bit:
                if not self._advance(bit):
                    self._refuse(f"Status bit {bit:#x}")
                    return
                added &= ~bit
        if added:
            self._refuse(f"Status bits {added:#x}")

    def _advance(self, bit: int) -> bool:
        """Add one handshake bit if it is the next one and its conditions hold."""
        if self.status & (STATUS_FAILED | STATUS_DEVICE_NEEDS_RESET):
            return False
        expected_before = 0
        for step in _HANDSHAKE:
            if step == bit:
                break
            expected_before |= step
        if self.status != expected_before:
            return False
        if bit == STATUS_FEATURES_OK and not self._accept_features():
            return False
        self.status |= bit
        if bit == STATUS_DRIVER_OK:
            self._activate()
        return True

    def _accept_features(self) -> bool:
        offered = self.device.avail_features
        if self.driver_features & ~offered:
            log.debug("driver accepted unoffered features %#x", self.driver_features & ~offered)
            return False
        if not self.driver_features & feature(VIRTIO_F_VERSION_1):
            log.debug("driver did not accept VIRTIO_F_VERSION_1")
            return False
        self.device.acked_features = self.driver_features
        return True

    def _activate(self) -> None:
        event_idx = self.device.has_feature(VIRTIO_F_EVENT_IDX)
        try:
            for queue in self.queues:
                if queue.ready:
                    queue.activate(self.memory, event_idx)
            self.device.activate(self.memory, self.queues, self)
        except VirtioError as error:
            self._fail(error)

    def reset(self) -> None:
        """Back to the state after power-on (the driver wrote 0 to Status)."""
        with self.device.lock:
            self._reset_state()
            self.device.reset()

    # --- snapshots ---------------------------------------------------------------

    _SAVED = ("status", "interrupt_status", "config_generation", "device_features_select",
              "driver_features_select", "driver_features", "queue_select")

    def save_state(self) -> dict:
        with self.device.lock:
            state = {name: getattr(self, name) for name in self._SAVED}
            state["queues"] = [queue.save_state() for queue in self.queues]
            state["device"] = self.device.save_state()
            return state

    def restore_state(self, state: dict) -> None:
        """Back to where a snapshot left the transport; a device the driver had started
        is started again on the same rings (checked against guest RAM as on DRIVER_OK)."""
        with self.device.lock:
            if len(state["queues"]) != len(self.queues):
                raise ValueError(f"{len(state['queues'])} queues saved, device has {len(self.queues)}")
            for name in self._SAVED:
                setattr(self, name, int(state[name]))
            for queue, saved in zip(self.queues, state["queues"]):
                queue.restore_state(saved)
            self.device.restore_state(state["device"])
            if self.activated:
                self._activate()

    # --- device side -----------------------------------------------------------

    def notify(self, queue_index: int) -> None:
        """The driver kicked ``queue_index`` (QueueNotify write or ioeventfd)."""
        with self.device.lock:
            if not self.activated:
                self._refuse(f"notify of queue {queue_index}")
                return
            if queue_index >= len(self.queues) or not self.queues[queue_index].ready:
                self._bad(f"notify of unknown queue {queue_index}")
                return
            try:
                self.device.process(queue_index)
            except VirtioError as error:
                self._fail(error)

    def _fail(self, error: VirtioError) -> None:
        log.warning("virtio device %d needs a reset: %s: %s",
                    self.device.device_id, type(error).__name__, error)
        self.status |= STATUS_DEVICE_NEEDS_RESET
        self.signal_config_change()

    def _raise_interrupt(self, reason: int) -> None:
        with self.device.lock:
            newly_set = reason & ~self.interrupt_status
            self.interrupt_status |= reason
        # One edge per rising InterruptStatus bit: the driver acks what it read,
        # and anything set after its read raises a new edge.
        if newly_set:
            self._irq()

    def signal_used_queue(self) -> None:
        self._raise_interrupt(INTERRUPT_USED_BUFFER)

    def signal_config_change(self) -> None:
        with self.device.lock:
            self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
        self._raise_interrupt(INTERRUPT_CONFIG_CHANGE)

    def device_error(self, error: VirtioError) -> None:
        """A device's host thread found the driver broke the protocol."""
        with self.device.lock:
            self._fail(error)
