//! The legacy PC timer path: the two 8259 PICs (remapped to vectors
//! 0x20-0x2F, everything masked until a scenario unmasks a line) and
//! channel 0 of the 8254 PIT, whose IRQ 0 reaches the CPU through the
//! master PIC and the local APIC's LINT0 (ExtINT, virtual-wire mode).

use crate::interrupts::PIC_BASE;
use crate::ports::{inb, outb};

const MASTER: u16 = 0x20;
const SLAVE: u16 = 0xa0;
const EOI: u8 = 0x20;
/// The PIT's input clock, Hz.
pub const PIT_HZ: u64 = 1_193_182;
const PIT_CHANNEL0: u16 = 0x40;
const PIT_COMMAND: u16 = 0x43;

/// Reinitializes both PICs at vectors 0x20 and 0x28 with every line
/// masked. Done first thing: on bare metal the BIOS leaves IRQ 0 unmasked
/// at vector 8, which is #DF to a protected-mode IDT.
pub fn pic_init() {
    for (port, base, cascade) in [(MASTER, PIC_BASE, 1 << 2), (SLAVE, PIC_BASE + 8, 2)] {
        outb(port, 0x11); // ICW1: edge, cascade, ICW4 follows
        outb(port + 1, base); // ICW2: vector base
        outb(port + 1, cascade); // ICW3: slave on IRQ 2 / slave id 2
        outb(port + 1, 0x01); // ICW4: 8086 mode, normal EOI
        outb(port + 1, 0xff); // OCW1: all masked
    }
}

/// Unmasks IRQ `irq` (0..8 on the master PIC).
pub fn pic_unmask(irq: u8) {
    outb(MASTER + 1, inb(MASTER + 1) & !(1 << irq));
}

pub fn pic_mask_all() {
    outb(MASTER + 1, 0xff);
    outb(SLAVE + 1, 0xff);
}

/// Ends IRQ `irq`'s interrupt at the PIC(s).
pub fn pic_eoi(irq: u8) {
    if irq >= 8 {
        outb(SLAVE, EOI);
    }
    outb(MASTER, EOI);
}

/// PIT channel 0 as a rate generator (mode 2) at about `hz`. Returns the
/// rate it really runs at, in millihertz.
pub fn pit_periodic(hz: u64) -> u64 {
    let divisor = (PIT_HZ / hz).clamp(2, 0xffff) as u16;
    outb(PIT_COMMAND, 0x34); // channel 0, lobyte/hibyte, mode 2, binary
    outb(PIT_CHANNEL0, divisor as u8);
    outb(PIT_CHANNEL0, (divisor >> 8) as u8);
    PIT_HZ * 1000 / u64::from(divisor)
}

/// Stops channel 0's periodic output: mode 0 (interrupt on terminal
/// count) with the longest count, and IRQ 0 masked.
pub fn pit_stop() {
    outb(MASTER + 1, inb(MASTER + 1) | 1);
    outb(PIT_COMMAND, 0x30);
    outb(PIT_CHANNEL0, 0xff);
    outb(PIT_CHANNEL0, 0xff);
}
