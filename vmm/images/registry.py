"""Pull images with the OCI distribution protocol (``/v2/`` API) into the :class:`Store`.

A pull pings ``/v2/``, fetches the manifest by tag or digest (Docker schema 2 or OCI; an image
index or manifest list is narrowed to this host's platform), then the config and the layers in
parallel. Every blob is hashed as it streams into ``downloads/<hex>.partial``; a dropped
connection resumes with an HTTP Range request from where the partial ends, and only a blob whose
whole content matches its digest enters the store. The ref is written last, so a failed pull
leaves no ref and no unverified blob.

Registries on loopback (``localhost``, ``127.0.0.0/8``, ``::1``) are spoken to over plain HTTP,
as Docker does; so are hosts listed in ``$SM_INSECURE_REGISTRIES`` (``host:port,...``).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import ipaddress
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import requests
from tqdm import tqdm

from vmm.images.auth import RegistryAuth, load_credentials
from vmm.images.errors import ImageError
from vmm.images.reference import Reference, parse_reference
from vmm.images.store import (
    CHUNK,
    DOCKER_CONFIG,
    IMAGE_INDEXES,
    IMAGE_MANIFESTS,
    OCI_CONFIG,
    DigestMismatch,
    ImageRecord,
    Layer,
    Store,
    UnsupportedMediaType,
    check_digest,
    parse_image_manifest,
)

MANIFEST_ACCEPT = ", ".join((*IMAGE_MANIFESTS, *IMAGE_INDEXES))
MAX_MANIFEST_BYTES = 4 << 20
MAX_CONFIG_BYTES = 8 << 20
CONNECT_TIMEOUT = 10
READ_TIMEOUT = 60
DOWNLOAD_ATTEMPTS = 4
RETRY_DELAY = 0.5
PARALLEL_DOWNLOADS = 4
RETRYABLE_STATUS = (429, 500, 502, 503, 504)
SCHEMA1_TYPES = ("application/vnd.docker.distribution.manifest.v1+prettyjws",
                 "application/vnd.docker.distribution.manifest.v1+json")
_GO_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


class RegistryError(ImageError):
    """The registry answered something other than what the protocol promises."""


class RegistryUnreachable(RegistryError):
    """No connection to the registry."""


class ManifestUnknown(RegistryError):
    """The registry has no such repository, tag or digest."""


class PlatformNotFound(RegistryError):
    """The image has no manifest for this host's platform."""


class BlobDigestMismatch(RegistryError):
    """A blob's content does not hash to its digest."""


class DownloadInterrupted(RegistryError):
    """A blob download kept failing; what arrived is kept for the next pull to resume."""


class _Retry(Exception):
    """This attempt at a blob failed in a way another attempt may not (the text says how)."""


class _Cancelled(Exception):
    """Another download of the same pull failed: stop this one (its partial is kept)."""


def host_platform() -> tuple[str, str]:
    """``("linux", "amd64")`` on an x86-64 Linux host (Go's names, as in image indexes)."""
    machine = platform.machine().lower()
    return "linux", _GO_ARCH.get(machine, machine)


def registry_scheme(host: str) -> str:
    """``http`` for loopback and ``$SM_INSECURE_REGISTRIES`` hosts, ``https`` otherwise."""
    insecure = {h.strip() for h in os.environ.get("SM_INSECURE_REGISTRIES", "").split(",")}
    if host in insecure:
        return "http"
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]")
    if name == "localhost":
        return "http"
    try:
        return "http" if ipaddress.ip_address(name).is_loopback else "https"
    except ValueError:
        return "https"


def _registry_message(response: requests.Response) -> str:
    """The first ``errors[].code: message`` of a registry error body, if any."""
    try:
        first = response.json()["errors"][0]
        return f"{first.get('code', '')}: {first.get('message', '')}".strip(": ")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return response.reason or ""


def _read_limited(response: requests.Response, limit: int, what: str) -> bytes:
    chunks, total = [], 0
    for chunk in response.iter_content(CHUNK):
        total += len(chunk)
        if total > limit:
            raise RegistryError(f"{what} is larger than {limit >> 20} MiB: refusing it")
        chunks.append(chunk)
    return b"".join(chunks)


