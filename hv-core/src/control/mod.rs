//! The control channel's server: a tool outside the guest (`hvctl`, a VMI
//! tool) drives the hypervisor over a dedicated serial line with the
//! `hv-control` protocol (`docs/control.md`).
//!
//! How it runs, without a thread of its own:
//!
//! - The line is served by whichever CPU gets to it first ([`serve`]), on
//!   the hypervisor's tick and all the time from the loop of a vCPU that is
//!   held. The serving CPU takes the line (decoder, transmit buffer) out of
//!   the VM under the VM lock and does its UART I/O without the lock; the
//!   lock is taken again to run each command, so a slow line never blocks
//!   other vCPUs' exits.
//! - A vCPU is *stopped* while the tool paused it or an event of it waits
//!   for an answer: it stays in the hypervisor ([`crate::vcpu::Vcpu`]'s
//!   hold loop), with its registers published here (a VMCS can only be
//!   read on its own CPU). Register writes, answers and the default action
//!   of a session's end are recorded here and carried out by the vCPU
//!   itself before it runs on.
//! - Exit handlers raise events ([`raise`]); the held vCPU's loop sends them.

mod commands;
mod line;
pub mod registers;

use alloc::vec::Vec;

use hv_control::{Answer, Context, Event, EventKind, Registers};
use hv_ept::{Gfn, Mfn};
use x86::vmx::vmcs::guest;

use crate::platform::Platform;
use crate::vcpu::Vcpu;
use crate::vcpu::events::{advance_rip_by, inject_exception, vector};
use crate::views;
use crate::vm::Vm;
use crate::vmx::Cpu;
use crate::vmx::vmcs::Vmcs;
pub use line::{SharedVm, serve};

/// Most shadow pages a tool may hold at once (16 MiB).
pub const MAX_SHADOW_PAGES: usize = 4096;
/// The hypervisor's tick while the machine has a control line, in TSC
/// cycles (about 40 ms of Bochs's emulated time, 3 ms on a 3 GHz CPU): how
/// long a command may wait before a running guest's vCPU looks at the line.
pub const CONTROL_TICK_TSC: u64 = 1 << 23;
/// An event not answered within this many milliseconds is sent again.
const RESEND_MS: u64 = 2000;

/// What the hypervisor does for an event when no tool decides: the same as
/// without a tool (`docs/hypercalls.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DefaultAction {
    Continue,
    /// A denied access or a hidden breakpoint: the instruction runs once
    /// in view 0.
    StepInView0,
    /// A denied access in view 0 itself: nowhere to step to.
    GeneralProtection,
}

/// What an event's instruction still has to do once the vCPU runs on: the
/// tool saw the event before the instruction took effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// A MOV to CR3 of `value`, an instruction of `len` bytes.
    MovToCr3 { value: u64, len: u64 },
}

/// An event that holds its vCPU.
#[derive(Clone, Copy, Debug)]
pub struct Held {
    pub seq: u32,
    pub event: Event,
    /// When it was last sent (TSC), `None` before the first time.
    sent_at: Option<u64>,
    default: DefaultAction,
    completion: Option<Completion>,
}

/// How a held vCPU goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resolution {
    Answered(Answer),
    /// The session ended: the event's default action.
    Default,
}

/// One vCPU as the control channel sees it.
#[derive(Clone, Debug, Default)]
pub struct VcpuControl {
    /// The tool paused it.
    paused: bool,
    held: Option<Held>,
    resolution: Option<Resolution>,
    /// It is in its hold loop and `registers` are its own.
    stopped: bool,
    /// Its registers, while stopped (or as it parked in wait-for-SIPI).
    registers: Registers,
    /// The tool changed `registers`: written back before it runs.
    registers_changed: bool,
    /// A change of its #VE information page the tool asked for:
    /// `Some(None)` turns notification off.
    notify: Option<Option<(Gfn, Mfn)>>,
}

/// The tool's session.
#[derive(Clone, Copy, Debug)]
struct Session {
    /// The session ends after this many TSC cycles without a frame (0: never).
    liveness_tsc: u64,
    last_heard: u64,
}

