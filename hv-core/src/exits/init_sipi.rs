//! INIT and start-up IPIs, as a processor takes them: an INIT parks the
//! vCPU in wait-for-SIPI (dropping what it owed the guest and any step); a
//! SIPI starts it in real mode at the vector's page. INIT always exits in
//! VMX non-root operation, so a guest's INIT never reaches the hypervisor's
//! own state. A SIPI the hypervisor sent to end the run stops the vCPU. A
//! guest whose every vCPU is parked can never run again: it is stopped.

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
    if let Some(end) = ctx.vm.end.clone() {
        return Flow::Stop(end);
    }
    // Not at info: a log line keeps the vCPU out of wait-for-SIPI for its
    // time on the serial line (about 1.6 million instructions in Bochs, ms
    // on hardware), longer than an OS waits between its two SIPIs, and a
    // SIPI that finds the CPU in root mode is lost. It matters: an INIT
    // held pending while the vCPU waited for SIPI (Bochs holds it) arrives
    // right after the first SIPI, and the second must find it parked again.
    log::debug!("guest: INIT on vCPU {}: waiting for SIPI", ctx.vcpu.id.0);
    // A processor reset ends any step, a tool's too (no event: INIT wins).
    crate::views::cancel_step(ctx.cpu, ctx.vm, ctx.vcpu);
    ctx.vcpu.pending = Default::default();
    ctx.vcpu.waiting_for_sipi = true;
    state::wait_for_sipi(ctx.cpu);
    let id = ctx.vcpu.id.index();
    let vm = &*ctx.vm;
    let all_parked = (0..vm.vcpus()).all(|v| v == id || vm.coherence.parked(v));
    if all_parked {
        return ctx.stop(StopReason::Halted);
    }
    Flow::Resume
}

pub fn sipi<C: Cpu, P: Platform>(ctx: &mut ExitCtx<'_, C, P>) -> Flow {
    // The hypervisor's own SIPI, to end the run on a parked vCPU.
    if let Some(end) = ctx.vm.end.clone() {
        return Flow::Stop(end);
    }
    let vector = (ctx.qualification() & 0xff) as u8;
    // At debug, as INIT's line: the vCPU must be quick back in the guest.
    log::debug!(
        "guest: SIPI vector {vector:#x}: starting at {:#x}",
        u64::from(vector) << 12
    );
    state::sipi_start(ctx.cpu, &mut ctx.vcpu.regs, &ctx.vm.cr_fixed, vector);
    ctx.vcpu.waiting_for_sipi = false;
    // Bochs 2.7 leaves the NMIs its wait-for-SIPI state blocked blocked
    // after the SIPI exit: no kick would reach the vCPU. (A no-op elsewhere.)
    ctx.cpu.unblock_nmis();
    // A processor reset: no cached translation of the old paging mode survives.
    if ctx.vm.features.vpid {
        ctx.cpu.invvpid(crate::vcpu::GUEST_VPID);
    }
    Flow::Resume
}
