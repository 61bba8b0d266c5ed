"""virtio-balloon on a real guest: inflating, deflating, free page reporting, statistics.

The VMM is this test process, so its RSS (/proc/self/status) is where guest memory
given back must show. One 1 GiB machine serves the module; tests run in file order.
"""

from __future__ import annotations

import time

import pytest

from vmm import Machine
from vmm.devices.virtio.balloon import (
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_REPORTING,
    VIRTIO_BALLOON_F_STATS_VQ,
)

pytestmark = pytest.mark.usefixtures("linux_kvm", "guest_initramfs")

MIB = 1 << 20
GUEST_MIB = 1536
HOG_MIB = 1024                # what the guest allocates, touches and frees (the issue: "a guest frees 1 GiB")
DEADLINE = 300.0              # s: the test bed is emulated, and reporting runs every ~2 s
# Allocate and touch every page (bytes * n writes them all), hold until stdin closes.
HOLD = "import sys; x = b'\\x01' * ({mib} << 20); print('held', flush=True); sys.stdin.read()"


@pytest.fixture(scope="module")
def machine():
    with Machine.boot(memory_mib=GUEST_MIB) as m:
        yield m


def host_rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def wait_until(condition, what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {timeout:g} s")
        time.sleep(0.25)


def wait_until_inflated(machine) -> None:
    """Until the balloon holds 90 % of its target (the guest's watermarks stop it a little short)."""
    wait_until(lambda: machine.balloon.actual_mib >= 0.9 * machine.balloon.target_mib,
               f"the balloon to reach {machine.balloon.target_mib} MiB")


def hold_then_free(machine, mib: int) -> int:
    """Have the guest touch ``mib`` MiB and free it; returns host RSS while it was held."""
    stream = machine.exec_stream(["python3", "-c", HOLD.format(mib=mib)])
    assert next(iter(stream)).data == b"held\n"
    rss = host_rss()
    stream.close_stdin()
    assert stream.result(timeout=DEADLINE).exit_code == 0
    return rss


def test_the_guest_driver_takes_every_feature_and_reports_stats(machine):
    device = machine._vm.balloon
    for bit in (VIRTIO_BALLOON_F_STATS_VQ, VIRTIO_BALLOON_F_DEFLATE_ON_OOM, VIRTIO_BALLOON_F_REPORTING):
        assert device.has_feature(bit), bit
    stats = machine.balloon.stats(timeout=30)
    assert 0.8 * GUEST_MIB * MIB < stats.total <= GUEST_MIB * MIB
    assert 0 < stats.free <= stats.total and 0 < stats.available <= stats.total
    assert stats.minor_faults > 0 and stats.caches is not None
    again = machine.balloon.stats(timeout=30)            # a second refresh works too
    assert again.minor_faults >= stats.minor_faults
    assert (machine.balloon.target_mib, machine.balloon.actual_mib) == (0, 0)


def test_free_page_reporting_returns_freed_memory_without_a_target(machine):
    reported_before = machine._vm.balloon.counters.reported_bytes    # boot already reports
    peak = hold_then_free(machine, HOG_MIB)
    freed = time.monotonic()
    wanted = 0.9 * HOG_MIB * MIB
    wait_until(lambda: peak - host_rss() >= wanted,
               f"host RSS to drop by {wanted / MIB:.0f} MiB from {peak / MIB:.0f} MiB after the "
               f"guest freed {HOG_MIB} MiB (now {host_rss() / MIB:.0f} MiB)")
    assert machine._vm.balloon.counters.reported_bytes - reported_before >= wanted
    print(f"\nreporting: host RSS {peak / MIB:.0f} -> {host_rss() / MIB:.0f} MiB "
          f"{time.monotonic() - freed:.1f} s after the guest freed {HOG_MIB} MiB")
    assert machine.balloon.actual_mib == 0


def test_inflate_releases_host_memory_and_deflate_gives_it_back(machine):
    peak = hold_then_free(machine, HOG_MIB)
    counters = machine._vm.balloon.counters
    inflated_before, reported_before = counters.inflated_pages, counters.reported_bytes
    free_mib = machine.balloon.stats(timeout=30).free // MIB
    machine.balloon.target_mib = free_mib - 32          # nearly all the guest's free memory
    started = time.monotonic()
    wanted = 0.9 * HOG_MIB * MIB
    wait_until(lambda: peak - host_rss() >= wanted,
               f"host RSS to drop by {wanted / MIB:.0f} MiB from {peak / MIB:.0f} MiB with a "
               f"{machine.balloon.target_mib} MiB target (now {host_rss() / MIB:.0f} MiB, "
               f"balloon {machine.balloon.actual_mib} MiB)")
    wait_until_inflated(machine)
    assert counters.inflated_pages > inflated_before
    print(f"\ninflate: host RSS {peak / MIB:.0f} -> {host_rss() / MIB:.0f} MiB, balloon "
          f"{machine.balloon.actual_mib} MiB, {time.monotonic() - started:.1f} s; meanwhile "
          f"{(counters.inflated_pages - inflated_before) * 4096 / MIB:.0f} MiB inflated, "
          f"{(counters.reported_bytes - reported_before) / MIB:.0f} MiB reported")

    machine.balloon.target_mib = 0
    assert machine.balloon.wait(DEADLINE), f"balloon still {machine.balloon.actual_mib} MiB"
    assert machine._vm.balloon.counters.deflated_pages > 0
    hold_then_free(machine, HOG_MIB)                     # the guest has its memory again


def test_deflate_on_oom_lets_an_allocation_win(machine):
    free_mib = machine.balloon.stats(timeout=30).free // MIB
    machine.balloon.target_mib = free_mib - 32
    wait_until_inflated(machine)
    inflated = machine.balloon.actual_mib
    hold_then_free(machine, 256)                         # more than the guest has left
    assert machine.balloon.actual_mib < inflated
    machine.balloon.target_mib = 0
    assert machine.balloon.wait(DEADLINE)


def test_a_target_above_guest_ram_is_clamped(machine):
    with pytest.warns(UserWarning, match=f"outside 0..{GUEST_MIB} MiB"):
        machine.balloon.target_mib = GUEST_MIB * 4
    assert machine.balloon.target_mib == GUEST_MIB
    machine.balloon.target_mib = 0
    assert machine.balloon.wait(DEADLINE)
    assert machine.exec(["true"]).exit_code == 0          # the guest lived through it


KILL_HOLDER = ("import os\n"
               "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
               "    if int(pid) != os.getpid() and b'held' in open(f'/proc/{pid}/cmdline', 'rb').read():\n"
               "        os.kill(int(pid), 9)\n")


def test_a_restored_machine_gives_pages_back_as_holes_in_its_next_snapshot(tmp_path):
    """Every sm kernel runs on a restored machine: its RAM is the memory file mapped
    copy-on-write, where dropping a page would bring the file's page back."""
    held_mib = 512
    with Machine.boot(memory_mib=1024) as original:
        stream = original.exec_stream(["python3", "-c", HOLD.format(mib=held_mib)])
        assert next(iter(stream)).data == b"held\n"
        held = original.snapshot(tmp_path / "held")            # 512 MiB of 0x01 in the file
    with Machine.restore(held.path) as restored:
        assert restored.exec(["python3", "-c", KILL_HOLDER]).exit_code == 0
        wait_until(lambda: restored.balloon.stats(timeout=30).free > (held_mib + 64) * MIB,
                   f"the guest to free the {held_mib} MiB it held")
        restored.balloon.target_mib = restored.balloon.stats(timeout=30).free // MIB - 64
        wait_until_inflated(restored)
        inflated_mib, target_mib = restored.balloon.actual_mib, restored.balloon.target_mib
        inflated = restored.snapshot(tmp_path / "inflated")  # the balloon may still grow a little
    print(f"\nsnapshot before {held.disk_bytes / MIB:.0f} MiB, after a {inflated_mib} MiB "
          f"balloon {inflated.disk_bytes / MIB:.0f} MiB")
    assert inflated.disk_bytes < held.disk_bytes - 0.8 * held_mib * MIB

    with Machine.restore(inflated.path) as again:               # restored while inflated
        assert target_mib >= again.balloon.actual_mib >= inflated_mib
        assert again.balloon.target_mib == target_mib
        again.balloon.target_mib = 0
        assert again.balloon.wait(DEADLINE), f"balloon still {again.balloon.actual_mib} MiB"
        hold_then_free(again, held_mib)                         # the guest has its memory again
