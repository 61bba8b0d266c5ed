"""A real registry on loopback for the pull tests: Debian's ``docker-registry``.

Three registry processes serve one storage directory: ``registry`` (anonymous; the tests push to
it with ``skopeo``), ``basic_registry`` (htpasswd basic auth, bcrypt hash from ``htpasswd -B``)
and ``token_registry`` (bearer tokens from :mod:`tests.images.token_server`). ``pushed`` builds
the test images as OCI layouts in Python and pushes them with ``skopeo copy --preserve-digests``,
so the digests the tests assert are the ones the layouts hold.
"""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest

from tests.images import images_for_tests
from tests.images.registry_process import (
    Registry,
    RegistryStartError,
    skopeo_push,
    start_registry,
    stop_registry,
)
from tests.images.token_server import TokenServer

USERNAME, PASSWORD = "smtest", "s3cret-pass"


def _start(directory: Path, storage: Path, auth: dict | None = None) -> Registry:
    try:
        return start_registry(directory, storage, auth)
    except RegistryStartError as error:
        pytest.fail(str(error), pytrace=False)


@pytest.fixture(scope="session")
def registry_storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("registry-storage")


@pytest.fixture(scope="session")
def registry(registry_storage, tmp_path_factory):
    started = _start(tmp_path_factory.mktemp("registry"), registry_storage)
    yield started
    stop_registry(started)


@pytest.fixture(scope="session")
def basic_registry(registry_storage, tmp_path_factory):
    directory = tmp_path_factory.mktemp("basic-registry")
    htpasswd = subprocess.run(["htpasswd", "-nbB", USERNAME, PASSWORD], check=True,
                              capture_output=True, text=True).stdout
    (directory / "htpasswd").write_text(htpasswd)
    started = _start(directory, registry_storage, {
        "htpasswd": {"realm": "sm-tests", "path": str(directory / "htpasswd")}})
    yield started
    stop_registry(started)


@pytest.fixture(scope="session")
def token_server(tmp_path_factory):
    server = TokenServer(tmp_path_factory.mktemp("token"), USERNAME, PASSWORD)
    yield server
    server.close()


@pytest.fixture(scope="session")
def token_registry(registry_storage, tmp_path_factory, token_server):
    started = _start(tmp_path_factory.mktemp("token-registry"), registry_storage,
                             token_server.registry_auth_config())
    yield started
    stop_registry(started)


@pytest.fixture(scope="session")
def pushed(registry, tmp_path_factory) -> images_for_tests.TestImages:
    """Every test image, built and pushed to ``registry`` (and so served by all three)."""
    layout_dir = tmp_path_factory.mktemp("layout")
    images = images_for_tests.build(layout_dir)
    for tag, repository, extra in images.pushes:
        skopeo_push(layout_dir, tag, registry.ref(repository), *extra)
    return images


@pytest.fixture
def docker_config(tmp_path):
    """Write a Docker client config with the given credentials for a host; returns its path."""
    def write(host: str, username: str = USERNAME, password: str = PASSWORD) -> Path:
        path = tmp_path / "docker-config" / "config.json"
        path.parent.mkdir(exist_ok=True)
        token = base64.b64encode(f"{username}:{password}".encode()).decode()
        path.write_text(json.dumps({"auths": {host: {"auth": token}}}))
        return path
    return write
