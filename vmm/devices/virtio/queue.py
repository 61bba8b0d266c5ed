"""The split virtqueue, device side (virtio 1.2 §2.7).

Everything in the rings is written by the guest and checked before use: the
ring addresses when the queue is activated, each available index, each
descriptor, and each buffer, which must lie wholly inside one guest RAM
region. A chain walk carries a time-to-live of the table's size, so a cyclic
chain ends. Failures are :class:`VirtioError` subclasses named after what the
driver got wrong.

Ring layouts (all little-endian):

* descriptor table, 16-byte aligned: ``{le64 addr; le32 len; le16 flags; le16 next}[size]``
* available ring, 2-byte aligned: ``le16 flags; le16 idx; le16 ring[size]; le16 used_event``
* used ring, 4-byte aligned: ``le16 flags; le16 idx; {le32 id; le32 len}[size]; le16 avail_event``
"""

from __future__ import annotations

import struct
import threading
from typing import Iterator, NamedTuple

from vmm.devices.virtio.errors import VirtioError
from vmm.memory import GuestMemory

MAX_QUEUE_SIZE = 32768

DESC_SIZE = 16
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4
USED_ELEM_SIZE = 8

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")


class InvalidQueueConfig(VirtioError):
    """The driver configured a queue the device cannot use."""


class InvalidQueueSize(InvalidQueueConfig):
    """Queue size is zero, not a power of two, or above the device's maximum."""


class MisalignedRing(InvalidQueueConfig):
    """A ring's guest address lacks the alignment §2.7 requires."""


class RingOutOfGuestMemory(InvalidQueueConfig):
    """A ring does not lie wholly inside guest RAM."""


class AvailRingOverrun(VirtioError):
    """The available index ran more than a queue size ahead of the device."""


class DescriptorIndexOutOfRange(VirtioError):
    """A head or next index points past the end of its descriptor table."""


class DescriptorChainLoop(VirtioError):
    """A chain is longer than its table, so it must revisit a descriptor."""


class DescriptorOutOfGuestMemory(VirtioError):
    """A buffer does not lie wholly inside one guest RAM region."""


class InvalidIndirectTable(VirtioError):
    """An indirect descriptor is nested, chained, empty, ragged, or outside RAM."""


class ReadableAfterWritable(VirtioError):
    """A device-readable buffer follows a device-writable one (§2.7.4.2)."""


class ChainTooShort(VirtioError):
    """A device asked for more bytes than the chain's buffers hold."""


def _fence() -> None:
    # A full memory barrier between our store and the next load of a field
    # the guest writes (store→load can reorder even on x86). Taking a lock is
    # a locked read-modify-write, which orders both.
    with _FENCE_LOCK:
        pass


_FENCE_LOCK = threading.Lock()


class Buffer(NamedTuple):
    """One guest buffer of a chain, already checked to be inside guest RAM (a tuple:
    the hot path builds one per descriptor)."""

    gpa: int
    length: int
    writable: bool


class DescriptorChain:
    """The buffers of one available chain: readable ones, then writable ones."""

    def __init__(self, memory: GuestMemory, head: int, buffers: list[Buffer]):
        self.memory = memory
        self.head = head
        self.buffers = buffers
        self.readable = [b for b in buffers if not b.writable]
        self.writable = [b for b in buffers if b.writable]
        self.readable_length = sum(b.length for b in self.readable)
        self.writable_length = sum(b.length for b in self.writable)

    def __repr__(self) -> str:
        return f"DescriptorChain(head={self.head}, buffers={self.buffers})"

    def _views(self, buffers: list[Buffer], total: int, offset: int, length: int | None) -> list[memoryview]:
        if length is None:
            length = total - offset
        if offset < 0 or length < 0 or offset + length > total:
            raise ChainTooShort(f"chain {self.head}: wants {offset}+{length} of {total} bytes")
        views = []
        for buf in buffers:
            if length == 0:
                break
            if offset >= buf.length:
                offset -= buf.length
                continue
            take = min(buf.length - offset, length)
            views.append(self.memory.view(buf.gpa + offset, take))
            offset = 0
            length -= take
        return views

    def readable_views(self, offset: int = 0, length: int | None = None) -> list[memoryview]:
        """Zero-copy views of readable bytes ``[offset, offset + length)``."""
        return self._views(self.readable, self.readable_length, offset, length)

    def writable_views(self, offset: int = 0, length: int | None = None) -> list[memoryview]:
        """Zero-copy views of writable bytes ``[offset, offset + length)``."""
        return self._views(self.writable, self.writable_length, offset, length)

    def read(self, offset: int, length: int) -> bytes:
        return b"".join(bytes(v) for v in self.readable_views(offset, length))

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        data = memoryview(data).cast("B")
        pos = 0
        for view in self.writable_views(offset, len(data)):
            view[:] = data[pos : pos + len(view)]
            pos += len(view)


