"""Pulls from a real registry (Debian's docker-registry on loopback) into a fresh store."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile

import pytest
import zstandard

from tests.images.conftest import USERNAME
from tests.images.helpers import corrupt_registry_blob, store_files
from tests.images.images_for_tests import BIG_FILE_SIZE
from tests.images.registry_process import free_port
from vmm.images.auth import AuthError
from vmm.images.registry import (
    BlobDigestMismatch,
    ManifestUnknown,
    PlatformNotFound,
    RegistryUnreachable,
    pull,
)
from vmm.images.store import DOCKER_LAYER_GZIP, DOCKER_MANIFEST, Store


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "sm")


def assert_store_holds(store: Store, digests: set[str], refs: int) -> None:
    files = store_files(store.root)
    assert set(files["blobs"]) == {d.removeprefix("sha256:") for d in digests}
    assert len(files["refs"]) == refs
    assert files["downloads"] == [] and files["tmp"] == []
    for digest in digests:      # every stored blob is what its name says
        data = store.blob_path(digest).read_bytes()
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest


def assert_store_empty(store: Store) -> None:
    files = store_files(store.root)
    assert files["blobs"] == [] and files["refs"] == [] and files["tmp"] == []


def layer_members(store: Store, digest: str, compression: str | None) -> dict[str, tarfile.TarInfo]:
    data = store.blob_path(digest).read_bytes()
    if compression == "zstd":
        data = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)).read()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        return {member.name: member for member in tar.getmembers()}


def one_line(error: Exception) -> str:
    text = str(error)
    assert "\n" not in text and text
    return text


# ---- good pulls ----------------------------------------------------------------------------

def test_multi_platform_index_pulls_the_amd64_image(registry, pushed, store):
    image = pushed.features_amd64
    record = pull(registry.ref("sm/features:v1"), store, progress=False)
    assert record.name == f"{registry.host}/sm/features:v1"
    assert record.manifest_digest == image.manifest_digest
    assert record.config_digest == image.config_digest
    assert record.config == image.config
    assert [(layer.digest, layer.media_type, layer.size) for layer in record.layers] == image.layers
    assert [layer.compression for layer in record.layers] == ["gzip", "zstd"]
    assert record.created == "2024-01-02T03:04:05Z"
    assert_store_holds(store, {image.manifest_digest, image.config_digest,
                               *(digest for digest, _, _ in image.layers)}, refs=1)
    assert store.resolve(registry.ref("sm/features:v1")) == record


def test_layers_keep_whiteouts_links_and_owners(registry, pushed, store):
    record = pull(registry.ref("sm/features:v1"), store, progress=False)
    base = layer_members(store, record.layers[0].digest, "gzip")
    assert base["data/empty"].isfile() and base["data/empty"].size == 0
    assert base["data/hardlink"].islnk() and base["data/hardlink"].linkname == "data/original"
    assert base["loop/a"].issym() and base["loop/a"].linkname == "b"
    assert base["loop/b"].issym() and base["loop/b"].linkname == "a"
    assert (base["bin/tool"].mode, base["bin/tool"].uid, base["bin/tool"].gid) == (0o755, 1000,
                                                                                   1000)
    upper = layer_members(store, record.layers[1].digest, "zstd")
    assert {".wh.gone-dir", "old/.wh.gone-file", "opaque/.wh..wh..opq"} <= set(upper)


def test_pull_by_index_digest_and_by_manifest_digest(registry, pushed, store):
    image = pushed.features_amd64
    by_index = pull(registry.ref(f"sm/features@{pushed.features_index}"), store, progress=False)
    assert by_index.manifest_digest == image.manifest_digest
    by_manifest = pull(registry.ref(f"sm/features@{image.manifest_digest}"), store,
                       progress=False)
    assert by_manifest.manifest_digest == image.manifest_digest
    assert len(store.images()) == 2
    assert store.resolve(image.manifest_digest).manifest_digest == image.manifest_digest


def test_big_image_shares_its_base_layer(registry, pushed, store):
    features = pull(registry.ref("sm/features:v1"), store, progress=False)
    big = pull(registry.ref("sm/big:v1"), store, progress=False)
    assert big.layers[0] == features.layers[0]          # the same base layer, stored once
    assert big.layers[1].size > BIG_FILE_SIZE and big.layers[1].compression is None
    digests = {features.manifest_digest, features.config_digest, big.manifest_digest,
               big.config_digest, *(layer.digest for layer in features.layers + big.layers)}
    assert len(digests) == 7
    assert_store_holds(store, digests, refs=2)
    assert big.layers[1].digest == pushed.big.layers[1][0]


def test_docker_schema2_manifest(registry, pushed, store):
    record = pull(registry.ref("sm/dockerv2:v1"), store, progress=False)
    manifest = json.loads(store.blob_path(record.manifest_digest).read_bytes())
    assert manifest["mediaType"] == DOCKER_MANIFEST
    assert [layer.media_type for layer in record.layers] == [DOCKER_LAYER_GZIP]
    assert record.layers[0].digest == pushed.small.layers[0][0]
    assert record.layers[0].compression == "gzip"


def test_two_processes_pulling_at_once(registry, pushed, tmp_path):
    home = tmp_path / "shared"
    code = ("import sys; from pathlib import Path; from vmm.images.registry import pull; "
            "from vmm.images.store import Store; "
            "pull(sys.argv[1], Store(Path(sys.argv[2])), progress=False)")
    refs = [registry.ref("sm/big:v1"), registry.ref("sm/big:v1"), registry.ref("sm/features:v1")]
    processes = [subprocess.Popen([sys.executable, "-c", code, ref, str(home)],
                                  stderr=subprocess.PIPE) for ref in refs]
    for process in processes:
        assert process.wait(timeout=300) == 0, process.stderr.read().decode()
    store = Store(home)
    big, features = store.resolve(refs[0]), store.resolve(refs[2])
    assert_store_holds(store, {big.manifest_digest, big.config_digest, features.manifest_digest,
                               features.config_digest,
                               *(layer.digest for layer in big.layers + features.layers)}, refs=2)


# ---- auth ----------------------------------------------------------------------------------

def test_basic_auth_from_docker_config(basic_registry, pushed, store, docker_config,
                                       monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(docker_config(basic_registry.host).parent))
    record = pull(basic_registry.ref("sm/small:v1"), store, progress=False)
    assert record.manifest_digest == pushed.small.manifest_digest


def test_basic_auth_wrong_password(basic_registry, pushed, store, docker_config):
    config = docker_config(basic_registry.host, password="wrong")
    with pytest.raises(AuthError) as error:
        pull(basic_registry.ref("sm/small:v1"), store, progress=False, docker_config=config)
    assert f"refused user {USERNAME!r}" in one_line(error.value)
    assert_store_empty(store)


def test_basic_auth_without_credentials(basic_registry, pushed, store, tmp_path):
    with pytest.raises(AuthError) as error:
        pull(basic_registry.ref("sm/small:v1"), store, progress=False,
             docker_config=tmp_path / "none.json")
    assert "needs a user name and password" in one_line(error.value)
    assert_store_empty(store)


def test_bearer_token_dance(token_registry, token_server, pushed, store, docker_config):
    config = docker_config(token_registry.host)
    before = len(token_server.requests)
    record = pull(token_registry.ref("sm/features:v1"), store, progress=False,
                  docker_config=config)
    assert record.manifest_digest == pushed.features_amd64.manifest_digest
    asked = token_server.requests[before:]
    assert len(asked) == 1        # one token for the scope, reused for every request after
    assert asked[0] == {"user": USERNAME, "scope": ["repository:sm/features:pull"],
                        "service": "sm-test-registry"}


def test_bearer_token_refused(token_registry, token_server, pushed, store, docker_config,
                              tmp_path):
    with pytest.raises(AuthError) as wrong:
        pull(token_registry.ref("sm/small:v1"), store, progress=False,
             docker_config=docker_config(token_registry.host, password="nope"))
    assert f"refused user {USERNAME!r}" in one_line(wrong.value)
    with pytest.raises(AuthError) as anonymous:
        pull(token_registry.ref("sm/small:v1"), store, progress=False,
             docker_config=tmp_path / "none.json")
    assert "refused anonymous pulls" in one_line(anonymous.value)
    assert_store_empty(store)


# ---- bad input -----------------------------------------------------------------------------

def test_unknown_tag_and_unknown_image(registry, pushed, store):
    with pytest.raises(ManifestUnknown) as tag:
        pull(registry.ref("sm/features:nope"), store, progress=False)
    assert f"has no image {registry.host}/sm/features:nope" in one_line(tag.value)
    with pytest.raises(ManifestUnknown) as image:
        pull(registry.ref("sm/never-pushed:v1"), store, progress=False)
    assert "check the name and tag" in one_line(image.value)
    assert_store_empty(store)


def test_registry_unreachable(store):
    with pytest.raises(RegistryUnreachable) as error:
        pull(f"127.0.0.1:{free_port()}/sm/small:v1", store, progress=False)
    assert "cannot reach registry 127.0.0.1:" in one_line(error.value)
    assert_store_empty(store)


def test_other_platform_only(registry, pushed, store):
    with pytest.raises(PlatformNotFound) as index:
        pull(registry.ref("sm/armindex:v1"), store, progress=False)
    assert one_line(index.value).endswith(
        "has no linux/amd64 manifest (has: linux/arm64, linux/s390x)")
    with pytest.raises(PlatformNotFound) as single:
        pull(registry.ref("sm/armonly:v1"), store, progress=False)
    assert one_line(single.value).endswith("has no linux/amd64 manifest (has: linux/arm64)")
    assert_store_empty(store)
    assert store_files(store.root)["downloads"] == []


def test_corrupt_blob_is_refused(registry, pushed, store):
    layer_digest = pushed.corrupt.layers[0][0]
    corrupt_registry_blob(registry.storage, layer_digest)
    with pytest.raises(BlobDigestMismatch) as error:
        pull(registry.ref("sm/corrupt:v1"), store, progress=False)
    assert f"blob {layer_digest} from {registry.host} does not match its digest" in \
        one_line(error.value)
    assert_store_empty(store)
    assert store_files(store.root)["downloads"] == []
