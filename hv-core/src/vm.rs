//! A virtual machine: one guest with one vCPU, its VMCS and bitmaps, and
//! the loop that enters the guest and dispatches its VM exits.

use alloc::format;
use alloc::string::String;

use hv_ept::{EptCaps, Mfn};
use x86::vmx::vmcs::{control, ro};

use crate::caps::VmxCaps;
use crate::cr;
use crate::exit_reason::{self, ENTRY_FAILURE_BIT, NUM_REASONS};
use crate::exits::{self, ExitCtx, Flow, GuestEnd, PASS_READ_ONLY, PASS_WRITE, StopReason};
use crate::guest::{Features, Guest, GuestConfig, GuestError};
use crate::platform::Platform;
use crate::vcpu::{self, Entry, GUEST_VPID, GuestRegisters};
use crate::vmcs::{
    Controls, CurrentVmcs, MissingFeature, Vmcs, Wants, dump_guest_state, msr_bitmap,
};
use crate::vmx::{self, VmxError};
use crate::{state, views};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmError {
    Missing(MissingFeature),
    Guest(GuestError),
    Vmx(VmxError),
}

impl core::fmt::Display for VmError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Missing(m) => write!(f, "{m}"),
            Self::Guest(e) => write!(f, "{e}"),
            Self::Vmx(e) => write!(f, "{e}"),
        }
    }
}

pub struct Vm {
    pub guest: Guest,
    pub regs: GuestRegisters,
    vmcs_region: Mfn,
    msr_bitmap: Mfn,
    /// I/O bitmaps A and B (two frames).
    io_bitmaps: Mfn,
    launched: bool,
    eptp: u64,
}

/// The physical-address width (CPUID 0x80000008 EAX[7:0]).
pub fn physical_address_bits(platform: &impl Platform) -> u8 {
    let [max, ..] = platform.cpuid(0x8000_0000, 0);
    if max >= 0x8000_0008 {
        platform.cpuid(0x8000_0008, 0)[0] as u8
    } else {
        36
    }
}

impl Vm {
    /// Builds the guest and its VMCS and makes the VMCS current. VMX must be on.
    /// On failure every frame taken is given back.
    pub fn create(
        caps: &VmxCaps,
        config: &GuestConfig<'_>,
        wants: Wants,
        platform: &mut impl Platform,
    ) -> Result<Self, VmError> {
        let save_timer = caps
            .exit()
            .allows(x86::vmx::vmcs::control::ExitControls::SAVE_VMX_PREEMPTION_TIMER.bits());
        let features = Features {
            vmfunc: caps.eptp_switching() && caps.ept_violation_ve(),
            ve: caps.ept_violation_ve(),
            // The tick needs the timer value saved across exits.
            tick: caps.preemption_timer() && save_timer,
            mtf: caps
                .procbased()
                .allows(x86::vmx::vmcs::control::PrimaryControls::MONITOR_TRAP_FLAG.bits()),
            vpid: false,
            wait_for_sipi: caps.msrs.misc & 1 << 8 != 0,
        };
        let wants = Wants {
            preemption_timer: wants.preemption_timer || features.tick,
            vm_functions: wants.vm_functions || features.vmfunc,
            virtualization_exceptions: wants.virtualization_exceptions || features.ve,
        };
        let controls = Controls::compute(caps, wants).map_err(VmError::Missing)?;
        let features = Features {
            vpid: controls.vpid,
            ..features
        };
        let ept_caps = EptCaps::from_msr(caps.msrs.ept_vpid_cap, physical_address_bits(platform));
        let m = &caps.msrs;
        let fixed = cr::Fixed {
            cr0_fixed0: m.cr0_fixed0,
            cr0_fixed1: m.cr0_fixed1,
            cr4_fixed0: m.cr4_fixed0,
            cr4_fixed1: m.cr4_fixed1,
        };
        let guest =
            Guest::create(config, ept_caps, fixed, features, platform).map_err(VmError::Guest)?;
        let frames = (platform.alloc_frames(1, 1), platform.alloc_frames(2, 1));
        let (Some(msr_frame), Some(io_frames)) = frames else {
            if let Some(f) = frames.0 {
                platform.free_frames(f, 1);
            }
            if let Some(f) = frames.1 {
                platform.free_frames(f, 2);
            }
            guest.destroy(platform);
            return Err(VmError::Guest(GuestError::NoMemory));
        };
        platform.write_phys(
            msr_frame.hpa(),
            &msr_bitmap(PASS_WRITE.iter().chain(PASS_READ_ONLY), PASS_WRITE),
        );
        let all_ones = [0xffu8; 4096];
        platform.write_phys(io_frames.hpa(), &all_ones);
        platform.write_phys(io_frames.hpa() + 4096, &all_ones);
        let vmcs_region = match vmx::alloc_vmx_region(caps, platform) {
            Ok(region) => region,
            Err(e) => {
                platform.free_frames(msr_frame, 1);
                platform.free_frames(io_frames, 2);
                guest.destroy(platform);
                return Err(VmError::Vmx(e));
            }
        };
        let eptp = guest.p2m.eptp();
        let mut vm = Vm {
            guest,
            regs: GuestRegisters::default(),
            vmcs_region,
            msr_bitmap: msr_frame,
            io_bitmaps: io_frames,
            launched: false,
            eptp,
        };
        if let Err(e) = vm.load_vmcs() {
            vm.destroy(platform);
            return Err(VmError::Vmx(e));
        }
        vm.write_vmcs(&controls, &mut CurrentVmcs);
        if controls.vpid {
            platform.invvpid(GUEST_VPID);
        }
        Ok(vm)
    }

