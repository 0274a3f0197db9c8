//! COM1 output, one OUT per byte (each is a VM exit the hypervisor turns
//! into a line of the run's log).

use core::fmt::{self, Write};

pub fn out(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects; the hypervisor emulates it.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack))
    };
}

pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `out`.
    unsafe {
        core::arch::asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack))
    };
    value
}

struct Com1;

impl Write for Com1 {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(|b| out(hv_abi::COM1, b));
        Ok(())
    }
}

pub fn print(args: fmt::Arguments<'_>) {
    let _ = Com1.write_fmt(args);
}

#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {
        $crate::console::print(format_args!("{}\n", format_args!($($arg)*)))
    };
}
