"""`sm pull`, `sm import`, `sm images`, `sm rmi`, through their own argument parser."""

import argparse
from datetime import UTC

import pytest

from tests.images.helpers import store_files
from tests.images.oci_layout import LAYER_GZIP, Entry, Layout
from tests.images.registry_process import free_port
from vmm.images.commands import ImageError, add_subcommands, human_age, human_size
from vmm.images.rootfs import rootfs_path
from vmm.images.store import Store


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="sm")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


@pytest.fixture
def sm_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SM_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_pull_images_rmi(registry, pushed, sm_home, capsys):
    ref = registry.ref("sm/features:v1")
    assert run("pull", ref) == 0
    digest = pushed.features_amd64.manifest_digest.removeprefix("sha256:")[:12]
    assert capsys.readouterr().out.startswith(f"pulled {ref}  {digest}  ")
    assert run("images") == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["NAME", "DIGEST", "SIZE", "CREATED"]
    assert row.split()[:2] == [ref, digest] and row.endswith(" ago")
    rootfs = rootfs_path(Store().resolve(ref))     # as if the image had been run
    rootfs.parent.mkdir(parents=True)
    rootfs.write_bytes(b"erofs")
    in_progress = rootfs.parent / "build-1234"
    in_progress.mkdir()
    assert run("rmi", ref) == 0
    assert store_files(sm_home)["blobs"] == [] and Store().images() == []
    assert not rootfs.exists() and in_progress.exists()


def test_import_names_and_lists(sm_home, tmp_path, capsys):
    layout = Layout(tmp_path / "layout")
    layout.tag("v1", layout.image([([Entry("f", data=b"x")], LAYER_GZIP)]))
    assert run("import", str(layout.directory), "--name", "local/thing:v1") == 0
    assert capsys.readouterr().out.startswith("imported local/thing:v1  ")
    assert [r.name for r in Store().images()] == ["docker.io/local/thing:v1"]


@pytest.mark.parametrize("argv, start", [
    (("pull", "sm/nothing:v1"), None),     # the registry host is filled in below
    (("pull", "Bad:Ref:"), "invalid image reference 'Bad:Ref:'"),
    (("rmi", "not-here"), "no image 'not-here' in the store"),
    (("import", "/nonexistent/archive.tar"), "/nonexistent/archive.tar does not exist"),
])
def test_failures_are_one_line_image_errors(argv, start, registry, pushed, sm_home):
    if start is None:
        argv = ("pull", registry.ref(argv[1]))
        start = f"registry {registry.host} has no image"
    with pytest.raises(ImageError) as error:
        run(*argv)
    assert str(error.value).startswith(start) and "\n" not in str(error.value)


def test_unreachable_registry_is_an_image_error(sm_home):
    with pytest.raises(ImageError) as error:
        run("pull", f"localhost:{free_port()}/x")
    assert "cannot reach registry localhost:" in str(error.value)


def test_human_formats():
    assert [human_size(n) for n in (0, 999, 1000, 123_456_789, 5 * 10**12)] == [
        "0B", "999B", "1kB", "123MB", "5TB"]
    assert human_age("not a time") == "not a time"
    from datetime import datetime
    now = datetime(2024, 1, 10, tzinfo=UTC)
    assert human_age("2024-01-09T00:00:00Z", now) == "1 day ago"
    assert human_age("2024-01-01T00:00:00Z", now) == "1 week ago"
    assert human_age("2024-01-09T23:59:30Z", now) == "just now"
