//! A model of the CPU's EPT walk, written from the Intel SDM Vol. 3C, chapter
//! "VMX Support for Address Translation" (section numbers are those of the
//! 2023+ editions; the 2016-2022 ones have 28.2.x for 29.3.x):
//! - §29.3.2 "EPT Translation Mechanism": the 4-level walk and entry formats;
//! - §29.3.3.1 "EPT Misconfigurations", §29.3.3.2 "EPT Violations";
//! - §29.3.3.3 "Prioritization of EPT Misconfigurations and EPT Violations":
//!   entries are checked top-down, a non-present entry is a violation, a
//!   misconfigured one a misconfiguration, and permissions (the AND of every
//!   level) are checked only once the leaf is reached;
//! - §29.3.4 "Accessed and Dirty Flags for EPT", §29.3.6 "Page-Modification
//!   Logging" (the PML buffer and index, the log-full VM exit);
//! - "Exit Qualification for EPT Violations" (table in §28.2.1, VM exits);
//! - §26.5.7.1 "Convertible EPT Violations" for which suppress-#VE bit counts;
//! - §25.6.11 "Extended-Page-Table Pointer (EPTP)" and the VM-entry checks on it.
//!
//! Tests use it to drive a p2m as hardware would: access, take the exit,
//! handle it, retry. Not modelled: 5-level EPT, mode-based execute control,
//! sub-page permissions, shadow-stack and guest-paging-verification bits
//! (all off), and paging-structure caches (every access walks).

use bitflags::bitflags;

use crate::addr::{Mfn, Order, ROOT_LEVEL, index, level_pages};
use crate::caps::EptCaps;
use crate::entry::{ADDR_MASK, EptEntry, EptFlags};
use crate::memory::EptMemory;
use crate::types::Rights;

/// What the guest does with the guest-physical address.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum AccessKind {
    Read,
    Write,
    Fetch,
}

/// How the access relates to a guest linear address (exit qualification bits
/// 7 and 8).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Linear {
    /// No linear address (e.g. loading PDPTEs for MOV CR3): bit 7 clear.
    None,
    /// The access is to the translation of a linear address: bits 7 and 8 set.
    Final,
    /// The access is to a guest paging-structure entry: bit 7 set, bit 8 clear.
    /// With EPT A/D flags enabled it counts as a write (SDM §29.3.3.2).
    PagingStructure,
}

/// One access to walk.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Access {
    pub kind: AccessKind,
    pub linear: Linear,
}

impl Access {
    pub const fn read() -> Access {
        Access {
            kind: AccessKind::Read,
            linear: Linear::Final,
        }
    }

    pub const fn write() -> Access {
        Access {
            kind: AccessKind::Write,
            linear: Linear::Final,
        }
    }

    pub const fn fetch() -> Access {
        Access {
            kind: AccessKind::Fetch,
            linear: Linear::Final,
        }
    }

    pub const fn with_linear(self, linear: Linear) -> Access {
        Access { linear, ..self }
    }
}

bitflags! {
    /// Exit qualification of an EPT violation (the bits this model sets).
    #[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
    pub struct ViolationQual: u64 {
        const READ = 1 << 0;
        const WRITE = 1 << 1;
        const FETCH = 1 << 2;
        /// AND of bit 0 over the entries used (0 if one was not present).
        const READABLE = 1 << 3;
        const WRITABLE = 1 << 4;
        const EXECUTABLE = 1 << 5;
        const LINEAR_VALID = 1 << 7;
        const LINEAR_FINAL = 1 << 8;
    }
}

/// Why an entry is misconfigured (SDM §29.3.3.1).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum MisconfigReason {
    /// Bits 2:0 = 010b or 110b.
    WriteWithoutRead,
    /// Bits 2:0 = 100b on a CPU without execute-only support.
    ExecOnlyUnsupported,
    /// Reserved bits set (the mask of them).
    ReservedBits(u64),
    /// Memory type 2, 3 or 7 in the entry that maps the page.
    ReservedMemoryType(u8),
}

