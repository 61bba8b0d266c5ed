"""The content-addressed store: blobs, refs, resolve, rmi and gc, and several processes at once."""

import gzip
import hashlib
import io
import json
import multiprocessing
import os
import tarfile

import pytest
import zstandard

from tests.images.helpers import store_files
from vmm.images.reference import InvalidReference
from vmm.images.store import (
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    BlobNotFound,
    DigestMismatch,
    ImageNotFound,
    InvalidDigest,
    Store,
    StoreError,
)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tar_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def gz_layer(tmp_path, name: str, files: dict[str, bytes]) -> tuple:
    tar = tar_of(files)
    path = tmp_path / f"{name}.tar.gz"
    path.write_bytes(gzip.compress(tar, mtime=0))
    return path, sha(tar)


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "sm")


def test_put_blob_from_bytes_stream_and_path(store, tmp_path):
    data = b"some blob"
    assert store.put_blob(data) == sha(data)
    assert store.put_blob(io.BytesIO(b"stream")) == sha(b"stream")
    (tmp_path / "f").write_bytes(b"file")
    assert store.put_blob(tmp_path / "f", sha(b"file")) == sha(b"file")
    assert store.blob_path(sha(data)).read_bytes() == data
    assert store.has_blob(sha(b"stream")) and not store.has_blob(sha(b"absent"))


def test_put_blob_refuses_wrong_content_and_leaves_nothing(store):
    with pytest.raises(DigestMismatch):
        store.put_blob(b"content", sha(b"other content"))
    files = store_files(store.root)
    assert files["blobs"] == [] and files["tmp"] == []


@pytest.mark.parametrize("digest", ["sha256:../../etc/passwd", "sha256:" + "A" * 64, "md5:ab",
                                    "sha256:" + "a" * 63, None])
def test_digests_are_checked_before_they_become_paths(store, digest):
    with pytest.raises(InvalidDigest):
        store.blob_path(digest)


def test_missing_blob(store):
    with pytest.raises(BlobNotFound) as error:
        store.blob_path(sha(b"never stored"))
    assert "pull or import the image again" in str(error.value)


def test_add_image_builds_manifest_config_and_ref(store, tmp_path):
    base, base_diff = gz_layer(tmp_path, "base", {"etc/os-release": b"ID=debian\n"})
    app, app_diff = gz_layer(tmp_path, "app", {"app.py": b"print(42)\n"})
    record = store.add_image("python-default", {"config": {"Cmd": ["python3"]}}, [base, app])
    assert record.name == "docker.io/library/python-default:latest"
    assert record.config["rootfs"] == {"type": "layers", "diff_ids": [base_diff, app_diff]}
    assert (record.config["os"], record.config["architecture"]) == ("linux", "amd64")
    assert [layer.compression for layer in record.layers] == ["gzip", "gzip"]
    assert [layer.digest for layer in record.layers] == [sha(base.read_bytes()),
                                                          sha(app.read_bytes())]
    manifest = json.loads(store.blob_path(record.manifest_digest).read_bytes())
    assert manifest["mediaType"] == OCI_MANIFEST
    assert manifest["config"]["digest"] == record.config_digest
    assert record.size == manifest["config"]["size"] + sum(l.size for l in record.layers)
    assert record.created            # no "created" in the config: when the ref was written
    again = store.add_image("python-default", {"config": {"Cmd": ["python3"]}}, [base, app])
    assert again.manifest_digest == record.manifest_digest          # deterministic


def test_add_image_zstd_diff_ids(store, tmp_path):
    tar = tar_of({"z": b"zstd" * 1000})
    path = tmp_path / "layer.tar.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(tar))
    record = store.add_image("z:1", {}, [path], OCI_LAYER_ZSTD)
    assert record.config["rootfs"]["diff_ids"] == [sha(tar)]
    assert record.layers[0].compression == "zstd"


