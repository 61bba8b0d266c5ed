"""The state file: a fixed header (magic, format version, length, SHA-256) and a JSON
body with every vCPU, the VM and every device. Small (tens of KiB), so it is read
whole and checked before anything is built from it."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

from vmm.snapshot.errors import CorruptSnapshot, IncompatibleSnapshot

MAGIC = b"SMSNAP\r\n"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIIQ32s")   # magic, format version, reserved, body length, sha256
MAX_BODY = 64 << 20


def write_state(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` and flush it to disk."""
    body = json.dumps(state, separators=(",", ":")).encode()
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(body), hashlib.sha256(body).digest())
    with open(path, "wb") as file:
        file.write(header + body)
        file.flush()
        os.fsync(file.fileno())


def read_state(path: Path) -> dict:
    """The state in ``path``; CorruptSnapshot or IncompatibleSnapshot if it cannot be used."""
    try:
        with open(path, "rb") as file:
            header = file.read(_HEADER.size)
            if len(header) < _HEADER.size:
                raise CorruptSnapshot(f"{path} is truncated: take the snapshot again")
            magic, version, _, length, digest = _HEADER.unpack(header)
            if magic != MAGIC:
                raise CorruptSnapshot(f"{path} is not an sm snapshot state file")
            if version != FORMAT_VERSION:
                raise IncompatibleSnapshot(
                    f"{path} has snapshot format {version}, this sm reads format {FORMAT_VERSION}: "
                    "take the snapshot again with this version")
            if length > MAX_BODY:
                raise CorruptSnapshot(f"{path} claims a {length}-byte state: it is damaged")
            body = file.read(length + 1)
    except FileNotFoundError:
        raise CorruptSnapshot(f"{path} is missing: the snapshot is incomplete") from None
    if len(body) != length or hashlib.sha256(body).digest() != digest:
        raise CorruptSnapshot(f"{path} is truncated or damaged (checksum mismatch): "
                              "take the snapshot again")
    try:
        state = json.loads(body)
    except ValueError:
        raise CorruptSnapshot(f"{path} has a checksum-valid but unreadable body") from None
    if not isinstance(state, dict):
        raise CorruptSnapshot(f"{path} does not hold a machine state")
    return state
