//! The one way the kernel changes the host p2m while altp2m may be on:
//! every change is applied to the host and then reaches the views
//! (propagation for mappings; the same lazy type change in every active
//! view, each with its own log-dirty state and clipped to its own
//! `max_mapped_pfn`, for type ranges). A change that fails leaves the host
//! and the views as they were; once the host has changed, the views follow
//! without failing (see `propagate`).

use hv_ept::{
    DirtyBitmap, EptMemory, Gfn, LogMode, Mfn, Order, P2m, P2mAccess, P2mType, check_type_change,
    check_type_range,
};

use crate::{Altp2m, Error};

/// Most tracked parts of a clean's window re-armed one by one; a window
/// with more is re-armed as one span (see `rearm_types`).
pub const REARM_RANGES: usize = 16;

/// Most page re-arms (one per p2m holding a page, aliases included) one PML
/// clean does before it re-arms by type instead (see `rearm_pages`).
pub const REARM_PAGES: usize = 4096;

/// A lazy type change over a range, in every p2m.
#[derive(Clone, Copy)]
enum Change {
    /// `ram_rw` <-> `ram_logdirty`: the log-dirty state changes.
    Type { from: P2mType, to: P2mType },
    /// The state stays; the range is recomputed from it (a clean's re-arm).
    Rearm,
}

/// A clean between its halves: what [`Altp2m::arm_dirty`] set aside, for
/// [`Altp2m::fetch_dirty`].
#[must_use = "the dirty bits set aside are handed over by fetch_dirty"]
#[derive(Debug, PartialEq, Eq)]
pub struct ArmedClean {
    start: Gfn,
    end: Gfn,
    /// The `take_flush` count when the arm left INVEPTs pending (none: no
    /// flush needed).
    epoch: Option<u64>,
    by_type: bool,
}

impl ArmedClean {
    /// The re-arm marked the window's tracked parts (write protection, or
    /// PML beyond its bounds): the guest pays misconfiguration exits for it
    /// on its next accesses. Under PML it is otherwise page by page.
    pub fn by_type(&self) -> bool {
        self.by_type
    }
}

/// A host mapping: what `host_set_entry` installs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Mapping {
    pub mfn: Mfn,
    pub ty: P2mType,
    /// The host's own access: it restricts view 0 only; views install their
    /// `default_access` when they copy.
    pub access: P2mAccess,
}

