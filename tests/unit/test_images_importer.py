"""Import of OCI image layouts (directory and tar) and `docker save` archives (old and new)."""

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from tests.images.helpers import store_files
from tests.images.oci_layout import LAYER_GZIP, LAYER_ZSTD, Entry, Layout, layer_tar
from vmm.images.importer import ArchiveError, import_image
from vmm.images.store import OCI_LAYER, OCI_LAYER_GZIP, Store


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tar_directory(directory: Path, output: Path) -> Path:
    with tarfile.open(output, "w") as tar:
        for path in sorted(directory.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(directory)), recursive=False)
    return output


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "sm")


@pytest.fixture
def layout(tmp_path):
    built = Layout(tmp_path / "layout")
    image = built.image([([Entry("hello", data=b"hi\n")], LAYER_GZIP),
                         ([Entry(".wh.hello")], LAYER_ZSTD)])
    return built, image


def assert_only(store: Store, digests: set[str]) -> None:
    files = store_files(store.root)
    assert set(files["blobs"]) == {d.removeprefix("sha256:") for d in digests}
    assert files["tmp"] == []


def image_digests(image) -> set[str]:
    return {image.manifest_digest, image.config_digest, *(d for d, _, _ in image.layers)}


def test_oci_layout_directory_and_tar(store, layout, tmp_path):
    built, image = layout
    built.tag("v1", image)
    [record] = import_image(built.directory, store, name="mine:v1")
    assert record.name == "docker.io/library/mine:v1"
    assert record.manifest_digest == image.manifest_digest
    assert [(l.digest, l.media_type, l.size) for l in record.layers] == image.layers
    archive = tar_directory(built.directory, tmp_path / "layout.tar")
    [from_tar] = import_image(archive, store, name="127.0.0.1:5000/mine:tar")
    assert from_tar.manifest_digest == image.manifest_digest
    assert_only(store, image_digests(image))


def test_oci_layout_names(store, layout):
    built, image = layout
    built.tag("v1", image)
    with pytest.raises(ArchiveError) as error:
        import_image(built.directory, store)
    assert str(error.value).endswith("carries no image name: give one with --name NAME")
    built.entries[0]["annotations"]["org.opencontainers.image.ref.name"] = "ghcr.io/x/y:v1"
    built._write_index()
    [record] = import_image(built.directory, store)
    assert record.name == "ghcr.io/x/y:v1"


def test_multi_platform_layout_imports_the_amd64_image(store, tmp_path):
    built = Layout(tmp_path / "multi")
    amd64 = built.image([([Entry("a", data=b"amd64")], LAYER_GZIP)])
    arm64 = built.image([([Entry("a", data=b"arm64")], LAYER_GZIP)], architecture="arm64")
    built.tag_index("multi", [amd64, arm64])
    [record] = import_image(built.directory, store, name="multi")
    assert record.manifest_digest == amd64.manifest_digest
    assert not store.has_blob(arm64.layers[0][0])
    only_arm = Layout(tmp_path / "arm")
    only_arm.tag_index("arm", [only_arm.image([([Entry("a")], LAYER_GZIP)],
                                              architecture="arm64")])
    with pytest.raises(ArchiveError) as error:
        import_image(only_arm.directory, store, name="arm")
    assert str(error.value).endswith("has no linux/amd64 image (has: linux/arm64)")


def test_damaged_layout_blob_leaves_nothing(store, layout):
    built, image = layout
    built.tag("v1", image)
    layer = built.blobs / image.layers[1][0].removeprefix("sha256:")
    layer.write_bytes(b"not the layer")
    with pytest.raises(ArchiveError) as error:
        import_image(built.directory, store, name="x")
    assert "does not match its digest: the archive is damaged" in str(error.value)
    files = store_files(store.root)
    assert files["blobs"] == [] and files["refs"] == [] and files["tmp"] == []


