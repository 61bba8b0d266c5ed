"""The guest's initramfs: static busybox, sm's ``/init``, and the kernel modules it loads.

Layout inside the archive::

    /init                         share/guest/init (busybox sh, PID 1)
    /bin/busybox                  the host's busybox-static, plus a symlink per applet
    /dev/console, /dev/null       so PID 1 has a console before devtmpfs is mounted
    /lib/modules/<name>.ko        flat, decompressed
    /lib/modules/load-order       module names, one a line, each after its dependencies
    /proc /sys /tmp /run /mnt /root /etc

The archive is built in memory (a few MB) and cached by the sha256 of its bytes
as ``$SM_HOME/initramfs/<sha256>.cpio``; ``by-input/<key>`` names the archive
built from a set of inputs, so a boot finds it without building it again.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from vmm.guest.cpio import CpioWriter, gzip_bytes
from vmm.guest.elf import EM_X86_64, Elf64, ElfError
from vmm.guest.kernel import GuestKernel
from vmm.guest.modules import GUEST_MODULES, ModuleTree, read_module
from vmm.paths import share_dir, sm_home

MODULES_DIR = "lib/modules"
LOAD_ORDER_FILE = "lib/modules/load-order"
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox", "/usr/local/bin/busybox")
_DIRS = ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run", "mnt", "root",
         "etc", MODULES_DIR)


class InitramfsError(Exception):
    """The initramfs cannot be built (no static busybox, missing init, bad extra file)."""


def init_script() -> Path:
    return share_dir() / "guest" / "init"


def find_busybox() -> Path:
    """A statically linked x86-64 busybox: ``$SM_BUSYBOX`` or the host's busybox-static."""
    override = os.environ.get("SM_BUSYBOX")
    candidates = [override] if override else [shutil.which("busybox"), *BUSYBOX_CANDIDATES]
    path = next((Path(c) for c in candidates if c and Path(c).is_file()), None)
    if path is None:
        raise InitramfsError("no busybox found: install busybox-static (apt-get install busybox-static)")
    try:
        elf = Elf64(path.read_bytes())
        static = not elf.has_interpreter()
    except ElfError as exc:
        raise InitramfsError(f"{path} is not a busybox binary: {exc}") from exc
    if elf.machine != EM_X86_64:
        raise InitramfsError(f"{path} is not an x86-64 binary")
    if not static:
        raise InitramfsError(f"{path} is dynamically linked: install busybox-static "
                             "(apt-get install busybox-static)")
    return path


def busybox_applets(busybox: Path) -> list[str]:
    """Install paths of the applets (``bin/sh``, ``sbin/insmod``...), from ``busybox --list-full``."""
    try:
        listing = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True,
                                 check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise InitramfsError(f"cannot list the applets of {busybox}: {exc}") from exc
    return sorted({line.strip().lstrip("/") for line in listing.splitlines()
                   if "/" in line.strip().lstrip("/")})


def build_initramfs(kernel: GuestKernel, extra_files: Mapping[str, bytes | Path] | None = None,
                    modules: Sequence[str] = GUEST_MODULES, *, compress: bool = False,
                    busybox: Path | None = None, cache: Path | None = None) -> Path:
    """Build (or find cached) the initramfs for ``kernel``; return its path.

    ``extra_files`` maps archive paths to contents (bytes, mode 0644) or host
    files (keeping their permission bits). ``modules`` are loaded with their
    dependencies; those built into the kernel are skipped.
    """
    extra_files = extra_files or {}
    busybox = busybox or find_busybox()
    cache = cache or sm_home() / "initramfs"
    # Every boot asks for its initramfs: find it by a key of the inputs before paying
    # for reading every module and running busybox to build the bytes again.
    index = cache / "by-input" / _input_key(kernel, extra_files, modules, busybox, compress)
    try:
        path = cache / index.read_text()
        if path.is_file():
            return path
    except FileNotFoundError:
        pass
    data = initramfs_bytes(kernel, extra_files, modules, busybox)
    if compress:
        data = gzip_bytes(data)
    path = cache / f"{hashlib.sha256(data).hexdigest()}.cpio{'.gz' if compress else ''}"
    if not path.is_file():
        _write_atomically(path, data)   # a concurrent builder writes the same bytes
    _write_atomically(index, path.name.encode())
    return path


def with_files(base: Path, files: Mapping[str, bytes]) -> bytes:
    """The archive at ``base`` with ``files`` appended as a second newc archive: the kernel
    unpacks both, and per-boot files (a run spec, say) never enter the cache."""
    extra = io.BytesIO()
    with CpioWriter(extra) as cpio:
        for name in sorted(files):
            cpio.add_file(name, files[name])
    return base.read_bytes() + extra.getvalue()


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".tmp-", delete=False) as tmp:
        tmp.write(data)
    os.replace(tmp.name, path)


def _input_key(kernel: GuestKernel, extra_files: Mapping[str, bytes | Path],
               modules: Sequence[str], busybox: Path, compress: bool) -> str:
    """A hash of what the archive is made of: contents of the small inputs, identity
    (size, mtime) of the large ones."""
    digest = hashlib.sha256()

    def identity(path: Path) -> None:
        stat = path.stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())

    digest.update(init_script().read_bytes())
    identity(busybox)
    identity(kernel.vmlinuz)
    if kernel.modules_dir:
        identity(kernel.modules_dir)
    digest.update(f"{kernel.version}\0{','.join(modules)}\0{compress}\0".encode())
    for name in sorted(extra_files):
        content = extra_files[name]
        digest.update(name.encode() + b"\0")
        if isinstance(content, Path):
            identity(content)
        else:
            digest.update(hashlib.sha256(content).digest())
    return digest.hexdigest()


def initramfs_bytes(kernel: GuestKernel, extra_files: Mapping[str, bytes | Path],
                    modules: Sequence[str], busybox: Path) -> bytes:
    """The uncompressed newc archive."""
    init = init_script()
    if not init.is_file():
        raise InitramfsError(f"guest init script {init} is missing")
    order = ModuleTree(kernel.modules_dir).load_order(modules) if kernel.modules_dir and modules else []

    out = io.BytesIO()
    with CpioWriter(out) as cpio:
        for directory in _DIRS:
            cpio.add_dir(directory, mode=0o1777 if directory == "tmp" else 0o755)
        cpio.add_device("dev/console", "c", 5, 1, mode=0o600)
        cpio.add_device("dev/null", "c", 1, 3, mode=0o666)
        cpio.add_file("bin/busybox", busybox.read_bytes(), mode=0o755)
        for applet in busybox_applets(busybox):
            if applet not in cpio:
                cpio.add_symlink(applet, "/bin/busybox")
        cpio.add_file("init", init.read_bytes(), mode=0o755)
        for module in order:
            cpio.add_file(f"{MODULES_DIR}/{module.name}.ko", read_module(module.path))
        cpio.add_file(LOAD_ORDER_FILE, "".join(f"{m.name}\n" for m in order).encode())
        for name in sorted(extra_files):
            content = extra_files[name]
            if name.strip("/") in cpio:
                raise InitramfsError(f"extra file {name} would replace a file of the initramfs")
            if isinstance(content, Path):
                cpio.add_file(name, content.read_bytes(), mode=content.stat().st_mode & 0o7777)
            else:
                cpio.add_file(name, bytes(content))
    return out.getvalue()
