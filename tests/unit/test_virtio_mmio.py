import pytest

from tests.unit.virtio_driver import FakeDriver
from vmm.devices.virtio import mmio
from vmm.devices.virtio.device import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_VERSION_1,
    VirtioDevice,
    feature,
)
from vmm.devices.virtio.errors import VirtioError
from vmm.devices.virtio.mmio import MmioTransport
from vmm.memory import GuestMemory

ACK, DRIVER, DRIVER_OK, FEATURES_OK = 1, 2, 4, 8
NEEDS_RESET = 64
DEVICE_FEATURE_BIT = 3


class Broken(VirtioError):
    pass


class EchoDevice(VirtioDevice):
    """Two queues; every chain comes back used with its writable length."""

    device_id = 42
    queue_max_sizes = (16, 8)

    def __init__(self):
        super().__init__()
        self.avail_features |= feature(DEVICE_FEATURE_BIT) | feature(VIRTIO_F_EVENT_IDX)
        self.activations = 0
        self.resets = 0
        self.fail_next = False
        self.config_writes = []

    def config_bytes(self):
        return bytes(range(1, 9))

    def write_config(self, offset, data):
        self.config_writes.append((offset, data))

    def activate(self, memory, queues, interrupt):
        super().activate(memory, queues, interrupt)
        self.activations += 1

    def process(self, queue_index):
        if self.fail_next:
            raise Broken("told to fail")
        queue = self.queues[queue_index]
        for chain in queue.drain():
            queue.add_used(chain.head, chain.writable_length)
        if queue.needs_notification():
            self.interrupt.signal_used_queue()

    def reset(self):
        super().reset()
        self.resets += 1


class Guest:
    """The register accesses of Linux's drivers/virtio/virtio_mmio.c."""

    def __init__(self):
        self.memory = GuestMemory([(0, 0x40000)])
        self.device = EchoDevice()
        self.irqs = 0
        self.transport = MmioTransport(self.device, self.memory, irq=self._irq)
        self.drivers = [FakeDriver(self.memory, 16, base=0x1000, data=0x10000),
                        FakeDriver(self.memory, 8, base=0x3000, data=0x20000)]

    def _irq(self):
        self.irqs += 1

    def r32(self, offset):
        return int.from_bytes(self.transport.read(offset, 4), "little")

    def w32(self, offset, value):
        self.transport.write(offset, value.to_bytes(4, "little"))

    def add_status(self, bit):
        self.w32(mmio.REG_STATUS, self.r32(mmio.REG_STATUS) | bit)

    def device_features(self):
        self.w32(mmio.REG_DEVICE_FEATURES_SEL, 1)
        high = self.r32(mmio.REG_DEVICE_FEATURES)
        self.w32(mmio.REG_DEVICE_FEATURES_SEL, 0)
        return high << 32 | self.r32(mmio.REG_DEVICE_FEATURES)

    def negotiate(self, accepted):
        self.w32(mmio.REG_STATUS, 0)
        assert self.r32(mmio.REG_STATUS) == 0  # vm_reset() waits for this
        self.add_status(ACK)
        self.add_status(DRIVER)
        for sel in (1, 0):
            self.w32(mmio.REG_DRIVER_FEATURES_SEL, sel)
            self.w32(mmio.REG_DRIVER_FEATURES, (accepted >> (32 * sel)) & 0xFFFFFFFF)
        self.add_status(FEATURES_OK)
        return bool(self.r32(mmio.REG_STATUS) & FEATURES_OK)

    def setup_queue(self, index, driver):
        self.w32(mmio.REG_QUEUE_SEL, index)
        assert self.r32(mmio.REG_QUEUE_READY) == 0
        assert self.r32(mmio.REG_QUEUE_NUM_MAX) >= driver.size
        self.w32(mmio.REG_QUEUE_NUM, driver.size)
        for low, gpa in ((mmio.REG_QUEUE_DESC_LOW, driver.desc_table),
                         (mmio.REG_QUEUE_DRIVER_LOW, driver.avail_ring),
                         (mmio.REG_QUEUE_DEVICE_LOW, driver.used_ring)):
            self.w32(low, gpa & 0xFFFFFFFF)
            self.w32(low + 4, gpa >> 32)
        self.w32(mmio.REG_QUEUE_READY, 1)
        assert self.r32(mmio.REG_QUEUE_READY) == 1

    def probe(self):
        assert self.r32(mmio.REG_MAGIC_VALUE) == 0x74726976
        assert self.r32(mmio.REG_VERSION) == 2
        assert self.r32(mmio.REG_DEVICE_ID) == 42
        offered = self.device_features()
        assert self.negotiate(offered & (feature(VIRTIO_F_VERSION_1) | feature(DEVICE_FEATURE_BIT)))
        for index, driver in enumerate(self.drivers):
            self.setup_queue(index, driver)
        self.add_status(DRIVER_OK)


@pytest.fixture
def guest():
    g = Guest()
    yield g
    g.memory.close()


def test_linux_init_sequence_activates_the_device(guest):
    guest.probe()
    assert guest.r32(mmio.REG_STATUS) == ACK | DRIVER | FEATURES_OK | DRIVER_OK
    assert guest.device.activations == 1
    assert guest.device.acked_features == feature(VIRTIO_F_VERSION_1) | feature(DEVICE_FEATURE_BIT)
    assert guest.transport.queues[1].size == 8 and guest.transport.queues[1].active
    assert guest.transport.bad_accesses == 0 and guest.transport.refused_writes == 0


