//! The p2m as a 4-level EPT tree: creation, `set_entry`, `get_entry`, range
//! visits, reset and destruction.
//!
//! Every operation that may allocate first walks its path read-only to count
//! the tables it needs, allocates them all, and only then writes: an allocation
//! failure returns `Error::NoMemory` with the tree untouched.

use core::ops::ControlFlow;

use crate::Error;
use crate::addr::{ENTRIES, Gfn, Mfn, Order, ROOT_LEVEL, index, level_base, level_pages};
use crate::caps::EptCaps;
use crate::entry::{EMT_WB, EptEntry};
use crate::logdirty::LogDirtyRanges;
use crate::memory::EptMemory;
use crate::scope::Scopes;
use crate::types::{LogMode, P2mAccess, P2mType, Rights};

/// One guest-physical to machine map kept as an EPT tree: the host p2m or an
/// altp2m view. Not synchronized: callers serialize changes (the p2m lock);
/// the CPU may walk the tables at any time, and every write keeps them
/// consistent for it.
#[derive(Debug)]
pub struct P2m {
    root: Mfn,
    caps: EptCaps,
    max_mapped_pfn: Gfn,
    flush_needed: bool,
    ad_enabled: bool,
    pub(crate) log_mode: LogMode,
    pub(crate) logdirty: LogDirtyRanges,
    /// The ranges of scoped marks (see `scope.rs`).
    pub(crate) scopes: Scopes,
}

/// What `get_entry` reports for one gfn.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct EntryInfo {
    /// The frame behind this gfn (a superpage's base plus the offset), or
    /// `None` for a hole.
    pub mfn: Option<Mfn>,
    /// The type, recomputed if a mark is pending on the path.
    pub ty: P2mType,
    pub access: P2mAccess,
    /// Order of the mapping around the gfn, or of the hole around it (at most
    /// 1G). For a marked superpage that straddles a log-dirty boundary, the
    /// largest order around the gfn whose recomputed type is uniform, i.e. the
    /// mapping as it will be once resolved: a lazy copy at this order is exact.
    pub order: Order,
    /// Suppress-#VE bit of the entry (of the empty slot for a hole).
    pub sve: bool,
    /// A `recalc` mark is pending on the path (the CPU would take a misconfig).
    pub recalc: bool,
    /// A pending lazy type change covers this mapping: `ty` is what
    /// resolution will make of it (the stored type may differ). Implies
    /// `recalc`; a scoped mark on the path that does not cover the mapping
    /// gives `recalc` without `retype`.
    pub retype: bool,
}

/// A mapping as stored, pending marks not applied: what [`P2m::stored_leaf`]
/// reports.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct StoredLeaf {
    /// First gfn of the mapping.
    pub gfn: Gfn,
    pub order: Order,
    /// The stored type (not recomputed).
    pub ty: P2mType,
    /// A pending lazy type change covers the mapping: resolution will
    /// recompute it whole.
    pub marked: bool,
}

/// A mapping (a leaf with a type, rights or not) visited by [`P2m::for_each_leaf`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Leaf {
    /// First gfn of the mapping (may lie before the range visited).
    pub gfn: Gfn,
    pub order: Order,
    /// Frame of `gfn`.
    pub mfn: Mfn,
    /// Type, recomputed if marked (as `EntryInfo::ty`).
    pub ty: P2mType,
    pub access: P2mAccess,
    pub sve: bool,
    /// A mark is pending on the path (as `EntryInfo::recalc`).
    pub recalc: bool,
}

/// The state of a `for_each_leaf` walk: the range and the visitor.
struct Visit<'f, F> {
    start: u64,
    end: u64,
    f: &'f mut F,
}

/// Where a gfn's walk ended: the leaf or the non-present slot.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Lookup {
    pub(crate) entry: EptEntry,
    pub(crate) level: u8,
    /// A mark on the entry or on any entry above it.
    pub(crate) marked: bool,
    /// Resolution will recompute the leaf: an exact mark on the path, or a
    /// scoped one whose ranges meet the leaf.
    pub(crate) recompute: bool,
}

/// The marks met on the way down a path: whether one was exact, and the
/// scoped ones (at most one per non-leaf level).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PathMarks {
    pub(crate) any: bool,
    exact: bool,
    scoped: [(u8, u64); ROOT_LEVEL as usize],
    n: usize,
}

