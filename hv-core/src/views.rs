//! The kernel's side of altp2m: keeping the VMCS in step with the guest's
//! views (EPTP, EPTP index, VMFUNC and #VE controls, the exceptions a
//! monitor needs), learning which view the guest switched to with VMFUNC,
//! the INVEPTs the views ask for, the single step in view 0 with which the
//! hypervisor lets a denied access or a hidden breakpoint through, and the
//! monitor's event lines.

use hv_altp2m::{Dropped, ViewSet};
use hv_ept::walk::AccessKind;
use hv_ept::{Gfn, P2mAccess};
use x86::vmx::vmcs::{control, guest};

use crate::platform::{Kick, Platform, monitor_event};
use crate::vcpu::events::{BLOCKING_STI_MOVSS, PENDING_BS, vector};
use crate::vcpu::{Step, Vcpu};
use crate::vm::{Features, Vm};
use crate::vmx::Cpu;
use crate::vmx::vmcs::Vmcs;

/// VM-function control bit 0: EPTP switching.
const VMFUNC_EPTP_SWITCHING: u64 = 1;
/// Secondary control: EPT-violation #VE.
const SECONDARY_VE: u64 = 1 << 18;
const RFLAGS_TF: u64 = 1 << 8;
const VECTOR_BP: u64 = vector::BP as u64;
const VECTOR_MC: u64 = vector::MC as u64;
/// Primary processor-based control: monitor trap flag.
const PRIMARY_MTF: u64 = 1 << 27;

/// Primary processor-based control: CR3-load exiting.
const PRIMARY_CR3_LOAD: u64 = 1 << 15;

/// Writes every VMCS field that depends on the guest's altp2m state and on
/// the events a tool asked for. Cheap enough to call after any change.
pub fn apply(vmcs: &mut impl Vmcs, vm: &Vm, vcpu: &Vcpu) {
    let id = vcpu.id.index();
    let eptp = match vcpu.step {
        Some(Step {
            for_tool: false, ..
        }) => vm.p2m.eptp(),
        _ => vm
            .altp2m
            .vcpu_eptp(&vm.p2m, id)
            .unwrap_or_else(|_| vm.p2m.eptp()),
    };
    vmcs.write(control::EPTP_FULL, eptp);
    let on = vm.altp2m.is_enabled();
    if vm.features.ve {
        // The vCPU's own view, also during a step in view 0: a VMFUNC the
        // stepped instruction makes is seen as a change of this index.
        let view = vm.altp2m.vcpu_view(id).unwrap_or(0);
        vmcs.write(control::EPTP_INDEX, u64::from(view));
    }
    if vm.features.vmfunc {
        vmcs.write(control::EPTP_LIST_ADDR_FULL, vm.altp2m.visible_list().hpa());
        vmcs.write(
            control::VM_FUNCTION_CONTROLS_FULL,
            if on { VMFUNC_EPTP_SWITCHING } else { 0 },
        );
    }
    if vm.features.ve {
        let secondary = vmcs.read(control::SECONDARY_PROCBASED_EXEC_CONTROLS);
        // A tool that wants #VE events gets them for every #VE: the
        // hypervisor delivers them itself (`exits::ept`), so each exits.
        let emulated = vm.control.wants(hv_control::class::VE);
        match (on && !emulated, vcpu.ve_page) {
            (true, Some((_, mfn))) => {
                vmcs.write(control::VIRT_EXCEPTION_INFO_ADDR_FULL, mfn.hpa());
                vmcs.write(
                    control::SECONDARY_PROCBASED_EXEC_CONTROLS,
                    secondary | SECONDARY_VE,
                );
            }
            _ => vmcs.write(
                control::SECONDARY_PROCBASED_EXEC_CONTROLS,
                secondary & !SECONDARY_VE,
            ),
        }
    }
    let exceptions = match vcpu.step {
        // Stepping with TF: any exception means the stepped instruction
        // faulted, and its handler must not run in view 0 (#PF included:
        // the page-fault mask and match are 0); a tool's step ends there.
        Some(Step { mtf: false, .. }) => u32::MAX as u64,
        _ if on => 1 << VECTOR_MC | 1 << VECTOR_BP,
        _ => 1 << VECTOR_MC,
    };
    let primary = vmcs.read(control::PRIMARY_PROCBASED_EXEC_CONTROLS) & !PRIMARY_CR3_LOAD;
    let primary = if vm.control.wants(hv_control::class::CR3_WRITE) {
        primary | PRIMARY_CR3_LOAD
    } else {
        primary
    };
    let mtf = vm.features.mtf && matches!(vcpu.step, Some(Step { mtf: true, .. }));
    let primary = if mtf {
        primary | PRIMARY_MTF
    } else {
        primary & !PRIMARY_MTF
    };
    vmcs.write(control::PRIMARY_PROCBASED_EXEC_CONTROLS, primary);
    vmcs.write(control::EXCEPTION_BITMAP, exceptions);
}

