"""virtio-vsock: the device, its packets and connections, and the host's API."""

from vmm.devices.virtio.vsock.device import Vsock
from vmm.devices.virtio.vsock.host import VsockListener, VsockStream

__all__ = ["Vsock", "VsockListener", "VsockStream"]
