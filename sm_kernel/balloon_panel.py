"""The ``%sm balloon`` panel: ipywidgets owned by the host kernel, not by the guest.

A slider sets the balloon target (MiB the guest gives back, 0..guest RAM); labels show the
guest's memory figures (from the balloon's statistics), the balloon's size and the host RSS
of the VMM (this process), refreshed every ``interval`` s by a thread while the panel is open.
A line under them says when a target was clamped or the figures could not be read.

The widgets are the real ipywidgets classes; only their comms are ours (``PanelComm``), and
every comm message goes out through the kernel's ``send``. So ipywidgets builds the widget
protocol's messages (protocol 2.1.0: ``comm_open`` with the state and ``metadata.version``,
child models such as ``layout`` and ``style`` opened first as comms of their own,
``update``, ``echo_update``, answers to ``request_state``).

Wiring it into the kernel (sm_kernel/kernel.py)::

    panel = BalloonPanel(guest.machine.balloon, send)
    panel.open(parent)          # %sm balloon: comm_opens, then a display_data; again: one more view

- ``send(msg_type, content, parent, metadata)`` publishes one iopub message (``parent`` is
  the header of the request it answers). It is called from the kernel's own thread (inside
  ``open``/``handle``/``close``) *and* from the refresh thread, so it must be thread-safe;
  in SmKernel: ``lambda *m: self.post("publish", *m)``, with the loop calling
  ``self.session.send(self.iopub, msg_type, content, parent=parent, metadata=metadata)``.
- Frontend ``comm_msg``/``comm_close`` whose ``content["comm_id"]`` the panel ``owns()`` go to
  ``panel.handle(msg_type, content, header)`` (on the kernel's thread, with busy/idle status
  around it like any shell request, and at once: not queued behind a cell running in the
  guest, so the slider works while a cell allocates). Every other comm message goes to the
  guest. Comm ids are uuid4 hex, so they do not collide with the guest's comms.
- ``comm_info_request``: merge ``panel.comm_info(target_name)`` into the guest's reply.
- Page reload (optional): a frontend restoring widgets opens a ``jupyter.widget.control``
  comm to the guest and gets back one ``update_states`` comm_msg; passing that message's
  ``content["data"]`` through ``panel.add_states(data)`` before relaying it lets the panel's
  views come back too.
- ``panel.close()`` when the machine goes away (stop, restart, restore): stops the thread and
  closes the comms. After ``close()``, or a ``comm_close`` from the frontend (``closed`` is
  then True), a new ``%sm balloon`` needs a new panel.

Import this module only when ``%sm balloon`` runs: ipywidgets takes a moment to import.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import comm as comm_package
import ipywidgets
from comm.base_comm import BaseComm

from sm_kernel.guest import vmm_rss_bytes
from vmm.balloon import BalloonError, BalloonStats, MemoryBalloon

log = logging.getLogger("sm_kernel.balloon_panel")

Send = Callable[[str, dict, dict, dict], None]

MIB = 1 << 20
REFRESH_INTERVAL = 1.0   # s between two readings while the panel is open
STATS_TIMEOUT = 2.0      # s: a live guest answers in milliseconds; a hung one must not stall the panel
WIDGET_TARGET = "jupyter.widget"
VIEW_MIME = "application/vnd.jupyter.widget-view+json"
NO_FIGURE = "—"
FIGURES = ("total", "used", "free", "available", "balloon", "host RSS")

# ipywidgets opens a widget's comm through comm.create_comm, a module global: the panel
# replaces it only while it builds its widgets, one panel at a time.
_building = threading.Lock()


class PanelComm(BaseComm):
    """A comm whose messages go out through its panel's ``send``."""

    def __init__(self, panel: BalloonPanel, **kwargs):
        self._panel = panel
        super().__init__(**kwargs)

    def publish_msg(self, msg_type: str, data=None, metadata=None, buffers=None, **keys) -> None:
        if buffers:
            raise ValueError("the balloon panel's widgets have no binary state to send")
        content = {"comm_id": self.comm_id, "data": data or {}}
        content.update((key, value) for key, value in keys.items() if value is not None)
        self._panel._publish(msg_type, content, metadata or {})


