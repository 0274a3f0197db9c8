//! Host changes reaching the views (Xen's `p2m_altp2m_propagate_change`,
//! beyond Xen). After the host changed `[s, e]`, every active view that may
//! hold something there (the occupancy index, then the view's
//! `max_mapped_pfn`) is compared, leaf by leaf, with the host's new state:
//!
//! - same frame and type: kept, with its access and suppress-#VE bit;
//! - same frame, `ram_rw` <-> `ram_logdirty`: the type follows the host and
//!   the access is kept (log-dirty is bookkeeping, not a new mapping; the
//!   views follow it as they follow a lazy type change);
//! - anything else (no mapping, another frame, another type): the view's
//!   entry is dropped there and copies lazily again. Deliberate divergence
//!   lost this way is logged ([`crate::Dropped`]).
//!
//! An alias keeps following its source, whatever the host does at the
//! alias's own gfn. Aliases whose source lies in `[s, e]` are checked
//! against it by the same rule (same frame and type, or a log-dirty
//! transition, keeps them; anything else drops them), so no view reaches a
//! frame the host no longer maps there.
//!
//! Propagation never fails: where a superpage split runs out of frames, the
//! whole superpage is dropped instead (a removal at a leaf's own level needs
//! no table), and logged as `OutOfMemory` if it carried divergence.

use core::ops::ControlFlow;

use hv_ept::{EntryInfo, EptMemory, Gfn, Leaf, Mfn, Order, P2m, P2mType, aligned_blocks};

use crate::Altp2m;
use crate::droplog::{DropLog, DropReason, Dropped};
use crate::pml::Harvest;
use crate::remap::{By, alias_type, remove};
use crate::set::View;

/// Leaves or remaps handled per batch: views change between batches, so a
/// walk never runs over a tree being modified, and no heap is needed.
const BATCH: usize = 32;

enum Cmp {
    Unchanged,
    TypeOnly(P2mType),
    Changed,
}

/// How the host's entry `h` at `g` relates to view leaf `l` there.
fn compare(l: &Leaf, g: u64, h: &EntryInfo) -> Cmp {
    let Some(hm) = h.mfn else {
        return Cmp::Changed;
    };
    if hm.0 != l.mfn.0 + (g - l.gfn.0) {
        return Cmp::Changed;
    }
    if h.ty == l.ty {
        Cmp::Unchanged
    } else if h.ty.is_changeable() && l.ty.is_changeable() {
        Cmp::TypeOnly(h.ty)
    } else {
        Cmp::Changed
    }
}

/// Removes the mapping at `gfn` with order `order`, or, when that needs a
/// split and no frame is left, the larger block that holds it (at the
/// level of the leaf itself no table is needed, so this always ends).
/// Returns the block removed.
pub(crate) fn remove_climbing<M: EptMemory + ?Sized>(
    mem: &mut M,
    p2m: &mut P2m,
    gfn: Gfn,
    order: Order,
) -> (u64, Order) {
    for o in [Order::PAGE_4K, Order::PAGE_2M, Order::PAGE_1G] {
        if o < order {
            continue;
        }
        let base = gfn.0 & !(o.pages() - 1);
        if remove(mem, p2m, Gfn(base), o).is_ok() {
            return (base, o);
        }
    }
    debug_assert!(false, "removal at the leaf's own level failed");
    (gfn.0, order)
}

/// One view being reconciled, with the log it reports to.
struct Reconcile<'a> {
    view: &'a mut View,
    index: u16,
    drops: &'a mut DropLog,
    harvest: &'a mut Harvest,
    /// Entries were removed from the view.
    removed: bool,
}

