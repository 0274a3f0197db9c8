//! The CPU's VMX and nothing else: its capabilities (`caps`), the VMX and
//! privileged instructions (`instructions`), VMCS fields and controls
//! (`vmcs`), decoded exit reasons (`exit`); turning VMX on for this CPU
//! (VMXON), the host state every VMCS needs, and [`Cpu`], the CPU as exit
//! handling sees it.

pub mod caps;
pub mod exit;
pub mod instructions;
pub mod vmcs;

use core::fmt;

use hv_ept::Mfn;
use x86::vmx::vmcs::host;

use crate::devices::ports::PortIo;
use crate::platform::Platform;
use caps::{FeatureControl, VmxCaps};
use vmcs::Vmcs;

/// The CPU a vCPU runs on, as exit handling needs it: its current VMCS and
/// the instructions handlers execute for the guest. [`ThisCpu`] is the real
/// one; host tests use a simulated CPU.
pub trait Cpu: Vmcs + PortIo {
    /// CPUID on the physical CPU: EAX, EBX, ECX, EDX.
    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4];

    /// INVEPT: single-context for `Some(eptp)`, all contexts for `None`.
    fn invept(&mut self, eptp: Option<u64>);

    /// INVVPID single-context: drops the guest's cached linear translations
    /// (after an emulated paging-mode change or a processor reset).
    fn invvpid(&mut self, vpid: u16);

    /// XSETBV (the guest's extended-state mask stays loaded: the hypervisor
    /// itself uses no extended state). Only values valid for this CPU.
    fn xsetbv(&mut self, index: u32, value: u64);

    /// The time-stamp counter, as the hypervisor reads it (no offset).
    fn rdtsc(&self) -> u64;

    /// Software-disables the local APIC of this CPU (the guest's: its
    /// APIC is passed through), for a guest that disabled it through
    /// IA32_APIC_BASE: SVR bit 8 clear masks every LVT entry.
    fn lapic_software_disable(&mut self);

    /// Sets CR2 (the guest's: the hypervisor takes no page faults) before
    /// a #PF is injected.
    fn write_cr2(&mut self, value: u64);

    /// The guest's CR2 (left in the register by VM exits).
    fn read_cr2(&self) -> u64;

    /// The guest's IA32_KERNEL_GS_BASE, which no VM transition switches
    /// (the hypervisor does not use SWAPGS).
    fn kernel_gs_base(&self) -> u64;
    fn set_kernel_gs_base(&mut self, value: u64);

    /// CR8, the local APIC's task priority (the guest's own: its APIC is
    /// passed through), for a CPU that cannot let MOV CR8 run natively.
    fn read_cr8(&self) -> u64;
    fn write_cr8(&mut self, value: u64);

    /// Makes the VMCS at `region` clear and current (VMCLEAR, VMPTRLD).
    fn load_vmcs(&mut self, region: Mfn) -> Result<(), VmxError>;

    /// VMCLEARs a VMCS that is no longer entered, before its frame is freed.
    fn clear_vmcs(&mut self, region: Mfn);

    /// Ends NMI blocking in root mode (an IRET to the next instruction).
    fn unblock_nmis(&mut self);
}

const IA32_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// The CPU this code runs on, with the VMCS made current by VMPTRLD.
pub struct ThisCpu;

impl Vmcs for ThisCpu {
    fn read(&self, field: u32) -> u64 {
        instructions::vmread(field).unwrap_or_else(|e| {
            log::error!("vmx: VMREAD {field:#x} failed: {e:?}");
            0
        })
    }

    fn write(&mut self, field: u32, value: u64) {
        if let Err(e) = instructions::vmwrite(field, value) {
            log::error!("vmx: VMWRITE {field:#x} = {value:#x} failed: {e:?}");
        }
    }
}

impl PortIo for ThisCpu {
    fn inb(&mut self, port: u16) -> u8 {
        instructions::inb(port)
    }

