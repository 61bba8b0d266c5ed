"""What the test bed is made of. Changing anything here rebuilds it."""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

SUITE = "bookworm"
MIRRORS = [
    f"deb http://deb.debian.org/debian {SUITE} main",
    f"deb http://deb.debian.org/debian {SUITE}-updates main",
    f"deb http://deb.debian.org/debian-security {SUITE}-security main",
]
KERNEL_METAPACKAGE = "linux-image-amd64"   # generic: kvm_amd, 9p, virtio as modules

PACKAGES = [
    # runtime of the suite
    "python3", "python3-venv", "python3-dev", "ca-certificates",
    "gcc", "libc6-dev", "libffi-dev", "linux-libc-dev",
    # guest building and images
    "kmod", "busybox-static", "cpio", "e2fsprogs", "erofs-utils", "acpica-tools",
    "qemu-system-x86", "skopeo", "docker-registry", "apache2-utils", "openssl",
    # a usable shell inside
    "mount", "procps", "iproute2", "util-linux",
]

# Modules the test bed's initramfs loads to reach its root disk; the rest
# (kvm_amd, 9p) are loaded from the root filesystem.
INITRAMFS_MODULES = ["virtio_pci", "virtio_blk", "ext4"]

INIT_SCRIPTS = [HERE / "initramfs-init", HERE / "root-init"]


def python_requirements() -> list[str]:
    """The project's runtime and test dependencies, read from pyproject.toml."""
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    return sorted(set(project["dependencies"]) | {r for group in extras.values() for r in group})


def recipe_hash() -> str:
    """A short key over everything that goes into the test bed image."""
    digest = hashlib.sha256()
    for part in (SUITE, KERNEL_METAPACKAGE, *MIRRORS, *PACKAGES, *INITRAMFS_MODULES,
                 *python_requirements()):
        digest.update(part.encode() + b"\0")
    for path in (*INIT_SCRIPTS, Path(__file__), HERE / "image.py"):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
