//! The guest's debug console (port 0xE9): its bytes become lines of the
//! run's log. (The guest's real console, COM1, is its own.)

use crate::platform::Platform;

/// Longest console line kept; longer ones are cut in pieces.
const CONSOLE_LINE_MAX: usize = 200;

/// Bytes written to the debug port, as lines for the run's log (in a
/// buffer of its own: the guest cannot make it grow).
#[derive(Default)]
pub struct Console {
    line: heapless::String<CONSOLE_LINE_MAX>,
}

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
                // Never full here: a full line is flushed right away.
                let _ = self.line.push(c);
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
