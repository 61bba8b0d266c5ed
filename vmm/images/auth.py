"""Registry credentials and the ``WWW-Authenticate`` challenge dance.

Credentials come from Docker's client config (``$DOCKER_CONFIG/config.json`` or
``~/.docker/config.json``): ``auths[host].auth`` (base64 ``user:password``), or a credential
helper named by ``credHelpers`` / ``credsStore``. A registry answers 401 with a challenge:
``Basic realm=...`` (send the credentials) or ``Bearer realm=...,service=...,scope=...`` (get a
token from the realm, with the credentials if there are any, and send that). Tokens are cached
per scope until they expire.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from vmm.images.errors import ImageError
from vmm.images.reference import DOCKER_HUB, DOCKER_HUB_REGISTRY

TOKEN_REQUEST_TIMEOUT = 30
DEFAULT_TOKEN_LIFETIME = 60          # seconds, as the token spec says when expires_in is absent
TOKEN_EXPIRY_MARGIN = 10
_DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", DOCKER_HUB,
                    DOCKER_HUB_REGISTRY)


class AuthError(ImageError):
    """A registry asked for credentials we do not have, or refused the ones we sent."""


class DockerConfigError(ImageError):
    """The Docker client config could not be read."""


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str
    source: str       # where they came from, for messages

    def basic_header(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


def docker_config_path() -> Path:
    directory = os.environ.get("DOCKER_CONFIG")
    return (Path(directory) if directory else Path.home() / ".docker") / "config.json"


def _host_of(key: str) -> str:
    """``https://host:5000/v2/`` → ``host:5000`` (config keys may carry a scheme and a path)."""
    return re.sub(r"^[a-z]+://", "", key).split("/", 1)[0]


