import io

from vmm.devices.serial import INPUT_CAPACITY, Serial

# Register offsets and bits as drivers/tty/serial/8250 uses them (include/uapi/linux/serial_reg.h).
RX, IER, IIR, LCR, MCR, LSR, MSR, SCR = 0, 1, 2, 3, 4, 5, 6, 7
FCR, EFR = 2, 2
IER_RDI, IER_THRI, IER_UUE = 0x01, 0x02, 0x40
IIR_NO_INT, IIR_THRI, IIR_RDI = 0x01, 0x02, 0x04
MCR_LOOP = 0x10
LSR_DR, LSR_THRE, LSR_TEMT = 0x01, 0x20, 0x40
FCR_ENABLE_FIFO, FCR7_64BYTE = 0x01, 0x20


class Port:
    def __init__(self):
        self.output = bytearray()
        self.irqs = 0
        self.uart = Serial(self.output.extend, irq=self._irq)

    def _irq(self):
        self.irqs += 1

    def inb(self, reg):
        return self.uart.read(reg, 1)[0]

    def outb(self, reg, value):
        self.uart.write(reg, bytes([value]))


def linux_autoconfig(port: Port) -> str:
    """The probe of drivers/tty/serial/8250/8250_port.c:autoconfig(), step by step."""
    scratch = port.inb(IER)
    port.outb(IER, 0)
    scratch2 = port.inb(IER) & 0x0F
    port.outb(IER, 0x0F)
    scratch3 = port.inb(IER) & 0x0F
    port.outb(IER, scratch)
    if scratch2 != 0 or scratch3 != 0x0F:
        return "no UART (IER test)"
    save_mcr, save_lcr = port.inb(MCR), port.inb(LCR)
    port.outb(MCR, MCR_LOOP | 0x0A)
    status1 = port.inb(MSR) & 0xF0
    port.outb(MCR, save_mcr)
    if status1 != 0x90:
        return "no UART (loopback test)"
    port.outb(LCR, 0xBF)
    port.outb(EFR, 0)
    port.outb(LCR, 0)
    port.outb(FCR, FCR_ENABLE_FIFO)
    kind = port.inb(IIR) >> 6
    if kind != 3:
        return {0: "8250", 1: "unknown", 2: "16550"}[kind]
    # autoconfig_16550a(): rule out the chips that extend a 16550A.
    port.outb(LCR, 0x80)
    if port.inb(EFR) == 0:
        return "EFRv1 chip"
    port.outb(LCR, 0xBF)
    if port.inb(EFR) == 0:
        return "EFRv2 chip"
    port.outb(LCR, 0)
    status1 = port.inb(MCR)
    port.outb(LCR, 0xE0)
    status2 = port.inb(2)
    if not ((status2 ^ status1) & MCR_LOOP):
        port.outb(LCR, 0)
        port.outb(MCR, status1 ^ MCR_LOOP)
        port.outb(LCR, 0xE0)
        status2 = port.inb(2)
        port.outb(LCR, 0)
        port.outb(MCR, status1)
        if (status2 ^ status1) & MCR_LOOP:
            return "NS16550 SuperIO"
    port.outb(LCR, 0)
    port.outb(FCR, FCR_ENABLE_FIFO | FCR7_64BYTE)
    status1 = port.inb(IIR) & 0xE0
    port.outb(FCR, FCR_ENABLE_FIFO)
    port.outb(LCR, 0x80)
    port.outb(FCR, FCR_ENABLE_FIFO | FCR7_64BYTE)
    status2 = port.inb(IIR) & 0xE0
    port.outb(FCR, FCR_ENABLE_FIFO)
    port.outb(LCR, 0)
    if status1 == 0xC0 and status2 == 0xE0:
        return "16750"
    iersave = port.inb(IER)
    port.outb(IER, iersave & ~IER_UUE)
    if not port.inb(IER) & IER_UUE:
        port.outb(IER, iersave | IER_UUE)
        if port.inb(IER) & IER_UUE:
            return "XScale"
    port.outb(IER, iersave)
    port.outb(LCR, save_lcr)
    return "16550A"


def test_linux_autoconfig_finds_a_16550a():
    port = Port()
    assert linux_autoconfig(port) == "16550A"
    assert port.output == b""  # probing transmits nothing


def test_thre_interrupt_is_raised_and_reasserted_as_linux_startup_checks():
    port = Port()
    assert port.inb(LSR) & (LSR_THRE | LSR_TEMT) == LSR_THRE | LSR_TEMT
    port.outb(IER, IER_THRI)
    assert port.irqs == 1
    iir1 = port.inb(IIR)
    assert iir1 & 0x0F == IIR_THRI
    assert port.inb(IIR) & IIR_NO_INT  # reading IIR acknowledged THRE
    port.outb(IER, 0)
    port.outb(IER, IER_THRI)
    assert port.inb(IIR) & 0x0F == IIR_THRI  # no UART_BUG_THRE
    assert port.irqs == 2


def test_transmit_goes_to_the_sink_and_raises_thre_again():
    port = Port()
    port.outb(IER, IER_THRI)
    port.inb(IIR)
    for byte in b"hi\n":
        port.outb(RX, byte)
    assert port.output == b"hi\n"
    assert port.irqs == 2  # one rising edge for the enable, one after the acked THRE
    assert port.inb(IIR) & 0x0F == IIR_THRI


def test_file_like_sink():
    sink = io.BytesIO()
    uart = Serial(sink)
    uart.write(0, b"A")
    assert sink.getvalue() == b"A"


def test_input_raises_rx_interrupt_until_drained():
    port = Port()
    port.outb(IER, IER_RDI)
    assert port.inb(LSR) & LSR_DR == 0
    assert port.uart.enqueue_input(b"ok") == 2
    assert port.irqs == 1
    assert port.inb(IIR) & 0x0F == IIR_RDI
    assert port.inb(LSR) & LSR_DR
    assert bytes([port.inb(RX), port.inb(RX)]) == b"ok"
    assert port.inb(LSR) & LSR_DR == 0
    assert port.inb(IIR) & 0x0F == IIR_NO_INT


def test_input_is_bounded():
    port = Port()
    assert port.uart.enqueue_input(b"x" * (INPUT_CAPACITY + 10)) == INPUT_CAPACITY
    assert port.uart.enqueue_input(b"y") == 0


def test_loopback_returns_transmitted_bytes_to_the_receiver():
    port = Port()
    port.outb(MCR, MCR_LOOP)
    port.outb(RX, 0x5A)
    assert port.output == b""
    assert port.inb(RX) == 0x5A


def test_divisor_latch_and_scratch():
    port = Port()
    port.outb(LCR, 0x83)
    port.outb(0, 0x01)
    port.outb(1, 0x00)
    assert (port.inb(0), port.inb(1)) == (0x01, 0x00)
    port.outb(LCR, 0x03)
    port.outb(RX, ord("z"))  # DLAB clear: THR again
    assert port.output == b"z"
    assert port.uart.divisor == 1
    port.outb(SCR, 0xA5)
    assert port.inb(SCR) == 0xA5
