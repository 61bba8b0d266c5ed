"""The images the pull tests push to the loopback registry, built as one OCI layout.

* ``features``: a linux/amd64 + linux/arm64 index. The amd64 image has a gzip base layer (a
  0-byte file, a hard link, a symlink loop, an owned executable, directories to delete) and a zstd
  layer on top with whiteouts (a file, a directory) and an opaque directory.
* ``big``: the same base layer (so it is stored once) and an uncompressed layer holding a 100 MB
  pseudo-random file.
* ``armonly`` (one arm64 manifest) and ``armindex`` (arm64 + s390x): nothing for this host.
* ``corrupt``: a layer the tests damage in the registry's storage.
* ``small``: one layer; pushed as OCI and, converted by skopeo, as Docker schema 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.images.oci_layout import (
    LAYER_GZIP,
    LAYER_TAR,
    LAYER_ZSTD,
    BuiltImage,
    Entry,
    Layout,
    pseudo_random,
)

BIG_FILE_SIZE = 100 * 1000 * 1000
BIG_FILE_SEED = 42

BASE_LAYER = [
    Entry("etc/", "dir"),
    Entry("etc/hello", data=b"hello\n"),
    Entry("data/", "dir"),
    Entry("data/empty"),
    Entry("data/original", data=b"linked content\n"),
    Entry("data/hardlink", "hardlink", target="data/original"),
    Entry("loop/", "dir"),
    Entry("loop/a", "symlink", target="b"),
    Entry("loop/b", "symlink", target="a"),
    Entry("old/", "dir"),
    Entry("old/keep", data=b"keep\n"),
    Entry("old/gone-file", data=b"deleted above\n"),
    Entry("opaque/", "dir"),
    Entry("opaque/from-lower", data=b"hidden by the opaque dir\n"),
    Entry("gone-dir/", "dir"),
    Entry("gone-dir/file", data=b"deleted with its dir\n"),
    Entry("bin/", "dir"),
    Entry("bin/tool", data=b"#!/bin/sh\necho tool\n", mode=0o755, uid=1000, gid=1000),
]

UPPER_LAYER = [
    Entry(".wh.gone-dir"),
    Entry("old/", "dir"),
    Entry("old/.wh.gone-file"),
    Entry("opaque/", "dir"),
    Entry("opaque/.wh..wh..opq"),
    Entry("opaque/from-upper", data=b"only this one\n"),
    Entry("etc/", "dir"),
    Entry("etc/hello", data=b"hello again\n"),
]


@dataclass
class TestImages:
    features_amd64: BuiltImage
    features_arm64: BuiltImage
    features_index: str
    big: BuiltImage
    armonly: BuiltImage
    corrupt: BuiltImage
    small: BuiltImage
    pushes: list[tuple[str, str, tuple[str, ...]]]     # (layout tag, repo:tag, skopeo options)

    __test__ = False        # not a pytest test class


def build(directory: Path) -> TestImages:
    layout = Layout(directory)
    amd64 = layout.image([(BASE_LAYER, LAYER_GZIP), (UPPER_LAYER, LAYER_ZSTD)],
                         config={"config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/tool"],
                                            "WorkingDir": "/data"}})
    arm64 = layout.image([([Entry("arch", data=b"arm64\n")], LAYER_GZIP)],
                         architecture="arm64")
    s390x = layout.image([([Entry("arch", data=b"s390x\n")], LAYER_GZIP)],
                         architecture="s390x")
    index = layout.tag_index("features", [amd64, arm64])
    layout.tag_index("armindex", [arm64, s390x])
    layout.tag("armonly", arm64)
    big = layout.image([(BASE_LAYER, LAYER_GZIP),
                        ([Entry("big/", "dir"), Entry("big/random.bin",
                                                      data=pseudo_random(BIG_FILE_SIZE,
                                                                         BIG_FILE_SEED))],
                         LAYER_TAR)])
    layout.tag("big", big)
    corrupt = layout.image([([Entry("victim", data=pseudo_random(300_000, 7))], LAYER_GZIP)])
    layout.tag("corrupt", corrupt)
    small = layout.image([([Entry("hello.txt", data=b"small\n")], LAYER_GZIP)])
    layout.tag("small", small)
    exact = ("--preserve-digests",)
    pushes = [("features", "sm/features:v1", ("--all", *exact)),
              ("armindex", "sm/armindex:v1", ("--all", *exact)),
              ("armonly", "sm/armonly:v1", exact),
              ("big", "sm/big:v1", exact),
              ("corrupt", "sm/corrupt:v1", exact),
              ("small", "sm/small:v1", exact),
              ("small", "sm/dockerv2:v1", ("--format", "v2s2"))]
    return TestImages(amd64, arm64, index, big, arm64, corrupt, small, pushes)
