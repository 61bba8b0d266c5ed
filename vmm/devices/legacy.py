"""Small legacy port devices that let the guest reset or power off the machine.

* :class:`I8042`: just enough of a PS/2 controller for ``reboot=k`` — the
  kernel waits for the input buffer to drain, then sends the "pulse reset
  line" command 0xFE to the command port.
* :class:`AcpiSleepPorts`: the hardware-reduced ACPI sleep control, sleep
  status and reset registers the FADT points at (ACPI 6.x §4.8.3.7, §4.8.3.6).

Both only call back into the VM (``on_reset`` / ``on_poweroff``), which must
merely record the request: the callbacks run on a vCPU thread under the bus
lock.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from vmm.arch.x86_64 import layout

# --- i8042 ----------------------------------------------------------------

I8042_PORT_SPAN = layout.I8042_COMMAND_PORT - layout.I8042_DATA_PORT + 1
_DATA = 0
_COMMAND = layout.I8042_COMMAND_PORT - layout.I8042_DATA_PORT

STATUS_OUTPUT_FULL = 0x01
STATUS_SYSTEM_FLAG = 0x04   # set after a successful self-test, as firmware leaves it
STATUS_COMMAND = 0x08       # last write went to the command port

CMD_READ_CONFIG = 0x20
CMD_WRITE_CONFIG = 0x60
CMD_SELF_TEST = 0xAA
CMD_PULSE_RESET = 0xFE
SELF_TEST_PASSED = 0x55


class I8042:
    """A PS/2 controller with no keyboard or mouse behind it."""

    def __init__(self, on_reset: Callable[[], None]):
        self._on_reset = on_reset
        self._output: deque[int] = deque(maxlen=16)
        self._config = 0
        self._last_was_command = False
        self._awaiting_config = False

    def save_state(self) -> dict:
        return {"config": self._config}

    def restore_state(self, state: dict) -> None:
        self._config = state["config"] & 0xFF

    def read(self, offset: int, size: int) -> bytes:
        if offset == _DATA:
            value = self._output.popleft() if self._output else 0
        elif offset == _COMMAND:
            value = STATUS_SYSTEM_FLAG
            if self._output:
                value |= STATUS_OUTPUT_FULL
            if self._last_was_command:
                value |= STATUS_COMMAND
        else:
            value = 0xFF  # 0x61-0x63 belong to other chips
        return bytes([value]) + b"\x00" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        value = data[0]
        if offset == _COMMAND:
            self._last_was_command = True
            self._awaiting_config = False
            if value == CMD_PULSE_RESET:
                self._on_reset()
            elif value == CMD_READ_CONFIG:
                self._output.append(self._config)
            elif value == CMD_WRITE_CONFIG:
                self._awaiting_config = True
            elif value == CMD_SELF_TEST:
                self._output.append(SELF_TEST_PASSED)
        elif offset == _DATA:
            self._last_was_command = False
            if self._awaiting_config:
                self._config = value
                self._awaiting_config = False


# --- ACPI hardware-reduced sleep and reset registers ------------------------

ACPI_PORT_SPAN = layout.ACPI_RESET_PORT - layout.ACPI_SLEEP_CONTROL_PORT + 1
_SLEEP_CONTROL = 0
_RESET = layout.ACPI_RESET_PORT - layout.ACPI_SLEEP_CONTROL_PORT

SLP_EN = 1 << 5
SLP_TYP_SHIFT = 2
SLP_TYP_MASK = 0x7
S5_SLEEP_TYPE = 5           # the value the DSDT's _S5_ package gives


class AcpiSleepPorts:
    """Sleep control, sleep status and reset registers, one byte each.

    Register it at ``ACPI_SLEEP_CONTROL_PORT`` with length ``ACPI_PORT_SPAN``;
    the status register needs no behaviour: writes (clearing WAK_STS) are
    dropped.
    """

    def __init__(self, on_poweroff: Callable[[], None], on_reset: Callable[[], None]):
        self._on_poweroff = on_poweroff
        self._on_reset = on_reset

    def read(self, offset: int, size: int) -> bytes:
        # Nothing sleeps and wakes here, so WAK_STS and the control bits read 0.
        return b"\x00" * size

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        value = data[0]
        if offset == _SLEEP_CONTROL and value & SLP_EN:
            if (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == S5_SLEEP_TYPE:
                self._on_poweroff()
        elif offset == _RESET and value == layout.ACPI_RESET_VALUE:
            self._on_reset()
