"""virtio-balloon (virtio 1.2 §5.5): the guest hands pages back to the host and
says how its memory is used.

Features offered: STATS_VQ, DEFLATE_ON_OOM (the guest may take ballooned pages
back when it would otherwise OOM) and REPORTING (free page reporting: the guest
reports free blocks, 2–4 MiB, without being asked). Not MUST_TELL_HOST: a
deflated page simply faults back in, so the guest may reuse it at once. Not
FREE_PAGE_HINT (a migration aid) nor PAGE_POISON.

Queues, numbered as Linux's virtio-mmio ``vm_find_vqs`` numbers them: a queue
whose feature was not negotiated takes no index. So inflateq 0, deflateq 1,
then statsq if STATS_VQ was negotiated, then reporting_vq if REPORTING was (2
or 3), not the fixed numbers the spec's table suggests (reporting_vq = 4).

* inflateq / deflateq: readable buffers of ``le32`` PFNs of 4 KiB frames.
  Inflated frames are discarded on the host (``GuestMemory.discard``, madvise
  DONTNEED); deflate needs nothing, the next guest touch faults a page in.
* statsq (§5.5.6.3): the guest offers one readable buffer of
  ``{le16 tag; le64 val}`` entries. The device holds it; to ask for fresh
  figures it returns the buffer, and the guest answers with a new one.
* reporting_vq: device-writable buffers, each a free range of guest RAM; the
  device discards them and returns the chain.

Config space (§5.5.4): ``le32 num_pages`` (target, written by the host),
``le32 actual`` (written by the driver).

A request the guest got wrong (a PFN outside guest RAM, a ragged or oversized
PFN array, an unaligned reported range) fails alone: nothing of it is
discarded, it is counted and logged, and the chain is returned. Malformed rings
are the queue's :class:`VirtioError`, as for every device.
"""

from __future__ import annotations

import logging
import mmap
import struct
import threading
from dataclasses import dataclass

from vmm.devices.virtio.device import VIRTIO_ID_BALLOON, VirtioDevice, feature
from vmm.devices.virtio.errors import VirtioError
from vmm.devices.virtio.queue import Queue
from vmm.memory import GuestMemory

log = logging.getLogger(__name__)

# Feature bits (§5.5.3).
VIRTIO_BALLOON_F_MUST_TELL_HOST = 0
VIRTIO_BALLOON_F_STATS_VQ = 1
VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 2
VIRTIO_BALLOON_F_FREE_PAGE_HINT = 3
VIRTIO_BALLOON_F_PAGE_POISON = 4
VIRTIO_BALLOON_F_REPORTING = 5

# Statistic tags (§5.5.6.3). Memory and swap figures are bytes, faults are counts.
VIRTIO_BALLOON_S_SWAP_IN = 0
VIRTIO_BALLOON_S_SWAP_OUT = 1
VIRTIO_BALLOON_S_MAJFLT = 2
VIRTIO_BALLOON_S_MINFLT = 3
VIRTIO_BALLOON_S_MEMFREE = 4
VIRTIO_BALLOON_S_MEMTOT = 5
VIRTIO_BALLOON_S_AVAIL = 6
VIRTIO_BALLOON_S_CACHES = 7
VIRTIO_BALLOON_S_HTLB_PGALLOC = 8
VIRTIO_BALLOON_S_HTLB_PGFAIL = 9
KNOWN_STAT_TAGS = frozenset(range(VIRTIO_BALLOON_S_HTLB_PGFAIL + 1))

PFN_SHIFT = 12                    # balloon PFNs are 4 KiB frames, whatever the guest's page size
PAGE_BYTES = 1 << PFN_SHIFT
MAX_PAGES = 0xFFFFFFFF            # num_pages and actual are le32
QUEUE_SIZE = 256                  # Linux needs >= 32 on reporting_vq (PAGE_REPORTING_CAPACITY)
MAX_PFNS_PER_REQUEST = 1 << 16    # Linux sends <= 256; beyond this a request is refused unread
MAX_STAT_ENTRIES = 64             # Linux sends 10; later entries are not read

