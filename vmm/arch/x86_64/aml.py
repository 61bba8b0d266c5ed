"""A small ACPI Machine Language (AML) encoder: just what our DSDT needs.

Every function returns the encoded bytes of one AML term, so a namespace is
built by nesting calls: ``scope("\\\\_SB_", device("VR00", name("_HID", string("LNRO0005"))))``.
Encodings are those of the ACPI 6.5 specification, chapter 20 (AML grammar)
and section 6.4 (resource descriptors).
"""

from __future__ import annotations

import re

# 20.2.5 / 20.2.3 opcodes and prefixes
_ZERO_OP = 0x00
_ONE_OP = 0x01
_NAME_OP = 0x08
_BYTE_PREFIX = 0x0A
_WORD_PREFIX = 0x0B
_DWORD_PREFIX = 0x0C
_STRING_PREFIX = 0x0D
_QWORD_PREFIX = 0x0E
_SCOPE_OP = 0x10
_BUFFER_OP = 0x11
_PACKAGE_OP = 0x12
_EXT_OP_PREFIX = 0x5B
_DEVICE_OP = 0x82                   # after _EXT_OP_PREFIX
_ROOT_CHAR = 0x5C                   # '\'
_DUAL_NAME_PREFIX = 0x2E
_MULTI_NAME_PREFIX = 0x2F

# 6.4 resource descriptors
_END_TAG = bytes([0x79, 0x00])      # small item 0xF, length 1; checksum 0 = "valid"
_IRQ_NO_FLAGS_TAG = 0x22            # small item 0x4, length 2
_IO_TAG = 0x47                      # small item 0x8, length 7
_IO_DECODE_16 = 0x01
_MEMORY32_FIXED_TAG = 0x86          # large item 0x06
_MEMORY32_FIXED_READ_WRITE = 0x01
_EXTENDED_INTERRUPT_TAG = 0x89      # large item 0x09
_INT_CONSUMER = 1 << 0
_INT_EDGE = 1 << 1
_INT_ACTIVE_LOW = 1 << 2
_INT_SHARED = 1 << 3

_NAME_SEG = re.compile(r"[A-Z_][A-Z0-9_]{0,3}")
_PKG_LENGTH_MAX = 1 << 28


class AmlError(ValueError):
    """A value that AML cannot encode (bad name, too long, out of range)."""


def pkg_length(body_length: int) -> bytes:
    """20.2.4 PkgLength for a body of ``body_length`` bytes (the encoding counts itself)."""
    if body_length + 1 < 1 << 6:
        return bytes([body_length + 1])
    for extra in (1, 2, 3):
        total = body_length + 1 + extra
        if total < 1 << (4 + 8 * extra):
            lead = (extra << 6) | (total & 0x0F)
            return bytes([lead]) + (total >> 4).to_bytes(extra, "little")
    raise AmlError(f"package of {body_length} bytes exceeds the {_PKG_LENGTH_MAX}-byte PkgLength limit")


def name_string(path: str) -> bytes:
    """20.2.2 NameString: an optional root ``\\`` then dot-separated segments, padded with ``_``."""
    root = path.startswith("\\")
    segments = path.lstrip("\\").split(".")
    encoded = b""
    for segment in segments:
        if not _NAME_SEG.fullmatch(segment):
            raise AmlError(f"{segment!r} is not an AML name segment (in {path!r})")
        encoded += segment.ljust(4, "_").encode("ascii")
    if len(segments) == 2:
        encoded = bytes([_DUAL_NAME_PREFIX]) + encoded
    elif len(segments) > 2:
        if len(segments) > 255:
            raise AmlError(f"{path!r} has too many segments")
        encoded = bytes([_MULTI_NAME_PREFIX, len(segments)]) + encoded
    return (bytes([_ROOT_CHAR]) if root else b"") + encoded


def integer(value: int) -> bytes:
    """The shortest ComputationalData encoding of an unsigned integer."""
    if value == 0:
        return bytes([_ZERO_OP])
    if value == 1:
        return bytes([_ONE_OP])
    for prefix, size in ((_BYTE_PREFIX, 1), (_WORD_PREFIX, 2), (_DWORD_PREFIX, 4), (_QWORD_PREFIX, 8)):
        if 0 < value < 1 << (8 * size):
            return bytes([prefix]) + value.to_bytes(size, "little")
    raise AmlError(f"integer {value} does not fit in 64 bits unsigned")


