"""Asserting on stores and damaging a registry's storage, for the image tests."""

from pathlib import Path


def store_files(root: Path) -> dict[str, list[str]]:
    """What a store holds, by area (blobs, refs, downloads, tmp), for asserts."""
    return {area: sorted(p.name for p in (root / area).rglob("*") if p.is_file())
            for area in ("blobs", "refs", "downloads", "tmp")}


def corrupt_registry_blob(storage: Path, digest: str) -> None:
    """Flip the first bytes of a blob in the registry's storage, keeping its size."""
    hex_digest = digest.removeprefix("sha256:")
    data_file = storage / "docker/registry/v2/blobs/sha256" / hex_digest[:2] / hex_digest / "data"
    data = bytearray(data_file.read_bytes())
    data[:8] = bytes(b ^ 0xFF for b in data[:8])
    data_file.write_bytes(bytes(data))
