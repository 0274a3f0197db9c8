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
        let e = e.min(self.max_mapped_pfn().0);
        if s <= e && self.mark_range(mem, self.root(), ROOT_LEVEL, 0, s, e) > 0 {
            self.request_flush();
        }
        Ok(())
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
            if e.is_valid() && !e.is_marked() {
                write(mem, self.root(), i, e.marked());
                marked = true;
            }
        }
        if marked {
            self.request_flush();
        }
    }

    /// Marks the highest present entries under `table` (at `level`, first gfn
    /// `base`) that cover `[start, end]`. Returns the entries written.
    fn mark_range<M: EptMemory + ?Sized>(
        &self,
        mem: &mut M,
        table: Mfn,
        level: u8,
        base: u64,
        start: u64,
        end: u64,
    ) -> u64 {
        let mut written = 0;
        for i in span(level, base, start, end) {
            let e = read(mem, table, i);
            // A marked entry already covers everything below it.
            if !e.is_valid() || e.is_marked() {
                continue;
            }
            let ebase = base + i as u64 * level_pages(level);
            let covered = start <= ebase && ebase + level_pages(level) - 1 <= end;
            if e.is_leaf(level) {
                // A partly covered superpage is marked whole: resolution
                // splits it if its pages end up with different types.
                if e.p2m_type().is_changeable() {
                    write(mem, table, i, e.marked());
                    written += 1;
                }
            } else if covered {
                write(mem, table, i, e.marked());
                written += 1;
            } else {
                written += self.mark_range(mem, e.mfn(), level - 1, ebase, start, end);
            }
        }
        written
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
                    self.push_mark(mem, e.mfn(), level - 1, base);
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
    /// marked superpage on the path down, whose block around `gfn` straddles a
    /// log-dirty boundary.
    fn splits_needed<M: EptMemory + ?Sized>(&self, mem: &M, gfn: u64) -> usize {
        let l = self.lookup(mem, gfn);
        if !l.entry.is_valid() || !l.marked || l.level == 0 {
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

    /// What a child entry at `level` (first gfn `base`) becomes when a mark is
    /// pushed into it: a leaf whose pages all get the same type is fixed right
    /// away (the parent's mark keeps the CPU out until the parent is cleared),
    /// anything else carries the mark.
    pub(crate) fn pushed(&self, c: EptEntry, level: u8, base: u64) -> EptEntry {
        if c.is_leaf(level) {
            let last = base + level_pages(level) - 1;
            if let Some(ty) = self.logdirty.recalc_type(c.p2m_type(), base, last) {
                return c.with_type(ty).with_type_derived();
            }
        }
        c.marked()
    }

    /// Pushes a parent's mark into its child `table` (at `level`, first gfn
    /// `base`). The caller clears the parent's mark afterwards.
    pub(crate) fn push_mark<M: EptMemory + ?Sized>(
        &self,
        mem: &mut M,
        table: Mfn,
        level: u8,
        base: u64,
    ) {
        self.recalc_table(mem, table, level, base, true);
    }

    /// Fixes every marked leaf of `table` (at `level`, first gfn `base`) whose
    /// pages all get the same type: one misconfig exit repairs a whole table.
    fn fix_leaves<M: EptMemory + ?Sized>(&self, mem: &mut M, table: Mfn, level: u8, base: u64) {
        self.recalc_table(mem, table, level, base, false);
    }

    /// Applies [`P2m::pushed`] to the present entries of `table`: all of them
    /// when a parent's mark is `inherited`, else its marked leaves.
    fn recalc_table<M: EptMemory + ?Sized>(
        &self,
        mem: &mut M,
        table: Mfn,
        level: u8,
        base: u64,
        inherited: bool,
    ) {
        for i in 0..ENTRIES {
            let c = read(mem, table, i);
            if !c.is_valid() || !(inherited || (c.is_marked() && c.is_leaf(level))) {
                continue;
            }
            let n = self.pushed(c, level, base + i as u64 * level_pages(level));
            if n != c {
                write(mem, table, i, n);
            }
        }
    }
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