/// Where a vCPU's hardware is after a VM exit, read without the VM lock
/// (the vCPU publishes it, `smp::Coherence::exit`, and [`sync`] takes it):
/// the EPTP-index field where the CPU has #VE (the field comes with it),
/// else the EPTP itself (as Xen does without #VE). `u64::MAX` without
/// VMFUNC: nothing but the hypervisor moves the vCPU then.
pub fn where_hardware_is(features: &Features, vmcs: &impl Vmcs) -> u64 {
    match (features.vmfunc, features.ve) {
        (false, _) => u64::MAX,
        (true, true) => vmcs.read(control::EPTP_INDEX),
        (true, false) => vmcs.read(control::EPTP_FULL),
    }
}

/// What [`where_hardware_is`] reads for a vCPU whose hardware is on `view`.
fn where_hardware_is_on(vm: &Vm, view: u16) -> Result<u64, hv_altp2m::Error> {
    if vm.features.ve {
        Ok(u64::from(view))
    } else {
        vm.altp2m.eptp(&vm.p2m, view)
    }
}

/// After a VM exit: the guest may have switched views with VMFUNC;
/// `hardware` ([`where_hardware_is`]) says where it is now. An index or EPTP
/// the altp2m state cannot have produced means corrupt state: `Err`.
/// Not while another vCPU's switch of this one waits to be written to its
/// VMCS: `hardware` is then older than the switch, which stands.
pub fn sync(vm: &mut Vm, vcpu: &Vcpu, hardware: u64) -> Result<(), hv_altp2m::Error> {
    let id = vcpu.id.index();
    if !(vm.features.vmfunc && vm.altp2m.is_enabled()) || vm.coherence.must_reapply(id) {
        return Ok(());
    }
    let index = if vm.features.ve {
        hardware
    } else {
        // Without #VE the EPTP: the one `apply` wrote (the vCPU's view's,
        // or the host's during a step in view 0) means no VMFUNC since;
        // another is the view the guest VMFUNCed to. (A VMFUNC to view 0
        // during a step in view 0 is not seen; the #VE index would see it.)
        let stepping = matches!(
            vcpu.step,
            Some(Step {
                for_tool: false,
                ..
            })
        );
        if hardware == vm.altp2m.vcpu_eptp(&vm.p2m, id)? || (stepping && hardware == vm.p2m.eptp())
        {
            return Ok(());
        }
        let view = vm
            .altp2m
            .active_views()
            .iter()
            .find(|&v| u16::try_from(v).is_ok_and(|v| vm.altp2m.eptp(&vm.p2m, v) == Ok(hardware)))
            .ok_or(hv_altp2m::Error::BadView)?;
        view as u64
    };
    vm.altp2m.sync_vcpu_view(id, index)
}

/// After a change to other vCPUs' views (a switch of all or one, altp2m on
/// or off): each of them writes its view-related VMCS fields again before
/// its next entry, and one in guest mode is kicked out to do so; none runs
/// on its old view once this returns.
pub fn reapply_others(vm: &Vm, platform: &mut impl Platform, vcpu: usize) {
    for other in (0..vm.vcpus()).filter(|&v| v != vcpu) {
        vm.coherence
            .request_reapply(other, |v| platform.kick(v, Kick::Nmi));
    }
}

/// Destroys `view`, unless a vCPU runs on it (`Busy`). A vCPU may switch
/// to a visible view with VMFUNC without an exit, so the view leaves the
/// EPTP list first, then every vCPU in guest mode is made to exit (which
/// publishes the view its hardware is on, `smp`), and only then is "is a
/// vCPU on it" decided; a refused destroy puts the view back in the list.
pub fn destroy_view(
    vm: &mut Vm,
    platform: &mut impl Platform,
    vcpu: usize,
    view: u16,
) -> Result<(), hv_altp2m::Error> {
    let hide = vm.features.vmfunc && vm.altp2m.is_visible(view)?;
    if hide {
        vm.altp2m.set_visibility(platform, &vm.p2m, view, false)?;
    }
    if vm.vcpus() > 1 {
        vm.coherence
            .shootdown(vcpu, |other| platform.kick(other, Kick::Nmi));
    }
    // The hardware of a vCPU that VMFUNCed to the view is on it, whatever
    // altp2m's record says until that vCPU's exit is handled.
    let on_it = vm.features.vmfunc && {
        let there = where_hardware_is_on(vm, view)?;
        (0..vm.vcpus())
            .filter(|&v| v != vcpu)
            .any(|v| vm.coherence.last_view(v) == there)
    };
    let destroyed = if on_it {
        Err(hv_altp2m::Error::Busy)
    } else {
        vm.altp2m.destroy_view(platform, view)
    };
    if destroyed.is_err() && hide {
        vm.altp2m.set_visibility(platform, &vm.p2m, view, true)?;
    }
    destroyed
}

