//! The EPT entry format (SDM Vol. 3C, "EPT Translation Mechanism", tables
//! "Format of an EPT PML4 Entry" .. "Format of an EPT Page-Table Entry";
//! §29.3.2 in editions since 2023, §28.2.2 before).
//!
//! Software bits. We need 8: the p2m type (3 bits), the access (4 bits) and the
//! `recalc` mark (1 bit). They must be ignored by the CPU in *every* kind of entry
//! (PML4E, non-leaf PDPTE/PDE, 1G/2M leaves, PTE) whatever VM-execution controls
//! are on, because a mark lives in non-leaf entries and type/access in leaves, and
//! a leaf becomes a non-leaf slot after a split. The bits that qualify are 11,
//! 52-56, 59 and 62. Not used on purpose:
//! - 8, 9: accessed/dirty when EPTP bit 6 enables EPT A/D;
//! - 10: user-mode execute with mode-based execute control;
//! - 57, 58, 60, 61: guest-paging verification, paging-write, supervisor shadow
//!   stack, sub-page write permissions (ignored only while those features are off);
//! - 63: suppress #VE in leaves (and in non-present entries at every level).
//!
//! Layout: `recalc` = bit 11; type = bits 52-54; access = bits 55, 56, 59, 62
//! (low to high). The access field is not contiguous; [`SwField`] hides that.
//! A non-leaf entry carries no type or access, so a marked one uses bit 52 to
//! say its mark is scoped (see `scope.rs`).

use bitflags::bitflags;

use crate::addr::Mfn;
use crate::types::{LogMode, P2mAccess, P2mType, Rights};

bitflags! {
    /// Single-bit fields of an EPT entry. Multi-bit fields (memory type,
    /// address, software fields) have accessors on [`EptEntry`].
    #[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
    pub struct EptFlags: u64 {
        const READ = 1 << 0;
        const WRITE = 1 << 1;
        const EXEC = 1 << 2;
        /// EPT memory type, bits 5:3 (leaves only; reserved in non-leaf entries).
        const EMT = 0b111 << 3;
        const IPAT = 1 << 6;
        /// Maps a 2M/1G page (PDE/PDPTE); reserved in a PML4E, ignored in a PTE.
        const SUPERPAGE = 1 << 7;
        const ACCESSED = 1 << 8;
        const DIRTY = 1 << 9;
        /// Mode-based execute control; we never enable it, so it stays 0.
        const USER_EXEC = 1 << 10;
        /// Software: the entry carries a pending type recalculation (with EMT = [`EMT_MARK`]).
        const RECALC = 1 << 11;
        const SUPPRESS_VE = 1 << 63;
    }
}

/// EPT memory type: uncacheable.
pub const EMT_UC: u8 = 0;
/// EPT memory type: write-back.
pub const EMT_WB: u8 = 6;
/// The invalid memory type written with a `recalc` mark. Any of 2, 3, 7 makes a
/// leaf misconfigured, and any non-zero value does in a non-leaf entry (bits 5:3
/// are reserved there). 7 sets the whole field, which makes marks easy to spot in
/// a table dump.
pub const EMT_MARK: u8 = 7;

/// In a marked non-leaf entry: the mark is scoped, it recomputes only the
/// gfn ranges the p2m records for the entry. Bit 52 is a type bit in a leaf;
/// non-leaf entries have no type, and the CPU ignores the bit in both.
pub(crate) const SCOPED: u64 = 1 << 52;

/// Bits 51:12: the physical address field.
pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// A software field spread over ignored bits (positions listed low to high).
pub(crate) struct SwField(&'static [u8]);

impl SwField {
    pub(crate) const TYPE: SwField = SwField(&[52, 53, 54]);
    pub(crate) const ACCESS: SwField = SwField(&[55, 56, 59, 62]);

    pub(crate) fn get(&self, raw: u64) -> u8 {
        self.0
            .iter()
            .enumerate()
            .fold(0, |v, (i, &bit)| v | (((raw >> bit) & 1) as u8) << i)
    }

    pub(crate) fn set(&self, raw: u64, value: u8) -> u64 {
        self.0.iter().enumerate().fold(raw, |r, (i, &bit)| {
            (r & !(1 << bit)) | ((((value >> i) & 1) as u64) << bit)
        })
    }

    #[cfg(test)]
    pub(crate) fn mask(&self) -> u64 {
        self.0.iter().fold(0, |m, &bit| m | 1 << bit)
    }
}

/// One 64-bit EPT entry.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct EptEntry(pub u64);

impl core::fmt::Debug for EptEntry {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "EptEntry({:#018x})", self.0)
    }
}

