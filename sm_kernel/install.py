"""``python -m sm_kernel install``: register the kernel with Jupyter (a kernelspec)."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager

from vmm.paths import share_dir

DEFAULT_NAME = "sm"
DISPLAY_NAME = "Python (sm microVM)"


def kernel_argv(image: str | None, memory_mib: int | None, cpus: int | None) -> list[str]:
    argv = [sys.executable, "-m", "sm_kernel", "-f", "{connection_file}"]
    if image:
        argv += ["--image", image]
    if memory_mib:
        argv += ["--memory", str(memory_mib)]
    if cpus:
        argv += ["--cpus", str(cpus)]
    return argv


def kernel_json(image: str | None = None, memory_mib: int | None = None, cpus: int | None = None) -> dict:
    return {
        "argv": kernel_argv(image, memory_mib, cpus),
        "display_name": DISPLAY_NAME,
        "language": "python",
        # Interrupts come as interrupt_request messages: the host forwards them into the guest.
        "interrupt_mode": "message",
        "metadata": {"debugger": False, "sm": {"image": image or "python-default"}},
    }


def install(name: str = DEFAULT_NAME, user: bool = False, prefix: str | None = None, image: str | None = None,
            memory_mib: int | None = None, cpus: int | None = None) -> str:
    """Write the kernelspec; returns the directory Jupyter reads it from."""
    with tempfile.TemporaryDirectory() as staging:
        for source in (share_dir() / "kernelspec").iterdir():
            if source.is_file() and source.name != "kernel.json":
                shutil.copy(source, staging)
        (Path(staging) / "kernel.json").write_text(json.dumps(kernel_json(image, memory_mib, cpus), indent=1) + "\n")
        return KernelSpecManager().install_kernel_spec(staging, kernel_name=name, user=user, prefix=prefix)
