//! Triple fault: the guest could not deliver an exception. It stops.

use super::{ExitCtx, Flow, StopReason};
use crate::platform::Platform;
use crate::vmx::Cpu;

pub fn handle<C: Cpu, P: Platform>(ctx: &mut ExitCtx<'_, C, P>) -> Flow {
    ctx.stop(StopReason::TripleFault)
}