/// Counters for figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlStats {
    pub commands: u64,
    pub events: u64,
    pub answers: u64,
    /// Frames that failed to decode (bad CRC, size, kind, shape).
    pub bad_frames: u64,
    /// TSC cycles spent running commands (under the VM lock, the line's
    /// I/O not included) and carrying out answers.
    pub command_tsc: u64,
    pub answer_tsc: u64,
    /// Per command id below [`COSTED_IDS`]: how many, and their TSC cycles.
    pub by_command: [(u32, u64); COSTED_IDS],
}

/// Command ids whose costs are kept one by one (every command's).
pub const COSTED_IDS: usize = 0x62;

impl Default for ControlStats {
    fn default() -> Self {
        Self {
            commands: 0,
            events: 0,
            answers: 0,
            bad_frames: 0,
            command_tsc: 0,
            answer_tsc: 0,
            by_command: [(0, 0); COSTED_IDS],
        }
    }
}

impl ControlStats {
    /// Counts a command of `id` that took `tsc` cycles.
    pub fn command(&mut self, id: u16, tsc: u64) {
        self.command_tsc += tsc;
        if let Some((count, total)) = self.by_command.get_mut(usize::from(id)) {
            *count += 1;
            *total += tsc;
        }
    }
}

impl core::fmt::Display for ControlStats {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let per = |total: u64, n: u64| total.checked_div(n).unwrap_or(0);
        write!(
            f,
            "{} commands ({} TSC cycles each in the hypervisor), {} events, {} answers ({} TSC cycles each), {} bad frames",
            self.commands,
            per(self.command_tsc, self.commands),
            self.events,
            self.answers,
            per(self.answer_tsc, self.answers),
            self.bad_frames
        )?;
        for (id, &(count, tsc)) in self.by_command.iter().enumerate() {
            if count > 0 {
                let name = hv_control::message_name(id as u16);
                write!(f, "; {name} {count}x {}", per(tsc, u64::from(count)))?;
            }
        }
        Ok(())
    }
}

/// The control channel's state in a VM.
pub struct Control {
    /// The line, while no CPU serves it; `None` without a control line.
    line: Option<line::BoxedLine>,
    has_line: bool,
    session: Option<Session>,
    /// Event classes reported (none without a session).
    classes: u32,
    vcpus: Vec<VcpuControl>,
    next_seq: u32,
    /// A `PAUSE` reply owed once its vCPUs are stopped: (seq, vcpu).
    pause_reply: Option<(u32, u16)>,
    /// Shadow pages the tool holds, sorted by gfn.
    shadows: Vec<(Gfn, Mfn)>,
    /// The first gfn shadow pages take: above guest RAM and 4 GiB.
    shadow_base: u64,
    /// TSC cycles per millisecond (for liveness and resends).
    tsc_per_ms: u64,
    pub stats: ControlStats,
}

/// Why the control state could not be made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoMemory;

impl Control {
    /// The control state of a VM of `vcpus` vCPUs whose memory map ends at
    /// `ram_end` (bytes); with a line if the platform has one.
    pub fn new(platform: &impl Platform, vcpus: usize, ram_end: u64) -> Result<Self, NoMemory> {
        let mut states = Vec::new();
        states.try_reserve_exact(vcpus).map_err(|_| NoMemory)?;
        states.resize(vcpus, VcpuControl::default());
        let mut shadows = Vec::new();
        shadows
            .try_reserve_exact(MAX_SHADOW_PAGES)
            .map_err(|_| NoMemory)?;
        let has_line = platform.has_control_line();
        let line = if has_line {
            Some(line::Line::new().ok_or(NoMemory)?)
        } else {
            None
        };
        const GIB: u64 = 1 << 30;
        Ok(Self {
            line,
            has_line,
            session: None,
            classes: 0,
            vcpus: states,
            next_seq: 1,
            pause_reply: None,
            shadows,
            shadow_base: ram_end.max(4 * GIB).next_multiple_of(GIB) / crate::vm::PAGE,
            tsc_per_ms: platform.tsc_khz().max(1),
            stats: ControlStats::default(),
        })
    }

    pub fn has_line(&self) -> bool {
        self.has_line
    }

    /// Whether a tool's session is open.
    pub fn in_session(&self) -> bool {
        self.session.is_some()
    }

    /// Whether the tool wants events of `class`.
    pub fn wants(&self, class: u32) -> bool {
        self.classes & class != 0
    }

