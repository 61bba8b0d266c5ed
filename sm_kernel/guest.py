"""Where the cells run: a microVM (``VmGuest``), or, for developing and testing the relay
only, this host through the same agent (``LocalGuest``, no isolation at all); and the
guest's kernel process (``GuestKernel``), started and watched through the agent."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

from sm_kernel import executor as executor_module
from sm_kernel import supervisor as supervisor_module
from sm_kernel.forward import write_connection_file
from vmm.agent_client import AgentClient, AgentError, ExecStream
from vmm.guest import agent as agent_module

CHANNELS = ("shell", "iopub", "stdin", "control", "hb")
# Fixed ports on the guest's loopback: the guest is ours alone.
GUEST_PORTS = {"shell": 5601, "iopub": 5602, "stdin": 5603, "control": 5604, "hb": 5605}
GUEST_WORKDIR = "/tmp/sm-kernel"
KERNEL_READY_TIMEOUT = 300.0
# Exit status of the check below when the guest's python3 has no ipykernel.
NO_IPYKERNEL = 3
HAS_IPYKERNEL = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('ipykernel') else {NO_IPYKERNEL})"


class GuestError(Exception):
    """The guest or its kernel process could not be started or reached; one line."""


def vmm_rss_bytes() -> int | None:
    """This process's resident set (the VMM runs in the kernel process), or None."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class VmGuest:
    """One microVM (vmm.Machine)."""

    isolated = True
    workdir = GUEST_WORKDIR

    def __init__(self, machine, image: str | None, cpus: int, memory_mib: int):
        self.machine = machine
        self.image = image
        self.cpus = cpus
        self.memory_mib = memory_mib

    @classmethod
    def boot(cls, image: str | None, cpus: int, memory_mib: int) -> VmGuest:
        from vmm.machine import Machine, MachineError
        try:
            machine = Machine.boot(image, cpus=cpus, memory_mib=memory_mib)
        except MachineError as error:
            raise GuestError(f"the microVM could not start: {error}") from None
        return cls(machine, image, cpus, memory_mib)

    @classmethod
    def restore(cls, path, image: str | None, cpus: int, memory_mib: int) -> VmGuest:
        from vmm.machine import Machine, MachineError
        from vmm.snapshot.errors import SnapshotError
        try:
            machine = Machine.restore(path)
        except (MachineError, SnapshotError) as error:
            raise GuestError(f"the microVM could not be restored: {error}") from None
        return cls(machine, image, cpus, memory_mib)

    @property
    def agent(self) -> AgentClient:
        return self.machine.agent

    @property
    def image_name(self) -> str:
        return self.machine.image.name

    @property
    def restored_from(self):
        """The snapshot the machine came from (the image's warm base after a boot), or None."""
        return self.machine.restored_from

    def connect_agent(self) -> socket.socket:
        return self.machine.vsock.connect(agent_module.AGENT_PORT)

    def ports(self) -> dict[str, int]:
        return dict(GUEST_PORTS)

    def python(self) -> str:
        return "python3"

    def stopped(self) -> str | None:
        """Why the machine stopped, or None while it runs."""
        try:
            return self.machine.wait(0)
        except Exception as error:  # noqa: BLE001 - a vCPU that would not stop: it stopped all the same
            return f"{type(error).__name__}: {error}"

    def stop(self) -> None:
        self.machine.stop()


