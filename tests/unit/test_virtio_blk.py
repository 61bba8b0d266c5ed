import struct

import pytest

from tests.unit.virtio_driver import FakeDriver
from vmm.devices.virtio.blk import (
    ID_BYTES,
    SECTOR_SIZE,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    Block,
    MissingStatusByte,
)
from vmm.devices.virtio.device import feature
from vmm.devices.virtio.queue import Queue
from vmm.memory import GuestMemory

SECTORS = 64


class FakeInterrupt:
    def __init__(self):
        self.used = 0

    def signal_used_queue(self):
        self.used += 1

    def signal_config_change(self):
        pass

    def device_error(self, error):
        raise AssertionError(error)


def pattern(sector: int, count: int = 1) -> bytes:
    return b"".join(bytes([s & 0xFF]) * SECTOR_SIZE for s in range(sector, sector + count))


class Disk:
    def __init__(self, tmp_path, read_only):
        self.path = tmp_path / "disk.img"
        self.path.write_bytes(pattern(0, SECTORS))
        self.memory = GuestMemory([(0, 0x40000)])
        self.block = Block(self.path, read_only=read_only, serial="disk-1")
        self.queue = Queue(256)
        self.driver = FakeDriver(self.memory, 16)
        self.driver.configure(self.queue)
        self.queue.activate(self.memory)
        self.interrupt = FakeInterrupt()
        self.block.activate(self.memory, [self.queue], self.interrupt)

    def request(self, buffers):
        """Submit one chain; returns (status byte, used length)."""
        head = self.driver.add_chain(buffers)
        self.block.process(0)
        [(used_head, used_len)] = self.driver.take_used()
        assert used_head == head
        gpa, length, _ = [b for b in self.driver.last_chain if b[2]][-1]
        return self.memory.read(gpa + length - 1, 1)[0], used_len

    def buffer(self, index):
        """Contents of buffer ``index`` of the last chain."""
        gpa, length, _ = self.driver.last_chain[index]
        return self.memory.read(gpa, length)

    def close(self):
        self.block.close()
        self.memory.close()


@pytest.fixture
def disk(tmp_path):
    d = Disk(tmp_path, read_only=False)
    yield d
    d.close()


@pytest.fixture
def ro_disk(tmp_path):
    d = Disk(tmp_path, read_only=True)
    yield d
    d.close()


def header(request_type, sector=0):
    return struct.pack("<IIQ", request_type, 0, sector)


def test_config_and_features(disk, ro_disk):
    capacity, _, seg_max = struct.unpack_from("<QII", disk.block.read_config(0, 16))
    assert capacity == SECTORS and seg_max > 0
    assert disk.block.read_config(0, 8) == struct.pack("<Q", SECTORS)
    assert disk.block.avail_features & feature(VIRTIO_BLK_F_FLUSH)
    assert not disk.block.avail_features & feature(VIRTIO_BLK_F_RO)
    assert ro_disk.block.avail_features & feature(VIRTIO_BLK_F_RO)


def test_read(disk):
    status, used = disk.request([(header(VIRTIO_BLK_T_IN, 3), False), (2 * SECTOR_SIZE, True), (1, True)])
    assert (status, used) == (VIRTIO_BLK_S_OK, 2 * SECTOR_SIZE + 1)
    assert disk.buffer(1) == pattern(3, 2)
    assert disk.interrupt.used == 1


def test_read_without_framing_assumptions(disk):
    hdr = header(VIRTIO_BLK_T_IN, 5)
    # Header split in two, data split unevenly, status in the same buffer as data.
    disk.request([(hdr[:5], False), (hdr[5:], False), (100, True), (SECTOR_SIZE - 100 + 1, True)])
    chain_data = disk.buffer(2) + disk.buffer(3)
    assert chain_data[:SECTOR_SIZE] == pattern(5)
    assert chain_data[SECTOR_SIZE] == VIRTIO_BLK_S_OK


def test_write_then_read_back(disk):
    data = bytes(range(256)) * 2
    status, used = disk.request([(header(VIRTIO_BLK_T_OUT, 7), False), (data, False), (1, True)])
    assert (status, used) == (VIRTIO_BLK_S_OK, 1)
    assert disk.path.read_bytes()[7 * SECTOR_SIZE : 8 * SECTOR_SIZE] == data


def test_flush(disk):
    assert disk.request([(header(VIRTIO_BLK_T_FLUSH), False), (1, True)]) == (VIRTIO_BLK_S_OK, 1)


def test_get_id(disk):
    status, used = disk.request([(header(VIRTIO_BLK_T_GET_ID), False), (ID_BYTES, True), (1, True)])
    assert (status, used) == (VIRTIO_BLK_S_OK, ID_BYTES + 1)
    assert disk.buffer(1) == b"disk-1".ljust(ID_BYTES, b"\x00")


def test_get_id_into_a_short_buffer(disk):
    status, used = disk.request([(header(VIRTIO_BLK_T_GET_ID), False), (8, True), (1, True)])
    assert (status, used) == (VIRTIO_BLK_S_OK, 9)
    assert disk.buffer(1) == b"disk-1\x00\x00"


