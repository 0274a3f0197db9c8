//! Log-dirty under PML, altp2m's side (see `hv_ept::LogMode::Pml`): a
//! tracked 4K page is writable in the host and in every view, and the CPU
//! logs the guest-physical address of its first write in the vCPU's PML
//! buffer, without an exit. Three things follow:
//!
//! - **Which view a logged address was written through.** A vCPU may switch
//!   views with VMFUNC without an exit, so the view it runs on when its
//!   buffer is drained need not be the one it wrote through. Draining asks
//!   every p2m that may hold the gfn (host, views by the occupancy index)
//!   whether its leaf there has the dirty flag set: the write went through
//!   each that has, and the owner of the page (the gfn, or for an alias the
//!   source) is marked. The flags are exact while the buffer is drained
//!   before the hypervisor changes anything (on every exit of its vCPU,
//!   first; with one vCPU that is always so).
//! - **Buffers drained late** (another vCPU's, still in guest mode while
//!   this one changes the p2ms): a flag may be gone by then (a clean
//!   re-armed the page, a type change rewrote the leaf). The address then
//!   stands for every gfn it may mean (itself, the sources of aliases
//!   there), all marked: reported twice or beside, never lost. An alias
//!   leaf is the one case where the address alone cannot name the owner
//!   once the alias is gone, so before an alias with its flag set is
//!   rewritten or removed (revert, re-point, propagation, reset, destroy)
//!   its source is *harvested*: kept here and marked dirty at the next
//!   drain or clean.
//! - **Re-arming** after a fetch clears exactly the dirty flags of the pages
//!   handed over (host, views that hold them, aliases of them), and the
//!   clean's INVEPT comes before its fetch as for write protection: a write
//!   through a translation cached dirty before the INVEPT reaches a page
//!   this clean hands over. No mark, so no exit for the guest afterwards.

use alloc::vec::Vec;

use hv_ept::{DirtyBitmap, EptMemory, Gfn, P2m, Rearm};

use crate::host::REARM_PAGES;
use crate::{Altp2m, Error, ViewSet};

/// Sources of alias leaves that were rewritten or removed with their dirty
/// flag set, to be marked dirty at the next drain or clean.
#[derive(Default)]
pub(crate) struct Harvest {
    sources: Vec<u64>,
    /// A source could not be kept (out of heap): the next clean marks its
    /// whole window dirty.
    lost: bool,
}

impl Harvest {
    /// Before alias `alias` of `source` in `p2m` is rewritten or removed.
    pub(crate) fn alias<M: EptMemory + ?Sized>(
        &mut self,
        mem: &M,
        p2m: &P2m,
        alias: u64,
        source: u64,
    ) {
        if p2m.written(mem, Gfn(alias)).unwrap_or(false) {
            self.keep(source);
        }
    }

    /// Keeps `source` to mark.
    pub(crate) fn keep(&mut self, source: u64) {
        if self.sources.try_reserve(1).is_ok() {
            self.sources.push(source);
        } else {
            self.lost = true;
        }
    }

    /// Marks what was harvested; on failure (the bitmap cannot grow) keeps
    /// what is left.
    pub(crate) fn merge(&mut self, dirty: &mut DirtyBitmap) -> Result<(), Error> {
        while let Some(&g) = self.sources.last() {
            dirty.mark(Gfn(g))?;
            self.sources.pop();
        }
        Ok(())
    }

    /// Whether a harvest was lost: the next clean reports its whole window
    /// ([`Harvest::forget_lost`] once it did).
    pub(crate) fn lost(&self) -> bool {
        self.lost
    }

    pub(crate) fn forget_lost(&mut self) {
        self.lost = false;
    }

    /// Harvests every alias of a view whose tables are about to go.
    pub(crate) fn view<M: EptMemory + ?Sized>(&mut self, mem: &M, view: &crate::set::View) {
        for (a, s) in view.remaps.iter() {
            self.alias(mem, &view.p2m, a.0, s.0);
        }
    }
}

