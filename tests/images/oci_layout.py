"""Build OCI image layouts in Python for the tests: layer tars, configs, manifests, indexes.

A layout is ``oci-layout``, ``index.json`` (entries tagged with
``org.opencontainers.image.ref.name``) and ``blobs/sha256/<hex>``, as the image-layout spec says.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
REF_NAME = "org.opencontainers.image.ref.name"
MTIME = 1_700_000_000        # fixed, so layers are byte-for-byte reproducible


def pseudo_random(size: int, seed: int) -> bytes:
    """``size`` deterministic, incompressible bytes, fast."""
    return random.Random(seed).randbytes(size)


@dataclass
class Entry:
    """One tar member: a file (``data``), a ``dir``, a ``symlink`` or ``hardlink`` (``target``)."""

    path: str
    kind: str = "file"
    data: bytes = b""
    target: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


def layer_tar(entries: list[Entry]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info = tarfile.TarInfo(entry.path)
            info.mtime, info.mode, info.uid, info.gid = MTIME, entry.mode, entry.uid, entry.gid
            if entry.kind == "dir":
                info.type = tarfile.DIRTYPE
                info.mode = entry.mode if entry.mode != 0o644 else 0o755
            elif entry.kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, entry.target
            elif entry.kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, entry.target
            else:
                info.size = len(entry.data)
            tar.addfile(info, io.BytesIO(entry.data) if entry.kind == "file" else None)
    return buffer.getvalue()


def compress(tar: bytes, media_type: str) -> bytes:
    if media_type == LAYER_GZIP:
        return gzip.compress(tar, compresslevel=1, mtime=0)
    if media_type == LAYER_ZSTD:
        return zstandard.ZstdCompressor(level=3).compress(tar)
    return tar


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class BuiltImage:
    """What a test asserts against: the digests the layout holds."""

    manifest_digest: str
    manifest: bytes
    config_digest: str
    config: dict
    layers: list[tuple[str, str, int]]            # (digest, media type, size)
    diff_ids: list[str] = field(default_factory=list)


class Layout:
    """An OCI image layout directory being written."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.blobs = self.directory / "blobs" / "sha256"
        self.blobs.mkdir(parents=True, exist_ok=True)
        (self.directory / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        self.entries: list[dict] = []

    def blob(self, data: bytes, media_type: str, **extra) -> dict:
        digest = digest_of(data)
        (self.blobs / digest.removeprefix("sha256:")).write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data), **extra}

    def image(self, layers: list[tuple[list[Entry], str]], *, architecture: str = "amd64",
              os_name: str = "linux", config: dict | None = None) -> BuiltImage:
        """Write layers (entries, media type), a config and a manifest; return their digests."""
        descriptors, diff_ids = [], []
        for entries, media_type in layers:
            tar = layer_tar(entries)
            diff_ids.append(digest_of(tar))
            descriptors.append(self.blob(compress(tar, media_type), media_type))
        image_config = {"architecture": architecture, "os": os_name,
                        "created": "2024-01-02T03:04:05Z",
                        "config": {"Env": ["PATH=/usr/bin:/bin"], "Cmd": ["/bin/sh"]},
                        "rootfs": {"type": "layers", "diff_ids": diff_ids}, **(config or {})}
        config_bytes = json.dumps(image_config, sort_keys=True).encode()
        config_descriptor = self.blob(config_bytes, OCI_CONFIG)
        manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                               "config": config_descriptor, "layers": descriptors}).encode()
        manifest_descriptor = self.blob(manifest, OCI_MANIFEST)
        return BuiltImage(manifest_descriptor["digest"], manifest, config_descriptor["digest"],
                          image_config, [(d["digest"], d["mediaType"], d["size"])
                                         for d in descriptors], diff_ids)

    def tag(self, tag: str, image: BuiltImage) -> None:
        self.entries.append({"mediaType": OCI_MANIFEST, "digest": image.manifest_digest,
                             "size": len(image.manifest), "annotations": {REF_NAME: tag}})
        self._write_index()

    def tag_index(self, tag: str, images: list[BuiltImage]) -> str:
        """A multi-platform image index over ``images``, tagged; returns its digest."""
        manifests = []
        for image in images:
            manifests.append({"mediaType": OCI_MANIFEST, "digest": image.manifest_digest,
                              "size": len(image.manifest),
                              "platform": {"architecture": image.config["architecture"],
                                           "os": image.config["os"]}})
        index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                            "manifests": manifests}).encode()
        descriptor = self.blob(index, OCI_INDEX)
        self.entries.append({**descriptor, "annotations": {REF_NAME: tag}})
        self._write_index()
        return descriptor["digest"]

    def _write_index(self) -> None:
        (self.directory / "index.json").write_text(json.dumps(
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.entries}))
