"""Kernel modules the guest loads, and the order to load them in.

The order comes from each module's own ``depends=`` field in its ELF
``.modinfo`` section, read here in Python: it needs no host kmod/depmod, works
the same for Debian's kernel and a user's module tree, and tells the real module
name regardless of ``-``/``_`` in the file name. Soft dependencies (``softdep=``)
are not followed: for the modules below they name only built-in code.
"""

from __future__ import annotations

import gzip
import lzma
from dataclasses import dataclass
from pathlib import Path

from vmm.guest.elf import Elf64, ElfError

# What the guest needs: virtio-mmio transport (devices come from ACPI LNRO0005
# nodes), the block root, balloon, vsock for the agent, and the root file systems
# (overlay on top of a read-only erofs/ext4/squashfs image).
GUEST_MODULES = (
    "virtio_mmio",
    "virtio_blk",
    "virtio_balloon",
    "vmw_vsock_virtio_transport",
    "overlay",
    "erofs",
    "ext4",
    "squashfs",
)

# Kept in the kernel cache too (not loaded by default), for users who add them.
OPTIONAL_MODULES = ("virtio_console", "virtio_rng", "virtio_net", "virtiofs")

MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.gz")


class ModuleError(Exception):
    """A kernel module is missing, malformed or has circular dependencies."""


def module_name(filename: str) -> str:
    """The kernel's name for a module file: no suffix, ``-`` spelled ``_``."""
    for suffix in MODULE_SUFFIXES:
        if filename.endswith(suffix):
            return filename[: -len(suffix)].replace("-", "_")
    raise ModuleError(f"{filename} is not a kernel module file")


def read_module(path: Path) -> bytes:
    """A module's ELF bytes, decompressed when the file is ``.ko.xz``/``.ko.gz``."""
    data = path.read_bytes()
    try:
        if path.name.endswith(".xz"):
            return lzma.decompress(data)
        if path.name.endswith(".gz"):
            return gzip.decompress(data)
    except (lzma.LZMAError, OSError, EOFError) as exc:
        raise ModuleError(f"{path}: cannot decompress: {exc}") from exc
    return data


def read_modinfo(elf_bytes: bytes) -> dict[str, list[str]]:
    """The ``key=value`` strings of a module's ``.modinfo`` section (keys may repeat)."""
    try:
        section = Elf64(elf_bytes).section_data(".modinfo")
    except ElfError as exc:
        raise ModuleError(f"not a kernel module: {exc}") from exc
    if section is None:
        raise ModuleError("not a kernel module: no .modinfo section")
    info: dict[str, list[str]] = {}
    for entry in section.split(b"\0"):
        key, sep, value = entry.decode("utf-8", "replace").partition("=")
        if sep:
            info.setdefault(key, []).append(value)
    return info


@dataclass(frozen=True)
class KernelModule:
    name: str
    path: Path
    depends: tuple[str, ...]


class ModuleTree:
    """The modules under one directory (a ``lib/modules/<version>`` tree or any folder of .ko files)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._files: dict[str, Path] = {}
        for path in sorted(root.rglob("*")):
            if path.name.endswith(MODULE_SUFFIXES) and path.is_file():
                self._files.setdefault(module_name(path.name), path)
        builtin = root / "modules.builtin"
        self._builtin = (
            {module_name(line.rsplit("/", 1)[-1]) for line in builtin.read_text().split()}
            if builtin.is_file() else set()
        )

    def is_builtin(self, name: str) -> bool:
        return name.replace("-", "_") in self._builtin

    def module(self, name: str) -> KernelModule:
        name = name.replace("-", "_")
        path = self._files.get(name)
        if path is None:
            raise ModuleError(f"kernel module {name} is neither in {self.root} nor built in")
        info = read_modinfo(read_module(path))
        depends = tuple(d for value in info.get("depends", []) for d in value.split(",") if d)
        return KernelModule(name, path, depends)

    def load_order(self, names: tuple[str, ...] | list[str]) -> list[KernelModule]:
        """``names`` and everything they depend on, each after its dependencies.

        Built-in modules are skipped; the order is deterministic.
        """
        ordered: list[KernelModule] = []
        done: set[str] = set()
        visiting: list[str] = []

        def visit(name: str) -> None:
            name = name.replace("-", "_")
            if name in done or self.is_builtin(name):
                return
            if name in visiting:
                cycle = " -> ".join(visiting[visiting.index(name):] + [name])
                raise ModuleError(f"circular module dependencies: {cycle}")
            visiting.append(name)
            module = self.module(name)
            for dependency in sorted(module.depends):
                visit(dependency)
            visiting.pop()
            done.add(name)
            ordered.append(module)

        for name in names:
            visit(name)
        return ordered
