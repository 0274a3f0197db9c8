//! TLB coherence: which EPTPs need an INVEPT before any vCPU resumes.
//!
//! Each p2m (host and views) raises its own flag when a change reduced
//! rights, dropped or re-pointed a mapping, marked entries for a lazy type
//! change, or freed a table; adding a mapping or rights needs no flush (the
//! CPU does not cache a failed translation). A destroyed view's EPTP cannot
//! be named once its slot is reused, so destroying a view (or disabling
//! altp2m) asks for an all-context INVEPT instead.

use hv_ept::P2m;

use crate::Altp2m;
use crate::viewset::ViewSet;

/// What to invalidate: view 0 stands for the host p2m's EPTP.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Flush {
    /// INVEPT type 2 (all contexts) is needed.
    pub all_contexts: bool,
    /// Single-context INVEPT of each of these views' EPTP
    /// ([`Altp2m::eptp`]); covered by `all_contexts` when that is set.
    pub views: ViewSet,
}

impl Flush {
    pub fn is_empty(&self) -> bool {
        !self.all_contexts && self.views.is_empty()
    }
}

impl Altp2m {
    /// Returns and clears the pending INVEPT requests of the host p2m and of
    /// every view. The kernel does them, on every CPU that may hold
    /// translations of this guest, before resuming any of its vCPUs.
    pub fn take_flush(&mut self, host: &mut P2m) -> Flush {
        self.flushes += 1;
        let mut f = Flush {
            all_contexts: core::mem::take(&mut self.flush_all),
            views: ViewSet::EMPTY,
        };
        if host.take_flush_needed() {
            f.views.insert(0);
        }
        for i in self.active.iter() {
            if let Some(v) = self.views[i].as_mut()
                && v.p2m.take_flush_needed()
            {
                f.views.insert(i);
            }
        }
        f
    }

    /// Whether [`Altp2m::take_flush`] would ask for anything. Cheap while
    /// altp2m is off (no active view to look at), so the kernel can skip
    /// the flush step on its hottest paths.
    pub fn flush_pending(&self, host: &P2m) -> bool {
        self.flush_all
            || host.flush_needed()
            || (self.enabled
                && self
                    .active
                    .iter()
                    .any(|i| self.views[i].as_ref().is_some_and(|v| v.p2m.flush_needed())))
    }

    /// Hands every logged [`crate::Dropped`] entry to `f` and empties the
    /// log; returns how many were lost because the log was full.
    pub fn drain_dropped(&mut self, f: impl FnMut(crate::Dropped)) -> u64 {
        self.drops.drain(f)
    }

    /// What the index of which views hold what takes (it keeps host
    /// changes from walking views that hold nothing at the changed pages).
    pub fn index_memory(&self) -> crate::IndexMemory {
        self.occupancy.memory()
    }

    /// For tests with few views: how many views may hold parts of a 2M
    /// region before the index keeps a set per 4K page there (default 8).
    #[doc(hidden)]
    pub fn set_index_crowding(&mut self, views: usize) {
        self.occupancy.set_crowded(views);
    }

    /// Whether the drop log holds anything (entries or a lost count).
    pub fn has_dropped(&self) -> bool {
        !self.drops.is_empty()
    }
}
