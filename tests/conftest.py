"""Fixtures shared by every test directory.

Tests that boot a Linux guest take ``linux_kvm``: where this host's /dev/kvm cannot
run one they fail and say why (the README's ``make test`` runs them in the test
bed there); they are never skipped.
"""

import pytest

from vmm import hostkvm

pytest_plugins = ["tests.progress"]
from vmm.guest.initramfs import build_initramfs
from vmm.guest.kernel import GuestKernel, ensure_kernel


@pytest.fixture(scope="session")
def guest_kernel() -> GuestKernel:
    """Debian's cloud kernel, fetched, verified and cached by the VMM's own code."""
    return ensure_kernel()


@pytest.fixture(scope="session")
def debian_vmlinuz(guest_kernel):
    return guest_kernel.vmlinuz


@pytest.fixture(scope="session")
def guest_initramfs(guest_kernel):
    return build_initramfs(guest_kernel)


@pytest.fixture(scope="session")
def linux_kvm() -> None:
    kvm = hostkvm.probe()
    if not kvm.usable:
        pytest.fail(f"this test boots a Linux guest, but {kvm.reason}; run it with `make test`, "
                    "which uses the test bed on such hosts", pytrace=False)
