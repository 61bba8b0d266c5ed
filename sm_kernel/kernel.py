"""The sm kernel process: owns the frontend's five ZMQ sockets and relays every message to
the real ipykernel running inside the guest, except ``%sm`` cells, interrupts and
shutdown, which it handles itself (docs/kernel.md).

Messages are relayed whole, not rebuilt: the frames of header, parent, metadata and
content pass through unchanged and only the HMAC signature is replaced (the guest's
kernel has a key of its own, never the frontend's). Routing identities pass through
too, so the guest's replies find their frontend without a table here.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import zmq
from jupyter_client.session import Session

from sm_kernel import magics, warm
from sm_kernel.builtin import ExecutorLink
from sm_kernel.forward import PortForward
from sm_kernel.guest import GuestError, GuestKernel, LocalGuest, VmGuest, vmm_rss_bytes
from sm_kernel.snapshots import WARM_BASE, SnapshotEntry, SnapshotStore

log = logging.getLogger("sm_kernel")

DELIM = b"<IDS|MSG>"
# Shell messages that get no reply (only busy/idle): not tracked as pending.
NO_REPLY = frozenset({"comm_open", "comm_msg", "comm_close"})
PROTOCOL_VERSION = "5.3"
# After a timed-out cell is interrupted, it has this long to stop before a restart.
TIMEOUT_GRACE = 5.0
# While connecting to a guest kernel, a kernel_info_request goes out this often until
# both its reply and an iopub message came back (iopub subscriptions are asynchronous).
PROBE_INTERVAL = 0.5
# A killed guest kernel is given this long to be gone before the next one takes its ports.
KILL_WAIT = 10.0
# A restart after a lost guest that has not answered after this long ends the process.
RESTART_LIMIT = 300.0
# A lost built-in executor connection is reported after this long (see _connect).
EXECUTOR_LOSS_DELAY = 2.0
# How often the loop checks that the microVM still runs.
STOP_CHECK_INTERVAL = 1.0
# Run silently in a guest kernel restored from the warm snapshot, before any cell.
RESEED_RANDOM = "import random as _sm_random; _sm_random.seed(); del _sm_random"
# Largest message accepted from the guest (a hostile guest must not exhaust host memory).
GUEST_MAX_MESSAGE = 512 << 20


class GuestLink:
    """ZMQ sockets to one guest kernel, through port forwards over vsock."""

    def __init__(self, context: zmq.Context, guest, kernel: GuestKernel, directory: str, generation: int):
        self.session = Session(key=kernel.key.encode(), signature_scheme="hmac-sha256")
        self.forwards = {}
        for name in ("shell", "control", "stdin", "iopub"):
            path = os.path.join(directory, f"{name}-{generation}.sock")
            self.forwards[name] = PortForward(guest.connect_agent, kernel.ports[name], path)
        self.probe_ids: set[str] = set()  # the host's own kernel_info requests on this link
        # stdin must share shell's identity: the guest's kernel sends input_request to
        # the identity its execute_request came from.
        identity = secrets.token_hex(8).encode()
        self.sockets: dict[str, zmq.Socket] = {}
        for name, kind in (("shell", zmq.DEALER), ("control", zmq.DEALER), ("stdin", zmq.DEALER),
                           ("iopub", zmq.SUB)):
            sock = context.socket(kind)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, GUEST_MAX_MESSAGE)
            if name in ("shell", "stdin"):
                sock.setsockopt(zmq.ROUTING_ID, identity)
            if kind == zmq.SUB:
                sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.connect(self.forwards[name].endpoint)
            self.sockets[name] = sock

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close(linger=0)
        for forward in self.forwards.values():
            forward.close()


@dataclass
class Pending:
    """A shell request forwarded to the guest, until both its reply and its idle status came back."""

    idents: list[bytes]
    header: dict
    is_execute: bool
    reply_seen: bool = False
    idle_seen: bool = False
    deadline: float | None = None
    interrupted: bool = False
    error: dict | None = None  # the built-in executor's error, for the execute_reply


@dataclass
class Incoming:
    """A frontend message waiting its turn."""

    channel: str
    idents: list[bytes]
    frames: list[bytes]  # [signature, header, parent, metadata, content, *buffers]
    header: dict
    content: dict | None = None  # parsed only where the host needs it

    @property
    def msg_type(self) -> str:
        return self.header.get("msg_type", "")

    @property
    def magic(self) -> bool:
        return self.msg_type == "execute_request" and magics.is_magic_cell(str(self.content.get("code", "")))


@dataclass
class Options:
    image: str | None = None
    cpus: int = 1
    memory_mib: int = 1024
    no_vm: bool = False
    builtin_executor: bool = False  # even when the image has ipykernel


class SmKernel:
    def __init__(self, connection: dict, options: Options):
        self.options = options
        self.context = zmq.Context()
        self.session = Session(key=connection["key"].encode(),
                               signature_scheme=connection.get("signature_scheme", "hmac-sha256"))
        transport, ip = connection.get("transport", "tcp"), connection.get("ip", "127.0.0.1")

        def bind(kind: int, port_name: str) -> zmq.Socket:
            sock = self.context.socket(kind)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.bind(f"{transport}://{ip}:{connection[port_name]}" if transport == "tcp"
                      else f"{transport}://{ip}-{connection[port_name]}")
            return sock

        self.frontend = {"shell": bind(zmq.ROUTER, "shell_port"), "control": bind(zmq.ROUTER, "control_port"),
                         "stdin": bind(zmq.ROUTER, "stdin_port")}
        # XPUB: each new subscriber gets an iopub_welcome (JEP 65), so a frontend knows
        # its iopub is connected without probing with kernel_info requests.
        self.iopub = bind(zmq.XPUB, "iopub_port")
        self._heartbeat = bind(zmq.ROUTER, "hb_port")
        threading.Thread(target=self._echo_heartbeat, name="heartbeat", daemon=True).start()

        self.tmpdir = tempfile.mkdtemp(prefix="sm-kernel-")
        os.chmod(self.tmpdir, 0o700)
        self.store = SnapshotStore()
        self.panel = None   # the %sm balloon panel (sm_kernel/balloon_panel.py), once opened
        self.comm_info_targets: dict[str, object] = {}   # comm_info_request id → its target_name
        self._loop_thread: threading.Thread | None = None
        self.guest = None
        self.kernel: GuestKernel | None = None
        self.link: GuestLink | None = None
        self.generation = 0
        self.ready = False          # the guest kernel answers through the link
        self.busy_with: str | None = None  # a host job (start, magic, restart) is running
        self.start_error: str | None = None
        self.held: deque[Incoming] = deque()
        self.held_control: list[Incoming] = []
        self.pending: dict[str, Pending] = {}
        self.executor_queue: deque[Incoming] = deque()  # requests the built-in executor has, in order
        self.execution_count = 0
        self.cell_timeout: float | None = None
        self.snapshot_parent: str | None = None  # the last snapshot of the running machine
        self.started = time.time()
        self._probe: dict | None = None
        self._reseed_random = False     # reseed the guest's ``random`` before the first cell
        self.start_note = ""            # how the guest and its kernel last started, for %sm status
        self._on_ready: list[Callable[[], None]] = []
        self._events: queue.Queue = queue.Queue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._running = True
        self._last_stop_check = 0.0

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> None:
        signal.signal(signal.SIGINT, lambda *_: self.post("interrupt"))
        signal.signal(signal.SIGTERM, lambda *_: self.post("terminate"))
        self.run_job("start", self._start_guest, self._started)
        self._loop_thread = threading.current_thread()
        try:
            self._loop()
        finally:
            self.close()

    def close(self) -> None:
        """Stop the guest, remove this session's files, and let queued replies go out."""
        self._close_panel()
        if self.link:
            self.link.close()
            self.link = None
        if self.kernel:
            self.kernel.detach()
            if self.guest is not None and not self.guest.isolated:
                self.guest.kill_process(self.kernel.pid)  # no VM to take it down with it
        if self.guest:
            try:
                self.guest.stop()
            except Exception:  # noqa: BLE001 - stopping is best effort at exit
                log.exception("stopping the guest")
            self.guest = None
        self.store.remove_all()
        shutil.rmtree(self.tmpdir, ignore_errors=True)
        for sock in (*self.frontend.values(), self.iopub):
            sock.close(linger=1000)
        self.context.term()  # ends the heartbeat thread, which closes its socket

    def post(self, kind: str, *payload) -> None:
        """Hand an event to the loop thread (from any thread or a signal handler)."""
        self._events.put((kind, payload))
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    def run_job(self, label: str, work: Callable[[], object], done: Callable[[object, BaseException | None], None]):
        """Run blocking guest work on a thread; ``done(result, error)`` runs on the loop."""
        self.busy_with = label

        def target() -> None:
            try:
                result, error = work(), None
            except BaseException as exc:  # noqa: BLE001 - handed to the loop
                result, error = None, exc
            self.post("job_done", done, result, error)

        threading.Thread(target=target, name=f"job-{label}", daemon=True).start()

    def _echo_heartbeat(self) -> None:
        try:
            zmq.proxy(self._heartbeat, self._heartbeat)
        except zmq.ZMQError:
            pass  # context terminated
        self._heartbeat.close(linger=0)

    # ------------------------------------------------------------------ guest start and loss

    def _new_guest(self):
        if self.options.no_vm:
            return LocalGuest()
        return VmGuest.boot(self.options.image, self.options.cpus, self.options.memory_mib)

    def _start_guest(self):
        """A guest with its kernel running: restored from the warm kernel snapshot when
        there is one (sm_kernel/warm.py), else booted, and then saved as that snapshot."""
        began = time.monotonic()
        warm_path = None
        if not self.options.no_vm:
            warm_path, started = self._restore_warm_kernel()
            if started is not None:
                self.start_note = f"from the warm kernel snapshot in {time.monotonic() - began:.2f} s"
                return started
        guest = self._new_guest()
        log.info("guest up (%.2f s after the process started); starting its kernel", time.time() - self.started)
        try:
            kernel = self._launch_kernel(guest)
        except BaseException:
            guest.stop()
            raise
        source = ("the image's warm snapshot" if getattr(guest, "restored_from", None)
                  else "a boot" if guest.isolated else "a new local process")
        self.start_note = f"from {source} in {time.monotonic() - began:.2f} s"
        if warm_path is not None:
            warm.save(guest, kernel, warm_path)
        return guest, kernel

    def _restore_warm_kernel(self):
        """(where the warm kernel snapshot lives, (guest, kernel) restored from it or None)."""
        from vmm.machine import Machine
        options = self.options
        try:
            machine_snapshot = Machine.warm_snapshot(options.image, cpus=options.cpus,
                                                     memory_mib=options.memory_mib)
        except Exception as error:  # noqa: BLE001 - booting fails the same way, and says so
            log.info("no warm kernel snapshot: %s", _one_line(error))
            return None, None
        path = warm.snapshot_path(machine_snapshot, True if options.builtin_executor else None)
        saved = warm.load(path)
        if saved is None:
            return path, None
        try:
            guest = VmGuest.restore(path, options.image, options.cpus, options.memory_mib)
        except GuestError as error:
            log.warning("starting cold: the warm kernel snapshot cannot be used (%s)", error)
            return path, None
        kernel = self._new_kernel(guest)
        try:
            kernel.attach(saved.pid, saved.key, saved.ports, saved.builtin)
        except GuestError as error:
            guest.stop()
            log.warning("starting cold: the kernel in the warm snapshot did not answer (%s)", error)
            return path, None
        # Every kernel from this snapshot would draw the same numbers from ``random``.
        self._reseed_random = True
        return path, (guest, kernel)

    def _new_kernel(self, guest) -> GuestKernel:
        generation = self.generation + 1
        return GuestKernel(guest, lambda reason: self.post("kernel_lost", generation, reason))

    def _launch_kernel(self, guest) -> GuestKernel:
        kernel = self._new_kernel(guest)
        kernel.launch(builtin=True if self.options.builtin_executor else None)
        return kernel

    def _started(self, result, error) -> None:
        log.info("guest started in %.2f s: %s", time.time() - self.started, error or "ok")
        self.busy_with = None
        if error is not None:
            self.start_error = _one_line(error)
            log.error("cannot start the guest: %s", self.start_error)
            self._drain()
            for item in self.held_control:
                self._handle_control(item)
            self.held_control.clear()
            return
        self.guest, self.kernel = result
        self.snapshot_parent = WARM_BASE if getattr(self.guest, "restored_from", None) else None
        self._connect()

    def _connect(self) -> None:
        """New ZMQ sockets to self.kernel; ready once a probe came back on shell and iopub.
        The built-in executor is ready once connected."""
        self.generation += 1
        if self.kernel.builtin:
            generation = self.generation
            try:
                # A lost connection is reported a little later: the supervisor's report of how
                # the process ended (a signal, an exit status) says more, and comes first.
                self.link = ExecutorLink(self.guest.connect_agent, self.kernel.ports["shell"],
                                         lambda message: self.post("executor", generation, message),
                                         lambda reason: threading.Timer(
                                             EXECUTOR_LOSS_DELAY, self.post, ("kernel_lost", generation, reason)).start())
            except Exception as error:  # noqa: BLE001 - the same path as a kernel that died
                self.post("kernel_lost", generation, f"cannot reach the built-in executor: {_one_line(error)}")
                return
            if self._reseed_random:   # handled before any cell: one connection, in order
                self.link.send(op="reseed")
            self._probe_answered()
            return
        self.link = GuestLink(self.context, self.guest, self.kernel, self.tmpdir, self.generation)
        self._probe = {"sent": 0.0, "reply": False, "iopub": False}

    def _send_probe(self) -> None:
        if self._reseed_random:     # its replies answer the probe as well as kernel_info's
            msg = self.link.session.msg("execute_request", {
                "code": RESEED_RANDOM, "silent": True, "store_history": False,
                "user_expressions": {}, "allow_stdin": False, "stop_on_error": False})
        else:
            msg = self.link.session.msg("kernel_info_request", {})
        self._probe["sent"] = time.monotonic()
        self.link.probe_ids.add(msg["header"]["msg_id"])
        self.link.session.send(self.link.sockets["shell"], msg)

    def _probe_answered(self) -> None:
        log.info("guest kernel %d answers (%.2f s after the process started)", self.generation,
                 time.time() - self.started)
        self._probe = None
        self._reseed_random = False
        self.ready = True
        callbacks, self._on_ready = self._on_ready, []
        for callback in callbacks:
            callback()
        for item in self.held_control:
            self._handle_control(item)
        self.held_control.clear()
        self._drain()

    def _kernel_lost(self, generation: int, reason: str) -> None:
        log.info("guest kernel %d lost (current %d, busy with %s): %s", generation, self.generation,
                 self.busy_with, reason)
        if generation != self.generation or self.guest is None or self.busy_with == "restart":
            return  # an earlier kernel, replaced on purpose, or a loss already being handled
        stopped = self.guest.stopped()
        if stopped:
            reason = f"the microVM stopped ({stopped})"
        self._fail_pending(f"{reason}; a fresh Python is starting: variables and imports are gone")
        self._restart_guest_kernel(vm_lost=bool(stopped))

    def _restart_guest_kernel(self, vm_lost: bool) -> None:
        self.ready = False
        if self.link:
            if vm_lost:  # what a crashed machine's connections do on close is not this loop's problem
                threading.Thread(target=self.link.close, name="close-lost-link", daemon=True).start()
            else:
                self.link.close()
            self.link = None
        old_guest, old_kernel = self.guest, self.kernel
        self.execution_count = 0

        def work():
            if vm_lost:
                old_kernel.kill()
                # A crashed machine may not stop cleanly: never let it hold up the new one.
                threading.Thread(target=old_guest.stop, name="stop-crashed-vm", daemon=True).start()
                log.info("restart: booting a new microVM")
                return self._start_guest()
            old_kernel.kill(wait=KILL_WAIT)
            return old_guest, self._launch_kernel(old_guest)

        if vm_lost:
            self.guest = None
        self.run_job("restart", work, self._started)
        watchdog = threading.Timer(RESTART_LIMIT, self._restart_overdue, (self.generation,))
        watchdog.daemon = True
        watchdog.start()

    def _restart_overdue(self, generation: int) -> None:
        """Runs on a timer thread, so it works even if the loop is stuck: better a dead
        kernel (frontends with auto-restart start a new one) than one that never answers."""
        if not self.ready and not self.start_error and generation == self.generation:
            log.error("no new guest answered within %g s: the kernel process exits", RESTART_LIMIT)
            sys.stderr.flush()
            os._exit(1)

    def _fail_pending(self, message: str) -> None:
        self.executor_queue.clear()
        for msg_id, pending in list(self.pending.items()):
            if pending.is_execute:
                self._publish_error(pending.header, "GuestKernelLost", message)
                self._publish_status(pending.header, "idle")
            self._reply_error(self.frontend["shell"], pending.idents, pending.header, "GuestKernelLost", message)
        self.pending.clear()

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        poller = zmq.Poller()
        for sock in (*self.frontend.values(), self.iopub):
            poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        registered_link = None
        while self._running:
            if registered_link is not self.link:
                if registered_link is not None:
                    for sock in registered_link.sockets.values():
                        if sock in poller:
                            poller.unregister(sock)
                registered_link = self.link
                if registered_link is not None:
                    for sock in registered_link.sockets.values():
                        poller.register(sock, zmq.POLLIN)
            if self._probe is not None and self.link is not None and \
                    time.monotonic() - self._probe["sent"] > PROBE_INTERVAL:
                self._send_probe()
            events = dict(poller.poll(self._poll_timeout()))
            if self._wake_r in events:
                os.read(self._wake_r, 4096)
                self._guarded(self._run_events)
            for name, sock in self.frontend.items():
                if sock in events:
                    self._guarded(lambda: self._from_frontend(name, sock))
            if self.iopub in events:
                self._welcome_subscribers()
            link = self.link
            if link is not None and link is registered_link:
                for name, sock in link.sockets.items():
                    if sock in events and self.link is link:
                        self._from_guest(name, sock)
            self._guarded(self._check_timeouts)

    def _guarded(self, work: Callable[[], None]) -> None:
        """A bug in one handler is logged; the kernel keeps serving."""
        try:
            work()
        except Exception:  # noqa: BLE001
            log.exception("internal error in the sm kernel")

    def _poll_timeout(self) -> int:
        timeouts = [PROBE_INTERVAL] if self._probe is not None else []
        now = time.monotonic()
        timeouts += [max(p.deadline - now, 0) for p in self.pending.values() if p.deadline is not None]
        return int(min(timeouts + [STOP_CHECK_INTERVAL]) * 1000) + 1

    def _run_events(self) -> None:
        while True:
            try:
                kind, payload = self._events.get_nowait()
            except queue.Empty:
                return
            if kind == "job_done":
                done, result, error = payload
                done(result, error)
            elif kind == "kernel_lost":
                self._kernel_lost(*payload)
            elif kind == "executor":
                generation, message = payload
                if generation == self.generation:
                    self._from_executor(message)
            elif kind == "publish":
                self._publish_for_panel(*payload)
            elif kind == "interrupt":
                self._interrupt()
            elif kind == "terminate":
                self._running = False

    # ------------------------------------------------------------------ frontend → guest

    def _from_frontend(self, channel: str, sock: zmq.Socket) -> None:
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                idents, parts = self.session.feed_identities(frames)
                msg = self.session.deserialize(parts, content=False)
            except Exception as error:  # noqa: BLE001 - a bad or unsigned message is dropped
                log.warning("dropped a bad message from the frontend on %s: %s", channel, error)
                continue
            item = Incoming(channel, idents, parts, msg["header"])
            if item.msg_type in ("execute_request", "shutdown_request", "interrupt_request"):
                item.content = _json(parts[4])
            elif item.msg_type == "comm_info_request" and self.panel is not None:  # the reply gets its comms
                self.comm_info_targets[item.header.get("msg_id")] = _json(parts[4]).get("target_name")
            if channel == "shell" and self._panel_message(item, parts):
                continue
            if channel == "shell":
                self.held.append(item)
                self._drain()
            elif channel == "control":
                self._handle_control(item)
            elif self.link is not None and "stdin" in self.link.sockets:  # input_reply
                self._to_guest("stdin", item)

    def _welcome_subscribers(self) -> None:
        while True:
            try:
                event = self.iopub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if event[:1] == b"\x01":  # a subscription (b"\x00" is an unsubscription)
                topic = event[1:].decode("utf-8", "replace")
                self.session.send(self.iopub, "iopub_welcome", {"subscription": topic}, parent={},
                                  ident=b"kernel.sm.iopub_welcome")

    def _handle_control(self, item: Incoming) -> None:
        if item.msg_type == "interrupt_request":
            self._interrupt()
            self.session.send(self.frontend["control"], "interrupt_reply", {"status": "ok"},
                              parent=item.header, ident=item.idents)
        elif item.msg_type == "shutdown_request":
            self._shutdown(item)
        elif self.start_error:
            self._answer_without_guest(item)
        elif not self.ready:
            self.held_control.append(item)
        elif self.kernel.builtin:
            self._to_executor(item, None, self.frontend["control"])
        else:
            self._to_guest("control", item)

    def _drain(self) -> None:
        """Send held shell messages on, in order; a %sm cell waits for the cells before it."""
        while self.held and self.busy_with is None and (self.ready or self.start_error):
            item = self.held[0]
            if item.magic and any(p.is_execute for p in self.pending.values()):
                return
            self.held.popleft()
            if item.msg_type == "shutdown_request":
                self._shutdown(item)
            elif self.start_error:
                self._answer_without_guest(item)
            elif item.magic:
                self._run_magic(item)
            else:
                is_execute = item.msg_type == "execute_request"
                deadline = time.monotonic() + self.cell_timeout if is_execute and self.cell_timeout else None
                if self.kernel.builtin:
                    self._to_executor(item, deadline)
                else:
                    if item.msg_type not in NO_REPLY:
                        self.pending[item.header["msg_id"]] = Pending(item.idents, item.header, is_execute,
                                                                      deadline=deadline)
                    self._to_guest("shell", item)

    def _to_guest(self, channel: str, item: Incoming) -> None:
        parts = item.frames
        signature = self.link.session.sign(parts[1:5])
        try:
            # Never block the loop: a guest that stopped reading has a full queue.
            self.link.sockets[channel].send_multipart([*item.idents, DELIM, signature, *parts[1:]], zmq.NOBLOCK)
        except zmq.Again:
            log.warning("the guest kernel's %s queue is full: dropped a %s", channel, item.msg_type)
            self.pending.pop(item.header.get("msg_id"), None)
            if channel != "stdin":
                self._reply_error(self.frontend[channel], item.idents, item.header, "GuestKernelBusy",
                                  "the Python process in the guest is not taking messages; try again, or "
                                  "interrupt or restart the kernel")

    def _interrupt(self) -> None:
        if self.kernel is not None and self.ready:
            self.kernel.signal("INT")

    def _shutdown(self, item: Incoming) -> None:
        restart = bool((item.content or {}).get("restart", False))
        self.session.send(self.frontend[item.channel], "shutdown_reply", {"status": "ok", "restart": restart},
                          parent=item.header, ident=item.idents)
        self._publish_status(item.header, "idle")
        self._running = False

    # ------------------------------------------------------------------ guest → frontend

    def _from_guest(self, channel: str, sock: zmq.Socket) -> None:
        for _ in range(64):  # then let the other sockets have a turn
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._relay_from_guest(channel, frames)
            except Exception as error:  # noqa: BLE001 - the guest is hostile: drop what does not parse
                log.warning("dropped a bad message from the guest on %s: %s", channel, _one_line(error))

    def _relay_from_guest(self, channel: str, frames: list[bytes]) -> None:
        idents, parts = self.link.session.feed_identities(frames)
        msg = self.link.session.deserialize(parts, content=False)
        msg_type = msg["header"]["msg_type"]
        parent_id = msg["parent_header"].get("msg_id") if isinstance(msg["parent_header"], dict) else None
        if parent_id in self.link.probe_ids:  # never shown to the frontend
            probe = self._probe
            if probe is not None:
                probe["reply" if channel == "shell" else "iopub"] = True
                if probe["reply"] and probe["iopub"]:
                    self._probe_answered()
            return
        if msg_type in ("execute_input", "execute_reply"):
            count = _json(parts[4]).get("execution_count")
            if isinstance(count, int) and not isinstance(count, bool):
                self.execution_count = count
        pending = self.pending.get(parent_id)
        if pending is not None:
            if channel == "shell":
                pending.reply_seen = True
            elif msg_type == "status" and _json(parts[4]).get("execution_state") == "idle":
                pending.idle_seen = True
        if self.panel is not None and msg_type in ("comm_info_reply", "comm_msg"):
            parts = self._with_panel(msg_type, parent_id, parts)
        signature = self.session.sign(parts[1:5])
        out = self.iopub if channel == "iopub" else self.frontend[channel]
        out.send_multipart([*idents, DELIM, signature, *parts[1:]])
        if pending is not None and pending.reply_seen and pending.idle_seen:
            del self.pending[parent_id]
            self._drain()

    def _check_timeouts(self) -> None:
        now = time.monotonic()
        if now - self._last_stop_check >= STOP_CHECK_INTERVAL and self.guest is not None and self.ready:
            # A crashed guest (a kernel panic) may leave its vsock connections silent, not closed.
            self._last_stop_check = now
            if self.guest.stopped():
                self._kernel_lost(self.generation, "the microVM stopped")
                return
        for pending in list(self.pending.values()):
            if pending.deadline is None or now < pending.deadline:
                continue
            if not pending.interrupted:
                pending.interrupted = True
                pending.deadline = now + TIMEOUT_GRACE
                self._publish_stream(pending.header, "stderr",
                                     f"sm: the cell ran past the %sm timeout of {self.cell_timeout:g} s: interrupting it\n")
                self.kernel.signal("INT")
            else:
                pending.deadline = None
                self._fail_pending(f"the cell ran past the %sm timeout of {self.cell_timeout:g} s and did not stop "
                                   "when interrupted; a fresh Python is starting: variables and imports are gone")
                self._restart_guest_kernel(vm_lost=False)
                return

    # ------------------------------------------------------------------ the built-in executor

    def _to_executor(self, item: Incoming, deadline: float | None, sock: zmq.Socket | None = None) -> None:
        """Jupyter requests the built-in executor understands go to it; the host answers the rest."""
        content = item.content if item.content is not None else _json(item.frames[4])
        msg_type, header = item.msg_type, item.header
        self._publish_status(header, "busy")
        if msg_type in ("execute_request", "complete_request", "is_complete_request"):
            self.pending[header["msg_id"]] = Pending(item.idents, header, msg_type == "execute_request",
                                                     idle_seen=True, deadline=deadline)
            self.executor_queue.append(item)
            code = str(content.get("code", ""))
            if msg_type == "execute_request":
                self._publish("execute_input", header, {"code": code, "execution_count": self.execution_count + 1})
                self.link.send(op="execute", code=code)
            elif msg_type == "complete_request":
                self.link.send(op="complete", code=code, cursor_pos=content.get("cursor_pos", len(code)))
            else:
                self.link.send(op="is_complete", code=code)
            return
        replies = {
            "kernel_info_request": host_kernel_info("sm: Python in a microVM (built-in executor: no ipykernel "
                                                    "in this image)"),
            "inspect_request": {"status": "ok", "found": False, "data": {}, "metadata": {}},
            "history_request": {"status": "ok", "history": []},
            "comm_info_request": {"status": "ok", "comms": {}},
        }
        sock = sock or self.frontend["shell"]
        if msg_type in NO_REPLY:
            pass  # comms need ipykernel's comm manager; the built-in executor has none
        elif msg_type in replies:
            self.session.send(sock, msg_type.replace("_request", "_reply"), replies[msg_type], parent=header,
                              ident=item.idents)
        else:
            self._reply_error(sock, item.idents, header, "NotSupported",
                              f"{msg_type} needs ipykernel, which this image does not have")
        self._publish_status(header, "idle")

    def _from_executor(self, message: dict) -> None:
        if not self.executor_queue:
            return  # nothing asked: a hostile or confused executor
        item = self.executor_queue[0]
        header, kind = item.header, message["type"]
        pending = self.pending.get(header["msg_id"])
        if kind == "stream" and message.get("name") in ("stdout", "stderr"):
            self._publish_stream(header, message["name"], str(message.get("text", "")))
        elif kind in ("display", "result") and isinstance(message.get("data"), dict):
            if kind == "display":
                self._publish("display_data", header, {"data": message["data"], "metadata": {}, "transient": {}})
            else:
                self._publish("execute_result", header, {"data": message["data"], "metadata": {},
                                                         "execution_count": self.execution_count + 1})
        elif kind == "error":
            error = {"ename": str(message.get("ename")), "evalue": str(message.get("evalue")),
                     "traceback": [str(line) for line in message.get("traceback") or []]}
            if pending is not None:
                pending.error = error
            self._publish("error", header, error)
        elif kind in ("done", "complete", "is_complete"):
            self.executor_queue.popleft()
            self.pending.pop(header["msg_id"], None)
            sock = self.frontend["shell"]
            if kind == "done":
                count = message.get("execution_count")
                if isinstance(count, int) and not isinstance(count, bool):
                    self.execution_count = count
                reply = {"status": "error", **pending.error} if pending and pending.error else \
                    {"status": "ok", "user_expressions": {}, "payload": []}
                self.session.send(sock, "execute_reply", {**reply, "execution_count": self.execution_count},
                                  parent=header, ident=item.idents)
            elif kind == "complete":
                matches = [str(m) for m in message.get("matches") or []][:1000]
                self.session.send(sock, "complete_reply", {
                    "status": "ok", "matches": matches, "metadata": {},
                    "cursor_start": _int(message.get("cursor_start")), "cursor_end": _int(message.get("cursor_end"))},
                    parent=header, ident=item.idents)
            else:
                status = message.get("status") if message.get("status") in ("complete", "incomplete", "invalid") \
                    else "unknown"
                self.session.send(sock, "is_complete_reply", {"status": status, "indent": ""}, parent=header,
                                  ident=item.idents)
            self._publish_status(header, "idle")
            self._drain()

    # ------------------------------------------------------------------ answers from the host

    def _publish(self, msg_type: str, parent: dict, content: dict) -> None:
        self.session.send(self.iopub, msg_type, content, parent=parent, ident=f"kernel.sm.{msg_type}".encode())

    def _publish_status(self, parent: dict, state: str) -> None:
        self._publish("status", parent, {"execution_state": state})

    def _publish_stream(self, parent: dict, name: str, text: str) -> None:
        self._publish("stream", parent, {"name": name, "text": text})

    def _publish_error(self, parent: dict, ename: str, evalue: str) -> None:
        self._publish("error", parent, {"ename": ename, "evalue": evalue, "traceback": [f"{ename}: {evalue}"]})

    def _reply_error(self, sock: zmq.Socket, idents: list[bytes], header: dict, ename: str, evalue: str) -> None:
        msg_type = header.get("msg_type", "execute_request").replace("_request", "_reply")
        content = {"status": "error", "ename": ename, "evalue": evalue, "traceback": [f"{ename}: {evalue}"],
                   "execution_count": self.execution_count}
        self.session.send(sock, msg_type, content, parent=header, ident=idents)

    def _answer_without_guest(self, item: Incoming) -> None:
        """No guest could be started: kernel_info from the host, an error for everything else."""
        sock = self.frontend[item.channel]
        self._publish_status(item.header, "busy")
        if item.msg_type == "kernel_info_request":
            self.session.send(sock, "kernel_info_reply", host_kernel_info(), parent=item.header, ident=item.idents)
        else:
            if item.msg_type == "execute_request":
                self._publish_error(item.header, "MicroVMUnavailable", self.start_error)
            self._reply_error(sock, item.idents, item.header, "MicroVMUnavailable", self.start_error)
        self._publish_status(item.header, "idle")

    # ------------------------------------------------------------------ %sm

    def _run_magic(self, item: Incoming) -> None:
        header = item.header
        code = str(item.content.get("code", ""))
        self._publish_status(header, "busy")
        self._publish("execute_input", header, {"code": code, "execution_count": self.execution_count})

        def finish(result, error) -> None:
            self.busy_with = None
            if error is None:
                if result is not None:
                    self._publish("display_data", header, {"data": result, "metadata": {}, "transient": {}})
                self.session.send(self.frontend["shell"], "execute_reply",
                                  {"status": "ok", "execution_count": self.execution_count, "user_expressions": {},
                                   "payload": []}, parent=header, ident=item.idents)
            else:
                ename = "UsageError" if isinstance(error, magics.MagicUsageError) else "SmError"
                self._publish_error(header, ename, _one_line(error))
                self._reply_error(self.frontend["shell"], item.idents, header, ename, _one_line(error))
            self._publish_status(header, "idle")
            self._drain()

        try:
            call = magics.parse(code)
            handler = getattr(self, f"_magic_{call.name}")
            self._magic_parent = header
            handler(call, finish)
        except Exception as error:  # noqa: BLE001 - shown to the user as one line
            finish(None, error)

    def _magic_help(self, call, finish) -> None:
        finish(magics.table(["command", "what it does"], [list(row) for row in magics.help_rows()],
                            "%sm magics (handled by the host, outside the VM)"), None)

    def _magic_timeout(self, call, finish) -> None:
        self.cell_timeout = call.args[0]
        finish(magics.note("cell timeout: " + (f"{self.cell_timeout:g} s" if self.cell_timeout else "off")), None)

    def _magic_list(self, call, finish) -> None:
        rows = [[e.name, str(e.cell), time.strftime("%H:%M:%S", time.localtime(e.created)),
                 magics.human_size(e.size), e.parent or "-"] for e in self.store.entries.values()]
        if not rows:
            finish(magics.note("no snapshots yet: %sm snapshot [NAME] takes one"), None)
            return
        finish(magics.table(["name", "cell", "time", "size", "diff of"], rows, "snapshots"), None)

    def _magic_status(self, call, finish) -> None:
        guest = self.guest
        rows = [["image", guest.image_name], ["isolation", "microVM (KVM)" if guest.isolated else "none (--no-vm)"],
                ["vCPUs", str(guest.cpus)], ["memory", f"{guest.memory_mib} MiB" if guest.memory_mib else "-"]]

        def work():
            balloon = guest.machine.balloon if guest.isolated else None
            return guest.agent.stats(), balloon and (balloon.actual_mib, balloon.target_mib)

        def done(result, error) -> None:
            if error is None:
                stats, balloon = result
                rows.append(["guest memory available", magics.human_size(stats.mem_available)])
                if balloon is not None:
                    rows.append(["balloon", f"{balloon[0]} MiB given back to the host "
                                            f"(target {balloon[1]} MiB; %sm balloon)"])
                    rows.append(["host RSS (VMM process)", magics.human_size(vmm_rss_bytes() or 0)])
                rows.append(["guest uptime", magics.human_duration(stats.uptime)])
            rows.append(["kernel uptime", magics.human_duration(time.time() - self.started)])
            rows.append(["guest kernel started", self.start_note])
            rows.append(["cell timeout", f"{self.cell_timeout:g} s" if self.cell_timeout else "off"])
            rows.append(["snapshots", f"{len(self.store.entries)}, {magics.human_size(self.store.total_size())}"])
            finish(magics.table(["", ""], rows, "sm status"), None)

        self.run_job("status", work, done)

    # ------------------------------------------------------------------ %sm balloon

    def _magic_balloon(self, call, finish) -> None:
        if not self.guest.isolated:
            raise magics.MagicUsageError("this kernel runs without a VM (--no-vm): it has no balloon")
        # Imported when asked for: ipywidgets takes a moment to load.
        from sm_kernel.balloon_panel import BalloonPanel

        if self.panel is None or self.panel.closed:
            self.panel = BalloonPanel(self.guest.machine.balloon, self._send_for_panel)
        self.panel.open(self._magic_parent, *call.args)
        finish(None, None)

    def _send_for_panel(self, msg_type: str, content: dict, parent: dict, metadata: dict) -> None:
        """The panel's messages go out on iopub: now on the loop's thread (before the
        reply that ends the request), through the loop from its refresh thread."""
        if threading.current_thread() is self._loop_thread:
            self._publish_for_panel(msg_type, content, parent, metadata)
        else:
            self.post("publish", msg_type, content, parent, metadata)

    def _publish_for_panel(self, msg_type: str, content: dict, parent: dict, metadata: dict) -> None:
        self.session.send(self.iopub, msg_type, content, parent=parent, metadata=metadata,
                          ident=f"kernel.sm.{msg_type}".encode())

    def _panel_message(self, item: Incoming, parts: list[bytes]) -> bool:
        """A frontend comm message for the panel's widgets: handled at once, here, even
        while a cell runs in the guest. False for everything else."""
        if self.panel is None or item.msg_type not in ("comm_msg", "comm_close"):
            return False
        content = _json(parts[4])
        if not self.panel.owns(content.get("comm_id")):
            return False
        self._publish_status(item.header, "busy")
        try:
            self.panel.handle(item.msg_type, content, item.header)
        except Exception:  # noqa: BLE001 - a bad widget message must not stop the kernel
            log.exception("the balloon panel could not handle a %s", item.msg_type)
        self._publish_status(item.header, "idle")
        return True

    def _with_panel(self, msg_type: str, parent_id: str | None, parts: list[bytes]) -> list[bytes]:
        """The guest's list of comms, or of widget states (a frontend reloading the page asks
        for them), with the panel's added: the panel lives here, not in the guest."""
        content = _json(parts[4])
        if msg_type == "comm_info_reply":
            if parent_id not in self.comm_info_targets or not isinstance(content.get("comms"), dict):
                return parts
            content["comms"].update(self.panel.comm_info(self.comm_info_targets.pop(parent_id)))
        else:
            data = content.get("data")
            if not isinstance(data, dict) or data.get("method") != "update_states":
                return parts
            self.panel.add_states(data)
        return [*parts[:4], json.dumps(content).encode(), *parts[5:]]

    def _close_panel(self) -> None:
        if self.panel is not None:
            self.panel.close()
            self.panel = None

    def _require_snapshots(self) -> None:
        if not self.guest.isolated:
            raise magics.MagicUsageError("this kernel runs without a VM (--no-vm): it has no snapshots")

    def _magic_snapshot(self, call, finish) -> None:
        self._require_snapshots()
        name = call.args[0] if call.args else self.store.new_name()
        if name in self.store.entries:
            raise magics.MagicUsageError(f"a snapshot named {name!r} exists: %sm delete {name} first, or pick "
                                         "another name")
        parent = self.snapshot_parent
        kernel, machine, cell = self.kernel, self.guest.machine, self.execution_count

        def work():
            started = time.monotonic()
            machine.snapshot(str(self.store.path(name)), diff=parent is not None)
            return time.monotonic() - started

        def done(seconds, error) -> None:
            if error is not None:
                self.busy_with = None
                self.snapshot_parent = None  # the VMM's next snapshot of this machine is a full one
                self.store.delete(name)
                finish(None, error)
                return
            self.store.add(SnapshotEntry(name=name, cell=cell, created=time.time(), size=0, parent=parent,
                                         kernel_pid=kernel.pid, kernel_key=kernel.key, kernel_ports=kernel.ports,
                                         builtin_executor=kernel.builtin))
            self.snapshot_parent = name
            size = magics.human_size(self.store.entries[name].size)
            finish(magics.note(f"snapshot {name}: cell {cell}, {size}, {seconds:.2f} s"), None)

        self.run_job("snapshot", work, done)

    def _magic_restore(self, call, finish) -> None:
        name = call.args[0]
        entry = self.store.entries.get(name)
        if entry is None:
            known = ", ".join(self.store.entries) or "none yet"
            raise magics.MagicUsageError(f"no snapshot named {name!r} (snapshots: {known})")
        self._require_snapshots()
        old_guest, old_kernel = self.guest, self.kernel
        self.ready = False
        self.link.close()
        self.link = None
        machine_class = type(old_guest.machine)

        def work():
            started = time.monotonic()
            machine = machine_class.restore(entry.path)
            old_kernel.detach()
            old_guest.stop()
            guest = VmGuest(machine, old_guest.image, old_guest.cpus, old_guest.memory_mib)
            try:
                kernel = self._new_kernel(guest)
                kernel.attach(entry.kernel_pid, entry.kernel_key, entry.kernel_ports, entry.builtin_executor)
            except BaseException:
                guest.stop()
                raise
            return guest, kernel, started

        def done(result, error) -> None:
            if error is not None:  # the old machine still runs: back to it
                self.busy_with = None
                self._connect()
                self._on_ready.append(lambda: finish(None, error))
                return
            self._close_panel()
            self.guest, self.kernel, started = result
            self.snapshot_parent = name  # a restored machine's next diff builds on its snapshot
            self.execution_count = entry.cell
            self._connect()

            def announce() -> None:
                self.busy_with = None
                finish(magics.note(f"restored {name} (cell {entry.cell}) in {time.monotonic() - started:.2f} s"),
                       None)

            self._on_ready.append(announce)

        self.run_job("restore", work, done)

    def _magic_delete(self, call, finish) -> None:
        name = call.args[0]
        if name not in self.store.entries:
            raise magics.MagicUsageError(f"no snapshot named {name!r}")
        children = self.store.children(name)
        if children:
            raise magics.MagicUsageError(f"snapshot {name!r} is the base of {', '.join(children)}: delete "
                                         f"{'that' if len(children) == 1 else 'those'} first")
        self.store.delete(name)
        if self.snapshot_parent == name:
            self.snapshot_parent = None
        finish(magics.note(f"deleted {name}"), None)


def host_kernel_info(banner: str = "sm: Python in a microVM (the microVM could not start)") -> dict:
    return {
        "status": "ok", "protocol_version": PROTOCOL_VERSION, "implementation": "sm_kernel",
        "implementation_version": "0.1.0", "banner": banner,
        "language_info": {"name": "python", "mimetype": "text/x-python", "file_extension": ".py"},
        "help_links": [],
    }


def _int(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _json(data: bytes) -> dict:
    try:
        value = json.loads(data)
    except (ValueError, TypeError):
        return {}
    return value if isinstance(value, dict) else {}


def _one_line(error: object) -> str:
    text = " ".join(str(error).split())
    return text[:400] if text else type(error).__name__


__all__ = ["GuestError", "Options", "SmKernel"]