_PFN = struct.Struct("<I")
_STAT = struct.Struct("<HQ")
_CONFIG = struct.Struct("<II")    # num_pages, actual
_ACTUAL_OFFSET = 4

INFLATE, DEFLATE, STATS, REPORTING = "inflate", "deflate", "stats", "reporting"


class BalloonRequestFailed(Exception):
    """A guest request the device refuses; the device goes on."""


class PfnOutsideGuestRam(BalloonRequestFailed):
    """An inflate or deflate PFN names a frame that is not guest RAM."""


class RaggedPfnArray(BalloonRequestFailed):
    """A PFN array is not a whole number of le32 entries, or is too long."""


class UnalignedReport(BalloonRequestFailed):
    """A reported free range does not start and end on 4 KiB frames."""


class StatsUnavailable(Exception):
    """The driver has not negotiated the stats queue, or the device is not running."""


class StatsTimeout(Exception):
    """The guest did not send fresh statistics in time."""


class InvalidBalloonState(ValueError):
    """Saved balloon state that this device cannot take."""


@dataclass
class BalloonCounters:
    inflated_pages: int = 0       # 4 KiB frames discarded on inflate
    deflated_pages: int = 0
    reported_bytes: int = 0       # free page reporting, discarded
    failed_requests: int = 0      # requests refused (BalloonRequestFailed)


def pfn_runs(data: bytes) -> list[tuple[int, int]]:
    """The PFN array ``data`` as ``(first pfn, count)`` runs of consecutive frames."""
    if len(data) % _PFN.size:
        raise RaggedPfnArray(f"PFN array of {len(data)} bytes is not whole le32 entries")
    runs: list[tuple[int, int]] = []
    for (pfn,) in _PFN.iter_unpack(data):
        if runs and runs[-1][0] + runs[-1][1] == pfn:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((pfn, 1))
    return runs


