//! A virtual CPU: its general registers, its VMCS, its virtual
//! IA32_APIC_BASE, its #VE information page and single-step state
//! (the view it runs on lives in the VM's altp2m state, by vCPU id); making
//! it, entering the guest and dispatching its exits, tearing it down.

pub mod cr;
pub mod entry;
pub mod events;
pub mod paging;
pub mod pml;
pub mod regs;
pub mod state;

use hv_ept::{Gfn, Mfn};
use x86::vmx::vmcs::{control, guest, ro};

use crate::control as channel;
use crate::devices::mtrr::Mtrrs;
use crate::exits::{self, EntryFailure, ExitCtx, Flow, GuestEnd, StopReason};
use crate::platform::{Kick, Platform};
use crate::views;
use crate::vm::{Vm, VmError};
use crate::vmx::exit::{Exit, ExitReason};
use crate::vmx::vmcs::{Vmcs, dump_guest_state};
use crate::vmx::{self, Cpu, ThisCpu, VmxError};
use entry::Entry;
pub use events::GUEST_VPID;
pub use regs::GuestRegisters;

/// IA32_APIC_BASE at reset: the xAPIC at 0xFEE00000, enabled, boot processor.
pub const APIC_BASE_RESET: u64 = 0xfee0_0000 | 1 << 11 | 1 << 8;

/// A vCPU's index in its VM, also its index in the altp2m state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VcpuId(pub u16);

impl VcpuId {
    /// The bootstrap processor.
    pub const BSP: Self = Self(0);

    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

/// A single step in view 0 the hypervisor takes for the guest: an access a
/// view denied (or a hidden breakpoint) runs once in the host p2m, then the
/// hardware is back on the vCPU's view (`views::start_step`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    /// Stepped with the monitor trap flag; otherwise with RFLAGS.TF, and
    /// `trap_flag` is the guest's own TF, restored after the step.
    pub mtf: bool,
    pub trap_flag: bool,
    /// A tool asked for it (answering an event): it runs in the vCPU's own
    /// view and ends with a `SINGLE_STEP` event.
    pub for_tool: bool,
}

pub struct Vcpu {
    pub id: VcpuId,
    pub regs: GuestRegisters,
    vmcs_region: Mfn,
    launched: bool,
    /// The guest's view of IA32_APIC_BASE (the physical one is never touched).
    pub apic_base: u64,
    /// The #VE information page and its frame, when notification is on.
    pub ve_page: Option<(Gfn, Mfn)>,
    pub step: Option<Step>,
    /// Events owed to the guest (NMIs, interrupts cut short).
    pub pending: events::Pending,
    /// Watchdog ticks in a row that found the vCPU halted with interrupts off.
    pub halted_ticks: u8,
    /// Parked in wait-for-SIPI (after INIT, or an AP before its first SIPI).
    pub waiting_for_sipi: bool,
    /// Its MTRRs, virtualized.
    pub mtrrs: Mtrrs,
    /// Its page-modification log, when the guest has PML.
    pub pml: pml::PmlBuffer,
}

impl Vcpu {
    /// A vCPU of `vm` with a VMCS region of its own, not yet loaded.
    pub fn new(vm: &Vm, id: VcpuId, platform: &mut impl Platform) -> Result<Self, VmError> {
        let pml = pml::PmlBuffer::new(vm, platform)?;
        let vmcs_region = match vmx::alloc_vmx_region(vm.vmcs_revision, platform) {
            Ok(region) => region,
            Err(e) => {
                pml.destroy(platform);
                return Err(VmError::Vmx(e));
            }
        };
        let bsp = if id == VcpuId::BSP {
            APIC_BASE_RESET
        } else {
            APIC_BASE_RESET & !(1 << 8)
        };
        Ok(Self {
            id,
            regs: GuestRegisters::default(),
            vmcs_region,
            launched: false,
            apic_base: bsp,
            ve_page: None,
            step: None,
            pending: events::Pending::default(),
            halted_ticks: 0,
            waiting_for_sipi: id != VcpuId::BSP,
            mtrrs: Mtrrs::default(),
            pml,
        })
    }

    /// Makes this vCPU's VMCS current on this CPU and writes all of it:
    /// controls, bitmaps, host state, and the guest's entry state. VMX must
    /// be on.
    pub fn load(&mut self, vm: &Vm, cpu: &mut impl Cpu) -> Result<(), VmxError> {
        cpu.load_vmcs(self.vmcs_region)?;
        self.write_vmcs(vm, cpu);
        if vm.controls.vpid {
            cpu.invvpid(GUEST_VPID);
        }
        Ok(())
    }

