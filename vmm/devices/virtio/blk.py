"""virtio-blk on a host file or block device (virtio 1.2 §5.2).

A request chain carries, with no assumption about how it is split into
buffers (§2.6.4): a 16-byte readable header ``{le32 type; le32 reserved;
le64 sector}``, then the data (readable for writes, writable for reads and
GET_ID), then one writable status byte — the chain's last writable byte.

A request that is wrong but can still be answered (short header, data not a
whole number of sectors, past the end of the disk, a write to a read-only
disk) gets ``VIRTIO_BLK_S_IOERR``; an unknown type gets ``S_UNSUPP``. A chain
with no writable byte cannot carry a status, so it is a :class:`VirtioError`
and the device needs a reset. Data moves with ``preadv``/``pwritev`` straight
between the file and guest memory.
"""

from __future__ import annotations

import logging
import os
import struct

from vmm.devices.virtio.device import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_ID_BLOCK,
    VirtioDevice,
    feature,
)
from vmm.devices.virtio.errors import VirtioError
from vmm.devices.virtio.queue import DescriptorChain

log = logging.getLogger(__name__)

# Feature bits (§5.2.3).
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9

# Request types and status values (§5.2.6, struct virtio_blk_req).
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

SECTOR_SIZE = 512
ID_BYTES = 20
QUEUE_SIZE = 256
SEG_MAX = QUEUE_SIZE - 2          # a direct chain also holds the header and the status

_REQUEST_HEADER = struct.Struct("<IIQ")
# struct virtio_blk_config (§5.2.4) up to blk_size: capacity, size_max, seg_max,
# geometry {cylinders, heads, sectors}, blk_size.
_CONFIG = struct.Struct("<QIIHBBI")

_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


class MissingStatusByte(VirtioError):
    """A request chain has no writable byte to put the status in."""


class RequestFailed(Exception):
    """A request the device answers with ``VIRTIO_BLK_S_IOERR``."""


class Block(VirtioDevice):
    """One disk: a host file (or block device) of whole 512-byte sectors."""

    device_id = VIRTIO_ID_BLOCK
    queue_max_sizes = (QUEUE_SIZE,)

    def __init__(self, path: str | os.PathLike, read_only: bool = True, serial: str = ""):
        super().__init__()
        self.path = os.fspath(path)
        self.read_only = read_only
        self.disk_id = serial.encode("ascii", "replace")[:ID_BYTES].ljust(ID_BYTES, b"\x00")
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        self.fd = os.open(self.path, flags)
        try:
            size = os.lseek(self.fd, 0, os.SEEK_END)  # st_size is 0 for block devices
        except OSError:
            os.close(self.fd)
            raise
        self.capacity = size // SECTOR_SIZE
        self.avail_features |= (
            feature(VIRTIO_BLK_F_SEG_MAX)
            | feature(VIRTIO_BLK_F_BLK_SIZE)
            | feature(VIRTIO_F_INDIRECT_DESC)
            | feature(VIRTIO_F_EVENT_IDX)
            | feature(VIRTIO_BLK_F_RO if read_only else VIRTIO_BLK_F_FLUSH)
        )

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def config_bytes(self) -> bytes:
        return _CONFIG.pack(self.capacity, 0, SEG_MAX, 0, 0, 0, SECTOR_SIZE)

    def process(self, queue_index: int) -> None:
        queue = self.queues[queue_index]
        for chain in queue.drain():
            queue.add_used(chain.head, self.execute(chain))
        if queue.needs_notification():
            self.interrupt.signal_used_queue()

    # --- one request ---------------------------------------------------------

    def execute(self, chain: DescriptorChain) -> int:
        """Carry out one request; returns the bytes written into the chain."""
        if chain.writable_length == 0:
            raise MissingStatusByte(f"request at head {chain.head} has no writable buffer")
        data_in = chain.writable_length - 1    # writable bytes before the status byte
        try:
            status, written = self._dispatch(chain, data_in)
        except RequestFailed as failure:
            log.debug("virtio-blk request %d failed: %s", chain.head, failure)
            status, written = VIRTIO_BLK_S_IOERR, 0
        chain.write(data_in, bytes([status]))
        return written + 1

    def _dispatch(self, chain: DescriptorChain, data_in: int) -> tuple[int, int]:
        if chain.readable_length < _REQUEST_HEADER.size:
            raise RequestFailed(f"header of {chain.readable_length} bytes")
        request_type, _, sector = _REQUEST_HEADER.unpack(chain.read(0, _REQUEST_HEADER.size))
        data_out = chain.readable_length - _REQUEST_HEADER.size
        if request_type == VIRTIO_BLK_T_IN:
            self._check_range(sector, data_in, data_out)
            self._transfer(os.preadv, chain.writable_views(0, data_in), sector)
            return VIRTIO_BLK_S_OK, data_in
        if request_type == VIRTIO_BLK_T_OUT:
            if self.read_only:
                raise RequestFailed("write to a read-only disk")
            self._check_range(sector, data_out, data_in)
            self._transfer(os.pwritev, chain.readable_views(_REQUEST_HEADER.size), sector)
            return VIRTIO_BLK_S_OK, 0
        if request_type == VIRTIO_BLK_T_FLUSH:
            if not self.read_only:
                self._flush()
            return VIRTIO_BLK_S_OK, 0
        if request_type == VIRTIO_BLK_T_GET_ID:
            written = min(data_in, ID_BYTES)
            chain.write(0, self.disk_id[:written])
            return VIRTIO_BLK_S_OK, written
        return VIRTIO_BLK_S_UNSUPP, 0

    def _check_range(self, sector: int, length: int, wrong_way: int) -> None:
        if wrong_way:
            raise RequestFailed(f"{wrong_way} data bytes flow the wrong way")
        if length % SECTOR_SIZE:
            raise RequestFailed(f"data length {length} is not whole sectors")
        if sector + length // SECTOR_SIZE > self.capacity:
            raise RequestFailed(f"sectors {sector}+{length // SECTOR_SIZE} beyond capacity {self.capacity}")

    def _transfer(self, io, views: list[memoryview], sector: int) -> None:
        offset = sector * SECTOR_SIZE
        for start in range(0, len(views), _IOV_MAX):
            batch = views[start : start + _IOV_MAX]
            expected = sum(len(v) for v in batch)
            try:
                done = io(self.fd, batch, offset)
            except OSError as error:
                raise RequestFailed(f"{io.__name__}: {error}") from error
            if done != expected:
                raise RequestFailed(f"{io.__name__} moved {done} of {expected} bytes")
            offset += done

    def _flush(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as error:
            raise RequestFailed(f"fsync: {error}") from error
