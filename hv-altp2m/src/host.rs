//! The one way the kernel changes the host p2m while altp2m may be on:
//! every change is applied to the host and then reaches the views
//! (propagation for mappings; the same lazy type change in every active
//! view, each with its own log-dirty state and clipped to its own
//! `max_mapped_pfn`, for type ranges). A change that fails leaves the host
//! and the views as they were; once the host has changed, the views follow
//! without failing (see `propagate`).

use hv_ept::{
    DirtyBitmap, EptMemory, Gfn, Mfn, Order, P2m, P2mAccess, P2mType, check_type_change,
    check_type_range,
};

use crate::{Altp2m, Error};

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
        self.apply_type_range(mem, host, s, e, from, to)
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
        self.reserve_logdirty(host)?;
        dirty.arm(start, end)?;
        if host.logdirty().global() {
            self.host_change_type_global(mem, host, P2mType::RamRw, P2mType::RamLogdirty)?;
        } else {
            let mut cursor = s;
            loop {
                let next = host
                    .logdirty()
                    .ranges()
                    .find(|&(_, re)| re.0 >= cursor)
                    .filter(|&(rs, _)| rs.0 <= e);
                let Some((rs, re)) = next else { break };
                let (a, b) = (rs.0.max(cursor), re.0.min(e));
                // A part of a tracked range: adds no range, cannot fail.
                self.apply_type_range(mem, host, a, b, P2mType::RamRw, P2mType::RamLogdirty)?;
                if b >= e {
                    break;
                }
                cursor = b + 1;
            }
        }
        let epoch = self.flush_pending(host).then_some(self.flushes);
        Ok(ArmedClean { start, end, epoch })
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

    /// The type change itself; after `reserve_logdirty` it cannot fail.
    fn apply_type_range<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        host: &mut P2m,
        s: u64,
        e: u64,
        from: P2mType,
        to: P2mType,
    ) -> Result<(), Error> {
        let margins = self.margins(mem, host, s, e);
        host.change_type_range(mem, Gfn(s), Gfn(e), from, to)?;
        for i in self.active.iter() {
            if let Some(v) = self.views[i].as_mut() {
                v.p2m.change_type_range(mem, Gfn(s), Gfn(e), from, to)?;
            }
        }
        self.refix_aliases(mem, host, s, e);
        for (a, b) in margins.into_iter().flatten() {
            self.propagate(mem, host, a, b);
        }
        Ok(())
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
