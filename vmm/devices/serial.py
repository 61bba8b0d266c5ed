"""8250/16550A UART, the guest's COM1 console.

Transmission is instant: the transmitter is always empty (LSR THRE and TEMT
set), so a byte written to THR goes straight to the console sink. Received
bytes wait in a bounded FIFO fed by :meth:`Serial.enqueue_input`.

The interrupt output is turned into edges for an edge-triggered GSI: the
``irq`` callback fires whenever the UART goes from "no interrupt pending" to
"some interrupt pending". Linux's handler reads IIR until it says no
interrupt is pending, so an edge per rising transition loses nothing.

Linux's 8250 autoconfig identifies this as a 16550A: IER keeps only its low
four bits, loopback wires MCR outputs to MSR inputs, IIR bits 7:6 read 11
while the FIFO is enabled, and IIR never has bits 4 or 5 set (which would
make it look like an NS SuperIO or a TI16750).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import BinaryIO, Callable

# Register offsets from the base port (DLAB = LCR bit 7 remaps 0 and 1).
RBR_THR_DLL = 0
IER_DLM = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7
REGISTER_COUNT = 8

IER_RDI = 0x01        # received data available
IER_THRI = 0x02       # transmitter holding register empty
IER_MASK = 0x0F       # 16550A has no IER bits 4-7

IIR_NO_INT = 0x01
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE_FIFO = 0x01
FCR_CLEAR_RCVR = 0x02

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

LSR_DR = 0x01
LSR_THRE = 0x20
LSR_TEMT = 0x40

MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80

INPUT_CAPACITY = 4096  # host bytes waiting for the guest; more are refused

Sink = Callable[[bytes], object] | BinaryIO


def _as_writer(out: Sink) -> Callable[[bytes], None]:
    if not hasattr(out, "write"):
        return out  # type: ignore[return-value]
    flush = getattr(out, "flush", None)

    def write(data: bytes) -> None:
        out.write(data)
        if flush is not None:
            flush()

    return write


class Serial:
    """A 16550A UART with instant transmit and a host-fed receive FIFO."""

    def __init__(self, out: Sink, irq: Callable[[], None] = lambda: None):
        self._write_out = _as_writer(out)
        self._irq = irq
        self._lock = threading.Lock()
        self._input: deque[int] = deque()
        self.ier = 0
        self.lcr = 0x03          # 8N1, what firmware would leave
        self.mcr = MCR_OUT2
        self.scr = 0
        self.fcr = 0
        self.divisor = 12        # 9600 baud from a 1.8432 MHz clock
        self._thr_pending = False

    # --- snapshots -------------------------------------------------------

    def save_state(self) -> dict:
        """Registers only: unread input belongs to a host that will not be there."""
        with self._lock:
            return {"ier": self.ier, "lcr": self.lcr, "mcr": self.mcr, "scr": self.scr,
                    "fcr": self.fcr, "divisor": self.divisor, "thr_pending": self._thr_pending}

    def restore_state(self, state: dict) -> None:
        with self._lock:
            self.ier, self.lcr = state["ier"] & 0xFF, state["lcr"] & 0xFF
            self.mcr, self.scr = state["mcr"] & MCR_MASK, state["scr"] & 0xFF
            self.fcr, self.divisor = state["fcr"] & 0xFF, state["divisor"] & 0xFFFF
            self._thr_pending = bool(state["thr_pending"])

    # --- host side -----------------------------------------------------

    def enqueue_input(self, data: bytes) -> int:
        """Queue host→guest bytes; returns how many fitted in the FIFO."""
        with self._lock:
            was_pending = self._interrupt_pending()
            room = INPUT_CAPACITY - len(self._input)
            accepted = data[:max(room, 0)]
            self._input.extend(accepted)
            self._edge(was_pending)
            return len(accepted)

    # --- guest side (bus device) ----------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        if offset >= REGISTER_COUNT:
            return b"\xff" * size
        with self._lock:
            was_pending = self._interrupt_pending()
            value = self._read_register(offset)
            self._edge(was_pending)
        return bytes([value]) + b"\x00" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        if offset >= REGISTER_COUNT or not data:
            return
        with self._lock:
            was_pending = self._interrupt_pending()
            self._write_register(offset, data[0])
            self._edge(was_pending)

    # --- registers -------------------------------------------------------

    def _read_register(self, offset: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                return self.divisor & 0xFF
            return self._input.popleft() if self._input else 0
        if offset == IER_DLM:
            return (self.divisor >> 8) if dlab else self.ier
        if offset == IIR_FCR:
            iir = self._identify()
            if iir == IIR_THRI:
                self._thr_pending = False  # reading IIR acknowledges THRE
            fifo_bits = IIR_FIFO_ENABLED if self.fcr & FCR_ENABLE_FIFO else 0
            return iir | fifo_bits
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            return LSR_THRE | LSR_TEMT | (LSR_DR if self._input else 0)
        if offset == MSR:
            return self._modem_status()
        return self.scr

    def _write_register(self, offset: int, value: int) -> None:
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                self.divisor = (self.divisor & 0xFF00) | value
            else:
                self._transmit(value)
        elif offset == IER_DLM:
            if dlab:
                self.divisor = (self.divisor & 0x00FF) | (value << 8)
            else:
                self._set_ier(value & IER_MASK)
        elif offset == IIR_FCR:
            self.fcr = value & ~0x06  # clear bits are self-clearing
            if value & FCR_CLEAR_RCVR:
                self._input.clear()
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            self.mcr = value & MCR_MASK
        elif offset == SCR:
            self.scr = value
        # LSR and MSR are read-only.

    def _transmit(self, value: int) -> None:
        if self.mcr & MCR_LOOP:
            if len(self._input) < INPUT_CAPACITY:
                self._input.append(value)
        else:
            self._write_out(bytes([value]))
        # The byte left at once, so THR is empty again: a fresh THRE event.
        self._thr_pending = True

    def _set_ier(self, value: int) -> None:
        # Enabling THRI while THR is empty raises THRE at once, as on real
        # 16550s; Linux's startup test relies on it (else UART_BUG_THRE).
        if (value ^ self.ier) & IER_THRI:
            self._thr_pending = bool(value & IER_THRI)
        self.ier = value

    def _modem_status(self) -> int:
        if not self.mcr & MCR_LOOP:
            return MSR_DCD | MSR_DSR | MSR_CTS  # a cable with the other end ready
        msr = 0
        if self.mcr & MCR_RTS:
            msr |= MSR_CTS
        if self.mcr & MCR_DTR:
            msr |= MSR_DSR
        if self.mcr & MCR_OUT1:
            msr |= MSR_RI
        if self.mcr & MCR_OUT2:
            msr |= MSR_DCD
        return msr

    # --- interrupts ------------------------------------------------------

    def _identify(self) -> int:
        if self.ier & IER_RDI and self._input:
            return IIR_RDI
        if self.ier & IER_THRI and self._thr_pending:
            return IIR_THRI
        return IIR_NO_INT

    def _interrupt_pending(self) -> bool:
        return self._identify() != IIR_NO_INT

    def _edge(self, was_pending: bool) -> None:
        if not was_pending and self._interrupt_pending():
            self._irq()