    /// The classes reported now.
    pub fn classes(&self) -> u32 {
        self.classes
    }

    /// Whether vCPU `vcpu` must stay in the hypervisor.
    pub fn must_stop(&self, vcpu: usize) -> bool {
        self.vcpus
            .get(vcpu)
            .is_some_and(|v| v.paused || v.held.is_some() || v.resolution.is_some())
    }

    /// Whether `gfn` is a shadow page.
    pub fn is_shadow(&self, gfn: Gfn) -> bool {
        self.shadows.binary_search_by_key(&gfn.0, |s| s.0.0).is_ok()
    }

    /// Gives the shadow pages' frames back (the VM is being destroyed).
    pub fn destroy(&mut self, platform: &mut impl Platform) {
        for (_, mfn) in self.shadows.drain(..) {
            platform.free_frames(mfn, 1);
        }
    }

    fn ms_to_tsc(&self, ms: u64) -> u64 {
        ms.saturating_mul(self.tsc_per_ms)
    }

    /// Ends the session: event classes off, held vCPUs released with their
    /// events' default actions (carried out by each vCPU); paused vCPUs
    /// stay paused. Returns whether there was one.
    fn end_session(&mut self) -> bool {
        let had = self.session.take().is_some();
        self.classes = 0;
        self.pause_reply = None;
        for v in &mut self.vcpus {
            if v.held.is_some() && v.resolution.is_none() {
                v.resolution = Some(Resolution::Default);
            }
        }
        had
    }
}

/// Holds `vcpu` with an event the tool must answer, unless another one
/// holds it already (then this one is dropped: a vCPU has one outstanding).
/// A tool's single step in progress ends (its instruction raised this).
/// The event goes out from the vCPU's hold loop.
pub fn raise(
    vm: &mut Vm,
    vmcs: &mut impl Vmcs,
    vcpu: &mut Vcpu,
    kind: EventKind,
    default: DefaultAction,
) {
    raise_completing(vm, vmcs, vcpu, kind, default, None);
}

fn raise_completing(
    vm: &mut Vm,
    vmcs: &mut impl Vmcs,
    vcpu: &mut Vcpu,
    kind: EventKind,
    default: DefaultAction,
    completion: Option<Completion>,
) {
    let id = vcpu.id.index();
    if vm.control.session.is_none() || vm.control.vcpus.get(id).is_none_or(|v| v.held.is_some()) {
        return;
    }
    if vcpu.step.is_some_and(|s| s.for_tool) {
        views::cancel_step(vmcs, vm, vcpu);
    }
    let context = Context {
        vcpu: vcpu.id.0,
        view: vm.altp2m.vcpu_view(id).unwrap_or(0),
        rip: vmcs.read(guest::RIP),
        cr3: vmcs.read(guest::CR3),
    };
    let control = &mut vm.control;
    let seq = control.next_seq;
    control.next_seq = control.next_seq.wrapping_add(1);
    control.stats.events += 1;
    control.vcpus[id].held = Some(Held {
        seq,
        event: Event { context, kind },
        sent_at: None,
        default,
        completion,
    });
}

/// A MOV to CR3 with CR3-write events on: the tool sees it before it takes
/// effect; the vCPU completes it when it runs on.
pub fn raise_cr3_write(vm: &mut Vm, vmcs: &mut impl Vmcs, vcpu: &mut Vcpu, new: u64, len: u64) {
    let old = vmcs.read(guest::CR3);
    raise_completing(
        vm,
        vmcs,
        vcpu,
        EventKind::Cr3Write { old, new },
        DefaultAction::Continue,
        Some(Completion::MovToCr3 { value: new, len }),
    );
}

/// At the top of a vCPU's run loop, after a reapply request: takes a #VE
/// page change the tool asked for.
pub fn take_notify(vm: &mut Vm, vcpu: &mut Vcpu) {
    if let Some(state) = vm.control.vcpus.get_mut(vcpu.id.index())
        && let Some(page) = state.notify.take()
    {
        vcpu.ve_page = page;
    }
}

/// The vCPU enters its hold loop: its registers are published.
pub fn stop(vm: &mut Vm, cpu: &mut impl Cpu, vcpu: &Vcpu) {
    let id = vcpu.id.index();
    let Some(state) = vm.control.vcpus.get_mut(id) else {
        return;
    };
    state.registers = registers::read(cpu, &vcpu.regs);
    state.registers_changed = false;
    state.stopped = true;
}

