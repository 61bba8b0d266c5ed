"""``Machine``: one object to boot an image, run commands in it, move files, and stop it.

    from vmm import Machine
    with Machine.boot() as m:                      # the built-in default image
        print(m.exec(["python3", "-c", "print(6*7)"]).stdout)
        m.snapshot("/tmp/s1")
    with Machine.restore("/tmp/s1") as m2: ...

The guest runs our agent (vmm/guest/agent.py) on the image's own python3 as its main
process; every operation goes to it over virtio-vsock.

The first boot of an image (with a given kernel, VMM, vCPUs and memory) snapshots the
machine once its agent answers: the *warm base snapshot*. Later boots restore it
instead of booting, in milliseconds rather than seconds (``fresh=True`` boots anyway).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from vmm import hostkvm
from vmm.agent_client import (
    AGENT_PORT,
    AgentClient,
    AgentUnavailable,
    ExecResult,
    ExecStream,
    GuestStats,
)
from vmm.balloon import MemoryBalloon
from vmm.guest import agent as agent_module
from vmm.guest.cmdline import (
    DEFAULT_KERNEL_CMDLINE,
    GUEST_TOOLS_DIR,
    INIT_FAILED,
    RUN_SPEC_FILE,
    parse_exit_status,
    root_args,
)
from vmm.guest.initramfs import build_initramfs, with_files
from vmm.guest.kernel import ensure_kernel
from vmm.images.default import default_image, is_default_reference
from vmm.images.rootfs import FS_TYPE, rootfs_image
from vmm.images.run import image_run_spec
from vmm.images.store import ImageError, ImageRecord, Store
from vmm.kvm import Kvm
from vmm.microvm import Disk, MicroVm, MicroVmConfig
from vmm.paths import snapshots_dir
from vmm.snapshot import snapshot as snapshots
from vmm.snapshot.errors import SnapshotError

log = logging.getLogger(__name__)

AGENT_FILE = "sm/agent.py"           # in the initramfs; init copies sm/* to GUEST_TOOLS_DIR
CONSOLE_LIMIT = 1 << 20              # bytes of guest console kept for .console
EXIT_NO_PYTHON = 127
# Restarted if it dies (kill -9 inside the guest); an image without python3 ends at once.
AGENT_LOOP = (f"command -v python3 > /dev/null || exit {EXIT_NO_PYTHON}; "
              f"while :; do python3 -I -S {GUEST_TOOLS_DIR}/agent.py; sleep 0.2; done")
AGENT_RETRY = 0.05                   # seconds between connection attempts while booting


class MachineError(Exception):
    """The machine could not be started or has stopped; the message says why."""


def _console_log(console: Callable[[bytes], None] | None) -> tuple[bytearray, Callable[[bytes], None]]:
    """The buffer behind ``Machine.console`` and the callback that fills it."""
    kept = bytearray()

    def on_console(data: bytes) -> None:
        kept.extend(data)
        del kept[:-CONSOLE_LIMIT]
        if console:
            console(data)
    return kept, on_console


class Machine:
    """A running microVM with the agent answering. Build it with :meth:`boot`."""

    def __init__(self, vm: MicroVm, agent: AgentClient, image: ImageRecord, console: bytearray,
                 restored_from: Path | None = None):
        self._vm = vm
        self.agent = agent
        self.image = image
        self._console = console
        self.started = time.time()
        self.restored_from = restored_from
        # The snapshot the next diff is taken against: the last one taken or restored.
        self._last_snapshot = restored_from

    # ---- starting ------------------------------------------------------------------

    @classmethod
    def boot(cls, image: str | None = None, *, cpus: int = 1, memory_mib: int = 512,
             timeout: float = 300.0, console: Callable[[bytes], None] | None = None,
             vsock_uds: str | os.PathLike | None = None, fresh: bool = False) -> Self:
        """Boot ``image`` (a store reference; None = the default image) and wait, up to
        ``timeout`` seconds, until its agent answers. ``vsock_uds``: also serve the vsock
        device on this Unix socket, for other processes (docs/vsock.md). Served from the
        image's warm base snapshot when there is one, unless ``fresh``."""
        if refused := hostkvm.refusal():
            raise MachineError(refused)
        plan = _BootPlan.of(image, cpus, memory_mib)
        record, warm = plan.record, plan.warm_snapshot
        if not fresh and warm.exists():
            try:
                return cls.restore(warm, console=console, vsock_uds=vsock_uds, timeout=timeout)
            except (SnapshotError, MachineError) as error:
                log.warning("booting %s cold: its warm snapshot cannot be used (%s)", record.name, error)
        initrd = with_files(plan.initramfs, plan.extra_files)
        kept, on_console = _console_log(console)
        vm = MicroVm(MicroVmConfig(
            kernel=plan.kernel, initrd=initrd, cpus=cpus, memory_mib=memory_mib,
            cmdline=" ".join([DEFAULT_KERNEL_CMDLINE, *root_args("/dev/vda", FS_TYPE)]),
            disks=[Disk(plan.rootfs, read_only=True)], console=on_console,
            vsock_uds=Path(vsock_uds) if vsock_uds is not None else None))
        try:
            vm.start()
            agent = _wait_for_agent(vm, record, kept, time.monotonic() + timeout)
        except BaseException:
            vm.close()
            raise
        machine = cls(vm, agent, record, kept)
        if not fresh:
            machine._save_warm_snapshot(warm)
        return machine

    @classmethod
    def warm_snapshot(cls, image: str | None = None, *, cpus: int = 1,
                      memory_mib: int = 512) -> Path:
        """Where :meth:`boot` keeps (or would keep) the warm base snapshot of this machine:
        its name changes with the image, kernel, initramfs, agent, VMM, vCPUs and memory."""
        return _BootPlan.of(image, cpus, memory_mib).warm_snapshot

    @classmethod
    def restore(cls, path: str | os.PathLike, *, console: Callable[[bytes], None] | None = None,
                vsock_uds: str | os.PathLike | None = None, timeout: float = 60.0) -> Self:
        """A new running machine, exactly as the snapshot at ``path`` left it: every
        process, file in RAM and open connection inside the guest (connections to the
        host are reset). Raises SnapshotError saying why a snapshot cannot be used."""
        if refused := hostkvm.refusal():
            raise MachineError(refused)
        with Kvm() as kvm:
            saved, point = snapshots.load(path, kvm)
        machine_state = saved["machine"]
        kept, on_console = _console_log(console)
        vm = MicroVm(MicroVmConfig(
            cmdline=machine_state["cmdline"], cpus=machine_state["cpus"],
            memory_mib=machine_state["memory_mib"],
            disks=[Disk(Path(d["path"]), read_only=d["read_only"]) for d in machine_state["disks"]],
            console=on_console, vsock_uds=Path(vsock_uds) if vsock_uds is not None else None),
            restore=point)
        meta = saved.get("meta", {})
        try:
            vm.log_dirty_pages()
            vm.start()
            agent = _wait_for_agent(vm, _image_from_meta(meta), kept, time.monotonic() + timeout)
            agent.set_clock()   # the guest's wall clock stood still while it was saved
            agent.reseed()      # and every clone of the snapshot would share its CRNG
            record = _image_record(meta)   # after start: the store may be slow to read
        except BaseException:
            vm.close()
            raise
        return cls(vm, agent, record, kept, restored_from=Path(path).absolute())

    # ---- snapshots -----------------------------------------------------------------

    def snapshot(self, path: str | os.PathLike, diff: bool = False) -> snapshots.SnapshotInfo:
        """Save the whole machine into directory ``path`` and keep running. With ``diff``,
        only the pages written since the last snapshot taken or restored (its parent,
        which must stay in place). A failed snapshot leaves an earlier one at ``path``
        as it was."""
        path = Path(path).absolute()
        parent = self._last_snapshot if diff else None
        if diff and parent is None:
            raise MachineError("a diff snapshot needs a parent: take a full snapshot first")
        if parent == path:
            raise MachineError(f"a diff snapshot cannot replace its own parent {path}: "
                               "give it another path")
        try:
            info = snapshots.save(self._vm, path, parent=parent, meta=self._meta())
        except BaseException:
            self._last_snapshot = None    # the dirty log was spent: the next one is full
            raise
        self._last_snapshot = path
        return info

    def _meta(self) -> dict:
        return {"image": self.image.name, "manifest_digest": self.image.manifest_digest,
                "config_digest": self.image.config_digest}

    def _save_warm_snapshot(self, path: Path) -> None:
        """Take the image's base snapshot, unless another process is taking it."""
        with snapshots.saving_alone(path) as alone:
            if not alone or path.exists():
                return
            try:
                self.snapshot(path)
            except (SnapshotError, OSError) as error:
                log.warning("could not save the warm snapshot of %s: %s", self.image.name, error)

    # ---- using it --------------------------------------------------------------------

    def exec(self, argv: list[str], stdin: bytes | None = None, timeout: float | None = None,
             **options) -> ExecResult:
        """Run ``argv`` in the guest and wait: stdout, stderr, exit code. ``options``:
        env, cwd, user, pty (see AgentClient.exec)."""
        return self.agent.exec(argv, stdin=stdin, timeout=timeout, **options)

    def exec_stream(self, argv: list[str], **options) -> ExecStream:
        """Run ``argv`` and iterate its output chunks as they come."""
        return self.agent.exec_stream(argv, **options)

    def put(self, host_path: str | os.PathLike, guest_path: str) -> None:
        self.agent.put(host_path, guest_path)

    def get(self, guest_path: str, host_path: str | os.PathLike) -> None:
        self.agent.get(guest_path, host_path)

    def stats(self) -> GuestStats:
        return self.agent.stats()

    @property
    def vsock(self):
        """The machine's vsock device: ``connect(port)`` and ``listen(port)``."""
        return self._vm.vsock

    @property
    def balloon(self) -> MemoryBalloon:
        """The memory balloon: ``target_mib``, ``actual_mib``, ``stats()`` (docs/balloon.md)."""
        return MemoryBalloon(self._vm.balloon, self._vm.config.memory_mib)

    @property
    def console(self) -> str:
        """What the guest wrote to its serial console (the last MiB)."""
        return self._console.decode("utf-8", "replace")

    # ---- stopping --------------------------------------------------------------------

    def wait(self, timeout: float | None = None) -> str | None:
        """Wait up to ``timeout`` s for the guest to stop by itself; how it stopped
        (e.g. "poweroff", "crash: Kernel panic …"), or None while it still runs."""
        reason = self._vm.wait(timeout)
        if reason is None:
            return None
        return reason.kind.value + (f": {reason.detail}" if reason.detail else "")

    def stop(self) -> None:
        """Power the machine off and release everything it holds. Safe to call twice."""
        self.agent.close()
        self._vm.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _identity(path: Path) -> str:
    stat = path.stat()
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