class BalloonPanel:
    """The balloon control of one machine, as widgets the host kernel owns."""

    # Built by the first open().
    slider: ipywidgets.IntSlider
    figures: dict[str, ipywidgets.Label]   # by name in FIGURES
    message: ipywidgets.Label

    def __init__(self, balloon: MemoryBalloon, send: Send, *, interval: float = REFRESH_INTERVAL,
                 host_rss: Callable[[], int | None] = vmm_rss_bytes):
        self.balloon = balloon
        self._send = send
        self._interval = interval
        self._host_rss = host_rss
        self._lock = threading.RLock()      # widgets are touched by the kernel's thread and the refresh thread
        self._parent: dict = {}             # header the panel's messages answer
        self._comms: dict[str, PanelComm] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._root: ipywidgets.VBox | None = None
        self._showing_stats_error = False
        self.closed = False

    # ------------------------------------------------------------------ the kernel's side

    def open(self, parent: dict, target_mib: int | None = None) -> None:
        """Show the panel under the request ``parent``: the widgets the first time, then a
        view; with ``target_mib``, set the balloon's target first, as the slider would."""
        with self._lock:
            if self.closed:
                raise RuntimeError("this balloon panel is closed: make a new one")
            self._parent = parent
            if self._root is None:
                self._build()
                self._thread = threading.Thread(target=self._refresh_loop, name="balloon-panel", daemon=True)
                self._thread.start()
            if target_mib is not None:
                self.slider.value = min(max(target_mib, 0), self.balloon.memory_mib)  # frontends follow
                self._apply_target(target_mib)
            self._publish("display_data", {"data": {
                "text/plain": f"Memory balloon: target {self.slider.value} of {self.balloon.memory_mib} MiB "
                              "(the slider needs a frontend with ipywidgets)",
                VIEW_MIME: {"version_major": 2, "version_minor": 0, "model_id": self._root.model_id},
            }, "metadata": {}, "transient": {}})

    def owns(self, comm_id: object) -> bool:
        return isinstance(comm_id, str) and comm_id in self._comms

    def comm_info(self, target_name: str | None = None) -> dict[str, dict]:
        """The panel's open comms, as in a ``comm_info_reply``'s ``comms``."""
        if target_name not in (None, WIDGET_TARGET):
            return {}
        with self._lock:
            return {comm_id: {"target_name": WIDGET_TARGET} for comm_id in self._comms}

    def handle(self, msg_type: str, content: dict, parent: dict) -> None:
        """A frontend's ``comm_msg`` or ``comm_close`` on a comm the panel owns."""
        if msg_type not in ("comm_msg", "comm_close"):
            raise ValueError(f"the balloon panel handles comm_msg and comm_close, not {msg_type}")
        comm_id = content.get("comm_id") if isinstance(content, dict) else None
        with self._lock:
            if not self.owns(comm_id):
                return  # closed meanwhile
            comm = self._comms[comm_id]
            if msg_type == "comm_close":
                comm._closed = True  # the frontend closed it: no comm_close goes back
            else:
                self._frontend_message(comm, content.get("data"), parent)
        if msg_type == "comm_close":
            self.close()  # outside the lock: close waits for the refresh thread, which takes it

    def add_states(self, data: dict) -> dict:
        """Add the panel's models to an ``update_states`` answer on the widget control comm."""
        if not isinstance(data, dict) or data.get("method") != "update_states" \
                or not isinstance(data.get("states"), dict):
            return data
        states = data["states"]
        with self._lock:
            for widget in self._models():
                states[widget.model_id] = {"model_name": widget._model_name, "model_module": widget._model_module,
                                           "model_module_version": widget._model_module_version,
                                           "state": widget.get_state()}
        return data

    def close(self) -> None:
        """Stop refreshing and close the widgets' comms (the frontend removes their views)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._stop.set()
            for widget in self._models():
                widget.close()
            self._comms.clear()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    # ------------------------------------------------------------------ widgets

    def _build(self) -> None:
        with self._comms_to_self():
            label_style = {"description_width": "7em"}
            self.slider = ipywidgets.IntSlider(
                value=self.balloon.target_mib, min=0, max=self.balloon.memory_mib, step=1,
                description="give back (MiB)", continuous_update=False,
                style={"description_width": "initial"}, layout={"width": "36em"})
            self.figures = {name: ipywidgets.Label(value="…", description=name, style=label_style)
                            for name in FIGURES}
            self.message = ipywidgets.Label(value="")
            title = ipywidgets.HTML(f"<b>Memory balloon</b> — guest RAM {self.balloon.memory_mib} MiB")
            self._root = ipywidgets.VBox([title, self.slider, *self.figures.values(), self.message])

    @contextmanager
    def _comms_to_self(self) -> Iterator[None]:
        def create_comm(**kwargs) -> PanelComm:
            comm = PanelComm(self, comm_id=uuid.uuid4().hex, **kwargs)
            self._comms[comm.comm_id] = comm
            return comm

        with _building:
            saved, comm_package.create_comm = comm_package.create_comm, create_comm
            try:
                yield
            finally:
                comm_package.create_comm = saved

    def _models(self) -> list[ipywidgets.Widget]:
        """Every model the panel opened: its widgets and the layouts and styles they refer to."""
        found: dict[int, ipywidgets.Widget] = {}

        def walk(value) -> None:
            if isinstance(value, (list, tuple)):
                for item in value:
                    walk(item)
            elif isinstance(value, ipywidgets.Widget) and id(value) not in found and value.comm is not None:
                found[id(value)] = value
                for key in value.keys:
                    walk(getattr(value, key))

        walk(self._root)
        return list(found.values())

    def _frontend_message(self, comm: PanelComm, data: object, parent: dict) -> None:
        if not isinstance(data, dict) or not isinstance(data.get("method"), str):
            log.warning("ignored a comm_msg without a method on %s", comm.comm_id)
            return
        saved, self._parent = self._parent, parent  # what this message causes answers it
        try:
            if data["method"] == "update":
                self._frontend_update(comm, data.get("state"))
            else:  # request_state (answered with the whole state), custom
                self._deliver(comm, data)
        finally:
            self._parent = saved

    def _frontend_update(self, comm: PanelComm, state: object) -> None:
        """The frontend moved the slider; nothing else in the panel is the frontend's to change."""
        if comm is not self.slider.comm or not isinstance(state, dict) or "value" not in state:
            return
        requested = state["value"]
        if isinstance(requested, bool) or not isinstance(requested, int):
            self._say(f"ignored a balloon target that is not a whole number of MiB: {requested!r}")
            self.slider.send_state("value")  # put the frontend's slider back
            return
        self._deliver(comm, {"method": "update", "state": {"value": requested}, "buffer_paths": []})
        self._apply_target(requested)

    def _apply_target(self, requested: int) -> None:
        target = self.slider.value  # the slider keeps its value within 0..guest RAM
        self.balloon.target_mib = target
        self._say("" if target == requested else
                  f"balloon target {requested} MiB is outside 0..{self.balloon.memory_mib} MiB (the guest's RAM); "
                  f"using {target} MiB")
        self.figures["balloon"].value = self._balloon_text(self.balloon.actual_mib)

    def _deliver(self, comm: PanelComm, data: dict) -> None:
        """Hand a frontend message to the widget behind ``comm`` (ipywidgets answers it)."""
        comm.handle_msg({"header": self._parent, "content": {"comm_id": comm.comm_id, "data": data},
                         "metadata": {}, "buffers": []})

    def _say(self, text: str) -> None:
        self.message.value = text
        self._showing_stats_error = False

    def _balloon_text(self, actual_mib: int) -> str:
        return f"{actual_mib} MiB (target {self.balloon.target_mib} MiB)"

    def _publish(self, msg_type: str, content: dict, metadata: dict | None = None) -> None:
        self._send(msg_type, content, self._parent, metadata or {})

    # ------------------------------------------------------------------ refresh

    def _refresh_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._refresh()
            except Exception:  # noqa: BLE001 - a failing send (kernel going away) ends the panel's updates
                log.exception("balloon panel refresh failed; no more updates")
                return
            self._stop.wait(self._interval)

    def _refresh(self) -> None:
        """Read the figures (slow: the guest answers), then show them (under the lock)."""
        try:
            stats, error = self.balloon.stats(timeout=STATS_TIMEOUT), None
        except BalloonError as exc:
            stats, error = None, str(exc)
        actual_mib, rss = self.balloon.actual_mib, self._host_rss()
        with self._lock:
            if self.closed:
                return
            texts = guest_figures(stats)
            texts["balloon"] = self._balloon_text(actual_mib)
            texts["host RSS"] = mib_text(rss)
            for name, text in texts.items():
                self.figures[name].value = text
            if error is not None:
                self._say(error)
                self._showing_stats_error = True
            elif self._showing_stats_error:
                self._say("")


def mib_text(size: int | None) -> str:
    return NO_FIGURE if size is None else f"{size / MIB:,.0f} MiB"


def guest_figures(stats: BalloonStats | None) -> dict[str, str]:
    """The guest's figures as shown. Used is total − available: the balloon's pages count as used."""
    if stats is None:
        return {name: NO_FIGURE for name in ("total", "used", "free", "available")}
    used = None
    if stats.total is not None and stats.available is not None and stats.available <= stats.total:
        used = stats.total - stats.available
    return {"total": mib_text(stats.total), "used": mib_text(used), "free": mib_text(stats.free),
            "available": mib_text(stats.available)}
