"""The content-addressed image store under ``$SM_HOME``.

Layout::

    blobs/sha256/<hex>       every blob (manifests, configs, layers), once, named by its digest
    refs/<quoted name>.json  one small file per image name: {"name", "manifest_digest", "added"}
    downloads/<hex>.partial  blobs being downloaded (kept for a resumed pull; verified before use)
    tmp/                     files being written; renamed into place when complete
    locks/                   flock files

Every write goes to ``tmp/`` and is renamed into place, so a reader sees a whole file or none. Two
locks make several processes safe: ``ingest`` is held shared while blobs are added for an image
that has no ref yet (pull, import, ``add_image``), and exclusively by :meth:`Store.gc`, so gc never
deletes a blob a running pull has fetched but not yet tagged; ``refs`` is held exclusively while a
ref changes and during gc.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import zstandard

from vmm.images.errors import ImageError
from vmm.images.reference import InvalidReference, Reference, parse_reference
from vmm.paths import sm_home

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_LAYER_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
IMAGE_MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
IMAGE_INDEXES = (OCI_INDEX, DOCKER_MANIFEST_LIST)

# How each layer media type is compressed (None: a plain tar). Non-distributable variants are
# the same formats.
LAYER_COMPRESSION = {
    OCI_LAYER: None,
    OCI_LAYER_GZIP: "gzip",
    OCI_LAYER_ZSTD: "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": None,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    DOCKER_LAYER_GZIP: "gzip",
    DOCKER_FOREIGN_LAYER_GZIP: "gzip",
    "application/vnd.docker.image.rootfs.diff.tar": None,
}

CHUNK = 1 << 20
TEMP_PREFIX = "store-"            # the store's own temp files in tmp/
STALE_TEMP_SECONDS = 24 * 3600    # others' leftovers in tmp/ (e.g. image builds) after this
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_SHORT_ID = re.compile(r"(?:sha256:)?([0-9a-f]{12,64})")


class StoreError(ImageError):
    """The store on disk is not as it should be."""


class InvalidDigest(StoreError):
    """A digest that is not ``sha256:<64 hex>`` (never used to build a path)."""


class DigestMismatch(StoreError):
    """Content does not hash to the digest it was given as."""


class BlobNotFound(StoreError):
    """A blob the store should have is missing."""


class ImageNotFound(StoreError):
    """No image in the store has this name or digest."""


class UnsupportedMediaType(StoreError):
    """A manifest or layer media type sm cannot use."""


class StoreFull(StoreError):
    """The disk (or quota) under the store is full."""


def check_digest(digest: str) -> str:
    """The hex part of a ``sha256:<hex>`` digest; raises :class:`InvalidDigest`."""
    match = _DIGEST.fullmatch(digest) if isinstance(digest, str) else None
    if not match:
        raise InvalidDigest(f"{str(digest)[:80]!r} is not a sha256 digest (sha256:<64 hex>)")
    return match.group(1)


def digest_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(value) -> bytes:
    """Deterministic JSON, so the same image built twice has the same digests."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Layer:
    digest: str
    media_type: str
    size: int

    @property
    def compression(self) -> str | None:
        """``"gzip"``, ``"zstd"`` or None for a plain tar."""
        return LAYER_COMPRESSION[self.media_type]


@dataclass(frozen=True)
class ImageRecord:
    name: str                  # normalised reference, e.g. docker.io/library/python:3.12-slim
    manifest_digest: str
    config_digest: str
    config: dict               # the OCI image config JSON
    layers: list[Layer]
    size: int                  # bytes of config and layers as stored (compressed)
    created: str               # the config's "created", else when the ref was written

    @property
    def reference(self) -> Reference:
        return parse_reference(self.name)


def parse_image_manifest(data: bytes, where: str) -> tuple[dict, list[Layer]]:
    """A manifest's config descriptor and layers, checked; raises :class:`StoreError`."""
    try:
        manifest = json.loads(data)
        config = manifest["config"]
        check_digest(config["digest"])
        layers = [Layer(item["digest"], item["mediaType"], int(item["size"]))
                  for item in manifest["layers"]]
    except (ValueError, KeyError, TypeError) as error:
        raise StoreError(f"{where} is not a valid image manifest ({error!r})") from None
    media_type = manifest.get("mediaType", OCI_MANIFEST)
    if media_type not in IMAGE_MANIFESTS:
        raise UnsupportedMediaType(f"{where} has media type {media_type}, not an image manifest")
    for layer in layers:
        check_digest(layer.digest)
        if layer.media_type not in LAYER_COMPRESSION:
            raise UnsupportedMediaType(f"{where} has a layer of media type {layer.media_type}, "
                                       "which sm cannot unpack")
        if layer.size < 0:
            raise StoreError(f"{where} has a layer with a negative size")
    return config, layers


