//! VMCALL: the hypercall entry. Only guest kernel code (CPL 0) may call;
//! the calls themselves are in `crate::hypercall`.

use super::{ExitCtx, Flow};
use crate::abi::error;
use crate::platform::Platform;
use crate::vcpu::{advance_rip, guest_cpl};
use crate::vmcs::Vmcs;

pub fn handle<V: Vmcs, P: Platform>(ctx: &mut ExitCtx<'_, V, P>) -> Flow {
    let result = if guest_cpl(&*ctx.vmcs) != 0 {
        error::EPERM
    } else {
        crate::hypercall::dispatch(ctx)
    };
    ctx.regs.rax = result as u64;
    advance_rip(ctx.vmcs);
    Flow::Resume
}
