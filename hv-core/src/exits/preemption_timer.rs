//! The VMX-preemption timer: the hypervisor's periodic tick while a guest
//! runs. Each tick refreshes the display model. The timer value is saved on
//! exit, so it must be rearmed here.

use x86::vmx::vmcs::guest;

use super::{ExitCtx, Flow, StopReason};
use crate::display;
use crate::platform::Platform;
use crate::vmcs::Vmcs;

pub fn handle<V: Vmcs, P: Platform>(ctx: &mut ExitCtx<'_, V, P>) -> Flow {
    if let Some(period) = ctx.guest.tick_period {
        ctx.vmcs
            .write(guest::VMX_PREEMPTION_TIMER_VALUE, u64::from(period));
    }
    match display::refresh(ctx.guest, ctx.platform) {
        Ok(_) => Flow::Resume,
        Err(_) => ctx.stop(StopReason::Internal("out of memory refreshing the display")),
    }
}
