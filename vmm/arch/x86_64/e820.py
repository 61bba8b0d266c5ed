"""The guest's physical memory map as the e820 table the kernel reads from the zero page."""

from __future__ import annotations

from typing import NamedTuple

from vmm.arch.x86_64 import layout

# Entry types: arch/x86/include/asm/e820/types.h (enum e820_type).
E820_RAM = 1
E820_RESERVED = 2


class E820Entry(NamedTuple):
    addr: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.addr + self.size


def e820_map(mem_size: int) -> list[E820Entry]:
    """The e820 map of a guest with ``mem_size`` bytes of RAM laid out by ``layout.ram_layout``.

    Below 1 MiB: usable RAM up to the EBDA, then a reserved hole that holds the
    EBDA, the ACPI tables and the RSDP scan area (0xE0000..0xFFFFF). Above it,
    each RAM region as is (the MMIO gap below 4 GiB is left out, i.e. not RAM).
    """
    regions = layout.ram_layout(mem_size)
    low_gpa, low_size = regions[0]
    if low_gpa != 0 or low_size <= layout.HIGH_MEMORY_START:
        raise ValueError(f"guest RAM of {mem_size:#x} bytes does not reach past 1 MiB")
    entries = [
        E820Entry(0, layout.EBDA_START, E820_RAM),
        E820Entry(layout.EBDA_START, layout.HIGH_MEMORY_START - layout.EBDA_START, E820_RESERVED),
        E820Entry(layout.HIGH_MEMORY_START, low_size - layout.HIGH_MEMORY_START, E820_RAM),
    ]
    entries += [E820Entry(gpa, size, E820_RAM) for gpa, size in regions[1:]]
    return entries
