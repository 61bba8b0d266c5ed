"""The kernel's warm snapshot: a microVM whose guest kernel (ipykernel, or the built-in
executor) has started and sits idle, saved by the first start on a machine and restored
by every later one. A start then costs a restore, not a boot plus ipykernel's start-up in
the guest (seconds on hardware, a minute under emulation).

It lives under ``$SM_SNAPSHOTS/kernel/<key>``, the key covering the machine's own warm
snapshot (image, guest kernel, agent, VMM, vCPUs, memory) and the files this package puts
in the guest, with ``sm-kernel.json`` beside the VMM's files: the guest kernel's pid,
connection key and ports, written last (a snapshot without it is not used).

Every kernel started from one warm snapshot shares what its guest kernel process drew at
start: the connection key (it only guards ports on the guest's own loopback, behind the
VMM), the session id and Python's string hash seed. The guest's CRNG is reseeded on every
restore (vmm.Machine.restore), and the relay reseeds Python's ``random`` before the first
cell (SmKernel._send_probe), so random numbers differ between kernels. Old warm snapshots
are not removed when their key changes (as with the machines' own): `rm -r` them at will.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from sm_kernel import executor as executor_module
from sm_kernel import supervisor as supervisor_module
from sm_kernel.guest import GUEST_PORTS, GUEST_WORKDIR, GuestKernel, VmGuest
from vmm.paths import snapshots_dir
from vmm.snapshot.snapshot import saving_alone

log = logging.getLogger("sm_kernel")

KERNEL_FILE = "sm-kernel.json"


@dataclass(frozen=True)
class WarmKernel:
    """The guest kernel process inside a warm snapshot."""

    pid: int
    key: str
    ports: dict[str, int]
    builtin: bool


def snapshot_path(machine_snapshot: Path, builtin: bool | None) -> Path:
    """Where the warm kernel snapshot for this machine and kernel choice lives."""
    key = hashlib.sha256()
    for part in (machine_snapshot.name, repr(builtin), GUEST_WORKDIR, json.dumps(GUEST_PORTS)):
        key.update(part.encode() + b"\0")
    for module in (supervisor_module, executor_module):
        key.update(Path(module.__file__).read_bytes() + b"\0")
    return snapshots_dir() / "kernel" / key.hexdigest()[:20]


def load(path: Path) -> WarmKernel | None:
    """The warm kernel saved at ``path``, or None if there is none (or only part of one)."""
    try:
        saved = json.loads((path / KERNEL_FILE).read_text())
        return WarmKernel(int(saved["pid"]), str(saved["key"]),
                          {str(name): int(port) for name, port in saved["ports"].items()},
                          bool(saved["builtin"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        log.warning("ignoring the warm kernel snapshot %s: %s", path, error)
        return None


def save(guest: VmGuest, kernel: GuestKernel, path: Path) -> None:
    """Snapshot ``guest`` with ``kernel`` idle in it, unless another start is doing so or
    did; a failure is logged, never raised: the running kernel is unaffected."""
    with saving_alone(path) as alone:
        if not alone or load(path) is not None:
            return
        try:
            if path.exists():       # an earlier save died before its kernel file
                shutil.rmtree(path)
            guest.machine.snapshot(path)
            staged = path / f".{KERNEL_FILE}.tmp"
            staged.write_text(json.dumps(asdict(WarmKernel(kernel.pid, kernel.key, kernel.ports,
                                                           kernel.builtin))))
            os.replace(staged, path / KERNEL_FILE)
        except Exception as error:  # noqa: BLE001 - the kernel in hand works; only the speed-up is lost
            log.warning("could not save the warm kernel snapshot %s: %s", path, error)
