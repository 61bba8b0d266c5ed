import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.virtio_driver import FakeDriver
from vmm.devices.virtio.errors import VirtioError
from vmm.devices.virtio.queue import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    AvailRingOverrun,
    ChainTooShort,
    DescriptorChainLoop,
    DescriptorIndexOutOfRange,
    DescriptorOutOfGuestMemory,
    InvalidIndirectTable,
    InvalidQueueSize,
    MisalignedRing,
    Queue,
    ReadableAfterWritable,
    RingOutOfGuestMemory,
)
from vmm.memory import GuestMemory

# Two RAM regions with a hole between them, like guest RAM around the MMIO gap.
LOW_END = 0x20000
HIGH = 0x30000
HIGH_END = 0x40000


@pytest.fixture
def memory():
    mem = GuestMemory([(0, LOW_END), (HIGH, HIGH_END - HIGH)])
    yield mem
    mem.close()


def make_queue(memory, size=8, event_idx=False):
    queue = Queue(16)
    driver = FakeDriver(memory, size)
    driver.configure(queue)
    queue.activate(memory, event_idx)
    return queue, driver


def test_direct_chain_with_readable_then_writable_buffers(memory):
    queue, driver = make_queue(memory)
    head = driver.add_chain([(b"header..", False), (b"payload", False), (32, True)])
    chain = queue.pop()
    assert chain.head == head
    assert [(b.length, b.writable) for b in chain.buffers] == [(8, False), (7, False), (32, True)]
    assert chain.readable_length == 15 and chain.writable_length == 32
    assert chain.read(6, 5) == b"..pay"
    chain.write(30, b"ok")
    assert memory.read(chain.writable[0].gpa + 30, 2) == b"ok"
    assert queue.pop() is None


def test_views_are_zero_copy(memory):
    queue, driver = make_queue(memory)
    driver.add_chain([(4, True), (4, True)])
    chain = queue.pop()
    views = chain.writable_views(2, 4)
    assert [len(v) for v in views] == [2, 2]
    views[1][:] = b"\x01\x02"
    assert memory.read(chain.writable[1].gpa, 2) == b"\x01\x02"


def test_indirect_case_is_valid_uncorrupted(memory):
    queue, driver = make_queue(memory)
    indirect_case(driver)
    assert len(queue.pop().buffers) == 2


def test_indirect_chain(memory):
    queue, driver = make_queue(memory)
    driver.add_chain([(b"in", False), (3, True)], indirect=True)
    chain = queue.pop()
    assert [(b.length, b.writable) for b in chain.buffers] == [(2, False), (3, True)]
    assert chain.read(0, 2) == b"in"


def test_add_used_and_notification_without_event_idx(memory):
    queue, driver = make_queue(memory)
    head = driver.add_chain([(8, True)])
    assert not queue.needs_notification()  # nothing used yet
    chain = queue.pop()
    queue.add_used(chain.head, 5)
    assert driver.take_used() == [(head, 5)]
    assert queue.needs_notification()
    memory.write_int(driver.avail_ring, 2, VIRTQ_AVAIL_F_NO_INTERRUPT)
    queue.add_used(chain.head, 1)
    assert not queue.needs_notification()


def test_event_idx_suppresses_interrupts_until_used_event(memory):
    queue, driver = make_queue(memory, event_idx=True)
    heads = [driver.add_chain([(4, True)]) for _ in range(3)]
    driver.set_used_event(1)  # interrupt me once the second buffer is used
    for expected in heads[:1]:
        queue.add_used(queue.pop().head, 0)
    assert not queue.needs_notification()
    queue.add_used(queue.pop().head, 0)
    assert queue.needs_notification()
    queue.add_used(queue.pop().head, 0)
    assert not queue.needs_notification()


def test_drain_publishes_avail_event(memory):
    queue, driver = make_queue(memory, event_idx=True)
    for _ in range(3):
        driver.add_chain([(4, True)])
    assert len(list(queue.drain())) == 3
    assert driver.avail_event() == 3


def test_avail_index_wraps(memory):
    queue, driver = make_queue(memory)
    queue.next_avail = queue.next_used = driver.avail_idx = driver.used_seen = 0xFFFF
    head = driver.add_chain([(4, True)])
    chain = queue.pop()
    assert chain.head == head and queue.next_avail == 0
    queue.add_used(head, 4)
    assert driver.take_used() == [(head, 4)]


# --- configuration errors ---------------------------------------------------