impl Reconcile<'_> {
    /// [`remove_climbing`] in this view.
    fn remove<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        gfn: Gfn,
        order: Order,
    ) -> (u64, Order) {
        self.removed = true;
        remove_climbing(mem, &mut self.view.p2m, gfn, order)
    }

    fn log(&mut self, gfn: u64, order: Order, l: &Leaf, reason: DropReason) {
        self.drops.push(Dropped {
            view: self.index,
            gfn: Gfn(gfn),
            pages: order.pages(),
            access: l.access,
            suppress_ve: l.sve,
            remap_source: None,
            reason,
        });
    }

    /// Whether `l` carries something a lazy copy would not recreate.
    fn divergent(&self, l: &Leaf) -> bool {
        l.access != self.view.default_access || !l.sve
    }

    fn leaf<M: EptMemory + ?Sized>(&mut self, mem: &mut M, host: &P2m, l: &Leaf, s: u64, e: u64) {
        let last = l.gfn.0 + l.order.pages() - 1;
        if l.order == Order::PAGE_4K && self.view.remaps.source_of(l.gfn.0).is_some() {
            return;
        }
        // An earlier fallback of this batch may have removed it already.
        match self.view.p2m.get_entry(mem, l.gfn) {
            Ok(cur) if cur.mfn == Some(l.mfn) => {}
            _ => return,
        }
        let divergent = self.divergent(l);
        let (a, b) = (l.gfn.0.max(s), last.min(e));
        let mut g = a;
        while g <= b {
            let Ok(h) = host.get_entry(mem, Gfn(g)) else {
                return;
            };
            let h_last = (g & !(h.order.pages() - 1)) + h.order.pages() - 1;
            let piece = b.min(h_last);
            let done = match compare(l, g, &h) {
                Cmp::Unchanged => piece,
                Cmp::TypeOnly(ty) => self.retype(mem, l, g, piece, ty, divergent),
                Cmp::Changed if !divergent => {
                    // A plain lazy copy: drop it whole, it refills on demand.
                    self.remove(mem, l.gfn, l.order);
                    return;
                }
                Cmp::Changed => self.drop_range(mem, l, g, piece),
            };
            g = done.max(piece) + 1;
        }
    }

    /// Gives `[a, b]` of leaf `l` type `ty`, keeping access and
    /// suppress-#VE; splits as needed. Returns the last gfn dealt with.
    fn retype<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        l: &Leaf,
        a: u64,
        b: u64,
        ty: P2mType,
        divergent: bool,
    ) -> u64 {
        let mut removed_to: Option<u64> = None;
        for (bg, bo) in aligned_blocks(Gfn(a), Gfn(b)) {
            if removed_to.is_some_and(|r| bg.0 <= r) {
                continue;
            }
            let mfn = Mfn(l.mfn.0 + (bg.0 - l.gfn.0));
            if self
                .view
                .p2m
                .set_entry(mem, bg, mfn, bo, ty, l.access)
                .is_ok()
            {
                continue;
            }
            let (rg, ro) = self.remove(mem, bg, bo);
            if divergent {
                self.log(rg, ro, l, DropReason::OutOfMemory);
            }
            removed_to = Some(rg + ro.pages() - 1);
        }
        removed_to.map_or(b, |r| r.max(b))
    }

    /// Drops `[a, b]` of a divergent leaf `l`, precisely where frames allow.
    fn drop_range<M: EptMemory + ?Sized>(&mut self, mem: &mut M, l: &Leaf, a: u64, b: u64) -> u64 {
        let mut removed_to: Option<u64> = None;
        for (bg, bo) in aligned_blocks(Gfn(a), Gfn(b)) {
            if removed_to.is_some_and(|r| bg.0 <= r) {
                continue;
            }
            let (rg, ro) = self.remove(mem, bg, bo);
            let reason = if ro > bo {
                DropReason::OutOfMemory
            } else {
                DropReason::MappingChanged
            };
            self.log(rg, ro, l, reason);
            removed_to = Some(rg + ro.pages() - 1);
        }
        removed_to.map_or(b, |r| r.max(b))
    }

    /// Checks the alias at `alias` against its source `source` in the host:
    /// keeps it (type following the source; always rewritten when `rewrite`,
    /// which clears marks above it) or drops it. Returns whether it stayed.
    fn alias<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        host: &P2m,
        source: u64,
        alias: u64,
        rewrite: bool,
    ) -> bool {
        let h = host.get_entry(mem, Gfn(source)).ok();
        let cur = self.view.p2m.get_entry(mem, Gfn(alias)).ok();
        let (access, sve) = cur.map_or((self.view.default_access, true), |c| (c.access, c.sve));
        let was = self.view.remaps.source_type(alias);
        let mut reason = DropReason::SourceChanged;
        // Rewritten or removed below, unless kept as it is.
        let harvest = |r: &mut Self, mem: &M| r.harvest.alias(mem, &r.view.p2m, alias, source);
        // Kept while the source maps the same frame with the same type, or
        // moved between ram_rw and ram_logdirty (the alias follows).
        if let (Some(h), Some(c), Some(was)) = (h, cur, was)
            && let (Some(hm), Some(cm)) = (h.mfn, c.mfn)
            && hm == cm
            && (h.ty == was || (h.ty.is_changeable() && was.is_changeable()))
        {
            let want = alias_type(h.ty, host.log_mode());
            if !rewrite && c.ty == want && !c.retype {
                self.view.remaps.set_source_type(alias, h.ty);
                return true;
            }
            harvest(self, mem);
            // A 4K leaf rewritten in place: no table needed.
            if self
                .view
                .p2m
                .set_entry(mem, Gfn(alias), cm, Order::PAGE_4K, want, access)
                .is_ok()
            {
                self.view.remaps.set_source_type(alias, h.ty);
                return true;
            }
            reason = DropReason::OutOfMemory;
        } else {
            harvest(self, mem);
        }
        self.remove(mem, Gfn(alias), Order::PAGE_4K);
        self.view.remaps.remove(alias);
        self.drops.push(Dropped {
            view: self.index,
            gfn: Gfn(alias),
            pages: 1,
            access,
            suppress_ve: sve,
            remap_source: Some(Gfn(source)),
            reason,
        });
        false
    }
}

