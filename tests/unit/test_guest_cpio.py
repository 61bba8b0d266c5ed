"""The newc writer, checked against GNU cpio and against the format's own rules."""

from __future__ import annotations

import gzip
import io
import os
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmm.guest.cpio import CpioError, CpioWriter, gzip_bytes


def parse_newc(data: bytes) -> list[dict]:
    """An independent reader: every header field, checking magic and 4-byte alignment."""
    entries, offset = [], 0
    names = ("ino", "mode", "uid", "gid", "nlink", "mtime", "filesize", "devmajor", "devminor",
             "rdevmajor", "rdevminor", "namesize", "check")
    while True:
        assert offset % 4 == 0
        assert data[offset:offset + 6] == b"070701"
        fields = {n: int(data[offset + 6 + 8 * i: offset + 14 + 8 * i], 16) for i, n in enumerate(names)}
        name_start = offset + 110
        name = data[name_start:name_start + fields["namesize"] - 1].decode()
        assert data[name_start + fields["namesize"] - 1] == 0
        data_start = name_start + fields["namesize"]
        data_start += -data_start % 4
        fields["name"] = name
        fields["data"] = data[data_start:data_start + fields["filesize"]]
        entries.append(fields)
        offset = data_start + fields["filesize"]
        offset += -offset % 4
        if name == "TRAILER!!!":
            assert offset == len(data)
            return entries


def sample_archive() -> bytes:
    out = io.BytesIO()
    with CpioWriter(out) as cpio:
        cpio.add_dir("bin")
        cpio.add_file("bin/busybox", b"\x7fELF" + bytes(1001), mode=0o755)
        cpio.add_symlink("bin/sh", "busybox")
        cpio.add_file("etc/deep/nested/conf", b"key=value\n")   # parents added on demand
        cpio.add_file("empty", b"", mode=0o600)
        cpio.add_file("init", b"#!/bin/sh\necho hi\n", mode=0o755)
    return out.getvalue()


def test_entries_are_reproducible_with_zero_owner_and_time():
    data = sample_archive()
    assert data == sample_archive()
    entries = parse_newc(data)
    assert [e["name"] for e in entries] == ["bin", "bin/busybox", "bin/sh", "etc", "etc/deep",
                                            "etc/deep/nested", "etc/deep/nested/conf", "empty",
                                            "init", "TRAILER!!!"]
    assert all(e["uid"] == e["gid"] == e["mtime"] == 0 for e in entries)
    inodes = [e["ino"] for e in entries[:-1]]
    assert len(set(inodes)) == len(inodes)
    link = entries[2]
    assert stat.S_ISLNK(link["mode"]) and link["data"] == b"busybox"


def test_gnu_cpio_extracts_the_tree(tmp_path: Path):
    archive = tmp_path / "a.cpio"
    archive.write_bytes(sample_archive())
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run(["cpio", "-idv", "--no-absolute-filenames", "-F", str(archive)],
                            cwd=out, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "init" in result.stderr.split()
    assert (out / "bin/busybox").read_bytes() == b"\x7fELF" + bytes(1001)
    assert os.readlink(out / "bin/sh") == "busybox"
    assert (out / "etc/deep/nested/conf").read_text() == "key=value\n"
    assert (out / "empty").stat().st_size == 0
    assert stat.S_IMODE((out / "init").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "empty").stat().st_mode) == 0o600
    assert (out / "etc/deep").is_dir()


def test_device_nodes_are_listed_with_their_numbers(tmp_path: Path):
    out = io.BytesIO()
    with CpioWriter(out) as cpio:
        cpio.add_device("dev/console", "c", 5, 1)
        cpio.add_device("dev/vda", "b", 254, 0, mode=0o660)
    archive = tmp_path / "dev.cpio"
    archive.write_bytes(out.getvalue())
    listing = subprocess.run(["cpio", "-itv", "-F", str(archive)], capture_output=True, text=True,
                             check=True).stdout.splitlines()
    console = next(line for line in listing if line.endswith("dev/console")).split()
    vda = next(line for line in listing if line.endswith("dev/vda")).split()
    assert console[0] == "crw-------" and console[4:6] == ["5,", "1"]
    assert vda[0] == "brw-rw----" and vda[4:6] == ["254,", "0"]
    if os.geteuid() == 0:   # only root may create device nodes
        extract = tmp_path / "x"
        extract.mkdir()
        subprocess.run(["cpio", "-id", "-F", str(archive)], cwd=extract, check=True, capture_output=True)
        node = (extract / "dev/console").stat()
        assert stat.S_ISCHR(node.st_mode) and (os.major(node.st_rdev), os.minor(node.st_rdev)) == (5, 1)


def test_gzip_is_reproducible_and_round_trips():
    data = sample_archive()
    assert gzip_bytes(data) == gzip_bytes(data)
    assert gzip.decompress(gzip_bytes(data)) == data


@pytest.mark.parametrize("path", ["", "/", "a/../b", "./a", "a//b", ".."])
def test_bad_paths_are_refused(path):
    with pytest.raises(CpioError):
        CpioWriter(io.BytesIO()).add_file(path, b"")


def test_duplicates_file_parents_and_bad_modes_are_refused():
    cpio = CpioWriter(io.BytesIO())
    cpio.add_file("a", b"x")
    with pytest.raises(CpioError, match="duplicate"):
        cpio.add_file("/a", b"y")
    with pytest.raises(CpioError, match="not a directory"):
        cpio.add_file("a/b", b"y")
    with pytest.raises(CpioError, match="permissions"):
        cpio.add_file("c", b"", mode=0o100644)
    with pytest.raises(CpioError):
        cpio.add_device("d", "x", 1, 1)
    cpio.close()
    with pytest.raises(CpioError, match="closed"):
        cpio.add_file("e", b"")


_names = st.text(alphabet="abcxyz019_-.", min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))


@given(st.dictionaries(st.lists(_names, min_size=1, max_size=3).map("/".join), st.binary(max_size=300),
                       max_size=12))
@settings(max_examples=60, deadline=None)
def test_any_file_set_parses_back(files):
    out = io.BytesIO()
    cpio = CpioWriter(out)
    written = {}
    for name, data in files.items():
        try:
            cpio.add_file(name, data)
            written[name] = data
        except CpioError:
            pass   # e.g. "a" then "a/b": a file cannot be a parent
    cpio.close()
    entries = {e["name"]: e for e in parse_newc(out.getvalue())}
    for name, data in written.items():
        assert entries[name]["data"] == data
        assert stat.S_ISREG(entries[name]["mode"])
        parent = name.rpartition("/")[0]
        assert not parent or stat.S_ISDIR(entries[parent]["mode"])
