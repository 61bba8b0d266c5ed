"""The %sm balloon panel against a fake balloon and a recording frontend (no guest needed).

The frontend here keeps what a widget manager would: each model's state from its comm_open
and the updates after it, so tests read the panel as the browser would show it.
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

from sm_kernel.balloon_panel import VIEW_MIME, BalloonPanel
from vmm.balloon import BalloonError, BalloonStats

MIB = 1 << 20
GUEST_MIB = 1024
PARENT = {"msg_id": "execute-1", "msg_type": "execute_request"}
POLL_TIMEOUT = 10.0


def stats(total: int, free: int, available: int) -> BalloonStats:
    return BalloonStats(free=free * MIB, available=available * MIB, total=total * MIB, caches=None,
                        swap_in=None, swap_out=None, major_faults=None, minor_faults=None)


class FakeBalloon:
    """MemoryBalloon's surface: target_mib, actual_mib, memory_mib, stats()."""

    def __init__(self):
        self.memory_mib = GUEST_MIB
        self.targets: list[int] = []
        self.actual_mib = 0
        self.figures: BalloonStats | BalloonError = stats(1000, 500, 700)

    @property
    def target_mib(self) -> int:
        return self.targets[-1] if self.targets else 0

    @target_mib.setter
    def target_mib(self, mib: int) -> None:
        assert 0 <= mib <= self.memory_mib, "the panel must clamp before it sets the target"
        self.targets.append(mib)

    def stats(self, timeout: float) -> BalloonStats:
        if isinstance(self.figures, BalloonError):
            raise self.figures
        return self.figures


class Frontend:
    """Records what the panel publishes; keeps each model's state as a widget manager would."""

    def __init__(self):
        self.lock = threading.Lock()
        self.messages: list[tuple[str, dict, dict, dict]] = []
        self.models: dict[str, dict] = {}
        self.closed: set[str] = set()

    def send(self, msg_type: str, content: dict, parent: dict, metadata: dict) -> None:
        json.dumps([content, parent, metadata], allow_nan=False)  # what Session.send will do
        with self.lock:
            self.messages.append((msg_type, content, parent, metadata))
            comm_id = content.get("comm_id")
            if msg_type == "comm_open":
                self.models[comm_id] = dict(content["data"]["state"])
            elif msg_type == "comm_msg" and content["data"]["method"] in ("update", "echo_update"):
                assert comm_id in self.models and comm_id not in self.closed, "a message on a comm not open"
                self.models[comm_id].update(content["data"]["state"])
            elif msg_type == "comm_close":
                self.closed.add(comm_id)

    def of(self, msg_type: str) -> list[tuple[str, dict, dict, dict]]:
        with self.lock:
            return [m for m in self.messages if m[0] == msg_type]

    def model(self, reference: str) -> dict:
        assert reference.startswith("IPY_MODEL_")
        with self.lock:
            return dict(self.models[reference.removeprefix("IPY_MODEL_")])

    def panel_view(self) -> dict:
        """The displayed VBox's children, by role: title, slider, figures by name, message."""
        (_, content, _, _), = self.of("display_data")[-1:]
        root = self.models[content["data"][VIEW_MIME]["model_id"]]
        title, slider, *labels, message = [self.model(child) for child in root["children"]]
        return {"title": title, "slider": slider, "message": message,
                "figures": {label["description"]: label["value"] for label in labels}}


@pytest.fixture
def balloon():
    return FakeBalloon()


@pytest.fixture
def frontend():
    return Frontend()


@pytest.fixture
def panel(balloon, frontend):
    panel = BalloonPanel(balloon, frontend.send, interval=0.01, host_rss=lambda: 300 * MIB)
    yield panel
    panel.close()


