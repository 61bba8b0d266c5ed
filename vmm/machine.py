"""``Machine``: one object to boot an image, run commands in it, move files, and stop it.

    from vmm import Machine
    with Machine.boot() as m:                      # the built-in default image
        print(m.exec(["python3", "-c", "print(6*7)"]).stdout)

The guest runs our agent (vmm/guest/agent.py) on the image's own python3 as its main
process; every operation goes to it over virtio-vsock.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
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
from vmm.images.store import ImageRecord, Store
from vmm.microvm import Disk, MicroVm, MicroVmConfig

AGENT_FILE = "sm/agent.py"           # in the initramfs; init copies sm/* to GUEST_TOOLS_DIR
CONSOLE_LIMIT = 1 << 20              # bytes of guest console kept for .console
EXIT_NO_PYTHON = 127
# Restarted if it dies (kill -9 inside the guest); an image without python3 ends at once.
AGENT_LOOP = (f"command -v python3 > /dev/null || exit {EXIT_NO_PYTHON}; "
              f"while :; do python3 -I -S {GUEST_TOOLS_DIR}/agent.py; sleep 0.2; done")
AGENT_RETRY = 0.05                   # seconds between connection attempts while booting


class MachineError(Exception):
    """The machine could not be started or has stopped; the message says why."""


class Machine:
    """A running microVM with the agent answering. Build it with :meth:`boot`."""

    def __init__(self, vm: MicroVm, agent: AgentClient, image: ImageRecord, console: bytearray):
        self._vm = vm
        self.agent = agent
        self.image = image
        self._console = console
        self.started = time.time()

    # ---- starting ------------------------------------------------------------------

    @classmethod
    def boot(cls, image: str | None = None, *, cpus: int = 1, memory_mib: int = 512,
             timeout: float = 300.0, console: Callable[[bytes], None] | None = None) -> Self:
        """Boot ``image`` (a store reference; None = the default image) and wait, up to
        ``timeout`` seconds, until its agent answers."""
        if refused := hostkvm.refusal():
            raise MachineError(refused)
        store = Store()
        record = default_image(store) if is_default_reference(image) else store.resolve(image)
        rootfs = rootfs_image(store, record)
        kernel = ensure_kernel()
        spec = image_run_spec(record.config, ["/.sm/busybox", "sh", "-c", AGENT_LOOP],
                              entrypoint="", workdir="/", user="0:0")
        initrd = with_files(build_initramfs(kernel), {
            RUN_SPEC_FILE: spec.to_shell(),
            AGENT_FILE: Path(agent_module.__file__).read_bytes(),
        })
        log = bytearray()

        def on_console(data: bytes) -> None:
            log.extend(data)
            del log[:-CONSOLE_LIMIT]
            if console:
                console(data)

        vm = MicroVm(MicroVmConfig(
            kernel=kernel.vmlinuz, initrd=initrd, cpus=cpus, memory_mib=memory_mib,
            cmdline=" ".join([DEFAULT_KERNEL_CMDLINE, *root_args("/dev/vda", FS_TYPE)]),
            disks=[Disk(rootfs, read_only=True)], console=on_console))
        try:
            vm.start()
            agent = _wait_for_agent(vm, record, log, time.monotonic() + timeout)
        except BaseException:
            vm.close()
            raise
        return cls(vm, agent, record, log)

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
    def console(self) -> str:
        """What the guest wrote to its serial console (the last MiB)."""
        return self._console.decode("utf-8", "replace")

    # ---- stopping --------------------------------------------------------------------

    def stop(self) -> None:
        """Power the machine off and release everything it holds. Safe to call twice."""
        self.agent.close()
        self._vm.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


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