impl PathMarks {
    /// Adds the marked entry `e` at `level` (first gfn `base`) to the path.
    #[inline]
    pub(crate) fn add(&mut self, e: EptEntry, level: u8, base: u64) {
        self.any = true;
        if e.is_leaf(level) || !e.is_scoped_table() || self.n == self.scoped.len() {
            self.exact = true;
        } else {
            self.scoped[self.n] = (level, base);
            self.n += 1;
        }
    }

    /// Whether resolution recomputes a leaf over `[first, last]` below them.
    #[inline]
    pub(crate) fn recompute(&self, scopes: &Scopes, first: u64, last: u64) -> bool {
        self.exact
            || self.scoped[..self.n]
                .iter()
                .any(|&(lv, base)| scopes.intersects(lv, base, first, last))
    }
}

/// Frames allocated before a change starts, so the change cannot fail halfway.
pub(crate) struct Frames {
    list: [Mfn; ROOT_LEVEL as usize],
    len: usize,
}

impl Frames {
    /// Allocates `n` frames (at most 3), or none at all.
    pub(crate) fn reserve<M: EptMemory + ?Sized>(mem: &mut M, n: usize) -> Result<Frames, Error> {
        let mut f = Frames {
            list: [Mfn(0); ROOT_LEVEL as usize],
            len: 0,
        };
        debug_assert!(n <= f.list.len());
        while f.len < n.min(f.list.len()) {
            match mem.alloc_frame() {
                Some(frame) => {
                    f.list[f.len] = frame;
                    f.len += 1;
                }
                None => {
                    f.give_back(mem);
                    return Err(Error::NoMemory);
                }
            }
        }
        Ok(f)
    }

    /// A reserved frame. The planning walks count exactly; should one ever be
    /// short, allocate rather than panic.
    pub(crate) fn take<M: EptMemory + ?Sized>(&mut self, mem: &mut M) -> Result<Mfn, Error> {
        debug_assert!(self.len > 0, "table count planned too low");
        if self.len == 0 {
            return mem.alloc_frame().ok_or(Error::NoMemory);
        }
        self.len -= 1;
        Ok(self.list[self.len])
    }

    /// Ends a change that used every frame it reserved.
    pub(crate) fn release<M: EptMemory + ?Sized>(self, mem: &mut M) {
        debug_assert!(self.len == 0, "table count planned too high");
        self.give_back(mem);
    }

    fn give_back<M: EptMemory + ?Sized>(self, mem: &mut M) {
        for &frame in &self.list[..self.len] {
            mem.free_frame(frame);
        }
    }
}

pub(crate) fn read<M: EptMemory + ?Sized>(mem: &M, table: Mfn, i: usize) -> EptEntry {
    EptEntry(mem.read_entry(table, i))
}

pub(crate) fn write<M: EptMemory + ?Sized>(mem: &mut M, table: Mfn, i: usize, e: EptEntry) {
    mem.write_entry(table, i, e.0);
}

/// Indices of the entries of a table at `level` starting at `base` that
/// intersect `[start, end]` (which must intersect the table).
pub(crate) fn span(level: u8, base: u64, start: u64, end: u64) -> core::ops::RangeInclusive<usize> {
    let shift = level as u32 * 9;
    let last_gfn = base + (level_pages(level) << 9) - 1;
    let first = (start.max(base) - base) >> shift;
    let last = (end.min(last_gfn) - base) >> shift;
    first as usize..=last as usize
}

impl P2m {
    /// An empty p2m: one root table, every slot empty.
    pub fn new<M: EptMemory + ?Sized>(mem: &mut M, caps: EptCaps) -> Result<P2m, Error> {
        let root = mem.alloc_frame().ok_or(Error::NoMemory)?;
        fill_empty(mem, root);
        Ok(P2m {
            root,
            caps,
            max_mapped_pfn: Gfn(0),
            flush_needed: false,
            ad_enabled: false,
            log_mode: LogMode::WriteProtect,
            logdirty: LogDirtyRanges::new(),
            scopes: Scopes::new(),
        })
    }

    pub fn caps(&self) -> &EptCaps {
        &self.caps
    }

