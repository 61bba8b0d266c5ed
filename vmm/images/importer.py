"""Import images without a registry: ``docker save`` archives and OCI image layouts.

Accepted inputs, as a directory or a tar file (plain or compressed):

* an OCI image layout (``oci-layout``, ``index.json``, ``blobs/``) — also what ``docker save``
  writes since Docker 25, with a ``manifest.json`` beside it;
* the older ``docker save`` format: ``manifest.json`` naming ``<id>.json`` configs and
  ``<id>/layer.tar`` layers.

Every blob is verified: layout blobs against their digests, old-format layers against the
config's ``rootfs.diff_ids``. Images are named by ``--name``, else by the names the archive carries
(``io.containerd.image.name`` or a full ``org.opencontainers.image.ref.name``; ``RepoTags``).
"""

from __future__ import annotations

import contextlib
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from vmm.images.errors import ImageError
from vmm.images.reference import InvalidReference, parse_reference
from vmm.images.registry import host_platform
from vmm.images.store import (
    IMAGE_INDEXES,
    IMAGE_MANIFESTS,
    LAYER_COMPRESSION,
    OCI_CONFIG,
    OCI_LAYER,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    DigestMismatch,
    ImageRecord,
    Store,
    canonical_json,
    check_digest,
    parse_image_manifest,
    uncompressed_digest,
)

MAX_JSON_BYTES = 8 << 20
CONTAINERD_NAME = "io.containerd.image.name"
OCI_REF_NAME = "org.opencontainers.image.ref.name"
_MAGIC_COMPRESSION = ((b"\x1f\x8b", OCI_LAYER_GZIP), (b"\x28\xb5\x2f\xfd", OCI_LAYER_ZSTD))


class ArchiveError(ImageError):
    """The file is not an image archive sm can import, or it is damaged."""


class _Source:
    """Files of an archive by relative path, from a directory or a tar file."""

    def __init__(self, path: Path):
        self.path = path
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        if path.is_file():
            try:
                self._tar = tarfile.open(path, "r:*")  # noqa: SIM115 (closed by close())
                self._members = {str(PurePosixPath(m.name)): m for m in self._tar.getmembers()}
            except (tarfile.TarError, OSError):
                raise ArchiveError(f"{path} is neither an image directory nor a tar archive "
                                   "(plain, gzip, bzip2 or xz)") from None
        elif not path.is_dir():
            raise ArchiveError(f"{path} does not exist")

    def close(self) -> None:
        if self._tar:
            self._tar.close()

    def _dir_file(self, name: str) -> Path:
        root = self.path.resolve()
        target = (root / name).resolve()
        if root not in target.parents:
            raise ArchiveError(f"{self.path} names {name!r}, which is outside it")
        return target

    def exists(self, name: str) -> bool:
        if self._tar:
            return str(PurePosixPath(name)) in self._members
        return self._dir_file(name).is_file()

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[BinaryIO]:
        if not self.exists(name):
            raise ArchiveError(f"{self.path} lacks {name}: the archive is incomplete")
        if self._tar:
            member = self._tar.extractfile(self._members[str(PurePosixPath(name))])
            if member is None:
                raise ArchiveError(f"{name} in {self.path} is not a regular file")
            with member:
                yield member
        else:
            with open(self._dir_file(name), "rb") as stream:
                yield stream

    def read_json(self, name: str):
        with self.open(name) as stream:
            data = stream.read(MAX_JSON_BYTES + 1)
        if len(data) > MAX_JSON_BYTES:
            raise ArchiveError(f"{name} in {self.path} is too large for a JSON file")
        try:
            return json.loads(data)
        except ValueError:
            raise ArchiveError(f"{name} in {self.path} is not JSON") from None


def _image_name(given: str | None, names: list[str], where: str) -> list[str]:
    if given:
        return [given]
    valid = []
    for name in names:
        with contextlib.suppress(InvalidReference):
            parse_reference(name)
            if "/" in name or ":" in name:     # a bare ref.name like "v1" is only a tag
                valid.append(name)
    if not valid:
        raise ArchiveError(f"{where} carries no image name: give one with --name NAME")
    return valid


def _check_platform(config: dict, where: str) -> None:
    os_name, arch = host_platform()
    found = f"{config.get('os')}/{config.get('architecture')}"
    if found != f"{os_name}/{arch}":
        raise ArchiveError(f"{where} has no {os_name}/{arch} image (has: {found})")


