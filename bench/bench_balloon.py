"""The balloon: how much host memory a 2 GiB guest gives back, how fast, and what it does
to snapshots — in one run, each figure beside its anchor (the same guest before).

1. Free page reporting, no target: a guest process touches 1 GiB and exits; the VMM's host
   RSS (this process: the VMM runs in it) before, while held, and once it stopped falling,
   with the time from the exit to 90 % of the GiB released.
2. Inflate: the guest's page cache holds its root disk (memory in use, so free page
   reporting leaves it alone); the target is set so that the guest keeps KEEP_MIB; the
   time until the guest has given it all, and the RSS before and after.
3. Snapshots of that guest with the balloon inflated, and again deflated to 0 with the
   cache refilled: size on disk and save time (released pages are holes in the memory file).

Usage (where guests run, e.g. the test bed):
    python bench/bench_balloon.py [--runs 3]
Prints Markdown tables; no assertions. Absolute times in the test bed are those of an
emulated machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vmm import Machine  # noqa: E402
from vmm.paths import snapshots_dir  # noqa: E402

GUEST_MIB = 2048
HELD_MIB = 1024
KEEP_MIB = 384        # what the inflated guest keeps
MIB = 1 << 20
POLL = 0.1
SETTLE = 3.0          # s without a further drop of 1 MiB: RSS has stopped falling
LIMIT = 120.0         # s to wait for the guest at most

# In the guest: touch HELD_MIB, say so, then exit when told (the memory is freed).
HOLDER = f"""
import sys
buf = bytearray({HELD_MIB} << 20)
for offset in range(0, len(buf), 4096):
    buf[offset] = 1
print("held", flush=True)
sys.stdin.readline()
"""
# In the guest: fill the page cache with the root disk (the default image's is ~470 MB).
FILL_CACHE = "cat /dev/vda > /dev/null"


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def settled_rss(since: float, target: float | None = None) -> tuple[float, float | None]:
    """Wait until RSS stops falling; (final RSS, seconds after ``since`` it first went
    under ``target``)."""
    reached = None
    last, last_change = rss_mib(), time.monotonic()
    while time.monotonic() - last_change < SETTLE and time.monotonic() - since < LIMIT:
        time.sleep(POLL)
        now = rss_mib()
        if target is not None and reached is None and now <= target:
            reached = time.monotonic() - since
        if now < last - 1:
            last, last_change = now, time.monotonic()
    return rss_mib(), reached


def free_page_reporting(machine: Machine) -> dict:
    before = rss_mib()
    with machine.exec_stream(["python3", "-c", HOLDER]) as holder:
        output = b""
        for chunk in holder:
            output += chunk.data
            if b"held" in output:
                break
        held = rss_mib()
        holder.write(b"\n")
        holder.close_stdin()
        exited = time.monotonic()
        for _ in holder:
            pass
    after, seconds = settled_rss(exited, target=held - 0.9 * HELD_MIB)
    return {"before": before, "held": held, "after": after, "seconds": seconds}


def inflate(machine: Machine) -> dict:
    machine.exec(["sh", "-c", FILL_CACHE], timeout=LIMIT)
    before = rss_mib()
    started = time.monotonic()
    machine.balloon.target_mib = GUEST_MIB - KEEP_MIB
    reached = machine.balloon.wait(LIMIT)
    seconds = time.monotonic() - started
    after, _ = settled_rss(time.monotonic())
    return {"before": before, "after": after, "seconds": seconds if reached else None,
            "actual": machine.balloon.actual_mib}


def snapshot_figures(machine: Machine, work: Path, label: str) -> tuple[float, int]:
    path = work / label
    started = time.monotonic()
    machine.snapshot(path)
    seconds = time.monotonic() - started
    size = sum(child.stat().st_blocks * 512 for child in path.iterdir())
    return seconds, size


def one_run(work: Path, run: int) -> dict:
    with Machine.boot(memory_mib=GUEST_MIB, fresh=True) as machine:
        reporting = free_page_reporting(machine)
        inflated = inflate(machine)
        with_balloon = snapshot_figures(machine, work, f"inflated-{run}")
        machine.balloon.target_mib = 0
        machine.balloon.wait(LIMIT)
        machine.exec(["sh", "-c", FILL_CACHE], timeout=LIMIT)   # the guest uses the memory again
        without_balloon = snapshot_figures(machine, work, f"deflated-{run}")
    return {"reporting": reporting, "inflate": inflated, "with": with_balloon,
            "without": without_balloon}


def median(values: list[float | None], scale: float = 1.0, digits: int = 0) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "–"
    text = f"{statistics.median(known) * scale:.{digits}f}"
    missing = len(values) - len(known)
    return text + (f" ({missing} runs never got there)" if missing else "")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    snapshots_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-balloon-", dir=snapshots_dir()) as name:
        runs = [one_run(Path(name), run) for run in range(args.runs)]
    reporting = [r["reporting"] for r in runs]
    inflated = [r["inflate"] for r in runs]
    print(f"\n{GUEST_MIB} MiB guest, medians of {args.runs} runs; host RSS of the VMM process (MiB)\n")
    print("| free page reporting (no target) | RSS before | RSS while 1 GiB held | RSS after | "
          "exit → 90 % of the GiB released (s) |")
    print("|---|---|---|---|---|")
    print(f"| guest process exits | {median([r['before'] for r in reporting])} | "
          f"{median([r['held'] for r in reporting])} | {median([r['after'] for r in reporting])} | "
          f"{median([r['seconds'] for r in reporting], digits=1)} |")
    print(f"\n| balloon, target {GUEST_MIB - KEEP_MIB} MiB (page cache full) | RSS before | RSS after | "
          "target set → reached (s) | balloon (MiB) |")
    print("|---|---|---|---|---|")
    print(f"| inflate | {median([r['before'] for r in inflated])} | "
          f"{median([r['after'] for r in inflated])} | {median([r['seconds'] for r in inflated], digits=1)} | "
          f"{median([r['actual'] for r in inflated])} |")
    print("\n| full snapshot of the same guest | save (ms) | size on disk (MB) |")
    print("|---|---|---|")
    for key, label in (("with", f"balloon inflated to {GUEST_MIB - KEEP_MIB} MiB"), ("without", "balloon deflated, cache refilled")):
        print(f"| {label} | {median([r[key][0] for r in runs], 1000)} | "
              f"{median([r[key][1] for r in runs], 1e-6, 1)} |")


if __name__ == "__main__":
    main()
