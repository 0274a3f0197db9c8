//! Port I/O: which ports are the guest's, and what the hypervisor does with
//! the rest.
//!
//! - **The guest's, no exit**: the 8259 PICs and their ELCR, the 8254 PIT
//!   and port 0x61, the RTC/CMOS, the POST port 0x80, COM1. None of them can
//!   reach the hypervisor: they program interrupts and timers that go to the
//!   guest, and the hypervisor uses no interrupt (it runs with IF = 0) and
//!   no legacy timer (its tick is the VMX-preemption timer). Their bits in
//!   the I/O bitmaps are clear ([`io_bitmaps`]).
//! - **Filtered** ([`Devices::io`]): the i8042 (0x60, 0x64) and port 0x92
//!   are the guest's except their reset line and A20 gate, which stay the
//!   hypervisor's (a reset request ends the run; A20 stays on); 0xCF9 (reset
//!   control) ends the run on a reset request; the ACPI PM1 block of the
//!   tables the hypervisor gives the guest (S5 ends the run).
//! - **The hypervisor's own**: 0xE9 (the guest's debug console, whose bytes
//!   become lines of the run's log) and 0xF4 (the exit port).
//! - **Hidden** (reads give all ones, writes are dropped, as on an empty
//!   bus): everything else, PCI configuration space (0xCF8-0xCFF) and the
//!   ISA DMA controllers included, so no device (and no DMA) is ever given
//!   to the guest, and the hypervisor's log (COM2) and control channel
//!   (COM3) are out of its reach.

use core::ops::RangeInclusive;

use crate::abi;
use crate::devices::console::Console;
use crate::platform::Platform;

/// Ports the guest owns outright (no VM exit).
pub const GUEST_PORTS: &[RangeInclusive<u16>] = &[
    0x20..=0x21,   // PIC 1
    0x40..=0x43,   // PIT
    0x61..=0x61,   // NMI status and control, PIT gate 2, speaker
    0x70..=0x71,   // RTC/CMOS
    0x80..=0x80,   // POST code
    0xa0..=0xa1,   // PIC 2
    0x3f8..=0x3ff, // COM1: the guest's console
    0x4d0..=0x4d1, // ELCR (PIC edge/level)
];

const I8042_DATA: u16 = 0x60;
const I8042_COMMAND: u16 = 0x64;
const SYSTEM_CONTROL_A: u16 = 0x92;
const PCI_FIRST: u16 = 0xcf8;
const PCI_LAST: u16 = 0xcff;
const RESET_CONTROL: u16 = 0xcf9;

/// The ACPI PM1a event block (status, enable) the guest's FADT names.
pub const PM1A_EVT: u16 = 0x600;
/// The ACPI PM1a control block the guest's FADT names.
pub const PM1A_CNT: u16 = 0x604;
/// SLP_TYP for S5 in the guest's DSDT (`\_S5`).
pub const SLP_TYP_S5: u16 = 5;
const PM1_CNT_SCI_EN: u16 = 1;
const PM1_CNT_SLP_EN: u16 = 1 << 13;

/// i8042 command 0xD1: the next data byte is written to the output port.
const I8042_WRITE_OUTPUT: u8 = 0xd1;
/// i8042 commands that pulse output-port lines (bits 0-3 of the command
/// select which; a clear bit pulses). Bit 0 is the reset line.
const I8042_PULSE: RangeInclusive<u8> = 0xf0..=0xff;
/// i8042 commands that turn A20 off/on on some controllers.
const I8042_A20_OFF: u8 = 0xdd;
/// Output port (and port 0x92) bits: system reset (active low on the
/// i8042, active high on 0x92), A20 gate.
const RESET_LINE: u8 = 1 << 0;
const A20_GATE: u8 = 1 << 1;
/// Reset control register (0xCF9): reset CPU.
const RST_CPU: u8 = 1 << 2;

/// The I/O bitmaps A (ports 0..0x7FFF) and B: a set bit makes the port exit.
pub fn io_bitmaps() -> [u8; 8192] {
    let mut bitmap = [0xff; 8192];
    for range in GUEST_PORTS {
        for port in range.clone() {
            bitmap[usize::from(port / 8)] &= !(1 << (port % 8));
        }
    }
    bitmap
}

/// How a guest asked to leave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetPath {
    /// Keyboard controller: pulse command or output-port write.
    I8042,
    /// System control port A (0x92), fast reset.
    Port92,
    /// Reset control register (0xCF9).
    ResetControl,
}

impl core::fmt::Display for ResetPath {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::I8042 => "the i8042 keyboard controller",
            Self::Port92 => "port 0x92",
            Self::ResetControl => "the reset control register (0xCF9)",
        })
    }
}

