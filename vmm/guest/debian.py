"""Fetch one binary package from a Debian mirror, verified at every step.

The chain of trust is apt's: the suite's ``InRelease`` is checked with ``gpgv``
against the Debian archive keyring (when both exist on the host), it names the
sha256 of ``Packages.xz``, and ``Packages`` names the sha256 of each ``.deb``.
Anything that does not match raises :class:`IntegrityError`. HTTP goes through
the standard library's ``urllib``, which also reads ``file://`` mirrors.
"""

from __future__ import annotations

import hashlib
import http.client
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import BinaryIO, Iterator

DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEBIAN_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
ARCH = "amd64"
COMPONENT = "main"
_CHUNK = 1 << 20
_TIMEOUT_S = 60


class DebianError(Exception):
    """The mirror could not be read or does not have what we asked for."""


class IntegrityError(DebianError):
    """A signature, hash or size did not match: the download is not trusted."""


class UnverifiedReleaseWarning(UserWarning):
    """InRelease was used without a signature check (no gpgv or no keyring on the host)."""


@dataclass(frozen=True)
class Package:
    """One stanza of a ``Packages`` index, with the fields we use."""

    name: str
    version: str
    filename: str
    size: int
    sha256: str
    depends: str


def mirror_url() -> str:
    return os.environ.get("SM_DEBIAN_MIRROR") or DEFAULT_MIRROR


def default_keyring() -> Path | None:
    """The Debian archive keyring, when the host can check signatures with it."""
    return DEBIAN_KEYRING if DEBIAN_KEYRING.is_file() and shutil.which("gpgv") else None


def download(url: str, dest: BinaryIO, *, sha256: str | None = None, size: int | None = None,
             label: str | None = None) -> None:
    """Stream ``url`` into ``dest``; check its sha256 and size when given."""
    digest = hashlib.sha256()
    done = 0
    progress = _Progress(label or url.rsplit("/", 1)[-1], size)
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "sm (guest kernel fetch)"})
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
            while chunk := response.read(_CHUNK):
                done += len(chunk)
                if size is not None and done > size:
                    raise IntegrityError(f"{url}: larger than the {size} bytes the index names")
                digest.update(chunk)
                dest.write(chunk)
                progress.update(done)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise DebianError(f"cannot download {url}: {exc}") from exc
    finally:
        progress.finish(done)
    if size is not None and done != size:
        raise IntegrityError(f"{url}: got {done} bytes, the index names {size}")
    if sha256 is not None and digest.hexdigest() != sha256:
        raise IntegrityError(f"{url}: sha256 {digest.hexdigest()} does not match {sha256}")


class _Progress:
    """A ``label: done/total MB`` line on stderr, redrawn in place on a terminal."""

    def __init__(self, label: str, total: int | None) -> None:
        self._label = label
        self._total = total
        self._start = self._last = time.monotonic()
        self._tty = sys.stderr.isatty()

    def _line(self, done: int) -> str:
        total = f"/{self._total / 1e6:.1f}" if self._total else ""
        return f"{self._label}: {done / 1e6:.1f}{total} MB"

    def update(self, done: int) -> None:
        now = time.monotonic()
        if self._tty and now - self._last > 0.1:
            self._last = now
            sys.stderr.write("\r" + self._line(done))
            sys.stderr.flush()

    def finish(self, done: int) -> None:
        elapsed = time.monotonic() - self._start
        sys.stderr.write(("\r" if self._tty else "") + f"{self._line(done)} in {elapsed:.1f} s\n")
        sys.stderr.flush()


