"""python -m sm_kernel install: the kernelspec Jupyter reads (on the host)."""

import json
import os
import subprocess
import sys

from jupyter_client.kernelspec import KernelSpecManager


def test_install_writes_a_kernelspec_jupyter_finds(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sm_kernel", "install", "--prefix", str(tmp_path),
                             "--name", "sm-x", "--image", "python-default", "--memory", "768", "--cpus", "2"],
                            capture_output=True, text=True, check=True)
    spec_dir = tmp_path / "share" / "jupyter" / "kernels" / "sm-x"
    assert str(spec_dir) in result.stdout
    spec = json.loads((spec_dir / "kernel.json").read_text())
    assert spec["display_name"] == "Python (sm microVM)" and spec["language"] == "python"
    assert spec["interrupt_mode"] == "message"
    assert spec["argv"] == [sys.executable, "-m", "sm_kernel", "-f", "{connection_file}", "--image", "python-default",
                            "--memory", "768", "--cpus", "2"]
    assert {p.name for p in spec_dir.iterdir()} == {"kernel.json", "logo-32x32.png", "logo-64x64.png"}
    manager = KernelSpecManager(kernel_dirs=[str(spec_dir.parent)])
    assert manager.get_kernel_spec("sm-x").display_name == "Python (sm microVM)"


def test_the_kernel_refuses_to_start_without_a_connection_file():
    result = subprocess.run([sys.executable, "-m", "sm_kernel"], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert result.returncode == 2 and "-f/--connection-file" in result.stderr