def test_notify_uses_buffers_and_interrupts_until_acked(guest):
    guest.probe()
    head = guest.drivers[1].add_chain([(b"x", False), (24, True)])
    guest.w32(mmio.REG_QUEUE_NOTIFY, 1)
    assert guest.drivers[1].take_used() == [(head, 24)]
    assert guest.r32(mmio.REG_INTERRUPT_STATUS) == mmio.INTERRUPT_USED_BUFFER
    assert guest.irqs == 1
    guest.drivers[1].add_chain([(4, True)])
    guest.transport.notify(1)  # the ioeventfd path
    assert guest.irqs == 1     # bit still set: no new edge
    guest.w32(mmio.REG_INTERRUPT_ACK, mmio.INTERRUPT_USED_BUFFER)
    assert guest.r32(mmio.REG_INTERRUPT_STATUS) == 0
    guest.drivers[1].add_chain([(4, True)])
    guest.transport.notify(1)
    assert guest.irqs == 2


def test_features_must_be_offered_and_include_version_1(guest):
    assert not guest.negotiate(feature(VIRTIO_F_VERSION_1) | feature(7))
    assert not guest.negotiate(feature(DEVICE_FEATURE_BIT))
    assert guest.negotiate(feature(VIRTIO_F_VERSION_1))


def test_feature_and_queue_writes_refused_at_the_wrong_time(guest):
    guest.w32(mmio.REG_DRIVER_FEATURES, 1)           # before DRIVER
    guest.w32(mmio.REG_QUEUE_NUM, 4)                 # before FEATURES_OK
    assert guest.transport.refused_writes == 2
    guest.probe()
    refused = guest.transport.refused_writes
    guest.w32(mmio.REG_QUEUE_SEL, 0)
    guest.w32(mmio.REG_QUEUE_DESC_LOW, 0x8000)       # after DRIVER_OK
    guest.w32(mmio.REG_DRIVER_FEATURES, 0)
    assert guest.transport.queues[0].desc_table == guest.drivers[0].desc_table
    assert guest.transport.refused_writes == refused + 2


def test_status_cannot_skip_or_clear_steps(guest):
    guest.add_status(ACK)
    guest.add_status(DRIVER_OK)
    assert guest.r32(mmio.REG_STATUS) == ACK
    guest.add_status(DRIVER)
    guest.w32(mmio.REG_STATUS, ACK)
    assert guest.r32(mmio.REG_STATUS) == ACK | DRIVER
    guest.w32(mmio.REG_STATUS, ACK | DRIVER | NEEDS_RESET)  # a device-only bit
    assert guest.r32(mmio.REG_STATUS) == ACK | DRIVER
    assert guest.device.activations == 0


@pytest.mark.parametrize("offset,size", [(mmio.REG_STATUS, 2), (mmio.REG_STATUS + 1, 4), (0x0E0, 4)])
def test_bad_register_accesses_are_counted_not_fatal(guest, offset, size):
    assert guest.transport.read(offset, size) == bytes(size)
    guest.transport.write(offset, b"\xff" * size)
    assert guest.transport.bad_accesses == 2
    assert guest.r32(mmio.REG_STATUS) == 0


def test_missing_queue_reads_zero_max(guest):
    guest.w32(mmio.REG_QUEUE_SEL, 2)
    assert guest.r32(mmio.REG_QUEUE_NUM_MAX) == 0


def test_config_space_and_generation(guest):
    assert guest.transport.read(mmio.CONFIG_SPACE + 2, 2) == b"\x03\x04"
    assert guest.transport.read(mmio.CONFIG_SPACE + 7, 4) == b"\x08\x00\x00\x00"
    generation = guest.r32(mmio.REG_CONFIG_GENERATION)
    guest.transport.signal_config_change()
    assert guest.r32(mmio.REG_CONFIG_GENERATION) == generation + 1
    assert guest.r32(mmio.REG_INTERRUPT_STATUS) == mmio.INTERRUPT_CONFIG_CHANGE
    guest.transport.write(mmio.CONFIG_SPACE, b"\x01")  # before DRIVER: refused
    guest.add_status(ACK)
    guest.add_status(DRIVER)
    guest.transport.write(mmio.CONFIG_SPACE + 1, b"\x09")
    assert guest.device.config_writes == [(1, b"\x09")]


def test_device_error_sets_needs_reset_until_reset(guest):
    guest.probe()
    guest.device.fail_next = True
    guest.drivers[0].add_chain([(4, True)])
    guest.transport.notify(0)
    assert guest.r32(mmio.REG_STATUS) & NEEDS_RESET
    assert guest.r32(mmio.REG_INTERRUPT_STATUS) & mmio.INTERRUPT_CONFIG_CHANGE
    guest.device.fail_next = False
    guest.transport.notify(0)
    assert guest.drivers[0].take_used() == []  # ignored while broken
    guest.w32(mmio.REG_STATUS, 0)
    assert guest.device.resets == 2 and guest.r32(mmio.REG_STATUS) == 0  # probe reset too
    assert not guest.transport.queues[0].ready


def test_invalid_queue_at_driver_ok_needs_reset(guest):
    guest.drivers[0].size = 12  # not a power of two
    guest.probe()
    assert guest.r32(mmio.REG_STATUS) & NEEDS_RESET
    assert guest.device.activations == 0


def test_reinit_after_reset_works(guest):
    guest.probe()
    guest.w32(mmio.REG_STATUS, 0)
    for driver in guest.drivers:
        driver.avail_idx = driver.used_seen = driver.next_desc = 0
    guest.memory.write(0, bytes(0x8000))
    guest.probe()
    head = guest.drivers[0].add_chain([(2, True)])
    guest.transport.notify(0)
    assert guest.drivers[0].take_used() == [(head, 2)]
    assert guest.device.activations == 2
