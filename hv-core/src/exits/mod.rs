//! VM-exit handling: one file per exit reason, after the dispatch below.
//!
//! A handler gets the exit's context (the CPU with its current VMCS, the
//! vCPU, its VM, the platform) and says whether the guest resumes or stops.
//! Handlers reach the CPU through [`Cpu`], so they run under host tests
//! against a simulated CPU and platform.

mod cpuid;
pub(crate) mod cr;
mod ept;
mod exception;
mod init_sipi;
mod io;
mod msr;
mod preemption_timer;
mod triple_fault;
mod vmcall;
mod xsetbv;

use core::fmt;

use x86::vmx::vmcs::{guest, ro};

use crate::platform::Platform;
use crate::vcpu::Vcpu;
use crate::vcpu::events::{inject_exception, injecting, vector};
use crate::views;
use crate::vm::Vm;
use crate::vmx::Cpu;
use crate::vmx::exit::{ExitReason, name};
use crate::vmx::vmcs::dump_guest_state;

pub use msr::{PASS_READ_ONLY, PASS_WRITE};

/// Everything a handler may look at or change.
pub struct ExitCtx<'a, C: Cpu, P: Platform> {
    /// The CPU the vCPU runs on, with the vCPU's VMCS current.
    pub cpu: &'a mut C,
    pub vcpu: &'a mut Vcpu,
    pub vm: &'a mut Vm,
    pub platform: &'a mut P,
}

/// How a guest's run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestEnd {
    /// The guest wrote this status to the exit port.
    Exited(u8),
    /// The guest reset the machine (which stays the hypervisor's).
    Reset(crate::devices::ports::ResetPath),
    /// The guest entered ACPI S5 (power off).
    PoweredOff,
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
    /// VM entry failed.
    EntryFailed(EntryFailure),
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

/// How a VM entry failed (kept as numbers: a report must not need the heap).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryFailure {
    /// VMfailInvalid: no current VMCS.
    NoCurrentVmcs,
    /// VMfailValid with this VM-instruction error number.
    InstructionError(u64),
    /// A VM exit with the entry-failure bit and this basic reason.
    ExitReason(u16),
}

impl fmt::Display for EntryFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::NoCurrentVmcs => f.write_str("VMfailInvalid (no current VMCS)"),
            Self::InstructionError(n) => write!(
                f,
                "VM-instruction error {n}: {}",
                crate::vmx::exit::instruction_error(n)
            ),
            Self::ExitReason(r) => write!(f, "exit reason {r} ({})", name(r)),
        }
    }
}

pub enum Flow {
    Resume,
    Stop(GuestEnd),
}

impl<C: Cpu, P: Platform> ExitCtx<'_, C, P> {
    /// Stops the guest, printing why and the guest state.
    pub fn stop(&mut self, why: StopReason) -> Flow {
        Flow::Stop(self.report_stop(why))
    }

    /// [`ExitCtx::stop`], for callers outside exit dispatch.
    pub fn report_stop(&mut self, why: StopReason) -> GuestEnd {
        self.vm.devices.console.flush(self.platform);
        log::error!("guest stopped: {why}");
        dump_guest_state(&*self.cpu, |line| log::error!("{line}"));
        let r = &self.vcpu.regs;
        log::error!(
            "  rax {:#x} rbx {:#x} rcx {:#x} rdx {:#x} rsi {:#x} rdi {:#x} rbp {:#x}",
            r.rax,
            r.rbx,
            r.rcx,
            r.rdx,
            r.rsi,
            r.rdi,
            r.rbp
        );
        GuestEnd::Stopped(why)
    }

    pub fn rip(&self) -> u64 {
        self.cpu.read(guest::RIP)
    }

    pub fn qualification(&self) -> u64 {
        self.cpu.read(ro::EXIT_QUALIFICATION)
    }

    /// Injects #GP(0) and resumes (the faulting instruction does not complete).
    pub fn general_protection(&mut self) -> Flow {
        inject_exception(self.cpu, vector::GP, Some(0));
        Flow::Resume
    }

    /// Injects #UD and resumes.
    pub fn invalid_opcode(&mut self) -> Flow {
        inject_exception(self.cpu, vector::UD, None);
        Flow::Resume
    }
}

/// Handles one VM exit.
pub fn handle<C: Cpu, P: Platform>(reason: ExitReason, ctx: &mut ExitCtx<'_, C, P>) -> Flow {
    // Writes the CPU logged go to the dirty log before anything can change
    // the p2ms (see `vcpu::pml`).
    if let Some(stop) = crate::vcpu::pml::drain_or_stop(ctx) {
        return stop;
    }
    // A single step with TF gets no #DB when the stepped instruction was
    // emulated (RIP moved) or an event is injected: end it here.
    let stepping_from = ctx.vcpu.step.is_some_and(|s| !s.mtf).then(|| ctx.rip());
    let flow = dispatch(reason, ctx);
    if let Some(rip) = stepping_from
        && ctx.vcpu.step.is_some()
        && matches!(flow, Flow::Resume)
        && (ctx.rip() != rip || injecting(&*ctx.cpu))
    {
        views::finish_step(ctx.cpu, ctx.vm, ctx.vcpu);
    }
    flow
}

fn dispatch<C: Cpu, P: Platform>(reason: ExitReason, ctx: &mut ExitCtx<'_, C, P>) -> Flow {
    use ExitReason as R;
    match reason {
        R::ExceptionOrNmi => exception::handle(ctx),
        // The events the vCPU owes are injected right before entry.
        R::InterruptWindow | R::NmiWindow => Flow::Resume,
        R::TripleFault => triple_fault::handle(ctx),
        R::Init => init_sipi::init(ctx),
        R::Sipi => init_sipi::sipi(ctx),
        R::Cpuid => cpuid::handle(ctx),
        R::Vmcall => vmcall::handle(ctx),
        R::CrAccess => cr::handle(ctx),
        R::Io => io::handle(ctx),
        R::Rdmsr => msr::read(ctx),
        R::Wrmsr => msr::write(ctx),
        // MONITOR/MWAIT are hidden from CPUID; VMX instructions are not
        // offered; a VMFUNC exits only for an invalid or hidden view.
        R::Mwait | R::Monitor | R::Vmfunc => ctx.invalid_opcode(),
        r if r.is_vmx_instruction() => ctx.invalid_opcode(),
        R::EptViolation => ept::violation(ctx),
        R::EptMisconfig => ept::misconfig(ctx),
        R::PmlFull => crate::vcpu::pml::full(ctx),
        R::PreemptionTimer => preemption_timer::handle(ctx),
        R::MonitorTrapFlag => {
            views::finish_step(ctx.cpu, ctx.vm, ctx.vcpu);
            Flow::Resume
        }
        R::Xsetbv => xsetbv::handle(ctx),
        other => {
            let why = StopReason::UnexpectedExit {
                reason: other.basic(),
                qualification: ctx.qualification(),
                rip: ctx.rip(),
            };
            ctx.stop(why)
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
