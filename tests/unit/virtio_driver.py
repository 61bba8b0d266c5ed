"""The guest driver's side of a split virtqueue, for tests.

Lays out a descriptor table and rings in a GuestMemory the way a driver does,
adds chains of buffers and reads back the used ring, so device code is tested
on the bytes a guest would write.
"""

from __future__ import annotations

import struct

from vmm.devices.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Queue,
)
from vmm.memory import GuestMemory

DESC = struct.Struct("<QIHH")


class FakeDriver:
    def __init__(self, memory: GuestMemory, size: int, base: int = 0x1000, data: int = 0x10000):
        self.memory = memory
        self.size = size
        self.desc_table = base
        self.avail_ring = base + 16 * size
        self.used_ring = (self.avail_ring + 6 + 2 * size + 3) & ~3
        self.avail_idx = 0
        self.used_seen = 0
        self.next_desc = 0
        self.last_chain: list[tuple[int, int, bool]] = []
        self._data_next = data

    def configure(self, queue: Queue) -> None:
        queue.size = self.size
        queue.desc_table = self.desc_table
        queue.avail_ring = self.avail_ring
        queue.used_ring = self.used_ring
        queue.ready = True

    def alloc(self, length: int, fill: bytes = b"") -> int:
        gpa = self._data_next
        self._data_next += (length + 15) & ~15 or 16
        if fill:
            self.memory.write(gpa, fill)
        return gpa

    def write_desc(self, index: int, addr: int, length: int, flags: int = 0, next_index: int = 0,
                   table: int | None = None) -> None:
        base = self.desc_table if table is None else table
        self.memory.write(base + 16 * index, DESC.pack(addr, length, flags, next_index))

    def add_chain(self, buffers: list[tuple[bytes | int, bool]], indirect: bool = False) -> int:
        """Add a chain; each buffer is (contents or length, device-writable).

        The buffers' ``(gpa, length, writable)`` are kept in ``last_chain``.
        """
        descs = []
        for contents, writable in buffers:
            if isinstance(contents, int):
                descs.append((self.alloc(contents), contents, writable))
            else:
                descs.append((self.alloc(len(contents), contents), len(contents), writable))
        self.last_chain = descs
        if indirect:
            table = self.alloc(16 * len(descs))
            self._link(descs, lambda i: i, table)
            head = self._take_desc()
            self.write_desc(head, table, 16 * len(descs), VIRTQ_DESC_F_INDIRECT)
        else:
            indices = [self._take_desc() for _ in descs]
            self._link(descs, lambda i: indices[i], None)
            head = indices[0]
        self.publish(head)
        return head

    def _take_desc(self) -> int:
        index = self.next_desc
        self.next_desc = (self.next_desc + 1) % self.size
        return index

    def _link(self, descs, slot, table) -> None:
        for i, (addr, length, writable) in enumerate(descs):
            flags = VIRTQ_DESC_F_WRITE if writable else 0
            last = i == len(descs) - 1
            if not last:
                flags |= VIRTQ_DESC_F_NEXT
            self.write_desc(slot(i), addr, length, flags, 0 if last else slot(i + 1), table)

    def publish(self, head: int) -> None:
        self.memory.write_int(self.avail_ring + 4 + 2 * (self.avail_idx % self.size), 2, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_int(self.avail_ring + 2, 2, self.avail_idx)

    def set_used_event(self, value: int) -> None:
        self.memory.write_int(self.avail_ring + 4 + 2 * self.size, 2, value)

    def avail_event(self) -> int:
        return self.memory.read_int(self.used_ring + 4 + 8 * self.size, 2)

    def take_used(self) -> list[tuple[int, int]]:
        """Used elements (id, len) added since the last call."""
        used_idx = self.memory.read_int(self.used_ring + 2, 2)
        elems = []
        while self.used_seen != used_idx:
            slot = self.used_ring + 4 + 8 * (self.used_seen % self.size)
            elems.append(struct.unpack("<II", self.memory.read(slot, 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return elems