    /// The root (PML4) table frame.
    pub fn root(&self) -> Mfn {
        self.root
    }

    /// The EPTP for this p2m: WB paging-structure memory type (bits 2:0 = 6),
    /// 4-level walk (bits 5:3 = 3), A/D flags (bit 6) if enabled, root address.
    /// SDM Vol. 3C "Extended-Page-Table Pointer (EPTP)".
    pub fn eptp(&self) -> u64 {
        self.root.hpa() | EMT_WB as u64 | (3 << 3) | (self.ad_enabled as u64) << 6
    }

    /// Turns EPT accessed/dirty flags on or off in [`P2m::eptp`]. Not off
    /// while PML notices the log-dirty writes ([`P2m::set_log_mode`]).
    pub fn set_ad_enabled(&mut self, on: bool) -> Result<(), Error> {
        if on && !self.caps.ad_flags {
            return Err(Error::Unsupported);
        }
        if !on && self.log_mode == LogMode::Pml {
            return Err(Error::Unsupported);
        }
        self.ad_enabled = on;
        Ok(())
    }

    /// How writes to `ram_logdirty` pages are noticed: write protection
    /// (the default) or PML, which needs A/D flags on. Set it on an empty
    /// p2m: leaves are encoded for the mode (refused with `Unsupported`
    /// otherwise).
    pub fn set_log_mode<M: EptMemory + ?Sized>(
        &mut self,
        mem: &M,
        mode: LogMode,
    ) -> Result<(), Error> {
        if mode == LogMode::Pml && !self.ad_enabled {
            return Err(Error::Unsupported);
        }
        if mode != self.log_mode && (0..ENTRIES).any(|i| read(mem, self.root, i).is_valid()) {
            return Err(Error::Unsupported);
        }
        self.log_mode = mode;
        Ok(())
    }

    pub fn log_mode(&self) -> LogMode {
        self.log_mode
    }

    /// The rights the CPU gets from a leaf of `ty` under `access` mapping
    /// `order` in this p2m (see [`P2mType::rights_in`]).
    pub fn rights(&self, ty: P2mType, access: P2mAccess, order: Order) -> Rights {
        ty.rights_in(access, self.log_mode, order != Order::PAGE_4K)
    }

    /// The grow-only bound: no present entry lies above it.
    pub fn max_mapped_pfn(&self) -> Gfn {
        self.max_mapped_pfn
    }

    /// Whether a change since the last [`P2m::take_flush_needed`] reduced
    /// rights, dropped or marked a mapping, or freed a table: the guest must
    /// not run on this p2m again before an INVEPT for its EPTP on every CPU.
    pub fn flush_needed(&self) -> bool {
        self.flush_needed
    }

    /// Returns and clears the INVEPT request.
    pub fn take_flush_needed(&mut self) -> bool {
        core::mem::take(&mut self.flush_needed)
    }

    pub(crate) fn request_flush(&mut self) {
        self.flush_needed = true;
    }

    /// The log-dirty ranges and global flag of this p2m.
    pub fn logdirty(&self) -> &LogDirtyRanges {
        &self.logdirty
    }

    /// How many ranges the scoped marks of this p2m record (heap: 32 bytes
    /// each). Zero when no scoped mark is pending.
    pub fn scope_records(&self) -> usize {
        self.scopes.len()
    }

    /// The (level, first gfn) of every entry with recorded ranges, for tests
    /// that check them against the scoped marks in the tables.
    #[cfg(feature = "sim")]
    pub fn scoped_entries(&self) -> alloc::vec::Vec<(u8, u64)> {
        self.scopes.keys()
    }

    /// Makes room so that the next `change_type_range` cannot fail for want
    /// of heap (it adds or splits at most one range).
    pub fn reserve_logdirty(&mut self) -> Result<(), Error> {
        self.logdirty.reserve(1)
    }

    /// Walks to the leaf or non-present slot of `gfn`. No bound check.
    #[inline]
    pub(crate) fn lookup<M: EptMemory + ?Sized>(&self, mem: &M, gfn: u64) -> Lookup {
        let mut table = self.root;
        let mut marked = false;
        let mut level = ROOT_LEVEL;
        loop {
            let e = read(mem, table, index(gfn, level));
            if !e.is_valid() {
                return Lookup {
                    entry: e,
                    level,
                    marked,
                    recompute: false,
                };
            }
            marked |= e.is_marked();
            if e.is_leaf(level) {
                return Lookup {
                    entry: e,
                    level,
                    marked,
                    // Marks are rare: only then walk again to see what they are.
                    recompute: marked && self.recomputes(mem, gfn, level),
                };
            }
            table = e.mfn();
            level -= 1;
        }
    }

