"""The test bed: a Debian VM under QEMU's emulator that gives tests a real /dev/kvm.

On hosts whose /dev/kvm cannot run an unmodified Linux guest (this project's
own machines have ``kvm_pvm``), QEMU TCG with ``-cpu max`` emulates AMD SVM
with nested paging; inside that VM ``kvm_amd`` is real KVM. The project
checkout and ``$SM_HOME`` are shared into it over 9p at their host paths, so a
command run there sees the same files. See docs/testbed.md.
"""