@pytest.mark.parametrize("size", [0, 3, 12, 32])
def test_bad_queue_size(memory, size):
    queue = Queue(16)
    FakeDriver(memory, 8).configure(queue)
    queue.size = size
    with pytest.raises(InvalidQueueSize):
        queue.activate(memory)


@pytest.mark.parametrize("field,value", [("desc_table", 0x1008), ("avail_ring", 0x2001), ("used_ring", 0x3002)])
def test_misaligned_rings(memory, field, value):
    queue = Queue(16)
    FakeDriver(memory, 8).configure(queue)
    setattr(queue, field, value)
    with pytest.raises(MisalignedRing):
        queue.activate(memory)


@pytest.mark.parametrize("field,value", [("desc_table", LOW_END - 0x40), ("avail_ring", HIGH_END), ("used_ring", 1 << 60)])
def test_rings_outside_ram(memory, field, value):
    queue = Queue(16)
    FakeDriver(memory, 8).configure(queue)
    setattr(queue, field, value)
    with pytest.raises(RingOutOfGuestMemory):
        queue.activate(memory)


# --- chain errors, one corruption each --------------------------------------


def test_avail_ring_overrun(memory):
    queue, driver = make_queue(memory)
    memory.write_int(driver.avail_ring + 2, 2, 9)
    with pytest.raises(AvailRingOverrun):
        queue.pop()


def test_head_out_of_range(memory):
    queue, driver = make_queue(memory)
    driver.publish(8)
    with pytest.raises(DescriptorIndexOutOfRange):
        queue.pop()


def test_next_out_of_range(memory):
    queue, driver = make_queue(memory)
    driver.write_desc(0, 0x10000, 4, VIRTQ_DESC_F_NEXT, 200)
    driver.publish(0)
    with pytest.raises(DescriptorIndexOutOfRange):
        queue.pop()


def test_chain_loop_ends(memory):
    queue, driver = make_queue(memory)
    driver.write_desc(0, 0x10000, 4, VIRTQ_DESC_F_NEXT, 1)
    driver.write_desc(1, 0x10000, 4, VIRTQ_DESC_F_NEXT, 0)
    driver.publish(0)
    with pytest.raises(DescriptorChainLoop):
        queue.pop()


@pytest.mark.parametrize("addr,length", [
    (LOW_END - 2, 4),          # runs off the end of RAM into the hole
    (HIGH - 4, 8),             # starts in the hole
    (LOW_END - 4, HIGH),       # spans both regions
    ((1 << 64) - 1, 2),
])
def test_buffer_outside_guest_memory(memory, addr, length):
    queue, driver = make_queue(memory)
    driver.write_desc(0, addr, length)
    driver.publish(0)
    with pytest.raises(DescriptorOutOfGuestMemory):
        queue.pop()


def test_readable_after_writable(memory):
    queue, driver = make_queue(memory)
    driver.add_chain([(4, True), (4, False)])
    with pytest.raises(ReadableAfterWritable):
        queue.pop()


def indirect_case(driver, flags=VIRTQ_DESC_F_INDIRECT, length=32, addr=0x8000, nested=False):
    """A two-entry indirect table, valid unless one argument corrupts it."""
    if driver.memory.contains(addr, 32):
        driver.write_desc(0, 0x10000, 4, VIRTQ_DESC_F_NEXT, 1, table=addr)
        driver.write_desc(1, 0x8000 if nested else 0x10000, 32 if nested else 4,
                          VIRTQ_DESC_F_INDIRECT if nested else 0, table=addr)
    driver.write_desc(0, addr, length, flags)
    driver.publish(0)


@pytest.mark.parametrize("kwargs", [
    {"flags": VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT},
    {"length": 24},
    {"length": 0},
    {"addr": LOW_END - 16},
    {"nested": True},
])
def test_invalid_indirect_tables(memory, kwargs):
    queue, driver = make_queue(memory)
    indirect_case(driver, **kwargs)
    with pytest.raises(InvalidIndirectTable):
        queue.pop()


def test_loop_inside_indirect_table(memory):
    queue, driver = make_queue(memory)
    driver.write_desc(0, 0x10000, 4, VIRTQ_DESC_F_NEXT, 1, table=0x8000)
    driver.write_desc(1, 0x10000, 4, VIRTQ_DESC_F_NEXT, 0, table=0x8000)
    driver.write_desc(0, 0x8000, 32, VIRTQ_DESC_F_INDIRECT)
    driver.publish(0)
    with pytest.raises(DescriptorChainLoop):
        queue.pop()