/// What a port access came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoOutcome {
    /// Done; for a read, the value (the low `size` bytes count).
    Done(u32),
    /// The guest wrote its status to the exit port.
    Exit(u8),
    /// The guest reset the machine.
    Reset(ResetPath),
    /// The guest entered ACPI S5.
    PowerOff,
}

/// A port access as the exit qualification gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortAccess {
    pub port: u16,
    /// 1, 2 or 4 bytes.
    pub size: u8,
    /// `Some(value)` for OUT, `None` for IN.
    pub write: Option<u32>,
}

/// The hardware ports a filtered device forwards to (the real i8042 and
/// port 0x92); a simulation in host tests.
pub trait PortIo {
    fn inb(&mut self, port: u16) -> u8;
    fn outb(&mut self, port: u16, value: u8);
}

/// The state of what the hypervisor emulates or filters for a guest.
#[derive(Default)]
pub struct Devices {
    /// Bytes the guest writes to 0xE9, as lines.
    pub console: Console,
    /// The i8042's last command was 0xD1: the next data byte is the output port.
    i8042_output_next: bool,
    /// PM1 enable register (kept for the guest to read back).
    pm1_enable: u16,
    /// PM1 control register (SCI_EN always set: ACPI mode from the start).
    pm1_control: u16,
}

impl Devices {
    /// Handles an access to a port that exits.
    pub fn io(
        &mut self,
        access: PortAccess,
        hw: &mut impl PortIo,
        platform: &mut impl Platform,
    ) -> IoOutcome {
        let PortAccess { port, size, write } = access;
        match (port, write) {
            (abi::EXIT_PORT, Some(value)) => {
                self.console.flush(platform);
                IoOutcome::Exit(value as u8)
            }
            (abi::DEBUG_PORT, Some(value)) => {
                self.console.put(value as u8, platform);
                IoOutcome::Done(0)
            }
            (abi::DEBUG_PORT, None) => IoOutcome::Done(u32::from(abi::DEBUG_PORT as u8)),
            (I8042_DATA | I8042_COMMAND, _) if size == 1 => self.i8042(port, write, hw),
            (SYSTEM_CONTROL_A, _) if size == 1 => match write {
                None => IoOutcome::Done(u32::from(hw.inb(port))),
                Some(value) if value as u8 & RESET_LINE != 0 => IoOutcome::Reset(ResetPath::Port92),
                Some(value) => {
                    hw.outb(port, value as u8 | A20_GATE);
                    IoOutcome::Done(0)
                }
            },
            (RESET_CONTROL, Some(value)) if size == 1 => {
                if value as u8 & RST_CPU != 0 {
                    IoOutcome::Reset(ResetPath::ResetControl)
                } else {
                    IoOutcome::Done(0)
                }
            }
            (RESET_CONTROL, None) if size == 1 => IoOutcome::Done(0),
            (PCI_FIRST..=PCI_LAST, None) => IoOutcome::Done(u32::MAX),
            (PCI_FIRST..=PCI_LAST, Some(_)) => IoOutcome::Done(0),
            (PM1A_EVT..=0x603, _) => self.pm1_event(port, size, write),
            (PM1A_CNT..=0x605, _) => self.pm1_control(port, size, write),
            (_, None) => IoOutcome::Done(u32::MAX),
            (_, Some(value)) => {
                log::trace!("guest: OUT {port:#x} <- {value:#x} (no device)");
                IoOutcome::Done(0)
            }
        }
    }

    /// The keyboard controller, passed through but for its reset line and
    /// A20 gate.
    fn i8042(&mut self, port: u16, write: Option<u32>, hw: &mut impl PortIo) -> IoOutcome {
        let Some(value) = write.map(|v| v as u8) else {
            return IoOutcome::Done(u32::from(hw.inb(port)));
        };
        if port == I8042_COMMAND {
            self.i8042_output_next = value == I8042_WRITE_OUTPUT;
            if I8042_PULSE.contains(&value) && value & RESET_LINE == 0 {
                return IoOutcome::Reset(ResetPath::I8042);
            }
            if value == I8042_A20_OFF || I8042_PULSE.contains(&value) {
                // A20 stays on; pulsing other lines does nothing useful.
                return IoOutcome::Done(0);
            }
            hw.outb(port, value);
            return IoOutcome::Done(0);
        }
        if core::mem::take(&mut self.i8042_output_next) {
            if value & RESET_LINE == 0 {
                return IoOutcome::Reset(ResetPath::I8042);
            }
            hw.outb(port, value | A20_GATE);
            return IoOutcome::Done(0);
        }
        hw.outb(port, value);
        IoOutcome::Done(0)
    }