/// How a walk failed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum EptFault {
    /// EPT violation. `level` is that of the non-present entry, or of the leaf
    /// for a permission violation (0 = PTE .. 3 = PML4E); `suppress_ve` is
    /// bit 63 of that same entry, which decides whether the violation is
    /// convertible to a #VE.
    Violation {
        qualification: ViolationQual,
        gpa: u64,
        level: u8,
        suppress_ve: bool,
    },
    /// EPT misconfiguration in the entry at `level`.
    Misconfig {
        gpa: u64,
        level: u8,
        entry: u64,
        reason: MisconfigReason,
    },
    /// The EPTP fails the VM-entry checks: VM entry would fail.
    InvalidEptp,
    /// The guest-physical address needs more than the 48 bits a 4-level walk
    /// translates; outside this model.
    AddressTooWide,
    /// The write had to log its page but the PML index was out of range
    /// (a page-modification log-full VM exit): no flag was set, the write
    /// did not happen.
    PmlFull,
}

/// Entries of a PML buffer (one 4 KiB frame of u64 guest-physical
/// addresses).
pub const PML_ENTRIES: u16 = 512;

/// A vCPU's page-modification log as the CPU uses it: the buffer frame
/// (VMCS PML address) and the index of the next entry to write (VMCS guest
/// PML index; 511 when empty, counting down, out of range when full).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PmlLog {
    pub buffer: Mfn,
    pub index: u16,
}

/// A successful translation.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Translation {
    pub hpa: u64,
    pub page: Order,
    /// Memory type and iPAT of the leaf.
    pub emt: u8,
    pub ipat: bool,
    /// AND of R/W/X over the levels.
    pub rights: Rights,
    pub leaf: EptEntry,
}

/// Translates `gpa` for `access` through the EPT rooted at `eptp`, as the CPU
/// would. With A/D flags enabled in the EPTP, a successful walk sets the
/// accessed flag of every entry used and, for writes, the dirty flag of the
/// leaf (the SDM allows setting them earlier; we set them only on success).
pub fn translate<M: EptMemory + ?Sized>(
    mem: &mut M,
    caps: &EptCaps,
    eptp: u64,
    gpa: u64,
    access: Access,
) -> Result<Translation, EptFault> {
    walk(mem, caps, eptp, gpa, access, None)
}

/// [`translate`] with page-modification logging on: a write that sets the
/// dirty flag of the leaf (A/D on in the EPTP) first logs the 4 KiB-aligned
/// `gpa` at `pml.index` of the buffer and decrements the index; with the
/// index out of range it stops with [`EptFault::PmlFull`] instead. Writes
/// that find the flag set log nothing.
pub fn translate_logged<M: EptMemory + ?Sized>(
    mem: &mut M,
    caps: &EptCaps,
    eptp: u64,
    gpa: u64,
    access: Access,
    pml: &mut PmlLog,
) -> Result<Translation, EptFault> {
    walk(mem, caps, eptp, gpa, access, Some(pml))
}

fn walk<M: EptMemory + ?Sized>(
    mem: &mut M,
    caps: &EptCaps,
    eptp: u64,
    gpa: u64,
    access: Access,
    pml: Option<&mut PmlLog>,
) -> Result<Translation, EptFault> {
    if !eptp_valid(caps, eptp) {
        return Err(EptFault::InvalidEptp);
    }
    if gpa >> 48 != 0 {
        return Err(EptFault::AddressTooWide);
    }
    let ad = eptp & (1 << 6) != 0;
    let gfn = gpa >> 12;
    let mut table = Mfn((eptp & ADDR_MASK) >> 12);
    let mut rights = Rights::all();
    let mut used = [(Mfn(0), 0usize); ROOT_LEVEL as usize + 1];
    let mut level = ROOT_LEVEL;
    let leaf = loop {
        let i = index(gfn, level);
        let e = EptEntry(mem.read_entry(table, i));
        used[level as usize] = (table, i);
        if !e.is_present() {
            return Err(violation(access, ad, Rights::empty(), gpa, level, e));
        }
        if let Some(reason) = misconfig(caps, e, level) {
            return Err(EptFault::Misconfig {
                gpa,
                level,
                entry: e.0,
                reason,
            });
        }
        rights &= e.rights();
        if e.is_leaf(level) {
            break e;
        }
        table = e.mfn();
        level -= 1;
    };
    let needed = match (access.kind, access.linear) {
        (_, Linear::PagingStructure) if ad => Rights::R | Rights::W,
        (AccessKind::Read, _) => Rights::R,
        (AccessKind::Write, _) => Rights::W,
        (AccessKind::Fetch, _) => Rights::X,
    };
    if !rights.contains(needed) {
        return Err(violation(access, ad, rights, gpa, level, leaf));
    }
    let writes = needed.contains(Rights::W);
    if let Some(pml) = pml
        && ad
        && writes
        && !leaf.is_dirty()
    {
        if pml.index >= PML_ENTRIES {
            return Err(EptFault::PmlFull);
        }
        mem.write_entry(pml.buffer, pml.index as usize, gpa & !0xfff);
        pml.index = pml.index.wrapping_sub(1);
    }
    if ad {
        for lv in level..=ROOT_LEVEL {
            let (t, i) = used[lv as usize];
            let raw = mem.read_entry(t, i);
            let mut set = EptFlags::ACCESSED.bits();
            if lv == level && writes {
                set |= EptFlags::DIRTY.bits();
            }
            if raw & set != set {
                mem.write_entry(t, i, raw | set);
            }
        }
    }
    let page_mask = (level_pages(level) << 12) - 1;
    Ok(Translation {
        hpa: (leaf.0 & ADDR_MASK & !page_mask) | (gpa & page_mask),
        page: Order::of_level(level),
        emt: leaf.emt(),
        ipat: leaf.ipat(),
        rights,
        leaf,
    })
}

