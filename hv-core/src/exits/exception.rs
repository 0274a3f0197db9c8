//! Exceptions and NMIs the exception bitmap sends to the hypervisor: #MC
//! always; with altp2m on, #BP (a hidden breakpoint in a view's shadow page
//! is stepped over in view 0) and, during such a step, #DB (the step ended).

use alloc::format;

use x86::vmx::vmcs::{control, ro};

use super::{ExitCtx, Flow, StopReason};
use crate::guest_paging;
use crate::platform::Platform;
use crate::vcpu::inject_exception;
use crate::views::{self, VECTOR_BP, VECTOR_DB};
use crate::vmcs::Vmcs;

const TYPE_NMI: u64 = 2;
/// Interruption type of INT3 (a software exception).
const TYPE_SOFTWARE_EXCEPTION: u64 = 6;
const MACHINE_CHECK: u64 = 18;
const ERROR_CODE_VALID: u64 = 1 << 11;
const VALID: u64 = 1 << 31;

pub fn handle<V: Vmcs, P: Platform>(ctx: &mut ExitCtx<'_, V, P>) -> Flow {
    let info = ctx.vmcs.read(ro::VMEXIT_INTERRUPTION_INFO);
    let vector = info & 0xff;
    let kind = (info >> 8) & 7;
    if kind == TYPE_NMI {
        // A host NMI (NMI exiting): nothing to forward it to yet.
        log::warn!("vmx: NMI while the guest ran (ignored)");
        return Flow::Resume;
    }
    match vector {
        MACHINE_CHECK => return ctx.stop(StopReason::MachineCheck),
        VECTOR_DB if views::finish_step(ctx.vmcs, ctx.guest) => return Flow::Resume,
        VECTOR_BP => {
            let rip = ctx.rip();
            let gpa = guest_paging::translate(&*ctx.vmcs, ctx.guest, ctx.platform, rip);
            if let Some((view, gfn)) = gpa.and_then(|gpa| views::remapped_code(ctx.guest, gpa))
                && views::start_step(ctx.vmcs, ctx.guest, view).is_ok()
            {
                let line = format!(
                    "breakpoint view={view} gfn={:#x} rip={rip:#x} action=step-in-view-0",
                    gfn.0
                );
                ctx.platform.monitor_event(&line);
                return Flow::Resume;
            }
            // The guest's own INT3: deliver it as the software exception it is.
            let len = ctx.vmcs.read(ro::VMEXIT_INSTRUCTION_LEN);
            ctx.vmcs.write(control::VMENTRY_INSTRUCTION_LEN, len);
            ctx.vmcs.write(
                control::VMENTRY_INTERRUPTION_INFO_FIELD,
                VECTOR_BP | TYPE_SOFTWARE_EXCEPTION << 8 | VALID,
            );
            return Flow::Resume;
        }
        _ => {}
    }
    // An exception intercepted for a monitor but not consumed: the guest gets it.
    let error_code = (info & ERROR_CODE_VALID != 0)
        .then(|| ctx.vmcs.read(ro::VMEXIT_INTERRUPTION_ERR_CODE) as u32);
    inject_exception(ctx.vmcs, vector as u8, error_code);
    Flow::Resume
}