def string(text: str) -> bytes:
    """A String constant (ASCII, NUL-terminated)."""
    data = text.encode("ascii")
    if b"\0" in data:
        raise AmlError("AML strings cannot contain NUL")
    return bytes([_STRING_PREFIX]) + data + b"\0"


def eisa_id(text: str) -> bytes:
    """ASL's EISAID("PNP0501"): three letters and four hex digits compressed into a DWORD."""
    if not re.fullmatch(r"[A-Z]{3}[0-9A-F]{4}", text):
        raise AmlError(f"{text!r} is not an EISA id like 'PNP0501'")
    letters = [ord(c) - 0x40 for c in text[:3]]
    value = (letters[0] << 26) | (letters[1] << 21) | (letters[2] << 16) | int(text[3:], 16)
    # The id is stored byte-swapped: the compressed letters come first in memory.
    return integer(int.from_bytes(value.to_bytes(4, "big"), "little"))


def name(path: str, value: bytes) -> bytes:
    """DefName: ``Name(path, value)``."""
    return bytes([_NAME_OP]) + name_string(path) + value


def package(*elements: bytes) -> bytes:
    """DefPackage of already-encoded elements."""
    if len(elements) > 255:
        raise AmlError("a Package holds at most 255 elements")
    body = bytes([len(elements)]) + b"".join(elements)
    return bytes([_PACKAGE_OP]) + pkg_length(len(body)) + body


def buffer(data: bytes) -> bytes:
    """DefBuffer holding ``data``."""
    body = integer(len(data)) + data
    return bytes([_BUFFER_OP]) + pkg_length(len(body)) + body


def scope(path: str, *terms: bytes) -> bytes:
    """DefScope: ``Scope(path) { terms }``."""
    body = name_string(path) + b"".join(terms)
    return bytes([_SCOPE_OP]) + pkg_length(len(body)) + body


def device(path: str, *terms: bytes) -> bytes:
    """DefDevice: ``Device(path) { terms }``."""
    body = name_string(path) + b"".join(terms)
    return bytes([_EXT_OP_PREFIX, _DEVICE_OP]) + pkg_length(len(body)) + body


def resource_template(*descriptors: bytes) -> bytes:
    """ASL's ResourceTemplate(): a Buffer of descriptors closed by an End Tag."""
    return buffer(b"".join(descriptors) + _END_TAG)


def _check_range(what: str, value: int, bits: int) -> None:
    if not 0 <= value < 1 << bits:
        raise AmlError(f"{what} {value:#x} does not fit in {bits} bits")


def memory32_fixed(base: int, length: int, writable: bool = True) -> bytes:
    """6.4.3.4 32-Bit Fixed Memory Range Descriptor."""
    _check_range("memory base", base, 32)
    _check_range("memory length", length, 32)
    info = _MEMORY32_FIXED_READ_WRITE if writable else 0
    body = bytes([info]) + base.to_bytes(4, "little") + length.to_bytes(4, "little")
    return bytes([_MEMORY32_FIXED_TAG]) + len(body).to_bytes(2, "little") + body


def extended_interrupt(
    gsi: int, *, edge: bool = True, active_low: bool = False, shared: bool = False
) -> bytes:
    """6.4.3.6 Extended Interrupt Descriptor for one interrupt, consumed by the device."""
    _check_range("interrupt", gsi, 32)
    flags = _INT_CONSUMER
    flags |= _INT_EDGE if edge else 0
    flags |= _INT_ACTIVE_LOW if active_low else 0
    flags |= _INT_SHARED if shared else 0
    body = bytes([flags, 1]) + gsi.to_bytes(4, "little")
    return bytes([_EXTENDED_INTERRUPT_TAG]) + len(body).to_bytes(2, "little") + body


def io(base: int, length: int) -> bytes:
    """6.4.2.5 I/O Port Descriptor, fixed range: ``IO(Decode16, base, base, 1, length)``."""
    _check_range("I/O base", base, 16)
    _check_range("I/O length", length, 8)
    port = base.to_bytes(2, "little")
    return bytes([_IO_TAG, _IO_DECODE_16]) + port + port + bytes([1, length])


def irq_no_flags(irq: int) -> bytes:
    """6.4.2.1 IRQ Descriptor without flags (ISA: edge, active high): ``IRQNoFlags(){irq}``."""
    if not 0 <= irq < 16:
        raise AmlError(f"ISA IRQ {irq} is not in 0..15")
    return bytes([_IRQ_NO_FLAGS_TAG]) + (1 << irq).to_bytes(2, "little")