    fn outb(&mut self, port: u16, value: u8) {
        // SAFETY: only the filtered ports of `devices::ports` (the i8042,
        // port 0x92) are written, with their reset and A20 bits cleaned.
        unsafe { instructions::outb(port, value) }
    }
}

impl Cpu for ThisCpu {
    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        instructions::cpuid(leaf, subleaf)
    }

    fn invept(&mut self, eptp: Option<u64>) {
        let done = match eptp {
            Some(eptp) => instructions::invept(1, eptp),
            None => instructions::invept(2, 0),
        };
        if !done {
            log::error!("vmx: INVEPT {eptp:x?} refused by the CPU");
        }
    }

    fn invvpid(&mut self, vpid: u16) {
        if !instructions::invvpid_single(vpid) {
            log::error!("vmx: INVVPID {vpid} refused by the CPU");
        }
    }

    fn xsetbv(&mut self, index: u32, value: u64) {
        // SAFETY: the XSETBV handler passes only values valid on this CPU
        // (its rules and CPUID.0xD), and the kernel set CR4.OSXSAVE at boot.
        unsafe { instructions::xsetbv(index, value) }
    }

    fn rdtsc(&self) -> u64 {
        instructions::rdtsc()
    }

    fn read_cr2(&self) -> u64 {
        instructions::read_cr2()
    }

    fn kernel_gs_base(&self) -> u64 {
        // SAFETY: IA32_KERNEL_GS_BASE exists on every CPU with long mode.
        unsafe { instructions::rdmsr(IA32_KERNEL_GS_BASE) }
    }

    fn set_kernel_gs_base(&mut self, value: u64) {
        // SAFETY: the MSR exists (long mode); callers pass a canonical
        // address (`control::registers::check`), so WRMSR cannot fault; the
        // hypervisor itself never uses the value (no SWAPGS).
        unsafe { instructions::wrmsr(IA32_KERNEL_GS_BASE, value) }
    }

    fn lapic_software_disable(&mut self) {
        instructions::lapic_software_disable();
    }

    fn write_cr2(&mut self, value: u64) {
        instructions::write_cr2(value);
    }

    fn unblock_nmis(&mut self) {
        instructions::unblock_nmis();
    }

    fn read_cr8(&self) -> u64 {
        instructions::read_cr8()
    }

    fn write_cr8(&mut self, value: u64) {
        // SAFETY: the hypervisor runs with interrupts off and never uses the
        // task priority, so the guest's value cannot affect it.
        unsafe { instructions::write_cr8(value) }
    }

    fn load_vmcs(&mut self, region: Mfn) -> Result<(), VmxError> {
        let pa = region.hpa();
        // SAFETY: the region is a VMCS (zeroed frame with the revision id)
        // that its vCPU owns and that is current on no other CPU.
        unsafe {
            instructions::vmclear(pa).map_err(|e| VmxError::Instruction("VMCLEAR", e))?;
            instructions::vmptrld(pa).map_err(|e| VmxError::Instruction("VMPTRLD", e))?;
        }
        Ok(())
    }

    fn clear_vmcs(&mut self, region: Mfn) {
        // SAFETY: VMCLEAR of a vCPU's own region, which no CPU enters any more.
        if let Err(e) = unsafe { instructions::vmclear(region.hpa()) } {
            log::error!("vmx: VMCLEAR failed: {e:?}");
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmxError {
    /// Firmware locked IA32_FEATURE_CONTROL with VMX off.
    DisabledByFirmware,
    NoMemory,
    /// A VMX instruction failed: which one, and whether the CPU had a
    /// current VMCS to report the error in (VMfailValid).
    Instruction(&'static str, Fail),
}

impl fmt::Display for VmxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::DisabledByFirmware => {
                f.write_str("VMX is disabled by firmware (IA32_FEATURE_CONTROL)")
            }
            Self::NoMemory => f.write_str("out of frames for VMX structures"),
            Self::Instruction(which, Fail::Valid) => write!(f, "{which} failed (VMfailValid)"),
            Self::Instruction(which, Fail::Invalid) => write!(f, "{which} failed (VMfailInvalid)"),
        }
    }
}

