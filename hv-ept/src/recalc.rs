//! Lazy bulk type changes through EPT misconfiguration.
//!
//! `change_type_range`/`change_type_global` record the new log-dirty state and
//! mark the fewest, highest present entries covering the range with an invalid
//! memory type plus the `recalc` bit; the CPU then takes an EPT misconfiguration
//! on the next access through them. `resolve_misconfig` walks the faulting
//! gfn's path: a marked non-leaf pushes its mark into its child table, a marked
//! leaf gets its type recomputed from this p2m's log-dirty state (its whole
//! leaf table at once), and a marked superpage that straddles a log-dirty
//! boundary is split (children keep the mark). Resolution never makes an entry
//! present and never changes a frame, so `max_mapped_pfn` is left alone.
//!
//! Marking a range costs at most two entry writes per level per end of the
//! range (below the root, which has no parent to mark): in a table where the
//! range would need more (a long run of covered entries beside an end), the
//! entry above is marked whole instead, with a scoped mark (`scope.rs`) so
//! that only the range is recomputed. The scoped entry is the lowest that
//! keeps the budget, so the exits it adds beside the range stay few.
//!
//! Recalculation only moves `ram_rw` <-> `ram_logdirty` (the "changeable"
//! types): a page is `ram_logdirty` iff it lies in a log-dirty range or global
//! log-dirty is on. Other types just get their memory type back. `from`/`to`
//! of a change therefore only say how the log-dirty state changes; the marked
//! entries are all recomputed from that state.

use crate::Error;
use crate::addr::{ENTRIES, Gfn, Mfn, ROOT_LEVEL, index, level_base, level_pages};
use crate::entry::EptEntry;
use crate::memory::EptMemory;
use crate::p2m::{Frames, P2m, read, span, write};
use crate::types::P2mType;

