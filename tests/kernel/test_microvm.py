"""What only a microVM kernel does: %sm snapshot / restore of real state, and what a cell
can do to its VM. SIGKILL to the guest's init changes nothing (Linux protects PID 1); a
kernel panic stops the microVM, the cell gets one error, and a new one boots."""

import re
import uuid

import pytest
from jupyter_client.manager import start_new_kernel

from tests.kernel.conftest import (
    REPLY_TIMEOUT,
    STARTUP_TIMEOUT,
    VM_KERNEL,
    execute,
    iopub_until,
    stdout_of,
)


@pytest.fixture(scope="module")
def kc(linux_kvm):
    km, kc = start_new_kernel(kernel_name=VM_KERNEL, startup_timeout=STARTUP_TIMEOUT)
    yield kc
    kc.stop_channels()
    km.shutdown_kernel(now=False)


def display_text(outputs):
    return "".join(c["data"]["text/plain"] for t, c in outputs if t == "display_data")


def test_a_second_kernel_starts_from_the_warm_kernel_snapshot_with_its_own_randomness(kc):
    # This module's kernel started first: it saved the warm kernel snapshot, or came from it.
    code = "import os, random, secrets; print(os.getpid(), random.random(), secrets.token_hex(8))"
    first = stdout_of(execute(kc, code)[1]).split()
    execute(kc, "only_in_the_first = 1")
    km2, kc2 = start_new_kernel(kernel_name=VM_KERNEL, startup_timeout=STARTUP_TIMEOUT)
    try:
        assert "from the warm kernel snapshot" in display_text(execute(kc2, "%sm status")[1])
        second = stdout_of(execute(kc2, code)[1]).split()
        assert second[0] == first[0]    # the very guest process, restored...
        assert second[1] != first[1] and second[2] != first[2]   # ...drawing numbers of its own
        assert stdout_of(execute(kc2, "print('only_in_the_first' in globals())")[1]) == "False\n"
        assert execute(kc2, "1")[0]["execution_count"] == 3    # the reseed was not a cell
    finally:
        kc2.stop_channels()
        km2.shutdown_kernel(now=True)


def test_restore_brings_back_variables_imports_open_files_and_the_counter(kc):
    reply, _ = execute(kc, "import json, fractions\nstate = {'n': 41}\n"
                           "log = open('/tmp/sm-log.txt', 'w+')\nlog.write('line one\\n')\nlog.flush()")
    assert reply["status"] == "ok"
    reply, outputs = execute(kc, "%sm snapshot one")
    assert reply["status"] == "ok" and "snapshot one: cell" in display_text(outputs)
    counter = execute(kc, "1")[0]["execution_count"]

    execute(kc, "state['n'] = 0\ndel fractions\nlog.write('line two\\n')\nlog.close()")
    reply, outputs = execute(kc, "%sm restore one")
    assert reply["status"] == "ok" and "restored one" in display_text(outputs)

    reply, outputs = execute(kc, "log.write('line three\\n'); log.seek(0)\n"
                                 "print(state['n'] + 1, fractions.Fraction(1, 2), json.dumps(log.read()))")
    assert reply["status"] == "ok", reply
    assert stdout_of(outputs) == '42 1/2 "line one\\nline three\\n"\n'
    assert reply["execution_count"] == counter  # the counter came back with the state


def test_diff_snapshots_list_and_delete(kc):
    execute(kc, "%sm snapshot one-b")
    execute(kc, "%sm snapshot two")
    reply, outputs = execute(kc, "%sm list")
    rows = {line.split()[0]: line.split() for line in display_text(outputs).splitlines()[2:]}
    assert rows["two"][-1] == "one-b"
    reply, _ = execute(kc, "%sm delete one-b")
    assert reply["status"] == "error" and "is the base of two" in reply["evalue"]
    assert execute(kc, "%sm delete two")[0]["status"] == "ok"
    assert execute(kc, "%sm delete one-b")[0]["status"] == "ok"
    reply, _ = execute(kc, "%sm restore two")
    assert reply["status"] == "error" and reply["evalue"].startswith("no snapshot named 'two'")
    assert execute(kc, "print(6 * 7)")[0]["status"] == "ok"


def test_sigkill_to_the_guest_init_is_harmless(kc):
    reply, outputs = execute(kc, "import os\nos.kill(1, 9)\nkept = 'yes'\nprint(kept)")
    assert reply["status"] == "ok"
    assert stdout_of(outputs) == "yes\n"