class _Importer:
    def __init__(self, source: _Source, store: Store):
        self.source = source
        self.store = store

    def blob(self, digest: str) -> str:
        """Copy a layout blob into the store, verified against its digest."""
        name = f"blobs/sha256/{check_digest(digest)}"
        if self.store.has_blob(digest):
            return digest
        with self.source.open(name) as stream:
            try:
                return self.store.put_blob(stream, digest)
            except DigestMismatch:
                raise ArchiveError(f"{name} in {self.source.path} does not match its digest: "
                                   "the archive is damaged") from None

    def layout_blob_json(self, digest: str):
        data = self.store.read_blob(self.blob(digest))
        try:
            return json.loads(data)
        except ValueError:
            raise ArchiveError(f"blob {digest} in {self.source.path} is not JSON") from None

    def platform_manifest(self, index_digest: str) -> dict | None:
        os_name, arch = host_platform()
        index = self.layout_blob_json(index_digest)
        for entry in index.get("manifests", []):
            platform = entry.get("platform") or {}
            if platform.get("os") == os_name and platform.get("architecture") == arch:
                return entry
        seen = sorted({f"{(e.get('platform') or {}).get('os')}/"
                       f"{(e.get('platform') or {}).get('architecture')}"
                       for e in index.get("manifests", [])})
        raise ArchiveError(f"{self.source.path} has no {os_name}/{arch} image "
                           f"(has: {', '.join(seen)})")

    def oci_layout(self, name: str | None) -> list[ImageRecord]:
        index = self.source.read_json("index.json")
        entries = index.get("manifests") if isinstance(index, dict) else None
        if not entries:
            raise ArchiveError(f"{self.source.path}: index.json lists no images")
        images: list[tuple[list[str], bytes]] = []
        os_name, arch = host_platform()
        for entry in entries:
            annotations = entry.get("annotations") or {}
            platform = entry.get("platform")
            if entry.get("mediaType") in IMAGE_INDEXES:
                entry = self.platform_manifest(entry["digest"])
            elif platform and (platform.get("os"), platform.get("architecture")) != (os_name,
                                                                                       arch):
                continue
            if entry.get("mediaType") not in IMAGE_MANIFESTS:
                raise ArchiveError(f"{self.source.path} names a {entry.get('mediaType')}, "
                                   "not an image")
            manifest = self.store.read_blob(self.blob(entry["digest"]))
            names = [annotations.get(CONTAINERD_NAME, ""), annotations.get(OCI_REF_NAME, "")]
            images.append((names, manifest))
        if not images:
            raise ArchiveError(f"{self.source.path} has no {os_name}/{arch} image")
        if name and len(images) > 1:
            raise ArchiveError(f"{self.source.path} holds {len(images)} images: --name names "
                               "only one; import without --name to use their own names")
        records = []
        for names, manifest in images:
            config_descriptor, layers = parse_image_manifest(manifest, str(self.source.path))
            _check_platform(self.layout_blob_json(config_descriptor["digest"]),
                            str(self.source.path))
            for layer in layers:
                self.blob(layer.digest)
            for image_name in _image_name(name, names, str(self.source.path)):
                records.append(self.store.add_manifest(image_name, manifest))
        return records

    def old_docker_save(self, name: str | None) -> list[ImageRecord]:
        entries = self.source.read_json("manifest.json")
        if not isinstance(entries, list) or not entries:
            raise ArchiveError(f"{self.source.path}: manifest.json lists no images")
        if name and len(entries) > 1:
            raise ArchiveError(f"{self.source.path} holds {len(entries)} images: --name names "
                               "only one")
        records = []
        for entry in entries:
            try:
                config_name, layer_names = entry["Config"], list(entry["Layers"])
                repo_tags = list(entry.get("RepoTags") or [])
            except (KeyError, TypeError):
                raise ArchiveError(f"{self.source.path}: manifest.json is malformed") from None
            with self.source.open(config_name) as stream:
                config_digest = self.store.put_blob(stream)
            stem = PurePosixPath(config_name).stem
            if len(stem) == 64 and f"sha256:{stem}" != config_digest:
                raise ArchiveError(f"{config_name} in {self.source.path} does not match its "
                                   "digest: the archive is damaged")
            try:
                config = json.loads(self.store.read_blob(config_digest))
            except ValueError:
                raise ArchiveError(f"{config_name} in {self.source.path} is not JSON") from None
            _check_platform(config, str(self.source.path))
            diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
            if len(diff_ids) != len(layer_names):
                raise ArchiveError(f"{self.source.path}: {config_name} lists {len(diff_ids)} "
                                   f"layers, manifest.json {len(layer_names)}")
            descriptors = [self.old_layer(layer_name, diff_id)
                           for layer_name, diff_id in zip(layer_names, diff_ids)]
            manifest = canonical_json({
                "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": config_digest,
                           "size": self.store.blob_path(config_digest).stat().st_size},
                "layers": descriptors})
            for image_name in _image_name(name, repo_tags, str(self.source.path)):
                records.append(self.store.add_manifest(image_name, manifest))
        return records

    def old_layer(self, layer_name: str, diff_id: str) -> dict:
        """Store one old-format layer and check it against the config's diff_id."""
        with self.source.open(layer_name) as stream:
            magic = stream.read(4)
        media_type = next((t for m, t in _MAGIC_COMPRESSION if magic.startswith(m)), OCI_LAYER)
        with self.source.open(layer_name) as stream:
            digest = self.store.put_blob(stream)
        path = self.store.blob_path(digest)
        actual = (digest if media_type == OCI_LAYER
                  else uncompressed_digest(path, LAYER_COMPRESSION[media_type]))
        if actual != diff_id:
            raise ArchiveError(f"{layer_name} in {self.source.path} does not match the diff_id "
                               f"{diff_id} its config gives: the archive is damaged")
        return {"mediaType": media_type, "digest": digest, "size": path.stat().st_size}


def import_image(path: Path, store: Store | None = None, name: str | None = None
                 ) -> list[ImageRecord]:
    """Import every image in the archive or layout at ``path``; returns their records."""
    store = store or Store()
    if name:
        parse_reference(name)
    source = _Source(Path(path))
    importer = _Importer(source, store)
    try:
        with store.ingest():
            if source.exists("index.json") and source.exists("oci-layout"):
                return importer.oci_layout(name)
            if source.exists("manifest.json"):
                return importer.old_docker_save(name)
            raise ArchiveError(f"{path} is neither a `docker save` archive nor an OCI image "
                               "layout (no index.json or manifest.json)")
    except BaseException:
        store.gc(wait=False)         # nothing the failed import stored stays behind
        raise
    finally:
        source.close()
