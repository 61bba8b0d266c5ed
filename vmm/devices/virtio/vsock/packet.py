"""The virtio-vsock packet header and its validation (virtio 1.2 §5.10.6).

Every packet on the rx and tx queues starts with ``struct virtio_vsock_hdr``,
44 packed little-endian bytes::

    le64 src_cid; le64 dst_cid; le32 src_port; le32 dst_port; le32 len;
    le16 type; le16 op; le32 flags; le32 buf_alloc; le32 fwd_cnt;

A tx packet is written by the guest, so :func:`parse_tx` checks every field a
device relies on before it is used. Failures are :class:`InvalidPacket`
subclasses: the device drops that packet and goes on (they are not
:class:`~vmm.devices.virtio.errors.VirtioError`, which stops the device).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vmm.devices.virtio.queue import DescriptorChain

HEADER = struct.Struct("<QQIIIHHIII")
HEADER_SIZE = HEADER.size  # 44

HOST_CID = 2               # VMADDR_CID_HOST
MIN_GUEST_CID = 3          # 0, 1 and 2 are reserved (§5.10.4)
MAX_GUEST_CID = 0xFFFFFFFE  # the upper 32 bits are reserved; -1 is VMADDR_CID_ANY
MAX_PKT_LEN = 64 * 1024     # VIRTIO_VSOCK_MAX_PKT_BUF_SIZE in Linux

TYPE_STREAM = 1

OP_REQUEST = 1
OP_RESPONSE = 2
OP_RST = 3
OP_SHUTDOWN = 4
OP_RW = 5
OP_CREDIT_UPDATE = 6
OP_CREDIT_REQUEST = 7
KNOWN_OPS = frozenset(range(OP_REQUEST, OP_CREDIT_REQUEST + 1))

SHUTDOWN_RCV = 1   # the sender will receive no more data
SHUTDOWN_SEND = 2  # the sender will send no more data
SHUTDOWN_BOTH = SHUTDOWN_RCV | SHUTDOWN_SEND

EVENT_TRANSPORT_RESET = 0  # struct virtio_vsock_event { le32 id; } (§5.10.6.5)


class InvalidPacket(Exception):
    """A tx packet the device refuses; it is dropped."""


class DescChainTooShortForHeader(InvalidPacket):
    """The chain's readable bytes cannot hold a 44-byte header."""


class DescChainTooShortForData(InvalidPacket):
    """``len`` says more payload than the chain's readable bytes after the header."""


class InvalidPktLen(InvalidPacket):
    """``len`` is above the largest packet a driver may send (64 KiB)."""


class UnexpectedPayload(InvalidPacket):
    """A control packet (not RW) carries a payload."""


class UnsupportedSocketType(InvalidPacket):
    """``type`` is not VIRTIO_VSOCK_TYPE_STREAM (SEQPACKET is not offered)."""


class UnknownOp(InvalidPacket):
    """``op`` is not one of the seven operations of §5.10.6."""


class WrongSourceCid(InvalidPacket):
    """``src_cid`` is not the guest's own CID."""


class WrongDestinationCid(InvalidPacket):
    """``dst_cid`` is not the host's CID (2)."""


@dataclass(frozen=True)
class Header:
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int

    def pack(self) -> bytes:
        return HEADER.pack(self.src_cid, self.dst_cid, self.src_port, self.dst_port, self.len,
                           self.type, self.op, self.flags, self.buf_alloc, self.fwd_cnt)


def pack_header(src_port: int, dst_port: int, guest_cid: int, op: int, length: int = 0,
                flags: int = 0, buf_alloc: int = 0, fwd_cnt: int = 0) -> bytes:
    """A host→guest header; counters are free-running, so they wrap to 32 bits."""
    return HEADER.pack(HOST_CID, guest_cid, src_port, dst_port, length, TYPE_STREAM, op, flags,
                       buf_alloc & 0xFFFFFFFF, fwd_cnt & 0xFFFFFFFF)


def parse_tx(chain: DescriptorChain, guest_cid: int) -> Header:
    """The header of the guest packet in ``chain``, checked; its payload follows it."""
    if chain.readable_length < HEADER_SIZE:
        raise DescChainTooShortForHeader(
            f"tx chain {chain.head} has {chain.readable_length} readable bytes, a header needs {HEADER_SIZE}")
    header = Header(*HEADER.unpack(chain.read(0, HEADER_SIZE)))
    if header.len > MAX_PKT_LEN:
        raise InvalidPktLen(f"packet len {header.len} exceeds {MAX_PKT_LEN}")
    if header.len > chain.readable_length - HEADER_SIZE:
        raise DescChainTooShortForData(
            f"packet len {header.len}, chain {chain.head} holds {chain.readable_length - HEADER_SIZE}")
    if header.type != TYPE_STREAM:
        raise UnsupportedSocketType(f"socket type {header.type}")
    if header.op not in KNOWN_OPS:
        raise UnknownOp(f"op {header.op}")
    if header.op != OP_RW and header.len:
        raise UnexpectedPayload(f"op {header.op} with {header.len} payload bytes")
    if header.src_cid != guest_cid:
        raise WrongSourceCid(f"src_cid {header.src_cid}, the guest is {guest_cid}")
    if header.dst_cid != HOST_CID:
        raise WrongDestinationCid(f"dst_cid {header.dst_cid}, the host is {HOST_CID}")
    return header
