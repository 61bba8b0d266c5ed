"""The guest kernel: Debian's cloud kernel, fetched once and cached, or the user's own.

Cache layout (``$SM_HOME/kernels/``)::

    .lock                         flock'ed while a fetch runs
    current                       the release name of the kernel to boot
    <release>/vmlinuz             e.g. release 6.1.0-50-cloud-amd64
    <release>/config              the kernel's build configuration
    <release>/modules/            the package's lib/modules/<release>/ tree, pruned to the
                                  modules the guest may load (+ modules.builtin, modules.order)
    <release>/source.json         package, version, sha256, mirror, how InRelease was checked

A fetch builds ``.stage-<release>-<pid>/`` and renames it into place, so a
``<release>/`` directory is always complete.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from vmm.guest.modules import (
    GUEST_MODULES,
    MODULE_SUFFIXES,
    OPTIONAL_MODULES,
    ModuleError,
    ModuleTree,
)
from vmm.paths import sm_home

if TYPE_CHECKING:   # the fetch code (urllib, lzma) is imported only when a fetch runs
    from vmm.guest.debian import DebianMirror, Package

DEFAULT_SUITE = "bookworm"
META_PACKAGE = "linux-image-cloud-amd64"
_RELEASE_RE = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+_-]*")


class KernelError(Exception):
    """No usable guest kernel: a fetch failed, or a given kernel file is missing."""


@dataclass(frozen=True)
class GuestKernel:
    vmlinuz: Path
    modules_dir: Path | None   # a tree of .ko files; None when the kernel needs no modules
    version: str               # the kernel release (``uname -r``), or "custom"


def kernels_dir() -> Path:
    return sm_home() / "kernels"


def ensure_kernel(kernel: str | Path | None = None, modules_dir: str | Path | None = None,
                  *, update: bool = False) -> GuestKernel:
    """The kernel to boot: ``kernel`` (or ``$SM_KERNEL``) if given, else Debian's cached one.

    The Debian kernel is downloaded only when none is cached, or when ``update``
    asks to look for a newer one.
    """
    kernel = kernel or os.environ.get("SM_KERNEL")
    if kernel:
        return user_kernel(Path(kernel), modules_dir or os.environ.get("SM_KERNEL_MODULES"))
    if not update and (cached := cached_kernel()) is not None:
        return cached
    return fetch_kernel()


def user_kernel(vmlinuz: Path, modules_dir: str | Path | None) -> GuestKernel:
    if not vmlinuz.is_file():
        raise KernelError(f"kernel {vmlinuz} does not exist")
    modules = Path(modules_dir) if modules_dir else None
    if modules is not None and not modules.is_dir():
        raise KernelError(f"kernel modules directory {modules} does not exist")
    return GuestKernel(vmlinuz, modules, bzimage_release(vmlinuz) or "custom")


def cached_kernel(cache: Path | None = None) -> GuestKernel | None:
    """The kernel ``current`` names, if it is in the cache."""
    cache = cache or kernels_dir()
    try:
        release = (cache / "current").read_text().strip()
    except FileNotFoundError:
        return None
    return _cached(cache, release)


def _cached(cache: Path, release: str) -> GuestKernel | None:
    if not _RELEASE_RE.fullmatch(release):
        return None
    directory = cache / release
    if not (directory / "vmlinuz").is_file():
        return None
    return GuestKernel(directory / "vmlinuz", directory / "modules", release)


def fetch_kernel(*, suite: str | None = None, mirror: str | None = None,
                 verify_signature: bool = True, cache: Path | None = None) -> GuestKernel:
    """Resolve ``linux-image-cloud-amd64`` in the suite, download, verify and cache it.

    Safe to run from several processes at once: one fetches, the others wait on
    the lock and then find it cached.
    """
    from vmm.guest.debian import DebianMirror, default_keyring, mirror_url

    started = time.monotonic()
    cache = cache or kernels_dir()
    suite = suite or os.environ.get("SM_DEBIAN_SUITE") or DEFAULT_SUITE
    keyring = default_keyring() if verify_signature else None
    archive = DebianMirror(suite, mirror or mirror_url(), keyring)
    image = select_image(archive.packages(archive.release()))
    release = image.name.removeprefix("linux-image-")
    if not _RELEASE_RE.fullmatch(release):
        raise KernelError(f"unexpected kernel package name {image.name}")
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / ".lock"):
        if _cached(cache, release) is None:
            _install(archive, image, release, cache)
        _write_atomically(cache / "current", release + "\n")
    directory = cache / release
    print(f"sm: guest kernel {release} ({image.version}) ready in {time.monotonic() - started:.1f} s",
          file=sys.stderr)
    return GuestKernel(directory / "vmlinuz", directory / "modules", release)


def select_image(packages: list[Package], meta: str = META_PACKAGE) -> Package:
    """The ``linux-image-<release>`` package that the meta-package depends on."""
    metas = [p for p in packages if p.name == meta]
    if len(metas) != 1:
        raise KernelError(f"expected one {meta} in the index, found {len(metas)}")
    for alternative in (a.split("|")[0].strip() for a in metas[0].depends.split(",")):
        match = re.fullmatch(r"(linux-image-\S+)\s*(?:\(\s*=\s*([^)\s]+)\s*\))?", alternative)
        if match:
            name, version = match.groups()
            break
    else:
        raise KernelError(f"{meta} does not depend on a linux-image package: {metas[0].depends!r}")
    for package in packages:
        if package.name == name and version in (None, package.version):
            return package
    raise KernelError(f"{meta} depends on {name} {version or ''}, which is not in the index")


def _install(archive: DebianMirror, image: Package, release: str, cache: Path) -> None:
    for stale in cache.glob(".stage-*"):       # left by a fetch that died; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    stage = cache / f".stage-{release}-{os.getpid()}"
    stage.mkdir()
    try:
        deb = stage / "package.deb"
        with deb.open("wb") as out:
            archive.download_package(image, out)
        extract_kernel(deb, release, stage)
        deb.unlink()
        (stage / "source.json").write_text(json.dumps({
            "package": image.name, "version": image.version, "sha256": image.sha256,
            "mirror": archive.base, "suite": archive.suite,
            "inrelease": "gpgv" if archive.keyring else "hashes only",
        }, indent=2) + "\n")
        os.rename(stage, cache / release)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def extract_kernel(deb: Path, release: str, dest: Path) -> None:
    """Unpack vmlinuz, config and the modules of ``release`` from a kernel .deb into ``dest``."""
    from vmm.guest.debian import iter_ar

    with deb.open("rb") as f:
        data = next((d for name, d in iter_ar(f) if name.startswith("data.tar")), None)
    if data is None:
        raise KernelError(f"{deb.name} has no data.tar member")
    wanted = {f"boot/vmlinuz-{release}": dest / "vmlinuz", f"boot/config-{release}": dest / "config"}
    module_re = re.compile(rf"(?:usr/)?lib/modules/{re.escape(release)}/([\w./+-]+)")
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                target = wanted.get(name)
                match = module_re.fullmatch(name)
                if target is None and match and ".." not in match[1].split("/") and (
                        match[1].endswith(MODULE_SUFFIXES) or match[1] in ("modules.builtin", "modules.order")):
                    target = dest / "modules" / match[1]
                if target is None or not member.isfile():
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, target.open("wb") as out:
                    shutil.copyfileobj(src, out)
    except tarfile.TarError as exc:
        raise KernelError(f"{deb.name}: cannot read its data archive: {exc}") from exc
    if not (dest / "vmlinuz").is_file():
        raise KernelError(f"{deb.name} has no boot/vmlinuz-{release}")
    prune_modules(dest / "modules")


def prune_modules(modules_dir: Path) -> None:
    """Keep only the modules the guest may load (and their dependencies)."""
    tree = ModuleTree(modules_dir)
    keep = {module.path for module in tree.load_order(GUEST_MODULES)}
    for name in OPTIONAL_MODULES:
        try:
            keep.update(module.path for module in tree.load_order([name]))
        except ModuleError:
            pass   # an optional module this kernel does not have
    for path in sorted(modules_dir.rglob("*"), reverse=True):   # children before parents
        if path.is_file() and path.name.endswith(MODULE_SUFFIXES) and path not in keep:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def bzimage_release(vmlinuz: Path) -> str | None:
    """The release a bzImage names in its setup header (``kernel_version``), if any."""
    with vmlinuz.open("rb") as f:
        head = f.read(0x10000)
    if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
        return None
    pointer = int.from_bytes(head[0x20E:0x210], "little")
    if not pointer:
        return None
    text = head[pointer + 0x200:pointer + 0x300].split(b"\0")[0].decode("ascii", "replace")
    release = text.split(" ")[0]
    return release if _RELEASE_RE.fullmatch(release) else None


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_atomically(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as tmp:
        tmp.write(text)
    os.chmod(tmp.name, 0o644)
    os.replace(tmp.name, path)