impl EptEntry {
    /// The content of a slot that maps nothing: not present, #VE suppressed.
    /// New tables are filled with it so a #VE is only ever delivered where a
    /// monitor cleared the bit on purpose.
    pub const EMPTY: EptEntry = EptEntry(EptFlags::SUPPRESS_VE.bits());

    pub const fn flags(self) -> EptFlags {
        EptFlags::from_bits_retain(self.0)
    }

    /// Present to the CPU: any of R/W/X set (SDM: bits 2:0 not 000b).
    pub const fn is_present(self) -> bool {
        self.0 & 0b111 != 0
    }

    /// Holds something for the p2m: references a table (always present) or
    /// maps a frame with a type, possibly with no rights at all (access `n`),
    /// which the CPU sees as not present. Xen's `is_epte_valid`.
    pub fn is_valid(self) -> bool {
        self.is_present() || self.p2m_type() != P2mType::Invalid
    }

    /// Whether this entry maps memory (rather than referencing a table) when
    /// found at `level` (0 = PTE).
    pub const fn is_leaf(self, level: u8) -> bool {
        level == 0 || self.0 & EptFlags::SUPERPAGE.bits() != 0
    }

    pub const fn rights(self) -> Rights {
        Rights::from_bits_truncate(self.0 as u8)
    }

    pub const fn emt(self) -> u8 {
        ((self.0 >> 3) & 0b111) as u8
    }

    pub const fn ipat(self) -> bool {
        self.0 & EptFlags::IPAT.bits() != 0
    }

    pub const fn suppress_ve(self) -> bool {
        self.0 & EptFlags::SUPPRESS_VE.bits() != 0
    }

    /// Carries a pending recalculation (and an invalid memory type).
    pub const fn is_marked(self) -> bool {
        self.0 & EptFlags::RECALC.bits() != 0
    }

    /// The frame in bits 51:12: the mapped frame of a leaf, the table of a non-leaf.
    pub const fn mfn(self) -> Mfn {
        Mfn((self.0 & ADDR_MASK) >> 12)
    }

    pub fn p2m_type(self) -> P2mType {
        P2mType::from_bits(SwField::TYPE.get(self.0))
    }

    pub fn access(self) -> P2mAccess {
        P2mAccess::from_bits(SwField::ACCESS.get(self.0))
    }

    /// A non-leaf entry referencing `table`. Full rights: leaves decide.
    pub const fn table(table: Mfn) -> EptEntry {
        EptEntry((table.0 << 12) | Rights::all().bits() as u64)
    }

    /// A leaf at `level` mapping `mfn` as `(ty, access)`, with R/W/X and memory
    /// type derived from them. A type of `invalid` gives a non-present slot that
    /// keeps only the suppress-#VE bit.
    pub fn leaf(mfn: Mfn, level: u8, ty: P2mType, access: P2mAccess, sve: bool) -> EptEntry {
        let sve_bit = if sve { EptFlags::SUPPRESS_VE.bits() } else { 0 };
        if ty == P2mType::Invalid {
            return EptEntry(sve_bit);
        }
        let mut raw = (mfn.0 << 12) & ADDR_MASK;
        if level > 0 {
            raw |= EptFlags::SUPERPAGE.bits();
        }
        raw = SwField::TYPE.set(raw, ty as u8);
        raw = SwField::ACCESS.set(raw, access as u8);
        EptEntry(raw | sve_bit).with_type_derived()
    }

    /// [`EptEntry::leaf`] for a p2m whose log-dirty pages are noticed by
    /// `mode` (see [`EptEntry::with_type_derived_in`]).
    pub fn leaf_in(
        mfn: Mfn,
        level: u8,
        ty: P2mType,
        access: P2mAccess,
        sve: bool,
        mode: LogMode,
    ) -> EptEntry {
        let e = EptEntry::leaf(mfn, level, ty, access, sve);
        if ty.is_present() {
            e.with_type_derived_in(mode)
        } else {
            e
        }
    }

    /// [`EptEntry::with_type_derived`] in a p2m whose log-dirty pages are
    /// noticed by `mode`. Under PML the EPT dirty flag is the log-dirty
    /// state: a `ram_logdirty` leaf gets it clear (a 4K one is writable, see
    /// [`P2mType::rights_in`]; the CPU sets the flag and logs the page on its
    /// first write), every other type gets accessed and dirty preset, so
    /// the CPU never logs its pages. A leaf at level 0 never has bit 7 set
    /// here, so it tells a superpage from a 4K page. For a present type only.
    pub fn with_type_derived_in(self, mode: LogMode) -> EptEntry {
        let e = self.with_type_derived();
        if mode == LogMode::WriteProtect {
            return e;
        }
        let ty = e.p2m_type();
        let superpage = e.0 & EptFlags::SUPERPAGE.bits() != 0;
        let rights = ty.rights_in(e.access(), mode, superpage).bits() as u64;
        let raw = (e.0 & !(Rights::all().bits() as u64)) | rights;
        let ad = (EptFlags::ACCESSED | EptFlags::DIRTY).bits();
        if ty == P2mType::RamLogdirty {
            EptEntry(raw & !EptFlags::DIRTY.bits())
        } else {
            EptEntry(raw | ad)
        }
    }

