//! VMCALL: the hypercall entry. Only guest kernel code (CPL 0) may call;
//! the calls themselves are in `crate::hypercall`.

use super::{ExitCtx, Flow};
use crate::abi::error;
use crate::platform::Platform;
use crate::vcpu::events::{advance_rip, guest_cpl};
use crate::vmx::Cpu;

pub fn handle<C: Cpu, P: Platform>(ctx: &mut ExitCtx<'_, C, P>) -> Flow {
    let result = if guest_cpl(&*ctx.cpu) != 0 {
        error::EPERM
    } else {
        crate::hypercall::dispatch(ctx)
    };
    ctx.vcpu.regs.rax = result as u64;
    advance_rip(ctx.cpu);
    Flow::Resume
}
