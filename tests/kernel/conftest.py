"""Kernelspecs for the kernel tests, in a private JUPYTER_PATH:

- ``sm-test``: the sm kernel as users get it, each kernel a microVM (needs ``linux_kvm``);
- ``sm-local``: the same relay with ``--no-vm`` (the agent and ipykernel on this host), so
  the protocol tests also run where no guest can boot, and fast.
"""

import json
import os
import queue
import time

import pytest

from sm_kernel.install import install, kernel_json

VM_KERNEL = "sm-test"
LOCAL_KERNEL = "sm-local"
# Booting a guest and importing ipykernel in it is slow in the (emulated) test bed.
STARTUP_TIMEOUT = 600
REPLY_TIMEOUT = 120


@pytest.fixture(scope="session", autouse=True)
def kernelspecs(tmp_path_factory):
    root = tmp_path_factory.mktemp("jupyter")
    install(VM_KERNEL, prefix=str(root), memory_mib=768)
    local = root / "share" / "jupyter" / "kernels" / LOCAL_KERNEL
    local.mkdir(parents=True)
    spec = kernel_json()
    spec["argv"].append("--no-vm")
    (local / "kernel.json").write_text(json.dumps(spec))
    saved = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(root / "share" / "jupyter")
    yield root
    if saved is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = saved


def execute(kc, code, timeout=REPLY_TIMEOUT, **options):
    """Run ``code``; (reply content, [(msg_type, content)] of its iopub outputs)."""
    outputs = []
    reply = kc.execute_interactive(code, timeout=timeout, output_hook=lambda msg: outputs.append(
        (msg["msg_type"], msg["content"])), **options)
    return reply["content"], [(t, c) for t, c in outputs if t not in ("status", "execute_input")]


def stdout_of(outputs):
    return "".join(c["text"] for t, c in outputs if t == "stream" and c["name"] == "stdout")


def iopub_until(kc, wanted, timeout=REPLY_TIMEOUT):
    """iopub messages up to and including the first one ``wanted(msg)`` accepts."""
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        try:
            msg = kc.get_iopub_msg(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            raise AssertionError(f"no such iopub message within {timeout} s; saw {[m['msg_type'] for m in seen]}")
        seen.append(msg)
        if wanted(msg):
            return seen
