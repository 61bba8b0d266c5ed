"""vsock and agent: throughput each way, 1-byte round trip, exec(["true"]), against a
Unix socket between two threads of this process (the physical ceiling) in the same run.

Usage (where guests run, e.g. the test bed):
    python bench/bench_vsock.py [--megabytes 100] [--rounds 200]
Prints a Markdown table; no assertions.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vmm import Machine  # noqa: E402

SINK_PORT, ECHO_PORT, SOURCE_PORT = 5001, 5002, 5003
CHUNK = 1 << 16

# In the guest: a sink (host→guest: read everything, answer with the count), a 1-byte
# echo, and a source that connects to the host and sends N bytes (guest→host).
GUEST_SERVERS = f"""
import socket, sys, threading
def listen(port):
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    s.bind((socket.VMADDR_CID_ANY, port)); s.listen(8); return s
def sink(server):
    while True:
        conn = server.accept()[0]; total = 0
        while True:
            data = conn.recv({CHUNK})
            if not data: break
            total += len(data)
        conn.sendall(str(total).encode()); conn.close()
def echo(server):
    while True:
        conn = server.accept()[0]
        while (data := conn.recv(1)):
            conn.sendall(data)
threading.Thread(target=sink, args=(listen({SINK_PORT}),), daemon=True).start()
threading.Thread(target=echo, args=(listen({ECHO_PORT}),), daemon=True).start()
print("ready", flush=True)
for line in sys.stdin:
    out = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    out.connect((2, {SOURCE_PORT}))
    block = bytes({CHUNK})
    for _ in range(int(line) // {CHUNK}):
        out.sendall(block)
    out.close()
"""


def _send_all(sock: socket.socket, total: int) -> None:
    block = bytes(CHUNK)
    for _ in range(total // CHUNK):
        sock.sendall(block)
    sock.shutdown(socket.SHUT_WR)


def _drain(sock: socket.socket) -> int:
    total = 0
    while data := sock.recv(CHUNK):
        total += len(data)
    return total


def _round_trips(sock: socket.socket, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        sock.sendall(b"x")
        sock.recv(1)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def ceiling(total: int, rounds: int) -> tuple[float, float, float]:
    """MB/s each way and 1-byte round trip over a Unix socketpair, threads in this process."""
    a, b = socket.socketpair()
    started = time.perf_counter()
    threading.Thread(target=_send_all, args=(a, total)).start()
    assert _drain(b) == total
    throughput = total / (time.perf_counter() - started) / 1e6
    a, b = socket.socketpair()

    def echo() -> None:
        while data := b.recv(1):
            b.sendall(data)
    threading.Thread(target=echo, daemon=True).start()
    rtt = _round_trips(a, rounds)
    a.close()
    return throughput, throughput, rtt


def guest(machine: Machine, total: int, rounds: int) -> tuple[float, float, float, float]:
    servers = machine.exec_stream(["python3", "-c", GUEST_SERVERS])
    assert next(iter(servers)).data == b"ready\n"

    conn = machine.vsock.connect(SINK_PORT)
    started = time.perf_counter()
    _send_all(conn, total)
    assert int(conn.recv(64)) == total
    to_guest = total / (time.perf_counter() - started) / 1e6

    listener = machine.vsock.listen(SOURCE_PORT)
    started = time.perf_counter()
    servers.write(f"{total}\n".encode())
    incoming = listener.accept(timeout=60)
    assert _drain(incoming) == total
    from_guest = total / (time.perf_counter() - started) / 1e6

    rtt = _round_trips(machine.vsock.connect(ECHO_PORT), rounds)
    exec_times = []
    for _ in range(max(rounds // 10, 5)):
        started = time.perf_counter()
        machine.exec(["true"])
        exec_times.append(time.perf_counter() - started)
    servers.close_stdin()
    return to_guest, from_guest, rtt, statistics.median(exec_times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--megabytes", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    total = args.megabytes * CHUNK * 16   # MiB in whole chunks
    with Machine.boot() as machine:
        to_guest, from_guest, rtt, exec_true = guest(machine, total, args.rounds)
    up, down, unix_rtt = ceiling(total, args.rounds)
    print(f"{args.megabytes} MiB each way, {args.rounds} round trips; medians\n")
    print("| path | host→guest MB/s | guest→host MB/s | 1-byte round trip ms | exec(['true']) ms |")
    print("|---|---|---|---|---|")
    print(f"| sm vsock (ours) | {to_guest:.0f} | {from_guest:.0f} | {rtt * 1e3:.3f} "
          f"| {exec_true * 1e3:.1f} |")
    print(f"| Unix socketpair, host threads (ceiling) | {up:.0f} | {down:.0f} | "
          f"{unix_rtt * 1e3:.3f} | – |")


if __name__ == "__main__":
    main()
