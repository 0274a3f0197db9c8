//! Guest linear -> guest-physical translation by walking the guest's own
//! page tables, in every paging mode a guest may use (SDM Vol. 3A chapter
//! 4): none, 32-bit (with 4 MiB pages and PSE-36), PAE, 4-level and
//! 5-level IA-32e paging. For exits that report only a linear address (a
//! breakpoint's RIP) and for a tool's `TRANSLATE`. The walk sets no
//! accessed or dirty bits: it looks, as a debugger does.

use x86::vmx::vmcs::guest;

use crate::platform::Platform;
use crate::vcpu::cr::{self, CR0_PG, CR4_PAE, EFER_LMA};
use crate::vm::Vm;
use crate::vmx::vmcs::Vmcs;

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const PAGE_SIZE_BIT: u64 = 1 << 7;
const NO_EXECUTE: u64 = 1 << 63;
/// Bits 51:12 of an entry: the next table's or the page's address.
const ADDRESS: u64 = 0x000f_ffff_ffff_f000;
const CR4_PSE: u64 = 1 << 4;
const CR4_LA57: u64 = 1 << 12;
const EFER_NXE: u64 = 1 << 11;

/// The registers that select and root a paging mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PagingRegs {
    /// As the guest sees them (read shadows applied).
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

impl PagingRegs {
    /// The vCPU's current ones.
    pub fn of(vmcs: &impl Vmcs) -> Self {
        Self {
            cr0: cr::guest_cr0(vmcs),
            cr3: vmcs.read(guest::CR3),
            cr4: cr::guest_cr4(vmcs),
            efer: vmcs.read(guest::IA32_EFER_FULL),
        }
    }

    pub fn mode(&self) -> Mode {
        if self.cr0 & CR0_PG == 0 {
            Mode::None
        } else if self.cr4 & CR4_PAE == 0 {
            Mode::Bits32
        } else if self.efer & EFER_LMA == 0 {
            Mode::Pae
        } else if self.cr4 & CR4_LA57 == 0 {
            Mode::Level4
        } else {
            Mode::Level5
        }
    }
}

/// A paging mode (the control protocol's `paging` values, in order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    None = 0,
    Bits32 = 1,
    Pae = 2,
    Level4 = 3,
    Level5 = 4,
}

/// Where a linear address leads, and what every level of the walk allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Walked {
    pub gpa: u64,
    /// log2 of the page's size: 12, 21, 22 or 30.
    pub page_shift: u8,
    pub mode: Mode,
    pub writable: bool,
    pub user: bool,
    pub no_execute: bool,
}

/// Walks `regs`' tables for `linear`; `read(gpa, bytes)` reads a 4- or
/// 8-byte entry of guest-physical memory (`None` where it is not RAM).
/// `None` if an entry on the way is not present or not readable.
pub fn walk(
    regs: &PagingRegs,
    linear: u64,
    mut read: impl FnMut(u64, usize) -> Option<u64>,
) -> Option<Walked> {
    let mode = regs.mode();
    let mut walked = Walked {
        gpa: linear,
        page_shift: 12,
        mode,
        writable: true,
        user: true,
        no_execute: false,
    };
    let nxe = regs.efer & EFER_NXE != 0;
    // (entry size, levels from the root, the root's address, index bits per level)
    let (entry_bytes, levels, mut table): (usize, u32, u64) = match mode {
        Mode::None => {
            walked.gpa = linear & 0xffff_ffff;
            return Some(walked);
        }
        Mode::Bits32 => (4, 2, regs.cr3 & 0xffff_f000),
        Mode::Pae => {
            // The PDPTE: four entries at CR3[31:5], no permission bits.
            let linear = linear & 0xffff_ffff;
            let pdpte = read((regs.cr3 & 0xffff_ffe0) + (linear >> 30) * 8, 8)?;
            if pdpte & PRESENT == 0 {
                return None;
            }
            (8, 2, pdpte & ADDRESS)
        }
        Mode::Level4 => (8, 4, regs.cr3 & ADDRESS),
        Mode::Level5 => (8, 5, regs.cr3 & ADDRESS),
    };
    let index_bits = if entry_bytes == 4 { 10 } else { 9 };
    for level in (1..=levels).rev() {
        let shift = 12 + index_bits * (level - 1);
        let index = (linear >> shift) & ((1 << index_bits) - 1);
        let entry = read(table + index * entry_bytes as u64, entry_bytes)?;
        if entry & PRESENT == 0 {
            return None;
        }
        walked.writable &= entry & WRITABLE != 0;
        walked.user &= entry & USER != 0;
        walked.no_execute |= nxe && entry & NO_EXECUTE != 0;
        // Large pages: 1 GiB at level 3 and 2 MiB at level 2 with 8-byte
        // entries; 4 MiB at level 2 of 32-bit paging with CR4.PSE.
        let large = level > 1
            && entry & PAGE_SIZE_BIT != 0
            && (entry_bytes == 8 && level <= 3 || entry_bytes == 4 && regs.cr4 & CR4_PSE != 0);
        if level == 1 || large {
            let base = if entry_bytes == 4 && large {
                // PSE-36: bits 20:13 of the PDE are address bits 39:32.
                entry & 0xffc0_0000 | (entry >> 13 & 0xff) << 32
            } else {
                entry & ADDRESS & !((1u64 << shift) - 1)
            };
            walked.gpa = base | linear & ((1u64 << shift) - 1);
            walked.page_shift = shift as u8;
            return Some(walked);
        }
        table = entry & ADDRESS;
        if entry_bytes == 4 {
            table &= 0xffff_f000;
        }
    }
    None
}

