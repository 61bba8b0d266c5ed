"""Snapshots: save and restore a whole machine, ours against QEMU ``-M microvm`` on the
same kernel and initramfs, for a 512 MiB and a 4 GiB guest, in one run.

sm (in this process): restore = ``Machine.restore`` called → the agent answers an exec
of ``true``, split into snapshot.load, building the MicroVm from the state, starting it
until the agent answers again (vsock reset, reconnect, clock set), and the first exec.
Full snapshot of a freshly booted guest; diff snapshots after a guest process rewrote
50 MB it holds (a full snapshot first, then each diff against the one before).
QEMU: save with QMP ``stop`` + ``migrate exec:cat > FILE``; restore by spawning QEMU
with ``-incoming defer`` + ``migrate-incoming exec:cat FILE`` + ``cont``, timed from the
spawn to running and to the guest's shell answering a line on its serial console.
Restores alternate between sizes and VMMs. Sizes are the blocks the files use on disk.
A QEMU that fails is reported (with its stderr) and ours still measured.

Usage (where guests run, e.g. the test bed):
    python bench/bench_snapshot.py [--runs 5] [--profile]
Prints Markdown tables (and with --profile, cProfile of one sm restore and one diff
snapshot); no assertions. Absolute times in the test bed are those of an emulated
machine: only the comparisons made in one run mean anything.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vmm import Machine  # noqa: E402
from vmm import machine as machine_module  # noqa: E402
from vmm.guest.cmdline import DEFAULT_KERNEL_CMDLINE, init_cmd_arg  # noqa: E402
from vmm.guest.initramfs import build_initramfs  # noqa: E402
from vmm.guest.kernel import ensure_kernel  # noqa: E402
from vmm.paths import snapshots_dir  # noqa: E402

SIZES_MIB = (512, 4096)
DIRTY_MB = 50
MIB = 1 << 20

# In the guest: hold DIRTY_MB of RAM and rewrite all of it for each line on stdin.
DIRTIER = f"""
import sys
block = 1 << 20
buf = bytearray({DIRTY_MB} * block)
print("ready", flush=True)
for line in sys.stdin:
    chunk = bytes([int(line) % 255 + 1]) * block
    for offset in range(0, len(buf), block):
        buf[offset:offset + block] = chunk
    print("done", flush=True)
