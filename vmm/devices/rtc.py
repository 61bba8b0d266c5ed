"""MC146818 CMOS real-time clock (ports 0x70/0x71): the guest's wall clock at boot.

Without it Linux reads all-ones from the CMOS ports, takes the update-in-progress
bit as stuck and spends seconds timing out (and boots in 1970). The time is the
host's UTC time at the moment of each read; writes to the clock are ignored.
"""

from __future__ import annotations

import time
from collections.abc import Callable

PORT_SPAN = 2

SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR = 0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09
STATUS_A, STATUS_B, STATUS_C, STATUS_D = 0x0A, 0x0B, 0x0C, 0x0D
CENTURY = 0x32

STATUS_A_DIVIDER = 0x26           # 32.768 kHz base, 1024 Hz rate; update-in-progress clear
STATUS_B_24H = 0x02
STATUS_B_BINARY = 0x04            # data mode: binary instead of BCD
STATUS_D_VALID = 0x80             # valid RAM and time
INDEX_MASK = 0x7F                 # bit 7 of the index port is the NMI mask


def _bcd(value: int) -> int:
    return (value // 10) << 4 | value % 10


class CmosRtc:
    """Register it on the port bus at ``layout.CMOS_RTC_PORT`` with length ``PORT_SPAN``."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self._clock = clock
        self._index = 0
        self._ram = bytearray(128)
        self._ram[STATUS_A] = STATUS_A_DIVIDER
        self._ram[STATUS_B] = STATUS_B_24H
        self._ram[STATUS_D] = STATUS_D_VALID

    def save_state(self) -> dict:
        return {"index": self._index, "ram": self._ram.hex()}

    def restore_state(self, state: dict) -> None:
        ram = bytes.fromhex(state["ram"])
        if len(ram) != len(self._ram):
            raise ValueError(f"CMOS state of {len(ram)} bytes, expected {len(self._ram)}")
        self._index, self._ram[:] = state["index"] & INDEX_MASK, ram

    def _time_registers(self) -> dict[int, int]:
        now = time.gmtime(self._clock())
        values = {
            SECONDS: now.tm_sec, MINUTES: now.tm_min, HOURS: now.tm_hour,
            WEEKDAY: (now.tm_wday + 1) % 7 + 1,   # 1 = Sunday
            DAY: now.tm_mday, MONTH: now.tm_mon, YEAR: now.tm_year % 100,
            CENTURY: now.tm_year // 100,
        }
        if not self._ram[STATUS_B] & STATUS_B_BINARY:
            values = {register: _bcd(value) for register, value in values.items()}
        return values

    def read(self, offset: int, size: int) -> bytes:
        if offset != 1 or size != 1:
            return b"\xff" * size
        value = self._time_registers().get(self._index, self._ram[self._index])
        if self._index == STATUS_C:
            self._ram[STATUS_C] = 0   # reading C acknowledges pending flags
        return bytes([value])

    def write(self, offset: int, data: bytes) -> None:
        if len(data) != 1:
            return
        if offset == 0:
            self._index = data[0] & INDEX_MASK
        elif self._index in (STATUS_B, CENTURY) or self._index > STATUS_D:
            # data-mode bits and the battery-backed RAM; the clock itself is the host's
            self._ram[self._index] = data[0]
