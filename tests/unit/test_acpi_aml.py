"""The AML encoder, byte for byte against the encodings of the ACPI specification."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmm.arch.x86_64 import aml
from vmm.arch.x86_64.aml import AmlError


def decode_pkg_length(data: bytes) -> tuple[int, int]:
    """(value, bytes used) of a PkgLength, as ACPI 6.5 section 20.2.4 defines it."""
    extra = data[0] >> 6
    if extra == 0:
        return data[0] & 0x3F, 1
    value = data[0] & 0x0F
    for i in range(extra):
        value |= data[1 + i] << (4 + 8 * i)
    return value, 1 + extra


@pytest.mark.parametrize(
    "body, encoded",
    [
        (0, b"\x01"),
        (62, b"\x3f"),                      # largest one-byte length: 63
        (63, b"\x41\x04"),                  # 65 = 0x41 low nibble 1, then 0x04
        (4093, b"\x4f\xff"),                # largest two-byte length: 4095
        (4094, b"\x81\x00\x01"),            # 4097
    ],
)
def test_pkg_length_vectors(body, encoded):
    assert aml.pkg_length(body) == encoded


@given(st.integers(min_value=0, max_value=(1 << 28) - 5))
def test_pkg_length_counts_itself_and_is_minimal(body):
    encoded = aml.pkg_length(body)
    value, used = decode_pkg_length(encoded)
    assert used == len(encoded)
    assert value == body + len(encoded)
    # Minimal: one byte fewer could not have held the length (which would also be one less).
    largest = {1: (1 << 6) - 1, 2: (1 << 12) - 1, 3: (1 << 20) - 1}
    assert len(encoded) == 1 or body + len(encoded) - 1 > largest[len(encoded) - 1]


def test_pkg_length_limit():
    with pytest.raises(AmlError):
        aml.pkg_length(1 << 28)


@pytest.mark.parametrize(
    "path, encoded",
    [
        ("_HID", b"_HID"),
        ("_S5", b"_S5_"),
        ("\\_SB_", b"\\_SB_"),
        ("\\_SB_.COM1", b"\\\x2e_SB_COM1"),
        ("A.B.C", b"\x2f\x03A___B___C___"),
    ],
)
def test_name_strings(path, encoded):
    assert aml.name_string(path) == encoded


@pytest.mark.parametrize("path", ["", "1ABC", "abcd", "TOOLONG", "\\", "A..B", "VR-1"])
def test_bad_name_strings(path):
    with pytest.raises(AmlError):
        aml.name_string(path)


@pytest.mark.parametrize(
    "value, encoded",
    [
        (0, b"\x00"),
        (1, b"\x01"),
        (2, b"\x0a\x02"),
        (0xFF, b"\x0a\xff"),
        (0x100, b"\x0b\x00\x01"),
        (0x10000, b"\x0c\x00\x00\x01\x00"),
        (1 << 32, b"\x0e" + (1 << 32).to_bytes(8, "little")),
    ],
)
def test_integers(value, encoded):
    assert aml.integer(value) == encoded


@pytest.mark.parametrize("value", [-1, 1 << 64])
def test_integers_out_of_range(value):
    with pytest.raises(AmlError):
        aml.integer(value)


def test_string():
    assert aml.string("LNRO0005") == b"\x0dLNRO0005\x00"
    with pytest.raises(AmlError):
        aml.string("a\0b")


def test_eisa_id():
    assert aml.eisa_id("PNP0501") == b"\x0c\x41\xd0\x05\x01"   # ASL EISAID("PNP0501") = 0x0105D041
    for bad in ("pnp0501", "PNP050", "PNP05G1"):
        with pytest.raises(AmlError):
            aml.eisa_id(bad)


def test_name_package_device_scope():
    assert aml.name("_UID", aml.integer(0)) == b"\x08_UID\x00"
    assert aml.package(aml.integer(5), aml.integer(0)) == b"\x12\x05\x02\x0a\x05\x00"
    assert aml.device("VR00") == b"\x5b\x82\x05VR00"
    assert aml.scope("\\_SB_", b"\xaa") == b"\x10\x07\\_SB_\xaa"
    assert aml.buffer(b"\x79\x00") == b"\x11\x05\x0a\x02\x79\x00"


def test_resource_descriptors():
    assert aml.memory32_fixed(0xD0000000, 0x1000) == (
        b"\x86\x09\x00\x01" + (0xD0000000).to_bytes(4, "little") + (0x1000).to_bytes(4, "little")
    )
    assert aml.extended_interrupt(5) == b"\x89\x06\x00\x03\x01\x05\x00\x00\x00"
    assert aml.extended_interrupt(20, edge=False, active_low=True, shared=True)[3] == 0b1101
    assert aml.io(0x3F8, 8) == b"\x47\x01\xf8\x03\xf8\x03\x01\x08"
    assert aml.irq_no_flags(4) == b"\x22\x10\x00"
    assert aml.resource_template(b"").endswith(b"\x79\x00")


@pytest.mark.parametrize(
    "call",
    [
        lambda: aml.memory32_fixed(1 << 32, 0x1000),
        lambda: aml.extended_interrupt(-1),
        lambda: aml.io(0x10000, 1),
        lambda: aml.io(0x3F8, 256),
        lambda: aml.irq_no_flags(16),
        lambda: aml.package(*[aml.integer(0)] * 256),
    ],
)
def test_unencodable_values(call):
    with pytest.raises(AmlError):
        call()
