"""Cold boot to the guest's init, ours against QEMU ``-M microvm`` on the same files.

Both boot the same Debian cloud kernel and sm initramfs with the same command line
and ``sm.init_cmd`` (run ``true``, power off). Runs alternate between the two, and
each is timed from spawning the process to the line ``sm: init started`` on its
console, and to the process's exit. Also printed: host memory each VMM uses beyond
the guest RAM it has touched (RSS minus the resident part of the guest RAM
mapping), sampled while the guest sleeps.

Usage (where guests run, e.g. the test bed):
    python bench/bench_boot.py [--runs 7]
Prints a Markdown table; no assertions. Absolute times in the test bed are those of
an emulated machine: only the A/B comparison means anything.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vmm.guest.cmdline import DEFAULT_KERNEL_CMDLINE, INIT_STARTED, init_cmd_arg  # noqa: E402
from vmm.guest.initramfs import build_initramfs  # noqa: E402
from vmm.guest.kernel import ensure_kernel  # noqa: E402

MEMORY_MIB = 512
SLEEP_FOR_RSS = "sleep 2"


def ours(init_cmd: str) -> list[str]:
    return [sys.executable, "-m", "vmm.cli", "boot", "--memory", str(MEMORY_MIB),
            "--init-cmd", init_cmd]


def qemu(kernel: Path, initrd: Path, init_cmd: str) -> list[str]:
    return ["qemu-system-x86_64", "-M", "microvm,pit=on,pic=on,rtc=on,acpi=on", "-accel", "kvm",
            "-cpu", "host", "-m", str(MEMORY_MIB), "-nodefaults", "-no-user-config",
            "-display", "none", "-serial", "stdio", "-no-reboot", "-kernel", str(kernel),
            "-initrd", str(initrd), "-append", f"{DEFAULT_KERNEL_CMDLINE} {init_cmd_arg(init_cmd)}"]


def _rss_beyond_guest_ram(pid: int) -> float:
    """MiB resident in ``pid`` outside its largest mapping (the guest RAM)."""
    mappings, total, current = [], 0, 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if line.startswith("Size:"):
            current = int(line.split()[1])
        elif line.startswith("Rss:"):
            rss = int(line.split()[1])
            mappings.append((current, rss))
            total += rss
    guest_rss = max(mappings)[1]
    return (total - guest_rss) / 1024


def timed_boot(argv: list[str], sample_rss: bool = False) -> tuple[float, float, float | None]:
    started = time.monotonic()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               stdin=subprocess.DEVNULL)
    init_at, rss = None, None
    for raw in process.stdout:
        if init_at is None and INIT_STARTED.encode() in raw:
            init_at = time.monotonic() - started
            if sample_rss:
                time.sleep(1)
                rss = _rss_beyond_guest_ram(process.pid)
    process.wait()
    if init_at is None or process.returncode != 0:
        raise SystemExit(f"boot failed ({process.returncode}): {' '.join(argv)}")
    return init_at, time.monotonic() - started, rss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    kernel = ensure_kernel()
    initrd = build_initramfs(kernel)
    contenders = {"sm (ours)": ours,
                  "QEMU -M microvm": lambda cmd: qemu(kernel.vmlinuz, initrd, cmd)}
    timings: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    for _ in range(args.runs):
        for name, argv in contenders.items():
            init_at, total, _ = timed_boot(argv("true"))
            timings[name].append((init_at, total))
    memory = {name: timed_boot(argv(SLEEP_FOR_RSS), sample_rss=True)[2]
              for name, argv in contenders.items()}

    print(f"kernel {kernel.version}, {MEMORY_MIB} MiB, 1 vCPU, {args.runs} runs each, "
          "alternating; medians (min–max)\n")
    print("| VMM | spawn → init started (s) | spawn → exit after poweroff (s) "
          "| host RSS beyond guest RAM (MiB) |")
    print("|---|---|---|---|")
    for name, runs in timings.items():
        init = [r[0] for r in runs]
        total = [r[1] for r in runs]
        print(f"| {name} | {statistics.median(init):.2f} ({min(init):.2f}–{max(init):.2f}) "
              f"| {statistics.median(total):.2f} ({min(total):.2f}–{max(total):.2f}) "
              f"| {memory[name]:.1f} |")


if __name__ == "__main__":
    main()
