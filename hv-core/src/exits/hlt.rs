//! HLT. No interrupt source is ever routed to a guest (see the README), so a
//! halted guest could never wake: it stops with a report rather than hang.

use super::{ExitCtx, Flow, StopReason};
use crate::platform::Platform;
use crate::vmx::Cpu;

pub fn handle<C: Cpu, P: Platform>(ctx: &mut ExitCtx<'_, C, P>) -> Flow {
    ctx.stop(StopReason::Halted)
}
