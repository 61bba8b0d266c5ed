"""Root filesystem images (vmm/images/rootfs.py): erofs from the store, cached by digest."""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.unit.test_rootfs_layers import directory, entry, layer, symlink
from vmm.images.layers import PathThroughSymlink
from vmm.images.rootfs import rootfs_image, rootfs_path
from vmm.images.store import Store


@pytest.fixture
def store(tmp_path, monkeypatch) -> Store:
    monkeypatch.setenv("SM_HOME", str(tmp_path / "home"))
    return Store()


def erofs_inode(image: Path, path: str) -> str:
    return subprocess.run(["dump.erofs", f"--path={path}", str(image)], check=True,
                          capture_output=True, text=True).stdout


def erofs_files(image: Path, tmp_path: Path) -> dict[str, bytes]:
    out = tmp_path / "extracted"
    subprocess.run(["fsck.erofs", f"--extract={out}", str(image)], check=True, capture_output=True)
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def test_layers_become_an_erofs_image_cached_by_manifest_digest(store, tmp_path, capsys):
    base = layer(tmp_path / "base.tar.gz", directory("etc"), entry("etc/os-release", data=b"ID=sm\n"),
                 entry("etc/old", data=b"old"), entry("home/u/f", data=b"f", uid=1000, gid=1000),
                 entry("dev/null", tarfile.CHRTYPE, mode=0o666, device=(1, 3)),
                 compression="gzip")
    top = layer(tmp_path / "top.tar.gz", entry("etc/.wh.old"), symlink("bin", "usr/bin"),
                compression="gzip")
    record = store.add_image("example.org/test:1", {"config": {}}, [base, top])

    image = rootfs_image(store, record)
    assert image == rootfs_path(record)
    assert image.name == record.manifest_digest.replace(":", "-") + ".erofs"
    assert image.read_bytes()[1024:1028] == bytes.fromhex("e2e1f5e0")   # erofs magic
    assert erofs_files(image, tmp_path) == {"etc/os-release": b"ID=sm\n", "home/u/f": b"f"}
    assert "Uid: 1000   Gid: 1000" in erofs_inode(image, "/home/u/f")
    assert "char dev" in erofs_inode(image, "/dev/null")
    assert "building the root filesystem of example.org/test:1" in capsys.readouterr().err
    assert [p.name for p in image.parent.iterdir() if not p.name.endswith(".lock")] == [image.name]

    built = image.stat().st_mtime_ns
    assert rootfs_image(store, record) == image
    assert image.stat().st_mtime_ns == built
    assert capsys.readouterr().err == ""


def test_a_failed_build_leaves_nothing_behind(store, tmp_path):
    evil = layer(tmp_path / "evil.tar.gz", symlink("etc", "/etc"), entry("etc/evil"),
                 compression="gzip")
    record = store.add_image("example.org/evil:1", {"config": {}}, [evil])
    with pytest.raises(PathThroughSymlink):
        rootfs_image(store, record, show_progress=False)
    leftovers = [p.name for p in rootfs_path(record).parent.iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []
    assert not Path("/etc/evil").exists()