def uncompressed_digest(path: Path, compression: str | None) -> str:
    """The layer's diff_id: the digest of its uncompressed tar."""
    hasher = hashlib.sha256()
    with open(path, "rb") as raw:
        if compression == "gzip":
            stream: BinaryIO = gzip.GzipFile(fileobj=raw)
        elif compression == "zstd":
            stream = zstandard.ZstdDecompressor().stream_reader(raw)
        else:
            stream = raw
        while chunk := stream.read(CHUNK):
            hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()


class Store:
    """Blobs by digest, refs by name; safe for several processes at once."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else sm_home()
        self.blobs = self.root / "blobs" / "sha256"
        self.refs = self.root / "refs"
        self.downloads = self.root / "downloads"
        self.tmp = self.root / "tmp"
        self.locks = self.root / "locks"
        for directory in (self.blobs, self.refs, self.downloads, self.tmp, self.locks):
            directory.mkdir(parents=True, exist_ok=True)

    # ---- locks -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _flock(self, name: str, mode: int) -> Iterator[bool]:
        with open(self.locks / name, "a+b") as lock_file:
            try:
                fcntl.flock(lock_file, mode)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def ingest(self) -> Iterator[None]:
        """Hold while adding blobs for an image not tagged yet, so gc leaves them alone."""
        with self._flock("ingest", fcntl.LOCK_SH):
            yield

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Turn a full disk into :class:`StoreFull`, one line the user can act on."""
        try:
            yield
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise StoreFull(f"no space left on the device of {self.root}: free some (`sm rmi` "
                            "removes images, `sm images` lists them) and try again") from None

    # ---- blobs -------------------------------------------------------------------------

    def _blob_file(self, digest: str) -> Path:
        return self.blobs / check_digest(digest)

    def has_blob(self, digest: str) -> bool:
        return self._blob_file(digest).is_file()

    def blob_path(self, digest: str) -> Path:
        path = self._blob_file(digest)
        if not path.is_file():
            raise BlobNotFound(f"blob {digest} is missing from the store {self.root}: pull or "
                               "import the image again")
        return path

    def read_blob(self, digest: str) -> bytes:
        return self.blob_path(digest).read_bytes()

    def _temp_file(self) -> tuple[BinaryIO, Path]:
        fd, name = tempfile.mkstemp(dir=self.tmp, prefix=TEMP_PREFIX)
        return os.fdopen(fd, "wb"), Path(name)

    def put_blob(self, data: bytes | BinaryIO | Path, expected_digest: str | None = None) -> str:
        """Store ``data``, verified against ``expected_digest`` if given; returns its digest.

        A blob nothing references yet may be collected by a concurrent gc: add blobs inside
        :meth:`ingest` until the image is tagged (``add_image`` does).
        """
        if expected_digest is not None:
            check_digest(expected_digest)
            if self.has_blob(expected_digest):
                return expected_digest
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.writing())
            if isinstance(data, (bytes, bytearray, memoryview)):
                stream: BinaryIO = io.BytesIO(data)
            elif isinstance(data, Path):
                stream = stack.enter_context(open(data, "rb"))
            else:
                stream = data
            stack.enter_context(self.ingest())
            output, temp = self._temp_file()
            stack.callback(temp.unlink, missing_ok=True)
            hasher = hashlib.sha256()
            with output:
                while chunk := stream.read(CHUNK):
                    hasher.update(chunk)
                    output.write(chunk)
            digest = "sha256:" + hasher.hexdigest()
            if expected_digest is not None and digest != expected_digest:
                raise DigestMismatch(f"content given as {expected_digest} hashes to {digest}")
            os.replace(temp, self._blob_file(digest))
        return digest

    # ---- downloads (used by the registry client) ---------------------------------------

    def partial_path(self, digest: str) -> Path:
        return self.downloads / f"{check_digest(digest)}.partial"

    @contextlib.contextmanager
    def download_lock(self, digest: str) -> Iterator[None]:
        """One process at a time appends to a blob's ``.partial``. Locks are shared by digests
        with the same first two hex digits, so at most 256 lock files ever exist."""
        with self._flock(f"download-{check_digest(digest)[:2]}", fcntl.LOCK_EX):
            yield

    def commit_partial(self, digest: str, hashed: str | None = None) -> str:
        """Move a finished ``.partial`` into the blobs once it is known to hash to ``digest``:
        ``hashed`` is what the caller computed while writing it; without it the file is hashed
        here. A partial that does not match is deleted."""
        partial = self.partial_path(digest)
        if hashed is None:
            hasher = hashlib.sha256()
            with open(partial, "rb") as stream:
                while chunk := stream.read(CHUNK):
                    hasher.update(chunk)
            hashed = "sha256:" + hasher.hexdigest()
        if hashed != digest:
            partial.unlink(missing_ok=True)
            raise DigestMismatch(f"downloaded blob {digest} hashes to {hashed}")
        os.replace(partial, self._blob_file(digest))
        return digest

    # ---- refs ---------------------------------------------------------------------------

    def _ref_file(self, name: str) -> Path:
        return self.refs / (urllib.parse.quote(name, safe="") + ".json")

    def _write_ref(self, name: str, manifest_digest: str) -> None:
        ref = canonical_json({"name": name, "manifest_digest": manifest_digest,
                              "added": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        with self.writing():
            output, temp = self._temp_file()
            try:
                with output:
                    output.write(ref)
                os.replace(temp, self._ref_file(name))
            finally:
                temp.unlink(missing_ok=True)

    def tag(self, name: str, manifest_digest: str) -> None:
        """Point ``name`` (normalised) at a manifest already in the store."""
        reference = parse_reference(name)
        self.blob_path(manifest_digest)
        with self._flock("refs", fcntl.LOCK_EX):
            self._write_ref(str(reference), manifest_digest)

    def _read_refs(self) -> list[dict]:
        refs = []
        for path in sorted(self.refs.glob("*.json")):
            try:
                ref = json.loads(path.read_bytes())
                check_digest(ref["manifest_digest"])
                refs.append(ref)
            except (OSError, ValueError, KeyError, TypeError, InvalidDigest):
                raise StoreError(f"ref file {path} is damaged: delete it (then `sm images`)") \
                    from None
        return refs

    def _record(self, ref: dict) -> ImageRecord:
        manifest_digest = ref["manifest_digest"]
        config_descriptor, layers = parse_image_manifest(self.read_blob(manifest_digest),
                                                         f"manifest {manifest_digest}")
        config_digest = config_descriptor["digest"]
        try:
            config = json.loads(self.read_blob(config_digest))
        except ValueError:
            raise StoreError(f"image config {config_digest} is not JSON") from None
        size = int(config_descriptor.get("size", 0)) + sum(layer.size for layer in layers)
        created = config.get("created") if isinstance(config, dict) else None
        return ImageRecord(ref["name"], manifest_digest, config_digest, config, layers, size,
                           created if isinstance(created, str) else ref.get("added", ""))

    def images(self) -> list[ImageRecord]:
        """Every named image, sorted by name."""
        return sorted((self._record(ref) for ref in self._read_refs()), key=lambda r: r.name)

    def _matching_refs(self, text: str) -> list[dict]:
        refs = self._read_refs()
        short = _SHORT_ID.fullmatch(text)
        try:
            reference = parse_reference(text)
        except InvalidReference:
            if not short:
                raise
            reference = None
        if reference is not None:
            exact = [ref for ref in refs if ref["name"] == str(reference)]
            if exact:
                return exact
            if reference.digest:     # name@digest: the same manifest under any name of the repo
                return [ref for ref in refs if ref["manifest_digest"] == reference.digest
                        and parse_reference(ref["name"]).repository == reference.repository]
        if short:                    # a digest or an unambiguous prefix of one, as docker IDs
            matches = {ref["manifest_digest"] for ref in refs
                       if check_digest(ref["manifest_digest"]).startswith(short.group(1))}
            if len(matches) > 1:
                raise ImageNotFound(f"{text!r} is the start of several image digests: give more "
                                    "of it (`sm images` lists them)")
            return [ref for ref in refs if ref["manifest_digest"] in matches]
        return []

    def resolve(self, ref: str) -> ImageRecord:
        """The image named ``ref`` (normalised as Docker does), or with that manifest digest."""
        matches = self._matching_refs(ref)
        if not matches:
            raise ImageNotFound(f"no image {ref!r} in the store: pull it with `sm pull {ref}` "
                                "(`sm images` lists the images here)")
        return self._record(matches[0])

    def remove(self, ref: str) -> None:
        """Untag ``ref`` (by digest: every name of that image), then collect unused blobs."""
        with self._flock("refs", fcntl.LOCK_EX):
            matches = self._matching_refs(ref)
            if not matches:
                raise ImageNotFound(f"no image {ref!r} in the store (`sm images` lists them)")
            for match in matches:
                self._ref_file(match["name"]).unlink(missing_ok=True)
        self.gc(wait=False)

    # ---- images -------------------------------------------------------------------------

    def add_image(self, name: str, config: dict, layers: list[Path],
                  layer_media_type: str = OCI_LAYER_GZIP) -> ImageRecord:
        """Store ``layers`` (files already in ``layer_media_type``'s format) with ``config``,
        write an OCI manifest for them, and point ``name`` at it.

        ``config.rootfs.diff_ids`` is filled in when missing, and ``os``/``architecture``
        default to linux/amd64.
        """
        reference = parse_reference(name)
        if layer_media_type not in LAYER_COMPRESSION:
            raise UnsupportedMediaType(f"layer media type {layer_media_type} is not a layer type")
        config = dict(config)
        config.setdefault("architecture", "amd64")
        config.setdefault("os", "linux")
        with self.ingest():
            descriptors = []
            for path in layers:
                digest = self.put_blob(Path(path))
                descriptors.append({"mediaType": layer_media_type, "digest": digest,
                                    "size": self.blob_path(digest).stat().st_size})
            if not (config.get("rootfs") or {}).get("diff_ids"):
                compression = LAYER_COMPRESSION[layer_media_type]
                config["rootfs"] = {"type": "layers", "diff_ids": [
                    uncompressed_digest(self.blob_path(d["digest"]), compression)
                    for d in descriptors]}
            config_bytes = canonical_json(config)
            manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                        "config": {"mediaType": OCI_CONFIG, "digest": digest_bytes(config_bytes),
                                   "size": len(config_bytes)},
                        "layers": descriptors}
            self.put_blob(config_bytes)
            manifest_digest = self.put_blob(canonical_json(manifest))
            self.tag(str(reference), manifest_digest)
        return self.resolve(str(reference))

    def add_manifest(self, name: str, manifest: bytes) -> ImageRecord:
        """Tag a manifest whose config and layers are already stored (pull and import)."""
        config_descriptor, layers = parse_image_manifest(manifest, f"the manifest of {name}")
        with self.ingest():
            for digest in (config_descriptor["digest"], *(layer.digest for layer in layers)):
                self.blob_path(digest)
            manifest_digest = self.put_blob(manifest)
            self.tag(name, manifest_digest)
        return self.resolve(name)

    # ---- garbage collection -------------------------------------------------------------

    def gc(self, wait: bool = True, resumable: set[str] = frozenset()) -> list[str]:
        """Delete blobs no ref reaches, and leftover temp files; returns the deleted digests.

        Unreferenced blobs named in ``resumable`` (fetched by a pull that then failed) go back
        to ``downloads/`` as complete partials instead, to be verified and reused by the next
        pull. Waits for running pulls and imports to finish (``wait=False``: does nothing then).
        """
        deleted = []
        with self._flock("ingest", fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB)) as locked:
            if not locked:
                return deleted
            with self._flock("refs", fcntl.LOCK_EX):
                live = set()
                for ref in self._read_refs():
                    live.add(ref["manifest_digest"])
                    with contextlib.suppress(BlobNotFound):
                        config, layers = parse_image_manifest(
                            self.read_blob(ref["manifest_digest"]), ref["name"])
                        live.add(config["digest"])
                        live.update(layer.digest for layer in layers)
                for path in self.blobs.iterdir():
                    digest = f"sha256:{path.name}"
                    if digest in live:
                        continue
                    if digest in resumable:
                        os.replace(path, self.partial_path(digest))
                    else:
                        path.unlink(missing_ok=True)
                    deleted.append(digest)
                self._clean_tmp()
        return sorted(deleted)

    def _clean_tmp(self) -> None:
        """The store's temp files are stale while gc holds the ingest lock; other work
        directories in tmp/ (image builds) are left alone unless a day old."""
        stale_before = time.time() - STALE_TEMP_SECONDS
        for path in self.tmp.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if path.name.startswith(TEMP_PREFIX) and not path.is_dir():
                    path.unlink()
                elif path.lstat().st_mtime < stale_before:
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink()