    fn load_vmcs(&self) -> Result<(), VmxError> {
        let pa = self.vmcs_region.hpa();
        // SAFETY: the region is a zeroed frame with the revision id, owned by this VM.
        unsafe {
            x86::bits64::vmx::vmclear(pa)
                .map_err(|e| VmxError::Instruction("VMCLEAR", e.into()))?;
            x86::bits64::vmx::vmptrld(pa)
                .map_err(|e| VmxError::Instruction("VMPTRLD", e.into()))?;
        }
        Ok(())
    }

    fn write_vmcs(&mut self, c: &Controls, vmcs: &mut impl Vmcs) {
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
        vmcs.write(control::IO_BITMAP_A_ADDR_FULL, self.io_bitmaps.hpa());
        vmcs.write(control::IO_BITMAP_B_ADDR_FULL, self.io_bitmaps.hpa() + 4096);
        vmcs.write(control::MSR_BITMAPS_ADDR_FULL, self.msr_bitmap.hpa());
        vmcs.write(control::EPTP_FULL, self.eptp);
        if c.vpid {
            vmcs.write(control::VPID, u64::from(GUEST_VPID));
        }
        vmx::write_host_state(vmcs, vcpu::exit_entry_address());
        let g = &self.guest;
        let info = u32::try_from(g.boot_info).unwrap_or(0);
        state::multiboot_entry(
            vmcs,
            &mut self.regs,
            &g.cr_fixed,
            g.entry,
            g.protocol.magic(),
            info,
        );
        if let Some(period) = g.tick_period {
            vmcs.write(
                x86::vmx::vmcs::guest::VMX_PREEMPTION_TIMER_VALUE,
                u64::from(period),
            );
        }
        views::apply(vmcs, &self.guest);
    }

    /// Runs the guest until it exits or is stopped.
    pub fn run(&mut self, platform: &mut impl Platform) -> GuestEnd {
        let mut vmcs = CurrentVmcs;
        loop {
            views::flush(&mut self.guest, platform);
            // SAFETY: VMX is on and this VM's VMCS is current and complete
            // (`create`), with the host RIP of `vcpu::exit_entry_address`.
            let entry = unsafe { vcpu::enter(&mut self.regs, self.launched) };
            if entry != Entry::Exited {
                return self.entry_failed(entry, &vmcs, platform);
            }
            self.launched = true;
            let reason = vmcs.read(ro::EXIT_REASON) as u32;
            let basic = (reason & 0xffff) as u16;
            if let Some(count) = self.guest.counters.get_mut(usize::from(basic)) {
                *count += 1;
            }
            if reason & ENTRY_FAILURE_BIT != 0 {
                let why = format!("exit reason {} ({})", basic, exit_reason::name(basic));
                return self.report_entry_failure(why, &vmcs, platform);
            }
            if views::sync(&vmcs, &mut self.guest).is_err() {
                let mut ctx = ExitCtx {
                    vmcs: &mut vmcs,
                    regs: &mut self.regs,
                    guest: &mut self.guest,
                    platform,
                };
                return ctx.report_stop(StopReason::Internal(
                    "the vCPU runs on a view altp2m never allowed",
                ));
            }
            let mut ctx = ExitCtx {
                vmcs: &mut vmcs,
                regs: &mut self.regs,
                guest: &mut self.guest,
                platform,
            };
            if let Flow::Stop(end) = exits::handle(basic, &mut ctx) {
                return end;
            }
        }
    }

