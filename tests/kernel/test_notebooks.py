"""nbclient executes every notebook in notebooks/ on the sm kernel (a microVM each) and
the outputs are checked cell by cell."""

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.kernel.conftest import STARTUP_TIMEOUT, VM_KERNEL

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def run(name: str) -> list[dict]:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(notebook, kernel_name=VM_KERNEL, timeout=STARTUP_TIMEOUT, startup_timeout=STARTUP_TIMEOUT,
                   allow_errors=True).execute()
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def text(cell) -> str:
    parts = []
    for output in cell.outputs:
        if output.output_type == "stream":
            parts.append(output.text)
        elif output.output_type in ("display_data", "execute_result"):
            parts.append(output.data.get("text/plain", ""))
        elif output.output_type == "error":
            parts.append(f"{output.ename}: {output.evalue}")
    return "".join(parts)


def errors(cell) -> list[str]:
    return [f"{o.ename}: {o.evalue}" for o in cell.outputs if o.output_type == "error"]


def check_snapshot_cell(cell, expected: str) -> None:
    assert not errors(cell) and expected in text(cell), text(cell)


@pytest.fixture(autouse=True)
def _kvm(linux_kvm):
    pass


def test_every_notebook_is_checked():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == ["balloon.ipynb", "quickstart.ipynb",
                                                                  "snapshots.ipynb", "teaching.ipynb"]


def test_quickstart():
    hello, plot, results, snapshot, mistake, restore, after, listing = run("quickstart.ipynb")
    assert text(hello).startswith("hello from Linux 6.1.") and text(hello).endswith("in a microVM\n")
    assert not errors(plot) and any("image/png" in o.get("data", {}) for o in plot.outputs)
    assert text(results) == "{'mean': 0.0, 'points': 200}\n"
    check_snapshot_cell(snapshot, "snapshot before-mistake: cell")
    assert text(mistake) == "False\n"
    check_snapshot_cell(restore, "restored before-mistake")
    assert text(after) == "{'mean': 0.0, 'points': 200}\n"
    assert "before-mistake" in text(listing)


def test_snapshots_branch_from_one_state():
    ready, snapshot, a, restore_a, b, restore_b, back, listing = run("snapshots.ipynb")
    assert text(ready).startswith("expensive state ready: (500, 500)")
    start_std = text(ready).split()[-1]
    check_snapshot_cell(snapshot, "snapshot base: cell")
    assert text(a).startswith("A: std ") and abs(float(text(a).split()[-1]) - 3 * float(start_std)) < 1e-3
    check_snapshot_cell(restore_a, "restored base")
    check_snapshot_cell(restore_b, "restored base")
    assert text(b).startswith("B: mean 10.") and text(b).endswith(f"std {start_std}\n")
    assert text(back) == f"back at the start: std {start_std}\n"
    assert "base" in text(listing)


def test_teaching_boundaries():
    interfaces, connect, host_files, write, kernel, init = run("teaching.ipynb")
    assert text(interfaces) == "['lo']\n"
    assert text(connect).startswith("no route out:")
    assert text(host_files) == "[]\n"
    assert text(write) == "this write lands in guest RAM only\n"
    assert text(kernel) == "Linux kernel in the guest; memory under 4 GiB: True\n"
    assert text(init) == "uid 0 - init still runs: True\n"


def host_rss_mib(status_cell) -> float:
    found = re.search(r"host RSS \(VMM process\)\s+([\d.]+) (MiB|GiB)", text(status_cell))
    assert found, text(status_cell)
    return float(found[1]) * (1024 if found[2] == "GiB" else 1)


def test_balloon():
    _, hold, holding, free, freed, _, panel, after, ballooned = run("balloon.ipynb")
    assert text(hold) == "holding 300 MiB\n" and text(free) == "freed\n"
    # Free page reporting gave the freed pages back to the host, with no target set.
    assert host_rss_mib(holding) - host_rss_mib(freed) >= 200, (text(holding), text(freed))
    (view,) = [o for o in panel.outputs if o.output_type == "display_data"]
    assert "application/vnd.jupyter.widget-view+json" in view.data
    assert view.data["text/plain"].startswith("Memory balloon: target 256 of 768 MiB")
    less = int(re.search(r"(-?\d+) MiB less", text(after))[1])
    assert less >= 200, text(after)
    given = re.search(r"balloon\s+(\d+) MiB given back to the host \(target 256 MiB", text(ballooned))
    assert given and int(given[1]) >= 200, text(ballooned)
