//! RDMSR/WRMSR. The MSR bitmap lets the guest reach its own state directly:
//! segment bases, SYSENTER, EFER and PAT (which VM entry and exit switch),
//! and the SYSCALL MSRs, KERNEL_GS_BASE and TSC_AUX (which nothing switches:
//! the hypervisor uses no SYSCALL, SWAPGS or RDTSCP, so the guest's values
//! may stay in the CPU). Everything else exits here: IA32_APIC_BASE (the
//! guest can never move or disable the physical local APIC, nor enable
//! x2APIC), the MTRRs (virtualized per vCPU), TSC writes (a TSC offset),
//! and the few model-specific MSRs an OS reads unconditionally. Unknown MSRs
//! raise #GP, as on hardware that lacks them; CPUID advertises no feature
//! whose MSRs are not handled (a test holds the two together).

use x86::msr::*;

use hv_ept::Gfn;
use x86::vmx::vmcs::control;

use super::{ExitCtx, Flow, StopReason};
use crate::devices::mtrr::{self, Mtrrs};
use crate::platform::Platform;
use crate::vcpu::events::advance_rip;
use crate::vmx::Cpu;

/// MSRs the guest reads and writes without exits.
pub const PASS_WRITE: &[u32] = &[
    IA32_FS_BASE,
    IA32_GS_BASE,
    IA32_KERNEL_GSBASE,
    IA32_STAR,
    IA32_LSTAR,
    IA32_CSTAR,
    IA32_FMASK,
    IA32_TSC_AUX,
    IA32_SYSENTER_CS,
    IA32_SYSENTER_ESP,
    IA32_SYSENTER_EIP,
    IA32_EFER,
    IA32_PAT,
];

/// MSRs the guest reads without exits, besides [`PASS_WRITE`] (writes
/// exit). RDMSR of the TSC adds the vCPU's TSC offset, as RDTSC does.
pub const PASS_READ_ONLY: &[u32] = &[IA32_TIME_STAMP_COUNTER];

const FEATURE_CONTROL_LOCKED: u64 = 1;
const APIC_BASE_BSP: u64 = 1 << 8;
const APIC_BASE_X2APIC: u64 = 1 << 10;
pub const APIC_BASE_ENABLE: u64 = 1 << 11;
/// IA32_MISC_ENABLE as guests read it: fast strings on, branch trace
/// storage and PEBS unavailable (DS is hidden), nothing else (no thermal
/// control, no MONITOR, no limit on CPUID).
const MISC_ENABLE: u64 = 1 | 1 << 11 | 1 << 12;

/// Whether the guest can read `msr` at all: passed through, or emulated
/// here. Any other raises #GP, as on hardware that lacks it. The CPUID
/// check (`exits::cpuid`) holds every advertised feature's MSRs against it.
#[cfg(test)]
pub fn handled(msr: u32) -> bool {
    PASS_WRITE.contains(&msr)
        || PASS_READ_ONLY.contains(&msr)
        || emulated_read(msr, 0, &Mtrrs::default()).is_some()
}

/// What an intercepted RDMSR returns, or `None` for #GP.
fn emulated_read(msr: u32, apic_base: u64, mtrrs: &Mtrrs) -> Option<u64> {
    match msr {
        IA32_APIC_BASE => Some(apic_base),
        // Locked with VMX off: guests get no nested VMX.
        IA32_FEATURE_CONTROL => Some(FEATURE_CONTROL_LOCKED),
        // No microcode update signature, no platform id: a virtual CPU.
        IA32_BIOS_SIGN_ID | IA32_PLATFORM_ID => Some(0),
        IA32_MISC_ENABLE => Some(MISC_ENABLE),
        IA32_DEBUGCTL => Some(0),
        m if mtrr::is_mtrr(m) => mtrrs.read(m),
        _ => None,
    }
}

/// The new IA32_APIC_BASE after a guest write, or `None` for #GP: reserved
/// bits (0-7, 9, above the physical-address width) and x2APIC mode (not
/// offered) are refused; the BSP flag is read-only.
pub fn apic_base_write(old: u64, value: u64, paddr_bits: u8) -> Option<u64> {
    let reserved = 0xff | 1 << 9 | !((1u64 << paddr_bits) - 1);
    if value & (reserved | APIC_BASE_X2APIC) != 0 {
        return None;
    }
    Some(value & !APIC_BASE_BSP | old & APIC_BASE_BSP)
}

pub fn read<C: Cpu, P: Platform>(ctx: &mut ExitCtx<'_, C, P>) -> Flow {
    let msr = ctx.vcpu.regs.rcx as u32;
    match emulated_read(msr, ctx.vcpu.apic_base, &ctx.vcpu.mtrrs) {
        Some(value) => {
            ctx.vcpu.regs.set_edx_eax(value);
            advance_rip(ctx.cpu);
            Flow::Resume
        }
        None => {
            log::debug!("guest: RDMSR {msr:#x}: no such MSR for guests (#GP)");
            ctx.general_protection()
        }
    }
}