/// How a VMX instruction failed (SDM Vol. 3C "Conventions").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fail {
    Valid,
    Invalid,
}

impl From<x86::vmx::VmFail> for Fail {
    fn from(fail: x86::vmx::VmFail) -> Self {
        match fail {
            x86::vmx::VmFail::VmFailValid => Self::Valid,
            x86::vmx::VmFail::VmFailInvalid => Self::Invalid,
        }
    }
}

/// Applies the VMX fixed-bit MSRs to a CR0 or CR4 value (SDM Vol. 3D A.7/A.8).
pub const fn apply_fixed(value: u64, fixed0: u64, fixed1: u64) -> u64 {
    (value | fixed0) & fixed1
}

/// VMX operation on this CPU; the VMXON region stays allocated while it lasts.
pub struct VmxOn {
    pub region: Mfn,
}

/// A VMXON region or VMCS: a zeroed frame starting with the revision id.
pub fn alloc_vmx_region(revision: u32, platform: &mut impl Platform) -> Result<Mfn, VmxError> {
    let frame = platform.alloc_frames(1, 1).ok_or(VmxError::NoMemory)?;
    platform.zero_frame(frame);
    platform.write_phys(frame.hpa(), &revision.to_le_bytes());
    Ok(frame)
}

/// Enters VMX root operation: enables VMX in IA32_FEATURE_CONTROL (locking
/// it) if firmware left it open, sets CR0/CR4 to what VMX requires, VMXON.
pub fn enable(caps: &VmxCaps, platform: &mut impl Platform) -> Result<VmxOn, VmxError> {
    let fc = FeatureControl::from_bits_truncate(caps.msrs.feature_control);
    if !fc.contains(FeatureControl::LOCKED) {
        // SAFETY: the MSR exists (CPUID.VMX) and is unlocked; setting VMXON
        // outside SMX and the lock bit is the documented way to enable VMX.
        unsafe {
            instructions::wrmsr(
                x86::msr::IA32_FEATURE_CONTROL,
                caps.msrs.feature_control
                    | (FeatureControl::LOCKED | FeatureControl::VMXON_OUTSIDE_SMX).bits(),
            )
        };
    } else if !fc.contains(FeatureControl::VMXON_OUTSIDE_SMX) {
        return Err(VmxError::DisabledByFirmware);
    }
    let m = &caps.msrs;
    // SAFETY: the fixed bits only force what VMX operation requires (PE, PG,
    // NE in CR0; VMXE in CR4), all of which the hypervisor already runs with
    // or tolerates.
    unsafe {
        instructions::write_cr0_cr4(
            apply_fixed(instructions::read_cr0(), m.cr0_fixed0, m.cr0_fixed1),
            apply_fixed(
                instructions::read_cr4() | (1 << 13),
                m.cr4_fixed0,
                m.cr4_fixed1,
            ),
        )
    }
    let region = alloc_vmx_region(caps.revision_id(), platform)?;
    // SAFETY: the region is a zeroed, page-aligned frame with the revision id,
    // owned by VMX operation until VMXOFF.
    if let Err(e) = unsafe { instructions::vmxon(region.hpa()) } {
        platform.free_frames(region, 1);
        return Err(VmxError::Instruction("VMXON", e));
    }
    Ok(VmxOn { region })
}

/// Leaves VMX operation (VMXOFF) and frees the VMXON region. No VMCS of
/// this CPU may be used afterwards.
pub fn disable(on: VmxOn, platform: &mut impl Platform) -> Result<(), VmxError> {
    // SAFETY: VMXOFF ends VMX root operation entered by `enable`; every VM
    // was destroyed (VMCLEARed) before, and nothing enters a guest after.
    unsafe { instructions::vmxoff() }.map_err(|e| VmxError::Instruction("VMXOFF", e))?;
    platform.free_frames(on.region, 1);
    Ok(())
}