    /// Whether resolution recomputes the leaf of `gfn`, found at `leaf_level`
    /// under at least one mark.
    #[cold]
    #[inline(never)]
    fn recomputes<M: EptMemory + ?Sized>(&self, mem: &M, gfn: u64, leaf_level: u8) -> bool {
        let mut marks = PathMarks::default();
        let mut table = self.root;
        for level in (leaf_level..=ROOT_LEVEL).rev() {
            let e = read(mem, table, index(gfn, level));
            if e.is_marked() {
                marks.add(e, level, level_base(gfn, level));
            }
            table = e.mfn();
        }
        let base = level_base(gfn, leaf_level);
        marks.recompute(&self.scopes, base, base + level_pages(leaf_level) - 1)
    }

    /// The mapping of `gfn`: frame, type (recomputed if marked), access, the
    /// order of the mapping or hole around it, suppress-#VE. Above
    /// `max_mapped_pfn` it answers "hole" without reading the tables.
    pub fn get_entry<M: EptMemory + ?Sized>(&self, mem: &M, gfn: Gfn) -> Result<EntryInfo, Error> {
        let g = gfn.check()?.0;
        if g > self.max_mapped_pfn.0 {
            // The largest aligned block around g that lies wholly above the
            // bound is a hole, by the bound's invariant.
            let order = [Order::PAGE_1G, Order::PAGE_2M]
                .into_iter()
                .find(|o| level_base(g, o.level()) > self.max_mapped_pfn.0)
                .unwrap_or(Order::PAGE_4K);
            return Ok(hole(order, true));
        }
        let l = self.lookup(mem, g);
        let level = l.level.min(Order::PAGE_1G.level());
        if !l.entry.is_valid() {
            return Ok(hole(Order::of_level(level), l.entry.suppress_ve()));
        }
        let (ty, level) = if l.recompute {
            self.logdirty.uniform_at(l.entry.p2m_type(), g, level)
        } else {
            (l.entry.p2m_type(), level)
        };
        Ok(EntryInfo {
            mfn: Some(Mfn(l.entry.mfn().0 + (g - level_base(g, l.level)))),
            ty,
            access: l.entry.access(),
            order: Order::of_level(level),
            sve: l.entry.suppress_ve(),
            recalc: l.marked,
            retype: l.recompute,
        })
    }

    /// The stored mapping that holds `gfn`, or `None` for a hole. A lazy type
    /// change recomputes whole stored mappings: a caller that needs to know
    /// how far a change reaches looks here (`get_entry` reports the
    /// recomputed, possibly smaller, uniform block instead).
    pub fn stored_leaf<M: EptMemory + ?Sized>(
        &self,
        mem: &M,
        gfn: Gfn,
    ) -> Result<Option<StoredLeaf>, Error> {
        let g = gfn.check()?.0;
        if g > self.max_mapped_pfn.0 {
            return Ok(None);
        }
        let l = self.lookup(mem, g);
        if !l.entry.is_valid() || !l.entry.is_leaf(l.level) {
            return Ok(None);
        }
        Ok(Some(StoredLeaf {
            gfn: Gfn(level_base(g, l.level)),
            order: Order::of_level(l.level),
            ty: l.entry.p2m_type(),
            marked: l.recompute,
        }))
    }

