"""The root of every failure a virtio driver (the guest) can cause.

Each module names its own failures as subclasses, so a transport can catch
this one class, mark the device as needing a reset, and keep the VMM running.
"""


class VirtioError(Exception):
    """The driver broke the virtio protocol; the device cannot go on."""