def test_reading_past_the_chain(memory):
    queue, driver = make_queue(memory)
    driver.add_chain([(b"abc", False), (2, True)])
    chain = queue.pop()
    with pytest.raises(ChainTooShort):
        chain.read(1, 3)
    with pytest.raises(ChainTooShort):
        chain.write(0, b"abc")


def test_every_error_is_a_virtio_error():
    for error in (AvailRingOverrun, ChainTooShort, DescriptorChainLoop, DescriptorIndexOutOfRange,
                  DescriptorOutOfGuestMemory, InvalidIndirectTable, InvalidQueueSize, MisalignedRing,
                  ReadableAfterWritable, RingOutOfGuestMemory):
        assert issubclass(error, VirtioError)


# --- fuzz: any ring contents give chains inside RAM or a VirtioError ----------

FUZZ_SIZE = 8
FUZZ_DESC, FUZZ_AVAIL, FUZZ_USED, FUZZ_INDIRECT = 0x0, 0x100, 0x200, 0x1000
FUZZ_LOW_END, FUZZ_HIGH, FUZZ_HIGH_END = 0x4000, 0x6000, 0x8000

# Mostly plausible values, so that chains get deep enough to reach every check,
# with edge cases and arbitrary values mixed in.
addresses = st.one_of(
    st.integers(0, FUZZ_LOW_END - 0x100),
    st.integers(FUZZ_HIGH, FUZZ_HIGH_END - 0x100),
    st.sampled_from([FUZZ_INDIRECT, FUZZ_LOW_END - 8, FUZZ_HIGH - 8, FUZZ_HIGH_END - 16, (1 << 64) - 1]),
    st.integers(0, (1 << 64) - 1),
)
lengths = st.one_of(st.integers(0, 0x100), st.sampled_from([16, 128, 0x2000, (1 << 32) - 1]))
flags = st.one_of(
    st.sampled_from([0, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
                     VIRTQ_DESC_F_INDIRECT]),
    st.integers(0, 0xFFFF),
)
indices = st.one_of(st.integers(0, FUZZ_SIZE - 1), st.integers(0, 0xFFFF))
descriptors = st.tuples(addresses, lengths, flags, indices)


@settings(max_examples=300, deadline=None)
@given(
    table=st.lists(descriptors, min_size=FUZZ_SIZE, max_size=FUZZ_SIZE),
    indirect=st.lists(descriptors, min_size=FUZZ_SIZE, max_size=FUZZ_SIZE),
    ring=st.lists(indices, min_size=FUZZ_SIZE, max_size=FUZZ_SIZE),
    ahead=st.one_of(st.integers(1, FUZZ_SIZE), st.integers(0, 0xFFFF)),
    next_avail=st.integers(0, 0xFFFF),
)
def test_fuzzed_rings_only_raise_virtio_errors(table, indirect, ring, ahead, next_avail):
    avail_idx = (next_avail + ahead) & 0xFFFF
    memory = GuestMemory([(0, FUZZ_LOW_END), (FUZZ_HIGH, FUZZ_HIGH_END - FUZZ_HIGH)])
    try:
        for base, descs in ((FUZZ_DESC, table), (FUZZ_INDIRECT, indirect)):
            for i, desc in enumerate(descs):
                memory.write(base + 16 * i, struct.pack("<QIHH", *desc))
        memory.write(FUZZ_AVAIL + 2, struct.pack("<H", avail_idx) + struct.pack(f"<{FUZZ_SIZE}H", *ring))
        queue = Queue(FUZZ_SIZE)
        queue.size, queue.ready = FUZZ_SIZE, True
        queue.desc_table, queue.avail_ring, queue.used_ring = FUZZ_DESC, FUZZ_AVAIL, FUZZ_USED
        queue.activate(memory)
        queue.next_avail = next_avail
        for _ in range(FUZZ_SIZE + 1):
            try:
                chain = queue.pop()
            except VirtioError:
                break
            if chain is None:
                break
            assert 0 <= chain.head < FUZZ_SIZE
            seen_writable = False
            for buf in chain.buffers:
                low = 0 <= buf.gpa and buf.gpa + buf.length <= FUZZ_LOW_END
                high = FUZZ_HIGH <= buf.gpa and buf.gpa + buf.length <= FUZZ_HIGH_END
                assert low or high, buf
                assert buf.writable or not seen_writable
                seen_writable |= buf.writable
            chain.read(0, chain.readable_length)
            chain.write(0, bytes(chain.writable_length))
            queue.add_used(chain.head, chain.writable_length)
    finally:
        memory.close()
