//! VM-exit handling: one file per exit reason, after the dispatch below.
//!
//! A handler gets the exit's context and says whether the guest resumes or
//! stops. Handlers read and write the VMCS through [`Vmcs`], so they run
//! under host tests against a fake VMCS and a simulated platform.

mod cpuid;
mod cr;
mod ept;
mod exception;
mod hlt;
mod init_sipi;
mod io;
mod msr;
mod preemption_timer;
mod triple_fault;
mod vmcall;
mod xsetbv;

use alloc::string::String;
use core::fmt::{self, Write};

use x86::vmx::vmcs::{guest, ro};

use crate::exit_reason::{self as reason, name};
use crate::guest::Guest;
use crate::platform::Platform;
use crate::vcpu::{GuestRegisters, inject_exception, injecting, vector};
use crate::views;
use crate::vmcs::{Vmcs, dump_guest_state};

pub use msr::{PASS_READ_ONLY, PASS_WRITE};

/// Everything a handler may look at or change.
pub struct ExitCtx<'a, V: Vmcs, P: Platform> {
    pub vmcs: &'a mut V,
    pub regs: &'a mut GuestRegisters,
    pub guest: &'a mut Guest,
    pub platform: &'a mut P,
}

/// How a guest's run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestEnd {
    /// The guest wrote this status to the exit port.
    Exited(u8),
    /// The hypervisor stopped the guest (the report is in the log).
    Stopped(StopReason),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    TripleFault,
    /// A VM exit the hypervisor has no handler for.
    UnexpectedExit {
        reason: u16,
        qualification: u64,
        rip: u64,
    },
    /// The guest did something the hypervisor refuses to emulate.
    Unsupported(&'static str),
    /// VM entry failed (VM-instruction error, or an entry-failure exit reason).
    EntryFailed(String),
    /// HLT with nothing that could ever wake the guest.
    Halted,
    /// Too many accesses outside guest memory.
    TooManyStrayAccesses,
    /// A hardware machine check while the guest ran.
    MachineCheck,
    /// The hypervisor could not do what the exit needs (out of memory...).
    Internal(&'static str),
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TripleFault => f.write_str("triple fault"),
            Self::UnexpectedExit {
                reason,
                qualification,
                rip,
            } => write!(
                f,
                "unhandled VM exit {} (reason {reason}), qualification {qualification:#x}, rip {rip:#x}",
                name(*reason)
            ),
            Self::Unsupported(what) => write!(f, "unsupported: {what}"),
            Self::EntryFailed(why) => write!(f, "VM entry failed: {why}"),
            Self::Halted => f.write_str("halted with nothing to wake it"),
            Self::TooManyStrayAccesses => f.write_str("too many accesses outside its memory"),
            Self::MachineCheck => f.write_str("machine check"),
            Self::Internal(why) => write!(f, "hypervisor failure: {why}"),
        }
    }
}

pub enum Flow {
    Resume,
    Stop(GuestEnd),
}

impl<V: Vmcs, P: Platform> ExitCtx<'_, V, P> {
    /// Stops the guest, printing why and the guest state.
    pub fn stop(&mut self, why: StopReason) -> Flow {
        Flow::Stop(self.report_stop(why))
    }

    /// [`ExitCtx::stop`], for callers outside exit dispatch.
    pub fn report_stop(&mut self, why: StopReason) -> GuestEnd {
        self.guest.console.flush(self.platform);
        log::error!("guest stopped: {why}");
        let mut state = String::new();
        let _ = dump_guest_state(&*self.vmcs, &mut state);
        let r = &self.regs;
        let _ = writeln!(
            state,
            "  rax {:#x} rbx {:#x} rcx {:#x} rdx {:#x} rsi {:#x} rdi {:#x} rbp {:#x}",
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp
        );
        for line in state.lines() {
            log::error!("{line}");
        }
        GuestEnd::Stopped(why)
    }

    pub fn rip(&self) -> u64 {
        self.vmcs.read(guest::RIP)
    }

    pub fn qualification(&self) -> u64 {
        self.vmcs.read(ro::EXIT_QUALIFICATION)
    }

    /// Injects #GP(0) and resumes (the faulting instruction does not complete).
    pub fn general_protection(&mut self) -> Flow {
        inject_exception(self.vmcs, vector::GP, Some(0));
        Flow::Resume
    }

    /// Injects #UD and resumes.
    pub fn invalid_opcode(&mut self) -> Flow {
        inject_exception(self.vmcs, vector::UD, None);
        Flow::Resume
    }
}

/// Handles one VM exit with basic reason `basic`.
pub fn handle<V: Vmcs, P: Platform>(basic: u16, ctx: &mut ExitCtx<'_, V, P>) -> Flow {
    // A single step with TF gets no #DB when the stepped instruction was
    // emulated (RIP moved) or an event is injected: end it here.
    let stepping_from = ctx.guest.step.is_some_and(|s| !s.mtf).then(|| ctx.rip());
    let flow = dispatch(basic, ctx);
    if let Some(rip) = stepping_from
        && ctx.guest.step.is_some()
        && matches!(flow, Flow::Resume)
        && (ctx.rip() != rip || injecting(&*ctx.vmcs))
    {
        views::finish_step(ctx.vmcs, ctx.guest);
    }
    flow
}

fn dispatch<V: Vmcs, P: Platform>(basic: u16, ctx: &mut ExitCtx<'_, V, P>) -> Flow {
    match basic {
        reason::EXCEPTION_OR_NMI => exception::handle(ctx),
        // The hypervisor enables no interrupt source (legacy PICs masked, no
        // APIC timer), so none should arrive; one that does is acknowledged
        // on exit and dropped, without an EOI (a known gap: see the README).
        reason::EXTERNAL_INTERRUPT => Flow::Resume,
        reason::TRIPLE_FAULT => triple_fault::handle(ctx),
        reason::INIT_SIGNAL => init_sipi::init(ctx),
        reason::SIPI => init_sipi::sipi(ctx),
        reason::CPUID => cpuid::handle(ctx),
        reason::HLT => hlt::handle(ctx),
        reason::VMCALL => vmcall::handle(ctx),
        reason::CR_ACCESS => cr::handle(ctx),
        reason::IO_INSTRUCTION => io::handle(ctx),
        reason::RDMSR => msr::read(ctx),
        reason::WRMSR => msr::write(ctx),
        // MONITOR/MWAIT are hidden from CPUID; VMX instructions are not
        // offered; a VMFUNC exits only for an invalid or hidden view.
        reason::MWAIT | reason::MONITOR | reason::VMFUNC | 19..=27 | 50 | 53 => {
            ctx.invalid_opcode()
        }
        reason::EPT_VIOLATION => ept::violation(ctx),
        reason::EPT_MISCONFIG => ept::misconfig(ctx),
        reason::PREEMPTION_TIMER => preemption_timer::handle(ctx),
        reason::MONITOR_TRAP_FLAG => {
            views::finish_step(ctx.vmcs, ctx.guest);
            Flow::Resume
        }
        reason::XSETBV => xsetbv::handle(ctx),
        other => {
            let why = StopReason::UnexpectedExit {
                reason: other,
                qualification: ctx.qualification(),
                rip: ctx.rip(),
            };
            ctx.stop(why)
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