    fn write_vmcs(&mut self, vm: &Vm, vmcs: &mut impl Vmcs) {
        let c = &vm.controls;
        vmcs.write(control::PINBASED_EXEC_CONTROLS, u64::from(c.pin));
        vmcs.write(
            control::PRIMARY_PROCBASED_EXEC_CONTROLS,
            u64::from(c.primary),
        );
        vmcs.write(
            control::SECONDARY_PROCBASED_EXEC_CONTROLS,
            u64::from(c.secondary),
        );
        vmcs.write(control::VMEXIT_CONTROLS, u64::from(c.exit));
        vmcs.write(control::VMENTRY_CONTROLS, u64::from(c.entry));
        vmcs.write(control::PAGE_FAULT_ERR_CODE_MASK, 0);
        vmcs.write(control::PAGE_FAULT_ERR_CODE_MATCH, 0);
        vmcs.write(control::CR3_TARGET_COUNT, 0);
        vmcs.write(control::VMEXIT_MSR_STORE_COUNT, 0);
        vmcs.write(control::VMEXIT_MSR_LOAD_COUNT, 0);
        vmcs.write(control::VMENTRY_MSR_LOAD_COUNT, 0);
        let (msr_bitmap, io_bitmaps) = vm.bitmaps();
        vmcs.write(control::IO_BITMAP_A_ADDR_FULL, io_bitmaps);
        vmcs.write(control::IO_BITMAP_B_ADDR_FULL, io_bitmaps + 4096);
        vmcs.write(control::MSR_BITMAPS_ADDR_FULL, msr_bitmap);
        vmcs.write(control::EPTP_FULL, vm.p2m.eptp());
        self.pml.write_vmcs(vmcs);
        if c.vpid {
            vmcs.write(control::VPID, u64::from(GUEST_VPID));
        }
        vmx::write_host_state(vmcs, entry::exit_entry_address());
        if self.id == VcpuId::BSP {
            state::boot_entry(vmcs, &mut self.regs, &vm.cr_fixed, &vm.entry);
        } else {
            // An AP: the state of a processor after INIT, waiting for the
            // guest's SIPI (the VM-entry checks want valid state anyway).
            state::sipi_start(vmcs, &mut self.regs, &vm.cr_fixed, 0);
            state::wait_for_sipi(vmcs);
        }
        vmcs.write(
            guest::VMX_PREEMPTION_TIMER_VALUE,
            u64::from(vm.tick_period()),
        );
        views::apply(vmcs, vm, self);
    }

    /// Runs the guest on this vCPU until the guest ends or is stopped
    /// (by this vCPU or another). Its VMCS must be current on this CPU
    /// ([`Vcpu::load`]). The VM lock is taken for each exit's handling and
    /// for the checks before entry, never across a VM entry; what other
    /// CPUs must see while it runs goes through `smp::Coherence`.
    pub fn run(&mut self, machine: &spin::Mutex<Vm>, platform: &mut impl Platform) -> GuestEnd {
        let mut cpu = ThisCpu;
        let id = self.id.index();
        let (coherence, features) = {
            let vm = machine.lock();
            (vm.coherence, vm.features)
        };
        loop {
            {
                let mut vm = machine.lock();
                if let Some(end) = vm.end.clone() {
                    return end;
                }
                views::flush(&mut vm, &mut cpu, platform, id);
                if coherence.take_reapply(id) {
                    channel::take_notify(&mut vm, self);
                    views::apply(&mut cpu, &vm, self);
                }
                if vm.control.must_stop(id) {
                    drop(vm);
                    if let Some(end) = self.hold(machine, platform, &mut cpu) {
                        return end;
                    }
                    continue;
                }
                if self.waiting_for_sipi && vm.control.has_line() {
                    channel::parking(&mut vm, &mut cpu, self);
                }
            }
            // An NMI that reached the hypervisor while it ran is the
            // guest's, unless it was a kick.
            if platform.take_nmi() && !coherence.take_kick(id) {
                self.pending.nmi = true;
            }
            self.pending.deliver(&mut cpu);
            if self.waiting_for_sipi {
                coherence.park(id);
            } else {
                if let Some(epoch) = coherence.enter(id) {
                    cpu.invept(None);
                    coherence.flushed(id, epoch);
                }
                // Another vCPU switched this one's view since the check
                // above: write the fields first (`smp::request_reapply`).
                if coherence.must_reapply(id) {
                    coherence.back_out(id);
                    continue;
                }
            }
            // SAFETY: VMX is on and this vCPU's VMCS is current and complete
            // (`load`), with the host RIP of `entry::exit_entry_address`.
            let entered = unsafe { entry::enter(&mut self.regs, self.launched) };
            // Where a VMFUNC may have taken the hardware, published before
            // leaving guest mode (a view's destroyer checks it).
            let index = if entered == Entry::Exited {
                views::where_hardware_is(&features, &cpu)
            } else {
                u64::MAX
            };
            coherence.exit(id, index);
            let mut guard = machine.lock();
            let vm = &mut *guard;
            if entered != Entry::Exited {
                let end = self.entry_failed(entered, vm, &cpu, platform);
                return end_all(vm, id, end, platform);
            }
            self.launched = true;
            let exit = Exit::from_field(cpu.read(ro::EXIT_REASON) as u32);
            if let Some(count) = vm.counters.get_mut(usize::from(exit.reason.basic())) {
                *count += 1;
            }
            if exit.entry_failed {
                let why = EntryFailure::ExitReason(exit.reason.basic());
                let end = report_entry_failure(why, vm, &cpu, platform);
                return end_all(vm, id, end, platform);
            }
            let synced = views::sync(vm, self, index);
            let mut ctx = ExitCtx {
                cpu: &mut cpu,
                vcpu: self,
                vm,
                platform,
            };
            let flow = if synced.is_err() {
                Flow::Stop(ctx.report_stop(StopReason::Internal(
                    "the vCPU runs on a view altp2m never allowed",
                )))
            } else {
                exits::handle(exit.reason, &mut ctx)
            };
            if let Flow::Stop(end) = flow {
                return end_all(vm, id, end, platform);
            }
            // The tick is when a running vCPU looks at the control line.
            let serve = vm.control.has_line() && exit.reason == ExitReason::PreemptionTimer;
            drop(guard);
            if serve {
                channel::serve(machine, &mut cpu, platform, id);
            }
        }
    }

