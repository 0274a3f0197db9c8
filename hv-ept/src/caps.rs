//! What the CPU's EPT supports: shared by the p2m (what it may write) and the
//! walk model (what the CPU accepts).

/// EPT capabilities, from IA32_VMX_EPT_VPID_CAP (MSR 0x48C) and MAXPHYADDR.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct EptCaps {
    /// Bit 0: execute-only entries (bits 2:0 = 100b) are allowed.
    pub exec_only: bool,
    /// Bit 16: 2M pages.
    pub pages_2m: bool,
    /// Bit 17: 1G pages.
    pub pages_1g: bool,
    /// Bit 21: accessed and dirty flags.
    pub ad_flags: bool,
    /// Physical-address width (CPUID 0x80000008 EAX[7:0]): entry bits 51:N are reserved.
    pub paddr_bits: u8,
}

impl EptCaps {
    /// Everything on, 46-bit physical addresses: the usual test configuration.
    pub const ALL: EptCaps = EptCaps {
        exec_only: true,
        pages_2m: true,
        pages_1g: true,
        ad_flags: true,
        paddr_bits: 46,
    };

    /// Decodes IA32_VMX_EPT_VPID_CAP.
    pub const fn from_msr(ept_vpid_cap: u64, paddr_bits: u8) -> EptCaps {
        EptCaps {
            exec_only: ept_vpid_cap & (1 << 0) != 0,
            pages_2m: ept_vpid_cap & (1 << 16) != 0,
            pages_1g: ept_vpid_cap & (1 << 17) != 0,
            ad_flags: ept_vpid_cap & (1 << 21) != 0,
            paddr_bits,
        }
    }

    /// One past the largest frame number an entry can hold on this CPU.
    pub const fn mfn_limit(&self) -> u64 {
        1 << (self.paddr_bits as u32 - 12)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_bochs_skylake() {
        // corei7_skylake_x, read from Bochs (shared/emulators/bochs.md).
        let c = EptCaps::from_msr(0x0000_0f01_0633_4141, 39);
        assert!(c.exec_only && c.pages_2m && c.pages_1g && c.ad_flags);
        assert_eq!(c.mfn_limit(), 1 << 27);
        assert!(!EptCaps::from_msr(0, 39).exec_only);
    }
}
