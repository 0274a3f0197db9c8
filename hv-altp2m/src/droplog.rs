//! What propagation took away from views (beyond Xen, which resets whole
//! views silently): a bounded log the kernel drains after each host change
//! and can forward to a monitor. Only deliberate divergence is logged: a
//! remap, or an entry whose access or suppress-#VE bit differs from what a
//! lazy copy would install now. Plain lazy copies that were dropped are
//! refilled on the next fault and lose nothing, so they are not logged.
//!
//! The log never grows past the capacity reserved up front: an operation
//! never fails because of it; overflow is counted instead. It only speaks of
//! views that exist: destroying a view (or disabling altp2m) drops its
//! entries, so none is ever read as news about a later view at that index.

use alloc::vec::Vec;

use hv_ept::{Gfn, P2mAccess};

use crate::Error;

/// Why an entry left a view.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DropReason {
    /// The host changed the mapping (frame, or type other than a log-dirty
    /// transition) under the view's entry.
    MappingChanged,
    /// A remap (alias) whose source gfn no longer maps the same frame with
    /// the same type in the host (a log-dirty transition aside): the alias is
    /// gone and the gfn copies lazily from the host again.
    SourceChanged,
    /// No table frame to split a superpage precisely, so the whole mapping
    /// around the change was dropped instead.
    OutOfMemory,
}

/// One entry (or run of pages) a view lost.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Dropped {
    pub view: u16,
    pub gfn: Gfn,
    pub pages: u64,
    /// The access the view had there (a monitor re-applies it if it wants).
    pub access: P2mAccess,
    pub suppress_ve: bool,
    /// For a remap: the gfn whose frame it showed.
    pub remap_source: Option<Gfn>,
    pub reason: DropReason,
}

pub(crate) struct DropLog {
    entries: Vec<Dropped>,
    lost: u64,
}

impl DropLog {
    pub(crate) fn new(capacity: usize) -> Result<DropLog, Error> {
        let mut entries = Vec::new();
        entries
            .try_reserve_exact(capacity)
            .map_err(|_| Error::NoMemory)?;
        Ok(DropLog { entries, lost: 0 })
    }

    /// Never reallocates: past the reserved capacity it only counts.
    pub(crate) fn push(&mut self, d: Dropped) {
        if self.entries.len() < self.entries.capacity() {
            self.entries.push(d);
        } else {
            self.lost += 1;
        }
    }

    pub(crate) fn drain(&mut self, mut f: impl FnMut(Dropped)) -> u64 {
        for d in self.entries.drain(..) {
            f(d);
        }
        core::mem::take(&mut self.lost)
    }

    /// Forgets the entries of `view`, which was destroyed: a view created
    /// later at its index must not inherit them. The lost count stays (it
    /// names no view).
    pub(crate) fn forget(&mut self, view: u16) {
        self.entries.retain(|d| d.view != view);
    }

    /// Forgets every entry: no view is left (altp2m was disabled).
    pub(crate) fn forget_all(&mut self) {
        self.entries.clear();
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.lost == 0
    }
}
