"""jupyter_client against the sm kernel: interrupt, stdin, comms, widgets, %sm errors,
cell timeouts, a guest kernel that dies, restart. Each runs on a microVM and on the relay
without a VM (``sm-local``); one kernel per kind for the whole module."""

import queue
import time

import pytest
from jupyter_client.manager import start_new_kernel

from tests.kernel.conftest import (
    LOCAL_KERNEL,
    REPLY_TIMEOUT,
    STARTUP_TIMEOUT,
    VM_KERNEL,
    execute,
    iopub_until,
    stdout_of,
)


@pytest.fixture(scope="module", params=[LOCAL_KERNEL, VM_KERNEL])
def kernel(request):
    if request.param == VM_KERNEL:
        request.getfixturevalue("linux_kvm")
    km, kc = start_new_kernel(kernel_name=request.param, startup_timeout=STARTUP_TIMEOUT)
    yield km, kc
    kc.stop_channels()
    km.shutdown_kernel(now=False)


@pytest.fixture
def kc(kernel):
    km, kc = kernel
    while True:  # nothing left over from the previous test
        try:
            kc.get_iopub_msg(timeout=0.2)
        except queue.Empty:
            break
    return kc


def test_hello_and_state_between_cells(kc):
    reply, outputs = execute(kc, "x = 6 * 7\nprint('hello', x)")
    assert reply["status"] == "ok"
    assert stdout_of(outputs) == "hello 42\n"
    reply, outputs = execute(kc, "x + 1")
    assert [c["data"]["text/plain"] for t, c in outputs if t == "execute_result"] == ["43"]


def test_interrupt_stops_a_busy_loop(kernel, kc):
    km, _ = kernel
    msg_id = kc.execute("import time\nstarted = time.time()\nwhile True: pass")
    iopub_until(kc, lambda m: m["msg_type"] == "execute_input" and m["parent_header"].get("msg_id") == msg_id)
    time.sleep(0.5)
    km.interrupt_kernel()
    reply = kc.get_shell_msg(timeout=REPLY_TIMEOUT)
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    # After an error ipykernel aborts what reaches it before it goes idle (stop_on_error).
    iopub_until(kc, lambda m: m["msg_type"] == "status" and m["content"]["execution_state"] == "idle"
                and m["parent_header"].get("msg_id") == msg_id)
    reply, outputs = execute(kc, "print(started > 0)")
    assert stdout_of(outputs) == "True\n", (reply, outputs)


def test_input_goes_through_the_stdin_channel(kc):
    msg_id = kc.execute("name = input('who? ')\nprint('hi', name)", allow_stdin=True)
    request = kc.get_stdin_msg(timeout=REPLY_TIMEOUT)
    assert request["msg_type"] == "input_request"
    assert request["content"]["prompt"] == "who? "
    kc.input("sm")
    reply = kc.get_shell_msg(timeout=REPLY_TIMEOUT)
    assert reply["parent_header"]["msg_id"] == msg_id and reply["content"]["status"] == "ok"
    seen = iopub_until(kc, lambda m: m["msg_type"] == "status" and m["content"]["execution_state"] == "idle"
                       and m["parent_header"].get("msg_id") == msg_id)
    assert "hi sm\n" in "".join(m["content"].get("text", "") for m in seen if m["msg_type"] == "stream")


def test_comm_open_message_close_round_trip(kc):
    reply, _ = execute(kc, """
def _echo_target(comm, open_msg):
    comm.send({"opened_with": open_msg["content"]["data"]})
    @comm.on_msg
    def _echo(msg):
        comm.send({"echo": msg["content"]["data"]})
get_ipython().kernel.comm_manager.register_target("sm_echo", _echo_target)
""")
    assert reply["status"] == "ok"
    comm_id = "sm-test-comm"

    def send(msg_type, content):
        msg = kc.session.msg(msg_type, content)
        kc.shell_channel.send(msg)
        return msg["header"]["msg_id"]

    send("comm_open", {"comm_id": comm_id, "target_name": "sm_echo", "data": {"hello": 1}})
    seen = iopub_until(kc, lambda m: m["msg_type"] == "comm_msg")
    assert seen[-1]["content"] == {"comm_id": comm_id, "data": {"opened_with": {"hello": 1}}}
    send("comm_msg", {"comm_id": comm_id, "data": {"value": [1, 2, 3]}})
    seen = iopub_until(kc, lambda m: m["msg_type"] == "comm_msg")
    assert seen[-1]["content"]["data"] == {"echo": {"value": [1, 2, 3]}}
    send("comm_close", {"comm_id": comm_id, "data": {}})
    reply, outputs = execute(kc, f"print({comm_id!r} in get_ipython().kernel.comm_manager.comms)")
    assert stdout_of(outputs) == "False\n"


