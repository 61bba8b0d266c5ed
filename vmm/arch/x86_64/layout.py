"""Where things live in an x86_64 guest's physical address space.

Every fixed guest address the VMM uses is named here, so that the loader, the
ACPI tables, the vCPU setup and the device map agree by construction.
"""

MIB = 1 << 20
GIB = 1 << 30
PAGE_SIZE = 0x1000

# Low memory: real-mode IVT/BDA below, EBDA and BIOS area above.
GDT_START = 0x500
IDT_START = 0x520
BOOT_STACK_POINTER = 0x8FF0
ZERO_PAGE_START = 0x7000          # struct boot_params
PML4_START = 0x9000               # identity page tables for the 64-bit entry
PDPTE_START = 0xA000
PDE_START = 0xB000                # four page directories: 0..4 GiB in 2 MiB pages
CMDLINE_START = 0x20000
CMDLINE_MAX_SIZE = 0x10000
EBDA_START = 0x9FC00              # end of usable low RAM
ACPI_RSDP_START = 0xE0000         # the kernel scans 0xE0000..0xFFFFF for "RSD PTR "
ACPI_TABLES_START = 0xE0040       # XSDT, FADT, MADT, DSDT follow the RSDP
HIGH_MEMORY_START = 0x100000      # bzImage protected-mode kernel is loaded here

# The 32-bit MMIO hole: guest RAM never covers [MMIO_GAP_START, 4 GiB).
MMIO_GAP_START = 3 * GIB
MMIO_GAP_END = 4 * GIB
VIRTIO_MMIO_START = 0xD0000000    # device i lives at VIRTIO_MMIO_START + i * VIRTIO_MMIO_SIZE
VIRTIO_MMIO_SIZE = 0x1000
IOAPIC_START = 0xFEC00000
APIC_START = 0xFEE00000
# Pages KVM needs in guest-physical space on Intel (KVM_SET_TSS_ADDR: 3 pages for the
# real-mode TSS; KVM_SET_IDENTITY_MAP_ADDR: 1 page): in the MMIO gap, below the BIOS area.
KVM_IDENTITY_MAP_START = 0xFFFBC000
KVM_TSS_START = 0xFFFBD000

# Legacy I/O ports and interrupt lines (GSIs on the in-kernel IOAPIC).
COM1_PORT = 0x3F8
COM1_IRQ = 4
CMOS_RTC_PORT = 0x70              # index at 0x70, data at 0x71
I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64
ACPI_SLEEP_CONTROL_PORT = 0x600   # FADT sleep control/status registers (hardware-reduced ACPI)
ACPI_SLEEP_STATUS_PORT = 0x601
ACPI_RESET_PORT = 0x602           # FADT reset register
ACPI_RESET_VALUE = 0x1
VIRTIO_IRQ_BASE = 5               # device i raises GSI VIRTIO_IRQ_BASE + i
VIRTIO_IRQ_MAX = 23               # last IOAPIC pin


def ram_layout(mem_size: int) -> list[tuple[int, int]]:
    """Guest RAM regions ``(gpa, size)`` for ``mem_size`` bytes, skipping the MMIO hole."""
    if mem_size <= MMIO_GAP_START:
        return [(0, mem_size)]
    return [(0, MMIO_GAP_START), (MMIO_GAP_END, mem_size - MMIO_GAP_START)]


def virtio_mmio_slot(index: int) -> tuple[int, int]:
    """The MMIO base address and GSI of the ``index``-th virtio-mmio device."""
    gsi = VIRTIO_IRQ_BASE + index
    if gsi > VIRTIO_IRQ_MAX:
        raise ValueError(f"no interrupt line left for virtio device {index}")
    return VIRTIO_MMIO_START + index * VIRTIO_MMIO_SIZE, gsi
