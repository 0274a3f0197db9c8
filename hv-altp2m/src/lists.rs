//! The two EPTP list pages of a guest: every active view ("valid" list, for
//! the hypervisor and a monitor) and the visible ones only (the list the CPU
//! reads on VMFUNC leaf 0, i.e. the VMCS EPTP-list address). Real 4K frames
//! from `EptMemory`, written with `write_entry`, one u64 per view index. A
//! slot without a view holds [`INVALID_EPTP`], which fails the EPTP checks,
//! so a VMFUNC to it exits instead of switching.

use hv_ept::{ENTRIES, EptMemory, Mfn};

use crate::Error;

/// What an unused list slot holds (Xen's INVALID_MFN): memory type 7 and
/// reserved bits set, so the CPU refuses it as an EPTP.
pub const INVALID_EPTP: u64 = u64::MAX;

pub(crate) struct EptpLists {
    valid: Mfn,
    visible: Mfn,
}

impl EptpLists {
    pub(crate) fn new<M: EptMemory + ?Sized>(mem: &mut M) -> Result<EptpLists, Error> {
        let valid = mem.alloc_frame().ok_or(Error::NoMemory)?;
        let Some(visible) = mem.alloc_frame() else {
            mem.free_frame(valid);
            return Err(Error::NoMemory);
        };
        let lists = EptpLists { valid, visible };
        lists.clear(mem);
        Ok(lists)
    }

    pub(crate) fn valid(&self) -> Mfn {
        self.valid
    }

    pub(crate) fn visible(&self) -> Mfn {
        self.visible
    }

    /// Publishes view `i` with `eptp`; in the CPU's list only if `visible`.
    pub(crate) fn set<M: EptMemory + ?Sized>(
        &self,
        mem: &mut M,
        i: usize,
        eptp: u64,
        visible: bool,
    ) {
        mem.write_entry(self.valid, i, eptp);
        mem.write_entry(self.visible, i, if visible { eptp } else { INVALID_EPTP });
    }

    pub(crate) fn unset<M: EptMemory + ?Sized>(&self, mem: &mut M, i: usize) {
        mem.write_entry(self.visible, i, INVALID_EPTP);
        mem.write_entry(self.valid, i, INVALID_EPTP);
    }

    pub(crate) fn clear<M: EptMemory + ?Sized>(&self, mem: &mut M) {
        for i in 0..ENTRIES {
            self.unset(mem, i);
        }
    }

    pub(crate) fn free<M: EptMemory + ?Sized>(self, mem: &mut M) {
        mem.free_frame(self.visible);
        mem.free_frame(self.valid);
    }
}