    /// PM1a status (0x600-0x601, nothing ever pending) and enable
    /// (0x602-0x603, kept).
    fn pm1_event(&mut self, port: u16, size: u8, write: Option<u32>) -> IoOutcome {
        let offset = port - PM1A_EVT;
        // The block as one little-endian dword: status low, enable high.
        let block = u32::from(self.pm1_enable) << 16;
        match write {
            None => IoOutcome::Done(read_bytes(block, offset, size)),
            Some(value) => {
                let merged = write_bytes(block, offset, size, value);
                self.pm1_enable = (merged >> 16) as u16;
                IoOutcome::Done(0)
            }
        }
    }

    /// PM1a control: S5 with SLP_EN ends the run; other sleep states are
    /// not offered (the DSDT names only \_S5), so they do nothing.
    fn pm1_control(&mut self, port: u16, size: u8, write: Option<u32>) -> IoOutcome {
        let offset = port - PM1A_CNT;
        let register = u32::from(self.pm1_control | PM1_CNT_SCI_EN);
        match write {
            None => IoOutcome::Done(read_bytes(register, offset, size)),
            Some(value) => {
                let merged = write_bytes(register, offset, size, value) as u16;
                let slp_typ = (merged >> 10) & 7;
                if merged & PM1_CNT_SLP_EN != 0 && slp_typ == SLP_TYP_S5 {
                    return IoOutcome::PowerOff;
                }
                self.pm1_control = merged & !PM1_CNT_SLP_EN;
                IoOutcome::Done(0)
            }
        }
    }
}

/// `size` bytes at byte `offset` of a little-endian register (bytes past
/// its end read as ones).
fn read_bytes(register: u32, offset: u16, size: u8) -> u32 {
    let mut value = 0;
    for i in 0..u32::from(size) {
        let byte = u32::from(offset) + i;
        let b = if byte < 4 {
            register >> (8 * byte) & 0xff
        } else {
            0xff
        };
        value |= b << (8 * i);
    }
    value
}