impl Altp2m {
    /// Maps `[gfn, gfn + 2^order)` in the host (`ty = Invalid` removes) and
    /// brings every view in line.
    pub fn host_set_entry<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        host: &mut P2m,
        gfn: Gfn,
        order: Order,
        mapping: Mapping,
    ) -> Result<(), Error> {
        let sve = (!mapping.ty.is_present()).then_some(true);
        host.set_entry_sve(
            mem,
            gfn,
            mapping.mfn,
            order,
            mapping.ty,
            mapping.access,
            sve,
        )?;
        self.propagate(mem, host, gfn.0, gfn.0 + order.pages() - 1);
        Ok(())
    }

    /// Removes the host's mappings of `[gfn, gfn + 2^order)` (e.g. a page the
    /// balloon gives back). Afterwards no view reaches those frames through
    /// these gfns, aliases included; once the INVEPTs of
    /// [`Altp2m::take_flush`] are done the frames may be reused.
    pub fn host_remove<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        host: &mut P2m,
        gfn: Gfn,
        order: Order,
    ) -> Result<(), Error> {
        let gone = Mapping {
            mfn: Mfn(0),
            ty: P2mType::Invalid,
            access: P2mAccess::N,
        };
        self.host_set_entry(mem, host, gfn, order, gone)
    }

    /// Changes `[start, end]` between `ram_rw` and `ram_logdirty` (start or
    /// stop log-dirty tracking) lazily, in the host and every active view.
    pub fn host_change_type_range<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        host: &mut P2m,
        start: Gfn,
        end: Gfn,
        from: P2mType,
        to: P2mType,
    ) -> Result<(), Error> {
        let (s, e) = check_type_range(start, end, from, to)?;
        if from == to {
            return Ok(());
        }
        self.reserve_logdirty(host)?;
        // After the reserve the change cannot fail.
        self.apply_change(mem, host, s, e, Change::Type { from, to });
        Ok(())
    }

    /// Global log-dirty on (`ram_rw` -> `ram_logdirty`, also the re-arm) or
    /// off, in the host and every active view.
    pub fn host_change_type_global<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        host: &mut P2m,
        from: P2mType,
        to: P2mType,
    ) -> Result<(), Error> {
        check_type_change(from, to)?;
        if from == to {
            return Ok(());
        }
        host.change_type_global(mem, from, to)?;
        for i in self.active.iter() {
            if let Some(v) = self.views[i].as_mut() {
                v.p2m.change_type_global(mem, from, to)?;
            }
        }
        self.refix_aliases(mem, host, 0, Gfn::MAX.0);
        Ok(())
    }

    /// The first half of a log-dirty clean of `[start, end]`: re-arms
    /// tracking where it is on (the tracked ranges within `[start, end]`, or
    /// everything under global log-dirty) in the host and every view, and
    /// sets the range's dirty bits aside. The second half,
    /// [`Altp2m::fetch_dirty`], hands them over once the INVEPTs the re-arm
    /// needs are done: vCPUs may run meanwhile, on other CPUs too. A write
    /// through a translation cached before the INVEPT reaches a page whose
    /// bit was set (pages become writable only once a write was logged), so
    /// it is handed over by this clean, and the caller reads the pages after
    /// `fetch_dirty`; a write after it faults and is logged for the next
    /// clean, also when that makes the page writable before `fetch_dirty`.
    ///
    /// Pages the kernel maps `ram_rw` inside a tracked range are writable
    /// with no write logged: their writes are not logged until the next
    /// clean re-arms them, so the kernel marks them dirty when it maps them.
    ///
    /// Under PML the pages handed over are re-armed one by one (their dirty
    /// flags cleared), which costs the guest no exit; the write-protect
    /// re-arm marks the tracked parts of the window. Either way the work of
    /// one call is bounded whatever the number of tracked ranges: the
    /// window's parts are found by binary search, and beyond
    /// [`REARM_RANGES`] parts (or [`REARM_PAGES`] page re-arms) the window
    /// is re-armed as one span, in the host and each view. The bitmap work
    /// follows the window's size.
    ///
    /// Fails only with `NoMemory`, before anything changed.
    pub fn arm_dirty<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        host: &mut P2m,
        dirty: &mut DirtyBitmap,
        start: Gfn,
        end: Gfn,
    ) -> Result<ArmedClean, Error> {
        let (s, e) = (start.check()?.0, end.check()?.0);
        if s > e {
            return Err(Error::BadRange);
        }
        self.harvest.merge(dirty)?;
        if self.harvest.lost() {
            dirty.mark_range(start, end)?;
        }
        dirty.arm(start, end)?;
        self.harvest.forget_lost();
        let typed = host.log_mode() == LogMode::WriteProtect
            || self.rearm_pages(mem, host, dirty, start, end);
        if typed {
            self.rearm_types(mem, host, start, end);
        }
        let epoch = self.flush_pending(host).then_some(self.flushes);
        Ok(ArmedClean {
            start,
            end,
            epoch,
            by_type: typed,
        })
    }

    /// The write-protect re-arm of `[start, end]`: every tracked page there
    /// is recomputed `ram_logdirty` (lazily: marks). A window with at most
    /// [`REARM_RANGES`] tracked parts marks each part (the marking is exact:
    /// pages between the ranges take no exit); one with more marks the span
    /// from its first tracked gfn to its last once (pages between are
    /// recomputed too, unchanged, at a misconfiguration exit per leaf table
    /// touched). So the work is bounded whatever the number of ranges: the
    /// parts are found by binary search, and at most `REARM_RANGES` changes
    /// are made in the host and each view. Cannot fail: it adds no range.
    fn rearm_types<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        host: &mut P2m,
        start: Gfn,
        end: Gfn,
    ) {
        if host.logdirty().global() {
            // Marks every present root entry, host and views: cannot fail.
            let _ = self.host_change_type_global(mem, host, P2mType::RamRw, P2mType::RamLogdirty);
            return;
        }
        let Some((parts, first, last)) = host.logdirty().span_within(start, end) else {
            return;
        };
        let mut batch = [(0u64, 0u64); REARM_RANGES];
        let n = if parts <= REARM_RANGES {
            for (slot, (a, b)) in batch.iter_mut().zip(host.logdirty().within(start, end)) {
                *slot = (a.0, b.0);
            }
            parts
        } else {
            batch[0] = (first.0, last.0);
            1
        };
        for &(a, b) in &batch[..n] {
            self.apply_change(mem, host, a, b, Change::Rearm);
        }
    }

    /// The second half of a clean: hands every gfn [`Altp2m::arm_dirty`]
    /// set aside to `f`, in order, and clears it. Refused with
    /// `FlushPending` until [`Altp2m::take_flush`] was called after the arm
    /// (the kernel does the INVEPTs it asks for on every CPU before calling
    /// this); then the caller may read the pages handed over.
    pub fn fetch_dirty(
        &self,
        dirty: &mut DirtyBitmap,
        armed: &ArmedClean,
        f: impl FnMut(Gfn),
    ) -> Result<(), Error> {
        if armed.epoch == Some(self.flushes) {
            return Err(Error::FlushPending);
        }
        dirty.fetch_armed(armed.start, armed.end, f);
        Ok(())
    }

    /// Room for one more log-dirty range in the host and every view, so that
    /// a range change cannot fail halfway through the views.
    fn reserve_logdirty(&mut self, host: &mut P2m) -> Result<(), Error> {
        host.reserve_logdirty()?;
        for i in self.active.iter() {
            if let Some(v) = self.views[i].as_mut() {
                v.p2m.reserve_logdirty()?;
            }
        }
        Ok(())
    }

    /// A type change of `[s, e]` in the host and every view, then the
    /// aliases and margins. A `Type` change only after `reserve_logdirty`
    /// (then nothing fails: the p2m calls' errors cannot happen).
    fn apply_change<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        host: &mut P2m,
        s: u64,
        e: u64,
        change: Change,
    ) {
        let margins = self.margins(mem, host, s, e);
        let apply = |p2m: &mut P2m, mem: &mut M| {
            let _ = match change {
                Change::Type { from, to } => p2m.change_type_range(mem, Gfn(s), Gfn(e), from, to),
                Change::Rearm => p2m.rearm_range(mem, Gfn(s), Gfn(e)),
            };
        };
        apply(host, mem);
        for i in self.active.iter() {
            if let Some(v) = self.views[i].as_mut() {
                apply(&mut v.p2m, mem);
            }
        }
        self.refix_aliases(mem, host, s, e);
        for (a, b) in margins.into_iter().flatten() {
            self.propagate(mem, host, a, b);
        }
    }

    /// A lazy type change recomputes whole stored mappings. Where one that
    /// straddles `s` or `e` has a type that disagrees with the log-dirty state
    /// beside the range (a superpage made writable whole by the out-of-frames
    /// log-dirty fallback, or mapped so by the kernel), the change reaches
    /// beyond `[s, e]`, and not alike in the host and in views whose mappings
    /// have other sizes. Returns those margins (found before the change), so
    /// that the views are brought in line with the host there afterwards.
    fn margins<M: EptMemory + ?Sized>(
        &self,
        mem: &M,
        host: &P2m,
        s: u64,
        e: u64,
    ) -> [Option<(u64, u64)>; 2] {
        if !self.enabled {
            return [None, None];
        }
        let (mut lo, mut hi) = (s, e);
        let mut check = |p2m: &P2m| {
            for g in [s, e] {
                let Ok(Some(l)) = p2m.stored_leaf(mem, Gfn(g)) else {
                    continue;
                };
                if l.marked {
                    continue; // already recomputed from the same state
                }
                let last = l.gfn.0 + l.order.pages() - 1;
                let agrees = |a: u64, b: u64| p2m.logdirty().recalc_type(l.ty, a, b) == Some(l.ty);
                if l.gfn.0 < s && !agrees(l.gfn.0, s - 1) {
                    lo = lo.min(l.gfn.0);
                }
                if last > e && !agrees(e + 1, last) {
                    hi = hi.max(last);
                }
            }
        };
        check(host);
        let mut holders = self.occupancy.candidates(s, s);
        holders.union_with(&self.occupancy.candidates(e, e));
        for i in holders.intersection(&self.active).iter() {
            if let Some(v) = self.views[i].as_ref() {
                check(&v.p2m);
            }
        }
        [(lo < s).then(|| (lo, s - 1)), (hi > e).then(|| (e + 1, hi))]
    }
}
