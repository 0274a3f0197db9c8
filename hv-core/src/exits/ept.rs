//! EPT violations and misconfigurations, in the view the vCPU runs on
//! (view 0 is the host p2m). The views decide what a violation is:
//!
//! - a hole in a view the host maps: lazy copy; a write to a log-dirty
//!   page: logged and made writable everywhere; an `rx2rw`/`n2rwx` entry:
//!   converted. The guest resumes.
//! - an access the view's entry denies (a monitor's restriction the CPU did
//!   not turn into #VE): a monitor event, then the instruction runs once in
//!   view 0 (single-stepped) and the vCPU returns to its view. In view 0
//!   itself there is nowhere to step to: the guest gets #GP.
//! - nothing mapped at all: the guest touched memory that is not its own.
//!   The hypervisor reports it and injects #GP; a guest that keeps doing it
//!   is stopped.
//!
//! Qualification layout: SDM Vol. 3C table "Exit Qualification for EPT Violations".

use hv_altp2m::{AccessViolation, Outcome};
use hv_control::{EventKind, access_bits, class};
use hv_ept::walk::AccessKind;
use x86::vmx::vmcs::ro;

use super::{ExitCtx, Flow, StopReason};
use crate::control::{self, DefaultAction};
use crate::operations::abi_access;
use crate::platform::Platform;
use crate::vcpu::events::{inject_exception, reinject_vectoring, vector};
use crate::views::{self, access_name, kind_name};
use crate::vmx::Cpu;

const WRITE: u64 = 1 << 1;
const FETCH: u64 = 1 << 2;
/// The guest linear address field is valid.
const GLA_VALID: u64 = 1 << 7;
/// The basic exit reason a #VE's information area names.
const EXIT_REASON_EPT_VIOLATION: u16 = 48;
/// IDT-vectoring information valid: the exit happened while delivering an event.
const VECTORING_VALID: u64 = 1 << 31;
/// A guest that strays this often is broken beyond help.
pub const MAX_STRAY_ACCESSES: u64 = 100_000;

fn kind(qualification: u64) -> AccessKind {
    if qualification & WRITE != 0 {
        AccessKind::Write
    } else if qualification & FETCH != 0 {
        AccessKind::Fetch
    } else {
        AccessKind::Read
    }
}

pub fn violation<C: Cpu, P: Platform>(ctx: &mut ExitCtx<'_, C, P>) -> Flow {
    let q = ctx.qualification();
    let gpa = ctx.cpu.read(ro::GUEST_PHYSICAL_ADDR_FULL);
    let kind = kind(q);
    let g = &mut *ctx.vm;
    let outcome = views::hardware_view(g, ctx.vcpu).and_then(|view| {
        g.altp2m
            .handle_violation_in(ctx.platform, &mut g.p2m, &mut g.dirty, view, gpa, kind)
    });
    let flow = violation_outcome(ctx, outcome, gpa, kind);
    if matches!(flow, Flow::Resume) {
        // The access may have been part of an event's delivery (a #VE or an
        // exception pushing onto a page not yet copied): deliver it again.
        reinject_vectoring(ctx.cpu, &mut ctx.vcpu.pending);
    }
    flow
}

fn violation_outcome<C: Cpu, P: Platform>(
    ctx: &mut ExitCtx<'_, C, P>,
    outcome: Result<Outcome, hv_altp2m::Error>,
    gpa: u64,
    kind: AccessKind,
) -> Flow {
    match outcome {
        Ok(Outcome::LazyCopied { .. } | Outcome::LogDirty { .. } | Outcome::Retry) => Flow::Resume,
        Ok(Outcome::Converted {
            view,
            gfn,
            from,
            to,
        }) => {
            crate::platform::monitor_event(
                ctx.platform,
                format_args!(
                    "access view={view} gfn={:#x} access={} rip={:#x} action=converted {}->{}",
                    gfn.0,
                    kind_name(kind),
                    ctx.rip(),
                    access_name(from),
                    access_name(to)
                ),
            );
            Flow::Resume
        }
        Ok(Outcome::Violation(v)) => {
            let vectoring = ctx.cpu.read(ro::IDT_VECTORING_INFO) & VECTORING_VALID != 0;
            if vectoring && !ctx.vm.features.mtf {
                // Delivering an event with TF set would run its handler in
                // view 0 unmonitored; only the monitor trap flag can step it.
                return ctx.stop(StopReason::Unsupported(
                    "an event whose delivery touches a page its view denies (needs the monitor trap flag)",
                ));
            }
            if !vectoring && deliver_ve(ctx, &v, gpa) {
                return Flow::Resume;
            }
            // In view 0 itself there is nowhere to step to.
            let stepped = v.view != 0;
            if ctx.vm.control.wants(class::MEM_ACCESS) {
                let q = ctx.qualification();
                let event = EventKind::MemAccess {
                    gpa,
                    gla: linear_address(ctx, q),
                    access: (q & u64::from(access_bits::ALL)) as u8,
                    entry: abi_access(v.access) as u8,
                };
                let default = if stepped {
                    DefaultAction::StepInView0
                } else {
                    DefaultAction::GeneralProtection
                };
                control::raise(ctx.vm, ctx.cpu, ctx.vcpu, event, default);
                return Flow::Resume;
            }
            if stepped {
                views::start_step(ctx.cpu, ctx.vm, ctx.vcpu, false);
            }
            crate::platform::monitor_event(
                ctx.platform,
                format_args!(
                    "access view={} gfn={:#x} access={} entry={} rip={:#x} action={}",
                    v.view,
                    v.gfn.0,
                    kind_name(kind),
                    access_name(v.access),
                    ctx.rip(),
                    if stepped { "step-in-view-0" } else { "gp" }
                ),
            );
            if stepped {
                Flow::Resume
            } else {
                ctx.general_protection()
            }
        }
        Ok(Outcome::NotMapped { .. }) | Err(hv_altp2m::Error::GfnOutOfRange) => {
            stray(ctx, gpa, kind)
        }
        Err(hv_altp2m::Error::NoMemory) => ctx.stop(StopReason::Internal(
            "out of memory handling an EPT violation",
        )),
        Err(_) => ctx.stop(StopReason::Internal("altp2m state does not match the vCPU")),
    }
}