    /// The CPU set the dirty flag (EPT A/D on): a write went through it.
    pub const fn is_dirty(self) -> bool {
        self.0 & EptFlags::DIRTY.bits() != 0
    }

    /// The entry with its dirty flag cleared.
    pub const fn without_dirty(self) -> EptEntry {
        EptEntry(self.0 & !EptFlags::DIRTY.bits())
    }

    /// R/W/X, EMT and iPAT recomputed from the stored type and access; the mark
    /// cleared. Everything else (frame, superpage, A/D, suppress #VE) is kept.
    pub fn with_type_derived(self) -> EptEntry {
        let ty = self.p2m_type();
        let (emt, ipat) = ty.memory_type();
        let keep = !(Rights::all().bits() as u64
            | EptFlags::EMT.bits()
            | EptFlags::IPAT.bits()
            | EptFlags::RECALC.bits());
        let mut raw = (self.0 & keep) | ty.rights(self.access()).bits() as u64 | (emt as u64) << 3;
        if ipat {
            raw |= EptFlags::IPAT.bits();
        }
        EptEntry(raw)
    }

    pub fn with_type(self, ty: P2mType) -> EptEntry {
        EptEntry(SwField::TYPE.set(self.0, ty as u8))
    }

    /// The entry with a `recalc` mark: EMT = [`EMT_MARK`] makes the CPU take an
    /// EPT misconfiguration on any access through it, at any level.
    pub const fn marked(self) -> EptEntry {
        EptEntry(
            (self.0 & !EptFlags::EMT.bits()) | (EMT_MARK as u64) << 3 | EptFlags::RECALC.bits(),
        )
    }

    /// A non-leaf entry without its mark (non-leaf EMT bits are reserved: 0).
    pub const fn unmarked_table(self) -> EptEntry {
        EptEntry(self.0 & !(EptFlags::EMT.bits() | EptFlags::RECALC.bits() | SCOPED))
    }

    /// A non-leaf entry with a mark: exact (everything below it is
    /// recomputed) or scoped (only the ranges recorded for it).
    pub(crate) const fn marked_table(self, scoped: bool) -> EptEntry {
        let e = self.marked().0 & !SCOPED;
        EptEntry(if scoped { e | SCOPED } else { e })
    }

    /// A marked non-leaf entry whose mark is scoped. Meaningless for a leaf
    /// (bit 52 is part of its type).
    pub(crate) const fn is_scoped_table(self) -> bool {
        self.is_marked() && self.0 & SCOPED != 0
    }

    pub const fn with_suppress_ve(self, sve: bool) -> EptEntry {
        if sve {
            EptEntry(self.0 | EptFlags::SUPPRESS_VE.bits())
        } else {
            EptEntry(self.0 & !EptFlags::SUPPRESS_VE.bits())
        }
    }

