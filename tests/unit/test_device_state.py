"""Per-device save/restore pairs: a device restored from its saved state carries on
where the original stopped, and bad saved values cannot point it outside guest RAM."""

from __future__ import annotations

import json

import pytest

from tests.unit.virtio_driver import FakeDriver
from vmm.devices.rtc import CmosRtc
from vmm.devices.serial import Serial
from vmm.devices.virtio.blk import Block
from vmm.devices.virtio.mmio import MmioTransport
from vmm.devices.virtio.queue import Queue
from vmm.memory import GuestMemory

MEMORY = 1 << 20


def test_a_queue_restored_from_its_state_pops_the_next_chain():
    memory = GuestMemory([(0, MEMORY)])
    driver = FakeDriver(memory, 8)
    queue = Queue(8)
    driver.configure(queue)
    queue.activate(memory)
    driver.add_chain([(b"one", False)])
    driver.add_chain([(b"two", False)])
    queue.add_used(queue.pop().head, 0)

    saved = json.loads(json.dumps(queue.save_state()))     # it must survive JSON
    again = Queue(8)
    again.restore_state(saved)
    again.activate(memory)
    chain = again.pop()
    assert chain.read(0, 3) == b"two"
    again.add_used(chain.head, 0)
    assert [head for head, _ in driver.take_used()] == [0, 1]


def test_a_transport_saved_with_an_active_device_is_active_again(tmp_path):
    disk = tmp_path / "disk"
    disk.write_bytes(b"\0" * 4096)
    memory = GuestMemory([(0, MEMORY)])
    transport = MmioTransport(Block(disk), memory, irq=lambda: None)
    driver = FakeDriver(memory, 8)
    for step in (1, 3):                                     # ACKNOWLEDGE, DRIVER
        transport.write(0x70, step.to_bytes(4, "little"))
    transport.write(0x24, (1).to_bytes(4, "little"))        # features word 1: VERSION_1
    transport.write(0x20, (1).to_bytes(4, "little"))
    transport.write(0x70, (11).to_bytes(4, "little"))       # FEATURES_OK
    driver.configure(transport.queues[0])
    transport.write(0x70, (15).to_bytes(4, "little"))       # DRIVER_OK
    assert transport.activated

    state = json.loads(json.dumps(transport.save_state()))
    restored = MmioTransport(Block(disk), memory, irq=lambda: None)
    restored.restore_state(state)
    assert restored.activated and restored.queues[0].active
    assert restored.device.acked_features == transport.device.acked_features

    state["queues"][0]["desc_table"] = MEMORY + 4096       # a lie: outside guest RAM
    broken = MmioTransport(Block(disk), memory, irq=lambda: None)
    broken.restore_state(state)
    assert broken.broken and not broken.queues[0].active


def test_serial_and_cmos_registers_come_back():
    serial = Serial(lambda data: None)
    serial.write(3, b"\x83")                                # LCR with DLAB
    serial.write(0, b"\x01")                                # divisor low
    serial.write(3, b"\x03")
    serial.write(7, b"\x5a")                                # scratch
    again = Serial(lambda data: None)
    again.restore_state(serial.save_state())
    assert again.read(7, 1) == b"\x5a" and again.divisor == 1 and again.lcr == 0x03

    rtc = CmosRtc()
    rtc.write(0, b"\x40")
    rtc.write(1, b"\x99")                                   # battery-backed RAM
    other = CmosRtc()
    other.restore_state(rtc.save_state())
    other.write(0, b"\x40")
    assert other.read(1, 1) == b"\x99"
    with pytest.raises(ValueError):
        other.restore_state({"index": 0, "ram": "00"})
