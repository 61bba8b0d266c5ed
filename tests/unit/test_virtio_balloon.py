import struct
import threading
import time
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.virtio_driver import FakeDriver
from vmm.balloon import BalloonError, BalloonStats, BalloonTargetClamped, MemoryBalloon
from vmm.devices.virtio import mmio
from vmm.devices.virtio.balloon import (
    MAX_PFNS_PER_REQUEST,
    MAX_STAT_ENTRIES,
    QUEUE_SIZE,
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_REPORTING,
    VIRTIO_BALLOON_F_STATS_VQ,
    VIRTIO_BALLOON_S_AVAIL,
    VIRTIO_BALLOON_S_MEMFREE,
    VIRTIO_BALLOON_S_MEMTOT,
    VIRTIO_BALLOON_S_MINFLT,
    Balloon,
    InvalidBalloonState,
    RaggedPfnArray,
    StatsTimeout,
    StatsUnavailable,
    parse_stats,
    pfn_runs,
)
from vmm.devices.virtio.device import VIRTIO_F_VERSION_1, feature
from vmm.devices.virtio.mmio import MmioTransport
from vmm.devices.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, Queue
from vmm.memory import GuestMemory

MIB = 1 << 20
PAGE = 4096
# Rings and driver buffers live in the first MiB; the pages the balloon gives
# back in the one at 2 MiB. The MiB between is a hole in guest RAM.
BALLOON_AREA = 2 * MIB
ALL_FEATURES = (feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_BALLOON_F_STATS_VQ)
                | feature(VIRTIO_BALLOON_F_DEFLATE_ON_OOM) | feature(VIRTIO_BALLOON_F_REPORTING))
DEADLINE = 10.0


class FakeInterrupt:
    def __init__(self):
        self.used = 0
        self.config = 0

    def signal_used_queue(self):
        self.used += 1

    def signal_config_change(self):
        self.config += 1

    def device_error(self, error):
        raise AssertionError(error)


