//! Triple fault: the guest could not deliver an exception. It stops.

use super::{ExitCtx, Flow, StopReason};
use crate::platform::Platform;
use crate::vmcs::Vmcs;

pub fn handle<V: Vmcs, P: Platform>(ctx: &mut ExitCtx<'_, V, P>) -> Flow {
    ctx.stop(StopReason::TripleFault)
}
