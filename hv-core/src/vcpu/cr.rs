//! The guest's CR0 and CR4: which bits the hypervisor owns (VMX requires
//! them fixed) and how a guest write to them is carried out.
//!
//! The guest/host masks cover exactly the bits the VMX fixed-bit MSRs pin
//! (CR0.NE, CR4.VMXE on common CPUs; PE and PG are free with unrestricted
//! guest). The guest reads its own values through the read shadows; the
//! real registers keep the pinned bits.

use x86::vmx::vmcs::{control, guest};

use crate::vmx::vmcs::Vmcs;

pub const CR0_PE: u64 = 1 << 0;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_NW: u64 = 1 << 29;
pub const CR0_CD: u64 = 1 << 30;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_MCE: u64 = 1 << 6;
pub const CR4_VMXE: u64 = 1 << 13;
pub const CR4_SMXE: u64 = 1 << 14;
pub const CR4_PKS: u64 = 1 << 24;
/// CR4 bits of features CPUID hides from guests (`exits::cpuid`: MCE, SMX,
/// PKS): reserved for a guest, as on a CPU without the feature, whatever
/// the VMX fixed bits allow.
pub const CR4_HIDDEN: u64 = CR4_MCE | CR4_SMXE | CR4_PKS;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
/// VM-entry control "IA-32e mode guest".
pub const ENTRY_IA32E_MODE: u64 = 1 << 9;

/// The VMX fixed-bit MSRs for CR0 and CR4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fixed {
    pub cr0_fixed0: u64,
    pub cr0_fixed1: u64,
    pub cr4_fixed0: u64,
    pub cr4_fixed1: u64,
}

impl Fixed {
    /// CR0 bits that must be 1 in the guest (PE and PG are exempt with
    /// unrestricted guest).
    fn cr0_ones(&self) -> u64 {
        self.cr0_fixed0 & !(CR0_PE | CR0_PG)
    }

    /// Bits the hypervisor owns: those pinned to 1 or to 0 (in the low 32
    /// bits), and CD/NW, which VM exits leave as the guest had them (SDM
    /// Vol. 3C 27.5.1) and some VMX implementations (Bochs) do not load on
    /// VM entry either: through the read shadow the guest always reads back
    /// what it wrote.
    pub fn cr0_mask(&self) -> u64 {
        self.cr0_ones() | (!self.cr0_fixed1 & 0xffff_ffff) | CR0_CD | CR0_NW
    }

    /// Also the bits of hidden features, so that setting one exits and is
    /// refused.
    pub fn cr4_mask(&self) -> u64 {
        self.cr4_fixed0 | (!self.cr4_fixed1 & 0xffff_ffff) | CR4_HIDDEN
    }
}

/// Sets the guest's CR0 to `value` as the guest sees it.
pub fn write_cr0(vmcs: &mut impl Vmcs, fixed: &Fixed, value: u64) {
    vmcs.write(
        guest::CR0,
        (value | fixed.cr0_ones()) & fixed.cr0_fixed1 | value & (CR0_PE | CR0_PG),
    );
    vmcs.write(control::CR0_READ_SHADOW, value);
    vmcs.write(control::CR0_GUEST_HOST_MASK, fixed.cr0_mask());
}

/// Sets the guest's CR4 to `value` as the guest sees it.
pub fn write_cr4(vmcs: &mut impl Vmcs, fixed: &Fixed, value: u64) {
    vmcs.write(guest::CR4, (value | fixed.cr4_fixed0) & fixed.cr4_fixed1);
    vmcs.write(control::CR4_READ_SHADOW, value);
    vmcs.write(control::CR4_GUEST_HOST_MASK, fixed.cr4_mask());
}

/// The guest's view of CR0: shadow bits where the hypervisor owns them.
pub fn guest_cr0(vmcs: &impl Vmcs) -> u64 {
    let mask = vmcs.read(control::CR0_GUEST_HOST_MASK);
    vmcs.read(guest::CR0) & !mask | vmcs.read(control::CR0_READ_SHADOW) & mask
}

/// The guest's view of CR4.
pub fn guest_cr4(vmcs: &impl Vmcs) -> u64 {
    let mask = vmcs.read(control::CR4_GUEST_HOST_MASK);
    vmcs.read(guest::CR4) & !mask | vmcs.read(control::CR4_READ_SHADOW) & mask
}