/// EPTP checks at VM entry (SDM "Checks on VM-Execution Control Fields"):
/// memory type UC or WB, 4-level walk, A/D only if supported, bits 11:7 and
/// those above the physical-address width clear.
fn eptp_valid(caps: &EptCaps, eptp: u64) -> bool {
    let mt = eptp & 0b111;
    let walk = (eptp >> 3) & 0b111;
    let ad = eptp & (1 << 6) != 0;
    let reserved = (0b1_1111 << 7) | !((1u64 << caps.paddr_bits) - 1);
    (mt == 0 || mt == 6) && walk == 3 && (!ad || caps.ad_flags) && eptp & reserved == 0
}

/// The misconfiguration in present entry `e` at `level`, if any (SDM
/// §29.3.3.1; reserved bits per the entry-format tables of §29.3.2).
fn misconfig(caps: &EptCaps, e: EptEntry, level: u8) -> Option<MisconfigReason> {
    let rwx = e.0 & 0b111;
    if rwx == 0b010 || rwx == 0b110 {
        return Some(MisconfigReason::WriteWithoutRead);
    }
    if rwx == 0b100 && !caps.exec_only {
        return Some(MisconfigReason::ExecOnlyUnsupported);
    }
    let above_paddr = ADDR_MASK & !((1u64 << caps.paddr_bits) - 1);
    let superpage = e.0 & EptFlags::SUPERPAGE.bits() != 0;
    let kind = match level {
        // PML4E: bits 7:3 reserved, so no 512G pages.
        3 => 0b1_1111 << 3,
        // 1G/2M page: bits 29:12 / 20:12 below the page address; the page
        // size bit itself is reserved where the size is not supported.
        2 | 1 if superpage => {
            let supported = if level == 2 {
                caps.pages_1g
            } else {
                caps.pages_2m
            };
            let low = ((level_pages(level) - 1) << 12) & ADDR_MASK;
            low | if supported {
                0
            } else {
                EptFlags::SUPERPAGE.bits()
            }
        }
        // Non-leaf PDPTE/PDE: bits 6:3 reserved (7 is the page-size bit, 0 here).
        2 | 1 => 0b1111 << 3,
        // PTE: bit 7 ignored, no other reserved bit below the address width.
        _ => 0,
    };
    let reserved = e.0 & (above_paddr | kind);
    if reserved != 0 {
        return Some(MisconfigReason::ReservedBits(reserved));
    }
    if e.is_leaf(level) && matches!(e.emt(), 2 | 3 | 7) {
        return Some(MisconfigReason::ReservedMemoryType(e.emt()));
    }
    None
}