class DebianMirror:
    """One suite of a Debian mirror; ``keyring=None`` checks hashes only (with a warning)."""

    def __init__(self, suite: str, mirror: str | None = None, keyring: Path | None = None) -> None:
        self.suite = suite
        self.base = (mirror or mirror_url()).rstrip("/")
        self.keyring = keyring

    def release(self) -> dict[str, str]:
        """The suite's InRelease fields, signature checked; ``SHA256`` is kept raw."""
        with tempfile.TemporaryDirectory(prefix="sm-apt-") as tmp:
            signed = Path(tmp) / "InRelease"
            with signed.open("wb") as out:
                download(f"{self.base}/dists/{self.suite}/InRelease", out, label="InRelease")
            text = self._verified_text(signed, Path(tmp) / "InRelease.txt")
        fields = parse_stanza(text)
        if self.suite not in (fields.get("Suite"), fields.get("Codename")):
            raise IntegrityError(f"InRelease is for {fields.get('Codename')}, not {self.suite}")
        if "Valid-Until" in fields:
            valid_until = parsedate_to_datetime(fields["Valid-Until"])
            if valid_until < datetime.now(timezone.utc):
                raise IntegrityError(f"InRelease of {self.suite} expired on {fields['Valid-Until']}")
        return fields

    def _verified_text(self, signed: Path, plain: Path) -> str:
        if self.keyring is None:
            warnings.warn(
                f"{self.suite} InRelease: signature NOT checked (needs gpgv and {DEBIAN_KEYRING});"
                " only sha256 hashes are verified",
                UnverifiedReleaseWarning, stacklevel=3)
            return strip_clearsign(signed.read_text())
        result = subprocess.run(
            ["gpgv", "--keyring", str(self.keyring), "--output", str(plain), str(signed)],
            capture_output=True, text=True)
        if result.returncode != 0:
            raise IntegrityError(f"bad signature on {self.suite} InRelease: {result.stderr.strip()}")
        # Only the text gpgv vouches for is parsed, never the unsigned wrapper.
        return plain.read_text()

    def packages(self, release: dict[str, str]) -> list[Package]:
        """The suite's ``main/binary-amd64`` packages whose names start with ``linux-image-``."""
        index = f"{COMPONENT}/binary-{ARCH}/Packages.xz"
        sha256, size = release_checksum(release, index)
        url = f"{self.base}/dists/{self.suite}/{index}"
        if release.get("Acquire-By-Hash", "").lower() == "yes":
            # Immune to the mirror updating between InRelease and this request.
            url = f"{self.base}/dists/{self.suite}/{COMPONENT}/binary-{ARCH}/by-hash/SHA256/{sha256}"
        with tempfile.TemporaryFile() as tmp:
            download(url, tmp, sha256=sha256, size=size, label="Packages.xz")
            tmp.seek(0)
            try:
                text = lzma.decompress(tmp.read()).decode("utf-8", "replace")
            except lzma.LZMAError as exc:
                raise DebianError(f"{url}: not xz data: {exc}") from exc
        return [stanza_package(parse_stanza(s))
                for s in text.split("\n\n") if s.startswith("Package: linux-image-")]

    def download_package(self, package: Package, dest: BinaryIO) -> None:
        download(f"{self.base}/{package.filename}", dest, sha256=package.sha256,
                 size=package.size, label=package.filename.rsplit("/", 1)[-1])


def strip_clearsign(text: str) -> str:
    """The message inside an OpenPGP clear-signed text (used when gpgv is unavailable)."""
    lines = text.splitlines()
    try:
        start = lines.index("-----BEGIN PGP SIGNED MESSAGE-----")
        body = lines.index("", start) + 1          # after the armor headers ("Hash: ...")
        end = lines.index("-----BEGIN PGP SIGNATURE-----", body)
    except ValueError as exc:
        raise IntegrityError("InRelease is not a clear-signed message") from exc
    return "\n".join(line[2:] if line.startswith("- ") else line for line in lines[body:end]) + "\n"


def parse_stanza(text: str) -> dict[str, str]:
    """One deb822 paragraph; continuation lines are joined with newlines."""
    fields: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        if line[:1] in (" ", "\t") and key is not None:
            fields[key] += "\n" + line.strip()
        elif ":" in line:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def release_checksum(release: dict[str, str], path: str) -> tuple[str, int]:
    """``(sha256, size)`` that InRelease names for ``path``."""
    for line in release.get("SHA256", "").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == path:
            return _sha256_field(parts[0], path), int(parts[1])
    raise IntegrityError(f"InRelease has no SHA256 entry for {path}")


def stanza_package(fields: dict[str, str]) -> Package:
    try:
        name, filename = fields["Package"], fields["Filename"]
        package = Package(name, fields["Version"], filename, int(fields["Size"]),
                          _sha256_field(fields["SHA256"], name), fields.get("Depends", ""))
    except (KeyError, ValueError) as exc:
        raise DebianError(f"malformed Packages stanza for {fields.get('Package')}: {exc}") from exc
    if not filename.startswith("pool/") or ".." in filename.split("/"):
        raise DebianError(f"{name}: unexpected Filename {filename}")
    return package


def _sha256_field(value: str, what: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise IntegrityError(f"{what}: malformed sha256 {value!r}")
    return value


def iter_ar(f: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of each member of a Unix ``ar`` archive (the container of a .deb)."""
    if f.read(8) != b"!<arch>\n":
        raise DebianError("not an ar archive (.deb)")
    while header := f.read(60):
        if len(header) != 60 or header[58:60] != b"`\n":
            raise DebianError("truncated or corrupt ar member header")
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError as exc:
            raise DebianError(f"ar member {name}: bad size field") from exc
        data = f.read(size)
        if len(data) != size:
            raise DebianError(f"ar member {name} is truncated")
        f.read(size % 2)   # members are 2-byte aligned
        yield name, data