class LocalGuest:
    """The agent on this host, over a Unix socket: the relay without a VM, for tests."""

    isolated = False
    image_name = "local (no VM)"
    cpus = os.cpu_count() or 1
    memory_mib = 0

    def __init__(self):
        self.workdir = tempfile.mkdtemp(prefix="sm-local-guest-")
        self._socket_path = os.path.join(self.workdir, "agent.sock")
        self._process = subprocess.Popen(
            [sys.executable, agent_module.__file__, "--unix", self._socket_path],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not os.path.exists(self._socket_path):
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise GuestError("the local agent did not start")
            time.sleep(0.02)
        self.agent = AgentClient(self.connect_agent)

    def connect_agent(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self._socket_path)
        return sock

    def ports(self) -> dict[str, int]:
        ports = {}
        holders = []
        for name in CHANNELS:
            holder = socket.socket()
            holder.bind(("127.0.0.1", 0))
            holders.append(holder)
            ports[name] = holder.getsockname()[1]
        for holder in holders:
            holder.close()
        return ports

    def python(self) -> str:
        return sys.executable

    @staticmethod
    def kill_process(pid: int | None) -> None:
        """The kernel runs in a session of its own: it would outlive the agent."""
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stopped(self) -> str | None:
        code = self._process.poll()
        return None if code is None else f"the local agent exited ({code})"

    def stop(self) -> None:
        self.agent.close()
        self._process.kill()
        self._process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


class GuestKernel:
    """The ipykernel process inside the guest, run by sm_kernel/supervisor.py.

    ``on_exit(reason)`` is called from a reader thread when the process ends or the
    supervisor's connection is lost (the VM stopped, or a restore cut it).
    """

    def __init__(self, guest, on_exit: Callable[[str], None]):
        self.guest = guest
        self.key = secrets.token_hex(32)
        self.ports = guest.ports()
        self.pid: int | None = None
        self.builtin = False  # the built-in executor (sm_kernel/executor.py) instead of ipykernel
        self._on_exit = on_exit
        self._stream: ExecStream | None = None
        self._lines: list[dict] = []
        self._cond = threading.Condition()
        self._detached = False

    def launch(self, builtin: bool | None = None) -> None:
        """Start a fresh kernel and wait until its ports accept connections: ipykernel, or
        the built-in executor when ``builtin`` (None: when the guest has no ipykernel)."""
        workdir = self.guest.workdir
        python = self.guest.python()
        if builtin is None:
            try:
                check = self.guest.agent.exec([python, "-I", "-c", HAS_IPYKERNEL], timeout=120)
            except AgentError as error:
                raise GuestError(f"cannot run {python} in the guest: {error}") from None
            builtin = check.exit_code == NO_IPYKERNEL
            if check.exit_code not in (0, NO_IPYKERNEL):
                raise GuestError(f"the guest's {python} does not run (exit status {check.exit_code})")
        self.builtin = builtin
        with tempfile.TemporaryDirectory() as staging:
            os.chmod(staging, 0o700)
            write_connection_file(os.path.join(staging, "kernel.json"), self.ports, self.key)
            for module in (supervisor_module, executor_module):
                shutil.copy(module.__file__, os.path.join(staging, os.path.basename(module.__file__)))
            try:
                self.guest.agent.put(staging, workdir)
            except AgentError as error:
                raise GuestError(f"cannot copy the kernel's files into the guest: {error}") from None
        command = [python, "-I", f"{workdir}/executor.py", str(self.ports["shell"])] if builtin else \
            [python, "-m", "ipykernel_launcher", "-f", f"{workdir}/kernel.json"]
        self._start([python, "-I", f"{workdir}/supervisor.py", "launch", f"{workdir}/kernel.log",
                     str(self.ports["shell"]), "--", *command])

    def attach(self, pid: int, key: str, ports: dict[str, int], builtin: bool) -> None:
        """Watch a kernel already running (in a restored guest)."""
        self.key, self.ports, self.builtin = key, ports, builtin
        self._start([self.guest.python(), "-I", f"{self.guest.workdir}/supervisor.py", "attach",
                     str(pid), str(ports["shell"])])

    def _start(self, argv: list[str]) -> None:
        try:
            self._stream = self.guest.agent.exec_stream(argv)
        except AgentError as error:
            raise GuestError(f"cannot start the kernel in the guest: {error}") from None
        threading.Thread(target=self._read, name="guest-kernel", daemon=True).start()
        first = self._wait_line(lambda m: "pid" in m or "exited" in m, 60.0)
        if "exited" in first:
            raise GuestError("the kernel process in the guest could not start: " + self._log_tail())
        self.pid = first["pid"]
        ready = self._wait_line(lambda m: "ready" in m or "exited" in m, KERNEL_READY_TIMEOUT)
        if "exited" in ready:
            raise GuestError("the kernel process in the guest exited at start: " + self._log_tail())

    def _wait_line(self, wanted, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for message in self._lines:
                    if wanted(message):
                        return message
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GuestError(f"the kernel in the guest did not start within {timeout:g} s")
                self._cond.wait(remaining)

    def _read(self) -> None:
        buffer = b""
        reason = "the supervisor of the guest's kernel ended"
        try:
            for chunk in self._stream:
                if chunk.stream != "stdout":
                    continue
                buffer += chunk.data
                if len(buffer) > 65536:
                    raise GuestError("the guest's kernel supervisor sent an overlong line")
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    message = _parse_line(line)
                    with self._cond:
                        self._lines.append(message)
                        self._cond.notify_all()
                    if "exited" in message:
                        reason = _exit_reason(message)
        except (AgentError, GuestError) as error:
            reason = f"the connection to the guest was lost ({error})"
        with self._cond:
            self._lines.append({"exited": True})
            self._cond.notify_all()
        if not self._detached:
            self._on_exit(reason)

    def _log_tail(self) -> str:
        try:
            result = self.guest.agent.exec(["tail", "-n", "3", f"{self.guest.workdir}/kernel.log"], timeout=10)
            text = result.stdout.decode("utf-8", "replace").strip().replace("\n", " | ")
        except AgentError:
            text = ""
        return text[-300:] or "no output"

    def signal(self, name: str) -> None:
        """INT, TERM or KILL to the kernel process; dropped if the supervisor is gone."""
        if self._stream is not None:
            try:
                self._stream.write(name.encode() + b"\n")
            except (AgentError, OSError, ValueError):
                pass

    def detach(self) -> None:
        """Stop watching (the kernel keeps running); on_exit is not called."""
        self._detached = True
        if self._stream is not None:
            try:
                self._stream.close_stdin()
            except (AgentError, OSError, ValueError):
                pass

    def kill(self, wait: float = 0.0) -> None:
        """SIGKILL the kernel; with ``wait``, up to that many seconds until it is gone (its
        ports are free for the next one)."""
        self._detached = True
        self.signal("KILL")
        if wait:
            try:
                self._wait_line(lambda m: "exited" in m, wait)
            except GuestError:
                pass


def _parse_line(line: bytes) -> dict:
    try:
        message = json.loads(line)
    except ValueError:
        return {}
    if not isinstance(message, dict):
        return {}
    if "pid" in message and (not isinstance(message["pid"], int) or isinstance(message["pid"], bool)):
        return {}
    return message


def _exit_reason(message: dict) -> str:
    signum = message.get("signal")
    if isinstance(signum, int) and not isinstance(signum, bool):
        return f"the Python process in the guest was killed by signal {signum}"
    code = message.get("code")
    if isinstance(code, int) and not isinstance(code, bool):
        return f"the Python process in the guest exited with status {code}"
    return "the Python process in the guest ended"

