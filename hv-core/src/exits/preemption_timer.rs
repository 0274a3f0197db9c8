//! The VMX-preemption timer: the hypervisor's periodic tick while a guest
//! runs. Each tick refreshes the display model. The timer value is saved on
//! exit, so it must be rearmed here.

use x86::vmx::vmcs::guest;

use super::{ExitCtx, Flow, StopReason};
use crate::platform::Platform;
use crate::vm::display;
use crate::vmx::Cpu;

pub fn handle<C: Cpu, P: Platform>(ctx: &mut ExitCtx<'_, C, P>) -> Flow {
    if let Some(period) = ctx.vm.tick_period {
        ctx.cpu
            .write(guest::VMX_PREEMPTION_TIMER_VALUE, u64::from(period));
    }
    match display::refresh(ctx.vm, ctx.platform) {
        Ok(_) => Flow::Resume,
        Err(_) => ctx.stop(StopReason::Internal("out of memory refreshing the display")),
    }
}
