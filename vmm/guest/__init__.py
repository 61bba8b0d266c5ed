"""What the guest boots: the kernel (kernel.py, fetched through debian.py), its modules
(modules.py, elf.py), the initramfs (initramfs.py, cpio.py) and the init contract (cmdline.py)."""
