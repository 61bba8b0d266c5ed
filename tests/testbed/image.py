"""Build the test bed image natively from Debian packages, cached by recipe hash.

The result is a directory ``$SM_HOME/testbed/<hash>/`` with ``vmlinuz`` (Debian's
generic kernel), ``initrd.img`` (busybox and the disk drivers) and
``root.ext4`` (an mmdebstrap root with the tools and a venv of the project's
Python dependencies). Nothing runs under emulation while building.
"""

from __future__ import annotations

import fcntl
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from vmm.paths import sm_home

from . import recipe

VENV = "/opt/venv"


@dataclass(frozen=True)
class TestbedImage:
    directory: Path

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    @property
    def root_disk(self) -> Path:
        return self.directory / "root.ext4"


def _say(message: str) -> None:
    print(f"testbed: {message}", file=sys.stderr, flush=True)


def _run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=True, **kwargs)


def _missing_tools() -> list[str]:
    needed = {"mmdebstrap": "mmdebstrap", "mkfs.ext4": "e2fsprogs", "cpio": "cpio",
              "qemu-system-x86_64": "qemu-system-x86"}
    return [package for tool, package in needed.items() if shutil.which(tool) is None]


def _customize_hooks() -> list[str]:
    """Shell hooks mmdebstrap runs with the new root as $1, apt lists still present."""
    kernel = (
        'chroot "$1" sh -ec \''
        f'pkg=$(apt-cache depends {recipe.KERNEL_METAPACKAGE} | sed -n "s/.*Depends: //p" | head -n1); '
        'mkdir -p /tmp/kernel && cd /tmp/kernel && apt-get download -q "$pkg"; '
        'dpkg-deb -x ./*.deb unpacked; '
        'cp -a unpacked/boot/vmlinuz-* /boot/; cp -a unpacked/lib/modules /usr/lib/; '
        'depmod "$(ls /usr/lib/modules)"; cd / && rm -rf /tmp/kernel\''
    )
    requirements = " ".join(shlex.quote(r) for r in recipe.python_requirements())
    # The chroot trusts the CAs the host added locally (a site proxy's, say), so pip works.
    venv = (
        'cp -r /usr/local/share/ca-certificates/. "$1/usr/local/share/ca-certificates/" && '
        'chroot "$1" update-ca-certificates --fresh > /dev/null && '
        f'chroot "$1" python3 -m venv {VENV} && '
        f'chroot "$1" env PIP_FIND_LINKS= {VENV}/bin/pip install --quiet --no-cache-dir {requirements}'
    )
    init = (
        f'install -m 0755 {shlex.quote(str(recipe.HERE / "root-init"))} "$1/sbin/testbed-init"'
    )
    return [kernel, venv, init]


def _bootstrap(root: Path) -> None:
    argv = [
        "mmdebstrap", "--variant=apt", "--mode=root",
        '--aptopt=APT::Install-Recommends "false"',
        "--include=" + ",".join(recipe.PACKAGES),
    ]
    argv += [f"--customize-hook={hook}" for hook in _customize_hooks()]
    argv += [recipe.SUITE, str(root), *recipe.MIRRORS]
    _run(argv)


def _kernel_version(root: Path) -> str:
    versions = os.listdir(root / "usr/lib/modules")
    if len(versions) != 1:
        raise RuntimeError(f"expected one kernel in the test bed root, found {versions}")
    return versions[0]


def _module_load_order(root: Path, version: str) -> list[str]:
    """Paths (inside the root) of the initramfs modules, dependencies first."""
    order: list[str] = []
    for module in recipe.INITRAMFS_MODULES:
        shown = _run(["chroot", str(root), "modprobe", "--show-depends", "-S", version, module],
                     capture_output=True, text=True).stdout
        for line in shown.splitlines():
            words = line.split()
            if words and words[0] == "insmod" and words[1] not in order:
                order.append(words[1])
    return order


def _build_initrd(root: Path, version: str, output: Path) -> None:
    with tempfile.TemporaryDirectory() as staging_name:
        staging = Path(staging_name)
        for directory in ("bin", "dev", "proc", "sys", "newroot"):
            (staging / directory).mkdir()
        shutil.copy2(root / "bin/busybox", staging / "bin/busybox")
        shutil.copy2(recipe.HERE / "initramfs-init", staging / "init")
        os.mknod(staging / "dev/console", 0o600 | 0o020000, os.makedev(5, 1))
        order = _module_load_order(root, version)
        for module in order:
            target = staging / module.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / module.lstrip("/"), target)
        (staging / "load-order").write_text("".join(m + "\n" for m in order))
        with open(output, "wb") as out:
            files = subprocess.run(["find", "."], cwd=staging, check=True,
                                   capture_output=True).stdout
            cpio = subprocess.Popen(["cpio", "--quiet", "-o", "-H", "newc"], cwd=staging,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            gzip = subprocess.Popen(["gzip", "-1"], stdin=cpio.stdout, stdout=out)
            cpio.stdout.close()
            cpio.communicate(files)
            if gzip.wait() or cpio.returncode:
                raise RuntimeError("writing the test bed initramfs failed")


def _build_root_disk(root: Path, output: Path) -> None:
    used = int(_run(["du", "-sb", str(root)], capture_output=True, text=True).stdout.split()[0])
    # Room for what tests write to /tmp on it (registries, images): the file is sparse,
    # and writes go to QEMU's snapshot, so the space costs nothing until used.
    size_mib = used * 13 // 10 // (1 << 20) + 8192
    _run(["mkfs.ext4", "-q", "-F", "-L", "sm-testbed", "-d", str(root), str(output), f"{size_mib}M"])


def _remove_other_builds(base: Path, keep: Path) -> None:
    """Earlier recipes' images are never used again (2 GB each)."""
    for entry in base.iterdir():
        if entry.is_dir() and entry != keep:
            shutil.rmtree(entry, ignore_errors=True)


def build(force: bool = False) -> TestbedImage:
    """Return the cached test bed image for the current recipe, building it if needed."""
    base = sm_home() / "testbed"
    base.mkdir(parents=True, exist_ok=True)
    image = TestbedImage(base / recipe.recipe_hash())
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if image.root_disk.exists() and not force:
            return image
        missing = _missing_tools()
        if missing:
            raise SystemExit(f"testbed: cannot build, install: apt-get install {' '.join(missing)}")
        started = time.monotonic()
        _say(f"building the test bed image in {image.directory} (a few minutes, once)")
        work = Path(tempfile.mkdtemp(prefix="build-", dir=base))
        try:
            root = work / "root"
            _say("[1/3] bootstrapping Debian with mmdebstrap")
            _bootstrap(root)
            version = _kernel_version(root)
            _say(f"[2/3] initramfs for kernel {version}")
            shutil.copy2(root / f"boot/vmlinuz-{version}", work / "vmlinuz")
            _build_initrd(root, version, work / "initrd.img")
            _say("[3/3] root disk image")
            _build_root_disk(root, work / "root.ext4")
            shutil.rmtree(root)
            if image.directory.exists():
                shutil.rmtree(image.directory)
            work.rename(image.directory)
            _remove_other_builds(base, keep=image.directory)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        _say(f"built in {time.monotonic() - started:.0f} s")
        return image
