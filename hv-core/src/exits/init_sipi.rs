//! INIT and start-up IPIs: an INIT puts the vCPU into wait-for-SIPI; a SIPI
//! starts it in real mode at the vector's page.

use super::{ExitCtx, Flow, StopReason};
use crate::platform::Platform;
use crate::vcpu::state;
use crate::vmx::Cpu;

pub fn init<C: Cpu, P: Platform>(ctx: &mut ExitCtx<'_, C, P>) -> Flow {
    if !ctx.vm.features.wait_for_sipi {
        return ctx.stop(StopReason::Unsupported(
            "INIT: this CPU cannot hold a vCPU in wait-for-SIPI",
        ));
    }
    log::info!("guest: INIT: waiting for SIPI");
    state::wait_for_sipi(ctx.cpu);
    Flow::Resume
}

pub fn sipi<C: Cpu, P: Platform>(ctx: &mut ExitCtx<'_, C, P>) -> Flow {
    let vector = (ctx.qualification() & 0xff) as u8;
    log::info!(
        "guest: SIPI vector {vector:#x}: starting at {:#x}",
        u64::from(vector) << 12
    );
    state::sipi_start(ctx.cpu, &mut ctx.vcpu.regs, &ctx.vm.cr_fixed, vector);
    // A processor reset: no cached translation of the old paging mode survives.
    if ctx.vm.features.vpid {
        ctx.cpu.invvpid(crate::vcpu::GUEST_VPID);
    }
    Flow::Resume
}
