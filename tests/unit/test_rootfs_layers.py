"""Layer merging (vmm/images/layers.py): OCI whiteouts, file types, and unsafe paths."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest
import zstandard

from vmm.images.layers import (
    LayerError,
    PathEscapesRoot,
    PathThroughSymlink,
    merge_layers,
)

MTIME = 1_600_000_000


def entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", mode: int = 0o644,
          uid: int = 0, gid: int = 0, link: str = "", xattrs: dict[str, bytes] | None = None,
          device: tuple[int, int] = (0, 0)) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, uid, gid, MTIME
    info.linkname = link
    info.devmajor, info.devminor = device
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.pax_headers = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape")
                        for k, v in (xattrs or {}).items()}
    return info, data


def directory(name: str, mode: int = 0o755, **kw):
    return entry(name, tarfile.DIRTYPE, mode=mode, **kw)


def symlink(name: str, target: str):
    return entry(name, tarfile.SYMTYPE, link=target, mode=0o777)


def hardlink(name: str, target: str):
    return entry(name, tarfile.LNKTYPE, link=target)


def layer(path: Path, *entries, compression: str | None = None) -> Path:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, data in entries:
            archive.addfile(info, io.BytesIO(data) if info.isreg() else None)
    raw = buffer.getvalue()
    if compression == "gzip":
        raw = gzip.compress(raw)
    elif compression == "zstd":
        raw = zstandard.ZstdCompressor().compress(raw)
    path.write_bytes(raw)
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    target = tmp_path / "root"
    target.mkdir()
    return target


def merge(tmp_path: Path, root: Path, *layers: list) -> None:
    paths = [layer(tmp_path / f"layer{i}.tar", *entries) for i, entries in enumerate(layers)]
    merge_layers(paths, root)


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("compression", [None, "gzip", "zstd"])
def test_each_compression_is_read(tmp_path, root, compression):
    path = layer(tmp_path / "l.tar", directory("etc"), entry("etc/hostname", data=b"sm\n"),
                 compression=compression)
    progress = []
    report = merge_layers([path], root, progress.append)
    assert (root / "etc/hostname").read_bytes() == b"sm\n"
    assert report.entries == 2
    assert sum(progress) == path.stat().st_size


def test_layers_mixing_compressions_apply_in_order(tmp_path, root):
    first = layer(tmp_path / "a", entry("f", data=b"one"), entry("g", data=b"g"), compression="gzip")
    second = layer(tmp_path / "b", entry("f", data=b"two"), compression="zstd")
    third = layer(tmp_path / "c", entry("g", data=b"three"))
    merge_layers([first, second, third], root)
    assert (root / "f").read_bytes() == b"two"
    assert (root / "g").read_bytes() == b"three"


def test_whiteout_deletes_a_lower_file_and_a_lower_tree(tmp_path, root):
    merge(tmp_path, root,
          [directory("a"), entry("a/keep"), entry("a/gone"), directory("d"), entry("d/x/y")],
          [entry("a/.wh.gone"), entry(".wh.d"), entry(".wh.never-existed")])
    assert tree(root) == {"a", "a/keep"}


def test_whiteout_spares_what_its_own_layer_wrote(tmp_path, root):
    merge(tmp_path, root,
          [entry("f", data=b"lower"), entry("g", data=b"lower")],
          [entry("f", data=b"upper"), entry(".wh.f"), entry(".wh.g"), entry("g", data=b"upper")])
    assert (root / "f").read_bytes() == b"upper"
    assert (root / "g").read_bytes() == b"upper"


def test_opaque_directory_hides_lower_contents_across_layers(tmp_path, root):
    merge(tmp_path, root,
          [directory("d"), entry("d/a"), directory("d/sub"), entry("d/sub/b"), entry("other")],
          [directory("d"), entry("d/new-before"), entry("d/.wh..wh..opq"), entry("d/new-after")],
          [entry("d/third")])
    assert tree(root) == {"d", "d/new-before", "d/new-after", "d/third", "other"}


def test_opaque_marker_keeps_this_layers_subdirectories(tmp_path, root):
    merge(tmp_path, root,
          [entry("d/sub/old"), entry("d/sub/older")],
          [entry("d/sub/new"), entry("d/.wh..wh..opq")])
    assert tree(root) == {"d", "d/sub", "d/sub/new"}


def test_aufs_hardlink_directory_marker_is_ignored(tmp_path, root):
    merge(tmp_path, root, [entry("f"), directory(".wh..wh..plnk"), entry(".wh..wh..plnk/1")])
    assert "f" in tree(root)


def test_hard_links_share_an_inode_within_and_across_layers(tmp_path, root):
    merge(tmp_path, root,
          [entry("usr/bin/a", data=b"bin", mode=0o755), hardlink("usr/bin/b", "usr/bin/a")],
          [hardlink("c", "usr/bin/a")])
    a, b, c = (os.lstat(root / name) for name in ("usr/bin/a", "usr/bin/b", "c"))
    assert a.st_ino == b.st_ino == c.st_ino and a.st_nlink == 3
    assert (root / "c").read_bytes() == b"bin"


def test_hard_link_to_nothing_is_refused(tmp_path, root):
    with pytest.raises(LayerError, match="no layer has created"):
        merge(tmp_path, root, [hardlink("b", "missing")])


def test_symlinks_keep_their_targets_including_absolute_and_looping_ones(tmp_path, root):
    merge(tmp_path, root, [symlink("abs", "/etc/passwd"), symlink("loop-a", "loop-b"),
                           symlink("loop-b", "loop-a"), symlink("dangling", "nowhere")])
    assert os.readlink(root / "abs") == "/etc/passwd"
    assert os.readlink(root / "loop-a") == "loop-b" and os.readlink(root / "loop-b") == "loop-a"
    assert os.readlink(root / "dangling") == "nowhere"


def test_an_entry_through_a_symlink_loop_is_refused(tmp_path, root):
    with pytest.raises(PathThroughSymlink, match="loop-a"):
        merge(tmp_path, root, [symlink("loop-a", "loop-b"), symlink("loop-b", "loop-a"),
                               entry("loop-a/x")])


def test_zero_byte_file(tmp_path, root):
    merge(tmp_path, root, [entry("empty", data=b"", mode=0o600)])
    info = os.lstat(root / "empty")
    assert stat.S_ISREG(info.st_mode) and info.st_size == 0 and stat.S_IMODE(info.st_mode) == 0o600


def test_owners_modes_times_and_setuid_are_kept(tmp_path, root):
    assert os.geteuid() == 0, "the unit tests run as root, as CI does"
    merge(tmp_path, root, [directory("home/u", mode=0o750, uid=1000, gid=1000),
                           entry("home/u/f", uid=1000, gid=100, mode=0o640),
                           entry("usr/bin/su", mode=0o4755),
                           directory("ro", mode=0o555), entry("ro/inside")])
    home, f, su, ro = (os.lstat(root / p) for p in ("home/u", "home/u/f", "usr/bin/su", "ro"))
    assert (home.st_uid, home.st_gid, stat.S_IMODE(home.st_mode)) == (1000, 1000, 0o750)
    assert (f.st_uid, f.st_gid, stat.S_IMODE(f.st_mode)) == (1000, 100, 0o640)
    assert stat.S_IMODE(su.st_mode) == 0o4755
    assert stat.S_IMODE(ro.st_mode) == 0o555 and ro.st_mtime == MTIME   # set after its child
    assert f.st_mtime == MTIME


def test_device_nodes_and_fifos(tmp_path, root):
    merge(tmp_path, root, [entry("dev/null", tarfile.CHRTYPE, mode=0o666, device=(1, 3)),
                           entry("dev/loop0", tarfile.BLKTYPE, mode=0o660, device=(7, 0)),
                           entry("run/fifo", tarfile.FIFOTYPE, mode=0o600)])
    null, loop, fifo = (os.lstat(root / p) for p in ("dev/null", "dev/loop0", "run/fifo"))
    assert stat.S_ISCHR(null.st_mode) and os.major(null.st_rdev) == 1 and os.minor(null.st_rdev) == 3
    assert stat.S_IMODE(null.st_mode) == 0o666
    assert stat.S_ISBLK(loop.st_mode) and os.major(loop.st_rdev) == 7
    assert stat.S_ISFIFO(fifo.st_mode)


def test_xattrs_are_kept_but_overlay_ones_are_dropped(tmp_path, root):
    merge(tmp_path, root, [entry("f", xattrs={"user.note": b"\xff\x00hi",
                                              "trusted.overlay.opaque": b"y"})])
    assert os.getxattr(root / "f", "user.note") == b"\xff\x00hi"
    assert "trusted.overlay.opaque" not in os.listxattr(root / "f")


def test_later_layers_replace_files_with_directories_and_back(tmp_path, root):
    merge(tmp_path, root,
          [entry("a", data=b"file"), entry("b/inner"), symlink("c", "/")],
          [directory("a"), entry("a/now-a-dir"), entry("b", data=b"now a file"), directory("c")])
    assert (root / "a/now-a-dir").is_file()
    assert (root / "b").read_bytes() == b"now a file"
    assert (root / "c").is_dir() and not (root / "c").is_symlink()


def test_a_file_replacing_a_symlink_does_not_write_through_it(tmp_path, root):
    outside = tmp_path / "outside"
    outside.write_bytes(b"untouched")
    merge(tmp_path, root, [symlink("f", str(outside))], [entry("f", data=b"mine")])
    assert outside.read_bytes() == b"untouched"
    assert (root / "f").read_bytes() == b"mine" and not (root / "f").is_symlink()


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "/etc/evil", "./../evil"])
def test_paths_escaping_the_root_are_refused(tmp_path, root, name):
    with pytest.raises(PathEscapesRoot):
        merge(tmp_path, root, [entry(name, data=b"x")])
    assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize("target", ["../outside-file", "/etc/passwd"])
def test_hard_links_escaping_the_root_are_refused(tmp_path, root, target):
    (tmp_path / "outside-file").write_bytes(b"secret")
    with pytest.raises(PathEscapesRoot):
        merge(tmp_path, root, [hardlink("stolen", target)])
    assert not (root / "stolen").exists()


def test_a_symlink_planted_to_the_outside_cannot_be_written_through(tmp_path, root):
    outside = tmp_path / "outside"
    outside.mkdir()
    with pytest.raises(PathThroughSymlink, match="'etc'"):
        merge(tmp_path, root, [symlink("etc", str(outside))], [entry("etc/passwd", data=b"x")])
    assert list(outside.iterdir()) == []


def test_a_relative_symlink_climbing_out_cannot_be_written_through(tmp_path, root):
    with pytest.raises(PathThroughSymlink):
        merge(tmp_path, root, [symlink("up", "../.."), entry("up/evil")])
    assert not (tmp_path / "evil").exists()


def test_whiteouts_through_symlinks_or_naming_dot_dot_are_refused(tmp_path, root):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"keep")
    with pytest.raises(PathThroughSymlink):
        merge(tmp_path, root, [symlink("link", str(outside))], [entry("link/.wh.victim")])
    with pytest.raises(PathThroughSymlink):
        merge(tmp_path, root, [entry("link/.wh..wh..opq")])
    with pytest.raises(PathEscapesRoot):
        merge(tmp_path, root, [entry("sub/.wh..")])
    assert (outside / "victim").read_bytes() == b"keep"


def test_a_corrupt_layer_is_a_named_error(tmp_path, root):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(gzip.compress(b"not a tar archive at all" * 100)[:60])
    with pytest.raises(LayerError, match="not a readable tar"):
        merge_layers([bad], root)
