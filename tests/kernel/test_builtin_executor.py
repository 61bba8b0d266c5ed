"""The built-in executor (images with python3 but no ipykernel), forced with
--builtin-executor, in a microVM and through the relay without a VM: streams, results,
reprs, errors, interrupt, completion, and a fresh one after its process dies."""

import json
import time

import pytest
from jupyter_client.manager import start_new_kernel

from sm_kernel.install import kernel_json
from tests.kernel.conftest import REPLY_TIMEOUT, STARTUP_TIMEOUT, execute, stdout_of


@pytest.fixture(scope="module", params=["local", "microvm"])
def kernel(request, kernelspecs):
    name = f"sm-builtin-{request.param}"
    spec_dir = kernelspecs / "share" / "jupyter" / "kernels" / name
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = kernel_json(memory_mib=768)  # the size the other kernel tests use: one warm snapshot
    spec["argv"].append("--builtin-executor")
    if request.param == "local":
        spec["argv"].append("--no-vm")
    else:
        request.getfixturevalue("linux_kvm")
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    km, kc = start_new_kernel(kernel_name=name, startup_timeout=STARTUP_TIMEOUT)
    yield km, kc
    kc.stop_channels()
    km.shutdown_kernel(now=False)


@pytest.fixture
def kc(kernel):
    return kernel[1]


def test_streams_results_and_state(kc):
    reply, outputs = execute(kc, "import sys\nx = 6 * 7\nprint('out', x)\nprint('err', file=sys.stderr)\nx + 1")
    assert reply["status"] == "ok"
    assert stdout_of(outputs) == "out 42\n"
    assert ("stream", {"name": "stderr", "text": "err\n"}) in outputs
    assert [c["data"]["text/plain"] for t, c in outputs if t == "execute_result"] == ["43"]
    assert reply["execution_count"] == [c for t, c in outputs if t == "execute_result"][0]["execution_count"]


def test_display_uses_the_object_reprs(kc):
    reply, outputs = execute(kc, "class Bold:\n    def _repr_html_(self): return '<b>sm</b>'\n"
                                 "    def __repr__(self): return 'Bold()'\ndisplay(Bold())")
    assert [c["data"] for t, c in outputs if t == "display_data"] == [{"text/plain": "Bold()", "text/html": "<b>sm</b>"}]


def test_errors_have_a_traceback_of_the_cell_only(kc):
    reply, outputs = execute(kc, "def f():\n    raise ValueError('no')\nf()")
    assert reply["status"] == "error" and reply["ename"] == "ValueError" and reply["evalue"] == "no"
    (error,) = [c for t, c in outputs if t == "error"]
    assert "<cell" in error["traceback"][0] and "executor.py" not in error["traceback"][0]


def test_interrupt_and_completion(kernel, kc):
    km, _ = kernel
    msg_id = kc.execute("while True: pass")
    time.sleep(1)
    km.interrupt_kernel()
    reply = kc.get_shell_msg(timeout=REPLY_TIMEOUT)
    assert reply["parent_header"]["msg_id"] == msg_id and reply["content"]["ename"] == "KeyboardInterrupt"
    kc.complete("import sys\nsys.pat", 17)
    reply = kc.get_shell_msg(timeout=REPLY_TIMEOUT)["content"]
    assert "sys.path" in reply["matches"] and reply["cursor_start"] == 11
    kc.is_complete("for i in range(3):")
    assert kc.get_shell_msg(timeout=REPLY_TIMEOUT)["content"]["status"] == "incomplete"


@pytest.mark.parametrize("kernel", ["microvm"], indirect=True)   # only a VM has a warm snapshot
def test_a_second_kernel_from_the_warm_snapshot_draws_its_own_random_numbers(kc):
    code = "import os, random; print(os.getpid(), random.random())"
    first = stdout_of(execute(kc, code)[1]).split()
    km2, kc2 = start_new_kernel(kernel_name="sm-builtin-microvm", startup_timeout=STARTUP_TIMEOUT)
    try:
        second = stdout_of(execute(kc2, code)[1]).split()
        assert second[0] == first[0]     # the very executor process, restored...
        assert second[1] != first[1]     # ...with ``random`` reseeded
    finally:
        kc2.stop_channels()
        km2.shutdown_kernel(now=True)


def test_a_dead_executor_is_replaced(kc):
    execute(kc, "before = 1")
    reply, _ = execute(kc, "import os\nos.kill(os.getpid(), 9)")
    assert reply["status"] == "error" and reply["ename"] == "GuestKernelLost"
    assert "killed by signal 9" in reply["evalue"]
    reply, outputs = execute(kc, "print('before' in globals())")
    assert stdout_of(outputs) == "False\n"