    /// Stays in the hypervisor while the control channel stops this vCPU
    /// (paused by the tool, or held by an event until its answer), serving
    /// the line meanwhile; the VM lock is free between rounds. Returns the
    /// guest's end if it ended meanwhile.
    fn hold(
        &mut self,
        machine: &spin::Mutex<Vm>,
        platform: &mut impl Platform,
        cpu: &mut ThisCpu,
    ) -> Option<GuestEnd> {
        let id = self.id.index();
        channel::stop(&mut machine.lock(), cpu, self);
        loop {
            channel::serve(machine, cpu, platform, id);
            {
                let mut vm = machine.lock();
                if let Some(end) = vm.end.clone() {
                    return Some(end);
                }
                if channel::resume(&mut vm, cpu, platform, self) {
                    return None;
                }
            }
            core::hint::spin_loop();
        }
    }

    fn entry_failed(
        &mut self,
        entered: Entry,
        vm: &mut Vm,
        cpu: &ThisCpu,
        platform: &mut impl Platform,
    ) -> GuestEnd {
        let why = match entered {
            Entry::FailValid => EntryFailure::InstructionError(cpu.read(ro::VM_INSTRUCTION_ERROR)),
            _ => EntryFailure::NoCurrentVmcs,
        };
        report_entry_failure(why, vm, cpu, platform)
    }

    /// Tears the vCPU down (VMCLEAR, frees its VMCS). It is never entered again.
    pub fn destroy(self, cpu: &mut impl Cpu, platform: &mut impl Platform) {
        cpu.clear_vmcs(self.vmcs_region);
        platform.free_frames(self.vmcs_region, 1);
        self.pml.destroy(platform);
    }
}

/// The guest ended on vCPU `id`: every other vCPU stops at its next exit,
/// and is made to exit now (a SIPI for one parked in wait-for-SIPI, which
/// blocks NMIs and INITs).
fn end_all(vm: &mut Vm, id: usize, end: GuestEnd, platform: &mut impl Platform) -> GuestEnd {
    if vm.end.is_none() {
        vm.end = Some(end.clone());
    }
    for other in (0..vm.vcpus()).filter(|&v| v != id) {
        let kick = if vm.coherence.parked(other) {
            Kick::Sipi
        } else {
            Kick::Nmi
        };
        platform.kick(other, kick);
    }
    end
}

fn report_entry_failure(
    why: EntryFailure,
    vm: &mut Vm,
    cpu: &impl Vmcs,
    platform: &mut impl Platform,
) -> GuestEnd {
    vm.devices.console.flush(platform);
    log::error!("vmx: VM entry failed: {why}");
    dump_guest_state(cpu, |line| log::error!("{line}"));
    GuestEnd::Stopped(StopReason::EntryFailed(why))
}