    fn entry_failed(
        &mut self,
        entry: Entry,
        vmcs: &CurrentVmcs,
        platform: &mut impl Platform,
    ) -> GuestEnd {
        let why = match entry {
            Entry::FailValid => {
                let number = vmcs.read(ro::VM_INSTRUCTION_ERROR);
                format!(
                    "VM-instruction error {number}: {}",
                    exit_reason::instruction_error(number)
                )
            }
            _ => String::from("VMfailInvalid (no current VMCS)"),
        };
        self.report_entry_failure(why, vmcs, platform)
    }

    fn report_entry_failure(
        &mut self,
        why: String,
        vmcs: &CurrentVmcs,
        platform: &mut impl Platform,
    ) -> GuestEnd {
        self.guest.console.flush(platform);
        log::error!("vmx: VM entry failed: {why}");
        let mut dump = String::new();
        let _ = dump_guest_state(vmcs, &mut dump);
        for line in dump.lines() {
            log::error!("{line}");
        }
        GuestEnd::Stopped(StopReason::EntryFailed(why))
    }

    /// Exit counters by basic reason.
    pub fn counters(&self) -> &[u64; NUM_REASONS] {
        &self.guest.counters
    }

    /// Tears the VM down and gives every frame back. Cached EPT translations
    /// of its tables are flushed first, so the frames can be reused safely.
    pub fn destroy(self, platform: &mut impl Platform) {
        // SAFETY: VMCLEAR of this VM's own region, which is no longer entered.
        let _ = unsafe { x86::bits64::vmx::vmclear(self.vmcs_region.hpa()) };
        // Views and host: every EPTP this guest ever used.
        platform.invept(None);
        platform.free_frames(self.vmcs_region, 1);
        platform.free_frames(self.msr_bitmap, 1);
        platform.free_frames(self.io_bitmaps, 2);
        self.guest.destroy(platform);
    }
}

/// INVEPT of type `kind` (1: single context `eptp`, 2: all contexts);
/// x86 0.52 has no wrapper. Returns false if the CPU refused it.
pub fn invept(kind: u64, eptp: u64) -> bool {
    let descriptor: [u64; 2] = [eptp, 0];
    let failed: u8;
    // SAFETY: INVEPT only drops cached translations; both types are required
    // by `Controls::compute`, and the descriptor is a 16-byte memory operand.
    unsafe {
        core::arch::asm!(
            "invept {kind}, [{desc}]",
            "setbe {failed}",
            kind = in(reg) kind,
            desc = in(reg) descriptor.as_ptr(),
            failed = out(reg_byte) failed,
            options(nostack),
        );
    }
    failed == 0
}

/// INVVPID single-context for `vpid`; x86 0.52 has no wrapper. Returns
/// false if the CPU refused it.
pub fn invvpid_single(vpid: u16) -> bool {
    let descriptor: [u64; 2] = [u64::from(vpid), 0];
    let failed: u8;
    // SAFETY: INVVPID only drops cached translations; single-context is
    // required whenever VPID is used (`Controls::compute`).
    unsafe {
        core::arch::asm!(
            "invvpid {kind}, [{desc}]",
            "setbe {failed}",
            kind = in(reg) 1u64,
            desc = in(reg) descriptor.as_ptr(),
            failed = out(reg_byte) failed,
            options(nostack),
        );
    }
    failed == 0
}