def old_docker_save(path: Path, layers: list[bytes], repo_tags, *, gzip_layers=False,
                    diff_ids=None) -> Path:
    """An archive as `docker save` wrote it before Docker 25."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["sh"]},
                         "rootfs": {"type": "layers",
                                    "diff_ids": diff_ids or [sha(l) for l in layers]}}).encode()
    config_name = sha(config).removeprefix("sha256:") + ".json"
    members = {config_name: config}
    layer_names = []
    for index, layer in enumerate(layers):
        name = f"{index:064x}/layer.tar"
        members[name] = gzip.compress(layer, mtime=0) if gzip_layers else layer
        members[f"{index:064x}/VERSION"] = b"1.0"
        layer_names.append(name)
    members["manifest.json"] = json.dumps([{"Config": config_name, "RepoTags": repo_tags,
                                            "Layers": layer_names}]).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_old_docker_save(store, tmp_path):
    layers = [layer_tar([Entry("bin/", "dir"), Entry("bin/sh", data=b"\x7fELF")]),
              layer_tar([Entry("bin/.wh.sh")])]
    archive = old_docker_save(tmp_path / "old.tar", layers, ["busybox-like:1", "other/name:2"])
    records = import_image(archive, store)
    assert [r.name for r in records] == ["docker.io/library/busybox-like:1",
                                         "docker.io/other/name:2"]
    assert records[0].manifest_digest == records[1].manifest_digest
    assert [l.media_type for l in records[0].layers] == [OCI_LAYER, OCI_LAYER]
    assert [l.digest for l in records[0].layers] == [sha(l) for l in layers]
    assert records[0].config["config"] == {"Cmd": ["sh"]}


def test_old_docker_save_with_gzip_layers(store, tmp_path):
    layers = [layer_tar([Entry("f", data=b"gz")])]
    archive = old_docker_save(tmp_path / "gz.tar", layers, [], gzip_layers=True)
    [record] = import_image(archive, store, name="gz")
    assert record.layers[0].media_type == OCI_LAYER_GZIP


def test_old_docker_save_layer_not_matching_its_diff_id(store, tmp_path):
    layers = [layer_tar([Entry("f", data=b"real")])]
    archive = old_docker_save(tmp_path / "bad.tar", layers, ["bad:1"],
                              diff_ids=[sha(b"something else")])
    with pytest.raises(ArchiveError) as error:
        import_image(archive, store)
    assert "does not match the diff_id" in str(error.value)
    files = store_files(store.root)
    assert files["blobs"] == [] and files["refs"] == []


def test_new_docker_save_is_an_oci_layout_with_names(store, layout):
    """Docker 25+ writes an OCI layout plus manifest.json; index.json names the image."""
    built, image = layout
    built.tag("latest", image)
    built.entries[0]["annotations"]["io.containerd.image.name"] = "docker.io/library/new:latest"
    built._write_index()
    (built.directory / "manifest.json").write_text(json.dumps([{
        "Config": f"blobs/sha256/{image.config_digest[7:]}", "RepoTags": ["new:latest"],
        "Layers": [f"blobs/sha256/{d[7:]}" for d, _, _ in image.layers]}]))
    [record] = import_image(built.directory, store)
    assert record.name == "docker.io/library/new:latest"
    assert record.manifest_digest == image.manifest_digest


def test_paths_outside_the_directory_are_refused(store, tmp_path):
    directory = tmp_path / "escape"
    directory.mkdir()
    (directory / "manifest.json").write_text(json.dumps([{
        "Config": "../secret.json", "RepoTags": ["x:1"], "Layers": []}]))
    (tmp_path / "secret.json").write_text("{}")
    with pytest.raises(ArchiveError) as error:
        import_image(directory, store)
    assert "'../secret.json', which is outside it" in str(error.value)


@pytest.mark.parametrize("content", [b"", b"plain text, not a tar"])
def test_not_an_archive(store, tmp_path, content):
    path = tmp_path / "junk"
    path.write_bytes(content)
    with pytest.raises(ArchiveError) as error:
        import_image(path, store)
    assert "\n" not in str(error.value)
