//! Turning VMX on for this CPU (VMXON) and the host state every VMCS needs.

use core::fmt;

use hv_ept::Mfn;
use x86::vmx::vmcs::host;
use x86_64::registers::control::{Cr0, Cr3, Cr4};
use x86_64::registers::model_specific::Msr;

use crate::caps::{FeatureControl, VmxCaps};
use crate::platform::Platform;
use crate::vmcs::Vmcs;

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
pub fn alloc_vmx_region(caps: &VmxCaps, platform: &mut impl Platform) -> Result<Mfn, VmxError> {
    let frame = platform.alloc_frames(1, 1).ok_or(VmxError::NoMemory)?;
    platform.zero_frame(frame);
    platform.write_phys(frame.hpa(), &caps.revision_id().to_le_bytes());
    Ok(frame)
}

/// Enters VMX root operation: enables VMX in IA32_FEATURE_CONTROL (locking
/// it) if firmware left it open, sets CR0/CR4 to what VMX requires, VMXON.
pub fn enable(caps: &VmxCaps, platform: &mut impl Platform) -> Result<VmxOn, VmxError> {
    let mut feature_control = Msr::new(x86::msr::IA32_FEATURE_CONTROL);
    let fc = FeatureControl::from_bits_truncate(caps.msrs.feature_control);
    if !fc.contains(FeatureControl::LOCKED) {
        // SAFETY: the MSR exists (CPUID.VMX) and is unlocked; setting VMXON
        // outside SMX and the lock bit is the documented way to enable VMX.
        unsafe {
            feature_control.write(
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
        Cr0::write_raw(apply_fixed(Cr0::read_raw(), m.cr0_fixed0, m.cr0_fixed1));
        Cr4::write_raw(apply_fixed(
            Cr4::read_raw() | (1 << 13),
            m.cr4_fixed0,
            m.cr4_fixed1,
        ));
    }
    let region = alloc_vmx_region(caps, platform)?;
    // SAFETY: the region is a zeroed, page-aligned frame with the revision id,
    // owned by VMX operation until VMXOFF.
    if let Err(e) = unsafe { x86::bits64::vmx::vmxon(region.hpa()) } {
        platform.free_frames(region, 1);
        return Err(VmxError::Instruction("VMXON", e.into()));
    }
    Ok(VmxOn { region })
}

/// Leaves VMX operation (VMXOFF) and frees the VMXON region. No VMCS of
/// this CPU may be used afterwards.
pub fn disable(on: VmxOn, platform: &mut impl Platform) -> Result<(), VmxError> {
    // SAFETY: VMXOFF ends VMX root operation entered by `enable`; every VM
    // was destroyed (VMCLEARed) before, and nothing enters a guest after.
    unsafe { x86::bits64::vmx::vmxoff() }.map_err(|e| VmxError::Instruction("VMXOFF", e.into()))?;
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
    // SAFETY: STR only reads the task register.
    let tr = unsafe { x86::task::tr() }.bits();
    vmcs.write(host::CR0, Cr0::read_raw());
    vmcs.write(host::CR3, Cr3::read_raw().0.start_address().as_u64());
    vmcs.write(host::CR4, Cr4::read_raw());
    // Host selectors must have RPL 0 and TI 0 (SDM Vol. 3C "Checks on Host Segment Fields").
    vmcs.write(host::CS_SELECTOR, u64::from(CS::get_reg().0 & !7));
    vmcs.write(host::SS_SELECTOR, u64::from(SS::get_reg().0 & !7));
    vmcs.write(host::DS_SELECTOR, u64::from(DS::get_reg().0 & !7));
    vmcs.write(host::ES_SELECTOR, u64::from(ES::get_reg().0 & !7));
    vmcs.write(host::FS_SELECTOR, u64::from(FS::get_reg().0 & !7));
    vmcs.write(host::GS_SELECTOR, u64::from(GS::get_reg().0 & !7));
    vmcs.write(host::TR_SELECTOR, u64::from(tr & !7));
    vmcs.write(host::FS_BASE, Msr::new(x86::msr::IA32_FS_BASE).read_safe());
    vmcs.write(host::GS_BASE, Msr::new(x86::msr::IA32_GS_BASE).read_safe());
    vmcs.write(host::TR_BASE, tss_base(gdt.base.as_u64(), tr));
    vmcs.write(host::GDTR_BASE, gdt.base.as_u64());
    vmcs.write(host::IDTR_BASE, idt.base.as_u64());
    vmcs.write(host::IA32_SYSENTER_CS, 0);
    vmcs.write(host::IA32_SYSENTER_ESP, 0);
    vmcs.write(host::IA32_SYSENTER_EIP, 0);
    vmcs.write(
        host::IA32_EFER_FULL,
        Msr::new(x86::msr::IA32_EFER).read_safe(),
    );
    vmcs.write(
        host::IA32_PAT_FULL,
        Msr::new(x86::msr::IA32_PAT).read_safe(),
    );
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

/// Reading an architectural MSR that always exists.
trait ReadSafe {
    fn read_safe(&self) -> u64;
}

impl ReadSafe for Msr {
    fn read_safe(&self) -> u64 {
        // SAFETY: only used for FS/GS base, EFER and PAT, which every 64-bit CPU has.
        unsafe { self.read() }
    }
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
