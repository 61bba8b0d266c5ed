"""Start JupyterLab for the browser test, with the sm kernel and its notebooks, in a
private temporary Jupyter setup (kernelspec, config, settings, workspaces). Runs where
guests run: in the test bed (listening on its forwarded address) or on the host.

``python tests/browser/serve_lab.py --port P --token T`` — the server runs until it is
shut down (``POST /api/shutdown``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import nbformat

from sm_kernel.install import install

KERNEL = "sm"
# The notebooks the browser opens: name → the one cell it runs.
NOTEBOOKS = {"arithmetic.ipynb": "print(6*7)", "balloon.ipynb": "%sm balloon"}
# Plugins whose pop-ups would cover the notebook: news and update checks.
DISABLED_PLUGINS = ["@jupyterlab/apputils-extension:announcements"]


def write_notebooks(root: Path) -> None:
    for name, source in NOTEBOOKS.items():
        notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
        # Naming the kernelspec makes JupyterLab start it without asking.
        notebook.metadata["kernelspec"] = {"name": KERNEL, "display_name": "Python (sm microVM)",
                                           "language": "python"}
        nbformat.write(notebook, root / name)


def private_jupyter(base: Path) -> dict[str, str]:
    """Environment for a Jupyter that sees only our kernelspec and default settings."""
    install(KERNEL, prefix=str(base / "prefix"))
    config = base / "config"
    (config / "labconfig").mkdir(parents=True)
    (config / "labconfig" / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {name: True for name in DISABLED_PLUGINS}}))
    return {"JUPYTER_PATH": str(base / "prefix" / "share" / "jupyter"),
            "JUPYTER_CONFIG_DIR": str(config), "JUPYTER_DATA_DIR": str(base / "data"),
            "JUPYTER_RUNTIME_DIR": str(base / "runtime")}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python tests/browser/serve_lab.py")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--ip", default=os.environ.get("SM_TESTBED_ADDRESS", "127.0.0.1"),
                        help="default: the test bed's forwarded address inside it, else 127.0.0.1")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="sm-browser-"))
    notebooks = base / "notebooks"
    notebooks.mkdir()
    write_notebooks(notebooks)
    os.environ.update(private_jupyter(base))
    print(f"serve_lab: notebooks in {notebooks}, Jupyter setup in {base}", flush=True)
    os.execv(sys.executable, [
        sys.executable, "-m", "jupyterlab", "--no-browser", f"--ip={args.ip}",
        f"--port={args.port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={args.token}",
        f"--ServerApp.root_dir={notebooks}", "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--allow-root",   # the test bed runs its command as root
    ])


if __name__ == "__main__":
    main()
