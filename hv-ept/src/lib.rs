//! hv-ept: the host p2m of a guest (and each altp2m view) kept in the EPT
//! format the CPU walks: gfn -> (mfn, p2m type, access) in 4-level tables with
//! 4K/2M/1G leaves. It changes the type of large ranges lazily, through EPT
//! misconfigurations resolved on fault (`change_type_range`,
//! `resolve_misconfig`), keeps per-p2m log-dirty state and the guest's dirty
//! log (writes noticed by write protection, or by page-modification logging
//! through the EPT dirty flags: [`LogMode`]), tracks when an INVEPT is
//! needed, and carries a model of the CPU's EPT walk (`walk::translate`,
//! with PML `walk::translate_logged`) to test all of it the way hardware
//! uses it.
//!
//! Semantics: `shared/design/p2m-and-altp2m.md`. Vocabulary follows Xen's
//! p2m-ept.c (`set_entry`, `get_entry`, `max_mapped_pfn`, `resolve_misconfig`,
//! `recalc`, `emt`, `ipat`, `sve`).
//!
//! `no_std` with `alloc` only for the log-dirty ranges and the dirty bitmap,
//! which grow with `try_reserve`. Table frames come from the caller's
//! [`EptMemory`]; feature `sim` adds [`sim::SimMemory`] for host tests.
//!
//! Tests: `cargo test -p hv-ept` (bounded property-test cases). Longer run:
//! `PROPTEST_CASES=2000 cargo test -p hv-ept --release --test prop`.
//! Figures: `cargo bench -p hv-ept`.
#![no_std]
// Memory is reached only through `EptMemory`: the unsafe side lives in the kernel.
#![forbid(unsafe_code)]

extern crate alloc;

mod addr;
mod caps;
mod entry;
mod logdirty;
mod memory;
mod p2m;
mod recalc;
mod scope;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
mod types;
pub mod walk;

pub use addr::{ENTRIES, Gfn, Mfn, Order, aligned_blocks};
pub use caps::EptCaps;
pub use entry::{ADDR_MASK, EMT_MARK, EMT_UC, EMT_WB, EptEntry, EptFlags};
pub use logdirty::{Coverage, DirtyBitmap, LogDirtyRanges, Rearm, WriteFault};
pub use memory::EptMemory;
pub use p2m::{EntryInfo, Leaf, P2m, StoredLeaf};
pub use recalc::{check_type_change, check_type_range};
pub use types::{LogMode, P2mAccess, P2mType, Rights};

/// Why a p2m operation was refused. Every refusal leaves the p2m unchanged.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Error {
    /// A gfn above [`Gfn::MAX`] (beyond 48-bit guest-physical addresses).
    GfnOutOfRange,
    /// A frame beyond the CPU's physical-address width.
    MfnOutOfRange,
    /// An order other than 0, 9, 18, or a page size the CPU lacks.
    BadOrder,
    /// A gfn or mfn not aligned to the order.
    Misaligned,
    /// A range whose start lies after its end.
    BadRange,
    /// Out of table frames or of heap for bookkeeping.
    NoMemory,
    /// An access EPT cannot express: write without read, or execute-only
    /// where the CPU does not support it.
    UnsupportedAccess,
    /// A lazy type change other than `ram_rw` <-> `ram_logdirty`.
    UnsupportedTypeChange,
    /// The gfn has no present mapping.
    NotMapped,
    /// A feature the CPU lacks (EPT A/D flags).
    Unsupported,
}
