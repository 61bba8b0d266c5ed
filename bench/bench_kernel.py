"""The sm kernel against the stock local ipykernel, side by side in one run: start to
kernel_info_reply, `pass` round trip, 50 MB of printed output, a 1 MB PNG display,
interrupt latency, restart latency; and, where vmm has snapshots, `%sm snapshot` /
`%sm restore` of a session holding 400 MB of numpy data beside dill.dump_session /
load_session of the same session on the local kernel.

Usage (where guests run, e.g. the test bed):
    python bench/bench_kernel.py [--rounds 50] [--starts 3] [--output-mb 50] [--memory 1024]
Prints a Markdown table; no assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jupyter_client.manager import KernelManager  # noqa: E402

from sm_kernel.install import install  # noqa: E402

STARTUP_TIMEOUT = 600
CELL_TIMEOUT = 600


def start(name: str):
    """(manager, client, seconds from launch to the first kernel_info_reply)."""
    km = KernelManager(kernel_name=name)
    started = time.perf_counter()
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    asked = set()
    while True:
        asked.add(kc.kernel_info())
        try:
            reply = kc.get_shell_msg(timeout=0.2)
        except queue.Empty:
            if time.perf_counter() - started > STARTUP_TIMEOUT:
                raise RuntimeError(f"{name} did not answer kernel_info in {STARTUP_TIMEOUT} s") from None
            continue
        if reply["parent_header"].get("msg_id") in asked:
            break
    seconds = time.perf_counter() - started
    kc.wait_for_ready(timeout=STARTUP_TIMEOUT)
    while True:  # the other answers to the probes
        try:
            kc.get_shell_msg(timeout=0.5)
        except queue.Empty:
            break
    return km, kc, seconds


def run(kc, code: str) -> tuple[float, dict, int]:
    """Seconds until the cell's idle status, its reply, and the bytes of output received."""
    print(f"  running: {code.splitlines()[-1][:70]}", file=sys.stderr, flush=True)
    received = 0

    def count(msg):
        nonlocal received
        content = msg["content"]
        received += len(content.get("text", "")) + sum(len(v) for v in content.get("data", {}).values())

    started = time.perf_counter()
    reply = kc.execute_interactive(code, timeout=CELL_TIMEOUT, output_hook=count)
    return time.perf_counter() - started, reply["content"], received


def measure(name: str, args, snapshots: bool) -> dict[str, str]:
    figures: dict[str, str] = {}
    # The first start of the sm kernel on a machine boots and saves the warm kernel snapshot;
    # later ones restore it (sm_kernel/warm.py).
    km, kc, seconds = start(name)
    figures["start → kernel_info_reply, first"] = f"{seconds * 1000:.0f} ms"
    later = []
    for _ in range(args.starts):
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        km, kc, seconds = start(name)
        later.append(seconds)
    figures[f"start → kernel_info_reply, later (median of {args.starts})"] = \
        f"{statistics.median(later) * 1000:.0f} ms"
    run(kc, "pass")
    rounds = [run(kc, "pass")[0] for _ in range(args.rounds)]
    figures["`pass` round trip (median)"] = f"{statistics.median(rounds) * 1000:.2f} ms"

    lines = args.output_mb * 1024
    seconds, _, received = run(kc, f"import sys\nline = 'x' * 1023 + '\\n'\nfor _ in range({lines}): sys.stdout.write(line)")
    figures[f"{args.output_mb} MB printed"] = f"{seconds:.2f} s ({received / seconds / 1e6:.1f} MB/s)"

    seconds, _, received = run(kc, "import base64, os\nfrom IPython.display import display\n"
                                   "display({'image/png': base64.b64encode(os.urandom(1 << 20)).decode()}, raw=True)")
    figures["1 MB PNG display"] = f"{seconds * 1000:.0f} ms"

    msg_id = kc.execute("while True: pass")
    while True:
        msg = kc.get_iopub_msg(timeout=CELL_TIMEOUT)
        if msg["msg_type"] == "execute_input" and msg["parent_header"].get("msg_id") == msg_id:
            break
    time.sleep(0.5)
    started = time.perf_counter()
    km.interrupt_kernel()
    reply = kc.get_shell_msg(timeout=CELL_TIMEOUT)
    figures["interrupt → reply"] = f"{(time.perf_counter() - started) * 1000:.0f} ms ({reply['content'].get('ename')})"

    values = args.session_mb * (1 << 20) // 8  # float64
    if snapshots:
        run(kc, f"import numpy as np\nbig = np.random.default_rng(0).standard_normal({values})")
        seconds, reply, _ = run(kc, "%sm snapshot big")
        figures[f"%sm snapshot, {args.session_mb} MB session"] = f"{seconds * 1000:.0f} ms ({reply['status']})"
        seconds, reply, _ = run(kc, "%sm restore big")
        figures[f"%sm restore, {args.session_mb} MB session"] = f"{seconds * 1000:.0f} ms ({reply['status']})"
        run(kc, "del big")
    elif name == "python3":
        session = os.path.join(tempfile.mkdtemp(), "session.pkl")
        run(kc, f"import numpy as np, dill\nbig = np.random.default_rng(0).standard_normal({values})")
        seconds, reply, _ = run(kc, f"dill.dump_session({session!r})")
        figures[f"dill.dump_session, {args.session_mb} MB"] = f"{seconds * 1000:.0f} ms ({reply['status']})"
        seconds, reply, _ = run(kc, f"dill.load_session({session!r})")
        figures[f"dill.load_session, {args.session_mb} MB"] = f"{seconds * 1000:.0f} ms ({reply['status']})"
        os.unlink(session)
        run(kc, "del big")

    started = time.perf_counter()
    km.restart_kernel(now=False)
    kc.wait_for_ready(timeout=STARTUP_TIMEOUT)
    figures["restart → ready"] = f"{(time.perf_counter() - started) * 1000:.0f} ms"
    kc.stop_channels()
    km.shutdown_kernel(now=False)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--starts", type=int, default=3, help="starts after the first, timed")
    parser.add_argument("--output-mb", type=int, default=50)
    parser.add_argument("--session-mb", type=int, default=400, help="numpy data in the snapshot / dill session")
    parser.add_argument("--memory", type=int, default=1024, help="guest MiB (more than --session-mb)")
    parser.add_argument("--no-vm", action="store_true", help="the relay alone: sm_kernel --no-vm (runs anywhere)")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="bench-kernel-")
    spec_dir = Path(install("sm-bench", prefix=root, memory_mib=args.memory))
    if args.no_vm:
        spec = json.loads((spec_dir / "kernel.json").read_text())
        spec["argv"].append("--no-vm")
        (spec_dir / "kernel.json").write_text(json.dumps(spec))
    os.environ["JUPYTER_PATH"] = os.path.join(root, "share", "jupyter")
    from vmm.machine import Machine
    snapshots = hasattr(Machine, "snapshot") and hasattr(Machine, "restore") and not args.no_vm
    local = measure("python3", args, snapshots=False)
    sm = measure("sm-bench", args, snapshots=snapshots)
    column = "sm kernel --no-vm (relay only)" if args.no_vm else "sm kernel (microVM)"
    print(f"\n| measure | local ipykernel | {column} |\n|---|---|---|")
    for key in dict.fromkeys([*local, *sm]):
        print(f"| {key} | {local.get(key, '-')} | {sm.get(key, '-')} |")


if __name__ == "__main__":
    main()