/// Why a guest CR write is refused with #GP (SDM Vol. 3A "MOV—Move to/from
/// Control Registers").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    ReservedBits,
    PagingWithoutProtection,
    NotWriteThroughWithoutCacheDisable,
    LongModeWithoutPae,
    /// CR4.VMXE: the hypervisor does not offer VMX to guests.
    Vmx,
    /// A CR4 bit the CPU does not allow in VMX non-root operation.
    Unsupported,
    /// Clearing CR0.PG while executing 64-bit code.
    LongModeCode,
}

/// Checks a guest MOV to CR0 and carries it out, including entering or
/// leaving IA-32e mode when paging changes with EFER.LME set.
pub fn mov_to_cr0(vmcs: &mut impl Vmcs, fixed: &Fixed, value: u64) -> Result<(), Refused> {
    if value >> 32 != 0 {
        return Err(Refused::ReservedBits);
    }
    if value & CR0_PG != 0 && value & CR0_PE == 0 {
        return Err(Refused::PagingWithoutProtection);
    }
    if value & CR0_NW != 0 && value & CR0_CD == 0 {
        return Err(Refused::NotWriteThroughWithoutCacheDisable);
    }
    let old = guest_cr0(vmcs);
    let efer = vmcs.read(guest::IA32_EFER_FULL);
    let paging_on = old & CR0_PG == 0 && value & CR0_PG != 0;
    let paging_off = old & CR0_PG != 0 && value & CR0_PG == 0;
    if paging_off && crate::vcpu::events::in_64bit_mode(vmcs) {
        // Leaving long mode is only allowed from compatibility mode.
        return Err(Refused::LongModeCode);
    }
    if paging_on && efer & EFER_LME != 0 {
        if guest_cr4(vmcs) & CR4_PAE == 0 {
            return Err(Refused::LongModeWithoutPae);
        }
        set_long_mode(vmcs, true);
    } else if paging_off && efer & EFER_LMA != 0 {
        set_long_mode(vmcs, false);
    }
    write_cr0(vmcs, fixed, value);
    Ok(())
}

/// Checks a guest MOV to CR4 and carries it out.
pub fn mov_to_cr4(vmcs: &mut impl Vmcs, fixed: &Fixed, value: u64) -> Result<(), Refused> {
    if value & CR4_VMXE != 0 {
        return Err(Refused::Vmx);
    }
    if value & !(fixed.cr4_fixed1 | fixed.cr4_fixed0) != 0 || value & CR4_HIDDEN != 0 {
        return Err(Refused::Unsupported);
    }
    let long_mode = vmcs.read(guest::IA32_EFER_FULL) & EFER_LMA != 0;
    if long_mode && value & CR4_PAE == 0 {
        return Err(Refused::LongModeWithoutPae);
    }
    write_cr4(vmcs, fixed, value);
    Ok(())
}

