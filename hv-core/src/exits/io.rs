//! Port I/O: every port exits (both I/O bitmaps are all ones). The guest's
//! COM1 is an emulated 16550 whose output goes to the run's log, port 0xE9
//! is a debug console, writing port 0xF4 ends the run with that status, and
//! every other port reads as all ones and ignores writes, as an empty bus
//! does. Qualification layout: SDM Vol. 3C table "Exit Qualification for
//! I/O Instructions".

use super::{ExitCtx, Flow, GuestEnd, StopReason};
use crate::abi;
use crate::devices::uart::Uart;
use crate::platform::Platform;
use crate::vcpu::events::advance_rip;
use crate::vmx::Cpu;

const DLAB: u8 = 1 << 7;
/// LSR: transmit holding register empty, transmitter empty.
const LSR_IDLE: u8 = 0x60;
/// IIR: no interrupt pending, FIFOs enabled.
const IIR_NONE: u8 = 0xc1;
/// MSR: CTS, DSR, DCD.
const MSR_CONNECTED: u8 = 0xb0;

/// What a read of COM1 register `offset` returns.
fn uart_read(uart: &Uart, offset: u16) -> u8 {
    match offset {
        1 if uart.lcr & DLAB == 0 => uart.ier,
        2 => IIR_NONE,
        3 => uart.lcr,
        4 => uart.mcr,
        5 => LSR_IDLE,
        6 => MSR_CONNECTED,
        7 => uart.scratch,
        _ => 0,
    }
}

/// A write to COM1 register `offset`; returns a byte to transmit.
fn uart_write(uart: &mut Uart, offset: u16, value: u8) -> Option<u8> {
    match offset {
        0 if uart.lcr & DLAB == 0 => return Some(value),
        1 if uart.lcr & DLAB == 0 => uart.ier = value & 0x0f,
        3 => uart.lcr = value,
        4 => uart.mcr = value,
        7 => uart.scratch = value,
        _ => {} // divisor latch, FIFO control: no effect on an emulated line
    }
    None
}

pub fn handle<C: Cpu, P: Platform>(ctx: &mut ExitCtx<'_, C, P>) -> Flow {
    let q = ctx.qualification();
    let size = (q & 7) as u32 + 1;
    let is_in = q & (1 << 3) != 0;
    let string = q & (1 << 4) != 0;
    let port = (q >> 16) as u16;
    if string {
        return ctx.stop(StopReason::Unsupported("string port I/O (INS/OUTS)"));
    }
    if is_in {
        let value = match port {
            abi::COM1..=0x3ff => u64::from(uart_read(&ctx.vm.uart, port - abi::COM1)),
            abi::DEBUG_PORT => 0xe9,
            _ => u64::MAX,
        };
        // IN to AL/AX leaves the rest of RAX; IN to EAX clears the upper half.
        let rax = ctx.vcpu.regs.rax;
        ctx.vcpu.regs.rax = match size {
            1 => rax & !0xff | value & 0xff,
            2 => rax & !0xffff | value & 0xffff,
            _ => value & 0xffff_ffff,
        };
    } else {
        let value = ctx.vcpu.regs.rax as u8;
        match port {
            abi::EXIT_PORT => {
                ctx.vm.console.flush(ctx.platform);
                return Flow::Stop(GuestEnd::Exited(value));
            }
            abi::COM1..=0x3ff => {
                if let Some(byte) = uart_write(&mut ctx.vm.uart, port - abi::COM1, value) {
                    ctx.vm.console.put(byte, ctx.platform);
                }
            }
            abi::DEBUG_PORT => ctx.vm.console.put(value, ctx.platform),
            _ => log::trace!(
                "guest: OUT {port:#x} <- {:#x} (no device)",
                ctx.vcpu.regs.rax
            ),
        }
    }
    advance_rip(ctx.cpu);
    Flow::Resume
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uart_transmits_only_with_dlab_clear() {
        let mut uart = Uart::default();
        assert_eq!(uart_write(&mut uart, 0, b'x'), Some(b'x'));
        uart_write(&mut uart, 3, DLAB | 3);
        assert_eq!(uart_write(&mut uart, 0, 1), None, "divisor latch, not data");
        uart_write(&mut uart, 3, 3);
        assert_eq!(uart_read(&uart, 3), 3);
        assert_eq!(uart_read(&uart, 5), LSR_IDLE, "always ready to send");
        uart_write(&mut uart, 7, 0x5a);
        assert_eq!(uart_read(&uart, 7), 0x5a);
    }
}
