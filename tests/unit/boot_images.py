"""Kernel images for the boot tests: synthetic bzImages, and Debian's real cloud kernel.

``debian_kernel`` is a session fixture (import it into a test module to use it).
It takes the kernel from the VMM's kernel cache (``vmm.guest.kernel``) if that
has one, else from ``${SM_HOME:-~/.cache/sm}/test-assets/``, fetching it there
with ``apt-get download`` + ``dpkg-deb -x`` the first time; if that is not
possible the test fails (not skips) and says why.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from vmm.arch.x86_64.bootparam_abi import SETUP_HEADER_OFFSET, XLF_KERNEL_64, SetupHeader

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"


def make_bzimage(
    payload: bytes = b"\x90" * 0x3000,
    *,
    setup_sects: int = 1,
    version: int = 0x020F,
    xloadflags: int = XLF_KERNEL_64,
    magic: bytes = b"HdrS",
    init_size: int = 0x100000,
    pref_address: int = 0x1000000,
    kernel_alignment: int = 0x200000,
    relocatable: bool = True,
    cmdline_size: int = 0x7FF,
    initrd_addr_max: int = 0x7FFFFFFF,
) -> bytes:
    """A minimal well-formed bzImage: boot sector + setup sectors + ``payload``."""
    header = SetupHeader(
        setup_sects=setup_sects,
        syssize=-(-len(payload) // 16),
        boot_flag=0xAA55,
        jump=((ctypes.sizeof(SetupHeader) + SETUP_HEADER_OFFSET - 0x202) << 8) | 0xEB,
        header=int.from_bytes(magic, "little"),
        version=version,
        loadflags=0x01,
        code32_start=0x100000,
        initrd_addr_max=initrd_addr_max,
        kernel_alignment=kernel_alignment,
        relocatable_kernel=int(relocatable),
        xloadflags=xloadflags,
        cmdline_size=cmdline_size,
        pref_address=pref_address,
        init_size=init_size,
    )
    setup = bytearray(((setup_sects or 4) + 1) * 512)  # boot.rst: setup_sects 0 means 4
    setup[SETUP_HEADER_OFFSET:SETUP_HEADER_OFFSET + ctypes.sizeof(header)] = bytes(header)
    padded = payload + b"\0" * (header.syssize * 16 - len(payload))
    return bytes(setup) + padded


def _cache_dir() -> Path:
    home = os.environ.get("SM_HOME") or os.path.expanduser("~/.cache/sm")
    return Path(home) / "test-assets"


def _fetch_debian_kernel(cache: Path) -> Path:
    depends = subprocess.run(
        ["apt-cache", "depends", KERNEL_META_PACKAGE], capture_output=True, text=True, check=True
    ).stdout
    packages = [line.split(":", 1)[1].strip() for line in depends.splitlines() if "Depends:" in line]
    package = next(p for p in packages if p.startswith("linux-image-"))
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, check=True)
        deb = next(Path(tmp).glob("*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), "root"], cwd=tmp, check=True)
        vmlinuz = next((Path(tmp) / "root" / "boot").glob("vmlinuz-*"))
        cache.mkdir(parents=True, exist_ok=True)
        target = cache / vmlinuz.name
        shutil.copyfile(vmlinuz, target.with_suffix(".part"))
        os.replace(target.with_suffix(".part"), target)
    return target


@pytest.fixture(scope="session")
def debian_kernel() -> Path:
    """Path to Debian's 6.1 cloud kernel (vmlinuz, a bzImage)."""
    from vmm.guest.kernel import cached_kernel

    guest_kernel = cached_kernel()          # the VMM's own kernel cache, if it has one
    if guest_kernel is not None:
        return guest_kernel.vmlinuz
    cache = _cache_dir()
    cached = sorted(cache.glob("vmlinuz-6.1.*-cloud-amd64"))
    if cached:
        return cached[-1]
    try:
        return _fetch_debian_kernel(cache)
    except (OSError, subprocess.CalledProcessError, StopIteration) as e:
        pytest.fail(
            f"cannot get Debian's cloud kernel ({KERNEL_META_PACKAGE}) for the boot tests: {e!r}. "
            f"Put a vmlinuz-6.1.*-cloud-amd64 into {cache}/ or make `apt-get download` work."
        )
