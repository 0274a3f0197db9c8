//! Port I/O exits: only ports the guest does not own exit (the I/O bitmaps
//! are `devices::ports::io_bitmaps`); `devices::ports` says what each does.
//! Qualification layout: SDM Vol. 3C table "Exit Qualification for I/O
//! Instructions".

use super::{ExitCtx, Flow, GuestEnd, StopReason};
use crate::devices::ports::{IoOutcome, PortAccess};
use crate::platform::Platform;
use crate::vcpu::events::advance_rip;
use crate::vmx::Cpu;

pub fn handle<C: Cpu, P: Platform>(ctx: &mut ExitCtx<'_, C, P>) -> Flow {
    let q = ctx.qualification();
    let size = (q & 7) as u8 + 1;
    let is_in = q & (1 << 3) != 0;
    let string = q & (1 << 4) != 0;
    let port = (q >> 16) as u16;
    if string {
        // Only hidden or filtered ports exit, and no guest needs string I/O
        // on them; emulating it would mean walking the guest's segments
        // and paging for the buffer.
        return ctx.stop(StopReason::Unsupported("string port I/O (INS/OUTS)"));
    }
    let mask = match size {
        1 => 0xff,
        2 => 0xffff,
        _ => 0xffff_ffff,
    };
    let access = PortAccess {
        port,
        size,
        write: (!is_in).then_some(ctx.vcpu.regs.rax as u32 & mask),
    };
    match ctx.vm.devices.io(access, ctx.cpu, ctx.platform) {
        IoOutcome::Done(value) => {
            if is_in {
                // IN to AL/AX leaves the rest of RAX; IN to EAX clears the upper half.
                let rax = ctx.vcpu.regs.rax;
                let value = u64::from(value & mask);
                ctx.vcpu.regs.rax = match size {
                    4 => value,
                    _ => rax & !u64::from(mask) | value,
                };
            }
            advance_rip(ctx.cpu);
            Flow::Resume
        }
        IoOutcome::Exit(status) => Flow::Stop(GuestEnd::Exited(status)),
        IoOutcome::Reset(path) => {
            ctx.vm.devices.console.flush(ctx.platform);
            Flow::Stop(GuestEnd::Reset(path))
        }
        IoOutcome::PowerOff => {
            ctx.vm.devices.console.flush(ctx.platform);
            Flow::Stop(GuestEnd::PoweredOff)
        }
    }
}