    /// Maps `[gfn, gfn + 2^order)` to `mfn..` as `(ty, access)`, or removes
    /// the mappings there when `ty` is `Invalid` (then `mfn` and `access` are
    /// ignored). A smaller page inside a superpage splits it; a superpage over
    /// a subtree frees the subtree's tables. Pending marks on the path are
    /// pushed down first. The suppress-#VE bit of the slot is kept (set if the
    /// slot held a subtree).
    pub fn set_entry<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        gfn: Gfn,
        mfn: Mfn,
        order: Order,
        ty: P2mType,
        access: P2mAccess,
    ) -> Result<(), Error> {
        self.set_entry_sve(mem, gfn, mfn, order, ty, access, None)
    }

    /// [`P2m::set_entry`] with the suppress-#VE bit given (`None`: keep it).
    /// Removing (`Invalid`) never creates tables, so on a hole it is a no-op
    /// and `sve` is not recorded.
    #[allow(clippy::too_many_arguments)] // set_entry's six plus the bit.
    pub fn set_entry_sve<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        gfn: Gfn,
        mfn: Mfn,
        order: Order,
        ty: P2mType,
        access: P2mAccess,
        sve: Option<bool>,
    ) -> Result<(), Error> {
        let g = gfn.check()?.0;
        let target = order.level();
        if (target == 1 && !self.caps.pages_2m) || (target == 2 && !self.caps.pages_1g) {
            return Err(Error::BadOrder);
        }
        if !order.aligned(g) {
            return Err(Error::Misaligned);
        }
        if ty.is_present() {
            if mfn.0 >= self.caps.mfn_limit() {
                return Err(Error::MfnOutOfRange);
            }
            if !order.aligned(mfn.0) {
                return Err(Error::Misaligned);
            }
            if !access.is_representable(&self.caps) {
                return Err(Error::UnsupportedAccess);
            }
        }
        let Some(needed) = self.tables_needed(mem, g, target, ty.is_present()) else {
            return Ok(()); // removing from a hole
        };
        let mut frames = Frames::reserve(mem, needed)?;
        let table = self.descend_for_write(mem, &mut frames, g, target)?;
        frames.release(mem);

        let i = index(g, target);
        let old = read(mem, table, i);
        let subtree = old.is_valid() && !old.is_leaf(target);
        let sve = sve.unwrap_or(subtree || old.suppress_ve());
        let new = EptEntry::leaf_in(mfn, target, ty, access, sve, self.log_mode);
        write(mem, table, i, new);
        if subtree {
            free_subtree(mem, old.mfn(), target - 1);
            self.scopes.remove_within(target, g, g + order.pages() - 1);
        }
        if reduces(old, new, target) {
            self.flush_needed = true;
        }
        if ty.is_present() {
            let last = Gfn(g + order.pages() - 1);
            self.max_mapped_pfn = self.max_mapped_pfn.max(last);
        }
        Ok(())
    }

    /// Sets or clears the suppress-#VE bit of the 4K mapping of `gfn`
    /// (splitting a superpage), keeping frame, type and access.
    pub fn set_suppress_ve<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        gfn: Gfn,
        sve: bool,
    ) -> Result<(), Error> {
        let e = self.get_entry(mem, gfn)?;
        let mfn = e.mfn.ok_or(Error::NotMapped)?;
        self.set_entry_sve(mem, gfn, mfn, Order::PAGE_4K, e.ty, e.access, Some(sve))
    }

    /// Tables a write at `target` for `gfn` must create: one per level between
    /// the first non-present slot or superpage on the path and the target.
    /// `None` when removing and the path ends in a hole above the target.
    fn tables_needed<M: EptMemory + ?Sized>(
        &self,
        mem: &M,
        gfn: u64,
        target: u8,
        present: bool,
    ) -> Option<usize> {
        let l = self.lookup(mem, gfn);
        if l.level <= target {
            return Some(0);
        }
        if !l.entry.is_valid() && !present {
            return None;
        }
        Some((l.level - target) as usize)
    }

    /// Walks from the root to the table at `target` for `gfn`, creating empty
    /// tables in holes, splitting superpages and pushing marks down on the way.
    /// Returns that table.
    fn descend_for_write<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        frames: &mut Frames,
        gfn: u64,
        target: u8,
    ) -> Result<Mfn, Error> {
        let mut table = self.root;
        for level in (target + 1..=ROOT_LEVEL).rev() {
            let i = index(gfn, level);
            let e = read(mem, table, i);
            let base = level_base(gfn, level);
            table = if !e.is_valid() {
                let t = frames.take(mem)?;
                fill_empty(mem, t);
                write(mem, table, i, EptEntry::table(t));
                t
            } else if e.is_leaf(level) {
                let t = frames.take(mem)?;
                self.fill_split(mem, t, e, level, base);
                write(mem, table, i, EptEntry::table(t));
                t
            } else {
                if e.is_marked() {
                    self.push_mark(mem, e, level, base);
                    write(mem, table, i, e.unmarked_table());
                }
                e.mfn()
            };
        }
        Ok(table)
    }

    /// Writes into fresh table `t` the 512 children of superpage `e` (at
    /// `level`, first gfn `base`): same everything, frame offset. If `e` was
    /// marked, the mark is pushed into them.
    pub(crate) fn fill_split<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        t: Mfn,
        e: EptEntry,
        level: u8,
        base: u64,
    ) {
        let child_pages = level_pages(level - 1);
        for i in 0..ENTRIES {
            let mut c = e.split_child(level, i);
            if e.is_marked() {
                c = self.pushed_exact(c, level - 1, base + i as u64 * child_pages);
            } else if self.log_mode == LogMode::Pml {
                // A log-dirty page becomes writable once it is 4K.
                c = c.with_type_derived_in(self.log_mode);
            }
            write(mem, t, i, c);
        }
    }

    /// Calls `f` for every present mapping that intersects `[start, end]`
    /// (clipped to `max_mapped_pfn`), in gfn order, skipping empty subtrees.
    /// A marked superpage that straddles a log-dirty boundary is reported as
    /// the uniform pieces it will resolve into. Stops when `f` breaks.
    pub fn for_each_leaf<M, F>(
        &self,
        mem: &M,
        start: Gfn,
        end: Gfn,
        mut f: F,
    ) -> Result<ControlFlow<()>, Error>
    where
        M: EptMemory + ?Sized,
        F: FnMut(&Leaf) -> ControlFlow<()>,
    {
        let (start, end) = (start.check()?.0, end.check()?.0);
        if start > end {
            return Err(Error::BadRange);
        }
        let end = end.min(self.max_mapped_pfn.0);
        if start > end {
            return Ok(ControlFlow::Continue(()));
        }
        let mut v = Visit {
            start,
            end,
            f: &mut f,
        };
        Ok(self.visit(mem, &mut v, self.root, ROOT_LEVEL, 0, &PathMarks::default()))
    }

    /// Whether any present mapping intersects `[start, end]`.
    pub fn any_present<M: EptMemory + ?Sized>(
        &self,
        mem: &M,
        start: Gfn,
        end: Gfn,
    ) -> Result<bool, Error> {
        Ok(self
            .for_each_leaf(mem, start, end, |_| ControlFlow::Break(()))?
            .is_break())
    }

    fn visit<M, F>(
        &self,
        mem: &M,
        v: &mut Visit<'_, F>,
        table: Mfn,
        level: u8,
        base: u64,
        marks: &PathMarks,
    ) -> ControlFlow<()>
    where
        M: EptMemory + ?Sized,
        F: FnMut(&Leaf) -> ControlFlow<()>,
    {
        for i in span(level, base, v.start, v.end) {
            let e = read(mem, table, i);
            if !e.is_valid() {
                continue;
            }
            let ebase = base + i as u64 * level_pages(level);
            let with_e;
            let marks = if e.is_marked() {
                let mut m = *marks;
                m.add(e, level, ebase);
                with_e = m;
                &with_e
            } else {
                marks
            };
            if e.is_leaf(level) {
                let last = ebase + level_pages(level) - 1;
                let recompute = marks.recompute(&self.scopes, ebase, last);
                self.report_leaf(v, e, level, ebase, (marks.any, recompute))?;
            } else {
                self.visit(mem, v, e.mfn(), level - 1, ebase, marks)?;
            }
        }
        ControlFlow::Continue(())
    }

    /// Reports leaf `e`; `(marked, recompute)`: a mark is on its path, and
    /// resolution will recompute it.
    fn report_leaf<F>(
        &self,
        v: &mut Visit<'_, F>,
        e: EptEntry,
        level: u8,
        base: u64,
        (marked, recompute): (bool, bool),
    ) -> ControlFlow<()>
    where
        F: FnMut(&Leaf) -> ControlFlow<()>,
    {
        let last = base + level_pages(level) - 1;
        let ty = if recompute {
            match self.logdirty.recalc_type(e.p2m_type(), base, last) {
                Some(ty) => ty,
                None => {
                    // Straddles: report the children it will split into.
                    for i in span(level - 1, base, v.start, v.end) {
                        let c = e.split_child(level, i);
                        let cbase = base + i as u64 * level_pages(level - 1);
                        self.report_leaf(v, c, level - 1, cbase, (true, true))?;
                    }
                    return ControlFlow::Continue(());
                }
            }
        } else {
            e.p2m_type()
        };
        (v.f)(&Leaf {
            gfn: Gfn(base),
            order: Order::of_level(level),
            mfn: e.mfn(),
            ty,
            access: e.access(),
            sve: e.suppress_ve(),
            recalc: marked,
        })
    }

    /// Empties the p2m: frees every table below the root, clears the root and
    /// resets `max_mapped_pfn` to 0 (the only way it goes down, sound because
    /// nothing is mapped any more). Log-dirty state is kept. Xen's
    /// `p2m_flush_table`; used when a view is reset or activated.
    pub fn reset<M: EptMemory + ?Sized>(&mut self, mem: &mut M) {
        for i in 0..ENTRIES {
            let e = read(mem, self.root, i);
            if e.is_valid() {
                write(mem, self.root, i, EptEntry::EMPTY);
                free_subtree(mem, e.mfn(), ROOT_LEVEL - 1);
                self.flush_needed = true;
            }
        }
        self.scopes.clear();
        self.max_mapped_pfn = Gfn(0);
    }

    /// The frames of its tables, the root included, as they are now: what
    /// the p2m holds of the hypervisor's memory (a view fills lazily, so
    /// this says how much of the guest it copied). Reads every table once.
    pub fn table_frames<M: EptMemory + ?Sized>(&self, mem: &M) -> u64 {
        tables_from(mem, self.root, ROOT_LEVEL)
    }

    /// Frees every table, the root included. The caller must have stopped all
    /// use of the EPTP (and flushed it) before the frames are reused.
    pub fn destroy<M: EptMemory + ?Sized>(mut self, mem: &mut M) {
        self.reset(mem);
        mem.free_frame(self.root);
    }
}