"""
# QEMU's guest: a shell answering each line on the serial console.
SERIAL_ANSWERER = 'echo ready; while read -r line; do echo "answer:$line"; done < /dev/console'


def _median(values: list[float]) -> str:
    if not values:
        return "–"
    return f"{statistics.median(values) * 1000:.0f} ({min(values) * 1000:.0f}–{max(values) * 1000:.0f})"


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f}"


def _blocks(path: Path) -> int:
    if path.is_dir():
        return sum(_blocks(child) for child in path.iterdir())
    return path.stat().st_blocks * 512


# ---- sm --------------------------------------------------------------------------------


@dataclass
class SmSaves:
    full_seconds: list[float] = field(default_factory=list)
    full_bytes: int = 0
    diff_seconds: list[float] = field(default_factory=list)
    diff_bytes: list[int] = field(default_factory=list)


@dataclass
class RestoreTimes:
    total: list[float] = field(default_factory=list)       # call → exec(['true']) answered
    load: list[float] = field(default_factory=list)        # snapshot.load
    build: list[float] = field(default_factory=list)       # MicroVm from the state
    start: list[float] = field(default_factory=list)       # vCPU threads and devices running
    reconnect: list[float] = field(default_factory=list)   # running → agent answers, clock set
    first_exec: list[float] = field(default_factory=list)


class _Marks:
    """Moments ``Machine.restore`` passes, by wrapping what it calls (this process only)."""

    def __init__(self):
        self.at: dict[str, float] = {}
        self._load = machine_module.snapshots.load
        self._microvm = machine_module.MicroVm

    def __enter__(self) -> _Marks:
        def load(*args, **kwargs):
            result = self._load(*args, **kwargs)
            self.at["loaded"] = time.perf_counter()
            return result

        def microvm(*args, **kwargs):
            vm = self._microvm(*args, **kwargs)
            self.at["built"] = time.perf_counter()
            start = vm.start

            def timed_start():
                start()
                self.at["running"] = time.perf_counter()
            vm.start = timed_start
            return vm
        machine_module.snapshots.load = load
        machine_module.MicroVm = microvm
        return self

    def __exit__(self, *exc) -> None:
        machine_module.snapshots.load = self._load
        machine_module.MicroVm = self._microvm


def sm_restore(path: Path, times: RestoreTimes) -> None:
    with _Marks() as marks:
        started = time.perf_counter()
        machine = Machine.restore(path)
    try:
        answered = time.perf_counter()
        result = machine.exec(["true"])
        done = time.perf_counter()
    finally:
        machine.stop()
    if result.exit_code != 0:
        raise SystemExit(f"exec true in the machine restored from {path} failed: {result}")
    times.total.append(done - started)
    times.load.append(marks.at["loaded"] - started)
    times.build.append(marks.at["built"] - marks.at["loaded"])
    times.start.append(marks.at["running"] - marks.at["built"])
    times.reconnect.append(answered - marks.at["running"])
    times.first_exec.append(done - answered)


def _read_until(chunks, marker: bytes) -> None:
    seen = b""
    for chunk in chunks:
        seen = (seen + chunk.data)[-256:]
        if marker in seen:
            return
    raise SystemExit(f"the guest's dirtier ended before it printed {marker!r}")


def sm_saves(memory_mib: int, work: Path, runs: int, profile: bool) -> tuple[SmSaves, Path]:
    """Boot fresh, take ``runs`` full snapshots, then ``runs`` diffs of 50 MB dirtied.
    Returns the figures and the first full snapshot (of the freshly booted guest)."""
    saves = SmSaves()
    base = work / f"sm-{memory_mib}-full"
    with Machine.boot(memory_mib=memory_mib, fresh=True) as machine:
        for run in range(runs):
            target = base if run == 0 else work / f"sm-{memory_mib}-full-{run}"
            started = time.perf_counter()
            info = machine.snapshot(target)
            saves.full_seconds.append(time.perf_counter() - started)
            saves.full_bytes = info.disk_bytes
        with machine.exec_stream(["python3", "-c", DIRTIER]) as dirtier:
            chunks = iter(dirtier)
            _read_until(chunks, b"ready")
            machine.snapshot(work / f"sm-{memory_mib}-before-diffs")
            for run in range(runs + int(profile)):
                dirtier.write(f"{run}\n".encode())
                _read_until(chunks, b"done")
                target = work / f"sm-{memory_mib}-diff-{run}"
                if run == runs:
                    _profile(f"sm diff snapshot, {memory_mib} MiB guest, {DIRTY_MB} MB dirty",
                             lambda: machine.snapshot(target, diff=True))
                    continue
                started = time.perf_counter()
                info = machine.snapshot(target, diff=True)
                saves.diff_seconds.append(time.perf_counter() - started)
                saves.diff_bytes.append(info.disk_bytes)
    return saves, base


def _profile(title: str, call) -> None:
    profiler = cProfile.Profile()
    profiler.runcall(call)
    print(f"\n### cProfile: {title} (calling thread only)\n```")
    stats = pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime")
    stats.print_stats(18)
    stats.sort_stats("cumulative").print_stats("vmm", 22)
    print("```")


# ---- QEMU ------------------------------------------------------------------------------


class Qmp:
    """A minimal QMP client: commands and their replies; events are kept in order."""

    def __init__(self, path: Path, deadline: float):
        while True:
            try:
                self._sock = socket.socket(socket.AF_UNIX)
                self._sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self._sock.close()
                if time.monotonic() > deadline:
                    raise SystemExit(f"QEMU's QMP socket {path} never opened") from None
                time.sleep(0.002)
        self._file = self._sock.makefile("rb")
        self.events: list[dict] = []
        self._message()        # greeting
        self.command("qmp_capabilities")

    def _message(self) -> dict:
        line = self._file.readline()
        if not line:
            raise SystemExit("QEMU closed its QMP socket")
        return json.loads(line)

    def command(self, name: str, **arguments) -> dict:
        self._sock.sendall(json.dumps({"execute": name, "arguments": arguments}).encode() + b"\n")
        while True:
            message = self._message()
            if "event" in message:
                self.events.append(message)
            elif "error" in message:
                raise SystemExit(f"QMP {name}: {message['error']}")
            elif "return" in message:
                return message["return"]

    def wait_event(self, name: str, **data) -> dict:
        while True:
            for index, event in enumerate(self.events):
                if event["event"] == name and all(event.get("data", {}).get(k) == v for k, v in data.items()):
                    return self.events.pop(index)
            message = self._message()
            if "event" in message:
                self.events.append(message)

    def close(self) -> None:
        self._file.close()
        self._sock.close()


class Qemu:
    """A QEMU ``-M microvm`` process with QMP on a Unix socket and its serial on stdio."""

    def __init__(self, kernel: Path, initrd: Path, memory_mib: int, work: Path, incoming: bool):
        self.qmp_path = work / f"qmp-{os.getpid()}-{time.monotonic_ns()}"
        argv = ["qemu-system-x86_64", "-M", "microvm,pit=on,pic=on,rtc=on,acpi=on", "-accel", "kvm",
                "-cpu", "host", "-m", str(memory_mib), "-nodefaults", "-no-user-config",
                "-display", "none", "-serial", "stdio", "-no-reboot", "-kernel", str(kernel),
                "-initrd", str(initrd), "-append",
                f"{DEFAULT_KERNEL_CMDLINE} {init_cmd_arg(SERIAL_ANSWERER)}",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if incoming:
            argv += ["-incoming", "defer"]
        self.errors = work / f"{self.qmp_path.name}.stderr"
        self.started = time.perf_counter()
        with open(self.errors, "wb") as errors:
            self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=errors)
        self._seen = b""
        try:
            self.qmp = Qmp(self.qmp_path, time.monotonic() + 60)
        except (OSError, SystemExit) as error:
            self.process.kill()
            self.process.wait()
            raise SystemExit(f"QEMU failed ({error}; exit status {self.process.returncode}): "
                             f"{self.errors.read_text().strip()[-500:]}") from None

    def wait_console(self, marker: bytes, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        fd = self.process.stdout.fileno()
        while marker not in self._seen:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise SystemExit(f"QEMU's guest did not print {marker!r} in {timeout:g} s")
            data = os.read(fd, 65536)
            if not data:
                raise SystemExit(f"QEMU exited before its guest printed {marker!r}")
            self._seen = (self._seen + data)[-4096:]
        self._seen = self._seen[self._seen.index(marker) + len(marker):]

    def ask_console(self, token: str) -> None:
        self.process.stdin.write(f"{token}\n".encode())
        self.process.stdin.flush()
        self.wait_console(f"answer:{token}".encode())

    def close(self) -> None:
        self.qmp.close()
        self.process.kill()
        self.process.wait()
        self.qmp_path.unlink(missing_ok=True)


@dataclass
class QemuTimes:
    save: list[float] = field(default_factory=list)
    file_bytes: int = 0
    spawn: list[float] = field(default_factory=list)     # spawn → QMP ready
    load: list[float] = field(default_factory=list)      # migrate-incoming → running
    running: list[float] = field(default_factory=list)   # spawn → running
    answer: list[float] = field(default_factory=list)    # spawn → serial answer


def qemu_saves(kernel: Path, initrd: Path, memory_mib: int, work: Path, runs: int,
               times: QemuTimes) -> Path:
    """Boot, then ``runs`` saves (stop + migrate to a file, cont); the file of the last."""
    target = work / f"qemu-{memory_mib}.mig"
    qemu = Qemu(kernel, initrd, memory_mib, work, incoming=False)
    try:
        qemu.wait_console(b"ready")
        qemu.ask_console("booted")
        qemu.qmp.command("migrate-set-capabilities",
                         capabilities=[{"capability": "events", "state": True}])
        qemu.qmp.command("migrate-set-parameters", **{"max-bandwidth": 64 << 30})
        for _ in range(runs):
            target.unlink(missing_ok=True)
            started = time.perf_counter()
            qemu.qmp.command("stop")
            qemu.qmp.command("migrate", uri=f"exec:cat > {target}")
            qemu.qmp.wait_event("MIGRATION", status="completed")
            times.save.append(time.perf_counter() - started)
            # The event comes a moment before the VM leaves "finish-migrate", when cont
            # would be refused.
            while qemu.qmp.command("query-status")["status"] == "finish-migrate":
                time.sleep(0.001)
            qemu.qmp.command("cont")
        times.file_bytes = _blocks(target)
    finally:
        qemu.close()
    return target


def qemu_restore(kernel: Path, initrd: Path, memory_mib: int, work: Path, file: Path,
                 times: QemuTimes, token: str) -> None:
    qemu = Qemu(kernel, initrd, memory_mib, work, incoming=True)
    try:
        ready = time.perf_counter()
        qemu.qmp.command("migrate-set-capabilities",
                         capabilities=[{"capability": "events", "state": True}])
        qemu.qmp.command("migrate-incoming", uri=f"exec:cat {file}")
        qemu.qmp.wait_event("MIGRATION", status="completed")
        if qemu.qmp.command("query-status")["status"] != "running":
            qemu.qmp.command("cont")
        running = time.perf_counter()
        qemu.ask_console(token)
        answered = time.perf_counter()
    finally:
        qemu.close()
    times.spawn.append(ready - qemu.started)
    times.load.append(running - ready)
    times.running.append(running - qemu.started)
    times.answer.append(answered - qemu.started)


# ---- the run ---------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--profile", action="store_true",
                        help="also cProfile one sm restore per size and one diff snapshot")
    args = parser.parse_args()
    kernel = ensure_kernel()
    initrd = build_initramfs(kernel)
    snapshots_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-snapshot-", dir=snapshots_dir()) as name:
        work = Path(name)
        sm: dict[int, tuple[SmSaves, Path]] = {}
        qemu: dict[int, tuple[QemuTimes, Path]] = {}
        qemu_failed = None
        try:
            for size in SIZES_MIB:
                times = QemuTimes()
                qemu[size] = times, qemu_saves(kernel.vmlinuz, initrd, size, work, args.runs, times)
        except SystemExit as error:   # still report ours
            qemu_failed, qemu = str(error), {}
            print(qemu_failed, file=sys.stderr)
        for size in SIZES_MIB:
            sm[size] = sm_saves(size, work, args.runs, args.profile and size == SIZES_MIB[0])
        restores = {size: RestoreTimes() for size in SIZES_MIB}
        for run in range(args.runs):
            for size in SIZES_MIB:
                try:
                    if size in qemu:
                        qemu_restore(kernel.vmlinuz, initrd, size, work, qemu[size][1],
                                     qemu[size][0], f"r{run}")
                except SystemExit as error:
                    qemu_failed = str(error)
                    print(qemu_failed, file=sys.stderr)
                sm_restore(sm[size][1], restores[size])
        if args.profile:
            for size in SIZES_MIB:
                _profile(f"sm restore + exec true, {size} MiB guest",
                         lambda: sm_restore(sm[size][1], RestoreTimes()))
    _report(kernel.version, args.runs, sm, qemu, restores)
    if qemu_failed:
        print(f"\nQEMU: {qemu_failed}")


def _report(kernel_version: str, runs: int, sm: dict, qemu: dict, restores: dict) -> None:
    print(f"\nkernel {kernel_version}, 1 vCPU, {runs} runs each; ms as median (min–max); "
          "MB on disk (blocks used)\n")
    print("| VMM | guest | restore → answers (ms) | restore → running (ms) | full save (ms) "
          "| full size (MB) | 50 MB diff save (ms) | diff size (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    for size in SIZES_MIB:
        saves, _ = sm[size]
        times = restores[size]
        running = [sum(parts) for parts in zip(times.load, times.build, times.start)]
        print(f"| sm (ours) | {size} MiB | {_median(times.total)} | {_median(running)} "
              f"| {_median(saves.full_seconds)} | {_mb(saves.full_bytes)} "
              f"| {_median(saves.diff_seconds)} | {_mb(statistics.median(saves.diff_bytes))} |")
    for size in qemu:
        times, _ = qemu[size]
        print(f"| QEMU -M microvm | {size} MiB | {_median(times.answer)} | {_median(times.running)} "
              f"| {_median(times.save)} | {_mb(times.file_bytes)} | – | – |")
    print("\nsm restore, where the time goes (ms, median (min–max)):\n")
    print("| guest | snapshot.load | MicroVm build | image lookup, dirty log, start "
          "| running → agent answers (+ clock set) | first exec |")
    print("|---|---|---|---|---|---|")
    for size in SIZES_MIB:
        times = restores[size]
        print(f"| {size} MiB | {_median(times.load)} | {_median(times.build)} "
              f"| {_median(times.start)} | {_median(times.reconnect)} "
              f"| {_median(times.first_exec)} |")
    print("\nQEMU restore, where the time goes (ms, median (min–max)):\n")
    print("| guest | spawn → QMP ready | migrate-incoming → running | running → serial answer |")
    print("|---|---|---|---|")
    for size in qemu:
        times, _ = qemu[size]
        answer = [a - r for a, r in zip(times.answer, times.running)]
        print(f"| {size} MiB | {_median(times.spawn)} | {_median(times.load)} | {_median(answer)} |")


if __name__ == "__main__":
    main()
