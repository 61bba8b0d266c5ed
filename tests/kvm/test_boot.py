"""Boot Debian's cloud kernel on our VMM through the `sm` CLI, as a user would."""

import hashlib
import subprocess
from pathlib import Path

import pytest

from tests.cli_runner import sm as run_sm
from tests.unit.boot_images import make_bzimage

pytestmark = pytest.mark.usefixtures("linux_kvm", "guest_initramfs")

UD2 = b"\x0f\x0b"


def sm(*args: str, user: int | None = None, **env: str) -> subprocess.CompletedProcess:
    prefix = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] if user else []
    return run_sm(*args, prefix=prefix, **env)


def lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()]


def ext4_image(path: Path, files: dict[str, str]) -> Path:
    tree = path.with_suffix(".d")
    tree.mkdir()
    for name, content in files.items():
        (tree / name).write_text(content)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(path), "8M"], check=True)
    return path


def read_ext4_file(image: Path, name: str) -> str:
    return subprocess.run(["debugfs", "-R", f"cat /{name}", str(image)], check=True,
                          capture_output=True, text=True).stdout


def test_two_vcpus_report_their_count_memory_and_kernel(guest_kernel):
    result = sm("boot", "--cpus", "2", "--memory", "256",
                "--init-cmd", "nproc; grep MemTotal /proc/meminfo; uname -r")
    out = lines(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2" in out
    assert guest_kernel.version in out
    mem_total_kib = int(next(line for line in out if line.startswith("MemTotal")).split()[1])
    assert 200 * 1024 < mem_total_kib <= 256 * 1024
    assert "sm: guest powered off after" in result.stderr


def test_one_vcpu_and_the_command_status_becomes_ours():
    result = sm("boot", "--cpus", "1", "--init-cmd", "nproc; exit 7")
    assert "1" in lines(result.stdout)
    assert result.returncode == 7


def test_a_read_write_disk_is_read_and_written_back(tmp_path):
    disk = ext4_image(tmp_path / "rw.ext4", {"hello.txt": "from the host\n"})
    result = sm("boot", "--disk", f"{disk}:rw", "--init-cmd",
                "mkdir -p /mnt/d && mount -t ext4 /dev/vda /mnt/d && cat /mnt/d/hello.txt && "
                "echo from the guest > /mnt/d/back.txt && umount /mnt/d")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "from the host" in lines(result.stdout)
    assert read_ext4_file(disk, "back.txt") == "from the guest\n"


def test_a_read_only_disk_refuses_writes(tmp_path):
    disk = ext4_image(tmp_path / "ro.ext4", {"hello.txt": "read me\n"})
    before = hashlib.sha256(disk.read_bytes()).hexdigest()
    result = sm("boot", "--disk", str(disk), "--init-cmd",
                "echo ro=$(cat /sys/block/vda/ro); mkdir -p /mnt/d; mount -t ext4 -o ro /dev/vda /mnt/d; "
                "cat /mnt/d/hello.txt; "
                "dd if=/dev/zero of=/dev/vda bs=512 count=1 2>/dev/null; echo dd=$?")
    out = lines(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ro=1" in out   # the guest kernel sees the disk as read-only
    assert "read me" in out
    assert "dd=1" in out
    assert hashlib.sha256(disk.read_bytes()).hexdigest() == before


def test_a_guest_kernel_panic_is_reported_in_one_line():
    result = sm("boot", "--init-cmd", "echo c > /proc/sysrq-trigger")
    assert result.returncode == 125
    last = lines(result.stderr)[-1]
    assert last.startswith("sm: the guest kernel panicked after ")
    assert last.endswith(" s: Kernel panic - not syncing: sysrq triggered crash")


def test_a_guest_that_triple_faults_is_reported(tmp_path):
    kernel = tmp_path / "ud2.bzImage"
    kernel.write_bytes(make_bzimage(b"\x90" * 0x200 + UD2 + b"\x90" * 0x1000))
    result = sm("boot", "--kernel", str(kernel), "--memory", "64", "--timeout", "60",
                "--init-cmd", "true")
    assert result.returncode == 125
    assert "sm: the guest stopped: triple-fault on vCPU 0" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_guest_past_its_timeout_is_stopped():
    result = sm("boot", "--timeout", "1", "--init-cmd", "sleep 1000")
    assert result.returncode == 124
    assert lines(result.stderr)[-1] == "sm: the guest did not power off within 1 s; stopped it"


@pytest.mark.parametrize("args, message", [
    (["--kernel", "/etc/hostname"], "/etc/hostname is not a Linux bzImage"),
    (["--disk", "/nonexistent.img"], "disk image /nonexistent.img does not exist"),
    (["--cpus", "0"], "argument --cpus: must be at least 1"),
])
def test_bad_arguments_get_one_clear_line(args, message):
    result = sm("boot", *args, "--init-cmd", "true")
    assert result.returncode in (2, 125)
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_no_permission_on_dev_kvm_says_what_to_do(tmp_path):
    result = sm("boot", "--init-cmd", "true", user=65534, SM_HOME=str(tmp_path))
    assert result.returncode == 125
    assert lines(result.stderr) == [
        "sm: cannot run a guest here: no permission on /dev/kvm: add your user to the 'kvm' "
        "group (see `sm doctor`)"]


def test_doctor_is_happy_where_guests_run(guest_kernel):
    result = sm("doctor")
    assert result.returncode == 0, result.stdout
    assert f"ok    guest kernel {guest_kernel.version}" in result.stdout
    assert "hardware KVM" in result.stdout