/// The guest-physical address of `linear` under the vCPU's current paging.
pub fn translate(vmcs: &impl Vmcs, vm: &Vm, platform: &impl Platform, linear: u64) -> Option<u64> {
    walk(&PagingRegs::of(vmcs), linear, |gpa, bytes| {
        read_entry(vm, platform, gpa, bytes)
    })
    .map(|w| w.gpa)
}

/// A 4- or 8-byte page-table entry of guest RAM.
pub fn read_entry(vm: &Vm, platform: &impl Platform, gpa: u64, bytes: usize) -> Option<u64> {
    let mut entry = [0u8; 8];
    vm.read(platform, gpa, &mut entry[..bytes]).ok()?;
    Some(u64::from_le_bytes(entry))
}

#[cfg(test)]
mod tests {
    extern crate std;

    use std::collections::BTreeMap;

    use super::*;

    const CR0_PE: u64 = 1;

    /// A guest-physical memory of page tables: entries by address.
    #[derive(Default)]
    struct Tables(BTreeMap<u64, u64>);

    impl Tables {
        fn set(&mut self, at: u64, entry: u64) {
            self.0.insert(at, entry);
        }

        fn walk(&self, regs: &PagingRegs, linear: u64) -> Option<Walked> {
            walk(regs, linear, |gpa, bytes| {
                let value = self.0.get(&gpa).copied().unwrap_or(0);
                Some(if bytes == 4 {
                    value & 0xffff_ffff
                } else {
                    value
                })
            })
        }
    }

    fn long_mode(la57: bool) -> PagingRegs {
        PagingRegs {
            cr0: CR0_PE | CR0_PG,
            cr3: 0x1000,
            cr4: CR4_PAE | if la57 { CR4_LA57 } else { 0 },
            efer: EFER_LMA | EFER_NXE | 1 << 8,
        }
    }

    #[test]
    fn paging_off_is_the_identity_within_4_gib() {
        let regs = PagingRegs {
            cr0: CR0_PE,
            ..Default::default()
        };
        let w = Tables::default().walk(&regs, 0x1_2345_6789).unwrap();
        assert_eq!((w.gpa, w.mode), (0x2345_6789, Mode::None));
    }

    #[test]
    fn four_level_walk_combines_permissions_of_every_level() {
        let linear = 0xffff_8000_0020_3abc_u64;
        let mut t = Tables::default();
        let idx = |level: u32| (linear >> (12 + 9 * (level - 1))) & 0x1ff;
        t.set(0x1000 + idx(4) * 8, 0x2000 | 0b111);
        t.set(0x2000 + idx(3) * 8, 0x3000 | 0b011);
        t.set(0x3000 + idx(2) * 8, 0x4000 | 0b111 | NO_EXECUTE);
        t.set(0x4000 + idx(1) * 8, 0x0009_8000 | 0b101);
        let w = t.walk(&long_mode(false), linear).unwrap();
        assert_eq!(w.gpa, 0x98abc);
        assert_eq!((w.page_shift, w.mode), (12, Mode::Level4));
        assert!(!w.writable, "the PTE is read-only");
        assert!(!w.user, "the PDPTE is supervisor-only");
        assert!(w.no_execute, "the PDE sets XD");
    }

