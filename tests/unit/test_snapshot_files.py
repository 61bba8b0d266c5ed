"""The snapshot files on their own: memory files (sparse, diffs, layering) and the
checksummed state file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmm.memory import PAGE_SIZE, GuestMemory
from vmm.snapshot.errors import CorruptSnapshot, IncompatibleSnapshot
from vmm.snapshot.memory_file import (
    pages_from_dirty_bitmap,
    read_pages,
    runs,
    union,
    write_full,
    write_pages,
)
from vmm.snapshot.state_file import read_state, write_state

MIB = 1 << 20
LAYOUT = [(0, 8 * MIB), (16 * MIB, 4 * MIB)]     # two regions with a hole between


def _memory_with(pages: dict[int, bytes], layout=LAYOUT) -> GuestMemory:
    memory = GuestMemory(layout)
    for gpa, data in pages.items():
        memory.write(gpa, data)
    return memory


def _open(path: Path, flags=os.O_RDWR | os.O_CREAT) -> int:
    return os.open(path, flags, 0o600)


def test_a_full_memory_file_holds_non_zero_pages_and_holes_elsewhere(tmp_path):
    memory = _memory_with({0x1000: b"a" * 10, 5 * MIB: b"b", 17 * MIB + 0x3000: b"c" * PAGE_SIZE})
    fd = _open(tmp_path / "memory")
    written = write_full(memory, fd)
    os.close(fd)
    assert written == 3 * PAGE_SIZE
    assert os.path.getsize(tmp_path / "memory") == 12 * MIB
    assert os.stat(tmp_path / "memory").st_blocks * 512 < 1 * MIB     # sparse

    with open(tmp_path / "memory", "rb") as file:
        restored = GuestMemory(LAYOUT, backing=file.fileno())
    assert restored.read(0x1000, 10) == b"a" * 10
    assert restored.read(5 * MIB, 1) == b"b"
    assert restored.read(17 * MIB + 0x3000, PAGE_SIZE) == b"c" * PAGE_SIZE
    assert restored.read(0x2000, PAGE_SIZE) == bytes(PAGE_SIZE)


def test_writes_to_a_restored_mapping_stay_private(tmp_path):
    memory = _memory_with({0: b"original"})
    fd = _open(tmp_path / "memory")
    write_full(memory, fd)
    os.close(fd)
    with open(tmp_path / "memory", "rb") as file:
        first = GuestMemory(LAYOUT, backing=file.fileno())
        second = GuestMemory(LAYOUT, backing=file.fileno())
    first.write(0, b"changed!")
    assert second.read(0, 8) == b"original"
    assert (tmp_path / "memory").read_bytes()[:8] == b"original"


def test_a_diff_layer_over_its_base_gives_the_newer_memory(tmp_path):
    memory = _memory_with({0: b"base", 2 * MIB: b"stays", 17 * MIB: b"base too"})
    base_fd = _open(tmp_path / "base")
    write_full(memory, base_fd)
    os.close(base_fd)
    memory.track_host_writes()
    memory.write(0, b"new!")                          # changed
    memory.write(17 * MIB, bytes(8))                  # zeroed: must not fall back to "base too"
    pages = memory.take_host_writes()
    assert sorted(p for p, b in enumerate(pages) if b) == [0, (8 * MIB + MIB) // PAGE_SIZE]
    diff_fd = _open(tmp_path / "diff")
    assert write_pages(memory, diff_fd, pages) == PAGE_SIZE   # the zero page stays a hole
    os.close(diff_fd)

    with open(tmp_path / "base", "rb") as file:
        restored = GuestMemory(LAYOUT, backing=file.fileno())
    with open(tmp_path / "diff", "rb") as file:
        read_pages(restored, file.fileno(), pages)
    assert restored.read(0, 4) == b"new!"
    assert restored.read(2 * MIB, 5) == b"stays"
    assert restored.read(17 * MIB, 8) == bytes(8)


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def test_pages_discarded_under_a_restored_mapping_read_as_zeros_and_are_holes_next_time(tmp_path):
    memory = _memory_with({page * PAGE_SIZE: b"\xff" * PAGE_SIZE for page in range(1024)})
    fd = _open(tmp_path / "memory")
    write_full(memory, fd)
    os.close(fd)
    with open(tmp_path / "memory", "rb") as file:
        restored = GuestMemory(LAYOUT, backing=file.fileno())
    restored.track_host_writes()
    for page in range(1024):                          # the guest writes them: private copies
        restored.write(page * PAGE_SIZE, b"\xee" * PAGE_SIZE)
    restored.take_host_writes()
    before = _rss_kib()
    restored.discard(PAGE_SIZE, 1000 * PAGE_SIZE)     # the balloon gives 1000 of them back
    assert before - _rss_kib() >= 1000 * PAGE_SIZE // 1024 * 9 // 10
    assert restored.read(0, 2) == b"\xee\xee"
    assert restored.read(PAGE_SIZE, 1000 * PAGE_SIZE) == bytes(1000 * PAGE_SIZE)  # not the file's
    assert restored.read(1001 * PAGE_SIZE, 1) == b"\xee"
    restored.write(5 * PAGE_SIZE, b"back")            # written again: memory as before
    assert restored.read(5 * PAGE_SIZE, 4) == b"back"
    changed = restored.take_host_writes()             # a diff must carry the zeros too
    assert [p for p, b in enumerate(changed) if b] == list(range(1, 1001))
    fd = _open(tmp_path / "next")
    assert write_full(restored, fd) == 25 * PAGE_SIZE     # pages 0, 5 and 1001..1023; holes between
    os.close(fd)
    restored.close()


def test_host_writes_are_tracked_through_views_too():
    memory = GuestMemory([(0, 1 * MIB)])
    memory.track_host_writes()
    memory.view(3 * PAGE_SIZE + 10, PAGE_SIZE)[0] = 1     # spans pages 3 and 4
    assert [p for p, b in enumerate(memory.take_host_writes()) if b] == [3, 4]
    assert not any(memory.take_host_writes())             # taking starts over


def test_a_kvm_dirty_bitmap_becomes_a_page_set():
    bitmap = bytes([0b0000_0101, 0, 0b1000_0000]) + bytes(5)
    pages = pages_from_dirty_bitmap(bitmap, 20)
    assert [p for p, b in enumerate(pages) if b] == [0, 2]
    assert len(pages) == 20
    assert [p for p, b in enumerate(pages_from_dirty_bitmap(bitmap, 64)) if b] == [0, 2, 23]


@given(st.lists(st.booleans(), min_size=1, max_size=300), st.lists(st.booleans(), min_size=1, max_size=300))
@settings(max_examples=200)
def test_union_and_runs_agree_with_a_plain_model(a, b):
    size = max(len(a), len(b))
    a, b = (a + [False] * size)[:size], (b + [False] * size)[:size]
    merged = union(bytes(a), bytes(b))
    assert [bool(x) for x in merged] == [x or y for x, y in zip(a, b)]
    covered = [False] * size
    for first, end in runs(merged):
        assert first < end and all(merged[first:end])
        covered[first:end] = [True] * (end - first)
    assert covered == [bool(x) for x in merged]


def test_the_state_file_round_trips_and_refuses_damage(tmp_path):
    path = tmp_path / "state"
    write_state(path, {"vcpus": [1, 2], "name": "x"})
    assert read_state(path) == {"vcpus": [1, 2], "name": "x"}
    data = path.read_bytes()

    path.write_bytes(data[:-3])
    with pytest.raises(CorruptSnapshot, match="truncated or damaged"):
        read_state(path)
    path.write_bytes(data[:10])
    with pytest.raises(CorruptSnapshot, match="truncated"):
        read_state(path)
    path.write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(CorruptSnapshot, match="not an sm snapshot"):
        read_state(path)
    path.write_bytes(data[:8] + (99).to_bytes(4, "little") + data[12:])
    with pytest.raises(IncompatibleSnapshot, match="format 99"):
        read_state(path)
    with pytest.raises(CorruptSnapshot, match="missing"):
        read_state(tmp_path / "nothing")


@given(st.binary(max_size=200))
def test_the_state_reader_never_fails_with_anything_but_a_snapshot_error(data):
    import tempfile
    with tempfile.NamedTemporaryFile() as file:
        file.write(data)
        file.flush()
        try:
            read_state(Path(file.name))
        except (CorruptSnapshot, IncompatibleSnapshot):
            pass
