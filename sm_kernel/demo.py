"""``python -m sm_kernel.demo [NOTEBOOK] [--kernel NAME]``: execute a notebook on the sm
kernel and print each cell's outputs as text, with the time it took; then the kernel's
start time and the times of its %sm snapshot and restore cells. ``make demo`` runs it on
notebooks/quickstart.ipynb.

Without --kernel it runs the kernel with this Python, through a kernelspec in a temporary
directory (so it works in the test bed, whose Python is not the one `make setup` registered)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from sm_kernel.install import install

DEFAULT_NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"
TIMEOUT = 600


def describe(output) -> str:
    if output.output_type == "stream":
        return output.text.rstrip("\n")
    if output.output_type == "error":
        return f"{output.ename}: {output.evalue}"
    data = output.get("data", {})
    if "text/plain" in data and not any(k.startswith("image/") for k in data):
        return data["text/plain"]
    return ", ".join(f"<{mime}, {len(value)} bytes>" for mime, value in data.items() if mime != "text/plain")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sm_kernel.demo", description=__doc__.splitlines()[0])
    parser.add_argument("notebook", nargs="?", default=str(DEFAULT_NOTEBOOK))
    parser.add_argument("--kernel", help="an installed kernelspec to use instead")
    args = parser.parse_args(argv)
    if args.kernel is None:
        root = tempfile.mkdtemp(prefix="sm-demo-")
        install("sm-demo", prefix=root)
        os.environ["JUPYTER_PATH"] = os.path.join(root, "share", "jupyter")
        args.kernel = "sm-demo"
    notebook = nbformat.read(args.notebook, as_version=4)
    client = NotebookClient(notebook, kernel_name=args.kernel, timeout=TIMEOUT, startup_timeout=TIMEOUT)
    timings: dict[str, float] = {}
    failed = False
    started = time.perf_counter()
    with client.setup_kernel():
        timings["kernel start (to ready)"] = time.perf_counter() - started
        print(f"kernel {args.kernel} ready in {timings['kernel start (to ready)']:.2f} s\n")
        for index, cell in enumerate(notebook.cells):
            if cell.cell_type != "code":
                continue
            began = time.perf_counter()
            client.execute_cell(cell, index)
            seconds = time.perf_counter() - began
            first_line = cell.source.splitlines()[0] if cell.source else ""
            print(f"[{cell.get('execution_count') or ' '}] {first_line}   ({seconds:.2f} s)")
            for output in cell.outputs:
                failed |= output.output_type == "error"
                print("    " + describe(output).replace("\n", "\n    "))
            for word in ("snapshot", "restore"):
                if first_line.startswith(f"%sm {word}"):
                    timings.setdefault(f"%sm {word} cell", seconds)
    print("\ntimings:")
    for name, seconds in timings.items():
        print(f"  {name}: {seconds:.2f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