/// Does the INVEPTs the host p2m and the views ask for, on this CPU and
/// (through a shootdown, `smp`) on every CPU that runs another vCPU, then
/// reports the view entries host changes dropped. Before every VM entry,
/// and wherever a change must be in force before the hypervisor goes on
/// (a frame given back, a dirty log fetched). `vcpu` is the caller's.
pub fn flush(vm: &mut Vm, cpu: &mut impl Cpu, platform: &mut impl Platform, vcpu: usize) {
    if !vm.altp2m.flush_pending(&vm.p2m) && !vm.altp2m.has_dropped() {
        return;
    }
    let request = vm.altp2m.take_flush(&mut vm.p2m);
    let any = request.all_contexts || request.views.iter().next().is_some();
    if request.all_contexts {
        cpu.invept(None);
    } else {
        for view in request.views.iter() {
            if let Ok(eptp) = vm.altp2m.eptp(&vm.p2m, view as u16) {
                cpu.invept(Some(eptp));
            }
        }
    }
    if any && vm.vcpus() > 1 {
        vm.coherence
            .shootdown(vcpu, |other| platform.kick(other, Kick::Nmi));
    }
    if vm.altp2m.has_dropped() {
        report_drops(vm, platform);
    }
}

/// Dropped entries alike but for their view, reported as one line: a page
/// that leaves 511 views is one line, not 511 (each a synchronous log line
/// of about 1.6 million instructions under Bochs, inside the guest's call).
struct DropGroup {
    first: Dropped,
    views: ViewSet,
}

/// Groups kept while draining; when more kinds come, the groups so far are
/// reported and the next ones start.
const DROP_GROUPS: usize = 8;

fn report_drops(vm: &mut Vm, platform: &mut impl Platform) {
    let mut groups: heapless::Vec<DropGroup, DROP_GROUPS> = heapless::Vec::new();
    let lost = vm.altp2m.drain_dropped(|d| {
        // Alike: equal in everything but the view.
        let alike = |g: &&mut DropGroup| {
            Dropped {
                view: d.view,
                ..g.first
            } == d
        };
        if let Some(group) = groups.iter_mut().find(alike) {
            group.views.insert(usize::from(d.view));
            return;
        }
        if groups.is_full() {
            for group in &groups {
                report_drop(platform, group);
            }
            groups.clear();
        }
        let mut views = ViewSet::EMPTY;
        views.insert(usize::from(d.view));
        // Cannot fail: the groups were emptied if full.
        let _ = groups.push(DropGroup { first: d, views });
    });
    for group in &groups {
        report_drop(platform, group);
    }
    if lost > 0 {
        log::warn!("monitor: {lost} dropped view entries were not logged (log full)");
    }
}

fn report_drop(platform: &mut impl Platform, group: &DropGroup) {
    let d = &group.first;
    monitor_event(
        platform,
        format_args!(
            "dropped view={} gfn={:#x} pages={} access={} reason={:?}{}",
            ViewRanges(&group.views),
            d.gfn.0,
            d.pages,
            access_name(d.access),
            d.reason,
            RemapOf(d.remap_source)
        ),
    );
}

/// A set of views shown as ranges (`1-3,7`).
struct ViewRanges<'a>(&'a ViewSet);

impl core::fmt::Display for ViewRanges<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let mut views = self.0.iter().peekable();
        let mut sep = "";
        while let Some(start) = views.next() {
            let mut end = start;
            while views.next_if_eq(&(end + 1)).is_some() {
                end += 1;
            }
            if start == end {
                write!(f, "{sep}{start}")?;
            } else {
                write!(f, "{sep}{start}-{end}")?;
            }
            sep = ",";
        }
        Ok(())
    }
}

/// ` remap-of=G` for an alias's source, nothing otherwise.
struct RemapOf(Option<Gfn>);

impl core::fmt::Display for RemapOf {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Some(source) => write!(f, " remap-of={:#x}", source.0),
            None => Ok(()),
        }
    }
}

pub fn access_name(access: P2mAccess) -> &'static str {
    match access {
        P2mAccess::N => "n",
        P2mAccess::R => "r",
        P2mAccess::W => "w",
        P2mAccess::X => "x",
        P2mAccess::Rx => "rx",
        P2mAccess::Wx => "wx",
        P2mAccess::Rw => "rw",
        P2mAccess::Rwx => "rwx",
        P2mAccess::Rx2rw => "rx2rw",
        P2mAccess::N2rwx => "n2rwx",
    }
}