impl P2m {
    /// Changes the type of `[start, end]` from `from` to `to`, lazily. Only
    /// `RamRw` -> `RamLogdirty` (start tracking; also the re-arm after a
    /// clean) and back are supported. The log-dirty range is recorded whole;
    /// marking is clipped to `max_mapped_pfn`, inclusively (a one-page range
    /// at the bound is marked).
    pub fn change_type_range<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        start: Gfn,
        end: Gfn,
        from: P2mType,
        to: P2mType,
    ) -> Result<(), Error> {
        let (s, e) = check_type_range(start, end, from, to)?;
        if from == to {
            return Ok(());
        }
        if to == P2mType::RamLogdirty {
            self.logdirty.add(s, e)?;
        } else {
            self.logdirty.remove(s, e)?;
        }
        self.mark_for_recalc(mem, s, e);
        Ok(())
    }

    /// Marks `[start, end]` so that every `ram_rw`/`ram_logdirty` mapping
    /// there is recomputed from this p2m's log-dirty state, which stays as
    /// it is: the re-arm of a clean, over a window that may hold many
    /// tracked ranges and the gaps between them (pages in the gaps stay
    /// `ram_rw`). Clipped to `max_mapped_pfn` inclusively; the same
    /// marking, at most 2 entry writes per level per end, as
    /// [`P2m::change_type_range`].
    pub fn rearm_range<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        start: Gfn,
        end: Gfn,
    ) -> Result<(), Error> {
        let (s, e) = (start.check()?.0, end.check()?.0);
        if s > e {
            return Err(Error::BadRange);
        }
        self.mark_for_recalc(mem, s, e);
        Ok(())
    }

    fn mark_for_recalc<M: EptMemory + ?Sized>(&mut self, mem: &mut M, s: u64, e: u64) {
        let e = e.min(self.max_mapped_pfn().0);
        if s <= e && self.mark_range(mem, self.root(), ROOT_LEVEL, 0, (s, e), true) > 0 {
            self.request_flush();
        }
    }

    /// Turns global log-dirty on (`RamRw` -> `RamLogdirty`) or off, and marks
    /// every present root entry so the whole p2m follows. Calling it again
    /// with the same direction re-arms (dirtied pages become log-dirty again).
    pub fn change_type_global<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        from: P2mType,
        to: P2mType,
    ) -> Result<(), Error> {
        check_type_change(from, to)?;
        if from == to {
            return Ok(());
        }
        self.logdirty.set_global(to == P2mType::RamLogdirty);
        self.mark_all(mem);
        Ok(())
    }

    /// Takes this p2m's log-dirty ranges and global flag from `other` (a view
    /// being activated takes the host's). If that changes anything, every
    /// present entry is marked so existing mappings follow the new state.
    pub fn copy_logdirty_from<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        other: &P2m,
    ) -> Result<(), Error> {
        if self.logdirty == other.logdirty {
            return Ok(());
        }
        self.logdirty.copy_from(&other.logdirty)?;
        self.mark_all(mem);
        Ok(())
    }

    fn mark_all<M: EptMemory + ?Sized>(&mut self, mem: &mut M) {
        let mut marked = false;
        for i in 0..ENTRIES {
            let e = read(mem, self.root(), i);
            if e.is_valid() && (!e.is_marked() || e.is_scoped_table()) {
                self.scopes
                    .remove(ROOT_LEVEL, i as u64 * level_pages(ROOT_LEVEL));
                write(mem, self.root(), i, e.marked_table(false));
                marked = true;
            }
        }
        if marked {
            self.request_flush();
        }
    }

    /// Marks `[start, end]` under `table` (at `level`, first gfn `base`),
    /// with the highest present entries that cover it and, where an entry
    /// straddles an end, either the entries below it (while that keeps the
    /// budget, see [`P2m::fits`]) or the entry itself with a scoped mark.
    /// `scope`: scoped marks allowed (else every mark is exact, as when no
    /// record can be stored). Returns the entries written.
    fn mark_range<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        table: Mfn,
        level: u8,
        base: u64,
        (start, end): (u64, u64),
        scope: bool,
    ) -> u64 {
        let mut written = 0;
        for i in span(level, base, start, end) {
            let e = read(mem, table, i);
            if !e.is_valid() {
                continue;
            }
            let (ebase, covered, part) = piece(level, base, i, (start, end));
            if e.is_leaf(level) {
                // A partly covered superpage is marked whole: resolution
                // splits it if its pages end up with different types.
                if !e.is_marked() && e.p2m_type().is_changeable() {
                    write(mem, table, i, e.marked());
                    written += 1;
                }
                continue;
            }
            if e.is_marked() && !e.is_scoped_table() {
                continue; // an exact mark covers everything below it
            }
            if covered {
                self.scopes.remove(level, ebase);
                write(mem, table, i, e.marked_table(false));
                written += 1;
                continue;
            }
            if e.is_marked() {
                // Scoped already: its ranges grow, no write.
                if self.scopes.add(level, ebase, part.0, part.1).is_err() {
                    written += self.mark_range(mem, e.mfn(), level - 1, ebase, part, false);
                }
                continue;
            }
            if !scope || self.fits(mem, e.mfn(), level - 1, ebase, part) {
                written += self.mark_range(mem, e.mfn(), level - 1, ebase, part, scope);
            } else if self.scopes.add(level, ebase, part.0, part.1).is_ok() {
                write(mem, table, i, e.marked_table(true));
                written += 1;
            } else {
                written += self.mark_range(mem, e.mfn(), level - 1, ebase, part, false);
            }
        }
        written
    }

    /// Whether marking `[start, end]` inside `table` (at `level`, first gfn
    /// `base`; the range meets the table but does not cover it) takes at
    /// most two writes in this table per end of the range that lies inside
    /// it: one per covered entry, one per straddling leaf, one per
    /// straddling table that does not fit itself (it gets a scoped mark).
    fn fits<M: EptMemory + ?Sized>(
        &self,
        mem: &M,
        table: Mfn,
        level: u8,
        base: u64,
        (start, end): (u64, u64),
    ) -> bool {
        let last = base + (level_pages(level) << 9) - 1;
        let ends = (start > base) as u32 + (end < last) as u32;
        let budget = 2 * ends;
        let mut writes = 0;
        for i in span(level, base, start, end) {
            let c = read(mem, table, i);
            if !c.is_valid() {
                continue;
            }
            let (cbase, covered, part) = piece(level, base, i, (start, end));
            let w = if c.is_leaf(level) {
                !c.is_marked() && c.p2m_type().is_changeable()
            } else if c.is_marked() {
                covered && c.is_scoped_table()
            } else {
                covered || !self.fits(mem, c.mfn(), level - 1, cbase, part)
            };
            writes += w as u32;
            if writes > budget {
                return false;
            }
        }
        true
    }

    /// Handles an EPT misconfiguration at `gfn`: resolves every mark on its
    /// path. Returns whether anything was fixed (`false`: the misconfig was
    /// not ours, e.g. it was already resolved by another vCPU). Fails only
    /// with `NoMemory` when a straddling superpage cannot be split, and then
    /// changes nothing.
    pub fn resolve_misconfig<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        gfn: Gfn,
    ) -> Result<bool, Error> {
        let g = gfn.check()?.0;
        let mut frames = Frames::reserve(mem, self.splits_needed(mem, g))?;
        let mut table = self.root();
        let mut level = ROOT_LEVEL;
        let mut fixed = false;
        loop {
            let i = index(g, level);
            let e = read(mem, table, i);
            if !e.is_valid() {
                break;
            }
            let base = level_base(g, level);
            if e.is_leaf(level) {
                if !e.is_marked() {
                    break;
                }
                let last = base + level_pages(level) - 1;
                if self
                    .logdirty
                    .recalc_type(e.p2m_type(), base, last)
                    .is_some()
                {
                    let table_base = level_base(g, level + 1);
                    self.fix_leaves(mem, table, level, table_base);
                    fixed = true;
                    break;
                }
                // Straddles a log-dirty boundary (never at level 0).
                let t = frames.take(mem)?;
                self.fill_split(mem, t, e, level, base);
                write(mem, table, i, EptEntry::table(t));
                fixed = true;
                table = t;
            } else {
                if e.is_marked() {
                    self.push_mark(mem, e, level, base);
                    write(mem, table, i, e.unmarked_table());
                    fixed = true;
                }
                table = e.mfn();
            }
            level -= 1;
        }
        frames.release(mem);
        Ok(fixed)
    }

    /// Tables `resolve_misconfig(gfn)` will need: one per level, from the
    /// superpage on the path that resolution recomputes down, whose block
    /// around `gfn` straddles a log-dirty boundary.
    fn splits_needed<M: EptMemory + ?Sized>(&self, mem: &M, gfn: u64) -> usize {
        let l = self.lookup(mem, gfn);
        if !l.entry.is_valid() || !l.recompute || l.level == 0 {
            return 0;
        }
        let ty = l.entry.p2m_type();
        (1..=l.level)
            .rev()
            .take_while(|&lv| {
                let base = level_base(gfn, lv);
                self.logdirty
                    .recalc_type(ty, base, base + level_pages(lv) - 1)
                    .is_none()
            })
            .count()
    }

    /// What a child entry at `level` (first gfn `base`) becomes when an
    /// exact mark is pushed into it: a leaf whose pages all get the same type
    /// is fixed right away (the parent's mark keeps the CPU out until the
    /// parent is cleared), a straddling leaf carries the mark, a table gets
    /// an exact mark (a scoped one it had is widened to everything).
    pub(crate) fn pushed_exact(&mut self, c: EptEntry, level: u8, base: u64) -> EptEntry {
        let last = base + level_pages(level) - 1;
        if !c.is_leaf(level) {
            if c.is_scoped_table() {
                self.scopes.remove(level, base);
            }
            return c.marked_table(false);
        }
        match self.logdirty.recalc_type(c.p2m_type(), base, last) {
            Some(ty) => c.with_type(ty).with_type_derived_in(self.log_mode),
            None => c.marked(),
        }
    }

    /// Pushes the mark of the table entry `parent` (at `level`, first gfn
    /// `base`) into its child table. The caller clears the parent's mark
    /// afterwards. An exact mark reaches every child; a scoped one leaves
    /// the children outside its ranges alone, marks exactly those inside,
    /// and scopes the tables that straddle them.
    pub(crate) fn push_mark<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        parent: EptEntry,
        level: u8,
        base: u64,
    ) {
        let (table, cl) = (parent.mfn(), level - 1);
        let scoped = parent.is_scoped_table();
        for i in 0..ENTRIES {
            let c = read(mem, table, i);
            if !c.is_valid() {
                continue;
            }
            let cbase = base + i as u64 * level_pages(cl);
            let clast = cbase + level_pages(cl) - 1;
            let n = if !scoped || self.scopes.covers(level, base, cbase, clast) {
                self.pushed_exact(c, cl, cbase)
            } else if !self.scopes.intersects(level, base, cbase, clast) {
                continue;
            } else if c.is_leaf(cl) {
                // Straddles an end of the ranges: recomputed whole, as an
                // exactly marked superpage over an end is.
                self.pushed_exact(c, cl, cbase)
            } else if c.is_marked() && !c.is_scoped_table() {
                continue; // an exact mark covers more
            } else if self.scope_child(level, base, cl, cbase, clast) {
                c.marked_table(true)
            } else {
                // No room for the child's records: mark exactly below it.
                let mut from = cbase;
                while let Some((a, b)) = self.scopes.next_range(level, base, from) {
                    if a > clast {
                        break;
                    }
                    let part = (a.max(cbase), b.min(clast));
                    self.mark_range(mem, c.mfn(), cl - 1, cbase, part, false);
                    from = b + 1;
                }
                continue;
            };
            if n != c {
                write(mem, table, i, n);
            }
        }
        if scoped {
            self.scopes.remove(level, base);
        }
    }

    /// Gives the table entry at `cl`/`cbase` (span up to `clast`) the ranges
    /// of its scoped parent (`level`, `base`) within its span. All or
    /// nothing: false when they cannot be stored.
    fn scope_child(&mut self, level: u8, base: u64, cl: u8, cbase: u64, clast: u64) -> bool {
        let n = self.scopes.count_meeting(level, base, cbase, clast);
        if self.scopes.reserve(n).is_err() {
            return false;
        }
        let mut from = cbase;
        while let Some((a, b)) = self.scopes.next_range(level, base, from) {
            if a > clast {
                break;
            }
            // Reserved: cannot fail (merging only shrinks the list).
            let _ = self.scopes.add(cl, cbase, a.max(cbase), b.min(clast));
            from = b + 1;
        }
        true
    }

    /// Fixes every marked leaf of `table` (at `level`, first gfn `base`) whose
    /// pages all get the same type: one misconfig exit repairs a whole table.
    fn fix_leaves<M: EptMemory + ?Sized>(&mut self, mem: &mut M, table: Mfn, level: u8, base: u64) {
        for i in 0..ENTRIES {
            let c = read(mem, table, i);
            if !c.is_valid() || !c.is_marked() || !c.is_leaf(level) {
                continue;
            }
            let n = self.pushed_exact(c, level, base + i as u64 * level_pages(level));
            if n != c {
                write(mem, table, i, n);
            }
        }
    }
}

