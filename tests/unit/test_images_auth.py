"""Docker config credentials and WWW-Authenticate challenges."""

import base64
import json
import os
import stat

import pytest

from vmm.images.auth import DockerConfigError, load_credentials, parse_challenge


def write_config(tmp_path, config: dict):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_auths_entry_by_host(tmp_path):
    path = write_config(tmp_path, {"auths": {"reg.example:5000": {"auth": b64("u:p:with:colons")},
                                             "other.example": {"auth": b64("x:y")}}})
    credentials = load_credentials("reg.example:5000", path)
    assert (credentials.username, credentials.password) == ("u", "p:with:colons")
    assert credentials.basic_header() == "Basic " + b64("u:p:with:colons")
    assert load_credentials("nowhere.example", path) is None


def test_keys_with_scheme_and_docker_hub_aliases(tmp_path):
    path = write_config(tmp_path, {"auths": {
        "https://index.docker.io/v1/": {"auth": b64("hub:secret")},
        "http://reg.example/v2/": {"username": "plain", "password": "pw"}}})
    for host in ("registry-1.docker.io", "docker.io"):
        assert load_credentials(host, path).username == "hub"
    assert load_credentials("reg.example", path).password == "pw"


def test_docker_config_env(tmp_path, monkeypatch):
    write_config(tmp_path, {"auths": {"h.example": {"auth": b64("env:pw")}}})
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    assert load_credentials("h.example").username == "env"


def test_missing_config_means_anonymous(tmp_path):
    assert load_credentials("h.example", tmp_path / "absent.json") is None


@pytest.mark.parametrize("content, why", [
    ("{not json", "cannot read Docker config"),
    ("[]", "is not a JSON object"),
    (json.dumps({"auths": {"h.example": {"auth": b64("no-colon")}}}), "not base64 of user:pass"),
    (json.dumps({"auths": {"h.example": {"auth": "%%%"}}}), "not base64 of user:pass"),
])
def test_damaged_config(tmp_path, content, why):
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(DockerConfigError) as error:
        load_credentials("h.example", path)
    assert why in str(error.value)


def test_credential_helper(tmp_path, monkeypatch):
    helper = tmp_path / "bin" / "docker-credential-fake"
    helper.parent.mkdir()
    helper.write_text("#!/bin/sh\nread host\n[ \"$host\" = h.example ] || exit 1\n"
                      'echo \'{"ServerURL":"h.example","Username":"helped","Secret":"s"}\'\n')
    helper.chmod(helper.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{helper.parent}{os.pathsep}{os.environ['PATH']}")
    path = write_config(tmp_path, {"credHelpers": {"h.example": "fake"}})
    credentials = load_credentials("h.example", path)
    assert (credentials.username, credentials.password) == ("helped", "s")
    assert load_credentials("other.example", path) is None
    assert load_credentials("other.example",
                            write_config(tmp_path, {"credsStore": "fake"})) is None


def test_parse_bearer_challenge():
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/python:pull,push"')
    assert scheme == "bearer"
    assert params == {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                      "scope": "repository:library/python:pull,push"}


def test_parse_basic_and_escaped_challenges():
    assert parse_challenge('Basic realm="Registry Realm"') == ("basic",
                                                               {"realm": "Registry Realm"})
    assert parse_challenge('Bearer realm="a\\"b", error=insufficient_scope') == (
        "bearer", {"realm": 'a"b', "error": "insufficient_scope"})
