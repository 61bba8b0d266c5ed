"""Address-range dispatch of guest port I/O and MMIO accesses to devices.

A machine has two buses, one for port I/O and one for MMIO. Each device owns
a fixed range ``[base, base + length)`` and sees accesses relative to its
base. An access no device wholly owns reads as all-ones (what an empty ISA
or PCI bus returns) and its writes are dropped.
"""

from __future__ import annotations

import bisect
import logging
import threading
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)

# Unknown addresses are logged once each; a guest scanning the address space
# must not grow this set without bound.
_MAX_LOGGED_UNKNOWN = 256


class BusDevice(Protocol):
    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


class BusError(Exception):
    """A registration the bus cannot accept (overlap, empty range)."""


@dataclass
class _Slot:
    base: int
    end: int
    device: BusDevice
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class Bus:
    """Non-overlapping device ranges, looked up by address.

    Register every device before the vCPUs run. Each device call runs under
    that device's own lock, so vCPU threads may share a bus; devices with entry
    points off the bus (host input, queue notification threads) guard those
    themselves.
    """

    def __init__(self, name: str):
        self.name = name
        self._slots: list[_Slot] = []
        self._bases: list[int] = []
        self._logged_unknown: set[int] = set()
        self.unknown_accesses = 0

    def register(self, base: int, length: int, device: BusDevice) -> None:
        if length <= 0 or base < 0:
            raise BusError(f"{self.name}: bad range {base:#x}+{length:#x}")
        end = base + length
        i = bisect.bisect_left(self._bases, base)
        if i > 0 and self._slots[i - 1].end > base:
            raise BusError(f"{self.name}: {base:#x}+{length:#x} overlaps {self._slots[i - 1]}")
        if i < len(self._slots) and self._slots[i].base < end:
            raise BusError(f"{self.name}: {base:#x}+{length:#x} overlaps {self._slots[i]}")
        self._slots.insert(i, _Slot(base, end, device))
        self._bases.insert(i, base)

    def _find(self, addr: int, size: int) -> _Slot | None:
        i = bisect.bisect_right(self._bases, addr) - 1
        if i >= 0:
            slot = self._slots[i]
            if addr + size <= slot.end:
                return slot
        return None

    def _unknown(self, kind: str, addr: int, size: int) -> None:
        self.unknown_accesses += 1
        if addr not in self._logged_unknown and len(self._logged_unknown) < _MAX_LOGGED_UNKNOWN:
            self._logged_unknown.add(addr)
            log.debug("%s: %s of %d bytes at unclaimed %#x", self.name, kind, size, addr)

    def read(self, addr: int, size: int) -> bytes:
        slot = self._find(addr, size)
        if slot is None:
            self._unknown("read", addr, size)
            return b"\xff" * size
        with slot.lock:
            return slot.device.read(addr - slot.base, size)

    def write(self, addr: int, data: bytes) -> None:
        slot = self._find(addr, len(data))
        if slot is None:
            self._unknown("write", addr, len(data))
            return
        with slot.lock:
            slot.device.write(addr - slot.base, data)
