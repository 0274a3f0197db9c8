//! EPT violations and misconfigurations on the host p2m.
//!
//! A write to a log-dirty page is the log-dirty fault: the page is marked
//! dirty and made writable. A misconfiguration is a pending lazy type change
//! and is resolved. Anything else is the guest touching guest-physical
//! memory that is not its own: the hypervisor reports it and injects #GP,
//! so the guest can handle it; a guest that keeps doing it is stopped.
//! Qualification layout: SDM Vol. 3C table "Exit Qualification for EPT
//! Violations".

use hv_ept::{Gfn, P2mType};
use x86::vmx::vmcs::ro;

use super::{ExitCtx, Flow, StopReason};
use crate::platform::Platform;
use crate::vmcs::Vmcs;

const READ: u64 = 1 << 0;
const WRITE: u64 = 1 << 1;
const FETCH: u64 = 1 << 2;
/// IDT-vectoring information valid: the exit happened while delivering an event.
const VECTORING_VALID: u64 = 1 << 31;
/// A guest that strays this often is broken beyond help.
pub const MAX_STRAY_ACCESSES: u64 = 100_000;

pub fn access_name(qualification: u64) -> &'static str {
    match qualification & (READ | WRITE | FETCH) {
        WRITE | 3 => "write",
        FETCH | 5 => "fetch",
        _ => "read",
    }
}

pub fn violation<V: Vmcs, P: Platform>(ctx: &mut ExitCtx<'_, V, P>) -> Flow {
    let q = ctx.qualification();
    let gpa = ctx.vmcs.read(ro::GUEST_PHYSICAL_ADDR_FULL);
    let gfn = Gfn(gpa >> 12);
    let info = ctx.guest.p2m.get_entry(ctx.platform, gfn);
    if let Ok(info) = info
        && q & WRITE != 0
        && info.ty == P2mType::RamLogdirty
    {
        return match ctx
            .guest
            .p2m
            .logdirty_write_fault(ctx.platform, &mut ctx.guest.dirty, gfn)
        {
            Ok(_) => Flow::Resume,
            Err(_) => ctx.stop(StopReason::Internal("out of memory for the dirty log")),
        };
    }
    ctx.guest.stray_accesses += 1;
    let rip = ctx.rip();
    log::warn!(
        "guest: EPT violation: {} of {gpa:#x} at rip {rip:#x}: not guest memory (#GP injected)",
        access_name(q)
    );
    if ctx.vmcs.read(ro::IDT_VECTORING_INFO) & VECTORING_VALID != 0 {
        return ctx.stop(StopReason::Unsupported(
            "an event whose delivery touches memory outside the guest",
        ));
    }
    if ctx.guest.stray_accesses > MAX_STRAY_ACCESSES {
        return ctx.stop(StopReason::TooManyStrayAccesses);
    }
    ctx.general_protection()
}

pub fn misconfig<V: Vmcs, P: Platform>(ctx: &mut ExitCtx<'_, V, P>) -> Flow {
    let gpa = ctx.vmcs.read(ro::GUEST_PHYSICAL_ADDR_FULL);
    match ctx
        .guest
        .p2m
        .resolve_misconfig(ctx.platform, Gfn(gpa >> 12))
    {
        Ok(true) => Flow::Resume,
        Ok(false) => ctx.stop(StopReason::Internal(
            "EPT misconfiguration without a pending type change",
        )),
        Err(_) => ctx.stop(StopReason::Internal(
            "out of memory resolving a type change",
        )),
    }
}