class RegistryClient:
    """One registry, one repository: the requests, the auth and the downloads of a pull."""

    def __init__(self, reference: Reference, store: Store, *, session: requests.Session | None
                 = None, docker_config: Path | None = None, progress: bool | None = None,
                 parallel: int = PARALLEL_DOWNLOADS):
        self.reference = reference
        self.store = store
        self.host = reference.registry_host
        self.base = f"{registry_scheme(self.host)}://{self.host}/v2"
        self.session = session or requests.Session()
        self.auth = RegistryAuth(self.host, self.session, load_credentials(self.host,
                                                                           docker_config))
        self.scope = f"repository:{reference.path}:pull"
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.parallel = parallel
        self.fetched: list[str] = []         # blobs this pull added to the store
        self._cancel = threading.Event()

    # ---- requests -----------------------------------------------------------------------

    def _request(self, path: str, headers: dict[str, str] | None = None,
                 stream: bool = False) -> requests.Response:
        """GET ``/v2{path}``, answering one auth challenge; raises requests' errors as is."""
        headers = dict(headers or {})
        known = self.auth.header_for(self.scope)
        if known:
            headers["Authorization"] = known
        url = self.base + path
        response = self.session.get(url, headers=headers, stream=stream,
                                    timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
        if response.status_code != 401:
            return response
        response.close()
        challenge = response.headers.get("WWW-Authenticate")
        if not challenge:
            raise RegistryError(f"registry {self.host} answered 401 without a challenge")
        headers["Authorization"] = self.auth.answer(challenge, self.scope)
        response = self.session.get(url, headers=headers, stream=stream,
                                    timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
        if response.status_code == 401:
            response.close()
            raise self.auth.refused(self.scope)
        return response

    def _failed(self, response: requests.Response, what: str) -> RegistryError:
        return RegistryError(f"registry {self.host} answered HTTP {response.status_code} for "
                             f"{what}: {_registry_message(response)}")

    def ping(self) -> None:
        """Check that ``/v2/`` is a distribution API (200, or 401 with a challenge)."""
        response = self.session.get(self.base + "/", timeout=(CONNECT_TIMEOUT, READ_TIMEOUT))
        response.close()
        if response.status_code not in (200, 401):
            raise RegistryError(f"{self.base}/ answered HTTP {response.status_code}: "
                                f"{self.host} does not look like an image registry")

    # ---- manifests ----------------------------------------------------------------------

    def fetch_manifest(self, target: str) -> tuple[str, bytes, str]:
        """(media type, bytes, digest) of the manifest ``target`` (a tag or a digest)."""
        response = self._request(f"/{self.reference.path}/manifests/{target}",
                                 {"Accept": MANIFEST_ACCEPT}, stream=True)
        with response:
            if response.status_code == 404:
                raise ManifestUnknown(f"registry {self.host} has no image "
                                      f"{self.reference.repository}:{target} "
                                      f"({_registry_message(response)}): check the name and tag")
            if response.status_code != 200:
                raise self._failed(response, f"manifest {target}")
            data = _read_limited(response, MAX_MANIFEST_BYTES, f"manifest {target}")
            content_type = response.headers.get("Content-Type", "").split(";")[0].strip()
            announced = response.headers.get("Docker-Content-Digest")
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        expected = target if target.startswith("sha256:") else announced
        if expected and expected.startswith("sha256:") and digest != expected:
            raise BlobDigestMismatch(f"manifest {target} from {self.host} hashes to {digest}, "
                                     f"not {expected}: the registry served corrupt data")
        try:
            body = json.loads(data)
        except ValueError:
            raise RegistryError(f"manifest {target} from {self.host} is not JSON") from None
        media_type = (body.get("mediaType") if isinstance(body, dict) else None) or content_type
        if media_type in SCHEMA1_TYPES:
            raise UnsupportedMediaType(f"{self.reference.familiar} has an old Docker schema 1 "
                                       "manifest, which sm does not read: push it again with a "
                                       "current docker or skopeo")
        if media_type not in (*IMAGE_MANIFESTS, *IMAGE_INDEXES) and isinstance(body, dict):
            media_type = IMAGE_INDEXES[0] if "manifests" in body else IMAGE_MANIFESTS[0]
        return media_type, data, digest

    def _platform_manifest(self, index: bytes) -> str:
        """The digest of the index entry for this host's platform."""
        os_name, arch = host_platform()
        try:
            entries = json.loads(index)["manifests"]
            platforms = [(entry.get("platform") or {}, entry["digest"]) for entry in entries]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise RegistryError(f"the image index of {self.reference.familiar} is malformed") \
                from None
        for platform_, digest in platforms:
            if platform_.get("os") == os_name and platform_.get("architecture") == arch:
                check_digest(digest)
                return digest
        seen = sorted({f"{p.get('os')}/{p.get('architecture')}"
                       + (f"/{p['variant']}" if p.get("variant") else "")
                       for p, _ in platforms if p.get("os") not in (None, "unknown")})
        raise PlatformNotFound(f"image {self.reference.familiar} has no {os_name}/{arch} "
                               f"manifest (has: {', '.join(seen) or 'none'})")

    # ---- blobs --------------------------------------------------------------------------

    def _download_once(self, digest: str, size: int, bar: tqdm) -> hashlib._Hash:
        """One GET of the blob into its partial (resuming with Range); returns the hasher of
        the whole partial. Raises :class:`_Retry` when another attempt may do better."""
        partial = self.store.partial_path(digest)
        offset = partial.stat().st_size if partial.exists() else 0
        if offset > size:
            partial.unlink()
            offset = 0
        hasher = hashlib.sha256()
        if offset:
            with open(partial, "rb") as existing:    # the kept prefix is verified too
                while chunk := existing.read(CHUNK):
                    hasher.update(chunk)
        if offset == size and size:
            return hasher
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        response = self._request(f"/{self.reference.path}/blobs/{digest}", headers, stream=True)
        with response:
            if response.status_code == 206 and response.headers.get(
                    "Content-Range", "").startswith(f"bytes {offset}-"):
                mode = "ab"
            elif response.status_code == 200:
                mode, offset, hasher = "wb", 0, hashlib.sha256()
            elif response.status_code == 416:      # the partial is stale: start over
                partial.unlink(missing_ok=True)
                raise _Retry("the registry refused the resume range")
            elif response.status_code in RETRYABLE_STATUS:
                raise _Retry(f"HTTP {response.status_code}")
            elif response.status_code == 404:
                raise RegistryError(f"registry {self.host} has no blob {digest} that "
                                    f"{self.reference.familiar} names: the image is incomplete")
            else:
                raise self._failed(response, f"blob {digest}")
            bar.reset(total=size)
            bar.update(offset)
            written = offset
            with self.store.writing(), open(partial, mode) as output:
                for chunk in response.iter_content(CHUNK):
                    if self._cancel.is_set():
                        raise _Cancelled()
                    written += len(chunk)
                    if written > size:
                        partial.unlink(missing_ok=True)
                        raise BlobDigestMismatch(f"blob {digest} from {self.host} is longer "
                                                 f"than the {size} bytes its manifest says")
                    hasher.update(chunk)
                    output.write(chunk)
                    bar.update(len(chunk))
        if written != size:
            raise _Retry("the body ended early")
        return hasher

    def fetch_blob(self, digest: str, size: int, position: int = 0) -> None:
        """Download a blob into the store unless it is there; verified, resumable."""
        check_digest(digest)
        if self.store.has_blob(digest):
            return
        with self.store.download_lock(digest), tqdm(
                total=size, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                desc=digest[7:19], position=position, disable=not self.progress) as bar:
            if self.store.has_blob(digest):      # another process fetched it meanwhile
                return
            for attempt in range(DOWNLOAD_ATTEMPTS):
                try:
                    hasher = self._download_once(digest, size, bar)
                except _Retry as error:
                    failure = str(error)
                except (requests.ConnectionError, requests.Timeout,
                        requests.exceptions.ChunkedEncodingError) as error:
                    failure = type(error).__name__
                else:
                    try:
                        self.store.commit_partial(digest, "sha256:" + hasher.hexdigest())
                    except DigestMismatch:
                        raise BlobDigestMismatch(
                            f"blob {digest} from {self.host} does not match its digest: the "
                            "registry served corrupt data (nothing was stored)") from None
                    self.fetched.append(digest)
                    return
                time.sleep(RETRY_DELAY * (attempt + 1))
        partial = self.store.partial_path(digest)
        kept = partial.stat().st_size if partial.exists() else 0
        raise DownloadInterrupted(f"download of blob {digest[:19]} from {self.host} failed "
                                  f"{DOWNLOAD_ATTEMPTS} times ({failure}) after {kept} of {size} "
                                  f"bytes: run `sm pull {self.reference.familiar}` again to "
                                  "resume")

    def _fetch_config(self, descriptor: dict) -> dict:
        digest, size = descriptor["digest"], int(descriptor.get("size", 0))
        if descriptor.get("mediaType") not in (OCI_CONFIG, DOCKER_CONFIG):
            raise UnsupportedMediaType(f"{self.reference.familiar} is not a container image: "
                                       f"its config is {descriptor.get('mediaType')}")
        if size > MAX_CONFIG_BYTES:
            raise RegistryError(f"the config of {self.reference.familiar} is {size} bytes: "
                                "refusing it")
        self.fetch_blob(digest, size)
        try:
            config = json.loads(self.store.read_blob(digest))
        except ValueError:
            raise RegistryError(f"the config of {self.reference.familiar} is not JSON") from None
        os_name, arch = host_platform()
        image_platform = f"{config.get('os')}/{config.get('architecture')}"
        if image_platform != f"{os_name}/{arch}":
            raise PlatformNotFound(f"image {self.reference.familiar} has no {os_name}/{arch} "
                                   f"manifest (has: {image_platform})")
        return config

    # ---- the pull -----------------------------------------------------------------------

    def pull(self) -> ImageRecord:
        self.ping()
        media_type, manifest, _ = self.fetch_manifest(self.reference.target)
        if media_type in IMAGE_INDEXES:
            media_type, manifest, _ = self.fetch_manifest(self._platform_manifest(manifest))
            if media_type not in IMAGE_MANIFESTS:
                raise UnsupportedMediaType(f"the {'/'.join(host_platform())} entry of "
                                           f"{self.reference.familiar} is {media_type}, not an "
                                           "image manifest")
        config_descriptor, layers = parse_image_manifest(
            manifest, f"the manifest of {self.reference.familiar}")
        try:
            with self.store.ingest():
                self._fetch_config(config_descriptor)
                self._fetch_layers(layers)
                return self.store.add_manifest(str(self.reference), manifest)
        except BaseException:
            # Nothing untagged stays in the blobs: layers this pull stored go back to partials
            # (verified again when the next pull uses them), the rest is deleted.
            self.store.gc(wait=False, resumable={layer.digest for layer in layers}
                          & set(self.fetched))
            raise

    def _fetch_layers(self, layers: list[Layer]) -> None:
        with concurrent.futures.ThreadPoolExecutor(self.parallel) as pool:
            futures = [pool.submit(self.fetch_blob, layer.digest, layer.size, position)
                       for position, layer in enumerate(layers)]
            try:
                for future in concurrent.futures.as_completed(futures):
                    future.result()
            except BaseException:
                self._cancel.set()
                for future in futures:
                    future.cancel()
                raise


def pull(ref: str | Reference, store: Store | None = None, **options) -> ImageRecord:
    """Pull ``ref`` into ``store`` (default: the user's); raises :class:`ImageError` subclasses
    with one line for the user."""
    reference = ref if isinstance(ref, Reference) else parse_reference(ref)
    client = RegistryClient(reference, store or Store(), **options)
    try:
        return client.pull()
    except requests.exceptions.SSLError:
        raise RegistryUnreachable(f"TLS with registry {client.host} failed: if it speaks plain "
                                  "HTTP, add it to SM_INSECURE_REGISTRIES") from None
    except (requests.ConnectionError, requests.Timeout) as error:
        raise RegistryUnreachable(f"cannot reach registry {client.host} at {client.base}/ "
                                  f"({type(error).__name__}): check the name and that it is "
                                  "running") from None
    except requests.RequestException as error:
        raise RegistryError(f"talking to registry {client.host} failed: {error}") from None