class Queue:
    """One split virtqueue: configuration set by the transport, state kept here.

    The transport writes ``size``, ``ready`` and the three ring addresses while
    the driver sets the queue up; :meth:`activate` checks them against guest
    RAM before the device uses the queue.
    """

    def __init__(self, max_size: int):
        if not 0 < max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue max size {max_size} is not a power of two <= {MAX_QUEUE_SIZE}")
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.desc_table = 0
        self.avail_ring = 0
        self.used_ring = 0
        self.next_avail = 0
        self.next_used = 0
        self.event_idx = False
        self._added_since_notify = 0
        self._memory: GuestMemory | None = None

    _SAVED = ("size", "ready", "desc_table", "avail_ring", "used_ring", "next_avail", "next_used")

    def save_state(self) -> dict:
        return {name: getattr(self, name) for name in self._SAVED}

    def restore_state(self, state: dict) -> None:
        """Configuration and ring positions; :meth:`activate` checks them as usual."""
        self.reset()
        for name in self._SAVED:
            setattr(self, name, int(state[name]))
        self.next_avail &= 0xFFFF
        self.next_used &= 0xFFFF

    # --- configuration ---------------------------------------------------

    def activate(self, memory: GuestMemory, event_idx: bool = False) -> None:
        """Check the driver's configuration and start using the rings."""
        size = self.size
        if not 0 < size <= self.max_size or size & (size - 1):
            raise InvalidQueueSize(f"queue size {size} (max {self.max_size})")
        rings = (
            ("descriptor table", self.desc_table, DESC_ALIGN, DESC_SIZE * size),
            ("available ring", self.avail_ring, AVAIL_ALIGN, 6 + 2 * size),
            ("used ring", self.used_ring, USED_ALIGN, 6 + USED_ELEM_SIZE * size),
        )
        for name, gpa, align, length in rings:
            if gpa % align:
                raise MisalignedRing(f"{name} at {gpa:#x} is not {align}-byte aligned")
            if not memory.contains(gpa, length):
                raise RingOutOfGuestMemory(f"{name} {gpa:#x}+{length:#x} is outside guest RAM")
        self.event_idx = event_idx
        self._memory = memory

    @property
    def active(self) -> bool:
        return self.ready and self._memory is not None

    # --- ring fields (aligned 16-bit accesses, so never torn) -------------

    def _load_u16(self, gpa: int) -> int:
        return self._memory.read_int(gpa, 2)

    def _store_u16(self, gpa: int, value: int) -> None:
        self._memory.view(gpa, 2).cast("H")[0] = value

    def _avail_idx(self) -> int:
        return self._load_u16(self.avail_ring + 2)

    # --- device side -------------------------------------------------------

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or ``None`` when the driver offered none."""
        if not self.active:
            return None
        pending = (self._avail_idx() - self.next_avail) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.size:
            raise AvailRingOverrun(f"avail idx is {pending} ahead, queue size {self.size}")
        head = self._load_u16(self.avail_ring + 4 + 2 * (self.next_avail % self.size))
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return DescriptorChain(self._memory, head, self._walk(head))

    def _walk(self, head: int) -> list[Buffer]:
        memory = self._memory
        table, table_size = self.desc_table, self.size
        index, ttl, indirect, seen_writable = head, table_size, False, False
        buffers: list[Buffer] = []
        while True:
            if index >= table_size:
                raise DescriptorIndexOutOfRange(f"descriptor {index} of a {table_size}-entry table")
            if ttl == 0:
                raise DescriptorChainLoop(f"chain from head {head} exceeds {table_size} descriptors")
            ttl -= 1
            addr, length, flags, next_index = _DESC.unpack(memory.read(table + DESC_SIZE * index, DESC_SIZE))
            if flags & VIRTQ_DESC_F_INDIRECT:
                table_size = self._check_indirect(addr, length, flags, indirect)
                table, index, ttl, indirect = addr, 0, table_size, True
                continue
            writable = bool(flags & VIRTQ_DESC_F_WRITE)
            if seen_writable and not writable:
                raise ReadableAfterWritable(f"chain from head {head}: readable buffer after a writable one")
            seen_writable |= writable
            if not memory.contains(addr, length):
                raise DescriptorOutOfGuestMemory(f"buffer {addr:#x}+{length:#x} is outside guest RAM")
            buffers.append(Buffer(addr, length, writable))
            if not flags & VIRTQ_DESC_F_NEXT:
                return buffers
            index = next_index

    def _check_indirect(self, addr: int, length: int, flags: int, nested: bool) -> int:
        """Validate an indirect descriptor; returns its table's entry count."""
        if nested:
            raise InvalidIndirectTable("indirect descriptor inside an indirect table")
        if flags & VIRTQ_DESC_F_NEXT:
            raise InvalidIndirectTable("indirect descriptor with NEXT set")
        if length == 0 or length % DESC_SIZE:
            raise InvalidIndirectTable(f"indirect table length {length} is not a multiple of {DESC_SIZE}")
        if length // DESC_SIZE > MAX_QUEUE_SIZE:
            raise InvalidIndirectTable(f"indirect table of {length // DESC_SIZE} entries")
        if not self._memory.contains(addr, length):
            raise InvalidIndirectTable(f"indirect table {addr:#x}+{length:#x} is outside guest RAM")
        return length // DESC_SIZE

    def drain(self) -> Iterator[DescriptorChain]:
        """Every available chain, re-arming notifications before stopping.

        Re-checks the ring after publishing ``avail_event``, so a chain the
        driver adds meanwhile is not left waiting for a kick that never comes.
        """
        while True:
            chain = self.pop()
            if chain is not None:
                yield chain
            elif not self.enable_notification():
                return

    def enable_notification(self) -> bool:
        """Ask the driver to notify for new chains; True if some are already there."""
        if not self.active:
            return False
        if self.event_idx:
            self._store_u16(self.used_ring + 4 + USED_ELEM_SIZE * self.size, self.next_avail)
        _fence()
        return self._avail_idx() != self.next_avail

    def add_used(self, head: int, length: int) -> None:
        """Return chain ``head`` to the driver, ``length`` bytes written into it."""
        if not self.active:
            raise InvalidQueueConfig("add_used on a queue that is not active")
        if not 0 <= head < self.size:
            raise DescriptorIndexOutOfRange(f"used head {head} of a {self.size}-entry queue")
        slot = self.used_ring + 4 + USED_ELEM_SIZE * (self.next_used % self.size)
        self._memory.write(slot, _USED_ELEM.pack(head, length))
        self.next_used = (self.next_used + 1) & 0xFFFF
        # x86 keeps stores in order: the element is visible before the index.
        self._store_u16(self.used_ring + 2, self.next_used)
        self._added_since_notify += 1

    def needs_notification(self) -> bool:
        """Whether the driver wants an interrupt for the chains used since last asked."""
        if not self.active or self._added_since_notify == 0:
            return False
        added, self._added_since_notify = self._added_since_notify, 0
        _fence()
        if not self.event_idx:
            return not self._load_u16(self.avail_ring) & VIRTQ_AVAIL_F_NO_INTERRUPT
        if added >= 0x10000:
            return True
        used_event = self._load_u16(self.avail_ring + 4 + 2 * self.size)
        new, old = self.next_used, (self.next_used - added) & 0xFFFF
        # vring_need_event(): did the used index step over used_event?
        return (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF
