//! Hypercalls: the VMCALL exit hands the call here. Every argument is
//! checked; a guest address must be its RAM; nothing a guest passes can
//! reach hypervisor memory or panic. The ABI is `hv_abi` (docs/hypercalls.md).

mod altp2m;
mod memory;

use hv_ept::P2mAccess;

use crate::abi::{call, error};
use crate::exits::ExitCtx;
use crate::operations::p2m_access;
use crate::platform::Platform;
use crate::vcpu::events::in_64bit_mode;
use crate::vmx::Cpu;

/// The hypercall's arguments: RDI, RSI, RDX, R10.
pub struct Args([u64; 4]);

impl Args {
    pub fn get(&self, i: usize) -> u64 {
        self.0[i]
    }

    /// Argument `i` as a view index.
    pub fn view(&self, i: usize) -> Result<u16, i64> {
        u16::try_from(self.0[i]).map_err(|_| error::EINVAL)
    }

    /// Argument `i` as a flag: 0 or 1.
    pub fn flag(&self, i: usize) -> Result<bool, i64> {
        match self.0[i] {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(error::EINVAL),
        }
    }

    /// Argument `i` as an access value.
    pub fn access(&self, i: usize) -> Result<P2mAccess, i64> {
        p2m_access(self.0[i]).ok_or(error::EINVAL)
    }
}

/// Runs the call in RAX; returns its result for RAX.
pub fn dispatch<C: Cpu, P: Platform>(ctx: &mut ExitCtx<'_, C, P>) -> i64 {
    // Outside 64-bit mode only the low halves are the guest's (R10 has none).
    let width = if in_64bit_mode(&*ctx.cpu) {
        u64::MAX
    } else {
        u64::from(u32::MAX)
    };
    let number = ctx.vcpu.regs.rax & width;
    let args = Args(
        [
            ctx.vcpu.regs.rdi,
            ctx.vcpu.regs.rsi,
            ctx.vcpu.regs.rdx,
            ctx.vcpu.regs.r10,
        ]
        .map(|r| r & width),
    );
    if !ctx.vm.altp2m_mode.guest_may_call(number) {
        let bit = 1u128 << (number % 128);
        if ctx.vm.refusals_logged & bit == 0 {
            ctx.vm.refusals_logged |= bit;
            log::warn!(
                "hypercall {number:#x} refused: altp2m mode {:?} does not let the guest call it",
                ctx.vm.altp2m_mode
            );
        }
        return error::EPERM;
    }
    let result = match number {
        call::VERSION => Ok(crate::abi::VERSION as i64),
        call::EXIT_COUNTS => memory::exit_counts(ctx, &args),
        call::ALTP2M_GET_STATE..=call::ALTP2M_SET_VISIBILITY => altp2m::call(ctx, number, &args),
        call::LOGDIRTY_TRACK => memory::logdirty_track(ctx, &args),
        call::LOGDIRTY_FETCH => memory::logdirty_fetch(ctx, &args),
        call::BALLOON_RELEASE => memory::balloon_release(ctx, &args),
        call::DISPLAY_SET => memory::display_set(ctx, &args),
        call::DISPLAY_REFRESH => memory::display_refresh(ctx),
        call::DISPLAY_CHECKSUM => memory::display_checksum(ctx),
        _ => Err(error::ENOSYS),
    };
    result.unwrap_or_else(|e| e)
}
