"""The registry client against a fake registry: resumed downloads, bad blobs, the token dance."""

import errno
import hashlib
import json

import pytest

from tests.images.fake_registry import FakeRegistry
from tests.images.helpers import store_files
from tests.images.oci_layout import pseudo_random
from vmm.images import registry as registry_module
from vmm.images.reference import parse_reference
from vmm.images.registry import (
    BlobDigestMismatch,
    DownloadInterrupted,
    RegistryClient,
    UnsupportedMediaType,
    pull,
    registry_scheme,
)
from vmm.images.store import Store, StoreFull


@pytest.fixture
def fake():
    server = FakeRegistry()
    yield server
    server.close()


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "sm")


@pytest.fixture(autouse=True)
def no_retry_delay(monkeypatch):
    monkeypatch.setattr(registry_module, "RETRY_DELAY", 0)


LAYER = pseudo_random(3_000_000, 1)


def test_truncated_download_resumes_with_range(fake, store):
    digest, _ = fake.add_image("img", "v1", [LAYER])
    layer = "sha256:" + hashlib.sha256(LAYER).hexdigest()
    fake.drops[layer] = 1
    record = pull(f"{fake.host}/img:v1", store, progress=False)
    assert record.manifest_digest == digest
    requests = [r for r in fake.blob_requests if r["digest"] == layer]
    assert requests[0]["range"] is None
    resumed_at = int(requests[1]["range"].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= len(LAYER) // 2      # what arrived before the cut, in whole chunks
    assert store.blob_path(layer).read_bytes() == LAYER
    assert store_files(store.root)["downloads"] == []


def test_download_that_keeps_failing_resumes_on_the_next_pull(fake, store):
    _, manifest = fake.add_image("img", "v1", [LAYER, b"small layer"])
    layer = manifest["layers"][0]["digest"]
    fake.drops[layer] = registry_module.DOWNLOAD_ATTEMPTS
    with pytest.raises(DownloadInterrupted) as error:
        pull(f"{fake.host}/img:v1", store, progress=False)
    message = str(error.value)
    assert "\n" not in message and f"run `sm pull {fake.host}/img:v1` again to resume" in message
    files = store_files(store.root)
    assert files["blobs"] == [] and files["refs"] == [] and files["tmp"] == []
    # What arrived stays as partials: the cut layer, and the small layer that did complete.
    kept = {name: (store.downloads / name).stat().st_size for name in files["downloads"]}
    assert kept[layer.removeprefix("sha256:") + ".partial"] > 0
    small = manifest["layers"][1]["digest"].removeprefix("sha256:") + ".partial"
    assert kept[small] == len(b"small layer")
    fake.blob_requests.clear()
    pull(f"{fake.host}/img:v1", store, progress=False)
    resumed = [r for r in fake.blob_requests if r["digest"] == layer]
    assert resumed == [{"digest": layer, "range": f"bytes={kept[layer[7:] + '.partial']}-"}]
    assert not any(r["digest"] == manifest["layers"][1]["digest"] for r in fake.blob_requests)
    assert store.blob_path(layer).read_bytes() == LAYER
    assert store_files(store.root)["downloads"] == []


def test_damaged_partial_is_verified_and_discarded(fake, store):
    _, manifest = fake.add_image("img", "v1", [LAYER])
    layer = manifest["layers"][0]["digest"]
    store.partial_path(layer).write_bytes(b"\0" * 1000)     # not LAYER's first bytes
    with pytest.raises(BlobDigestMismatch):
        pull(f"{fake.host}/img:v1", store, progress=False)
    assert store_files(store.root)["downloads"] == [] and store_files(store.root)["blobs"] == []
    assert pull(f"{fake.host}/img:v1", store, progress=False).layers[0].digest == layer


def test_blob_served_with_other_content(fake, store):
    _, manifest = fake.add_image("img", "v1", [LAYER])
    layer = manifest["layers"][0]["digest"]
    fake.blobs[layer] = pseudo_random(len(LAYER), 2)
    with pytest.raises(BlobDigestMismatch) as error:
        pull(f"{fake.host}/img:v1", store, progress=False)
    assert "does not match its digest" in str(error.value)
    assert store_files(store.root) == {"blobs": [], "refs": [], "downloads": [], "tmp": []}


def test_blob_longer_than_its_descriptor(fake, store):
    _, manifest = fake.add_image("img", "v1", [LAYER])
    layer = manifest["layers"][0]["digest"]
    fake.blobs[layer] = LAYER + b"more"
    with pytest.raises(BlobDigestMismatch) as error:
        pull(f"{fake.host}/img:v1", store, progress=False)
    assert "longer than the" in str(error.value)
    assert store_files(store.root)["downloads"] == []


def test_manifest_that_does_not_match_the_pinned_digest(fake, store):
    digest, _ = fake.add_image("img", "v1", [b"x"])
    other = "sha256:" + "0" * 64
    fake.manifests[("img", other)] = fake.manifests[("img", digest)]
    with pytest.raises(BlobDigestMismatch) as error:
        pull(f"{fake.host}/img@{other}", store, progress=False)
    assert f"hashes to {digest}, not {other}" in str(error.value)


def test_schema1_manifest_is_refused(fake, store):
    fake.manifests[("old", "v1")] = ("application/vnd.docker.distribution.manifest.v1+prettyjws",
                                     json.dumps({"schemaVersion": 1}).encode())
    with pytest.raises(UnsupportedMediaType) as error:
        pull(f"{fake.host}/old:v1", store, progress=False)
    assert "old Docker schema 1 manifest" in str(error.value)


def test_bearer_token_is_fetched_once_per_scope(tmp_path):
    server = FakeRegistry(token="t0ken")
    try:
        server.add_image("img", "v1", [b"one", b"two", b"three"])
        store = Store(tmp_path / "sm")
        client = RegistryClient(parse_reference(f"{server.host}/img:v1"), store, progress=False,
                                parallel=1)
        record = client.pull()
        assert len(record.layers) == 3
        assert len(server.token_requests) == 1
        assert server.token_requests[0] == {"scope": ["repository:x:pull"], "service": ["fake"]}
    finally:
        server.close()


@pytest.mark.parametrize("host, scheme", [
    ("localhost:5000", "http"), ("127.0.0.1:5000", "http"), ("127.8.9.1", "http"),
    ("[::1]:5000", "http"), ("registry-1.docker.io", "https"), ("10.0.0.1:5000", "https"),
    ("lan.example:5000", "http"),
])
def test_plain_http_only_for_loopback_and_listed_hosts(host, scheme, monkeypatch):
    monkeypatch.setenv("SM_INSECURE_REGISTRIES", "lan.example:5000, other:1")
    assert registry_scheme(host) == scheme


class _FullDisk:
    """A file whose writes fail with ENOSPC once ``room`` bytes are written."""

    def __init__(self, path, mode, room):
        self._file = open(path, mode)          # noqa: SIM115 (closed by __exit__)
        self._room = room

    def write(self, data):
        if len(data) > self._room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._room -= len(data)
        return self._file.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


def test_disk_full_during_a_download(fake, store, monkeypatch):
    _, manifest = fake.add_image("img", "v1", [LAYER])
    monkeypatch.setattr(registry_module, "open",
                        lambda path, mode: _FullDisk(path, mode, 1 << 20), raising=False)
    with pytest.raises(StoreFull) as error:
        pull(f"{fake.host}/img:v1", store, progress=False)
    assert str(error.value).startswith(f"no space left on the device of {store.root}: free some")
    files = store_files(store.root)
    assert files["blobs"] == [] and files["refs"] == [] and files["tmp"] == []
    monkeypatch.undo()
    record = pull(f"{fake.host}/img:v1", store, progress=False)        # resumes from 1 MiB
    assert record.layers[0].digest == manifest["layers"][0]["digest"]
    layer_requests = [r for r in fake.blob_requests if r["digest"] == record.layers[0].digest]
    assert layer_requests[-1]["range"] == f"bytes={1 << 20}-"


def test_disk_full_while_storing_a_blob(store, monkeypatch):
    def full_temp_file():
        path = store.tmp / "store-full"
        return _FullDisk(path, "wb", 10), path
    monkeypatch.setattr(store, "_temp_file", full_temp_file)
    with pytest.raises(StoreFull):
        store.put_blob(b"more than ten bytes")
    assert store_files(store.root) == {"blobs": [], "refs": [], "downloads": [], "tmp": []}
