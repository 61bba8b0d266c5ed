"""The real kernel + initramfs + init, booted by QEMU (``-M microvm``), our reference machine.

It checks the guest side independently of our VMM: the modules load, the markers
appear, sm.init_cmd's status comes back, and a block root is mounted with an
overlay. QEMU uses KVM where this host's KVM runs guests (in the test bed: the
A/B anchor of the boot benchmark), its emulator otherwise.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.testbed.runner import host_tsc_khz
from vmm import hostkvm
from vmm.guest import cmdline
from vmm.guest.initramfs import find_busybox
from vmm.guest.kernel import GuestKernel


def _accelerator() -> tuple[list[str], str]:
    """QEMU's accelerator arguments and what the guest's command line needs with them."""
    if hostkvm.probe().usable:
        return ["-accel", "kvm", "-cpu", "host"], ""
    # The host TSC rate spares the emulated guest PIT calibration (which can hang under TCG).
    return ["-accel", "tcg", "-cpu", "max"], f"tsc_early_khz={host_tsc_khz()}"


@pytest.fixture(scope="module")
def boot_files(guest_kernel, guest_initramfs) -> tuple[GuestKernel, Path]:
    return guest_kernel, guest_initramfs


def qemu_boot(boot_files, append: str, disk: Path | None = None) -> str:
    kernel, initrd = boot_files
    accelerator, extra = _accelerator()
    argv = ["qemu-system-x86_64", "-M", "microvm,pit=on,pic=on,rtc=on", *accelerator,
            "-m", "256", "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
            "-no-reboot", "-kernel", str(kernel.vmlinuz), "-initrd", str(initrd),
            "-append", f"console=ttyS0 quiet panic=-1 {extra} {append}"]
    if disk:
        argv += ["-drive", f"id=d0,file={disk},format=raw,if=none,readonly=on",
                 "-device", "virtio-blk-device,drive=d0"]
    result = subprocess.run(argv, capture_output=True, timeout=180, stdin=subprocess.DEVNULL)
    console = result.stdout.decode("utf-8", "replace")
    assert result.returncode == 0, console + result.stderr.decode()
    assert cmdline.INIT_STARTED in console, console
    assert "insmod" not in console, console        # every module loaded
    return console


def test_init_cmd_runs_and_reports_its_status(boot_files):
    console = qemu_boot(boot_files, cmdline.init_cmd_arg(
        "echo \"modules: $(lsmod | tail -n +2 | wc -l)\"; ls /sys/bus/virtio/drivers; exit 7"))
    assert cmdline.parse_exit_status(console) == 7, console
    assert "modules: 12" in console, console
    assert "virtio_blk" in console and "vmw_vsock_virtio_transport" in console


def test_block_root_is_mounted_under_an_overlay(boot_files, tmp_path: Path):
    source = tmp_path / "root"
    (source / "bin").mkdir(parents=True)
    (source / "sbin").mkdir()
    shutil.copy(find_busybox(), source / "bin/busybox")
    init = source / "sbin/init"
    init.write_text("#!/bin/busybox sh\n"
                    "/bin/busybox grep ' / ' /proc/mounts\n"
                    "/bin/busybox touch /new-file && /bin/busybox echo root-writable pid=$$\n"
                    "/bin/busybox poweroff -f\n")
    init.chmod(0o755)
    disk = tmp_path / "root.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-d", str(source), str(disk), "16M"], check=True)
    console = qemu_boot(boot_files, "root=/dev/vda", disk)
    assert "overlay / overlay rw" in console, console
    assert "root-writable pid=1" in console, console


def test_init_failure_is_reported_and_powers_off(boot_files):
    console = qemu_boot(boot_files, "root=/dev/vdz")
    assert f"{cmdline.INIT_FAILED}root device /dev/vdz did not appear" in console, console
