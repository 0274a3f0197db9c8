//! How a p2m reaches table frames: allocation and 64-bit entry access.
//!
//! One object implements this for a whole guest (the host p2m and every altp2m
//! view allocate from the same pool), so p2m operations borrow it rather than
//! own it. The kernel implements it over its frame allocator and direct map
//! (that is where the `unsafe` lives); tests use `sim::SimMemory`.

use crate::addr::Mfn;

/// Table frames and their entries.
///
/// Contract for implementations:
/// - `read_entry`/`write_entry` are single 64-bit accesses (the CPU may walk
///   the table concurrently; the p2m orders its writes so that every state a
///   walker can see is consistent: a new table is fully written before it is
///   linked, a parent's mark is cleared only after its children carry it).
/// - `free_frame` may be called for a table that a CPU still has cached: the
///   frame must not be reused until an INVEPT covering the p2m that freed it
///   has been done (see `P2m::take_flush_needed`).
/// - `index` is always below 512; `table` is always a frame this p2m got from
///   `alloc_frame` and has not freed.
pub trait EptMemory {
    /// A frame for a new table, or `None` when out of frames. Its content is
    /// unspecified: the p2m writes all 512 entries before using it.
    fn alloc_frame(&mut self) -> Option<Mfn>;

    /// Returns a table frame.
    fn free_frame(&mut self, frame: Mfn);

    fn read_entry(&self, table: Mfn, index: usize) -> u64;

    fn write_entry(&mut self, table: Mfn, index: usize, value: u64);
}
