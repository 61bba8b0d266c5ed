"""Cost of one port-I/O exit round trip (guest OUT -> userspace -> guest), per call path.

A real-mode guest executes N ``out`` instructions in a loop and then ``hlt``; each
``out`` is one KVM_RUN return. Compared in one run on this host:

  fcntl.ioctl   KVM_RUN via the stdlib (retries EINTR, so unusable for the VMM; the anchor)
  cffi ioctl    KVM_RUN via the binding's fixed-signature helper, no decoding
  Vcpu.run      the binding plus exit decoding into IoExit
  VcpuThread    the whole vCPU loop: decode, dispatch to a bus with one no-op device
  decode only   Vcpu's exit decoding alone, on the last exit (the Python share of Vcpu.run)

Usage: python3 bench/bench_pio_exit.py [N] [repeats]   (prints a table; no assertions)
"""

import fcntl
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vmm.kvm import IoExit, Kvm, lib  # noqa: E402
from vmm.memory import GuestMemory  # noqa: E402
from vmm.vcpu import VcpuThread  # noqa: E402

CODE = 0x1000
PORT = 0x80


def loop_code(count: int) -> bytes:
    return (
        b"\xba" + PORT.to_bytes(2, "little")      # mov dx, PORT
        + b"\x66\xb9" + count.to_bytes(4, "little")  # mov ecx, count
        + b"\xee"                                 # loop: out dx, al
        + b"\x66\x49"                             # dec ecx
        + b"\x75\xfb"                             # jnz loop
        + b"\xf4"                                 # hlt
    )


class Guest:
    def __init__(self, kvm: Kvm, count: int):
        self.vm = kvm.create_vm()
        self.memory = GuestMemory([(0, 0x10000)])
        self.vm.map_memory(self.memory)
        self.memory.write(CODE, loop_code(count))
        self.vcpu = self.vm.create_vcpu(0)
        sregs = self.vcpu.get_sregs()
        sregs.cs.base, sregs.cs.selector = 0, 0
        self.vcpu.set_sregs(sregs)
        regs = self.vcpu.get_regs()
        regs.rip, regs.rflags = CODE, 0x2
        self.vcpu.set_regs(regs)

    def close(self):
        self.vcpu.close()
        self.vm.close()
        self.memory.close()


def via_fcntl(guest: Guest, count: int) -> int:
    exits, fd, run = 0, guest.vcpu.fd, guest.vcpu._run
    while True:
        fcntl.ioctl(fd, lib.KVM_RUN, 0)
        exits += 1
        if run.exit_reason != lib.KVM_EXIT_IO:
            return exits


def via_cffi(guest: Guest, count: int) -> int:
    exits, fd, run, ioctl = 0, guest.vcpu.fd, guest.vcpu._run, lib.sm_ioctl_int
    while True:
        ioctl(fd, lib.KVM_RUN, 0)
        exits += 1
        if run.exit_reason != lib.KVM_EXIT_IO:
            return exits


def via_vcpu_run(guest: Guest, count: int) -> int:
    exits, run = 0, guest.vcpu.run
    while True:
        exits += 1
        if type(run()) is not IoExit:
            return exits


class NullBus:
    def read(self, addr, size):
        return b"\xff" * size

    def write(self, addr, data):
        pass


def decode_only(guest: Guest, count: int) -> int:
    guest.vcpu.run()  # one real IO exit to decode over and over
    decode = guest.vcpu._decode_exit
    for _ in range(count):
        decode()
    return count


def via_vcpu_thread(guest: Guest, count: int) -> int:
    thread = VcpuThread(guest.vcpu, NullBus(), NullBus(), lambda reason: None)
    thread.start()
    thread.join()
    return count + 1


def measure(kvm: Kvm, count: int, method) -> float:
    guest = Guest(kvm, count)
    try:
        start = time.perf_counter()
        exits = method(guest, count)
        elapsed = time.perf_counter() - start
    finally:
        guest.close()
    return elapsed / exits * 1e6


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    methods = {"fcntl.ioctl": via_fcntl, "cffi ioctl": via_cffi, "Vcpu.run": via_vcpu_run,
               "VcpuThread": via_vcpu_thread, "decode only": decode_only}
    samples: dict[str, list[float]] = {name: [] for name in methods}
    with Kvm() as kvm:
        for _ in range(repeats):  # interleaved, so drift on a shared host hits every path alike
            for name, method in methods.items():
                samples[name].append(measure(kvm, count, method))
    print(f"port-I/O exit round trip, {count} OUTs per run, {repeats} runs, µs per exit")
    print(f"{'path':<12} {'median':>8} {'min':>8}")
    for name, values in samples.items():
        print(f"{name:<12} {statistics.median(values):8.2f} {min(values):8.2f}")


if __name__ == "__main__":
    main()
