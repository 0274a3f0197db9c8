//! RDMSR/WRMSR. The MSR bitmap lets the guest reach its own state directly:
//! segment bases, SYSENTER, EFER and PAT (which VM entry and exit switch),
//! and the SYSCALL MSRs, KERNEL_GS_BASE and TSC_AUX (which nothing switches:
//! the hypervisor uses no SYSCALL, SWAPGS or RDTSCP, so the guest's values
//! may stay in the CPU). Everything else exits here. The guest can never
//! touch the physical local APIC's base or enable x2APIC: IA32_APIC_BASE is
//! emulated. Unknown MSRs raise #GP, as on hardware that lacks them.

use x86::msr::*;

use super::{ExitCtx, Flow};
use crate::platform::Platform;
use crate::vcpu::APIC_BASE_RESET;
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

/// MSRs the guest reads without exits, besides [`PASS_WRITE`] (writes exit).
pub const PASS_READ_ONLY: &[u32] = &[
    IA32_TIME_STAMP_COUNTER,
    IA32_MTRRCAP,
    IA32_MTRR_DEF_TYPE,
    IA32_MISC_ENABLE,
];

const FEATURE_CONTROL_LOCKED: u64 = 1;
const APIC_BASE_BSP: u64 = 1 << 8;
const APIC_BASE_X2APIC: u64 = 1 << 10;
const APIC_BASE_ENABLE: u64 = 1 << 11;
/// Writes to these exit but are dropped: the guest may not reprogram them.
const IGNORED_WRITES: &[u32] = &[
    IA32_TIME_STAMP_COUNTER,
    IA32_MTRR_DEF_TYPE,
    IA32_MISC_ENABLE,
    IA32_BIOS_SIGN_ID,
];

/// What an intercepted RDMSR returns, or `None` for #GP.
fn emulated_read(msr: u32, apic_base: u64) -> Option<u64> {
    match msr {
        IA32_APIC_BASE => Some(apic_base),
        // Locked with VMX off: guests get no nested VMX.
        IA32_FEATURE_CONTROL => Some(FEATURE_CONTROL_LOCKED),
        IA32_BIOS_SIGN_ID => Some(0),
        _ => None,
    }
}

/// The new IA32_APIC_BASE after a guest write, or `None` for #GP: reserved
/// bits (0-7, 9, above the physical-address width) and x2APIC mode (not
/// offered) are refused; the BSP flag is read-only.
pub fn apic_base_write(value: u64, paddr_bits: u8) -> Option<u64> {
    let reserved = 0xff | 1 << 9 | !((1u64 << paddr_bits) - 1);
    if value & (reserved | APIC_BASE_X2APIC) != 0 {
        return None;
    }
    Some(value & !APIC_BASE_BSP | APIC_BASE_RESET & APIC_BASE_BSP)
}

pub fn read<C: Cpu, P: Platform>(ctx: &mut ExitCtx<'_, C, P>) -> Flow {
    let msr = ctx.vcpu.regs.rcx as u32;
    match emulated_read(msr, ctx.vcpu.apic_base) {
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
    let accepted = match msr {
        IA32_APIC_BASE => match apic_base_write(value, ctx.vm.p2m.caps().paddr_bits) {
            Some(new) => {
                let enabled = |v: u64| v & APIC_BASE_ENABLE != 0;
                if enabled(new) != enabled(ctx.vcpu.apic_base) {
                    let state = if enabled(new) { "enabled" } else { "disabled" };
                    log::info!(
                        "guest: virtual local APIC {state} (the physical APIC is untouched)"
                    );
                }
                ctx.vcpu.apic_base = new;
                true
            }
            None => false,
        },
        m if IGNORED_WRITES.contains(&m) => {
            log::debug!("guest: WRMSR {m:#x} = {value:#x} ignored");
            true
        }
        _ => false,
    };
    if !accepted {
        log::debug!("guest: WRMSR {msr:#x} = {value:#x} refused (#GP)");
        return ctx.general_protection();
    }
    advance_rip(ctx.cpu);
    Flow::Resume
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apic_base_can_be_disabled_and_re_enabled_but_not_moved_to_x2apic() {
        let disabled = apic_base_write(0xfee0_0000, 39).unwrap();
        assert_eq!(disabled & APIC_BASE_ENABLE, 0);
        assert_eq!(
            disabled & APIC_BASE_BSP,
            APIC_BASE_BSP,
            "BSP flag is read-only"
        );
        let enabled = apic_base_write(0xfee0_0000 | APIC_BASE_ENABLE, 39).unwrap();
        assert_eq!(enabled, APIC_BASE_RESET);
        assert_eq!(
            apic_base_write(APIC_BASE_RESET | APIC_BASE_X2APIC, 39),
            None
        );
        assert_eq!(apic_base_write(APIC_BASE_RESET | 1, 39), None);
        assert_eq!(
            apic_base_write(1 << 45, 39),
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
