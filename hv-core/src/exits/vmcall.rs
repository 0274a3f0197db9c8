//! VMCALL: the hypercall entry (ABI in `abi`). Arguments are checked here;
//! nothing a guest passes can reach memory other than its own RAM.

use super::{ExitCtx, Flow};
use crate::abi::{call, error};
use crate::platform::Platform;
use crate::vcpu::{advance_rip, guest_cpl};
use crate::vmcs::Vmcs;

pub fn handle<V: Vmcs, P: Platform>(ctx: &mut ExitCtx<'_, V, P>) -> Flow {
    let result = if guest_cpl(&*ctx.vmcs) != 0 {
        error::EPERM
    } else {
        dispatch(ctx)
    };
    ctx.regs.rax = result as u64;
    advance_rip(ctx.vmcs);
    Flow::Resume
}

fn dispatch<V: Vmcs, P: Platform>(ctx: &mut ExitCtx<'_, V, P>) -> i64 {
    let (number, a0, a1) = (ctx.regs.rax, ctx.regs.rdi, ctx.regs.rsi);
    match number {
        call::VERSION => crate::abi::VERSION as i64,
        call::EXIT_COUNTS => exit_counts(ctx, a0, a1),
        _ => error::ENOSYS,
    }
}

/// Copies up to `max` counters to guest-physical `buffer`.
fn exit_counts<V: Vmcs, P: Platform>(ctx: &mut ExitCtx<'_, V, P>, buffer: u64, max: u64) -> i64 {
    let count = ctx
        .guest
        .counters
        .len()
        .min(usize::try_from(max).unwrap_or(usize::MAX));
    let mut bytes = [0u8; crate::exit_reason::NUM_REASONS * 8];
    for (i, counter) in ctx.guest.counters[..count].iter().enumerate() {
        bytes[i * 8..i * 8 + 8].copy_from_slice(&counter.to_le_bytes());
    }
    match ctx.guest.write(ctx.platform, buffer, &bytes[..count * 8]) {
        Ok(()) => count as i64,
        Err(_) => error::EFAULT,
    }
}
