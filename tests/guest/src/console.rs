//! The test guest's console: COM1, its own serial port (the hypervisor
//! passes it through; the run's log shows its lines). A polling driver:
//! each byte waits for the transmitter, or the UART drops it.

use core::fmt::{self, Write};

use crate::ports::{inb, outb as out};

/// Line status: transmitter holding register empty; transmitter empty.
const LSR_THR_EMPTY: u8 = 1 << 5;
const LSR_IDLE: u8 = 1 << 6;
/// Polls before a byte is sent anyway (a missing UART must not hang the guest).
const SEND_POLLS: u32 = 100_000;

/// 115200 baud, 8N1, FIFOs on, interrupts off.
pub fn init() {
    let base = hv_abi::COM1;
    out(base + 1, 0x00);
    out(base + 3, 0x80);
    out(base, 0x01);
    out(base + 1, 0x00);
    out(base + 3, 0x03);
    out(base + 2, 0xc7);
    out(base + 4, 0x03);
}

struct Com1;

impl Write for Com1 {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            for _ in 0..SEND_POLLS {
                if inb(hv_abi::COM1 + 5) & LSR_THR_EMPTY != 0 {
                    break;
                }
                core::hint::spin_loop();
            }
            out(hv_abi::COM1, b);
        }
        Ok(())
    }
}

/// Waits until the UART has sent everything (before the machine stops).
pub fn drain() {
    let _ = (0..SEND_POLLS * 16).any(|_| inb(hv_abi::COM1 + 5) & LSR_IDLE != 0);
}

/// One CPU prints at a time, so lines do not mix.
static LOCK: spin::Mutex<()> = spin::Mutex::new(());

pub fn print(args: fmt::Arguments<'_>) {
    // A CPU that faults while it prints (the report of an unexpected
    // exception) must not wait for itself forever: it prints anyway.
    let _guard = (0..10_000_000).find_map(|_| {
        let guard = LOCK.try_lock();
        if guard.is_none() {
            core::hint::spin_loop();
        }
        guard
    });
    let _ = Com1.write_fmt(args);
}

#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {
        $crate::console::print(format_args!("{}\n", format_args!($($arg)*)))
    };
}
