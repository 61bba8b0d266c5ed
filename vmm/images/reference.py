"""Image references, normalised as Docker does.

``python:3.12-slim`` means ``docker.io/library/python:3.12-slim``; the first path component is a
registry host only when it has a ``.`` or a ``:`` or is ``localhost``; a reference with neither tag
nor digest means ``:latest``. The grammar is distribution's ``reference`` package's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vmm.images.errors import ImageError

DOCKER_HUB = "docker.io"
DOCKER_HUB_REGISTRY = "registry-1.docker.io"   # where docker.io's API actually lives
DEFAULT_TAG = "latest"
MAX_NAME_LENGTH = 255

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])"
                     r"(?::[0-9]+)?")
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}")
_SHA256_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_IMAGE_ID = re.compile(r"[0-9a-f]{64}")


class InvalidReference(ImageError):
    """The text is not an image reference."""


@dataclass(frozen=True)
class Reference:
    """A normalised reference: ``domain/path[:tag][@digest]``."""

    domain: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def repository(self) -> str:
        """``domain/path``, e.g. ``docker.io/library/python``."""
        return f"{self.domain}/{self.path}"

    @property
    def registry_host(self) -> str:
        """The host (and port) the distribution API is served from."""
        return DOCKER_HUB_REGISTRY if self.domain == DOCKER_HUB else self.domain

    @property
    def target(self) -> str:
        """What to ask the registry's manifest endpoint for: the digest if pinned, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    def __str__(self) -> str:
        return (self.repository + (f":{self.tag}" if self.tag else "")
                + (f"@{self.digest}" if self.digest else ""))

    @property
    def familiar(self) -> str:
        """The short form Docker prints: ``python:3.12-slim``, ``127.0.0.1:5000/x:latest``."""
        text = str(self)
        if self.domain == DOCKER_HUB:
            text = text[len(DOCKER_HUB) + 1:]
            if text.startswith("library/") and "/" not in self.path[len("library/"):]:
                text = text[len("library/"):]
        return text


def _split_domain(name: str) -> tuple[str, str]:
    first, slash, rest = name.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        domain, path = first, rest
    else:
        domain, path = DOCKER_HUB, name
    if domain == "index.docker.io":
        domain = DOCKER_HUB
    if domain == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    return domain, path


def parse_reference(text: str) -> Reference:
    """Parse and normalise ``text``; raises :class:`InvalidReference` with the reason."""
    def invalid(why: str) -> InvalidReference:
        return InvalidReference(f"invalid image reference {text!r}: {why}")

    if not text:
        raise invalid("it is empty")
    if _IMAGE_ID.fullmatch(text):
        raise invalid("a 64-hex image ID is not a name; use sha256:ID to name an image by digest")
    name, at, digest = text.partition("@")
    if at and not _DIGEST.fullmatch(digest):
        raise invalid(f"{digest!r} is not a digest (ALGORITHM:HEX)")
    if at and digest.startswith("sha256:") and not _SHA256_DIGEST.fullmatch(digest):
        raise invalid("a sha256 digest is 64 lowercase hex digits")
    tag = None
    last_slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > last_slash:
        name, tag = name[:colon], name[colon + 1:]
        if not _TAG.fullmatch(tag):
            raise invalid(f"{tag!r} is not a tag (letters, digits, '_', '.', '-'; at most 128)")
    domain, path = _split_domain(name)
    if not _DOMAIN.fullmatch(domain):
        raise invalid(f"{domain!r} is not a registry host")
    for component in path.split("/"):
        if not _PATH_COMPONENT.fullmatch(component):
            raise invalid(f"repository name component {component!r} must be lowercase letters, "
                          "digits and single separators (. _ __ -)")
    if len(f"{domain}/{path}") > MAX_NAME_LENGTH:
        raise invalid(f"the name is longer than {MAX_NAME_LENGTH} characters")
    if tag is None and not at:
        tag = DEFAULT_TAG
    return Reference(domain, path, tag, digest or None)