fn hole(order: Order, sve: bool) -> EntryInfo {
    EntryInfo {
        mfn: None,
        ty: P2mType::Invalid,
        access: P2mAccess::N,
        order,
        sve,
        recalc: false,
        retype: false,
    }
}

pub(crate) fn fill_empty<M: EptMemory + ?Sized>(mem: &mut M, table: Mfn) {
    for i in 0..ENTRIES {
        write(mem, table, i, EptEntry::EMPTY);
    }
}

/// `table` (at `level`) and the tables below it: their number.
fn tables_from<M: EptMemory + ?Sized>(mem: &M, table: Mfn, level: u8) -> u64 {
    if level == 0 {
        return 1;
    }
    let below = (0..ENTRIES)
        .map(|i| read(mem, table, i))
        .filter(|e| e.is_valid() && !e.is_leaf(level))
        .map(|e| tables_from(mem, e.mfn(), level - 1))
        .sum::<u64>();
    1 + below
}

/// Frees `table` (at `level`) and every table below it.
pub(crate) fn free_subtree<M: EptMemory + ?Sized>(mem: &mut M, table: Mfn, level: u8) {
    if level > 0 {
        for i in 0..ENTRIES {
            let e = read(mem, table, i);
            if e.is_valid() && !e.is_leaf(level) {
                free_subtree(mem, e.mfn(), level - 1);
            }
        }
    }
    mem.free_frame(table);
}

/// Whether replacing `old` by `new` (at `level`) can leave a CPU with a cached
/// translation that allows more than the new entry: a dropped mapping or
/// subtree, another frame, fewer rights, another memory type.
fn reduces(old: EptEntry, new: EptEntry, level: u8) -> bool {
    if !old.is_valid() {
        return false;
    }
    if !old.is_leaf(level) || !new.is_valid() || old.mfn() != new.mfn() {
        return true;
    }
    if !old.rights().difference(new.rights()).is_empty() {
        return true;
    }
    // With A/D on, a translation cached as dirty writes without setting the
    // flag again: under PML such a write would not be logged.
    if old.is_dirty() && !new.is_dirty() {
        return true;
    }
    // A marked entry cannot be cached, and marking already asked for a flush.
    !old.is_marked() && (old.emt() != new.emt() || old.ipat() != new.ipat())
}
