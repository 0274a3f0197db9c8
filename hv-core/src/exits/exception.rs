//! Exceptions and NMIs that exit: NMIs (forwarded to the guest); #MC
//! always; with altp2m on, #BP (a hidden breakpoint in a view's shadow page
//! is stepped over in view 0); while a single step with RFLAGS.TF runs,
//! every exception (the step's #DB ends it; any other means the stepped
//! instruction faulted: the step ends and the guest gets the exception in
//! its view).

use hv_control::{EventKind, class};
use x86::vmx::vmcs::{guest, ro};

use super::{ExitCtx, Flow, StopReason};
use crate::control::{self, DefaultAction};
use crate::platform::Platform;
use crate::vcpu::events::{
    PENDING_BS, Reflected, TYPE_NMI, inject_software_exception, reflect_exception,
    reinject_vectoring, vector,
};
use crate::vcpu::paging;
use crate::views;
use crate::vmx::Cpu;

const ERROR_CODE_VALID: u64 = 1 << 11;
/// #DB exit qualification: breakpoint conditions B0-B3 met.
const DEBUG_B0_B3: u64 = 0xf;

pub fn handle<C: Cpu, P: Platform>(ctx: &mut ExitCtx<'_, C, P>) -> Flow {
    let info = ctx.cpu.read(ro::VMEXIT_INTERRUPTION_INFO);
    let vector = (info & 0xff) as u8;
    if (info >> 8) & 7 == TYPE_NMI {
        // The exit leaves NMIs blocked until an IRET: end that now, so that
        // the next NMI (a kick) is not held (Bochs 2.7 holds it in the
        // guest too, until the vCPU exits for another reason).
        ctx.cpu.unblock_nmis();
        // An NMI while the guest ran (NMI exiting): another CPU's kick
        // (`smp`: a shootdown, a reapply, a pause), which has done its job
        // by making the vCPU exit, or the guest's own (its local APIC,
        // LINT1, the I/O APIC), which it gets as soon as it can take it.
        // (Both at once merge, as two NMIs do on hardware.) An event whose
        // delivery the NMI cut short goes first.
        if !ctx.vm.coherence.take_kick(ctx.vcpu.id.index()) {
            ctx.vcpu.pending.nmi = true;
        }
        reinject_vectoring(ctx.cpu, &mut ctx.vcpu.pending);
        return Flow::Resume;
    }
    if vector == vector::MC {
        return ctx.stop(StopReason::MachineCheck);
    }
    let stepping = ctx.vcpu.step.is_some_and(|s| !s.mtf);
    if stepping && vector == vector::DB {
        // The step's single-step trap. Hardware breakpoints the instruction
        // hit are still the guest's.
        views::finish_step(ctx.cpu, ctx.vm, ctx.vcpu);
        let hit = ctx.qualification() & DEBUG_B0_B3;
        if hit != 0 {
            let pending = ctx.cpu.read(guest::PENDING_DBG_EXCEPTIONS);
            ctx.cpu.write(guest::PENDING_DBG_EXCEPTIONS, pending | hit);
        }
        return Flow::Resume;
    }
    if stepping {
        // The stepped instruction faulted: its exception belongs to the view.
        views::finish_step(ctx.cpu, ctx.vm, ctx.vcpu);
        let pending = ctx.cpu.read(guest::PENDING_DBG_EXCEPTIONS);
        ctx.cpu
            .write(guest::PENDING_DBG_EXCEPTIONS, pending & !PENDING_BS);
    } else if vector == vector::BP {
        return breakpoint(ctx);
    }
    let error_code = (info & ERROR_CODE_VALID != 0)
        .then(|| ctx.cpu.read(ro::VMEXIT_INTERRUPTION_ERR_CODE) as u32);
    if vector == vector::BP {
        inject_software_exception(ctx.cpu, vector, ctx.cpu.read(ro::VMEXIT_INSTRUCTION_LEN));
        return Flow::Resume;
    }
    if vector == vector::PF {
        // A #PF exit leaves CR2 alone (SDM Vol. 3C 27.1): the faulting
        // address is the exit qualification.
        let address = ctx.qualification();
        ctx.cpu.write_cr2(address);
    }
    if reflect_exception(ctx.cpu, &mut ctx.vcpu.pending, vector, error_code)
        == Reflected::TripleFault
    {
        return ctx.stop(StopReason::TripleFault);
    }
    Flow::Resume
}

/// An INT3: a hidden breakpoint on a page the view remaps is stepped over
/// in view 0; the guest's own breakpoint is delivered to it.
fn breakpoint<C: Cpu, P: Platform>(ctx: &mut ExitCtx<'_, C, P>) -> Flow {
    let rip = ctx.rip();
    let gpa = paging::translate(&*ctx.cpu, ctx.vm, ctx.platform, rip);
    if let Some((view, gfn)) = gpa.and_then(|gpa| views::remapped_code(ctx.vm, ctx.vcpu, gpa)) {
        if ctx.vm.control.wants(class::BREAKPOINT) {
            let event = EventKind::Breakpoint {
                gpa: gpa.unwrap_or(0),
                gla: ctx.cpu.read(guest::CS_BASE).wrapping_add(rip),
            };
            control::raise(ctx.vm, ctx.cpu, ctx.vcpu, event, DefaultAction::StepInView0);
            return Flow::Resume;
        }
        views::start_step(ctx.cpu, ctx.vm, ctx.vcpu, false);
        crate::platform::monitor_event(
            ctx.platform,
            format_args!(
                "breakpoint view={view} gfn={:#x} rip={rip:#x} action=step-in-view-0",
                gfn.0
            ),
        );
        return Flow::Resume;
    }
    inject_software_exception(
        ctx.cpu,
        vector::BP,
        ctx.cpu.read(ro::VMEXIT_INSTRUCTION_LEN),
    );
    Flow::Resume
}