    #[test]
    fn large_pages_end_the_walk_early() {
        let mut t = Tables::default();
        // 1 GiB page at PDPT index 1 (linear 0x4000_0000).
        t.set(0x1000, 0x2000 | 0b11);
        t.set(0x2000 + 8, 0x8000_0000 | PAGE_SIZE_BIT | 0b11);
        let w = t.walk(&long_mode(false), 0x4123_4567).unwrap();
        assert_eq!((w.gpa, w.page_shift), (0x8123_4567, 30));
        // 2 MiB page at PD index 0 of PDPT index 0.
        t.set(0x2000, 0x3000 | 0b11);
        t.set(0x3000, 0x0040_0000 | PAGE_SIZE_BIT | 0b11);
        let w = t.walk(&long_mode(false), 0x1_2345).unwrap();
        assert_eq!((w.gpa, w.page_shift), (0x41_2345, 21));
    }

    #[test]
    fn five_level_paging_walks_one_more_level() {
        let linear = 0x0100_0000_0000_0000_u64 | 0x5000;
        let mut t = Tables::default();
        let idx = |level: u32| (linear >> (12 + 9 * (level - 1))) & 0x1ff;
        t.set(0x1000 + idx(5) * 8, 0x2000 | 1);
        t.set(0x2000 + idx(4) * 8, 0x3000 | 1);
        t.set(0x3000 + idx(3) * 8, 0x4000 | 1);
        t.set(0x4000 + idx(2) * 8, 0x5000 | 1);
        t.set(0x5000 + idx(1) * 8, 0x7000 | 1);
        let w = t.walk(&long_mode(true), linear).unwrap();
        assert_eq!((w.gpa, w.mode), (0x7000, Mode::Level5));
        // The same address with 4-level paging is not mapped.
        assert!(t.walk(&long_mode(false), linear).is_none());
    }

    #[test]
    fn pae_walk_starts_at_the_pdpte_and_ignores_xd_without_nxe() {
        let regs = PagingRegs {
            cr0: CR0_PE | CR0_PG,
            cr3: 0x1020,
            cr4: CR4_PAE,
            efer: 0,
        };
        let linear = 0xc040_1234_u64;
        let mut t = Tables::default();
        t.set(0x1020 + 3 * 8, 0x2000 | 1);
        t.set(0x2000 + 2 * 8, 0x3000 | 0b111);
        t.set(0x3000 + 8, 0x0012_3000 | 0b011 | NO_EXECUTE);
        let w = t.walk(&regs, linear).unwrap();
        assert_eq!((w.gpa, w.mode, w.page_shift), (0x12_3234, Mode::Pae, 12));
        assert!(w.writable && !w.user && !w.no_execute);
    }

    #[test]
    fn bits32_walk_with_4k_and_pse36_4m_pages() {
        let mut regs = PagingRegs {
            cr0: CR0_PE | CR0_PG,
            cr3: 0x1000,
            cr4: 0,
            efer: 0,
        };
        let mut t = Tables::default();
        t.set(0x1000 + 0x300 * 4, 0x2000 | 0b111);
        t.set(0x2000 + 0x5 * 4, 0x0034_5000 | 0b101);
        let w = t.walk(&regs, 0xc000_5678).unwrap();
        assert_eq!((w.gpa, w.mode, w.page_shift), (0x34_5678, Mode::Bits32, 12));
        assert!(!w.writable && w.user);
        // A 4 MiB page with PSE-36 address bits 39:32 = 0x3.
        t.set(
            0x1000 + 0x301 * 4,
            0x0080_0000 | 0x3 << 13 | PAGE_SIZE_BIT | 0b11,
        );
        assert!(
            t.walk(&regs, 0xc040_0010).is_none(),
            "without CR4.PSE the PS bit is ignored and the PDE points at a table"
        );
        regs.cr4 = CR4_PSE;
        let w = t.walk(&regs, 0xc040_0010).unwrap();
        assert_eq!((w.gpa, w.page_shift), (0x3_0080_0010, 22));
    }

    #[test]
    fn a_missing_entry_or_unreadable_table_is_none() {
        let t = Tables::default();
        assert!(t.walk(&long_mode(false), 0x1000).is_none());
        let unreadable = walk(&long_mode(false), 0x1000, |_, _| None);
        assert!(unreadable.is_none());
    }
}