fn set_long_mode(vmcs: &mut impl Vmcs, on: bool) {
    let efer = vmcs.read(guest::IA32_EFER_FULL);
    let entry = vmcs.read(control::VMENTRY_CONTROLS);
    if on {
        vmcs.write(guest::IA32_EFER_FULL, efer | EFER_LMA);
        vmcs.write(control::VMENTRY_CONTROLS, entry | ENTRY_IA32E_MODE);
    } else {
        vmcs.write(guest::IA32_EFER_FULL, efer & !EFER_LMA);
        vmcs.write(control::VMENTRY_CONTROLS, entry & !ENTRY_IA32E_MODE);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::vmx::vmcs::tests::FakeVmcs;

    /// The fixed bits Bochs's corei7_skylake_x reports.
    pub const BOCHS: Fixed = Fixed {
        cr0_fixed0: 0x8000_0021,
        cr0_fixed1: 0xffff_ffff,
        cr4_fixed0: 0x2000,
        cr4_fixed1: 0x0037_27ff,
    };

    #[test]
    fn masks_cover_exactly_the_pinned_bits_and_the_cache_controls() {
        assert_eq!(
            BOCHS.cr0_mask(),
            0x20 | CR0_CD | CR0_NW,
            "NE, CD, NW: PE and PG are free with unrestricted guest"
        );
        assert_eq!(BOCHS.cr4_mask() & CR4_VMXE, CR4_VMXE);
        assert_eq!(BOCHS.cr4_mask() & CR4_PAE, 0);
        assert_eq!(
            BOCHS.cr4_mask() & CR4_HIDDEN,
            CR4_HIDDEN,
            "setting a hidden feature's bit exits, to be refused"
        );
    }

    #[test]
    fn guest_sees_its_own_cr0_while_ne_stays_set() {
        let mut vmcs = FakeVmcs::default();
        write_cr0(&mut vmcs, &BOCHS, CR0_PE | CR0_ET);
        assert_eq!(vmcs.read(guest::CR0), CR0_PE | CR0_ET | 0x20);
        assert_eq!(guest_cr0(&vmcs), CR0_PE | CR0_ET);
    }

    #[test]
    fn cd_and_nw_read_back_as_written_whatever_the_cpu_keeps() {
        let mut vmcs = FakeVmcs::default();
        write_cr0(&mut vmcs, &BOCHS, CR0_PE | CR0_ET);
        // A CPU that leaves CD/NW as they were (the host's, after reset).
        let cr0 = vmcs.read(guest::CR0);
        vmcs.write(guest::CR0, cr0 | CR0_CD | CR0_NW);
        assert_eq!(
            guest_cr0(&vmcs) & (CR0_CD | CR0_NW),
            0,
            "as the entry state says"
        );
        mov_to_cr0(&mut vmcs, &BOCHS, CR0_PE | CR0_ET | CR0_CD).unwrap();
        assert_eq!(guest_cr0(&vmcs), CR0_PE | CR0_ET | CR0_CD);
        assert_eq!(
            vmcs.read(guest::CR0) & CR0_CD,
            CR0_CD,
            "and reaches the CPU"
        );
    }

    #[test]
    fn paging_with_lme_enters_long_mode_and_leaves_it() {
        let mut vmcs = FakeVmcs::default();
        write_cr0(&mut vmcs, &BOCHS, CR0_PE);
        write_cr4(&mut vmcs, &BOCHS, CR4_PAE);
        vmcs.write(guest::IA32_EFER_FULL, EFER_LME);
        mov_to_cr0(&mut vmcs, &BOCHS, CR0_PE | CR0_PG).unwrap();
        assert_eq!(vmcs.read(guest::IA32_EFER_FULL), EFER_LME | EFER_LMA);
        assert_eq!(
            vmcs.read(control::VMENTRY_CONTROLS) & ENTRY_IA32E_MODE,
            ENTRY_IA32E_MODE
        );
        assert_eq!(
            mov_to_cr4(&mut vmcs, &BOCHS, 0),
            Err(Refused::LongModeWithoutPae)
        );
        mov_to_cr0(&mut vmcs, &BOCHS, CR0_PE).unwrap();
        assert_eq!(vmcs.read(guest::IA32_EFER_FULL), EFER_LME);
        assert_eq!(vmcs.read(control::VMENTRY_CONTROLS) & ENTRY_IA32E_MODE, 0);
    }

    #[test]
    fn invalid_cr_writes_are_refused() {
        let mut vmcs = FakeVmcs::default();
        write_cr0(&mut vmcs, &BOCHS, CR0_PE);
        assert_eq!(
            mov_to_cr0(&mut vmcs, &BOCHS, CR0_PG),
            Err(Refused::PagingWithoutProtection)
        );
        assert_eq!(
            mov_to_cr0(&mut vmcs, &BOCHS, 1 << 40),
            Err(Refused::ReservedBits)
        );
        assert_eq!(
            mov_to_cr0(&mut vmcs, &BOCHS, CR0_PE | CR0_NW),
            Err(Refused::NotWriteThroughWithoutCacheDisable)
        );
        assert_eq!(mov_to_cr4(&mut vmcs, &BOCHS, CR4_VMXE), Err(Refused::Vmx));
        // Bochs allows MCE in VMX operation, but CPUID hides it from guests.
        assert_eq!(
            mov_to_cr4(&mut vmcs, &BOCHS, CR4_PAE | CR4_MCE),
            Err(Refused::Unsupported)
        );
        vmcs.write(guest::IA32_EFER_FULL, EFER_LME);
        assert_eq!(
            mov_to_cr0(&mut vmcs, &BOCHS, CR0_PE | CR0_PG),
            Err(Refused::LongModeWithoutPae)
        );
        assert_eq!(guest_cr0(&vmcs), CR0_PE, "a refused write changes nothing");
    }
}