def poll(condition, timeout: float = POLL_TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def move_slider(panel: BalloonPanel, value, msg_id: str = "comm-msg-1") -> None:
    update = {"method": "update", "state": {"value": value}}
    panel.handle("comm_msg", {"comm_id": panel.slider.model_id, "data": update},
                 {"msg_id": msg_id, "msg_type": "comm_msg"})


def test_open_sends_every_model_before_the_view(panel, frontend):
    panel.open(PARENT)
    opens = frontend.of("comm_open")
    assert opens and all(content["target_name"] == "jupyter.widget" and metadata == {"version": "2.1.0"}
                         and parent == PARENT for _, content, parent, metadata in opens)
    # Every model a state refers to (children, layout, style) was opened before it.
    opened: set[str] = set()
    for _, content, _, _ in opens:
        state = content["data"]["state"]
        references = [v for v in state.values() if isinstance(v, str) and v.startswith("IPY_MODEL_")]
        references += [v for v in state.get("children", [])]
        assert all(ref.removeprefix("IPY_MODEL_") in opened for ref in references)
        opened.add(content["comm_id"])
    assert all(uuid.UUID(hex=comm_id).version == 4 for comm_id in opened)
    assert frontend.messages[-1][0] == "display_data"
    display = frontend.messages[-1][1]
    assert display["data"][VIEW_MIME]["model_id"] in opened
    assert "1024 MiB" in display["data"]["text/plain"]
    assert frontend.models[display["data"][VIEW_MIME]["model_id"]]["_model_name"] == "VBoxModel"


def test_the_slider_spans_guest_ram_from_the_current_target(balloon, frontend):
    balloon.targets.append(256)
    panel = BalloonPanel(balloon, frontend.send, interval=60, host_rss=lambda: None)
    try:
        panel.open(PARENT)
        slider = frontend.panel_view()["slider"]
        assert (slider["_model_name"], slider["_model_module"]) == ("IntSliderModel", "@jupyter-widgets/controls")
        assert (slider["min"], slider["max"], slider["value"]) == (0, GUEST_MIB, 256)
        assert slider["continuous_update"] is False
        assert "1024 MiB" in frontend.panel_view()["title"]["value"]
    finally:
        panel.close()


def test_refresh_shows_guest_figures_balloon_and_host_rss(panel, balloon, frontend):
    balloon.actual_mib = 0
    panel.open(PARENT)
    expected = {"total": "1,000 MiB", "used": "300 MiB", "free": "500 MiB", "available": "700 MiB",
                "balloon": "0 MiB (target 0 MiB)", "host RSS": "300 MiB"}
    assert poll(lambda: frontend.panel_view()["figures"] == expected), frontend.panel_view()["figures"]
    balloon.figures = stats(1000, 100, 200)
    balloon.actual_mib = 128
    assert poll(lambda: frontend.panel_view()["figures"]["used"] == "800 MiB")
    assert poll(lambda: frontend.panel_view()["figures"]["balloon"] == "128 MiB (target 0 MiB)")


def test_moving_the_slider_sets_the_balloon_target(panel, balloon, frontend):
    panel.open(PARENT)
    move_slider(panel, 300)
    assert balloon.targets == [300]
    assert panel.slider.value == 300
    echoes = [(c, p) for _, c, p, _ in frontend.of("comm_msg") if c["data"]["method"] == "echo_update"]
    assert echoes == [({"comm_id": panel.slider.model_id, "data": {
        "method": "echo_update", "state": {"value": 300}, "buffer_paths": []}}, {"msg_id": "comm-msg-1",
                                                                                 "msg_type": "comm_msg"})]
    assert frontend.panel_view()["figures"]["balloon"].endswith("(target 300 MiB)")
    assert frontend.panel_view()["message"]["value"] == ""


@pytest.mark.parametrize(("requested", "used", "message"), [
    (256, 256, ""),
    (5000, GUEST_MIB, f"balloon target 5000 MiB is outside 0..{GUEST_MIB} MiB (the guest's RAM); "
                      f"using {GUEST_MIB} MiB"),
])
def test_a_target_given_with_the_magic_moves_the_slider_before_the_view(panel, balloon, frontend,
                                                                         requested, used, message):
    panel.open(PARENT, requested)                                   # %sm balloon MIB
    assert balloon.targets == [used]
    view = frontend.panel_view()
    assert view["slider"]["value"] == used
    assert view["message"]["value"] == message
    (_, content, _, _), = frontend.of("display_data")
    assert content["data"]["text/plain"].startswith(f"Memory balloon: target {used} of {GUEST_MIB} MiB")


@pytest.mark.parametrize(("requested", "used"), [(5000, GUEST_MIB), (-5, 0)])
def test_a_target_outside_guest_ram_is_clamped_with_a_message(panel, balloon, frontend, requested, used):
    panel.open(PARENT)
    move_slider(panel, requested)
    assert balloon.targets == [used]
    view = frontend.panel_view()
    assert view["slider"]["value"] == used  # an update, not only the echo the frontend ignores
    assert view["message"]["value"] == (f"balloon target {requested} MiB is outside 0..{GUEST_MIB} MiB "
                                        f"(the guest's RAM); using {used} MiB")
    move_slider(panel, 10, msg_id="comm-msg-2")
    assert frontend.panel_view()["message"]["value"] == ""


@pytest.mark.parametrize("value", ["512", 3.5, True, None, [1]])
def test_a_target_that_is_not_whole_mib_is_ignored(panel, balloon, frontend, value):
    panel.open(PARENT)
    move_slider(panel, value)
    assert balloon.targets == []
    assert panel.slider.value == 0
    assert "not a whole number of MiB" in frontend.panel_view()["message"]["value"]


def test_the_frontend_cannot_change_the_figures_or_the_slider_bounds(panel, balloon, frontend):
    panel.open(PARENT)
    used = panel.figures["used"]
    panel.handle("comm_msg", {"comm_id": used.model_id, "data": {"method": "update", "state": {"value": "0 MiB"}}},
                 PARENT)
    panel.handle("comm_msg", {"comm_id": panel.slider.model_id,
                              "data": {"method": "update", "state": {"max": 99999}}}, PARENT)
    assert used.value != "0 MiB"
    assert panel.slider.max == GUEST_MIB
    for bad in ({"comm_id": panel.slider.model_id}, {"comm_id": panel.slider.model_id, "data": "x"},
                {"comm_id": [1]}, "not a dict"):
        panel.handle("comm_msg", bad, PARENT)
    assert balloon.targets == []


def test_request_state_is_answered_with_the_whole_state(panel, frontend):
    panel.open(PARENT)
    panel.handle("comm_msg", {"comm_id": panel.slider.model_id, "data": {"method": "request_state"}},
                 {"msg_id": "request-1"})
    (_, content, parent, _), = [m for m in frontend.of("comm_msg") if m[2] == {"msg_id": "request-1"}]
    assert content["data"]["method"] == "update"
    state = content["data"]["state"]
    assert (state["_model_name"], state["min"], state["max"], state["value"]) == ("IntSliderModel", 0, GUEST_MIB, 0)


def test_a_stats_error_shows_as_the_message_and_clears_when_figures_return(panel, balloon, frontend):
    balloon.figures = BalloonError("no balloon statistics: not ready (is the guest's virtio_balloon driver loaded?)")
    panel.open(PARENT)
    assert poll(lambda: frontend.panel_view()["message"]["value"].startswith("no balloon statistics"))
    assert frontend.panel_view()["figures"]["total"] == "—"
    balloon.figures = stats(1000, 500, 700)
    assert poll(lambda: frontend.panel_view()["message"]["value"] == "")
    assert poll(lambda: frontend.panel_view()["figures"]["total"] == "1,000 MiB")


def test_a_guest_lying_in_its_stats_breaks_no_figure(panel, balloon, frontend):
    balloon.figures = BalloonStats(free=None, available=5000 * MIB, total=1000 * MIB, caches=None, swap_in=None,
                                   swap_out=None, major_faults=None, minor_faults=None)
    panel.open(PARENT)
    assert poll(lambda: frontend.panel_view()["figures"]["available"] == "5,000 MiB")
    figures = frontend.panel_view()["figures"]
    assert (figures["used"], figures["free"]) == ("—", "—")


def test_comm_ids_ownership_and_comm_info(panel, frontend):
    assert panel.comm_info() == {}
    panel.open(PARENT)
    opened = {content["comm_id"] for _, content, _, _ in frontend.of("comm_open")}
    assert all(panel.owns(comm_id) for comm_id in opened)
    assert not panel.owns(uuid.uuid4().hex) and not panel.owns(None)
    assert panel.comm_info() == panel.comm_info("jupyter.widget") == {
        comm_id: {"target_name": "jupyter.widget"} for comm_id in opened}
    assert panel.comm_info("jupyter.widget.control") == {}


def test_opening_again_shows_another_view_of_the_same_models(panel, frontend):
    panel.open(PARENT)
    opens = len(frontend.of("comm_open"))
    panel.open({"msg_id": "execute-2"})
    displays = frontend.of("display_data")
    assert len(frontend.of("comm_open")) == opens
    assert [d[2]["msg_id"] for d in displays] == ["execute-1", "execute-2"]
    assert displays[0][1]["data"][VIEW_MIME] == displays[1][1]["data"][VIEW_MIME]


def test_close_stops_the_refresh_and_closes_every_comm(panel, balloon, frontend):
    panel.open(PARENT)
    assert poll(lambda: frontend.panel_view()["figures"]["total"] != "…")
    opened = {content["comm_id"] for _, content, _, _ in frontend.of("comm_open")}
    slider_id = panel.slider.model_id
    panel.close()
    assert not any(t.name == "balloon-panel" for t in threading.enumerate())
    assert {content["comm_id"] for _, content, _, _ in frontend.of("comm_close")} == opened
    assert panel.closed and panel.comm_info() == {} and not panel.owns(slider_id)
    sent = len(frontend.messages)
    balloon.figures = stats(2000, 1, 1)
    panel.handle("comm_msg", {"comm_id": slider_id, "data": {"method": "update", "state": {"value": 5}}}, PARENT)
    assert len(frontend.messages) == sent and balloon.targets == []
    with pytest.raises(RuntimeError, match="closed"):
        panel.open(PARENT)


def test_a_comm_close_from_the_frontend_closes_the_panel(panel, frontend):
    panel.open(PARENT)
    slider_id = panel.slider.model_id
    panel.handle("comm_close", {"comm_id": slider_id, "data": {}}, PARENT)
    assert panel.closed
    assert not any(t.name == "balloon-panel" for t in threading.enumerate())
    closed = [content["comm_id"] for _, content, _, _ in frontend.of("comm_close")]
    assert slider_id not in closed and len(closed) == len(frontend.of("comm_open")) - 1


def test_restored_frontends_get_the_panel_in_update_states(panel, frontend):
    panel.open(PARENT)
    guest_model = {"model_name": "IntSliderModel", "model_module": "@jupyter-widgets/controls",
                   "model_module_version": "2.0.0", "state": {"value": 1}}
    data = panel.add_states({"method": "update_states", "states": {"guest-widget": guest_model},
                             "buffer_paths": []})
    assert data["states"]["guest-widget"] == guest_model
    assert set(data["states"]) - {"guest-widget"} == set(panel.comm_info())
    slider = data["states"][panel.slider.model_id]
    assert (slider["model_name"], slider["state"]["max"]) == ("IntSliderModel", GUEST_MIB)
    assert panel.add_states({"method": "other"}) == {"method": "other"}
