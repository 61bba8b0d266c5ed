"""The memory balloon of a machine, as ``Machine.balloon``.

    m.balloon.target_mib = 512      # ask the guest to give 512 MiB back
    m.balloon.actual_mib            # how much it has given so far
    m.balloon.stats()               # the guest's memory figures, fresh

The guest gives memory back at its own pace and may take it back under memory
pressure (deflate on OOM), so ``actual_mib`` can lag or stay below the target.
Memory the guest frees is also returned without a target (free page
reporting). See docs/balloon.md.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from vmm.devices.virtio import balloon as device
from vmm.devices.virtio.balloon import Balloon, StatsTimeout, StatsUnavailable

PAGES_PER_MIB = (1 << 20) // device.PAGE_BYTES
STATS_TIMEOUT = 5.0      # s: the guest answers a stats request within a few ms when alive


class BalloonError(Exception):
    """The balloon cannot do what was asked; the message says why."""


class BalloonTargetClamped(UserWarning):
    """A target outside [0, guest RAM] was clamped into it."""


@dataclass(frozen=True)
class BalloonStats:
    """Guest memory figures from the balloon's statistics queue; ``None`` when the
    guest did not report one. Bytes, except the fault counts."""

    free: int | None
    available: int | None
    total: int | None
    caches: int | None
    swap_in: int | None
    swap_out: int | None
    major_faults: int | None
    minor_faults: int | None

    @classmethod
    def from_tags(cls, stats: dict[int, int]) -> BalloonStats:
        return cls(
            free=stats.get(device.VIRTIO_BALLOON_S_MEMFREE),
            available=stats.get(device.VIRTIO_BALLOON_S_AVAIL),
            total=stats.get(device.VIRTIO_BALLOON_S_MEMTOT),
            caches=stats.get(device.VIRTIO_BALLOON_S_CACHES),
            swap_in=stats.get(device.VIRTIO_BALLOON_S_SWAP_IN),
            swap_out=stats.get(device.VIRTIO_BALLOON_S_SWAP_OUT),
            major_faults=stats.get(device.VIRTIO_BALLOON_S_MAJFLT),
            minor_faults=stats.get(device.VIRTIO_BALLOON_S_MINFLT),
        )


class MemoryBalloon:
    """Host-side control of one machine's balloon device."""

    def __init__(self, balloon: Balloon, memory_mib: int):
        self._device = balloon
        self.memory_mib = memory_mib

    @property
    def target_mib(self) -> int:
        """How much memory the guest is asked to give back, in MiB."""
        return self._device.target_pages // PAGES_PER_MIB

    @target_mib.setter
    def target_mib(self, mib: int) -> None:
        if isinstance(mib, bool) or not isinstance(mib, int):
            raise TypeError(f"balloon target must be a whole number of MiB, not {mib!r}")
        clamped = min(max(mib, 0), self.memory_mib)
        if clamped != mib:
            warnings.warn(f"balloon target {mib} MiB is outside 0..{self.memory_mib} MiB "
                          f"(the guest's RAM); using {clamped} MiB", BalloonTargetClamped, stacklevel=2)
        self._device.set_target(clamped * PAGES_PER_MIB)

    @property
    def actual_mib(self) -> int:
        """How much memory the guest has given back, in whole MiB."""
        return self._device.actual_pages // PAGES_PER_MIB

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the guest to reach the target; True if it did."""
        target = self._device.target_pages
        return self._device.wait_actual(lambda actual: actual == target, timeout)

    def stats(self, timeout: float = STATS_TIMEOUT) -> BalloonStats:
        """Fresh memory figures from the guest, waiting at most ``timeout`` s."""
        try:
            return BalloonStats.from_tags(self._device.request_stats(timeout))
        except StatsUnavailable as error:
            raise BalloonError(f"no balloon statistics: {error} (is the guest's virtio_balloon "
                               "driver loaded?)") from None
        except StatsTimeout as error:
            raise BalloonError(f"{error}; try again, or check that the guest is not hung") from None
