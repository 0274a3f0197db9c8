//! The guest's serial console as the hypervisor emulates it: a 16550 at
//! COM1 whose bytes become lines for the run's log.

use alloc::string::String;

use crate::platform::Platform;

/// The guest's serial console: bytes become lines for the run's log.
#[derive(Default)]
pub struct Console {
    line: String,
}

/// Longest console line kept; longer ones are cut in pieces.
const CONSOLE_LINE_MAX: usize = 200;

impl Console {
    pub fn put(&mut self, byte: u8, platform: &mut impl Platform) {
        match byte {
            b'\n' => self.flush(platform),
            b'\r' => {}
            _ => {
                let c = if byte.is_ascii_graphic() || byte == b' ' {
                    byte as char
                } else {
                    '.'
                };
                self.line.push(c);
                if self.line.len() >= CONSOLE_LINE_MAX {
                    self.flush(platform);
                }
            }
        }
    }

    pub fn flush(&mut self, platform: &mut impl Platform) {
        if !self.line.is_empty() {
            platform.guest_console_line(&self.line);
            self.line.clear();
        }
    }
}

/// The guest's emulated 16550 at COM1: enough for a polling driver.
#[derive(Default)]
pub struct Uart {
    /// Line control register (bit 7: divisor latch access).
    pub lcr: u8,
    pub ier: u8,
    pub mcr: u8,
    pub scratch: u8,
}
