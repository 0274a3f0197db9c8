//! hv-altp2m: alternate EPT views ("altp2m", Xen's name) of one guest. Up to
//! 512 views, each an EPT tree of its own that fills lazily from the host
//! p2m, carries its own access restrictions, suppress-#VE bits and remaps,
//! and is kept coherent with the host: host changes and lazy type changes
//! (log-dirty) reach every view, and no view ever reaches a frame the host no
//! longer maps. Built on `hv-ept`; semantics in
//! `shared/design/p2m-and-altp2m.md`, vocabulary from Xen's altp2m.c/p2m.c
//! (`p2m_altp2m_lazy_copy`, `propagate_change`, `change_gfn`,
//! `set_mem_access`, `max_remapped_gfn`, `default_access`, `suppress_ve`).
//!
//! Decisions (where Xen differs or is silent):
//! - **View 0 is the host p2m itself**, not a lazily filled copy: its EPTP is
//!   the host's, `set_mem_access`/`set_suppress_ve` on view 0 change host
//!   entries, and operations that would make the host stop being the
//!   authoritative map (`change_gfn`, `reset_view`, `destroy_view`,
//!   `set_default_access`) are refused on it with `DefaultView`. No memory,
//!   no propagation, no stale copy for the default view.
//! - **Host changes keep a view's deliberate divergence unless the mapping
//!   changed**: where the host keeps the frame and the type, a view keeps its
//!   access, suppress-#VE and remaps; a `ram_rw` <-> `ram_logdirty`
//!   transition updates the view's type and keeps its access; another frame,
//!   another type or no mapping drops the view's entry there (it copies
//!   lazily again). An alias follows its source only: it is dropped when the
//!   source stops mapping the same frame with the same type (a log-dirty
//!   transition keeps it), and kept whatever the host does at the alias's own
//!   gfn. Only what was dropped is affected (never the
//!   whole view, as in Xen), and divergence lost is logged
//!   ([`Altp2m::drain_dropped`]).
//! - **TLB**: [`Altp2m::take_flush`] names the EPTPs (host = view 0) that
//!   need an INVEPT, or all contexts after a view was destroyed.
//! - A fresh or reset view's `max_mapped_pfn` is 0; every p2m's type range
//!   change is clipped to its own bound, inclusively. A write through a
//!   remap dirties the gfn that owns the frame.
//! - A log-dirty clean is two calls with the INVEPT between
//!   ([`Altp2m::arm_dirty`], [`Altp2m::fetch_dirty`]), so that no write is
//!   lost while vCPUs run. Its work is bounded whatever the number of
//!   tracked ranges.
//! - Under PML (the host p2m's `LogMode`), writes to tracked pages are
//!   logged by the CPU in every view, aliases included; a logged address is
//!   resolved to the view it was written through by the EPT dirty flags
//!   ([`Altp2m::pml_logged`]), and a clean re-arms exactly the pages it
//!   hands over.
//! - A host change walks the views that may hold its pages: an index per
//!   1G and 2M, and per 4K page where many views hold parts of a 2M region.
//!
//! The kernel keeps one [`Altp2m`] per guest next to the host `P2m`, the
//! `DirtyBitmap` and its `EptMemory`, and once altp2m may be enabled routes
//! every host p2m change through the `host_*` calls. Calls are not
//! synchronized: the caller holds the guest's p2m lock. Guest-controlled
//! sizes grow with `try_reserve` and fail with `NoMemory`; a failed call
//! leaves host and views as they were. `#![no_std]` + `alloc`, no `unsafe`.
//!
//! Tests: `cargo test -p hv-altp2m` (bounded property cases). Long run:
//! `PROPTEST_CASES=5000 cargo test -p hv-altp2m --release --test prop`.
//! Figures: `cargo bench -p hv-altp2m`. See `README.md`.
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

mod access;
mod droplog;
mod fault;
mod flush;
mod host;
mod lists;
mod occupancy;
mod pml;
mod propagate;
mod remap;
mod set;
mod viewset;

pub use access::{Effective, MultiError};
pub use droplog::{DropReason, Dropped};
pub use fault::{AccessViolation, Outcome};
pub use flush::Flush;
pub use host::{ArmedClean, Mapping, REARM_PAGES, REARM_RANGES};
pub use lists::INVALID_EPTP;
pub use occupancy::IndexMemory;
pub use set::Altp2m;
pub use viewset::{MAX_VIEWS, ViewSet};

pub(crate) use droplog::DropLog;

/// Why an altp2m operation was refused. A refusal leaves the host p2m and
/// every view unchanged.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Error {
    /// Out of table frames or of heap.
    NoMemory,
    /// Neither the view nor the host maps the gfn (or the host does not,
    /// where the host's mapping is needed).
    NotMapped,
    /// A gfn above `Gfn::MAX` (or a gpa beyond 48 bits).
    GfnOutOfRange,
    /// A range whose start lies after its end.
    BadRange,
    /// An access EPT cannot express (`w`, `wx`; `x` without execute-only).
    UnsupportedAccess,
    /// A type change other than `ram_rw` <-> `ram_logdirty`.
    UnsupportedTypeChange,
    /// altp2m is not enabled for the guest.
    NotEnabled,
    AlreadyEnabled,
    /// A view index of 512 or more, or of a view that is not active.
    BadView,
    /// The operation does not apply to view 0, the host p2m.
    DefaultView,
    /// `create_view_at` on an index that has a view.
    ViewExists,
    /// All 511 views exist.
    NoFreeView,
    /// A vCPU runs on the view.
    Busy,
    /// A vCPU index beyond the guest's.
    BadVcpu,
    /// The view is hidden from the guest's switches.
    Invisible,
    /// `change_gfn` to a source that is not RAM in the host.
    NotRam,
    /// Reverting a gfn that is not remapped in the view.
    NotRemapped,
    /// `fetch_dirty` before `take_flush` was called after `arm_dirty`.
    FlushPending,
    /// Another refusal from the p2m layer (order, alignment, frame range).
    Ept(hv_ept::Error),
}

impl From<hv_ept::Error> for Error {
    fn from(e: hv_ept::Error) -> Error {
        match e {
            hv_ept::Error::NoMemory => Error::NoMemory,
            hv_ept::Error::NotMapped => Error::NotMapped,
            hv_ept::Error::GfnOutOfRange => Error::GfnOutOfRange,
            hv_ept::Error::BadRange => Error::BadRange,
            hv_ept::Error::UnsupportedAccess => Error::UnsupportedAccess,
            hv_ept::Error::UnsupportedTypeChange => Error::UnsupportedTypeChange,
            other => Error::Ept(other),
        }
    }
}
