//! A vCPU's MTRRs, virtualized: the guest reads back what it wrote, with
//! the SDM's checks (Vol. 3A 12.11), and the physical MTRRs stay the
//! hypervisor's. EPT memory types do not follow them: guest RAM is always
//! write-back and the passed-through device pages (local APIC, I/O APIC)
//! always uncached, which is what any sane MTRR setting gives them, and the
//! guest has no other device memory whose type could matter.

/// Variable ranges offered (IA32_MTRRCAP VCNT).
pub const VARIABLE_RANGES: usize = 8;
const MTRRCAP: u32 = 0xfe;
const PHYS_BASE0: u32 = 0x200;
const DEF_TYPE: u32 = 0x2ff;
/// The fixed-range MSRs, in the order of `Mtrrs::fixed`.
const FIXED: [u32; 11] = [
    0x250, 0x258, 0x259, 0x268, 0x269, 0x26a, 0x26b, 0x26c, 0x26d, 0x26e, 0x26f,
];
/// IA32_MTRRCAP: VCNT, fixed ranges supported (bit 8), write-combining
/// (bit 10); no SMRR.
const CAP: u64 = VARIABLE_RANGES as u64 | 1 << 8 | 1 << 10;

/// Memory types an MTRR may hold: UC, WC, WT, WP, WB.
fn valid_type(t: u64) -> bool {
    matches!(t, 0 | 1 | 4 | 5 | 6)
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mtrrs {
    def_type: u64,
    /// PHYSBASEn, PHYSMASKn.
    variable: [(u64, u64); VARIABLE_RANGES],
    fixed: [u64; 11],
}

/// Whether `msr` is one of the MTRR MSRs.
pub fn is_mtrr(msr: u32) -> bool {
    msr == MTRRCAP
        || msr == DEF_TYPE
        || (PHYS_BASE0..PHYS_BASE0 + 2 * VARIABLE_RANGES as u32).contains(&msr)
        || FIXED.contains(&msr)
}

impl Mtrrs {
    pub fn read(&self, msr: u32) -> Option<u64> {
        match msr {
            MTRRCAP => Some(CAP),
            DEF_TYPE => Some(self.def_type),
            m if (PHYS_BASE0..PHYS_BASE0 + 2 * VARIABLE_RANGES as u32).contains(&m) => {
                let (base, mask) = self.variable[((m - PHYS_BASE0) / 2) as usize];
                Some(if m % 2 == 0 { base } else { mask })
            }
            m => FIXED.iter().position(|&f| f == m).map(|i| self.fixed[i]),
        }
    }

    /// A guest write; `None` (the guest gets #GP) for a read-only MSR,
    /// reserved bits, or a memory type that does not exist.
    pub fn write(&mut self, msr: u32, value: u64, paddr_bits: u8) -> Option<()> {
        let address_bits = ((1u64 << paddr_bits) - 1) & !0xfff;
        match msr {
            DEF_TYPE => {
                // Type in bits 7:0, FE (10), E (11); the rest reserved.
                if value & !0xcff != 0 || !valid_type(value & 0xff) {
                    return None;
                }
                self.def_type = value;
            }
            m if (PHYS_BASE0..PHYS_BASE0 + 2 * VARIABLE_RANGES as u32).contains(&m) => {
                let slot = &mut self.variable[((m - PHYS_BASE0) / 2) as usize];
                if m % 2 == 0 {
                    if value & !(address_bits | 0xff) != 0 || !valid_type(value & 0xff) {
                        return None;
                    }
                    slot.0 = value;
                } else {
                    // Mask in the address bits, valid flag in bit 11.
                    if value & !(address_bits | 1 << 11) != 0 {
                        return None;
                    }
                    slot.1 = value;
                }
            }
            m => {
                let i = FIXED.iter().position(|&f| f == m)?;
                if !(0..8).all(|byte| valid_type(value >> (8 * byte) & 0xff)) {
                    return None;
                }
                self.fixed[i] = value;
            }
        }
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_reads_back_what_it_wrote_and_bad_values_are_refused() {
        let mut m = Mtrrs::default();
        assert_eq!(m.read(MTRRCAP), Some(0x508));
        assert_eq!(m.write(MTRRCAP, 0, 39), None, "read-only");
        assert_eq!(m.write(DEF_TYPE, 0xc06, 39), Some(()));
        assert_eq!(m.read(DEF_TYPE), Some(0xc06));
        assert_eq!(m.write(DEF_TYPE, 0x02, 39), None, "type 2 does not exist");
        assert_eq!(m.write(DEF_TYPE, 0x1006, 39), None, "reserved bit 12");
        assert_eq!(m.write(0x202, 0xc000_0000, 39), Some(()), "UC at 3 GiB");
        assert_eq!(m.write(0x203, 0x7f_c000_0800, 39), Some(()));
        assert_eq!(m.read(0x203), Some(0x7f_c000_0800));
        assert_eq!(
            m.write(0x203, 1 << 40 | 0x800, 39),
            None,
            "beyond MAXPHYADDR"
        );
        assert_eq!(m.write(0x250, 0x0606_0606_0606_0606, 39), Some(()));
        assert_eq!(m.read(0x250), Some(0x0606_0606_0606_0606));
        assert_eq!(m.write(0x258, 0x0606_0606_0606_0607, 39), None);
        assert_eq!(m.read(0x210), None, "only eight variable ranges");
        assert!(is_mtrr(0x26f) && !is_mtrr(0x210) && !is_mtrr(0x277));
    }
}
