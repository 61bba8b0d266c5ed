"""Kernel module metadata (ELF .modinfo) and load order."""

from __future__ import annotations

import lzma
import struct
from pathlib import Path

import pytest

from vmm.guest.elf import EM_X86_64, Elf64, ElfError
from vmm.guest.modules import ModuleError, ModuleTree, module_name, read_modinfo

_SHDR = "<IIQQQQIIQQ"


def fake_module(fields: dict[str, str], machine: int = EM_X86_64) -> bytes:
    """A minimal relocatable ELF64 whose only content is a ``.modinfo`` section."""
    info = b"".join(f"{k}={v}".encode() + b"\0" for k, v in fields.items())
    names = b"\0.modinfo\0.shstrtab\0"
    info_off = 64
    names_off = info_off + len(info)
    sh_off = (names_off + len(names) + 7) & ~7
    header = (b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
              + struct.pack("<HHIQQQIHHHHHH", 1, machine, 1, 0, 0, sh_off, 0, 64, 0, 0, 64, 3, 2))
    sections = (bytes(64)
                + struct.pack(_SHDR, 1, 1, 2, 0, info_off, len(info), 0, 0, 1, 0)
                + struct.pack(_SHDR, 10, 3, 0, 0, names_off, len(names), 0, 0, 1, 0))
    body = header + info + names
    return body + bytes(sh_off - len(body)) + sections


def write_module(root: Path, relpath: str, depends: str = "", **extra: str) -> Path:
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    name = module_name(path.name)
    data = fake_module({"name": name, "depends": depends, "license": "GPL", **extra})
    path.write_bytes(lzma.compress(data) if relpath.endswith(".xz") else data)
    return path


def test_modinfo_fields_are_read_from_the_elf_section():
    info = read_modinfo(fake_module({"name": "virtio_blk", "depends": "virtio,virtio_ring",
                                     "alias": "virtio:d00000002v*"}))
    assert info["depends"] == ["virtio,virtio_ring"]
    assert info["name"] == ["virtio_blk"]


@pytest.mark.parametrize("data", [b"", b"not an elf at all", fake_module({"a": "b"})[:100],
                                  b"\x7fELF\x01" + bytes(80)])
def test_malformed_module_is_a_module_error(data):
    with pytest.raises(ModuleError):
        read_modinfo(data)


def test_section_headers_past_the_end_are_an_elf_error():
    data = bytearray(fake_module({"a": "b"}))
    struct.pack_into("<Q", data, 0x28, len(data) + 4096)   # e_shoff beyond the file
    with pytest.raises(ElfError):
        Elf64(bytes(data)).sections()


def test_module_names_use_underscores():
    assert module_name("virtio-rng.ko") == "virtio_rng"
    assert module_name("erofs.ko.xz") == "erofs"
    with pytest.raises(ModuleError):
        module_name("README")


@pytest.fixture
def tree(tmp_path: Path) -> ModuleTree:
    write_module(tmp_path, "kernel/virtio/virtio.ko")
    write_module(tmp_path, "kernel/virtio/virtio_ring.ko")
    write_module(tmp_path, "kernel/virtio/virtio_mmio.ko", "virtio,virtio_ring")
    write_module(tmp_path, "kernel/net/vsock.ko")
    write_module(tmp_path, "kernel/net/vmw_vsock_virtio_transport_common.ko.xz", "vsock")
    write_module(tmp_path, "kernel/net/vmw_vsock_virtio_transport.ko",
                 "virtio,vmw_vsock_virtio_transport_common,virtio_ring,vsock")
    write_module(tmp_path, "kernel/lib/libcrc32c.ko")
    write_module(tmp_path, "kernel/fs/erofs.ko", "libcrc32c")
    write_module(tmp_path, "kernel/char/virtio-rng.ko", "virtio,virtio_ring")
    (tmp_path / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\nkernel/fs/jbd2/jbd2.ko\n")
    return ModuleTree(tmp_path)


def test_each_module_comes_after_its_dependencies(tree: ModuleTree):
    order = tree.load_order(["vmw_vsock_virtio_transport", "erofs", "virtio_mmio"])
    names = [m.name for m in order]
    assert len(names) == len(set(names))
    for position, module in enumerate(order):
        assert set(module.depends) <= set(names[:position]), module.name
    assert names[-1] == "virtio_mmio"
    assert set(names) == {"virtio", "virtio_ring", "vsock", "vmw_vsock_virtio_transport_common",
                          "vmw_vsock_virtio_transport", "libcrc32c", "erofs", "virtio_mmio"}


def test_builtin_modules_are_skipped_and_dashes_match(tree: ModuleTree):
    assert [m.name for m in tree.load_order(["ext4", "virtio-rng"])] == \
        ["virtio", "virtio_ring", "virtio_rng"]


def test_load_order_is_deterministic(tree: ModuleTree, tmp_path: Path):
    first = tree.load_order(["vmw_vsock_virtio_transport", "erofs"])
    assert first == ModuleTree(tmp_path).load_order(["vmw_vsock_virtio_transport", "erofs"])


def test_missing_module_is_named(tree: ModuleTree):
    with pytest.raises(ModuleError, match="nosuch"):
        tree.load_order(["nosuch"])


def test_missing_dependency_is_named(tmp_path: Path):
    write_module(tmp_path, "a.ko", "ghost")
    with pytest.raises(ModuleError, match="ghost"):
        ModuleTree(tmp_path).load_order(["a"])


def test_circular_dependencies_are_an_error(tmp_path: Path):
    write_module(tmp_path, "a.ko", "b")
    write_module(tmp_path, "b.ko", "a")
    with pytest.raises(ModuleError, match="circular"):
        ModuleTree(tmp_path).load_order(["a"])


def test_static_and_dynamic_binaries_are_told_apart():
    busybox, ls = Path("/bin/busybox"), Path("/bin/ls")
    assert Elf64(ls.read_bytes()).has_interpreter()
    elf = Elf64(busybox.read_bytes())
    assert elf.machine == EM_X86_64
    assert not elf.has_interpreter(), "the project needs busybox-static, this busybox is dynamic"