@pytest.mark.parametrize("sector,length", [
    (SECTORS - 1, 2 * SECTOR_SIZE),   # runs past the end
    (SECTORS, SECTOR_SIZE),
    ((1 << 64) - 1, SECTOR_SIZE),
    (0, 100),                         # not whole sectors
])
def test_out_of_range_or_ragged_reads_fail(disk, sector, length):
    status, used = disk.request([(header(VIRTIO_BLK_T_IN, sector), False), (length, True), (1, True)])
    assert (status, used) == (VIRTIO_BLK_S_IOERR, 1)


def test_read_only_disk_refuses_writes(ro_disk):
    before = ro_disk.path.read_bytes()
    status, _ = ro_disk.request([(header(VIRTIO_BLK_T_OUT, 0), False), (bytes(SECTOR_SIZE), False), (1, True)])
    assert status == VIRTIO_BLK_S_IOERR
    assert ro_disk.path.read_bytes() == before
    assert ro_disk.request([(header(VIRTIO_BLK_T_IN, 1), False), (SECTOR_SIZE, True), (1, True)])[0] == VIRTIO_BLK_S_OK


def test_unsupported_type(disk):
    assert disk.request([(header(11), False), (1, True)])[0] == VIRTIO_BLK_S_UNSUPP


def test_short_header_fails_the_request(disk):
    assert disk.request([(header(VIRTIO_BLK_T_IN)[:8], False), (1, True)])[0] == VIRTIO_BLK_S_IOERR


def test_data_flowing_the_wrong_way_fails(disk):
    status, _ = disk.request([(header(VIRTIO_BLK_T_IN), False), (bytes(SECTOR_SIZE), False), (1, True)])
    assert status == VIRTIO_BLK_S_IOERR


def test_chain_without_status_byte_breaks_the_device(disk):
    disk.driver.add_chain([(header(VIRTIO_BLK_T_IN), False)])
    with pytest.raises(MissingStatusByte):
        disk.block.process(0)


def test_indirect_request(disk):
    disk.driver.add_chain([(header(VIRTIO_BLK_T_IN, 9), False), (SECTOR_SIZE, True), (1, True)], indirect=True)
    disk.block.process(0)
    [(_, used)] = disk.driver.take_used()
    assert used == SECTOR_SIZE + 1


def test_behind_the_mmio_transport(tmp_path):
    from vmm.devices.virtio import mmio

    path = tmp_path / "disk.img"
    path.write_bytes(pattern(0, SECTORS))
    memory = GuestMemory([(0, 0x40000)])
    block = Block(path, read_only=True)
    irqs = []
    transport = mmio.MmioTransport(block, memory, irq=lambda: irqs.append(1))

    def w32(offset, value):
        transport.write(offset, value.to_bytes(4, "little"))

    def r32(offset):
        return int.from_bytes(transport.read(offset, 4), "little")

    driver = FakeDriver(memory, 16)
    for status in (1, 3):
        w32(mmio.REG_STATUS, status)
    w32(mmio.REG_DEVICE_FEATURES_SEL, 1)
    high = r32(mmio.REG_DEVICE_FEATURES)
    w32(mmio.REG_DEVICE_FEATURES_SEL, 0)
    offered = high << 32 | r32(mmio.REG_DEVICE_FEATURES)
    for sel in (0, 1):
        w32(mmio.REG_DRIVER_FEATURES_SEL, sel)
        w32(mmio.REG_DRIVER_FEATURES, (offered >> (32 * sel)) & 0xFFFFFFFF)
    w32(mmio.REG_STATUS, 11)
    w32(mmio.REG_QUEUE_SEL, 0)
    w32(mmio.REG_QUEUE_NUM, driver.size)
    w32(mmio.REG_QUEUE_DESC_LOW, driver.desc_table)
    w32(mmio.REG_QUEUE_DRIVER_LOW, driver.avail_ring)
    w32(mmio.REG_QUEUE_DEVICE_LOW, driver.used_ring)
    w32(mmio.REG_QUEUE_READY, 1)
    w32(mmio.REG_STATUS, 15)
    assert r32(mmio.REG_STATUS) == 15
    assert transport.read(mmio.CONFIG_SPACE, 4) == struct.pack("<I", SECTORS)

    driver.add_chain([(header(VIRTIO_BLK_T_IN, 2), False), (SECTOR_SIZE, True), (1, True)])
    w32(mmio.REG_QUEUE_NOTIFY, 0)
    assert driver.take_used()[0][1] == SECTOR_SIZE + 1
    assert memory.read(driver.last_chain[1][0], SECTOR_SIZE) == pattern(2)
    assert irqs and r32(mmio.REG_INTERRUPT_STATUS) == mmio.INTERRUPT_USED_BUFFER

    driver.add_chain([(header(VIRTIO_BLK_T_IN), False)])  # no status byte
    transport.notify(0)
    assert r32(mmio.REG_STATUS) & mmio.STATUS_DEVICE_NEEDS_RESET
    block.close()
    memory.close()
