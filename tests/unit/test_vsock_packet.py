import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.virtio_driver import FakeDriver
from vmm.devices.virtio.errors import VirtioError
from vmm.devices.virtio.queue import Queue
from vmm.devices.virtio.vsock import packet
from vmm.devices.virtio.vsock.packet import (
    HEADER_SIZE,
    MAX_PKT_LEN,
    DescChainTooShortForData,
    DescChainTooShortForHeader,
    Header,
    InvalidPacket,
    InvalidPktLen,
    UnexpectedPayload,
    UnknownOp,
    UnsupportedSocketType,
    WrongDestinationCid,
    WrongSourceCid,
    parse_tx,
)
from vmm.memory import GuestMemory

GUEST_CID = 3
MEMORY = 0x40000
VALID = {"src_cid": GUEST_CID, "dst_cid": 2, "src_port": 1025, "dst_port": 52, "len": 0, "type": 1,
         "op": packet.OP_REQUEST, "flags": 0, "buf_alloc": 4096, "fwd_cnt": 0}


@pytest.fixture
def ring():
    memory = GuestMemory([(0, MEMORY)])
    queue = Queue(16)
    driver = FakeDriver(memory, 16)
    driver.configure(queue)
    queue.activate(memory)
    yield driver, queue
    memory.close()


def chain_of(ring, buffers):
    driver, queue = ring
    driver.add_chain(buffers)
    return queue.pop()


def test_header_is_44_bytes():
    assert HEADER_SIZE == 44


def test_valid_packet_split_anywhere(ring):
    data = Header(**{**VALID, "op": packet.OP_RW, "len": 5}).pack() + b"hello"
    chain = chain_of(ring, [(data[:10], False), (data[10:47], False), (data[47:], False), (8, True)])
    header = parse_tx(chain, GUEST_CID)
    assert (header.src_port, header.dst_port, header.len, header.op) == (1025, 52, 5, packet.OP_RW)
    assert chain.read(HEADER_SIZE, header.len) == b"hello"


@pytest.mark.parametrize("field, value, error", [
    ("len", MAX_PKT_LEN + 1, InvalidPktLen),
    ("type", 2, UnsupportedSocketType),
    ("op", 0, UnknownOp),
    ("op", 8, UnknownOp),
    ("src_cid", 4, WrongSourceCid),
    ("src_cid", 2, WrongSourceCid),
    ("dst_cid", 3, WrongDestinationCid),
    ("dst_cid", 2 | (1 << 32), WrongDestinationCid),
])
def test_one_bad_field_one_named_error(ring, field, value, error):
    fields = {**VALID, field: value}
    chain = chain_of(ring, [(Header(**fields).pack(), False)])
    with pytest.raises(error):
        parse_tx(chain, GUEST_CID)


def test_header_too_short(ring):
    chain = chain_of(ring, [(Header(**VALID).pack()[:43], False), (64, True)])
    with pytest.raises(DescChainTooShortForHeader):
        parse_tx(chain, GUEST_CID)


def test_len_beyond_the_chain(ring):
    fields = {**VALID, "op": packet.OP_RW, "len": 100}
    chain = chain_of(ring, [(Header(**fields).pack() + b"x" * 99, False)])
    with pytest.raises(DescChainTooShortForData):
        parse_tx(chain, GUEST_CID)


def test_control_packet_with_payload(ring):
    fields = {**VALID, "op": packet.OP_SHUTDOWN, "len": 4}
    chain = chain_of(ring, [(Header(**fields).pack() + b"abcd", False)])
    with pytest.raises(UnexpectedPayload):
        parse_tx(chain, GUEST_CID)


def test_errors_are_not_device_failures():
    # A bad packet is dropped; it must not put the device into NEEDS_RESET.
    assert not issubclass(InvalidPacket, VirtioError)


descriptor = st.tuples(
    st.integers(0, MEMORY + 0x100),           # addr (some outside RAM)
    st.integers(0, 0x11000),                  # len
    st.integers(0, 7),                        # flags: NEXT, WRITE, INDIRECT
    st.integers(0, 20),                       # next (some out of range)
)


@settings(max_examples=400, deadline=None)
@given(descs=st.lists(descriptor, min_size=1, max_size=16), head=st.integers(0, 15),
       fill=st.binary(min_size=0, max_size=256), header_bias=st.booleans())
def test_fuzz_random_chains_raise_only_named_errors(descs, head, fill, header_bias):
    memory = GuestMemory([(0, MEMORY)])
    try:
        queue = Queue(16)
        driver = FakeDriver(memory, 16)
        driver.configure(queue)
        queue.activate(memory)
        # Random bytes everywhere buffers may point, sometimes a near-valid header.
        memory.write(0x10000, (fill * (0x400 // max(1, len(fill)) + 1))[:0x400] if fill else b"")
        if header_bias:
            raw = bytearray(Header(**VALID).pack())
            raw[: len(fill) // 4] = fill[: len(fill) // 4]
            memory.write(0x10000, bytes(raw))
        for index, (addr, length, flags, next_index) in enumerate(descs):
            driver.write_desc(index, addr, length, flags, next_index)
        driver.publish(head)
        try:
            chain = queue.pop()
            header = parse_tx(chain, GUEST_CID)
        except (InvalidPacket, VirtioError):
            return
        assert header.len <= MAX_PKT_LEN
        assert header.len + HEADER_SIZE <= chain.readable_length
        assert header.src_cid == GUEST_CID and header.dst_cid == 2
        assert len(chain.read(HEADER_SIZE, header.len)) == header.len
    finally:
        memory.close()


# The ring fixture just keeps going from one example to the next.
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(min_size=0, max_size=200))
def test_fuzz_random_bytes_in_one_buffer(ring, raw):
    try:
        header = parse_tx(chain_of(ring, [(raw or b"\0", False)]), GUEST_CID)
    except InvalidPacket:
        return
    assert struct.unpack_from("<Q", raw)[0] == GUEST_CID
    assert header.len <= len(raw) - HEADER_SIZE