def test_resolve_by_name_digest_and_prefix(store, tmp_path):
    layer, _ = gz_layer(tmp_path, "l", {"a": b"a"})
    record = store.add_image("127.0.0.1:5000/team/img:v2", {"created": "2024-05-06T07:08:09Z"},
                             [layer])
    assert record.created == "2024-05-06T07:08:09Z"
    for text in ("127.0.0.1:5000/team/img:v2", record.manifest_digest,
                 record.manifest_digest.removeprefix("sha256:")[:12],
                 f"127.0.0.1:5000/team/img@{record.manifest_digest}"):
        assert store.resolve(text) == record
    with pytest.raises(ImageNotFound) as error:
        store.resolve("127.0.0.1:5000/team/img:v3")
    assert str(error.value) == ("no image '127.0.0.1:5000/team/img:v3' in the store: pull it with "
                                "`sm pull 127.0.0.1:5000/team/img:v3` (`sm images` lists the "
                                "images here)")
    with pytest.raises(InvalidReference):
        store.resolve("Bad:Name:")


def test_tag_images_and_remove_with_gc(store, tmp_path):
    shared, _ = gz_layer(tmp_path, "shared", {"shared": b"s"})
    own, _ = gz_layer(tmp_path, "own", {"own": b"o"})
    first = store.add_image("first", {}, [shared])
    second = store.add_image("second", {"config": {"Cmd": ["x"]}}, [shared, own])
    store.tag("first-alias:1", first.manifest_digest)
    assert [r.name for r in store.images()] == ["docker.io/library/first-alias:1",
                                                "docker.io/library/first:latest",
                                                "docker.io/library/second:latest"]
    store.remove("second")
    assert not store.has_blob(second.layers[1].digest)          # own layer collected
    assert store.has_blob(second.layers[0].digest)              # shared layer still used
    assert not store.has_blob(second.manifest_digest)
    store.remove(first.manifest_digest)                         # by digest: every name
    assert store.images() == []
    assert store_files(store.root)["blobs"] == []
    with pytest.raises(ImageNotFound):
        store.remove("first")


def test_gc_waits_for_ingest_and_cleans_temp_files(store):
    orphan = store.put_blob(b"orphan")
    (store.tmp / "store-stale").write_bytes(b"half written")
    (store.tmp / "image-build").mkdir()          # someone else's work directory: kept
    old = store.tmp / "old-build"
    old.mkdir()
    os.utime(old, (0, 0))                        # ... unless it is a day old
    with store.ingest():           # a pull in progress (another open file: flock conflicts)
        assert store.gc(wait=False) == []
        assert store.has_blob(orphan)
    assert store.gc() == [orphan]
    assert [p.name for p in store.tmp.iterdir()] == ["image-build"]


def test_damaged_ref_file(store):
    (store.refs / "broken.json").write_text("{")
    with pytest.raises(StoreError) as error:
        store.images()
    assert "is damaged: delete it" in str(error.value)


def _add_images(root: str, worker: int, rounds: int) -> None:
    store = Store(__import__("pathlib").Path(root))
    shared = tar_of({"shared": b"x" * 10000})
    for index in range(rounds):
        own = tar_of({"own": f"{worker}-{index}".encode()})
        paths = []
        for name, data in (("shared", shared), ("own", own)):
            path = store.root / f"input-{worker}-{index}-{name}.tar"
            path.write_bytes(data)
            paths.append(path)
        store.add_image(f"w{worker}:{index}", {}, paths, "application/vnd.oci.image.layer.v1.tar")


def test_processes_adding_images_while_gc_runs(tmp_path):
    store = Store(tmp_path / "sm")
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_add_images, args=(str(store.root), worker, 15))
               for worker in range(2)]
    for worker in workers:
        worker.start()
    while any(worker.is_alive() for worker in workers):
        store.gc()
    assert [worker.exitcode for worker in workers] == [0, 0]
    records = store.images()
    assert len(records) == 30
    for record in records:        # gc never took a blob from under an image being added
        for digest in (record.manifest_digest, record.config_digest,
                       *(layer.digest for layer in record.layers)):
            assert sha(store.blob_path(digest).read_bytes()) == digest
    assert len({record.layers[0].digest for record in records}) == 1     # stored once
