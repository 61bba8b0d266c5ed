"""Kernel fetch and verification against a fake Debian mirror on disk (``file://`` URLs)."""

from __future__ import annotations

import hashlib
import io
import lzma
import shutil
import tarfile
from pathlib import Path

import pytest

from tests.unit.test_guest_modules import fake_module
from vmm.guest import debian
from vmm.guest.debian import DebianError, IntegrityError, UnverifiedReleaseWarning
from vmm.guest.kernel import KernelError, cached_kernel, fetch_kernel, select_image
from vmm.guest.modules import GUEST_MODULES, ModuleTree

RELEASE = "9.9.0-1-cloud-amd64"
IMAGE = f"linux-image-{RELEASE}"
MODULES = {   # relpath -> depends
    "kernel/drivers/virtio/virtio.ko": "",
    "kernel/drivers/virtio/virtio_ring.ko": "",
    "kernel/drivers/virtio/virtio_mmio.ko": "virtio,virtio_ring",
    "kernel/drivers/virtio/virtio_balloon.ko": "virtio,virtio_ring",
    "kernel/drivers/block/virtio_blk.ko": "virtio,virtio_ring",
    "kernel/net/vmw_vsock/vsock.ko": "",
    "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko": "vsock",
    "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko": "virtio,vmw_vsock_virtio_transport_common",
    "kernel/fs/overlayfs/overlay.ko": "",
    "kernel/lib/libcrc32c.ko": "",
    "kernel/fs/erofs/erofs.ko": "libcrc32c",
    "kernel/fs/squashfs/squashfs.ko": "",
    "kernel/drivers/gpu/unneeded.ko": "",
}


