//! Remaps (Xen's `change_gfn`): in one view, `old_gfn` shows the frame the
//! host maps at `new_gfn` (the source). Beyond Xen, every remap is tracked
//! exactly, both ways (alias -> source to revert and to log writes against
//! the owner, source -> aliases to invalidate only the aliases of a frame the
//! host drops); `min_remapped_gfn`/`max_remapped_gfn` (exact bounds of the
//! sources) stay as the O(1) pre-check.
//!
//! An alias entry's type follows its source, not its own position: a view's
//! lazy type changes recompute types by position, so an alias of a
//! `ram_logdirty` source is stored as `ram_ro`, which no recalculation
//! touches. Its writes fault, and the fault handler logs them against the
//! source. Under PML it is stored `ram_logdirty` (a 4K page: writable, its
//! writes logged by the CPU at the alias's address and resolved to the
//! source when the buffer is drained). An alias of a `ram_rw` source is
//! stored `ram_rw`. The type-change entry points rewrite the aliases in
//! their range after marking, so none sits under a mark that would
//! recompute it (a scoped mark whose range leaves it out may sit above it:
//! resolving that one leaves it alone).

use alloc::vec::Vec;

use hv_ept::{EptMemory, Gfn, LogMode, Mfn, Order, P2m, P2mAccess, P2mType};

use crate::{Altp2m, Error};

/// One remap: `alias` shows the frame of `source`, which had type `ty` in
/// the host when the alias was last written (the alias's own stored type is
/// a stand-in, see the module doc, so the source's is kept here to tell a
/// log-dirty transition from a real type change).
#[derive(Clone, Copy)]
struct Remap {
    alias: u64,
    source: u64,
    ty: P2mType,
}

/// The remaps of one view, sorted both ways.
#[derive(Default)]
pub(crate) struct Remaps {
    /// Sorted by alias.
    by_alias: Vec<Remap>,
    /// (source, alias), sorted.
    by_source: Vec<(u64, u64)>,
}

impl Remaps {
    pub(crate) fn source_of(&self, alias: u64) -> Option<u64> {
        let i = self
            .by_alias
            .binary_search_by_key(&alias, |r| r.alias)
            .ok()?;
        Some(self.by_alias[i].source)
    }