/// A vCPU about to park in wait-for-SIPI publishes its registers (it is
/// paused as far as a tool can tell: it runs no guest code).
pub fn parking(vm: &mut Vm, cpu: &mut impl Cpu, vcpu: &Vcpu) {
    if let Some(state) = vm.control.vcpus.get_mut(vcpu.id.index()) {
        state.registers = registers::read(cpu, &vcpu.regs);
    }
}

/// From a stopped vCPU's hold loop: carries out what was decided for it
/// (register writes, an answer or a default action) and says whether it
/// runs on. A vCPU that stays (paused, or held again by a step's event)
/// publishes its registers afresh.
pub fn resume<C: Cpu>(
    vm: &mut Vm,
    cpu: &mut C,
    platform: &mut impl Platform,
    vcpu: &mut Vcpu,
) -> bool {
    let id = vcpu.id.index();
    let Some(state) = vm.control.vcpus.get_mut(id) else {
        return true;
    };
    let mut changed = false;
    if state.registers_changed {
        state.registers_changed = false;
        let regs = state.registers;
        registers::write(cpu, &mut vcpu.regs, &vm.cr_fixed, &regs);
        if crate::exits::cr::load_pdptes(cpu, vm, platform).is_err() {
            log::warn!("control: vCPU {id}'s new CR3 has no valid PAE PDPTEs");
        }
        // The tool's state replaces whatever the event's instruction was
        // about to do.
        if let Some(held) = vm.control.vcpus[id].held.as_mut() {
            held.completion = None;
        }
        changed = true;
    }
    let state = &mut vm.control.vcpus[id];
    if let Some(resolution) = state.resolution.take() {
        let held = state.held.take();
        let start = cpu.rdtsc();
        carry_out(vm, cpu, platform, vcpu, held, resolution);
        if matches!(resolution, Resolution::Answered(_)) {
            let stats = &mut vm.control.stats;
            stats.answers += 1;
            stats.answer_tsc += cpu.rdtsc().saturating_sub(start);
        }
        changed = true;
    }
    if vm.control.must_stop(id) {
        if changed {
            stop(vm, cpu, vcpu);
        }
        return false;
    }
    vm.control.vcpus[id].stopped = false;
    true
}

/// Carries out an answer (or the default action) to a held event.
fn carry_out<C: Cpu>(
    vm: &mut Vm,
    cpu: &mut C,
    platform: &mut impl Platform,
    vcpu: &mut Vcpu,
    held: Option<Held>,
    resolution: Resolution,
) {
    let Some(held) = held else {
        return;
    };
    let id = vcpu.id.index();
    // The event's own instruction first: it happened as far as the guest
    // is concerned, whatever the answer.
    let completed = match held.completion {
        Some(Completion::MovToCr3 { value, len }) => {
            match crate::exits::cr::mov_to_cr3(cpu, vm, platform, value) {
                Ok(()) => advance_rip_by(cpu, len),
                Err(_) => inject_exception(cpu, vector::GP, Some(0)),
            }
            true
        }
        None => false,
    };
    match resolution {
        Resolution::Default => match held.default {
            DefaultAction::Continue => {}
            DefaultAction::StepInView0 => views::start_step(cpu, vm, vcpu, false),
            DefaultAction::GeneralProtection => inject_exception(cpu, vector::GP, Some(0)),
        },
        Resolution::Answered(answer) => {
            if let Some(view) = answer.switch_view
                && vm.altp2m.switch_vcpu(id, view).is_err()
            {
                log::warn!("control: vCPU {id} cannot switch to view {view}");
            }
            views::apply(cpu, vm, vcpu);
            if answer.single_step {
                if completed {
                    // The emulated instruction was the step.
                    raise(
                        vm,
                        cpu,
                        vcpu,
                        EventKind::SingleStep,
                        DefaultAction::Continue,
                    );
                } else {
                    views::start_step(cpu, vm, vcpu, true);
                }
            }
        }
    }
}

/// The view a vCPU's event may be answered with: one that exists.
fn view_exists(vm: &Vm, view: u16) -> bool {
    view == 0 || vm.altp2m.is_active(view)
}

#[cfg(test)]
mod tests;
