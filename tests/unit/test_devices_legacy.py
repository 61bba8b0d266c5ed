import pytest

from vmm.arch.x86_64 import layout
from vmm.devices.bus import Bus
from vmm.devices.legacy import ACPI_PORT_SPAN, I8042, I8042_PORT_SPAN, AcpiSleepPorts


class Machine:
    def __init__(self):
        self.events: list[str] = []
        self.pio = Bus("pio")
        self.pio.register(layout.I8042_DATA_PORT, I8042_PORT_SPAN, I8042(lambda: self.events.append("reset")))
        self.pio.register(layout.ACPI_SLEEP_CONTROL_PORT, ACPI_PORT_SPAN,
                          AcpiSleepPorts(on_poweroff=lambda: self.events.append("poweroff"),
                                         on_reset=lambda: self.events.append("reset")))

    def inb(self, port):
        return self.pio.read(port, 1)[0]

    def outb(self, port, value):
        self.pio.write(port, bytes([value]))


def test_reboot_k_sequence_resets():
    m = Machine()
    # kb_wait(): the input buffer (status bit 1) must read empty.
    assert m.inb(layout.I8042_COMMAND_PORT) & 0x02 == 0
    m.outb(layout.I8042_COMMAND_PORT, 0xFE)
    assert m.events == ["reset"]


def test_i8042_self_test_and_config_byte():
    m = Machine()
    m.outb(layout.I8042_COMMAND_PORT, 0xAA)
    assert m.inb(layout.I8042_COMMAND_PORT) & 0x01
    assert m.inb(layout.I8042_DATA_PORT) == 0x55
    assert m.inb(layout.I8042_COMMAND_PORT) & 0x01 == 0
    m.outb(layout.I8042_COMMAND_PORT, 0x60)
    m.outb(layout.I8042_DATA_PORT, 0x47)
    m.outb(layout.I8042_COMMAND_PORT, 0x20)
    assert m.inb(layout.I8042_DATA_PORT) == 0x47
    assert m.events == []


def test_acpi_s5_powers_off():
    m = Machine()
    m.outb(layout.ACPI_SLEEP_STATUS_PORT, 0x80)  # clear WAK_STS first, as ACPICA does
    m.outb(layout.ACPI_SLEEP_CONTROL_PORT, (5 << 2) | (1 << 5))
    assert m.events == ["poweroff"]


@pytest.mark.parametrize("value", [5 << 2, (3 << 2) | (1 << 5), 1 << 5])
def test_acpi_other_sleep_writes_do_nothing(value):
    m = Machine()
    m.outb(layout.ACPI_SLEEP_CONTROL_PORT, value)
    assert m.events == []


def test_acpi_reset_register():
    m = Machine()
    m.outb(layout.ACPI_RESET_PORT, layout.ACPI_RESET_VALUE ^ 0xFF)
    assert m.events == []
    m.outb(layout.ACPI_RESET_PORT, layout.ACPI_RESET_VALUE)
    assert m.events == ["reset"]
    assert m.inb(layout.ACPI_SLEEP_STATUS_PORT) == 0