def parse_stats(data: bytes) -> dict[int, int]:
    """Known tags of a stats buffer; unknown tags and a ragged tail are ignored."""
    stats = {}
    usable = min(len(data) // _STAT.size, MAX_STAT_ENTRIES) * _STAT.size
    for tag, value in _STAT.iter_unpack(data[:usable]):
        if tag in KNOWN_STAT_TAGS:
            stats[tag] = value
    return stats


class Balloon(VirtioDevice):
    """The balloon device. The host side sets :meth:`set_target`, reads
    :attr:`actual_pages`, and calls :meth:`request_stats`."""

    device_id = VIRTIO_ID_BALLOON
    queue_max_sizes = (QUEUE_SIZE,) * 4   # inflate, deflate, and at most stats + reporting

    def __init__(self) -> None:
        super().__init__()
        self.avail_features |= (feature(VIRTIO_BALLOON_F_STATS_VQ)
                                | feature(VIRTIO_BALLOON_F_DEFLATE_ON_OOM)
                                | feature(VIRTIO_BALLOON_F_REPORTING))
        self.target_pages = 0
        self.actual_pages = 0
        self.counters = BalloonCounters()
        self.stats: dict[int, int] = {}
        self._roles: dict[int, str] = {}
        self._stats_head: int | None = None      # the guest's stats buffer, while we hold it
        self._stats_received = 0                 # stats buffers received, ever
        self._resets = 0
        # Host threads wait here for stats and for ``actual``; shares the device lock.
        self.changed = threading.Condition(self.lock)
        self.interrupt = None

    # ---- transport hooks -------------------------------------------------------

    def config_bytes(self) -> bytes:
        return _CONFIG.pack(self.target_pages, self.actual_pages)

    def write_config(self, offset: int, data: bytes) -> None:
        # Only ``actual`` is the driver's; a write may cover part of it.
        with self.lock:
            config = bytearray(self.config_bytes())
            start, end = max(offset, _ACTUAL_OFFSET), min(offset + len(data), len(config))
            if start < end:
                config[start:end] = data[start - offset : end - offset]
                self.actual_pages = _CONFIG.unpack(config)[1]
                self.changed.notify_all()

    def activate(self, memory: GuestMemory, queues: list[Queue], interrupt) -> None:
        super().activate(memory, queues, interrupt)
        roles = [INFLATE, DEFLATE]
        if self.has_feature(VIRTIO_BALLOON_F_STATS_VQ):
            roles.append(STATS)
        if self.has_feature(VIRTIO_BALLOON_F_REPORTING):
            roles.append(REPORTING)
        self._roles = dict(enumerate(roles))
        # Linux offers its first stats buffer before DRIVER_OK, when a kick is refused.
        for index in self._roles:
            self.process(index)

    def process(self, queue_index: int) -> None:
        with self.lock:
            role = self._roles.get(queue_index)
            if role == STATS:
                self._take_stats(self.queues[queue_index])
            elif role is not None:
                self._serve(role, self.queues[queue_index])

    def reset(self) -> None:
        with self.lock:
            super().reset()
            self.actual_pages = 0
            self._roles = {}
            self._stats_head = None
            self._resets += 1
            self.changed.notify_all()

    # ---- inflate, deflate, reporting ---------------------------------------------

    def _serve(self, role: str, queue: Queue) -> None:
        for chain in queue.drain():
            try:
                if role == REPORTING:
                    self._report(chain)
                else:
                    self._inflate_or_deflate(role, chain.read(0, self._pfn_bytes(chain)))
            except BalloonRequestFailed as failure:
                self.counters.failed_requests += 1
                log.debug("virtio-balloon %s request %d refused: %s", role, chain.head, failure)
            queue.add_used(chain.head, 0)
        if queue.needs_notification():
            self.interrupt.signal_used_queue()

    @staticmethod
    def _pfn_bytes(chain) -> int:
        if chain.readable_length > MAX_PFNS_PER_REQUEST * _PFN.size:
            raise RaggedPfnArray(f"PFN array of {chain.readable_length} bytes "
                                 f"(at most {MAX_PFNS_PER_REQUEST} entries)")
        return chain.readable_length

    def _inflate_or_deflate(self, role: str, data: bytes) -> None:
        ranges = []
        for pfn, count in pfn_runs(data):
            gpa, length = pfn << PFN_SHIFT, count << PFN_SHIFT
            if not self.memory.contains(gpa, length):
                raise PfnOutsideGuestRam(f"PFNs {pfn:#x}+{count} are not guest RAM")
            ranges.append((gpa, length))
        pages = len(data) // _PFN.size
        if role == DEFLATE:
            self.counters.deflated_pages += pages
            return
        for gpa, length in ranges:
            self._discard(gpa, length)
        self.counters.inflated_pages += pages

    def _report(self, chain) -> None:
        for buffer in chain.writable:
            if buffer.gpa % PAGE_BYTES or buffer.length % PAGE_BYTES:
                raise UnalignedReport(f"reported range {buffer.gpa:#x}+{buffer.length:#x}")
        for buffer in chain.writable:    # each already checked to lie in guest RAM
            self._discard(buffer.gpa, buffer.length)
            self.counters.reported_bytes += buffer.length

    def _discard(self, gpa: int, length: int) -> None:
        # Only whole host pages can go back (larger than 4 KiB on some hosts).
        host_page = mmap.PAGESIZE
        start = -(-gpa // host_page) * host_page
        end = (gpa + length) // host_page * host_page
        if end > start:
            self.memory.discard(start, end - start)

    # ---- statistics -------------------------------------------------------------

    def _take_stats(self, queue: Queue) -> None:
        for chain in queue.drain():
            if self._stats_head is not None:
                # A second buffer: give the older one back, keep the newest.
                queue.add_used(self._stats_head, 0)
            readable = min(chain.readable_length, MAX_STAT_ENTRIES * _STAT.size)
            self.stats = parse_stats(chain.read(0, readable))
            self._stats_head = chain.head
            self._stats_received += 1
            self.changed.notify_all()
        if queue.needs_notification():
            self.interrupt.signal_used_queue()

    def _stats_queue(self) -> Queue:
        for index, role in self._roles.items():
            if role == STATS:
                return self.queues[index]
        raise StatsUnavailable("the guest's balloon driver has not set up the statistics queue")

    def request_stats(self, timeout: float) -> dict[int, int]:
        """Ask the guest for fresh statistics and wait up to ``timeout`` s for them."""
        with self.lock:
            queue = self._stats_queue()
            received, resets = self._stats_received, self._resets
            if self._stats_head is not None:
                head, self._stats_head = self._stats_head, None
                try:
                    queue.add_used(head, 0)
                except VirtioError as error:    # the driver changed the queue under us
                    self.interrupt.device_error(error)
                    raise StatsUnavailable(f"the balloon's statistics queue is broken: {error}") from None
                if queue.needs_notification():
                    self.interrupt.signal_used_queue()
            # With no buffer held, the guest is still answering an earlier request.
            if not self.changed.wait_for(
                    lambda: self._stats_received != received or self._resets != resets, timeout):
                raise StatsTimeout(f"the guest sent no balloon statistics within {timeout:g} s")
            if self._resets != resets:
                raise StatsUnavailable("the guest reset the balloon device while asked for statistics")
            return dict(self.stats)

    # ---- host side ----------------------------------------------------------------

    def set_target(self, pages: int) -> None:
        """Ask the guest to hold ``pages`` 4 KiB frames in the balloon."""
        if not 0 <= pages <= MAX_PAGES:
            raise ValueError(f"balloon target of {pages} pages is out of range")
        with self.lock:
            self.target_pages = pages
            if self.interrupt is not None and self._roles:
                self.interrupt.signal_config_change()

    def wait_actual(self, predicate, timeout: float) -> bool:
        """Wait up to ``timeout`` s until ``predicate(actual_pages)`` holds."""
        with self.lock:
            return self.changed.wait_for(lambda: predicate(self.actual_pages), timeout)

    # ---- snapshots ------------------------------------------------------------------

    def save_state(self) -> dict:
        """What the device keeps beyond its transport and queues, as JSON-able data."""
        with self.lock:
            return {
                "acked_features": self.acked_features,
                "target_pages": self.target_pages,
                "actual_pages": self.actual_pages,
                "stats_head": self._stats_head,
                "stats": {str(tag): value for tag, value in sorted(self.stats.items())},
                "counters": vars(self.counters).copy(),
            }

    def restore_state(self, state: dict) -> None:
        """Take saved state back; refuses anything this device could not have saved."""
        try:
            acked = _int_field(state, "acked_features", 0, (1 << 64) - 1)
            target = _int_field(state, "target_pages", 0, MAX_PAGES)
            actual = _int_field(state, "actual_pages", 0, MAX_PAGES)
            head = state["stats_head"]
            if head is not None:
                head = _int_field(state, "stats_head", 0, 0xFFFF)
            stats = {int(tag): _int_field(state["stats"], tag, 0, (1 << 64) - 1)
                     for tag in state["stats"]}
            counters = BalloonCounters(**{name: _int_field(state["counters"], name, 0, 1 << 63)
                                          for name in vars(BalloonCounters())})
        except (KeyError, TypeError, ValueError) as error:
            raise InvalidBalloonState(f"balloon state: {error}") from None
        if acked & ~self.avail_features:
            raise InvalidBalloonState(f"balloon state: features {acked:#x} were never offered")
        if not set(stats) <= KNOWN_STAT_TAGS:
            raise InvalidBalloonState(f"balloon state: unknown stat tags {sorted(set(stats) - KNOWN_STAT_TAGS)}")
        with self.lock:
            self.acked_features = acked
            self.target_pages, self.actual_pages = target, actual
            self._stats_head = head
            self.stats = stats
            self.counters = counters


def _int_field(mapping: dict, key: str, low: int, high: int) -> int:
    value = mapping[key]
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{key} = {value!r} is not an integer in [{low}, {high}]")
    return value