pub fn write<C: Cpu, P: Platform>(ctx: &mut ExitCtx<'_, C, P>) -> Flow {
    let msr = ctx.vcpu.regs.rcx as u32;
    let value = ctx.vcpu.regs.edx_eax();
    let paddr_bits = ctx.vm.p2m.caps().paddr_bits;
    let accepted = match msr {
        IA32_APIC_BASE => match apic_base_write(ctx.vcpu.apic_base, value, paddr_bits) {
            Some(new) => return apic_base(ctx, new),
            None => false,
        },
        IA32_TIME_STAMP_COUNTER => {
            // The guest's TSC becomes `value` now: an offset from the
            // CPU's, applied by RDTSC, RDTSCP and RDMSR alike.
            let offset = value.wrapping_sub(ctx.cpu.rdtsc());
            ctx.cpu.write(control::TSC_OFFSET_FULL, offset);
            true
        }
        // No microcode loading, no model-specific feature changes.
        IA32_BIOS_SIGN_ID | IA32_MISC_ENABLE => true,
        IA32_DEBUGCTL => value == 0,
        m if mtrr::is_mtrr(m) => ctx.vcpu.mtrrs.write(m, value, paddr_bits).is_some(),
        _ => false,
    };
    if !accepted {
        log::debug!("guest: WRMSR {msr:#x} = {value:#x} refused (#GP)");
        return ctx.general_protection();
    }
    advance_rip(ctx.cpu);
    Flow::Resume
}

/// A new IA32_APIC_BASE: the local APIC page moves in the guest's
/// physical address space (the physical APIC never moves), and a disabled
/// APIC delivers no interrupts and no longer answers at its base.
fn apic_base<C: Cpu, P: Platform>(ctx: &mut ExitCtx<'_, C, P>, new: u64) -> Flow {
    let old = ctx.vcpu.apic_base;
    let page = |base: u64| (Gfn(base >> 12), base & APIC_BASE_ENABLE != 0);
    let moved = ctx.vm.apic_page_moved(ctx.platform, page(old), page(new));
    if moved.is_err() {
        return ctx.stop(StopReason::Internal(
            "out of memory moving the local APIC page",
        ));
    }
    let enabled = |v: u64| v & APIC_BASE_ENABLE != 0;
    if enabled(new) != enabled(old) {
        if !enabled(new) {
            // Software-disable the APIC the guest owns: every LVT masked, no
            // interrupt delivered, as after a hardware disable; it comes back
            // in that state (SVR bit 8 clear), like an APIC after reset.
            ctx.cpu.lapic_software_disable();
        }
        let state = if enabled(new) { "enabled" } else { "disabled" };
        log::info!("guest: local APIC {state} (the physical APIC stays where it is)");
    }
    ctx.vcpu.apic_base = new;
    advance_rip(ctx.cpu);
    Flow::Resume
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apic_base_can_be_disabled_and_re_enabled_but_not_moved_to_x2apic() {
        use crate::vcpu::APIC_BASE_RESET;
        let disabled = apic_base_write(APIC_BASE_RESET, 0xfee0_0000, 39).unwrap();
        assert_eq!(disabled & APIC_BASE_ENABLE, 0);
        assert_eq!(
            disabled & APIC_BASE_BSP,
            APIC_BASE_BSP,
            "BSP flag is read-only"
        );
        let ap = apic_base_write(0xfee0_0800, 0xfee0_0900, 39).unwrap();
        assert_eq!(ap & APIC_BASE_BSP, 0, "an AP stays an AP");
        let enabled = apic_base_write(disabled, 0xfee0_0000 | APIC_BASE_ENABLE, 39).unwrap();
        assert_eq!(enabled, APIC_BASE_RESET);
        let old = APIC_BASE_RESET;
        assert_eq!(apic_base_write(old, old | APIC_BASE_X2APIC, 39), None);
        assert_eq!(apic_base_write(old, old | 1, 39), None);
        assert_eq!(
            apic_base_write(old, 1 << 45, 39),
            None,
            "above the physical-address width"
        );
    }

    #[test]
    fn passthrough_lists_leave_the_apic_base_intercepted() {
        let passed = |m: &u32| PASS_READ_ONLY.contains(m) || PASS_WRITE.contains(m);
        assert!(!passed(&IA32_APIC_BASE));
        assert!(
            (0x800..0x900).all(|m| !passed(&m)),
            "x2APIC MSRs always exit"
        );
    }
}