def test_a_widget_made_in_the_guest_opens_a_comm(kc):
    reply, outputs = execute(kc, "import ipywidgets\nslider = ipywidgets.IntSlider(value=3)\nslider")
    assert reply["status"] == "ok"
    views = [c["data"] for t, c in outputs if t in ("display_data", "execute_result")
             and "application/vnd.jupyter.widget-view+json" in c["data"]]
    assert len(views) == 1
    model_id = views[0]["application/vnd.jupyter.widget-view+json"]["model_id"]
    opened = [c for t, c in outputs if t == "comm_open" and c["comm_id"] == model_id]
    assert opened and opened[0]["target_name"] == "jupyter.widget"


@pytest.mark.parametrize("line, message", [
    ("%sm", "needs a command"),
    ("%sm fly", "unknown %sm command 'fly'"),
    ("%sm timeout soon", "not a number of seconds"),
    ("%sm timeout -3", "between 0 and"),
    ("%sm restore", "usage: %sm restore NAME"),
    ("%sm restore no-such-snapshot", "no-such-snapshot"),
    ("%sm delete ../../etc", "is not valid"),
    ("%sm list extra", "usage: %sm list"),
    ("%sm help\nprint(1)", "alone in its cell"),
])
def test_bad_magic_arguments_give_one_line(kc, line, message):
    reply, outputs = execute(kc, line)
    assert reply["status"] == "error" and reply["ename"] == "UsageError"
    assert message in reply["evalue"]
    errors = [c for t, c in outputs if t == "error"]
    assert len(errors) == 1 and len(errors[0]["traceback"]) == 1 and "\n" not in errors[0]["traceback"][0]


def test_magics_answer_with_rich_output(kc):
    for line, text in [("%sm help", "%sm snapshot [NAME]"), ("%sm status", "vCPUs"), ("%sm list", "no snapshots")]:
        reply, outputs = execute(kc, line)
        assert reply["status"] == "ok", reply
        (bundle,) = [c["data"] for t, c in outputs if t == "display_data"]
        assert text in bundle["text/plain"] and bundle["text/html"].startswith(("<table>", "<pre>"))


def test_cell_timeout_interrupts_then_restarts(kc):
    assert execute(kc, "%sm timeout 2")[0]["status"] == "ok"
    try:
        reply, outputs = execute(kc, "while True: pass")
        assert reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt"
        assert "ran past the %sm timeout of 2 s" in "".join(c.get("text", "") for t, c in outputs if t == "stream")
        execute(kc, "kept = 1")
        # A cell that ignores the interrupt: the guest's Python is replaced.
        reply, outputs = execute(kc, "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: pass")
        assert reply["status"] == "error" and reply["ename"] == "GuestKernelLost"
        assert "did not stop when interrupted" in reply["evalue"]
    finally:
        assert execute(kc, "%sm timeout off")[0]["status"] == "ok"
    reply, outputs = execute(kc, "print('kept' in globals())")
    assert stdout_of(outputs) == "False\n"


def test_a_cell_that_kills_its_python_gets_one_error_and_a_fresh_one(kc):
    execute(kc, "before = 1")
    reply, outputs = execute(kc, "import os\nos.kill(os.getpid(), 9)")
    assert reply["status"] == "error" and reply["ename"] == "GuestKernelLost"
    assert "killed by signal 9" in reply["evalue"]
    assert len([c for t, c in outputs if t == "error"]) == 1
    reply, outputs = execute(kc, "print('before' in globals(), 6 * 7)")
    assert stdout_of(outputs) == "False 42\n"


def test_restart_gives_a_fresh_interpreter(kernel, kc):
    km, _ = kernel
    execute(kc, "survivor = 1")
    km.restart_kernel(now=False)
    kc.wait_for_ready(timeout=STARTUP_TIMEOUT)
    reply, outputs = execute(kc, "print('survivor' in globals())")
    assert stdout_of(outputs) == "False\n"