def _from_helper(helper: str, host: str, source: str) -> Credentials | None:
    try:
        result = subprocess.run([f"docker-credential-{helper}", "get"], input=host.encode(),
                                capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise DockerConfigError(f"credential helper docker-credential-{helper} (named in "
                                f"{source}) could not run: {error}") from None
    if result.returncode != 0:
        return None       # the helper has nothing for this host
    try:
        answer = json.loads(result.stdout)
        return Credentials(answer["Username"], answer["Secret"], f"docker-credential-{helper}")
    except (ValueError, KeyError, TypeError):
        raise DockerConfigError(f"docker-credential-{helper} answered something that is not "
                                "credentials JSON") from None


def load_credentials(host: str, config_path: Path | None = None) -> Credentials | None:
    """The credentials Docker would use for registry ``host``, or None."""
    path = config_path or docker_config_path()
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise DockerConfigError(f"cannot read Docker config {path}: {error}") from None
    if not isinstance(config, dict):
        raise DockerConfigError(f"Docker config {path} is not a JSON object")
    is_hub = host in _DOCKER_HUB_KEYS
    wanted = {_host_of(key) for key in _DOCKER_HUB_KEYS} if is_hub else {host}
    for key, entry in (config.get("auths") or {}).items():
        if _host_of(key) not in wanted or not isinstance(entry, dict):
            continue
        if entry.get("auth"):
            try:
                username, sep, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                sep = ""
            if not sep:
                raise DockerConfigError(f"auths[{key!r}].auth in {path} is not base64 of "
                                        "user:password; log in again")
            return Credentials(username, password, str(path))
        if entry.get("username") and entry.get("password"):
            return Credentials(entry["username"], entry["password"], str(path))
    helper_key = _DOCKER_HUB_KEYS[0] if is_hub else host
    helper = (config.get("credHelpers") or {}).get(helper_key) or config.get("credsStore")
    return _from_helper(helper, helper_key, str(path)) if helper else None


_CHALLENGE_PARAM = re.compile(r'\s*([A-Za-z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*,?')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="r",service="s"`` → ``("bearer", {"realm": "r", "service": "s"})``."""
    scheme, _, rest = header.strip().partition(" ")
    params = {}
    for match in _CHALLENGE_PARAM.finditer(rest):
        quoted, bare = match.group(2), match.group(3)
        params[match.group(1).lower()] = (re.sub(r"\\(.)", r"\1", quoted) if quoted is not None
                                          else bare)
    return scheme.lower(), params


class RegistryAuth:
    """Answers one registry's challenges; thread-safe (layers download in parallel)."""

    def __init__(self, host: str, session: requests.Session, credentials: Credentials | None):
        self.host = host
        self._session = session
        self._credentials = credentials
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[str, float]] = {}      # scope → (token, expiry)
        self._bearer: dict[str, str] | None = None           # the last bearer challenge
        self._basic = False

    def header_for(self, scope: str) -> str | None:
        """The Authorization header to send for ``scope`` before any challenge, if known."""
        with self._lock:
            if self._basic and self._credentials:
                return self._credentials.basic_header()
            token = self._tokens.get(scope)
            if token and token[1] > time.monotonic():
                return f"Bearer {token[0]}"
        return None

    def answer(self, challenge_header: str, scope: str) -> str:
        """The Authorization header that answers a 401's challenge; raises :class:`AuthError`."""
        scheme, params = parse_challenge(challenge_header)
        if scheme == "basic":
            if not self._credentials:
                raise AuthError(f"registry {self.host} needs a user name and password: log in "
                                f"with `docker login {self.host}` (sm reads "
                                f"{docker_config_path()})")
            with self._lock:
                self._basic = True
            return self._credentials.basic_header()
        if scheme != "bearer" or not params.get("realm"):
            raise AuthError(f"registry {self.host} asks for authentication sm does not speak: "
                            f"{challenge_header[:80]!r}")
        with self._lock:
            self._bearer = params
        token = self._fetch_token(params, params.get("scope") or scope)
        with self._lock:      # kept under our scope: that is what the next request looks up
            self._tokens[scope] = token
        return f"Bearer {token[0]}"

    def _fetch_token(self, challenge: dict[str, str], scope: str) -> tuple[str, float]:
        """(token, expiry) from the challenge's realm."""
        query = {"scope": scope}
        if challenge.get("service"):
            query["service"] = challenge["service"]
        headers = {}
        if self._credentials:
            headers["Authorization"] = self._credentials.basic_header()
        try:
            response = self._session.get(challenge["realm"], params=query, headers=headers,
                                         timeout=TOKEN_REQUEST_TIMEOUT)
        except requests.RequestException as error:
            raise AuthError(f"cannot get a token for {self.host} from {challenge['realm']}: "
                            f"{type(error).__name__}") from None
        if response.status_code in (401, 403):
            who = (f"user {self._credentials.username!r} (from {self._credentials.source})"
                   if self._credentials else "anonymous pulls")
            raise AuthError(f"registry {self.host} refused {who} for {scope}: check the "
                            f"credentials with `docker login {self.host}`")
        if not response.ok:
            raise AuthError(f"token server {challenge['realm']} answered HTTP "
                            f"{response.status_code} for {scope}")
        try:
            body = response.json()
            token = body.get("token") or body.get("access_token")
            lifetime = int(body.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
        except (ValueError, AttributeError, TypeError):
            token = None
        if not isinstance(token, str) or not token:
            raise AuthError(f"token server {challenge['realm']} answered without a token")
        return token, time.monotonic() + max(lifetime - TOKEN_EXPIRY_MARGIN, 1)

    def refused(self, scope: str) -> AuthError:
        """The error for a 401 that follows our answer to the challenge."""
        with self._lock:
            self._tokens.pop(scope, None)
        if self._credentials:
            return AuthError(f"registry {self.host} refused user "
                             f"{self._credentials.username!r} (from {self._credentials.source}): "
                             f"check the password with `docker login {self.host}`")
        return AuthError(f"registry {self.host} refused anonymous access to {scope}: log in "
                         f"with `docker login {self.host}`, or check the image name")