    /// The aliases of `source` in this view.
    pub(crate) fn aliases_of(&self, source: u64) -> impl Iterator<Item = u64> + '_ {
        let i = self.by_source.partition_point(|&(s, _)| s < source);
        self.by_source[i..]
            .iter()
            .take_while(move |&&(s, _)| s == source)
            .map(|&(_, a)| a)
    }

    /// The source's type the alias was written for.
    pub(crate) fn source_type(&self, alias: u64) -> Option<P2mType> {
        let i = self
            .by_alias
            .binary_search_by_key(&alias, |r| r.alias)
            .ok()?;
        Some(self.by_alias[i].ty)
    }

    pub(crate) fn set_source_type(&mut self, alias: u64, ty: P2mType) {
        if let Ok(i) = self.by_alias.binary_search_by_key(&alias, |r| r.alias) {
            self.by_alias[i].ty = ty;
        }
    }

    /// Room for one more remap, so that `insert` cannot fail.
    pub(crate) fn reserve(&mut self) -> Result<(), Error> {
        self.by_alias.try_reserve(1).map_err(|_| Error::NoMemory)?;
        self.by_source.try_reserve(1).map_err(|_| Error::NoMemory)
    }

    /// Records (or re-points) `alias`. Call `reserve` first.
    pub(crate) fn insert(&mut self, alias: u64, source: u64, ty: P2mType) {
        let remap = Remap { alias, source, ty };
        match self.by_alias.binary_search_by_key(&alias, |r| r.alias) {
            Ok(i) => {
                let old = core::mem::replace(&mut self.by_alias[i], remap);
                if let Ok(j) = self.by_source.binary_search(&(old.source, alias)) {
                    self.by_source.remove(j);
                }
            }
            Err(i) => self.by_alias.insert(i, remap),
        }
        if let Err(j) = self.by_source.binary_search(&(source, alias)) {
            self.by_source.insert(j, (source, alias));
        }
    }

    pub(crate) fn remove(&mut self, alias: u64) -> Option<u64> {
        let i = self
            .by_alias
            .binary_search_by_key(&alias, |r| r.alias)
            .ok()?;
        let Remap { source, .. } = self.by_alias.remove(i);
        if let Ok(j) = self.by_source.binary_search(&(source, alias)) {
            self.by_source.remove(j);
        }
        Some(source)
    }

    pub(crate) fn clear(&mut self) {
        self.by_alias = Vec::new();
        self.by_source = Vec::new();
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.by_alias.is_empty()
    }

    /// `(min_remapped_gfn, max_remapped_gfn)`: the lowest and highest source.
    /// Exact (Xen's only grow), so the pre-check never passes needlessly
    /// after reverts.
    pub(crate) fn min_max_remapped_gfn(&self) -> Option<(u64, u64)> {
        Some((self.by_source.first()?.0, self.by_source.last()?.0))
    }

    /// The O(1) pre-check: may a source lie in `[start, end]`?
    pub(crate) fn sources_overlap(&self, start: u64, end: u64) -> bool {
        self.min_max_remapped_gfn()
            .is_some_and(|(lo, hi)| lo <= end && start <= hi)
    }

    /// Copies into `out` the remaps from `from` on, as (key, other) pairs in
    /// the order of `by` ((alias, source) or (source, alias)), while the key
    /// is at most `end`; returns how many. Callers that change the remaps work
    /// in such batches, going on from (last key, last other + 1).
    pub(crate) fn batch(
        &self,
        by: By,
        from: (u64, u64),
        end: u64,
        out: &mut [(u64, u64)],
    ) -> usize {
        let mut n = 0;
        let mut fill = |pairs: &mut dyn Iterator<Item = (u64, u64)>| {
            for (slot, p) in out.iter_mut().zip(pairs.take_while(|p| p.0 <= end)) {
                *slot = p;
                n += 1;
            }
        };
        match by {
            By::Alias => {
                let i = self
                    .by_alias
                    .partition_point(|r| (r.alias, r.source) < from);
                fill(&mut self.by_alias[i..].iter().map(|r| (r.alias, r.source)));
            }
            By::Source => {
                let i = self.by_source.partition_point(|&p| p < from);
                fill(&mut self.by_source[i..].iter().copied());
            }
        }
        n
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (Gfn, Gfn)> + '_ {
        self.by_alias.iter().map(|r| (Gfn(r.alias), Gfn(r.source)))
    }
}

/// Which end of a remap a batch is sorted and bounded by.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum By {
    Alias,
    Source,
}

/// Types a remap source may have: RAM.
pub(crate) fn is_ram(ty: P2mType) -> bool {
    matches!(ty, P2mType::RamRw | P2mType::RamRo | P2mType::RamLogdirty)
}

/// The type an alias of a source of type `ty` is stored with in a view
/// whose log-dirty writes are noticed by `mode` (see the module doc: never a
/// type that lets a write to a tracked source go unlogged).
pub(crate) fn alias_type(ty: P2mType, mode: LogMode) -> P2mType {
    match (ty, mode) {
        (P2mType::RamLogdirty, LogMode::WriteProtect) => P2mType::RamRo,
        (other, _) => other,
    }
}

