//! Exceptions and NMIs the exception bitmap sends to the hypervisor.

use x86::vmx::vmcs::ro;

use super::{ExitCtx, Flow, StopReason};
use crate::platform::Platform;
use crate::vcpu::inject_exception;
use crate::vmcs::Vmcs;

const TYPE_NMI: u64 = 2;
const MACHINE_CHECK: u8 = 18;
const ERROR_CODE_VALID: u64 = 1 << 11;

pub fn handle<V: Vmcs, P: Platform>(ctx: &mut ExitCtx<'_, V, P>) -> Flow {
    let info = ctx.vmcs.read(ro::VMEXIT_INTERRUPTION_INFO);
    let vector = (info & 0xff) as u8;
    if (info >> 8) & 7 == TYPE_NMI {
        // A host NMI (NMI exiting): nothing to forward it to yet.
        log::warn!("vmx: NMI while the guest ran (ignored)");
        return Flow::Resume;
    }
    if vector == MACHINE_CHECK {
        return ctx.stop(StopReason::MachineCheck);
    }
    // An exception intercepted for a monitor but not consumed: the guest gets it.
    let error_code = (info & ERROR_CODE_VALID != 0)
        .then(|| ctx.vmcs.read(ro::VMEXIT_INTERRUPTION_ERR_CODE) as u32);
    inject_exception(ctx.vmcs, vector, error_code);
    Flow::Resume
}