/// The linear address of an EPT violation, when the CPU gave one.
fn linear_address<C: Cpu, P: Platform>(ctx: &ExitCtx<'_, C, P>, qualification: u64) -> Option<u64> {
    (qualification & GLA_VALID != 0).then(|| ctx.cpu.read(ro::GUEST_LINEAR_ADDR))
}

/// With a tool's #VE events on, the CPU's EPT-violation #VE is off and the
/// hypervisor delivers each #VE itself, as the CPU would (SDM Vol. 3C
/// 25.5.7: the information area, its semaphore, vector 20), and reports
/// it. False if no #VE is due: the entry suppresses it, the vCPU has no
/// information page, or the guest has not released the last one (the
/// semaphore is set: the CPU would exit, and so the access goes on as a
/// violation).
fn deliver_ve<C: Cpu, P: Platform>(
    ctx: &mut ExitCtx<'_, C, P>,
    v: &AccessViolation,
    gpa: u64,
) -> bool {
    let vm = &*ctx.vm;
    if !vm.control.wants(class::VE) || v.suppress_ve || !vm.altp2m.is_enabled() {
        return false;
    }
    let Some((_, page)) = ctx.vcpu.ve_page else {
        return false;
    };
    let mut semaphore = [0u8; 4];
    ctx.platform.read_phys(page.hpa() + 4, &mut semaphore);
    if semaphore != [0; 4] {
        return false;
    }
    let q = ctx.qualification();
    let gla = linear_address(ctx, q);
    let mut info = [0u8; 34];
    info[0..4].copy_from_slice(&(EXIT_REASON_EPT_VIOLATION as u32).to_le_bytes());
    info[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
    info[8..16].copy_from_slice(&q.to_le_bytes());
    info[16..24].copy_from_slice(&gla.unwrap_or(0).to_le_bytes());
    info[24..32].copy_from_slice(&gpa.to_le_bytes());
    info[32..34].copy_from_slice(&v.view.to_le_bytes());
    ctx.platform.write_phys(page.hpa(), &info);
    inject_exception(ctx.cpu, vector::VE, None);
    let event = EventKind::Ve {
        gpa,
        gla,
        access: (q & u64::from(access_bits::ALL)) as u8,
    };
    control::raise(ctx.vm, ctx.cpu, ctx.vcpu, event, DefaultAction::Continue);
    true
}

/// An access to guest-physical memory that is not the guest's.
fn stray<C: Cpu, P: Platform>(ctx: &mut ExitCtx<'_, C, P>, gpa: u64, kind: AccessKind) -> Flow {
    ctx.vm.stray_accesses += 1;
    let what = match kind {
        AccessKind::Read => "read",
        AccessKind::Write => "write",
        AccessKind::Fetch => "fetch",
    };
    log::warn!(
        "guest: EPT violation: {what} of {gpa:#x} at rip {:#x}: not guest memory (#GP injected)",
        ctx.rip()
    );
    if ctx.cpu.read(ro::IDT_VECTORING_INFO) & VECTORING_VALID != 0 {
        return ctx.stop(StopReason::Unsupported(
            "an event whose delivery touches memory outside the guest",
        ));
    }
    if ctx.vm.stray_accesses > MAX_STRAY_ACCESSES {
        return ctx.stop(StopReason::TooManyStrayAccesses);
    }
    ctx.general_protection()
}

pub fn misconfig<C: Cpu, P: Platform>(ctx: &mut ExitCtx<'_, C, P>) -> Flow {
    let gpa = ctx.cpu.read(ro::GUEST_PHYSICAL_ADDR_FULL);
    let g = &mut *ctx.vm;
    let resolved = views::hardware_view(g, ctx.vcpu).and_then(|view| {
        g.altp2m
            .resolve_misconfig_in(ctx.platform, &mut g.p2m, view, gpa)
    });
    match resolved {
        Ok(true) => {
            reinject_vectoring(ctx.cpu, &mut ctx.vcpu.pending);
            Flow::Resume
        }
        Ok(false) => ctx.stop(StopReason::Internal(
            "EPT misconfiguration without a pending type change",
        )),
        Err(_) => ctx.stop(StopReason::Internal(
            "out of memory resolving a type change",
        )),
    }
}