impl Altp2m {
    /// Xen's `change_gfn`: in `view`, make `old_gfn` show the frame the host
    /// maps at `new_gfn` (4K; a covering superpage of the view is split), or
    /// with `new_gfn = None` revert a remap (the gfn copies lazily from the
    /// host again). The source must be RAM in the host. The alias gets the
    /// view's access at `new_gfn` (its entry's, else the default), and keeps
    /// the slot's suppress-#VE bit. Re-pointing an existing alias replaces it.
    /// Not on view 0: it is the host p2m, which stays authoritative.
    pub fn change_gfn<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        host: &P2m,
        view: u16,
        old_gfn: Gfn,
        new_gfn: Option<Gfn>,
    ) -> Result<(), Error> {
        let i = self.altp2m_index(view)?;
        let old = old_gfn.check()?;
        let Some(new) = new_gfn else {
            return self.revert_gfn(mem, i, old);
        };
        let new = new.check()?;
        let h = host.get_entry(mem, new)?;
        let mfn = h.mfn.ok_or(Error::NotMapped)?;
        if !is_ram(h.ty) {
            return Err(Error::NotRam);
        }
        let Altp2m { views, harvest, .. } = self;
        let v = views[i].as_mut().ok_or(Error::BadView)?;
        let at_new = v.p2m.get_entry(mem, new)?;
        let access = if at_new.mfn.is_some() {
            at_new.access
        } else {
            v.default_access
        };
        v.remaps.reserve()?;
        let was = v.remaps.source_of(old.0);
        let written = was.is_some() && v.p2m.written(mem, old)?;
        let ty = alias_type(h.ty, host.log_mode());
        v.p2m.set_entry(mem, old, mfn, Order::PAGE_4K, ty, access)?;
        if let (true, Some(s)) = (written, was) {
            harvest.keep(s);
        }
        v.remaps.insert(old.0, new.0, h.ty);
        self.remapping.insert(i);
        self.occupancy.note(i, old.0, old.0);
        Ok(())
    }

    fn revert_gfn<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        i: usize,
        old: Gfn,
    ) -> Result<(), Error> {
        let Altp2m { views, harvest, .. } = self;
        let v = views[i].as_mut().ok_or(Error::BadView)?;
        let Some(source) = v.remaps.source_of(old.0) else {
            return Err(Error::NotRemapped);
        };
        harvest.alias(mem, &v.p2m, old.0, source);
        // An alias is a 4K leaf: removing it needs no table.
        remove_4k(mem, &mut v.p2m, old)?;
        v.remaps.remove(old.0);
        if v.remaps.is_empty() {
            self.remapping.remove(i);
        }
        Ok(())
    }
}

/// Removes the 4K mapping of `gfn`, leaving an empty slot with suppress-#VE
/// set (a view's holes must exit to the hypervisor, not raise #VE, or lazy
/// copy would never run).
pub(crate) fn remove_4k<M: EptMemory + ?Sized>(
    mem: &mut M,
    p2m: &mut P2m,
    gfn: Gfn,
) -> Result<(), Error> {
    remove(mem, p2m, gfn, Order::PAGE_4K)
}

pub(crate) fn remove<M: EptMemory + ?Sized>(
    mem: &mut M,
    p2m: &mut P2m,
    gfn: Gfn,
    order: Order,
) -> Result<(), Error> {
    p2m.set_entry_sve(
        mem,
        gfn,
        Mfn(0),
        order,
        P2mType::Invalid,
        P2mAccess::N,
        Some(true),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    extern crate std;
    use std::vec::Vec;

    #[test]
    fn both_directions_stay_in_step() {
        let mut r = Remaps::default();
        for (a, s) in [(10, 100), (11, 100), (5, 200), (10, 300)] {
            r.reserve().unwrap();
            r.insert(a, s, P2mType::RamRw);
        }
        assert_eq!(r.source_of(10), Some(300), "re-pointed");
        assert_eq!(r.aliases_of(100).collect::<Vec<_>>(), [11]);
        assert_eq!(r.aliases_of(150).count(), 0);
        assert_eq!(r.min_max_remapped_gfn(), Some((100, 300)));
        let mut out = [(0, 0); 8];
        let n = r.batch(By::Source, (100, 0), 250, &mut out);
        assert_eq!(&out[..n], [(100, 11), (200, 5)]);
        let n = r.batch(By::Source, (100, 11), 250, &mut out);
        assert_eq!(&out[..n], [(100, 11), (200, 5)]);
        let n = r.batch(By::Alias, (6, 0), u64::MAX, &mut out);
        assert_eq!(&out[..n], [(10, 300), (11, 100)]);
        let n = r.batch(By::Alias, (10, 301), u64::MAX, &mut out);
        assert_eq!(&out[..n], [(11, 100)]);
        assert!(r.sources_overlap(150, 250) && !r.sources_overlap(301, 400));
        assert_eq!(r.remove(10), Some(300));
        assert_eq!(r.min_max_remapped_gfn(), Some((100, 200)), "bounds shrink");
        assert_eq!(r.remove(10), None);
        r.remove(11);
        r.remove(5);
        assert!(r.is_empty() && r.min_max_remapped_gfn().is_none());
    }
}