/// The host half of a VMCS: this CPU's current control registers, segments,
/// descriptor tables and EFER/PAT, and `exit_rip` as the VM-exit entry point.
/// (Host RSP is written at each entry.)
pub fn write_host_state(vmcs: &mut impl Vmcs, exit_rip: u64) {
    use x86_64::instructions::segmentation::{CS, DS, ES, FS, GS, SS, Segment};
    let gdt = x86_64::instructions::tables::sgdt();
    let idt = x86_64::instructions::tables::sidt();
    let tr = instructions::task_register();
    vmcs.write(host::CR0, instructions::read_cr0());
    vmcs.write(host::CR3, instructions::read_cr3());
    vmcs.write(host::CR4, instructions::read_cr4());
    // Host selectors must have RPL 0 and TI 0 (SDM Vol. 3C "Checks on Host Segment Fields").
    vmcs.write(host::CS_SELECTOR, u64::from(CS::get_reg().0 & !7));
    vmcs.write(host::SS_SELECTOR, u64::from(SS::get_reg().0 & !7));
    vmcs.write(host::DS_SELECTOR, u64::from(DS::get_reg().0 & !7));
    vmcs.write(host::ES_SELECTOR, u64::from(ES::get_reg().0 & !7));
    vmcs.write(host::FS_SELECTOR, u64::from(FS::get_reg().0 & !7));
    vmcs.write(host::GS_SELECTOR, u64::from(GS::get_reg().0 & !7));
    vmcs.write(host::TR_SELECTOR, u64::from(tr & !7));
    vmcs.write(host::FS_BASE, read_architectural(x86::msr::IA32_FS_BASE));
    vmcs.write(host::GS_BASE, read_architectural(x86::msr::IA32_GS_BASE));
    vmcs.write(host::TR_BASE, tss_base(gdt.base.as_u64(), tr));
    vmcs.write(host::GDTR_BASE, gdt.base.as_u64());
    vmcs.write(host::IDTR_BASE, idt.base.as_u64());
    vmcs.write(host::IA32_SYSENTER_CS, 0);
    vmcs.write(host::IA32_SYSENTER_ESP, 0);
    vmcs.write(host::IA32_SYSENTER_EIP, 0);
    vmcs.write(
        host::IA32_EFER_FULL,
        read_architectural(x86::msr::IA32_EFER),
    );
    vmcs.write(host::IA32_PAT_FULL, read_architectural(x86::msr::IA32_PAT));
    vmcs.write(host::RIP, exit_rip);
}

/// Base address of the 64-bit TSS descriptor for `selector` in the GDT at `gdt_base`.
fn tss_base(gdt_base: u64, selector: u16) -> u64 {
    let at = gdt_base + u64::from(selector & !7);
    // SAFETY: the selector is the loaded TR, so its 16-byte descriptor lies
    // inside the loaded GDT, which is mapped.
    let (low, high) = unsafe {
        (
            core::ptr::read(at as *const u64),
            core::ptr::read((at + 8) as *const u64),
        )
    };
    (low >> 16 & 0xff_ffff) | (low >> 56 & 0xff) << 24 | (high & 0xffff_ffff) << 32
}

/// Reads an architectural MSR that every 64-bit CPU has.
fn read_architectural(msr: u32) -> u64 {
    // SAFETY: only used for FS/GS base, EFER and PAT, which every 64-bit CPU has.
    unsafe { instructions::rdmsr(msr) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_bits_force_required_and_clear_forbidden() {
        // Typical CR0 fixed MSRs: PE, NE, PG must be 1; everything may be 1.
        assert_eq!(apply_fixed(0x11, 0x8000_0021, 0xffff_ffff), 0x8000_0031);
        assert_eq!(apply_fixed(0x1_0000_0000, 0, 0xffff_ffff), 0);
    }
}