pub fn kind_name(kind: AccessKind) -> &'static str {
    match kind {
        AccessKind::Read => "r",
        AccessKind::Write => "w",
        AccessKind::Fetch => "x",
    }
}

/// The view the vCPU's hardware runs on: its own, or view 0 (the host
/// p2m) during the hypervisor's step. EPT exits are handled in this one.
pub fn hardware_view(vm: &Vm, vcpu: &Vcpu) -> Result<u16, hv_altp2m::Error> {
    match vcpu.step {
        Some(Step {
            for_tool: false, ..
        }) => Ok(0),
        _ => vm.altp2m.vcpu_view(vcpu.id.index()),
    }
}

/// Lets the instruction at the guest's RIP run once in view 0 (the host
/// p2m, which holds no view's restrictions or remaps), then back on the
/// vCPU's view ([`finish_step`]). The vCPU stays on its view all along as
/// far as altp2m, the guest and a monitor can tell: only its EPTP points at
/// the host p2m, so whatever the stepped instruction does to views (a
/// hypercall switch, a VMFUNC, which shows as a new EPTP index) is what
/// the vCPU ends on, and a view cannot be destroyed under it. With the
/// monitor trap flag the step ends with an MTF exit after the instruction
/// (or after delivery of the exception it raised). Without it, RFLAGS.TF
/// single-steps, and every exception is intercepted so that a faulting
/// instruction also ends the step; an emulated instruction ends it too (see
/// `exits::handle`).
///
/// A tool's step (`for_tool`) runs in the vCPU's own view and ends with a
/// `SINGLE_STEP` event ([`finish_step`]).
pub fn start_step(vmcs: &mut impl Vmcs, vm: &Vm, vcpu: &mut Vcpu, for_tool: bool) {
    if vm.features.mtf {
        vcpu.step = Some(Step {
            mtf: true,
            trap_flag: false,
            for_tool,
        });
    } else {
        let rflags = vmcs.read(guest::RFLAGS);
        vcpu.step = Some(Step {
            mtf: false,
            trap_flag: rflags & RFLAGS_TF != 0,
            for_tool,
        });
        vmcs.write(guest::RFLAGS, rflags | RFLAGS_TF);
        // TF under an STI/MOV SS shadow needs BS pending (SDM Vol. 3C 26.3.1.5).
        if vmcs.read(guest::INTERRUPTIBILITY_STATE) & BLOCKING_STI_MOVSS != 0 {
            let pending = vmcs.read(guest::PENDING_DBG_EXCEPTIONS);
            vmcs.write(guest::PENDING_DBG_EXCEPTIONS, pending | PENDING_BS);
        }
    }
    apply(vmcs, vm, vcpu);
}

/// Ends the single step: the hardware is back on the vCPU's view and, when
/// stepping with TF, TF is as the guest had it and a single-step #DB is
/// pending only if the guest asked for one. A tool's step holds the vCPU
/// with a `SINGLE_STEP` event. Returns false if no step was in progress.
pub fn finish_step(vmcs: &mut impl Vmcs, vm: &mut Vm, vcpu: &mut Vcpu) -> bool {
    let Some(step) = cancel_step(vmcs, vm, vcpu) else {
        return false;
    };
    if step.for_tool {
        crate::control::raise(
            vm,
            vmcs,
            vcpu,
            hv_control::EventKind::SingleStep,
            crate::control::DefaultAction::Continue,
        );
    }
    true
}

/// Ends the single step in progress, if any, as [`finish_step`] does but
/// without its event; returns it.
pub fn cancel_step(vmcs: &mut impl Vmcs, vm: &Vm, vcpu: &mut Vcpu) -> Option<Step> {
    let step = vcpu.step.take()?;
    if !step.mtf {
        let rflags = vmcs.read(guest::RFLAGS) & !RFLAGS_TF;
        let pending = vmcs.read(guest::PENDING_DBG_EXCEPTIONS) & !PENDING_BS;
        let (tf, bs) = if step.trap_flag {
            (RFLAGS_TF, PENDING_BS)
        } else {
            (0, 0)
        };
        vmcs.write(guest::RFLAGS, rflags | tf);
        vmcs.write(guest::PENDING_DBG_EXCEPTIONS, pending | bs);
    }
    apply(vmcs, vm, vcpu);
    Some(step)
}

/// Whether the code at guest-physical `gpa` lies on a page the vCPU's view
/// remaps (a hidden breakpoint's shadow page): its view and gfn.
pub fn remapped_code(vm: &Vm, vcpu: &Vcpu, gpa: u64) -> Option<(u16, Gfn)> {
    let view = vm.altp2m.vcpu_view(vcpu.id.index()).ok()?;
    let gfn = Gfn(gpa >> 12);
    vm.altp2m
        .remap_source(view, gfn)
        .ok()
        .flatten()
        .map(|_| (view, gfn))
}
