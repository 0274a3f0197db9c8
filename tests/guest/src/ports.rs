//! Port I/O. The hypervisor passes the guest's own ports through and
//! emulates, filters or hides the rest (docs/platform.md); none of them has
//! memory effects the compiler must know of.

macro_rules! port_io {
    ($in:ident, $out:ident, $ty:ty, $reg:tt) => {
        pub fn $in(port: u16) -> $ty {
            let value: $ty;
            // SAFETY: port I/O touches no memory the program uses.
            unsafe {
                core::arch::asm!(
                    concat!("in ", $reg, ", dx"),
                    in("dx") port,
                    out($reg) value,
                    options(nomem, nostack, preserves_flags)
                )
            };
            value
        }

        pub fn $out(port: u16, value: $ty) {
            // SAFETY: as for the read; callers choose ports whose side effects
            // are the point (a reset, a power-off, a device register).
            unsafe {
                core::arch::asm!(
                    concat!("out dx, ", $reg),
                    in("dx") port,
                    in($reg) value,
                    options(nomem, nostack, preserves_flags)
                )
            };
        }
    };
}

port_io!(inb, outb, u8, "al");
port_io!(inw, outw, u16, "ax");
port_io!(inl, outl, u32, "eax");
