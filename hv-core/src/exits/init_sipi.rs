//! INIT and start-up IPIs: an INIT puts the vCPU into wait-for-SIPI; a SIPI
//! starts it in real mode at the vector's page.

use super::{ExitCtx, Flow, StopReason};
use crate::platform::Platform;
use crate::state;
use crate::vmcs::Vmcs;

pub fn init<V: Vmcs, P: Platform>(ctx: &mut ExitCtx<'_, V, P>) -> Flow {
    if !ctx.guest.features.wait_for_sipi {
        return ctx.stop(StopReason::Unsupported(
            "INIT: this CPU cannot hold a vCPU in wait-for-SIPI",
        ));
    }
    log::info!("guest: INIT: waiting for SIPI");
    state::wait_for_sipi(ctx.vmcs);
    Flow::Resume
}

pub fn sipi<V: Vmcs, P: Platform>(ctx: &mut ExitCtx<'_, V, P>) -> Flow {
    let vector = (ctx.qualification() & 0xff) as u8;
    log::info!(
        "guest: SIPI vector {vector:#x}: starting at {:#x}",
        u64::from(vector) << 12
    );
    state::sipi_start(ctx.vmcs, ctx.regs, &ctx.guest.cr_fixed, vector);
    // A processor reset: no cached translation of the old paging mode survives.
    if ctx.guest.features.vpid {
        ctx.platform.invvpid(crate::vcpu::GUEST_VPID);
    }
    Flow::Resume
}