@dataclass(frozen=True)
class _BootPlan:
    """What booting an image takes: found, fetched or built (and cached) on the way."""

    record: ImageRecord
    rootfs: Path
    kernel: Path
    initramfs: Path                 # without extra_files, which are appended per boot
    extra_files: dict[str, bytes]
    warm_snapshot: Path

    @classmethod
    def of(cls, image: str | None, cpus: int, memory_mib: int) -> _BootPlan:
        store = Store()
        record = default_image(store) if is_default_reference(image) else store.resolve(image)
        rootfs = rootfs_image(store, record)
        kernel = ensure_kernel()
        spec = image_run_spec(record.config, ["/.sm/busybox", "sh", "-c", AGENT_LOOP],
                              entrypoint="", workdir="/", user="0:0")
        extra_files = {RUN_SPEC_FILE: spec.to_shell(),
                       AGENT_FILE: Path(agent_module.__file__).read_bytes()}
        initramfs = build_initramfs(kernel)
        # A new image, kernel, initramfs, agent or VMM gives a new warm snapshot.
        key = hashlib.sha256()
        for part in (record.manifest_digest, _identity(rootfs), _identity(kernel.vmlinuz),
                     _identity(initramfs), snapshots.vmm_version(), f"{cpus}:{memory_mib}"):
            key.update(part.encode() + b"\0")
        for name in sorted(extra_files):
            key.update(name.encode() + b"\0" + extra_files[name] + b"\0")
        return cls(record, rootfs, kernel.vmlinuz, initramfs, extra_files,
                   snapshots_dir() / "base" / key.hexdigest()[:20])