/// The register after writing `size` bytes of `value` at byte `offset`.
fn write_bytes(register: u32, offset: u16, size: u8, value: u32) -> u32 {
    let mut register = register;
    for i in 0..u32::from(size) {
        let byte = u32::from(offset) + i;
        if byte < 4 {
            let b = value >> (8 * i) & 0xff;
            register = register & !(0xff << (8 * byte)) | b << (8 * byte);
        }
    }
    register
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;
    use crate::testing::SimPlatform;

    #[derive(Default)]
    struct Hw {
        outs: Vec<(u16, u8)>,
    }

    impl PortIo for Hw {
        fn inb(&mut self, port: u16) -> u8 {
            port as u8
        }
        fn outb(&mut self, port: u16, value: u8) {
            self.outs.push((port, value));
        }
    }

    fn out(d: &mut Devices, hw: &mut Hw, port: u16, size: u8, value: u32) -> IoOutcome {
        let access = PortAccess {
            port,
            size,
            write: Some(value),
        };
        d.io(access, hw, &mut SimPlatform::new())
    }

    fn inp(d: &mut Devices, hw: &mut Hw, port: u16, size: u8) -> IoOutcome {
        let access = PortAccess {
            port,
            size,
            write: None,
        };
        d.io(access, hw, &mut SimPlatform::new())
    }

    #[test]
    fn the_bitmaps_pass_exactly_the_guests_ports() {
        let bitmap = io_bitmaps();
        let exits = |port: u16| bitmap[usize::from(port / 8)] & (1 << (port % 8)) != 0;
        for port in [
            0x20, 0x21, 0x40, 0x43, 0x61, 0x70, 0x71, 0x80, 0xa1, 0x3f8, 0x3ff, 0x4d1,
        ] {
            assert!(!exits(port), "{port:#x} is the guest's");
        }
        for port in [
            0x00, 0x0f, 0x60, 0x64, 0x81, 0x92, 0xc0, 0xdf, 0xe9, 0xf4, 0x2f8, 0x3e8, 0xcf8, 0xcf9,
            0xcfc, 0x600, 0x604, 0xffff,
        ] {
            assert!(exits(port), "{port:#x} exits");
        }
    }

    #[test]
    fn hidden_ports_read_all_ones_and_ignore_writes() {
        let (mut d, mut hw) = (Devices::default(), Hw::default());
        for port in [
            0x00, 0x08, 0x87, 0xc0, 0xd4, 0x2f8, 0x3e8, 0xcf8, 0xcfc, 0x1f0,
        ] {
            assert_eq!(inp(&mut d, &mut hw, port, 4), IoOutcome::Done(u32::MAX));
            assert_eq!(out(&mut d, &mut hw, port, 1, 0xc4), IoOutcome::Done(0));
        }
        assert!(hw.outs.is_empty(), "nothing reaches the hardware");
    }

    #[test]
    fn every_reset_path_ends_the_run_and_a20_stays_on() {
        let (mut d, mut hw) = (Devices::default(), Hw::default());
        assert_eq!(
            out(&mut d, &mut hw, 0x64, 1, 0xfe),
            IoOutcome::Reset(ResetPath::I8042)
        );
        // Output-port write: A20 forced on, a cleared reset bit is a reset.
        assert_eq!(out(&mut d, &mut hw, 0x64, 1, 0xd1), IoOutcome::Done(0));
        assert_eq!(out(&mut d, &mut hw, 0x60, 1, 0x01), IoOutcome::Done(0));
        assert_eq!(hw.outs, [(0x64, 0xd1), (0x60, 0x03)]);
        assert_eq!(out(&mut d, &mut hw, 0x64, 1, 0xd1), IoOutcome::Done(0));
        assert_eq!(
            out(&mut d, &mut hw, 0x60, 1, 0x02),
            IoOutcome::Reset(ResetPath::I8042)
        );
        // After the output-port byte, data bytes go to the keyboard again.
        assert_eq!(out(&mut d, &mut hw, 0x60, 1, 0xf4), IoOutcome::Done(0));
        assert_eq!(hw.outs.last(), Some(&(0x60, 0xf4)));
        assert_eq!(out(&mut d, &mut hw, 0x64, 1, 0xdd), IoOutcome::Done(0));
        assert_ne!(hw.outs.last(), Some(&(0x64, 0xdd)), "A20 off is dropped");
        assert_eq!(inp(&mut d, &mut hw, 0x64, 1), IoOutcome::Done(0x64));
        assert_eq!(out(&mut d, &mut hw, 0x92, 1, 0x00), IoOutcome::Done(0));
        assert_eq!(hw.outs.last(), Some(&(0x92, A20_GATE)));
        assert_eq!(
            out(&mut d, &mut hw, 0x92, 1, 0x01),
            IoOutcome::Reset(ResetPath::Port92)
        );
        assert_eq!(out(&mut d, &mut hw, 0xcf9, 1, 0x02), IoOutcome::Done(0));
        assert_eq!(
            out(&mut d, &mut hw, 0xcf9, 1, 0x06),
            IoOutcome::Reset(ResetPath::ResetControl)
        );
        assert_eq!(
            out(&mut d, &mut hw, 0xcf8, 4, 0x8000_0000),
            IoOutcome::Done(0),
            "a PCI address write is no reset"
        );
    }

    #[test]
    fn acpi_s5_powers_off_and_the_pm1_block_reads_back() {
        let (mut d, mut hw) = (Devices::default(), Hw::default());
        assert_eq!(
            inp(&mut d, &mut hw, PM1A_CNT, 2),
            IoOutcome::Done(1),
            "SCI_EN: ACPI mode"
        );
        assert_eq!(
            out(&mut d, &mut hw, PM1A_EVT + 2, 2, 0x0120),
            IoOutcome::Done(0)
        );
        assert_eq!(
            inp(&mut d, &mut hw, PM1A_EVT, 4),
            IoOutcome::Done(0x0120_0000)
        );
        // S1 is not offered: nothing happens.
        let s1 = 1 << 10 | PM1_CNT_SLP_EN;
        assert_eq!(
            out(&mut d, &mut hw, PM1A_CNT, 2, u32::from(s1)),
            IoOutcome::Done(0)
        );
        let s5 = SLP_TYP_S5 << 10 | PM1_CNT_SLP_EN;
        assert_eq!(
            out(&mut d, &mut hw, PM1A_CNT, 2, u32::from(s5)),
            IoOutcome::PowerOff
        );
        // The high byte alone, as some guests write it.
        let mut d = Devices::default();
        assert_eq!(
            out(&mut d, &mut hw, PM1A_CNT + 1, 1, u32::from(s5 >> 8)),
            IoOutcome::PowerOff
        );
    }

    #[test]
    fn the_exit_port_and_the_debug_console() {
        let (mut d, mut hw) = (Devices::default(), Hw::default());
        let mut platform = SimPlatform::new();
        for b in b"hi\n" {
            let access = PortAccess {
                port: abi::DEBUG_PORT,
                size: 1,
                write: Some(u32::from(*b)),
            };
            d.io(access, &mut hw, &mut platform);
        }
        assert_eq!(platform.console, ["hi"]);
        assert_eq!(
            out(&mut d, &mut hw, abi::EXIT_PORT, 1, 7),
            IoOutcome::Exit(7)
        );
    }
}