/// The violation for `access` given the rights `allowed` by the walk so far,
/// caused by entry `e` at `level`.
fn violation(
    access: Access,
    ad: bool,
    allowed: Rights,
    gpa: u64,
    level: u8,
    e: EptEntry,
) -> EptFault {
    let mut q = match access.kind {
        AccessKind::Read => ViolationQual::READ,
        AccessKind::Write => ViolationQual::WRITE,
        AccessKind::Fetch => ViolationQual::FETCH,
    };
    if access.linear == Linear::PagingStructure && ad {
        q |= ViolationQual::READ | ViolationQual::WRITE;
    }
    q |= ViolationQual::from_bits_retain((allowed.bits() as u64) << 3);
    q |= match access.linear {
        Linear::None => ViolationQual::empty(),
        Linear::Final => ViolationQual::LINEAR_VALID | ViolationQual::LINEAR_FINAL,
        Linear::PagingStructure => ViolationQual::LINEAR_VALID,
    };
    EptFault::Violation {
        qualification: q,
        gpa,
        level,
        suppress_ve: e.suppress_ve(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::{EMT_UC, EMT_WB};
    use crate::sim::SimMemory;

    const R: u64 = 1;
    const W: u64 = 2;
    const X: u64 = 4;
    const RWX: u64 = R | W | X;
    const SP: u64 = 1 << 7;
    const SVE: u64 = 1 << 63;
    const WB: u64 = (EMT_WB as u64) << 3;

    /// A hand-built tree: root -> pdpt -> pd -> pt, all links RWX, every
    /// other slot empty with suppress-#VE set. gpa 0 walks it to `pt[0]`.
    struct Tree {
        mem: SimMemory,
        t: [Mfn; 4], // by level: pt, pd, pdpt, root
    }

    impl Tree {
        fn new() -> Tree {
            let mut mem = SimMemory::new();
            let mut t = [Mfn(0); 4];
            for slot in &mut t {
                *slot = mem.alloc_frame().unwrap();
                for i in 0..512 {
                    mem.write_entry(*slot, i, SVE);
                }
            }
            for lv in 1..4 {
                mem.write_entry(t[lv], 0, t[lv - 1].hpa() | RWX);
            }
            Tree { mem, t }
        }

        fn set(&mut self, level: usize, i: usize, raw: u64) {
            self.mem.write_entry(self.t[level], i, raw);
        }

        fn eptp(&self) -> u64 {
            self.t[3].hpa() | 6 | 3 << 3
        }

        fn go(&mut self, caps: &EptCaps, gpa: u64, a: Access) -> Result<Translation, EptFault> {
            let eptp = self.eptp();
            translate(&mut self.mem, caps, eptp, gpa, a)
        }
    }

    fn misconfig_reason(r: Result<Translation, EptFault>) -> (u8, MisconfigReason) {
        match r {
            Err(EptFault::Misconfig { level, reason, .. }) => (level, reason),
            other => panic!("expected a misconfig, got {other:?}"),
        }
    }

    fn violation_of(r: Result<Translation, EptFault>) -> (ViolationQual, u8, bool) {
        match r {
            Err(EptFault::Violation {
                qualification,
                level,
                suppress_ve,
                ..
            }) => (qualification, level, suppress_ve),
            other => panic!("expected a violation, got {other:?}"),
        }
    }

    #[test]
    fn translates_4k_2m_1g() {
        let caps = EptCaps::ALL;
        let mut t = Tree::new();
        t.set(0, 3, 0x1234_5000 | RWX | WB);
        let tr = t.go(&caps, 0x3abc, Access::read()).unwrap();
        assert_eq!(
            (tr.hpa, tr.page, tr.emt),
            (0x1234_5abc, Order::PAGE_4K, EMT_WB)
        );
        t.set(1, 1, 0x4000_0000 | R | X | SP | (EMT_UC as u64) << 3);
        let tr = t.go(&caps, 0x20_1234, Access::fetch()).unwrap();
        assert_eq!(
            (tr.hpa, tr.page, tr.emt),
            (0x4000_1234, Order::PAGE_2M, EMT_UC)
        );
        assert_eq!(tr.rights, Rights::R | Rights::X);
        t.set(2, 5, 0x80_0000_0000 | RWX | SP | WB);
        let tr = t.go(&caps, 0x1_4012_3456, Access::write()).unwrap();
        assert_eq!((tr.hpa, tr.page), (0x80_0012_3456, Order::PAGE_1G));
    }

    #[test]
    fn not_present_is_a_violation_at_its_level_with_its_sve() {
        let caps = EptCaps::ALL;
        let mut t = Tree::new();
        // pt[1] empty (sve set), pd[2] empty with sve clear, root[1] empty.
        t.set(1, 2, 0);
        for (gpa, level, sve) in [(0x1000, 0, true), (0x40_0000, 1, false), (1 << 39, 3, true)] {
            let (q, lv, s) = violation_of(t.go(&caps, gpa, Access::write()));
            assert_eq!((lv, s), (level, sve), "gpa {gpa:#x}");
            assert_eq!(
                q,
                ViolationQual::WRITE | ViolationQual::LINEAR_VALID | ViolationQual::LINEAR_FINAL
            );
        }
    }

    #[test]
    fn permissions_are_anded_across_levels() {
        let caps = EptCaps::ALL;
        let mut t = Tree::new();
        t.set(0, 0, 0x5000 | RWX | WB | SVE);
        t.set(3, 0, t.t[2].hpa() | R | X); // the PML4E takes W away
        assert!(t.go(&caps, 0x10, Access::read()).is_ok());
        let (q, level, sve) = violation_of(t.go(&caps, 0x10, Access::write()));
        assert_eq!(
            q,
            ViolationQual::WRITE
                | ViolationQual::READABLE
                | ViolationQual::EXECUTABLE
                | ViolationQual::LINEAR_VALID
                | ViolationQual::LINEAR_FINAL
        );
        assert_eq!(
            (level, sve),
            (0, true),
            "a permission violation is the leaf's"
        );
        t.set(0, 0, 0x5000 | R | W | WB);
        let (q, _, sve) =
            violation_of(t.go(&caps, 0x10, Access::fetch().with_linear(Linear::None)));
        assert_eq!(q, ViolationQual::FETCH | ViolationQual::READABLE);
        assert!(!sve);
    }

    #[test]
    fn rwx_combinations_that_misconfigure() {
        let mut t = Tree::new();
        t.set(0, 0, 0x5000 | W | WB);
        assert_eq!(
            misconfig_reason(t.go(&EptCaps::ALL, 0, Access::read())),
            (0, MisconfigReason::WriteWithoutRead)
        );
        t.set(0, 0, 0x5000 | W | X | WB);
        assert_eq!(
            misconfig_reason(t.go(&EptCaps::ALL, 0, Access::fetch())).1,
            MisconfigReason::WriteWithoutRead
        );
        // Execute-only: fine where supported (Bochs skylake), a misconfig elsewhere.
        t.set(0, 0, 0x5000 | X | WB);
        assert!(t.go(&EptCaps::ALL, 0, Access::fetch()).is_ok());
        assert!(matches!(
            t.go(&EptCaps::ALL, 0, Access::read()),
            Err(EptFault::Violation { .. })
        ));
        let no_xo = EptCaps {
            exec_only: false,
            ..EptCaps::ALL
        };
        assert_eq!(
            misconfig_reason(t.go(&no_xo, 0, Access::fetch())).1,
            MisconfigReason::ExecOnlyUnsupported
        );
        // The same rules hold in non-leaf entries.
        t.set(0, 0, 0x5000 | RWX | WB);
        t.set(2, 0, t.t[1].hpa() | W);
        assert_eq!(
            misconfig_reason(t.go(&EptCaps::ALL, 0, Access::read())),
            (2, MisconfigReason::WriteWithoutRead)
        );
    }

    #[test]
    fn reserved_bits_by_entry_kind() {
        let caps = EptCaps {
            paddr_bits: 40,
            ..EptCaps::ALL
        };
        let cases: [(usize, usize, u64, u64, u8); 6] = [
            // (level, slot, entry, gpa, expected level)
            (0, 0, (1 << 40) | RWX | WB, 0, 0), // beyond MAXPHYADDR
            (3, 0, 0, 0, 3),                    // PML4E bit 7 (placeholder, set below)
            (1, 0, 0, 0, 1),                    // PDE bits 6:3 (placeholder)
            (1, 4, 0x4000_1000 | RWX | SP | WB, 0x80_0000, 1), // 2M page, bit 12
            (2, 3, 0xc010_0000 | RWX | SP | WB, 0xc000_0000, 2), // 1G page, bit 20
            (3, 0, 0, 0, 3),                    // PML4E EMT (a mark) (placeholder)
        ];
        for (n, &(level, slot, raw, gpa, want)) in cases.iter().enumerate() {
            let mut t = Tree::new();
            let raw = match n {
                1 => t.t[2].hpa() | RWX | SP,
                2 => t.t[0].hpa() | RWX | 1 << 4,
                5 => t.t[2].hpa() | RWX | 7 << 3,
                _ => raw,
            };
            t.set(0, 0, 0x5000 | RWX | WB);
            t.set(level, slot, raw);
            let (lv, reason) = misconfig_reason(t.go(&caps, gpa, Access::read()));
            assert_eq!(lv, want, "case {n}");
            assert!(
                matches!(reason, MisconfigReason::ReservedBits(_)),
                "case {n}: {reason:?}"
            );
        }
        // 1G page where the CPU has none: bit 7 of the PDPTE is reserved.
        let mut t = Tree::new();
        t.set(2, 1, 0x4000_0000 | RWX | SP | WB);
        let no_1g = EptCaps {
            pages_1g: false,
            ..EptCaps::ALL
        };
        assert_eq!(
            misconfig_reason(t.go(&no_1g, 0x4000_0000, Access::read())).1,
            MisconfigReason::ReservedBits(SP)
        );
        // Bit 7 of a PTE and bits 52-62 of any entry are ignored.
        let mut t = Tree::new();
        t.set(0, 0, 0x5000 | RWX | WB | SP | (0x7ff << 52));
        assert!(t.go(&caps, 0, Access::read()).is_ok());
    }

    #[test]
    fn reserved_memory_types_only_in_the_leaf() {
        for emt in 0..8u64 {
            let mut t = Tree::new();
            t.set(0, 0, 0x5000 | RWX | emt << 3);
            let r = t.go(&EptCaps::ALL, 0, Access::read());
            if matches!(emt, 2 | 3 | 7) {
                assert_eq!(
                    misconfig_reason(r),
                    (0, MisconfigReason::ReservedMemoryType(emt as u8))
                );
            } else {
                assert_eq!(r.unwrap().emt, emt as u8);
            }
        }
    }

    #[test]
    fn walk_order_decides_between_misconfig_and_violation() {
        let caps = EptCaps::ALL;
        // A misconfigured leaf under an upper entry that denies the access:
        // the walk reaches the leaf before checking permissions.
        let mut t = Tree::new();
        t.set(3, 0, t.t[2].hpa() | R);
        t.set(0, 0, 0x5000 | RWX | 7 << 3);
        assert!(matches!(
            t.go(&caps, 0, Access::write()),
            Err(EptFault::Misconfig { level: 0, .. })
        ));
        // A non-present entry above a misconfigured one is all the CPU sees.
        t.set(1, 0, SVE);
        assert!(matches!(
            t.go(&caps, 0, Access::write()),
            Err(EptFault::Violation { level: 1, .. })
        ));
        // A misconfigured upper entry stops the walk before a hole below.
        t.set(2, 0, t.t[1].hpa() | RWX | 7 << 3);
        assert!(matches!(
            t.go(&caps, 0, Access::write()),
            Err(EptFault::Misconfig { level: 2, .. })
        ));
    }

    #[test]
    fn accessed_and_dirty_flags() {
        let caps = EptCaps::ALL;
        let mut t = Tree::new();
        t.set(0, 0, 0x5000 | RWX | WB);
        let ad_eptp = t.eptp() | 1 << 6;
        translate(&mut t.mem, &caps, ad_eptp, 0, Access::read()).unwrap();
        for lv in 0..4 {
            let raw = t.mem.read_entry(t.t[lv], 0);
            assert!(raw & (1 << 8) != 0, "A at level {lv}");
            assert!(raw & (1 << 9) == 0, "no D at level {lv}");
        }
        translate(&mut t.mem, &caps, ad_eptp, 0, Access::write()).unwrap();
        assert!(t.mem.read_entry(t.t[0], 0) & (1 << 9) != 0);
        // Not set on a failed walk; nor without A/D in the EPTP.
        t.set(0, 1, 0x6000 | R | X | WB);
        assert!(translate(&mut t.mem, &caps, ad_eptp, 0x1000, Access::write()).is_err());
        assert_eq!(t.mem.read_entry(t.t[0], 1) & (3 << 8), 0);
        t.go(&caps, 0x1000, Access::read()).unwrap();
        assert_eq!(t.mem.read_entry(t.t[0], 1) & (3 << 8), 0);
        // Guest paging-structure accesses count as writes with A/D on.
        let ps = Access::read().with_linear(Linear::PagingStructure);
        let (q, ..) = violation_of(translate(&mut t.mem, &caps, ad_eptp, 0x1000, ps));
        assert_eq!(
            q,
            ViolationQual::READ
                | ViolationQual::WRITE
                | ViolationQual::READABLE
                | ViolationQual::EXECUTABLE
                | ViolationQual::LINEAR_VALID
        );
        assert!(t.go(&caps, 0x1000, ps).is_ok());
    }

    #[test]
    fn pml_logs_the_writes_that_set_a_dirty_flag() {
        let caps = EptCaps::ALL;
        let mut t = Tree::new();
        t.set(0, 0, 0x5000 | RWX | WB);
        t.set(0, 1, 0x6000 | RWX | WB | 1 << 9); // dirty already
        t.set(1, 1, 0x4000_0000 | RWX | SP | WB); // a 2M page
        let eptp = t.eptp() | 1 << 6;
        let buffer = t.mem.alloc_frame().unwrap();
        let mut pml = PmlLog { buffer, index: 1 };
        let go = |t: &mut Tree, pml: &mut PmlLog, gpa, a| {
            translate_logged(&mut t.mem, &caps, eptp, gpa, a, pml)
        };
        go(&mut t, &mut pml, 0x123, Access::read()).unwrap();
        go(&mut t, &mut pml, 0x1234, Access::write()).unwrap();
        assert_eq!(pml.index, 1, "reads and writes to dirty pages log nothing");
        go(&mut t, &mut pml, 0x20_5678, Access::write()).unwrap();
        assert_eq!(
            t.mem.read_entry(buffer, 1),
            0x20_5000,
            "the 4K page, not the 2M one"
        );
        go(&mut t, &mut pml, 0x20_9000, Access::write()).unwrap();
        assert_eq!(pml.index, 0, "the 2M page is dirty now: nothing more");
        go(&mut t, &mut pml, 0x88, Access::write()).unwrap();
        assert_eq!((t.mem.read_entry(buffer, 0), pml.index), (0, u16::MAX));
        // Full: the next logging write exits and changes nothing.
        t.set(0, 2, 0x7000 | RWX | WB);
        assert_eq!(
            go(&mut t, &mut pml, 0x2000, Access::write()),
            Err(EptFault::PmlFull)
        );
        assert_eq!(t.mem.read_entry(t.t[0], 2) & (3 << 8), 0);
        pml.index = 511;
        go(&mut t, &mut pml, 0x2000, Access::write()).unwrap();
        assert_eq!((t.mem.read_entry(buffer, 511), pml.index), (0x2000, 510));
        // Without A/D in the EPTP there are no dirty flags to set: no log.
        t.set(0, 3, 0x8000 | RWX | WB);
        let plain = t.eptp();
        translate_logged(&mut t.mem, &caps, plain, 0x3000, Access::write(), &mut pml).unwrap();
        assert_eq!(pml.index, 510);
    }

    #[test]
    fn eptp_and_address_checks() {
        let mut t = Tree::new();
        let good = t.eptp();
        let no_ad = EptCaps {
            ad_flags: false,
            ..EptCaps::ALL
        };
        for (bad, caps) in [
            (good & !7 | 1, EptCaps::ALL),             // WC paging-structure type
            (good & !(7 << 3) | 4 << 3, EptCaps::ALL), // 5-level
            (good | 1 << 6, no_ad),
            (good | 1 << 9, EptCaps::ALL),
            (good | 1 << 50, EptCaps::ALL),
        ] {
            assert_eq!(
                translate(&mut t.mem, &caps, bad, 0, Access::read()),
                Err(EptFault::InvalidEptp)
            );
        }
        assert_eq!(
            t.go(&EptCaps::ALL, 1 << 48, Access::read()),
            Err(EptFault::AddressTooWide)
        );
    }
}
