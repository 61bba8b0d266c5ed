"""`sm run`: images booted as microVMs, their config honoured, as a user runs them.

The default image is built once into $SM_HOME (about a minute) and reused. The
small images are made here from the host's static busybox with Store.add_image.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import time

import pytest

from tests.cli_runner import sm
from vmm.guest.initramfs import find_busybox
from vmm.images.store import Store

pytestmark = pytest.mark.usefixtures("linux_kvm", "guest_initramfs")

CONFIG_IMAGE = "sm-test/busybox-config:1"
PLAIN_IMAGE = "sm-test/busybox:1"
APPLETS = ("sh", "ls", "id", "pwd", "env", "cat", "echo", "hostname", "mount", "stat")


def _add(archive: tarfile.TarFile, name: str, kind=tarfile.REGTYPE, data: bytes = b"",
         mode: int = 0o644, link: str = "", uid: int = 0, gid: int = 0) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname, info.uid, info.gid = kind, mode, link, uid, gid
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    archive.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


@pytest.fixture(scope="module")
def busybox_images(tmp_path_factory) -> Store:
    """Two images without python from one layer: busybox, a passwd, and an image-own
    ``uname`` script (to show the image's program runs, not init's busybox applet)."""
    layer = tmp_path_factory.mktemp("layer") / "busybox.tar"
    with tarfile.open(layer, "w") as archive:
        for directory in ("bin", "etc", "home", "srv"):
            _add(archive, directory, tarfile.DIRTYPE, mode=0o755)
        _add(archive, "home/app", tarfile.DIRTYPE, mode=0o700, uid=1234, gid=2345)
        _add(archive, "bin/busybox", data=find_busybox().read_bytes(), mode=0o755)
        for applet in APPLETS:
            _add(archive, f"bin/{applet}", tarfile.SYMTYPE, link="busybox", mode=0o777)
        _add(archive, "bin/uname", data=b"#!/bin/sh\necho image-uname \"$@\"\n", mode=0o755)
        _add(archive, "etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n"
                                         b"app:x:1234:2345:app:/home/app:/bin/sh\n")
        _add(archive, "etc/group", data=b"root:x:0:\nstaff:x:50:\napp:x:2345:\n")
    store = Store()
    store.add_image(PLAIN_IMAGE, {"config": {"Cmd": ["sh"]}}, [layer],
                    "application/vnd.oci.image.layer.v1.tar")
    store.add_image(CONFIG_IMAGE, {"config": {
        "Env": ["PATH=/bin", "GREETING=hello"], "WorkingDir": "/srv/work", "User": "app",
        "Entrypoint": ["/bin/sh", "-c"],
        "Cmd": ['echo "$GREETING from $(id -u):$(id -g) in $(pwd) home=$HOME host=$(hostname)"'],
    }}, [layer], "application/vnd.oci.image.layer.v1.tar")
    return store


def test_the_default_image_runs_numpy_and_ipykernel():
    result = sm("run", "python-default", "--", "python3", "-c",
                "import numpy, ipykernel; print(numpy.__version__)")
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.fullmatch(r"\d+\.\d+\.\d+", result.stdout.strip()), result.stdout


def test_the_image_config_is_honoured(busybox_images):
    result = sm("run", CONFIG_IMAGE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "hello from 1234:2345 in /srv/work home=/home/app host=sm\n"


def test_an_image_without_python_lists_its_root(busybox_images):
    result = sm("run", PLAIN_IMAGE, "--", "ls", "/")
    assert result.returncode == 0, result.stdout + result.stderr
    listing = set(result.stdout.split())
    assert {"bin", "etc", "home", "srv", "proc", "sys", "dev", "tmp"} <= listing
    assert "sm" not in listing and ".sm" not in listing


def test_the_command_is_the_images_own_program_found_in_its_path(busybox_images):
    result = sm("run", PLAIN_IMAGE, "--", "uname", "-a")
    assert result.stdout == "image-uname -a\n", result.stderr


def test_the_exit_status_comes_back(busybox_images):
    assert sm("run", PLAIN_IMAGE, "--", "sh", "-c", "echo out; exit 7").returncode == 7
    missing = sm("run", PLAIN_IMAGE, "--", "no-such-program")
    assert missing.returncode == 127
    assert "no-such-program: command not found" in missing.stdout + missing.stderr


def test_user_workdir_and_env_flags_override_the_image(busybox_images):
    result = sm("run", "-u", "4242:4343", "-w", "/made/here", "-e", "GREETING=hi",
                CONFIG_IMAGE, 'echo "$GREETING $(id -u):$(id -g) $(pwd) $HOME"')
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "hi 4242:4343 /made/here /\n"


def test_mounts_and_a_writable_root_in_guest_ram(busybox_images):
    result = sm("run", PLAIN_IMAGE, "--", "sh", "-c",
                "stat -f -c %T /tmp; echo data > /etc/new && cat /etc/new; "
                "mount | cut -d' ' -f3,5 | sort")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == ["tmpfs", "data"]
    mounts = dict(line.split(" ", 1) for line in lines[2:])
    assert mounts["/"] == "overlay" and mounts["/proc"] == "proc" and mounts["/tmp"] == "tmpfs"
    assert mounts["/sys"] == "sysfs" and mounts["/dev"] == "devtmpfs"


def test_an_unknown_user_is_one_clear_line(busybox_images):
    result = sm("run", "-u", "nobody", PLAIN_IMAGE, "--", "true")
    assert result.returncode == 125
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("sm: the guest could not run ") and PLAIN_IMAGE in last
    assert last.endswith(": user nobody is not in the image's /etc/passwd")


def test_an_unknown_image_is_one_clear_line():
    result = sm("run", "sm-test/never-pulled:1", "--", "true", timeout=60)
    assert result.returncode == 125
    assert result.stderr.startswith("sm: no image 'sm-test/never-pulled:1' in the store")
    assert result.stdout == ""
    assert "Traceback" not in result.stderr


def test_run_true_end_to_end_time(busybox_images, record_property):
    """Not a limit: the figure goes into the report (`-rP` shows it)."""
    started = time.monotonic()
    result = sm("run", "python-default", "--", "true")
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    record_property("sm_run_true_seconds", round(elapsed, 2))
    print(f"sm run python-default -- true: {elapsed:.2f} s (SM_IN_TESTBED="
          f"{os.environ.get('SM_IN_TESTBED', '0')})")
