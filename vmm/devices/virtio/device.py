"""What a virtio device implements, independent of its transport.

The transport (virtio-mmio) owns the registers, the feature handshake and the
queues' configuration; the device owns its configuration space and what it
does with the buffers. The transport calls, in order: :meth:`VirtioDevice.activate`
when the driver sets DRIVER_OK, :meth:`VirtioDevice.process` for each queue
notification, and :meth:`VirtioDevice.reset` when the driver resets the device.
All of them, and config accesses, run under :attr:`VirtioDevice.lock`; a device
that works from its own host threads (a vsock backend, say) takes the same lock.
"""

from __future__ import annotations

import threading
from typing import Protocol

from vmm.devices.virtio.errors import VirtioError
from vmm.devices.virtio.queue import Queue
from vmm.memory import GuestMemory

# Device-independent feature bits (virtio 1.2 §6).
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32

# Device IDs (virtio 1.2 §5).
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_BALLOON = 5
VIRTIO_ID_VSOCK = 19


def feature(bit: int) -> int:
    return 1 << bit


class Interrupt(Protocol):
    """How a device tells the driver something happened."""

    def signal_used_queue(self) -> None:
        """Used buffers are waiting in some queue."""

    def signal_config_change(self) -> None:
        """The configuration space changed."""

    def device_error(self, error: VirtioError) -> None:
        """Work done on a host thread found the driver broke the protocol:
        stop the device until the driver resets it."""


class VirtioDevice:
    """Base class: subclasses set the class attributes and override the hooks."""

    device_id: int = 0
    queue_max_sizes: tuple[int, ...] = ()

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.avail_features = feature(VIRTIO_F_VERSION_1)
        self.acked_features = 0

    def has_feature(self, bit: int) -> bool:
        return bool(self.acked_features & feature(bit))

    def config_bytes(self) -> bytes:
        """The configuration space as the driver sees it (read-only by default)."""
        return b""

    def read_config(self, offset: int, size: int) -> bytes:
        """``size`` bytes of config space at ``offset``; zeros past its end."""
        config = self.config_bytes()
        data = config[offset : offset + size] if 0 <= offset < len(config) else b""
        return data + b"\x00" * (size - len(data))

    def write_config(self, offset: int, data: bytes) -> None:
        """Driver writes to config space; ignored unless a device has writable fields."""

    def activate(self, memory: GuestMemory, queues: list[Queue], interrupt: Interrupt) -> None:
        """Start working: the queues are configured and checked, ``acked_features`` is final."""
        self.memory = memory
        self.queues = queues
        self.interrupt = interrupt

    def process(self, queue_index: int) -> None:
        """The driver notified ``queue_index``. May raise :class:`VirtioError`."""

    def reset(self) -> None:
        """Forget everything the driver set up; the queues are reset by the transport."""
        self.acked_features = 0

    def save_state(self) -> dict:
        """What the device must keep across a snapshot (the transport keeps the queues)."""
        return {"acked_features": self.acked_features}

    def restore_state(self, state: dict) -> None:
        """Called before the transport re-activates the device on restore."""
        self.acked_features = state["acked_features"] & self.avail_features

    def resumed(self) -> None:
        """The machine runs again after a restore: reconnect to the world outside."""
