"""The built-in default image, ``sm/python-default:latest``: built locally, no registry.

``mmdebstrap --variant=apt`` installs the Debian packages of the recipe
(``share/images/default.toml``) into a tarball, which becomes the single zstd
layer of an OCI image in the store. The image carries a sha256 of the recipe
and of this builder as a label: while both are unchanged the stored image is
reused; a change builds a new one. A file lock keeps two processes from building
at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import zstandard

from vmm.cli_support import say
from vmm.images.errors import ImageError
from vmm.images.reference import parse_reference
from vmm.images.store import OCI_LAYER_ZSTD, ImageNotFound, ImageRecord, Store
from vmm.paths import share_dir

DEFAULT_IMAGE = "sm/python-default:latest"
SHORT_NAME = "python-default"
RECIPE_LABEL = "org.sm.recipe-sha256"
_ZSTD_LEVEL = 3
_CHUNK = 1 << 20


class DefaultImageError(ImageError):
    """The default image cannot be built (mmdebstrap missing or failing, bad recipe)."""


def recipe_path() -> Path:
    return share_dir() / "images" / "default.toml"


def is_default_reference(ref: str | None) -> bool:
    """True for the names a user may give the default image (or none at all)."""
    if not ref or ref == SHORT_NAME:
        return True
    try:
        return str(parse_reference(ref)) == str(parse_reference(DEFAULT_IMAGE))
    except ImageError:
        return False


def recipe_digest(recipe: Path | None = None) -> str:
    """The cache key: the recipe and this builder, which turns it into commands."""
    digest = hashlib.sha256((recipe or recipe_path()).read_bytes())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()


def default_image(store: Store, *, rebuild: bool = False) -> ImageRecord:
    """The default image for the current recipe, built first if it is missing or stale."""
    digest = recipe_digest()
    record = None if rebuild else _current(store, digest)
    if record:
        return record
    with open(store.locks / "default-image", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        record = None if rebuild else _current(store, digest)   # built while we waited?
        return record or build_default_image(store, recipe_path())


def _current(store: Store, digest: str) -> ImageRecord | None:
    try:
        record = store.resolve(DEFAULT_IMAGE)
    except ImageNotFound:
        return None
    labels = (record.config.get("config") or {}).get("Labels") or {}
    return record if labels.get(RECIPE_LABEL) == digest else None



def load_recipe(path: Path) -> dict:
    try:
        recipe = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise DefaultImageError(f"the default image recipe {path} is unusable: {error}") from None
    missing = [key for key in ("suite", "mirrors", "packages", "config") if key not in recipe]
    if missing:
        raise DefaultImageError(f"the default image recipe {path} lacks {', '.join(missing)}")
    return recipe


def mmdebstrap_argv(recipe: dict, output: Path) -> list[str]:
    """The mmdebstrap command that writes the image's root as the tarball ``output``."""
    argv = ["mmdebstrap", "--variant=apt", '--aptopt=APT::Install-Recommends "false"',
            "--include=" + ",".join(recipe["packages"])]
    argv += [f"--dpkgopt=path-exclude={pattern}" for pattern in recipe.get("exclude_paths", [])]
    argv += [f"--dpkgopt=path-include={pattern}" for pattern in recipe.get("include_paths", [])]
    if recipe.get("remove"):
        # dpkg warns about every dependency it breaks on purpose: show its log only on failure.
        purge = ("dpkg --purge --force-depends "
                 + " ".join(shlex.quote(name) for name in recipe["remove"])
                 + " > /tmp/sm-purge.log 2>&1 || { cat /tmp/sm-purge.log >&2; exit 1; }; "
                 "rm -f /tmp/sm-purge.log")
        argv.append(f'--customize-hook=chroot "$1" sh -c {shlex.quote(purge)}')
    if recipe.get("wheels"):
        # Pure-Python wheels, by this host's pip (the image has none), into the guest's
        # /usr/local/lib/pythonX.Y/dist-packages, which comes before Debian's on sys.path.
        site = ('"$1/usr/local/lib/$(chroot "$1" python3 -c '
                '\'import sys; print("python%d.%d" % sys.version_info[:2])\')/dist-packages"')
        argv.append(f"--customize-hook={shlex.quote(sys.executable)} -m pip install --quiet "
                    "--disable-pip-version-check --no-deps --only-binary=:all: --target "
                    f"{site} " + " ".join(shlex.quote(wheel) for wheel in recipe["wheels"]))
    if recipe.get("check"):
        # (debugpy, imported by ipykernel, warns about frozen modules unless told not to)
        argv.append('--customize-hook=chroot "$1" env PYDEVD_DISABLE_FILE_VALIDATION=1 '
                    f'python3 -c {shlex.quote(recipe["check"])}')
    return [*argv, recipe["suite"], str(output), *recipe["mirrors"]]


def build_default_image(store: Store, recipe_file: Path) -> ImageRecord:
    """Build the default image from ``recipe_file`` and tag it; mmdebstrap's log is shown."""
    if shutil.which("mmdebstrap") is None:
        raise DefaultImageError("building the default image needs mmdebstrap: "
                                "apt-get install mmdebstrap")
    recipe = load_recipe(recipe_file)
    started = time.monotonic()
    say(f"building the default image {DEFAULT_IMAGE} from {recipe_file} "
         "(about a minute and 600 MB of downloads, once)")
    with tempfile.TemporaryDirectory(prefix="default-image-", dir=store.tmp) as work:
        tarball, layer = Path(work) / "root.tar", Path(work) / "layer.tar.zst"
        say("[1/3] installing Debian packages with mmdebstrap")
        result = subprocess.run(mmdebstrap_argv(recipe, tarball), stdin=subprocess.DEVNULL,
                                stdout=sys.stderr, check=False)
        if result.returncode != 0:
            raise DefaultImageError(f"mmdebstrap failed (status {result.returncode}; its log is "
                                    "above): check the network and the free space in "
                                    f"{store.tmp}")
        say(f"[2/3] compressing the layer ({tarball.stat().st_size / 1e6:.0f} MB)")
        _compress(tarball, layer)
        tarball.unlink()
        say("[3/3] adding the image to the store")
        config = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config": {**recipe["config"], "Labels": {RECIPE_LABEL: recipe_digest(recipe_file)}},
            "history": [{"created_by": f"sm build-default: mmdebstrap {recipe['suite']} "
                                       + " ".join(recipe["packages"])}],
        }
        record = store.add_image(DEFAULT_IMAGE, config, [layer], OCI_LAYER_ZSTD)
    say(f"default image built in {time.monotonic() - started:.0f} s "
         f"({record.size / 1e6:.0f} MB compressed)")
    return record


def _compress(source: Path, target: Path) -> None:
    compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL, threads=-1)
    with open(source, "rb") as raw, open(target, "wb") as out:
        compressor.copy_stream(raw, out, read_size=_CHUNK, write_size=_CHUNK)
