import calendar

from vmm.arch.x86_64 import layout
from vmm.devices.bus import Bus
from vmm.devices.rtc import PORT_SPAN, CmosRtc

# 2026-11-25 23:45:07 UTC, a Wednesday
FIXED = calendar.timegm((2026, 11, 25, 23, 45, 7, 0, 0, 0))


def rtc_bus() -> Bus:
    bus = Bus("pio")
    bus.register(layout.CMOS_RTC_PORT, PORT_SPAN, CmosRtc(clock=lambda: FIXED))
    return bus


def read_register(bus: Bus, index: int) -> int:
    bus.write(layout.CMOS_RTC_PORT, bytes([index]))
    return bus.read(layout.CMOS_RTC_PORT + 1, 1)[0]


def test_time_reads_back_in_bcd_by_default():
    bus = rtc_bus()
    fields = [read_register(bus, i) for i in (0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32)]
    assert fields == [0x07, 0x45, 0x23, 0x04, 0x25, 0x11, 0x26, 0x20]


def test_binary_mode_when_the_guest_asks_for_it():
    bus = rtc_bus()
    bus.write(layout.CMOS_RTC_PORT, b"\x0b")
    bus.write(layout.CMOS_RTC_PORT + 1, bytes([0x02 | 0x04]))
    assert read_register(bus, 0x04) == 23
    assert read_register(bus, 0x09) == 26


def test_status_registers_say_no_update_in_progress_and_valid_time():
    bus = rtc_bus()
    assert read_register(bus, 0x0A) & 0x80 == 0
    assert read_register(bus, 0x0D) & 0x80


def test_the_nmi_bit_of_the_index_is_ignored_and_the_clock_cannot_be_set():
    bus = rtc_bus()
    bus.write(layout.CMOS_RTC_PORT, bytes([0x80 | 0x00]))
    bus.write(layout.CMOS_RTC_PORT + 1, b"\x59")
    assert read_register(bus, 0x80 | 0x00) == 0x07


def test_odd_accesses_do_nothing_harmful():
    rtc = CmosRtc(clock=lambda: FIXED)
    assert rtc.read(0, 1) == b"\xff"
    assert rtc.read(1, 2) == b"\xff\xff"
    rtc.write(1, b"\x00\x00")