    /// Child `i` of a superpage at `level` once split: same everything, frame
    /// offset, superpage bit dropped at level 0.
    pub const fn split_child(self, level: u8, i: usize) -> EptEntry {
        let child_level = level - 1;
        let mfn = self.mfn().0 + (i as u64) * crate::addr::level_pages(child_level);
        let mut raw = (self.0 & !ADDR_MASK) | ((mfn << 12) & ADDR_MASK);
        if child_level == 0 {
            raw &= !EptFlags::SUPERPAGE.bits();
        }
        EptEntry(raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn software_bits_are_the_documented_ones() {
        let sw = SwField::TYPE.mask() | SwField::ACCESS.mask() | EptFlags::RECALC.bits();
        let expected = (1 << 11) | (0b1_1111 << 52) | (1 << 59) | (1 << 62);
        assert_eq!(sw, expected);
        // Disjoint from every architectural field we use.
        let hw = EptFlags::all().bits() & !EptFlags::RECALC.bits();
        assert_eq!(sw & (hw | ADDR_MASK), 0);
        assert_eq!(SwField::TYPE.mask() & SwField::ACCESS.mask(), 0);
    }

    #[test]
    fn software_fields_round_trip() {
        for v in 0..16u8 {
            let raw = SwField::ACCESS.set(u64::MAX, v);
            assert_eq!(SwField::ACCESS.get(raw), v);
            assert_eq!(raw | SwField::ACCESS.mask(), u64::MAX, "other bits kept");
        }
        for v in 0..8u8 {
            assert_eq!(SwField::TYPE.get(SwField::TYPE.set(0, v)), v);
        }
    }

    #[test]
    fn leaf_encodes_type_access_and_derived_bits() {
        let e = EptEntry::leaf(Mfn(0x1234), 0, P2mType::RamRw, P2mAccess::Rx, true);
        assert!(e.is_present() && e.is_leaf(0) && !e.flags().contains(EptFlags::SUPERPAGE));
        assert_eq!(e.mfn(), Mfn(0x1234));
        assert_eq!(e.p2m_type(), P2mType::RamRw);
        assert_eq!(e.access(), P2mAccess::Rx);
        assert_eq!(e.rights(), Rights::R | Rights::X);
        assert_eq!(e.emt(), EMT_WB);
        assert!(e.suppress_ve() && !e.is_marked());
        let m = EptEntry::leaf(Mfn(0x200), 1, P2mType::MmioDirect, P2mAccess::Rwx, false);
        assert!(m.is_leaf(1) && m.emt() == EMT_UC && !m.suppress_ve());
        assert_eq!(
            EptEntry::leaf(Mfn(7), 0, P2mType::Invalid, P2mAccess::Rwx, true),
            EptEntry::EMPTY
        );
    }

    #[test]
    fn mark_and_fix_round_trip() {
        let e = EptEntry::leaf(Mfn(0x400), 1, P2mType::RamRw, P2mAccess::Rwx, true);
        let m = e.marked();
        assert!(m.is_marked() && m.emt() == EMT_MARK && m.mfn() == e.mfn());
        assert_eq!(m.with_type_derived(), e);
        let t = EptEntry::table(Mfn(0x99));
        assert_eq!(t.marked().unmarked_table(), t);
        let scoped = t.marked_table(true);
        assert!(scoped.is_scoped_table() && scoped.emt() == EMT_MARK);
        assert!(!scoped.marked_table(false).is_scoped_table());
        assert!(!t.is_scoped_table(), "an unmarked table is not scoped");
        assert_eq!(scoped.unmarked_table(), t);
    }

    #[test]
    fn under_pml_the_dirty_flag_is_the_log_dirty_state() {
        let pml = LogMode::Pml;
        let ld = EptEntry::leaf_in(Mfn(5), 0, P2mType::RamLogdirty, P2mAccess::Rwx, true, pml);
        assert_eq!(
            ld.rights(),
            Rights::all(),
            "a 4K log-dirty page is writable"
        );
        assert!(!ld.is_dirty());
        let big = EptEntry::leaf_in(Mfn(512), 1, P2mType::RamLogdirty, P2mAccess::Rwx, true, pml);
        assert_eq!(big.rights(), Rights::R | Rights::X, "a superpage is not");
        let rw = EptEntry::leaf_in(Mfn(5), 0, P2mType::RamRw, P2mAccess::Rwx, true, pml);
        assert!(
            rw.is_dirty() && rw.flags().contains(EptFlags::ACCESSED),
            "preset"
        );
        // Recomputing a written log-dirty page clears its flag; a page that
        // becomes log-dirty starts clean.
        let written = EptEntry(ld.0 | EptFlags::DIRTY.bits());
        assert!(!written.marked().with_type_derived_in(pml).is_dirty());
        assert!(
            !rw.with_type(P2mType::RamLogdirty)
                .with_type_derived_in(pml)
                .is_dirty()
        );
        assert_eq!(written.without_dirty(), ld);
        // Write-protect mode is the plain derivation; holes stay holes.
        let wp = EptEntry::leaf_in(
            Mfn(5),
            0,
            P2mType::RamLogdirty,
            P2mAccess::Rwx,
            true,
            LogMode::WriteProtect,
        );
        assert_eq!(
            wp,
            EptEntry::leaf(Mfn(5), 0, P2mType::RamLogdirty, P2mAccess::Rwx, true)
        );
        assert_eq!(
            EptEntry::leaf_in(Mfn(7), 0, P2mType::Invalid, P2mAccess::Rwx, true, pml),
            EptEntry::EMPTY
        );
    }

    #[test]
    fn split_children_offset_the_frame() {
        let e = EptEntry::leaf(Mfn(0x40000), 2, P2mType::RamRo, P2mAccess::R, false);
        let c = e.split_child(2, 3);
        assert_eq!(c.mfn(), Mfn(0x40000 + 3 * 512));
        assert!(c.is_leaf(1) && c.flags().contains(EptFlags::SUPERPAGE));
        let d = c.split_child(1, 511);
        assert_eq!(d.mfn(), Mfn(0x40000 + 3 * 512 + 511));
        assert!(!d.flags().contains(EptFlags::SUPERPAGE));
        assert_eq!(
            (d.p2m_type(), d.access(), d.suppress_ve()),
            (P2mType::RamRo, P2mAccess::R, false)
        );
    }
}