/// Entry `i` of a table at `level` (first gfn `base`) against `[start,
/// end]`: its first gfn, whether the range covers it, and the part of the
/// range inside it.
fn piece(level: u8, base: u64, i: usize, (start, end): (u64, u64)) -> (u64, bool, (u64, u64)) {
    let first = base + i as u64 * level_pages(level);
    let last = first + level_pages(level) - 1;
    let covered = start <= first && last <= end;
    (first, covered, (start.max(first), end.min(last)))
}

/// Checks a lazy type change: only `RamRw` <-> `RamLogdirty`. For callers
/// that apply one change to several p2ms and must refuse before touching any.
pub fn check_type_change(from: P2mType, to: P2mType) -> Result<(), Error> {
    if from.is_changeable() && to.is_changeable() {
        Ok(())
    } else {
        Err(Error::UnsupportedTypeChange)
    }
}

/// Checks a lazy type change of `[start, end]` as
/// [`P2m::change_type_range`] does, and returns the range as raw gfns.
pub fn check_type_range(
    start: Gfn,
    end: Gfn,
    from: P2mType,
    to: P2mType,
) -> Result<(u64, u64), Error> {
    let (s, e) = (start.check()?.0, end.check()?.0);
    if s > e {
        return Err(Error::BadRange);
    }
    check_type_change(from, to)?;
    Ok((s, e))
}
