"""Image references normalise as Docker's do."""

import pytest

from vmm.images.reference import InvalidReference, parse_reference

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text, normalised, host, familiar", [
    ("python:3.12-slim", "docker.io/library/python:3.12-slim", "registry-1.docker.io",
     "python:3.12-slim"),
    ("python", "docker.io/library/python:latest", "registry-1.docker.io", "python:latest"),
    ("jupyter/base-notebook", "docker.io/jupyter/base-notebook:latest", "registry-1.docker.io",
     "jupyter/base-notebook:latest"),
    ("index.docker.io/library/busybox:1", "docker.io/library/busybox:1", "registry-1.docker.io",
     "busybox:1"),
    ("localhost/x", "localhost/x:latest", "localhost", "localhost/x:latest"),
    ("localhost:5000/x", "localhost:5000/x:latest", "localhost:5000", "localhost:5000/x:latest"),
    ("ghcr.io/a/b/c:v1.0", "ghcr.io/a/b/c:v1.0", "ghcr.io", "ghcr.io/a/b/c:v1.0"),
    (f"registry:5000/a/b@{DIGEST}", f"registry:5000/a/b@{DIGEST}", "registry:5000",
     f"registry:5000/a/b@{DIGEST}"),
    (f"python:3@{DIGEST}", f"docker.io/library/python:3@{DIGEST}", "registry-1.docker.io",
     f"python:3@{DIGEST}"),
    ("[::1]:5000/img:t", "[::1]:5000/img:t", "[::1]:5000", "[::1]:5000/img:t"),
    ("a__b/c.d-e---f:T_1.x", "docker.io/a__b/c.d-e---f:T_1.x", "registry-1.docker.io",
     "a__b/c.d-e---f:T_1.x"),
])
def test_normalisation(text, normalised, host, familiar):
    reference = parse_reference(text)
    assert str(reference) == normalised
    assert reference.registry_host == host
    assert reference.familiar == familiar
    assert parse_reference(str(reference)) == reference


def test_digest_pins_the_target():
    reference = parse_reference(f"127.0.0.1:5000/x:v1@{DIGEST}")
    assert (reference.tag, reference.digest, reference.target) == ("v1", DIGEST, DIGEST)
    assert parse_reference("x").target == "latest"
    assert parse_reference(f"x@{DIGEST}").tag is None


@pytest.mark.parametrize("text, why", [
    ("", "it is empty"),
    ("Python:3", "must be lowercase"),
    ("python:", "is not a tag"),
    ("python:bad/tag", "'python:bad' is not a registry host"),   # a ':' makes it a host
    ("a_b.io/x", "'a_b.io' is not a registry host"),
    ("python@sha256:123", "is not a digest"),
    ("python@sha256:" + "AB" * 32, "64 lowercase hex"),
    ("a//b", "component ''"),
    ("a/b-", "component 'b-'"),
    ("-host.io/x", "is not a registry host"),
    ("ab" * 32, "64-hex image ID"),
    ("x" * 300, "longer than 255"),
    ("python:" + "t" * 129, "is not a tag"),
])
def test_invalid_references_say_why(text, why):
    with pytest.raises(InvalidReference) as error:
        parse_reference(text)
    assert why in str(error.value)
    assert str(error.value).startswith(f"invalid image reference {text!r}")