def _image_from_meta(meta: dict) -> ImageRecord:
    """The image a snapshot was taken of, as far as the snapshot says (no config)."""
    return ImageRecord(meta.get("image", "unknown"), meta.get("manifest_digest", ""),
                       meta.get("config_digest", ""), {}, [], 0, "")


def _image_record(meta: dict) -> ImageRecord:
    """The image a snapshot was taken of, from the store if it is still there."""
    try:
        record = Store().resolve(meta.get("image", "unknown"))
        if record.manifest_digest == meta.get("manifest_digest"):
            return record
    except ImageError:   # removed or unreadable: describe it from the snapshot
        pass
    return _image_from_meta(meta)


def _wait_for_agent(vm: MicroVm, record: ImageRecord, log: bytearray,
                    deadline: float) -> AgentClient:
    """Connect to the agent as soon as it listens; fail with the reason if the guest stops."""
    agent = AgentClient(lambda: vm.vsock.connect(AGENT_PORT, timeout=1.0))
    while True:
        try:
            agent.hello()
            return agent
        except AgentUnavailable:
            pass
        reason = vm.wait(AGENT_RETRY)
        if reason is not None:
            raise MachineError(_why_no_agent(record, reason, bytes(log)))
        if time.monotonic() > deadline:
            last = bytes(log).decode("utf-8", "replace").strip().splitlines()[-1:] or ["nothing"]
            raise MachineError(f"the agent in {record.name} did not answer in time (the guest "
                               f"console last said: {last[0]!r})")


def _why_no_agent(record: ImageRecord, reason, console: bytes) -> str:
    text = console.decode("utf-8", "replace")
    if INIT_FAILED in text:
        return f"the guest could not start {record.name}: " + \
            text[text.rfind(INIT_FAILED) + len(INIT_FAILED):].splitlines()[0].strip()
    if parse_exit_status(console) == EXIT_NO_PYTHON:
        return (f"{record.name} has no python3, so the agent cannot run in it: use "
                "`sm run IMAGE -- CMD`, which needs no agent")
    return f"the guest stopped before its agent answered ({reason.kind.value} {reason.detail})"

