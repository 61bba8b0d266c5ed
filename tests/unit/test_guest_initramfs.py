"""The initramfs: contents, module order, caching; built from a fake and from the real kernel."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.unit.test_guest_modules import write_module
from vmm.guest import initramfs
from vmm.guest.elf import Elf64
from vmm.guest.initramfs import InitramfsError, build_initramfs, find_busybox
from vmm.guest.kernel import GuestKernel, ensure_kernel
from vmm.guest.modules import GUEST_MODULES, read_modinfo


def unpack(archive: Path, dest: Path) -> Path:
    dest.mkdir()
    # Device nodes need root to extract; everything else is checked either way.
    subprocess.run(["cpio", "-id", "--no-absolute-filenames", "-F", str(archive)], cwd=dest,
                   capture_output=True, check=os.geteuid() == 0)
    return dest


def check_module_order(root: Path) -> list[str]:
    """Every module in load-order is present and comes after everything it depends on."""
    order = (root / "lib/modules/load-order").read_text().split()
    for position, name in enumerate(order):
        info = read_modinfo((root / f"lib/modules/{name}.ko").read_bytes())
        depends = [d for d in info.get("depends", [""])[0].split(",") if d]
        assert set(depends) <= set(order[:position]), (name, depends)
    assert sorted(order) == sorted(p.name[:-3] for p in (root / "lib/modules").glob("*.ko"))
    return order


def check_common_contents(root: Path) -> None:
    init = root / "init"
    assert init.stat().st_mode & 0o111 == 0o111
    assert init.read_bytes() == initramfs.init_script().read_bytes()
    assert not Elf64((root / "bin/busybox").read_bytes()).has_interpreter()   # static
    assert os.readlink(root / "bin/sh") == "/bin/busybox"
    assert os.readlink(root / "sbin/insmod") == "/bin/busybox"
    assert stat.S_IMODE((root / "tmp").stat().st_mode) == 0o1777
    if os.geteuid() == 0:
        console = (root / "dev/console").stat()
        assert stat.S_ISCHR(console.st_mode)
        assert (os.major(console.st_rdev), os.minor(console.st_rdev)) == (5, 1)


@pytest.fixture
def fake_kernel(tmp_path: Path) -> GuestKernel:
    modules = tmp_path / "modules"
    write_module(modules, "virtio.ko")
    write_module(modules, "virtio_ring.ko")
    write_module(modules, "virtio_mmio.ko", "virtio,virtio_ring")
    write_module(modules, "virtio_blk.ko.xz", "virtio,virtio_ring")
    write_module(modules, "virtio_balloon.ko", "virtio,virtio_ring")
    write_module(modules, "vsock.ko")
    write_module(modules, "vmw_vsock_virtio_transport.ko", "vsock,virtio")
    write_module(modules, "libcrc32c.ko")
    write_module(modules, "erofs.ko", "libcrc32c")
    write_module(modules, "overlay.ko")
    write_module(modules, "squashfs.ko")
    write_module(modules, "unused.ko")
    (modules / "modules.builtin").write_text("kernel/fs/ext4/ext4.ko\n")
    vmlinuz = tmp_path / "vmlinuz"
    vmlinuz.write_bytes(b"kernel")
    return GuestKernel(vmlinuz, modules, "test")


def test_fake_kernel_initramfs(fake_kernel: GuestKernel, tmp_path: Path):
    agent = tmp_path / "agent.py"
    agent.write_text("print('agent')\n")
    agent.chmod(0o750)
    path = build_initramfs(fake_kernel, {"sm/agent.py": agent, "/etc/sm/config": b"x=1\n"},
                           modules=["erofs", "virtio_blk", "virtio_mmio", "ext4"], cache=tmp_path / "c")
    root = unpack(path, tmp_path / "root")
    check_common_contents(root)
    assert check_module_order(root) == ["libcrc32c", "erofs", "virtio", "virtio_ring", "virtio_blk",
                                        "virtio_mmio"]
    assert read_modinfo((root / "lib/modules/virtio_blk.ko").read_bytes())["name"] == ["virtio_blk"]
    assert (root / "sm/agent.py").read_text() == "print('agent')\n"
    assert stat.S_IMODE((root / "sm/agent.py").stat().st_mode) == 0o750
    assert (root / "etc/sm/config").read_bytes() == b"x=1\n"


def test_same_inputs_same_cached_file(fake_kernel: GuestKernel, tmp_path: Path):
    cache = tmp_path / "c"
    first = build_initramfs(fake_kernel, cache=cache)
    mtime = first.stat().st_mtime_ns
    assert build_initramfs(fake_kernel, cache=cache) == first
    assert first.stat().st_mtime_ns == mtime            # found, not rewritten
    other = build_initramfs(fake_kernel, {"x": b"1"}, cache=cache)
    assert other != first and len(list(cache.glob("*.cpio"))) == 2
    (cache / "by-input").rename(cache / "forgotten")        # the index lost: built again,
    assert build_initramfs(fake_kernel, cache=cache) == first  # to the same bytes
    compressed = build_initramfs(fake_kernel, cache=cache, compress=True)
    assert compressed.name.endswith(".cpio.gz") and compressed.stat().st_size < first.stat().st_size


def test_extra_file_cannot_replace_init(fake_kernel: GuestKernel, tmp_path: Path):
    with pytest.raises(InitramfsError, match="init"):
        build_initramfs(fake_kernel, {"/init": b"evil"}, cache=tmp_path / "c")


def test_kernel_without_modules(tmp_path: Path):
    kernel = GuestKernel(tmp_path / "vmlinuz", None, "custom")
    kernel.vmlinuz.write_bytes(b"a kernel")
    root = unpack(build_initramfs(kernel, cache=tmp_path / "c"), tmp_path / "root")
    assert (root / "lib/modules/load-order").read_text() == ""
    check_common_contents(root)


def test_dynamic_busybox_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("SM_BUSYBOX", "/bin/ls")
    with pytest.raises(InitramfsError, match="busybox-static"):
        find_busybox()
    monkeypatch.setenv("SM_BUSYBOX", str(tmp_path / "missing"))
    with pytest.raises(InitramfsError, match="busybox-static"):
        find_busybox()


@pytest.fixture(scope="session")
def real_kernel() -> GuestKernel:
    """Debian's cloud kernel from $SM_HOME (downloaded once if not cached yet)."""
    return ensure_kernel()


def test_real_kernel_initramfs(real_kernel: GuestKernel, tmp_path: Path):
    assert real_kernel.vmlinuz.read_bytes()[0x202:0x206] == b"HdrS"   # a bzImage
    path = build_initramfs(real_kernel)
    assert path.stat().st_size < 8 << 20
    root = unpack(path, tmp_path / "root")
    check_common_contents(root)
    order = check_module_order(root)
    builtin = {"ext4"}   # CONFIG_EXT4_FS=y in Debian's cloud kernel
    assert set(GUEST_MODULES) - builtin <= set(order)
    assert order.index("virtio_mmio") > order.index("virtio_ring")
    modinfo = shutil.which("modinfo") or ("/usr/sbin/modinfo" if Path("/usr/sbin/modinfo").exists() else None)
    if modinfo:   # cross-check our ELF reader against kmod's
        for name in order:
            kmod = subprocess.run([modinfo, "-F", "depends", str(root / f"lib/modules/{name}.ko")],
                                  capture_output=True, text=True, check=True).stdout.strip()
            ours = read_modinfo((root / f"lib/modules/{name}.ko").read_bytes())["depends"][0]
            assert sorted(filter(None, kmod.split(","))) == sorted(filter(None, ours.split(",")))