impl Altp2m {
    fn reconcile(&mut self, i: usize) -> Option<Reconcile<'_>> {
        let Altp2m {
            views,
            drops,
            harvest,
            ..
        } = self;
        let view = views.get_mut(i)?.as_mut()?;
        Some(Reconcile {
            view,
            index: i as u16,
            drops,
            harvest,
            removed: false,
        })
    }

    /// Brings every view in line with the host after the host changed
    /// `[s, e]` (see the module doc).
    pub(crate) fn propagate<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        host: &P2m,
        s: u64,
        e: u64,
    ) {
        if !self.enabled {
            return;
        }
        let mut holders = self.occupancy.candidates(s, e).intersection(&self.active);
        holders.remove(0);
        for i in holders.iter() {
            // The bound, then a walk that stops at the first mapping: a
            // candidate the index is not exact about may hold nothing here.
            let holds = |mem: &M, v: &View| {
                s <= v.p2m.max_mapped_pfn().0
                    && v.p2m.any_present(mem, Gfn(s), Gfn(e)).unwrap_or(true)
            };
            let mut empty = !self.views[i].as_ref().is_some_and(|v| holds(mem, v));
            if !empty && self.reconcile_leaves(mem, host, i, s, e) {
                // It removed entries: does the view still hold any here?
                empty = !self.views[i].as_ref().is_some_and(|v| holds(mem, v));
            }
            if empty {
                self.occupancy.absent(i, s, e);
            }
        }
        self.reconcile_aliases(mem, host, By::Source, s, e, false);
    }

    /// After a lazy type change over `[s, e]` (or everywhere): rewrites the
    /// aliases placed in it (marks may now sit above them) and those whose
    /// source lies in it (their type follows the source's new state).
    pub(crate) fn refix_aliases<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        host: &P2m,
        s: u64,
        e: u64,
    ) {
        self.reconcile_aliases(mem, host, By::Alias, s, e, true);
        self.reconcile_aliases(mem, host, By::Source, s, e, true);
    }

    /// Compares view `i`'s leaves in `[s, e]` with the host's. Returns
    /// whether it removed any.
    fn reconcile_leaves<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        host: &P2m,
        i: usize,
        s: u64,
        e: u64,
    ) -> bool {
        let Some(mut r) = self.reconcile(i) else {
            return false;
        };
        let mut cursor = s;
        loop {
            let mut batch = [None::<Leaf>; BATCH];
            let mut n = 0;
            let _ = r.view.p2m.for_each_leaf(mem, Gfn(cursor), Gfn(e), |l| {
                batch[n] = Some(*l);
                n += 1;
                if n == BATCH {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            });
            for l in batch[..n].iter().flatten() {
                r.leaf(mem, host, l, s, e);
            }
            let Some(last) = batch[..n].iter().flatten().last() else {
                return r.removed;
            };
            let next = last.gfn.0 + last.order.pages();
            if n < BATCH || next > e {
                return r.removed;
            }
            cursor = next;
        }
    }

    /// Checks every alias placed in `[s, e]` (`By::Alias`) or whose source
    /// lies there (`By::Source`; only in views whose `[min_remapped_gfn,
    /// max_remapped_gfn]` meets it) against its source.
    fn reconcile_aliases<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        host: &P2m,
        by: By,
        s: u64,
        e: u64,
        rewrite: bool,
    ) {
        for i in self.remapping.iter() {
            let Some(mut r) = self.reconcile(i) else {
                continue;
            };
            if by == By::Source && !r.view.remaps.sources_overlap(s, e) {
                continue;
            }
            let mut from = (s, 0);
            loop {
                let mut batch = [(0, 0); BATCH];
                let n = r.view.remaps.batch(by, from, e, &mut batch);
                for &(key, other) in &batch[..n] {
                    let (alias, source) = match by {
                        By::Alias => (key, other),
                        By::Source => (other, key),
                    };
                    r.alias(mem, host, source, alias, rewrite);
                }
                if n < BATCH {
                    break;
                }
                let (key, other) = batch[n - 1];
                from = (key, other + 1);
            }
            if r.view.remaps.is_empty() {
                self.remapping.remove(i);
            }
        }
    }
}