def test_a_guest_kernel_panic_gives_one_error_and_a_new_microvm(kc):
    reply, outputs = execute(kc, "open('/proc/sysrq-trigger', 'w').write('c')", timeout=STARTUP_TIMEOUT)
    assert reply["status"] == "error" and reply["ename"] == "GuestKernelLost"
    assert "the microVM stopped" in reply["evalue"]
    assert len([c for t, c in outputs if t == "error"]) == 1
    reply, outputs = execute(kc, "print('kept' in globals(), 6 * 7)", timeout=STARTUP_TIMEOUT)
    assert stdout_of(outputs) == "False 42\n"


def test_sm_balloon_opens_a_panel_whose_slider_drives_the_guests_balloon(kc):
    reply, outputs = execute(kc, "%sm balloon")
    assert reply["status"] == "ok"
    states = {c["comm_id"]: c["data"]["state"] for t, c in outputs if t == "comm_open"}
    slider_id, slider = next((i, s) for i, s in states.items() if s["_model_name"] == "IntSliderModel")
    assert (slider["min"], slider["max"]) == (0, 768)           # the kernelspec's guest RAM
    views = [c for t, c in outputs if t == "display_data"]
    assert views and "application/vnd.jupyter.widget-view+json" in views[0]["data"]

    # The frontend moves the slider: a comm_msg the host kernel handles, not the guest.
    kc.shell_channel.send(kc.session.msg("comm_msg", {
        "comm_id": slider_id, "data": {"method": "update", "state": {"value": 64}, "buffer_paths": []}}))
    balloon_reached = re.compile(r"^64 MiB \(target 64 MiB\)$")
    iopub_until(kc, lambda msg: msg["msg_type"] == "comm_msg" and any(
        isinstance(v, str) and balloon_reached.match(v)
        for v in msg["content"]["data"].get("state", {}).values()), timeout=STARTUP_TIMEOUT)
    reply, outputs = execute(kc, "print(6 * 7)")
    assert stdout_of(outputs) == "42\n"                            # the guest carries on
    assert "64 MiB given back to the host (target 64 MiB" in display_text(execute(kc, "%sm status")[1])


def shell_reply(kc, msg: dict) -> dict:
    kc.shell_channel.send(msg)
    while True:
        reply = kc.get_shell_msg(timeout=REPLY_TIMEOUT)
        if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
            return reply["content"]


def test_a_reloaded_page_finds_the_panel_beside_the_guests_own_widgets(kc):
    # The panel (opened above) and a slider of the guest's own ipywidgets, side by side.
    (view,) = [c for t, c in execute(kc, "%sm balloon")[1] if t == "display_data"]
    panel_root = view["data"]["application/vnd.jupyter.widget-view+json"]["model_id"]
    reply, outputs = execute(kc, "import ipywidgets\nguest_slider = ipywidgets.IntSlider(value=7)\nguest_slider")
    guest_slider = next(c["comm_id"] for t, c in outputs
                        if t == "comm_open" and c["data"].get("state", {}).get("value") == 7)

    # What ipywidgets 7 asks on reconnecting: the comms of a target, the guest's and the panel's.
    comms = shell_reply(kc, kc.session.msg("comm_info_request", {"target_name": "jupyter.widget"}))["comms"]
    assert {panel_root, guest_slider} <= set(comms)
    assert shell_reply(kc, kc.session.msg("comm_info_request", {"target_name": "other"}))["comms"] == {}

    # What ipywidgets 8 asks after a page reload: every widget's state, on its control comm.
    control = uuid.uuid4().hex
    kc.shell_channel.send(kc.session.msg("comm_open", {"comm_id": control, "data": {},
                                                       "target_name": "jupyter.widget.control"},
                                         metadata={"version": "1.0.0"}))
    kc.shell_channel.send(kc.session.msg("comm_msg", {"comm_id": control, "data": {"method": "request_states"}}))
    answer = iopub_until(kc, lambda msg: msg["msg_type"] == "comm_msg" and msg["content"]["comm_id"] == control)
    states = answer[-1]["content"]["data"]["states"]
    assert states[panel_root]["model_name"] == "VBoxModel" and states[guest_slider]["state"]["value"] == 7
