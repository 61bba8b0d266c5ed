import pytest

from vmm.devices.bus import Bus, BusError


class Recorder:
    def __init__(self, fill: int = 0xAB):
        self.fill = fill
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, bytes]] = []

    def read(self, offset, size):
        self.reads.append((offset, size))
        return bytes([self.fill]) * size

    def write(self, offset, data):
        self.writes.append((offset, bytes(data)))


def test_dispatch_uses_offsets_relative_to_base():
    bus = Bus("pio")
    low, high = Recorder(0x11), Recorder(0x22)
    bus.register(0x3F8, 8, low)
    bus.register(0x600, 3, high)
    assert bus.read(0x3FD, 1) == b"\x11"
    bus.write(0x602, b"\x01")
    assert low.reads == [(5, 1)]
    assert high.writes == [(2, b"\x01")]


@pytest.mark.parametrize("base,length", [(0x0FF0, 0x20), (0x1FF0, 0x20), (0x1100, 0x10), (0x0F00, 0x2000)])
def test_overlapping_registration_is_refused(base, length):
    bus = Bus("mmio")
    bus.register(0x1000, 0x1000, Recorder())
    with pytest.raises(BusError):
        bus.register(base, length, Recorder())


def test_adjacent_ranges_are_fine_and_empty_ranges_are_not():
    bus = Bus("mmio")
    bus.register(0x1000, 0x1000, Recorder(1))
    bus.register(0x2000, 0x1000, Recorder(2))
    bus.register(0x0000, 0x1000, Recorder(3))
    assert [bus.read(a, 1) for a in (0x0FFF, 0x1000, 0x2FFF)] == [b"\x03", b"\x01", b"\x02"]
    with pytest.raises(BusError):
        bus.register(0x5000, 0, Recorder())


def test_unknown_addresses_read_all_ones_and_drop_writes():
    bus = Bus("pio")
    device = Recorder()
    bus.register(0x60, 5, device)
    assert bus.read(0x80, 2) == b"\xff\xff"
    bus.write(0x80, b"\x00")
    # An access running past the device's end is not the device's either.
    assert bus.read(0x63, 4) == b"\xff" * 4
    assert device.reads == [] and device.writes == []
    assert bus.unknown_accesses == 3