def ar_archive(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members.items():
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}".encode() + b"`\n"
        out += header + data + (b"\n" if len(data) % 2 else b"")
    return out


def kernel_deb() -> bytes:
    files = {f"./boot/vmlinuz-{RELEASE}": b"fake bzImage", f"./boot/config-{RELEASE}": b"CONFIG_X=y\n",
             f"./lib/modules/{RELEASE}/modules.builtin": b"kernel/fs/ext4/ext4.ko\n",
             f"./usr/share/doc/{IMAGE}/copyright": b"GPL"}
    for relpath, depends in MODULES.items():
        name = relpath.rsplit("/", 1)[1][:-3]
        files[f"./lib/modules/{RELEASE}/{relpath}"] = fake_module({"name": name, "depends": depends})
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return ar_archive({"debian-binary": b"2.0\n", "control.tar.xz": lzma.compress(b""),
                       "data.tar.xz": tar_bytes.getvalue()})


def stanza(name: str, version: str, filename: str, data: bytes, depends: str = "") -> str:
    return (f"Package: {name}\nVersion: {version}\nArchitecture: amd64\n"
            + (f"Depends: {depends}\n" if depends else "")
            + f"Filename: {filename}\nSize: {len(data)}\nSHA256: {hashlib.sha256(data).hexdigest()}\n"
            + "Description: test\n multi-line\n")


def clearsign(text: str) -> str:
    body = "\n".join("- " + line if line.startswith("-") else line for line in text.splitlines())
    return (f"-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n{body}\n"
            "-----BEGIN PGP SIGNATURE-----\n\nAAAA\n-----END PGP SIGNATURE-----\n")


class FakeMirror:
    """A Debian mirror tree; ``tamper_*`` break one link of the hash chain."""

    def __init__(self, root: Path, suite: str = "test") -> None:
        self.root, self.suite = root, suite
        self.deb = kernel_deb()
        self.deb_path = f"pool/main/l/linux-signed-amd64/{IMAGE}_9.9.0-1_amd64.deb"
        meta = b"meta package"
        self.packages = "\n".join([
            stanza("linux-image-rt-amd64", "9.9.0-1", "pool/main/l/rt.deb", b"rt",
                   "linux-image-9.9.0-1-rt-amd64 (= 9.9.0-1)"),
            stanza("linux-image-cloud-amd64", "9.9.0-1", "pool/main/l/meta.deb", meta,
                   f"{IMAGE} (= 9.9.0-1)"),
            stanza(IMAGE, "9.9.0-1", self.deb_path, self.deb, "kmod, linux-base (>= 4.3~)"),
            stanza("zlib1g", "1.0", "pool/main/z/zlib.deb", b"z"),
        ])
        self.write()

    @property
    def url(self) -> str:
        return self.root.as_uri()

    def write(self, codename: str | None = None) -> None:
        index = lzma.compress(self.packages.encode())
        dists = self.root / "dists" / self.suite
        (dists / "main/binary-amd64").mkdir(parents=True, exist_ok=True)
        (dists / "main/binary-amd64/Packages.xz").write_bytes(index)
        release = (f"Origin: Fake\nSuite: {codename or self.suite}\nCodename: {codename or self.suite}\n"
                   f"Date: Sat, 11 Jul 2026 10:16:37 UTC\nSHA256:\n"
                   f" {hashlib.sha256(b'x').hexdigest()} 1 main/binary-amd64/Packages\n"
                   f" {hashlib.sha256(index).hexdigest()} {len(index)} main/binary-amd64/Packages.xz\n")
        (dists / "InRelease").write_text(clearsign(release))
        deb = self.root / self.deb_path
        deb.parent.mkdir(parents=True, exist_ok=True)
        deb.write_bytes(self.deb)


@pytest.fixture
def mirror(tmp_path: Path) -> FakeMirror:
    return FakeMirror(tmp_path / "mirror")


def fetch(mirror: FakeMirror, cache: Path):
    with pytest.warns(UnverifiedReleaseWarning):
        return fetch_kernel(suite=mirror.suite, mirror=mirror.url, verify_signature=False, cache=cache)


def test_fetch_verifies_extracts_prunes_and_caches(mirror: FakeMirror, tmp_path: Path):
    cache = tmp_path / "kernels"
    kernel = fetch(mirror, cache)
    assert kernel.version == RELEASE
    assert kernel.vmlinuz == cache / RELEASE / "vmlinuz"
    assert kernel.vmlinuz.read_bytes() == b"fake bzImage"
    assert (cache / "current").read_text().strip() == RELEASE
    kept = {p.name for p in kernel.modules_dir.rglob("*.ko")}
    assert "unneeded.ko" not in kept and "erofs.ko" in kept and "libcrc32c.ko" in kept
    assert [m.name for m in ModuleTree(kernel.modules_dir).load_order(GUEST_MODULES)][-1] == "squashfs"
    assert not list(cache.glob(".stage-*")) and not list(cache.rglob("*.deb"))
    shutil.rmtree(mirror.root)   # cached: no mirror needed any more
    assert cached_kernel(cache) == kernel


def test_tampered_kernel_package_is_refused(mirror: FakeMirror, tmp_path: Path):
    deb = mirror.root / mirror.deb_path
    data = bytearray(deb.read_bytes())
    data[-10] ^= 0xFF
    deb.write_bytes(bytes(data))
    cache = tmp_path / "kernels"
    with pytest.raises(IntegrityError, match="sha256"):
        fetch(mirror, cache)
    assert not (cache / RELEASE).exists() and not list(cache.glob(".stage-*"))
    assert cached_kernel(cache) is None


def test_tampered_index_is_refused(mirror: FakeMirror, tmp_path: Path):
    index = mirror.root / "dists/test/main/binary-amd64/Packages.xz"
    index.write_bytes(lzma.compress(mirror.packages.replace("9.9.0-1", "9.9.0-2").encode()))
    with pytest.raises(IntegrityError, match="Packages.xz"):
        fetch(mirror, tmp_path / "kernels")


def test_truncated_package_is_refused(mirror: FakeMirror, tmp_path: Path):
    deb = mirror.root / mirror.deb_path
    deb.write_bytes(deb.read_bytes()[:-100])
    with pytest.raises(IntegrityError, match="bytes"):
        fetch(mirror, tmp_path / "kernels")


def test_release_file_for_another_suite_is_refused(mirror: FakeMirror, tmp_path: Path):
    mirror.write(codename="other")
    with pytest.raises(IntegrityError, match="other"):
        fetch(mirror, tmp_path / "kernels")


def test_unsigned_release_fails_the_signature_check(mirror: FakeMirror, tmp_path: Path):
    with pytest.raises(IntegrityError, match="signature"):
        fetch_kernel(suite=mirror.suite, mirror=mirror.url, cache=tmp_path / "kernels")


def test_missing_mirror_is_a_clear_error(tmp_path: Path):
    with pytest.raises(DebianError, match="cannot download"):
        fetch_kernel(suite="test", mirror=(tmp_path / "nowhere").as_uri(), verify_signature=False,
                     cache=tmp_path / "kernels")


def test_clearsign_armor_and_dash_escapes_are_removed():
    assert debian.strip_clearsign(clearsign("A: b\n-dash\n")) == "A: b\n-dash\n"
    with pytest.raises(IntegrityError):
        debian.strip_clearsign("Origin: Debian\n")


def test_image_is_the_exact_version_the_meta_package_names():
    def package(name, version, depends=""):
        return debian.Package(name, version, f"pool/{name}.deb", 1, "0" * 64, depends)
    packages = [package("linux-image-cloud-amd64", "2", "linux-image-2-cloud-amd64 (= 2)"),
                package("linux-image-2-cloud-amd64", "1"), package("linux-image-2-cloud-amd64", "2")]
    assert select_image(packages).version == "2"
    with pytest.raises(KernelError, match="not in the index"):
        select_image(packages[:2])
    with pytest.raises(KernelError, match="expected one"):
        select_image(packages[1:])


def test_release_checksum_needs_a_wellformed_entry():
    release = {"SHA256": f" {'a' * 64} 12 main/binary-amd64/Packages.xz\n {'z' * 64} 1 other"}
    assert debian.release_checksum(release, "main/binary-amd64/Packages.xz") == ("a" * 64, 12)
    with pytest.raises(IntegrityError):
        debian.release_checksum(release, "other")
    with pytest.raises(IntegrityError):
        debian.release_checksum(release, "missing")


def test_bad_package_filename_is_refused():
    fields = debian.parse_stanza(stanza("x", "1", "../../etc/passwd", b"d"))
    with pytest.raises(DebianError, match="Filename"):
        debian.stanza_package(fields)


@pytest.mark.parametrize("data", [b"", b"!<arch>\nshort", ar_archive({"a": b"12345"})[:-3]])
def test_corrupt_ar_archives_are_refused(data):
    with pytest.raises(DebianError):
        list(debian.iter_ar(io.BytesIO(data)))