class Rig:
    """A balloon device on a small guest, its queues set up by fake drivers."""

    def __init__(self, features=ALL_FEATURES, prime_stats: bytes | None = None):
        self.memory = GuestMemory([(0, MIB), (BALLOON_AREA, MIB)])
        self.device = Balloon()
        self.device.acked_features = features
        self.queues, self.drivers = [], []
        for index in range(len(Balloon.queue_max_sizes)):
            queue = Queue(QUEUE_SIZE)
            driver = FakeDriver(self.memory, 16, base=0x1000 * (index + 1), data=0x10000 * (index + 1))
            driver.configure(queue)
            queue.activate(self.memory)
            self.queues.append(queue)
            self.drivers.append(driver)
        self.interrupt = FakeInterrupt()
        if prime_stats is not None:          # Linux adds this before DRIVER_OK
            self.drivers[2].add_chain([(prime_stats, False)])
        self.device.activate(self.memory, self.queues, self.interrupt)

    def fill(self, gpa: int, length: int, byte: int = 0xAB) -> None:
        self.memory.write(gpa, bytes([byte]) * length)

    def is_zero(self, gpa: int, length: int) -> bool:
        return self.memory.read(gpa, length) == bytes(length)

    def send_pfns(self, queue: int, pfns: list[int]) -> list[tuple[int, int]]:
        return self.send(queue, b"".join(struct.pack("<I", p) for p in pfns))

    def send(self, queue: int, data: bytes) -> list[tuple[int, int]]:
        self.drivers[queue].add_chain([(data, False)])
        self.device.process(queue)
        return self.drivers[queue].take_used()

    def report(self, queue: int, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """A reporting chain of device-writable buffers at the given guest ranges."""
        driver = self.drivers[queue]
        for i, (gpa, length) in enumerate(ranges):
            last = i == len(ranges) - 1
            driver.write_desc(i, gpa, length, VIRTQ_DESC_F_WRITE | (0 if last else VIRTQ_DESC_F_NEXT),
                              0 if last else i + 1)
        driver.publish(0)
        self.device.process(queue)
        return driver.take_used()

    def close(self):
        self.memory.close()


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


def stats_bytes(entries: list[tuple[int, int]]) -> bytes:
    return b"".join(struct.pack("<HQ", tag, value) for tag, value in entries)


def pfn(offset: int) -> int:
    return (BALLOON_AREA + offset) // PAGE


# ---- queues ---------------------------------------------------------------------------

@pytest.mark.parametrize("features, reporting_queue", [
    (ALL_FEATURES, 3),
    (feature(VIRTIO_F_VERSION_1) | feature(VIRTIO_BALLOON_F_REPORTING), 2),
])
def test_reporting_queue_follows_linux_numbering(features, reporting_queue):
    rig = Rig(features)
    rig.fill(BALLOON_AREA, 2 * PAGE)
    assert rig.report(reporting_queue, [(BALLOON_AREA, 2 * PAGE)]) == [(0, 0)]
    assert rig.is_zero(BALLOON_AREA, 2 * PAGE)
    assert rig.device.counters.reported_bytes == 2 * PAGE
    rig.close()


def test_queues_of_features_not_negotiated_are_ignored():
    rig = Rig(feature(VIRTIO_F_VERSION_1))
    rig.fill(BALLOON_AREA, PAGE)
    assert rig.report(2, [(BALLOON_AREA, PAGE)]) == []
    assert not rig.is_zero(BALLOON_AREA, PAGE)
    with pytest.raises(StatsUnavailable):
        rig.device.request_stats(timeout=0.01)
    rig.close()


# ---- inflate and deflate ------------------------------------------------------------------

def test_inflate_discards_pages_and_returns_the_chain(rig):
    rig.fill(BALLOON_AREA, 8 * PAGE)
    used = rig.send_pfns(0, [pfn(0), pfn(PAGE), pfn(2 * PAGE), pfn(5 * PAGE)])
    assert used == [(0, 0)]
    assert rig.interrupt.used == 1
    assert rig.is_zero(BALLOON_AREA, 3 * PAGE) and rig.is_zero(BALLOON_AREA + 5 * PAGE, PAGE)
    assert not rig.is_zero(BALLOON_AREA + 3 * PAGE, 2 * PAGE)
    assert not rig.is_zero(BALLOON_AREA + 6 * PAGE, 2 * PAGE)
    assert rig.device.counters.inflated_pages == 4


def test_deflate_leaves_memory_alone(rig):
    rig.fill(BALLOON_AREA, PAGE)
    assert rig.send_pfns(1, [pfn(0)]) == [(0, 0)]
    assert not rig.is_zero(BALLOON_AREA, PAGE)
    assert rig.device.counters.deflated_pages == 1


@pytest.mark.parametrize("bad_pfn", [
    (MIB + PAGE) // PAGE,               # the hole between the regions
    (BALLOON_AREA + MIB) // PAGE,       # just past the end of guest RAM
    0xFFFFFFFF,
])
def test_a_bad_pfn_fails_its_request_only(rig, bad_pfn):
    rig.fill(BALLOON_AREA, 2 * PAGE)
    assert rig.send_pfns(0, [pfn(0), bad_pfn]) == [(0, 0)]
    assert not rig.is_zero(BALLOON_AREA, PAGE)          # nothing of a failed request is discarded
    assert rig.device.counters.failed_requests == 1
    assert rig.device.counters.inflated_pages == 0
    assert rig.send_pfns(0, [pfn(PAGE)]) == [(1, 0)]    # the device goes on
    assert rig.is_zero(BALLOON_AREA + PAGE, PAGE)


def test_a_run_that_leaves_guest_ram_fails():
    rig = Rig()
    last = (BALLOON_AREA + MIB) // PAGE - 1
    rig.fill(BALLOON_AREA + MIB - PAGE, PAGE)
    rig.send_pfns(0, [last, last + 1])
    assert rig.device.counters.failed_requests == 1
    assert not rig.is_zero(BALLOON_AREA + MIB - PAGE, PAGE)
    rig.close()


def test_ragged_and_oversized_pfn_arrays_fail(rig):
    rig.fill(BALLOON_AREA, PAGE)
    assert rig.send(0, struct.pack("<I", pfn(0)) + b"\x01\x02") == [(0, 0)]
    assert rig.device.counters.failed_requests == 1
    big = MAX_PFNS_PER_REQUEST * 4 + 4
    assert rig.send(1, bytes(big)) == [(0, 0)]
    assert rig.device.counters.failed_requests == 2
    assert not rig.is_zero(BALLOON_AREA, PAGE)


def test_an_unaligned_report_fails_whole(rig):
    rig.fill(BALLOON_AREA, 4 * PAGE)
    assert rig.report(3, [(BALLOON_AREA, PAGE), (BALLOON_AREA + 2 * PAGE + 8, PAGE)]) == [(0, 0)]
    assert not rig.is_zero(BALLOON_AREA, PAGE)
    assert rig.device.counters.failed_requests == 1


# ---- config space --------------------------------------------------------------------------

def test_target_and_actual_in_config_space(rig):
    rig.device.set_target(300)
    assert rig.interrupt.config == 1
    assert rig.device.read_config(0, 4) == struct.pack("<I", 300)
    rig.device.write_config(4, struct.pack("<I", 0x12345))
    assert rig.device.actual_pages == 0x12345
    rig.device.write_config(6, b"\x00")                   # one byte of ``actual``
    assert rig.device.actual_pages == 0x02345
    rig.device.write_config(0, struct.pack("<I", 7))      # num_pages is the host's
    assert rig.device.target_pages == 300
    with pytest.raises(ValueError):
        rig.device.set_target(-1)


def test_wait_for_actual(rig):
    threading.Timer(0.05, rig.device.write_config, (4, struct.pack("<I", 256))).start()
    assert rig.device.wait_actual(lambda actual: actual == 256, DEADLINE)
    assert not rig.device.wait_actual(lambda actual: actual == 1, 0.01)


# ---- statistics ---------------------------------------------------------------------------

def answer_stats_request(rig: Rig, entries: list[tuple[int, int]] | bytes) -> None:
    """Play the guest: wait until the device returns the stats buffer, send a new one."""
    deadline = time.monotonic() + DEADLINE
    while not rig.drivers[2].take_used():
        assert time.monotonic() < deadline, "the device never returned the stats buffer"
        time.sleep(0.001)
    data = entries if isinstance(entries, bytes) else stats_bytes(entries)
    rig.drivers[2].add_chain([(data, False)])
    rig.device.process(2)


def request_in_thread(rig: Rig, timeout: float = DEADLINE):
    result = {}

    def run():
        try:
            result["stats"] = rig.device.request_stats(timeout)
        except Exception as error:  # noqa: BLE001 - handed to the test thread
            result["error"] = error
    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def test_stats_buffer_primed_before_driver_ok_is_held():
    rig = Rig(prime_stats=stats_bytes([(VIRTIO_BALLOON_S_MEMTOT, 1 << 30)]))
    assert rig.device.stats == {VIRTIO_BALLOON_S_MEMTOT: 1 << 30}
    assert rig.drivers[2].take_used() == []     # held, not returned
    rig.close()


def test_stats_refresh():
    rig = Rig(prime_stats=stats_bytes([(VIRTIO_BALLOON_S_MEMFREE, 1)]))
    thread, result = request_in_thread(rig)
    answer_stats_request(rig, [(VIRTIO_BALLOON_S_MEMFREE, 5 << 20), (VIRTIO_BALLOON_S_MINFLT, 42)])
    thread.join(DEADLINE)
    assert result == {"stats": {VIRTIO_BALLOON_S_MEMFREE: 5 << 20, VIRTIO_BALLOON_S_MINFLT: 42}}
    rig.close()


def test_stats_from_a_lying_guest_are_bounded():
    rig = Rig(prime_stats=b"")
    entries = [(999, 1), (VIRTIO_BALLOON_S_AVAIL, (1 << 64) - 1)]
    entries += [(VIRTIO_BALLOON_S_MEMFREE, i) for i in range(2 * MAX_STAT_ENTRIES)]
    thread, result = request_in_thread(rig)
    answer_stats_request(rig, stats_bytes(entries) + b"\x07")
    thread.join(DEADLINE)
    # Unknown tag dropped, only MAX_STAT_ENTRIES entries read, ragged tail ignored.
    assert result["stats"] == {VIRTIO_BALLOON_S_AVAIL: (1 << 64) - 1,
                               VIRTIO_BALLOON_S_MEMFREE: MAX_STAT_ENTRIES - 3}
    rig.close()


def test_a_guest_that_never_answers_times_out_and_can_answer_later():
    rig = Rig(prime_stats=stats_bytes([(VIRTIO_BALLOON_S_MEMFREE, 1)]))
    with pytest.raises(StatsTimeout):
        rig.device.request_stats(timeout=0.05)
    assert rig.drivers[2].take_used() == [(0, 0)]    # the buffer went back once
    with pytest.raises(StatsTimeout):                 # no buffer held: nothing to give back
        rig.device.request_stats(timeout=0.05)
    assert rig.drivers[2].take_used() == []
    thread, result = request_in_thread(rig)
    time.sleep(0.01)
    rig.drivers[2].add_chain([(stats_bytes([(VIRTIO_BALLOON_S_MEMFREE, 2)]), False)])
    rig.device.process(2)
    thread.join(DEADLINE)
    assert result == {"stats": {VIRTIO_BALLOON_S_MEMFREE: 2}}
    rig.close()


def test_a_held_stats_head_the_queue_no_longer_has_breaks_the_device_not_the_host():
    state = {**Balloon().save_state(), "acked_features": ALL_FEATURES, "stats_head": 100}
    rig = Rig()
    rig.device.restore_state(state)       # valid for a queue of up to 65536 entries, not for this one
    errors = []
    rig.interrupt.device_error = errors.append
    with pytest.raises(StatsUnavailable, match="statistics queue is broken"):
        rig.device.request_stats(timeout=DEADLINE)
    assert len(errors) == 1
    rig.close()


def test_a_second_stats_buffer_returns_the_first(rig):
    rig.drivers[2].add_chain([(stats_bytes([(VIRTIO_BALLOON_S_MEMFREE, 1)]), False)])
    rig.device.process(2)
    rig.drivers[2].add_chain([(stats_bytes([(VIRTIO_BALLOON_S_MEMFREE, 2)]), False)])
    rig.device.process(2)
    assert rig.drivers[2].take_used() == [(0, 0)]
    assert rig.device.stats == {VIRTIO_BALLOON_S_MEMFREE: 2}


def test_reset_while_waiting_for_stats():
    rig = Rig(prime_stats=b"")
    thread, result = request_in_thread(rig)
    deadline = time.monotonic() + DEADLINE
    while not rig.drivers[2].take_used():
        assert time.monotonic() < deadline
        time.sleep(0.001)
    rig.device.reset()
    thread.join(DEADLINE)
    assert isinstance(result["error"], StatsUnavailable)
    assert rig.device.actual_pages == 0
    rig.close()


# ---- snapshots ------------------------------------------------------------------------------

def test_save_and_restore_state():
    rig = Rig(prime_stats=stats_bytes([(VIRTIO_BALLOON_S_MEMFREE, 77)]))
    rig.device.set_target(1000)
    rig.device.write_config(4, struct.pack("<I", 600))
    rig.send_pfns(0, [pfn(0)])
    state = rig.device.save_state()
    restored = Balloon()
    restored.restore_state(state)
    assert restored.save_state() == state
    assert (restored.target_pages, restored.actual_pages) == (1000, 600)
    assert restored.read_config(0, 8) == struct.pack("<II", 1000, 600)
    # The stats buffer held at save time is given back on the first request.
    rig.device.reset()
    rig.device = restored
    restored.activate(rig.memory, rig.queues, rig.interrupt)
    thread, result = request_in_thread(rig)
    answer_stats_request(rig, [(VIRTIO_BALLOON_S_MEMFREE, 78)])
    thread.join(DEADLINE)
    assert result == {"stats": {VIRTIO_BALLOON_S_MEMFREE: 78}}
    rig.close()


@pytest.mark.parametrize("change", [
    {"target_pages": -1},
    {"actual_pages": 1 << 32},
    {"acked_features": 1 << 3},          # FREE_PAGE_HINT was never offered
    {"stats_head": 70000},
    {"stats": {"999": 1}},
    {"stats": {"4": "many"}},
    {"counters": {}},
    {"target_pages": True},
])
def test_restore_refuses_bad_state(change):
    state = {**Balloon().save_state(), **change}
    with pytest.raises(InvalidBalloonState):
        Balloon().restore_state(state)


# ---- host API -------------------------------------------------------------------------------

def test_memory_balloon_clamps_the_target(rig):
    api = MemoryBalloon(rig.device, memory_mib=1024)
    api.target_mib = 300
    assert (api.target_mib, rig.device.target_pages) == (300, 300 * 256)
    with pytest.warns(BalloonTargetClamped, match="outside 0..1024 MiB"):
        api.target_mib = 5000
    assert api.target_mib == 1024
    with pytest.warns(BalloonTargetClamped):
        api.target_mib = -5
    assert api.target_mib == 0
    with pytest.raises(TypeError):
        api.target_mib = 1.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        api.target_mib = 1024
    rig.device.write_config(4, struct.pack("<I", 512 * 256 + 100))
    assert api.actual_mib == 512


def test_memory_balloon_stats():
    rig = Rig(prime_stats=b"")
    api = MemoryBalloon(rig.device, memory_mib=1)
    result = {}
    thread = threading.Thread(target=lambda: result.update(stats=api.stats(timeout=DEADLINE)))
    thread.start()
    answer_stats_request(rig, [(VIRTIO_BALLOON_S_MEMFREE, 10), (VIRTIO_BALLOON_S_MEMTOT, 20)])
    thread.join(DEADLINE)
    assert result["stats"] == BalloonStats(free=10, available=None, total=20, caches=None, swap_in=None,
                                           swap_out=None, major_faults=None, minor_faults=None)
    with pytest.raises(BalloonError, match="within 0.05 s"):
        api.stats(timeout=0.05)
    rig.close()


def test_memory_balloon_stats_without_a_driver():
    api = MemoryBalloon(Balloon(), memory_mib=512)
    with pytest.raises(BalloonError, match="virtio_balloon driver"):
        api.stats(timeout=0.01)


# ---- fuzz -----------------------------------------------------------------------------------

@given(st.binary(max_size=64))
def test_pfn_runs_cover_exactly_the_array(data):
    if len(data) % 4:
        with pytest.raises(RaggedPfnArray):
            pfn_runs(data)
        return
    runs = pfn_runs(data)
    expanded = [first + i for first, count in runs for i in range(count)]
    assert expanded == [p for (p,) in struct.iter_unpack("<I", data)]
    assert all(a[0] + a[1] != b[0] for a, b in zip(runs, runs[1:]))


@given(st.binary(max_size=200))
def test_parse_stats_never_fails(data):
    stats = parse_stats(data)
    assert len(stats) <= MAX_STAT_ENTRIES and all(0 <= v < 1 << 64 for v in stats.values())


_GUEST_PFNS = st.integers((BALLOON_AREA // PAGE), (BALLOON_AREA + MIB) // PAGE - 1)
# Anything but the first MiB, where the rings are (a guest that balloons its rings away
# only hurts itself, and this test's driver).
_ANY_PFNS = st.integers(MIB // PAGE, 0xFFFFFFFF)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(_GUEST_PFNS, _ANY_PFNS), max_size=40),
       st.integers(0, 3), st.sampled_from([0, 1]))
def test_inflate_fuzz(pfns, tail, queue):
    rig = Rig()
    try:
        rig.fill(BALLOON_AREA, MIB)
        data = b"".join(struct.pack("<I", p) for p in pfns) + bytes(tail)
        used = rig.send(queue, data)
        assert len(used) == 1 and used[0][1] == 0
        counters = rig.device.counters
        valid = not tail and all(rig.memory.contains(p * PAGE, PAGE) for p in pfns)
        assert counters.failed_requests == (0 if valid else 1)
        assert counters.inflated_pages + counters.deflated_pages == (len(pfns) if valid else 0)
        discarded = {p for p in pfns if queue == 0 and valid}
        for p in range(BALLOON_AREA // PAGE, (BALLOON_AREA + MIB) // PAGE):
            assert rig.is_zero(p * PAGE, PAGE) == (p in discarded)
    finally:
        rig.close()


# ---- through the transport, in Linux's order ------------------------------------------------

def test_linux_bring_up_through_the_mmio_transport():
    memory = GuestMemory([(0, MIB), (BALLOON_AREA, MIB)])
    device = Balloon()
    irqs = []
    transport = MmioTransport(device, memory, irq=lambda: irqs.append(1))

    def w32(offset, value):
        transport.write(offset, value.to_bytes(4, "little"))

    def r32(offset):
        return int.from_bytes(transport.read(offset, 4), "little")

    w32(mmio.REG_STATUS, 1)
    w32(mmio.REG_STATUS, 1 | 2)
    for select in (0, 1):
        w32(mmio.REG_DRIVER_FEATURES_SEL, select)
        w32(mmio.REG_DRIVER_FEATURES, (ALL_FEATURES >> (32 * select)) & 0xFFFFFFFF)
    w32(mmio.REG_STATUS, 1 | 2 | 8)
    assert r32(mmio.REG_STATUS) == 1 | 2 | 8
    drivers = []
    for index in range(4):                    # inflate, deflate, stats, reporting: compact
        driver = FakeDriver(memory, 16, base=0x1000 * (index + 1), data=0x10000 * (index + 1))
        w32(mmio.REG_QUEUE_SEL, index)
        w32(mmio.REG_QUEUE_NUM, 16)
        for low, value in ((mmio.REG_QUEUE_DESC_LOW, driver.desc_table),
                           (mmio.REG_QUEUE_DRIVER_LOW, driver.avail_ring),
                           (mmio.REG_QUEUE_DEVICE_LOW, driver.used_ring)):
            w32(low, value)
            w32(low + 4, 0)
        w32(mmio.REG_QUEUE_READY, 1)
        drivers.append(driver)
    # init_vqs() primes the stats queue and kicks it before DRIVER_OK: the kick is refused.
    drivers[2].add_chain([(stats_bytes([(VIRTIO_BALLOON_S_MEMTOT, 1 << 30)]), False)])
    w32(mmio.REG_QUEUE_NOTIFY, 2)
    assert device.stats == {}
    w32(mmio.REG_STATUS, 1 | 2 | 8 | 4)
    assert device.stats == {VIRTIO_BALLOON_S_MEMTOT: 1 << 30}

    device.set_target(256)
    assert irqs and r32(mmio.REG_INTERRUPT_STATUS) & mmio.INTERRUPT_CONFIG_CHANGE
    assert int.from_bytes(transport.read(mmio.CONFIG_SPACE, 4), "little") == 256
    memory.write(BALLOON_AREA, b"\xff" * PAGE)
    drivers[0].add_chain([(struct.pack("<I", pfn(0)), False)])
    w32(mmio.REG_QUEUE_NOTIFY, 0)
    assert drivers[0].take_used() == [(0, 0)] and memory.read(BALLOON_AREA, PAGE) == bytes(PAGE)
    transport.write(mmio.CONFIG_SPACE + 4, struct.pack("<I", 1))
    assert device.actual_pages == 1
    memory.close()
