"""put/get through the agent, and the tar reader and tree writer against hostile archives."""

import hashlib
import io
import os
import stat
import sys
import tarfile

import pytest

from tests.unit.agent_harness import (
    AgentProcess,
    FakeAgent,
    answer_hello,
    oldest_python3,
)
from vmm.agent_client import (
    AgentClient,
    AgentProtocolError,
    GuestFileError,
    PathRefused,
)
from vmm.guest import agent as wire


@pytest.fixture(scope="module", params=[sys.executable, oldest_python3()], ids=["host-python", "oldest-python"])
def client(request, tmp_path_factory):
    process = AgentProcess(request.param, tmp_path_factory.mktemp("agent") / "agent.sock")
    with process.client() as client:
        yield client
    process.stop()


def digest(path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def tree(root) -> dict:
    """Everything under root: kind, mode, content checksum or link target, inode groups."""
    entries = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            info = os.lstat(path)
            rel = os.path.relpath(path, root)
            if stat.S_ISLNK(info.st_mode):
                entries[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                entries[rel] = ("dir", stat.S_IMODE(info.st_mode))
            else:
                entries[rel] = ("file", stat.S_IMODE(info.st_mode), digest(path), info.st_nlink, int(info.st_mtime))
    return entries


def make_tree(root):
    (root / "a" / "b").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "a" / "b" / "data.bin").write_bytes(os.urandom(300_000))
    (root / "script.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "script.sh").chmod(0o755)
    (root / "secret").write_text("s")
    (root / "secret").chmod(0o600)
    (root / "ünïcode name").write_text("u")
    (root / ("long" * 40)).write_text("a name longer than ustar's 100 bytes")
    os.symlink("/etc/passwd", root / "abs-link")
    os.symlink("a/b/data.bin", root / "rel-link")
    os.link(root / "a" / "b" / "data.bin", root / "hard")
    os.utime(root / "secret", (1_000_000_000, 1_000_000_000))
    (root / "a").chmod(0o750)


def test_directory_tree_round_trip(client, tmp_path):
    make_tree(tmp_path / "src")
    client.put(tmp_path / "src", str(tmp_path / "in-guest"))
    client.get(str(tmp_path / "in-guest"), tmp_path / "back")
    assert tree(tmp_path / "in-guest") == tree(tmp_path / "src")
    assert tree(tmp_path / "back") == tree(tmp_path / "src")


def test_large_file_round_trip(client, tmp_path):
    source = tmp_path / "big"
    with open(source, "wb") as file:
        file.writelines(os.urandom(1 << 20) for _ in range(50))
    client.put(source, str(tmp_path / "guest-big"))
    client.get(str(tmp_path / "guest-big"), tmp_path / "host-big")
    assert digest(tmp_path / "guest-big") == digest(source) == digest(tmp_path / "host-big")


def test_put_replaces_a_symlink_instead_of_writing_through_it(client, tmp_path):
    outside = tmp_path / "outside"
    outside.write_text("keep")
    os.symlink(outside, tmp_path / "dest")
    source = tmp_path / "src"
    source.write_text("new")
    client.put(source, str(tmp_path / "dest"))
    assert outside.read_text() == "keep"
    assert not os.path.islink(tmp_path / "dest") and (tmp_path / "dest").read_text() == "new"


def test_put_never_follows_a_symlinked_directory_in_the_destination(client, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "dest").mkdir()
    os.symlink(outside, tmp_path / "dest" / "sub")
    (tmp_path / "src" / "sub").mkdir(parents=True)
    (tmp_path / "src" / "sub" / "file").write_text("x")
    client.put(tmp_path / "src", str(tmp_path / "dest"))
    assert os.listdir(outside) == []
    assert (tmp_path / "dest" / "sub" / "file").read_text() == "x"


@pytest.mark.parametrize("path", ["relative/path", "/tmp/../etc/x", ""])
def test_put_and_get_refuse_bad_paths(client, tmp_path, path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(PathRefused, match="not an absolute path"):
        client.put(tmp_path / "f", path)
    with pytest.raises(PathRefused, match="not an absolute path"):
        client.get(path, tmp_path / "out")
    assert client.ping() >= 0  # the connection is still usable


def test_get_of_a_missing_path(client, tmp_path):
    with pytest.raises(GuestFileError, match="No such file"):
        client.get("/no/such/file", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_put_into_a_missing_directory(client, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(GuestFileError, match="No such file"):
        client.put(tmp_path / "f", "/no/such/dir/f")


# ---------------------------------------------------------------- hostile archives

def archive(*members) -> bytes:
    """A tar of (TarInfo fields, data) built with tarfile, PAX format."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for fields, data in members:
            info = tarfile.TarInfo(fields.pop("name"))
            for key, value in fields.items():
                setattr(info, key, value)
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buffer.getvalue()


def extract(data: bytes, destination) -> None:
    stream = io.BytesIO(data)
    wire.extract_tar(stream.read, wire.TreeWriter(str(destination), mode_mask=0o777))


@pytest.mark.parametrize("name", ["../escape", "./../escape", "./a/../../escape", "/etc/escape", "escape"])
def test_member_names_outside_the_destination_are_refused(tmp_path, name):
    with pytest.raises(wire.OpError) as caught:
        extract(archive(({"name": ".", "type": tarfile.DIRTYPE}, b""),
                        ({"name": name}, b"evil")), tmp_path / "dest")
    assert caught.value.kind == "path_refused"
    assert not (tmp_path / "escape").exists()


def test_a_symlink_in_the_archive_is_not_followed_by_later_members(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    extract(archive(({"name": ".", "type": tarfile.DIRTYPE}, b""),
                    ({"name": "./link", "type": tarfile.SYMTYPE, "linkname": str(outside)}, b""),
                    ({"name": "./link/file"}, b"evil")), tmp_path / "dest")
    assert os.listdir(outside) == []
    assert (tmp_path / "dest" / "link" / "file").read_bytes() == b"evil"


def test_hard_link_outside_the_destination_is_refused(tmp_path):
    (tmp_path / "victim").write_text("v")
    with pytest.raises(wire.OpError) as caught:
        extract(archive(({"name": ".", "type": tarfile.DIRTYPE}, b""),
                        ({"name": "./h", "type": tarfile.LNKTYPE, "linkname": "../victim"}, b"")), tmp_path / "dest")
    assert caught.value.kind == "path_refused"


def test_host_side_extraction_drops_setuid_bits(tmp_path):
    extract(archive(({"name": ".", "type": tarfile.DIRTYPE, "mode": 0o1777}, b""),
                    ({"name": "./suid", "mode": 0o4755}, b"x")), tmp_path / "dest")
    assert stat.S_IMODE(os.stat(tmp_path / "dest" / "suid").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(tmp_path / "dest").st_mode) == 0o777


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
def test_special_files_are_refused(tmp_path, kind):
    with pytest.raises(wire.OpError, match="unsupported tar member type") as caught:
        extract(archive(({"name": "./dev", "type": kind}, b"")), tmp_path / "dest")
    assert caught.value.kind == "bad_archive"


def test_oversized_pax_header_is_refused_before_buffering(tmp_path):
    header = tarfile.TarInfo("././@PaxHeader")
    header.type = tarfile.XHDTYPE
    header.size = 1 << 40  # would be a terabyte of "path=" record
    data = header.tobuf(format=tarfile.GNU_FORMAT)  # base-256 size field
    with pytest.raises(wire.OpError, match="extension header of .* too large"):
        extract(data, tmp_path / "dest")


def test_corrupt_header_checksum_is_refused(tmp_path):
    data = bytearray(archive(({"name": "./f"}, b"x")))
    data[0] ^= 0xFF
    with pytest.raises(wire.OpError, match="checksum"):
        extract(bytes(data), tmp_path / "dest")


def test_truncated_archive_is_refused(tmp_path):
    data = archive(({"name": "./f"}, b"x" * 5000))
    with pytest.raises(wire.OpError, match="ends inside"):
        extract(data[:2048], tmp_path / "dest")


def test_hostile_agent_get_with_escaping_member(tmp_path):
    evil = archive(({"name": ".", "type": tarfile.DIRTYPE}, b""), ({"name": "./../escaped"}, b"evil"))

    def script(sock, frames):
        answer_hello(sock, frames)
        frames.read()  # the get request
        wire.send_frame(sock, wire.REPLY, wire.encode_json({"ready": True}))
        wire.send_frame(sock, wire.DATA, evil)
        wire.send_frame(sock, wire.END)
        frames.read()

    fake = FakeAgent(script)
    client = AgentClient(fake.client_sock, io_timeout=5)
    with client, pytest.raises(PathRefused, match="leaves the destination"):
        client.get("/anything", tmp_path / "dest")
    fake.close()
    assert not (tmp_path / "escaped").exists()


def test_hostile_agent_get_beyond_max_bytes(tmp_path):
    def script(sock, frames):
        answer_hello(sock, frames)
        frames.read()
        wire.send_frame(sock, wire.REPLY, wire.encode_json({"ready": True}))
        header = archive(({"name": "./f"}, b"x" * 10_000_000))
        for start in range(0, len(header), wire.DATA_CHUNK):
            wire.send_frame(sock, wire.DATA, header[start:start + wire.DATA_CHUNK])
        frames.read()

    fake = FakeAgent(script)
    client = AgentClient(fake.client_sock, io_timeout=5)
    with client, pytest.raises(GuestFileError, match="more than max_bytes=1000000"):
        client.get("/anything", tmp_path / "dest", max_bytes=1_000_000)
    fake.close()


def test_bad_archive_from_agent_is_a_protocol_error(tmp_path):
    def script(sock, frames):
        answer_hello(sock, frames)
        frames.read()
        wire.send_frame(sock, wire.REPLY, wire.encode_json({"ready": True}))
        wire.send_frame(sock, wire.DATA, b"\x01" * 512)
        wire.send_frame(sock, wire.END)
        frames.read()

    fake = FakeAgent(script)
    client = AgentClient(fake.client_sock, io_timeout=5)
    with client, pytest.raises(AgentProtocolError, match="bad archive"):
        client.get("/anything", tmp_path / "dest")
    fake.close()