impl Altp2m {
    /// The PML re-arm of `[start, end]`: the pages `arm` set aside get
    /// their dirty flags cleared in the host, in every view that holds them
    /// and in every alias of them ([`P2m::rearm_page`]): no mark, so no exit
    /// for the guest afterwards. Bounded: after [`REARM_PAGES`] page re-arms
    /// (one per p2m holding a page) it stops and returns true, and so it
    /// does when a page is `ram_rw` inside a tracked range: the caller then
    /// re-arms by type (marks), which clears every flag of the window, a
    /// cost the guest pays in misconfiguration exits, not this call.
    pub(crate) fn rearm_pages<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        host: &mut P2m,
        dirty: &DirtyBitmap,
        start: Gfn,
        end: Gfn,
    ) -> bool {
        let mut work = 0usize;
        let mut typed = false;
        dirty.for_each_armed(start, end, |g| {
            if typed {
                return;
            }
            work += 1;
            typed |= host.rearm_page(mem, g) == Ok(Rearm::Writable);
            if self.enabled {
                let mut holders = self
                    .occupancy
                    .candidates(g.0, g.0)
                    .intersection(&self.active);
                holders.union_with(&self.remapping);
                holders.remove(0);
                for i in holders.iter() {
                    let Some(v) = self.views[i].as_mut() else {
                        continue;
                    };
                    if v.remaps.source_of(g.0).is_none() {
                        work += 1;
                        typed |= v.p2m.rearm_page(mem, g) == Ok(Rearm::Writable);
                    }
                    for a in v.remaps.aliases_of(g.0) {
                        work += 1;
                        let _ = v.p2m.rearm_page(mem, Gfn(a));
                    }
                }
            }
            typed |= work > REARM_PAGES;
        });
        typed
    }

    /// A write the CPU logged in a vCPU's PML buffer: the guest-physical
    /// address `gpa` of a page whose `ram_logdirty` leaf had its dirty flag
    /// set, in the host or in a view (the vCPU may have switched views with
    /// VMFUNC since, without an exit). Every p2m that may hold the gfn is
    /// asked whether its leaf there has the flag ([`P2m::written`]): the
    /// owner of each such leaf (the gfn, or the source of an alias there)
    /// is marked dirty. If none has it any more (a clean re-armed the page
    /// since, or a type change rewrote the leaf), every gfn the address may
    /// stand for is marked (the gfn, the sources of aliases there): a write
    /// may be reported twice, or beside its page, never lost. Drain a
    /// buffer before anything changes the p2ms (on every exit of its vCPU,
    /// first): with every vCPU's buffer drained before a change, the flags
    /// tell exactly.
    ///
    /// Fails with `GfnOutOfRange` for an address no p2m can hold (nothing
    /// marked), and `NoMemory` when the bitmap cannot grow.
    pub fn pml_logged<M: EptMemory + ?Sized>(
        &mut self,
        mem: &M,
        host: &P2m,
        dirty: &mut DirtyBitmap,
        gpa: u64,
    ) -> Result<(), Error> {
        let gfn = crate::fault::gfn_of(gpa)?;
        self.harvest.merge(dirty)?;
        let mut found = false;
        if host.written(mem, gfn)? {
            dirty.mark(gfn)?;
            found = true;
        }
        // An alias is noted where it lies: its view is a candidate too.
        let mut holders = ViewSet::EMPTY;
        if self.enabled {
            holders = self.occupancy.candidates(gfn.0, gfn.0);
            holders = holders.intersection(&self.active);
            holders.remove(0);
        }
        for i in holders.iter() {
            let Some(v) = self.views[i].as_ref() else {
                continue;
            };
            let owner = v.remaps.source_of(gfn.0).map_or(gfn, Gfn);
            if v.p2m.written(mem, gfn)? {
                dirty.mark(owner)?;
                found = true;
            }
        }
        if found {
            return Ok(());
        }
        // Only a clean log-dirty leaf logs: the write went to the gfn or to
        // the source of an alias there, tracked when it was made.
        dirty.mark(gfn)?;
        for i in self.remapping.iter() {
            if let Some(s) = self.views[i]
                .as_ref()
                .and_then(|v| v.remaps.source_of(gfn.0))
            {
                dirty.mark(Gfn(s))?;
            }
        }
        Ok(())
    }
}
