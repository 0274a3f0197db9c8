//! Simulated physical memory for host-side tests and benchmarks (feature `sim`).
//!
//! Frames are boxed 4 KiB arrays indexed by mfn, recycled through a FIFO free
//! list (so a use after free is likely to hit a still-free frame). It counts
//! frames and entry writes, injects allocation failures, and panics on a double
//! free or on any access to a frame that is not allocated: those are bugs in the
//! code under test, and a panic points at them.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::cell::Cell;

use crate::addr::{ENTRIES, Mfn};
use crate::memory::EptMemory;

type Frame = Box<[u64; ENTRIES]>;

/// A fresh frame holds this in every slot: present garbage, so a table used
/// before it was written shows up in walks.
pub const POISON: u64 = 0xa5a5_a5a5_a5a5_a5a5;

/// Simulated physical memory with frame accounting.
pub struct SimMemory {
    base: u64,
    frames: Vec<Option<Frame>>,
    free: VecDeque<usize>,
    spare: Vec<Frame>,
    outstanding: usize,
    peak: usize,
    allocs: u64,
    writes: u64,
    reads: Cell<u64>,
    /// Allocations still allowed before the injected failure, if one is armed.
    fail_in: Option<u64>,
    limit: Option<usize>,
}

impl Default for SimMemory {
    fn default() -> Self {
        Self::new()
    }
}

impl SimMemory {
    /// First mfn handed out: not 0, so an entry whose address was never set
    /// does not point at a real table.
    pub const BASE_MFN: u64 = 0x1000;

    pub fn new() -> SimMemory {
        SimMemory {
            base: Self::BASE_MFN,
            frames: Vec::new(),
            free: VecDeque::new(),
            spare: Vec::new(),
            outstanding: 0,
            peak: 0,
            allocs: 0,
            writes: 0,
            reads: Cell::new(0),
            fail_in: None,
            limit: None,
        }
    }

    /// Frames allocated and not yet freed.
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// Highest `outstanding` seen.
    pub fn peak(&self) -> usize {
        self.peak
    }

    /// Successful allocations so far.
    pub fn allocations(&self) -> u64 {
        self.allocs
    }

    /// Entry writes so far (through `write_entry`).
    pub fn entry_writes(&self) -> u64 {
        self.writes
    }

    /// Entry reads so far (through `read_entry`).
    pub fn entry_reads(&self) -> u64 {
        self.reads.get()
    }

    pub fn reset_counters(&mut self) {
        self.writes = 0;
        self.reads.set(0);
        self.allocs = 0;
    }

    /// Makes the `n`-th allocation from now fail (1 = the next one), once.
    pub fn fail_nth_alloc(&mut self, n: u64) {
        self.fail_in = Some(n.saturating_sub(1));
    }

    /// Whether an armed failure has not been hit yet.
    pub fn failure_pending(&self) -> bool {
        self.fail_in.is_some()
    }

    pub fn clear_failure(&mut self) {
        self.fail_in = None;
    }

    /// Caps the number of outstanding frames (`None`: unlimited).
    pub fn set_frame_limit(&mut self, limit: Option<usize>) {
        self.limit = limit;
    }

    pub fn is_allocated(&self, frame: Mfn) -> bool {
        self.slot(frame).is_some_and(|i| self.frames[i].is_some())
    }

    fn slot(&self, frame: Mfn) -> Option<usize> {
        let i = usize::try_from(frame.0.checked_sub(self.base)?).ok()?;
        (i < self.frames.len()).then_some(i)
    }

    fn frame(&self, frame: Mfn) -> &Frame {
        match self.slot(frame).and_then(|i| self.frames[i].as_ref()) {
            Some(f) => f,
            None => panic!("SimMemory: access to {frame:?}, which is not an allocated frame"),
        }
    }
}

impl EptMemory for SimMemory {
    fn alloc_frame(&mut self) -> Option<Mfn> {
        if let Some(n) = self.fail_in {
            if n == 0 {
                self.fail_in = None;
                return None;
            }
            self.fail_in = Some(n - 1);
        }
        if self.limit.is_some_and(|l| self.outstanding >= l) {
            return None;
        }
        let mut frame = self.spare.pop().unwrap_or_else(|| Box::new([0; ENTRIES]));
        frame.fill(POISON);
        let i = match self.free.pop_front() {
            Some(i) => i,
            None => {
                self.frames.push(None);
                self.frames.len() - 1
            }
        };
        self.frames[i] = Some(frame);
        self.outstanding += 1;
        self.peak = self.peak.max(self.outstanding);
        self.allocs += 1;
        Some(Mfn(self.base + i as u64))
    }

    fn free_frame(&mut self, frame: Mfn) {
        let Some(i) = self.slot(frame) else {
            panic!("SimMemory: free of {frame:?}, which was never allocated");
        };
        let Some(f) = self.frames[i].take() else {
            panic!("SimMemory: double free of {frame:?}");
        };
        self.spare.push(f);
        self.free.push_back(i);
        self.outstanding -= 1;
    }

    fn read_entry(&self, table: Mfn, index: usize) -> u64 {
        self.reads.set(self.reads.get() + 1);
        self.frame(table)[index]
    }

    fn write_entry(&mut self, table: Mfn, index: usize, value: u64) {
        let i = match self.slot(table) {
            Some(i) if self.frames[i].is_some() => i,
            _ => panic!("SimMemory: write to {table:?}, which is not an allocated frame"),
        };
        if let Some(f) = self.frames[i].as_mut() {
            f[index] = value;
        }
        self.writes += 1;
    }
}

/// Visits every entry of every table reachable from `table` (a table at
/// `level`, 3 = root, covering gfns from `base`): `f(level, base, index,
/// raw)`. Returns the number of tables. For tests that look at the tables
/// as the CPU would, past the p2m's own accessors.
pub fn walk_tables(
    mem: &SimMemory,
    table: Mfn,
    level: u8,
    base: u64,
    f: &mut impl FnMut(u8, u64, usize, u64),
) -> usize {
    let mut n = 1;
    for i in 0..ENTRIES {
        let raw = mem.read_entry(table, i);
        f(level, base, i, raw);
        let e = crate::EptEntry(raw);
        if e.is_valid() && !e.is_leaf(level) {
            let child_base = base + ((i as u64) << (9 * level));
            n += walk_tables(mem, e.mfn(), level - 1, child_base, f);
        }
    }
    n
}

/// Valid leaves straight from the tables: (first gfn, level, raw entry).
pub fn raw_leaves(mem: &SimMemory, p2m: &crate::P2m) -> Vec<(u64, u8, u64)> {
    let mut out = Vec::new();
    walk_tables(mem, p2m.root(), 3, 0, &mut |lv, base, i, raw| {
        let e = crate::EptEntry(raw);
        if e.is_valid() && e.is_leaf(lv) {
            out.push((base + ((i as u64) << (9 * lv)), lv, raw));
        }
    });
    out
}

/// Entries carrying a lazy type-change mark, straight from the tables:
/// (level, first gfn), in gfn order (higher levels first). Every mark must
/// carry the invalid memory type, or the CPU would not exit on it.
pub fn marks(mem: &SimMemory, p2m: &crate::P2m) -> Vec<(u8, u64)> {
    let mut out = Vec::new();
    walk_tables(mem, p2m.root(), 3, 0, &mut |lv, base, i, raw| {
        let e = crate::EptEntry(raw);
        if e.is_valid() && e.is_marked() {
            assert_eq!(
                e.emt(),
                crate::EMT_MARK,
                "a mark always has the invalid memory type"
            );
            out.push((lv, base + ((i as u64) << (9 * lv))));
        }
    });
    out.sort_by_key(|&(lv, g)| (g, core::cmp::Reverse(lv)));
    out
}

/// Table entries with a scoped mark (bit 52 next to the mark), straight
/// from the tables: (level, first gfn), sorted. Each must have recorded
/// ranges, and no entry may have ranges without one:
/// `p2m.scoped_entries() == scoped_marks(mem, p2m)`.
pub fn scoped_marks(mem: &SimMemory, p2m: &crate::P2m) -> Vec<(u8, u64)> {
    let mut out = Vec::new();
    walk_tables(mem, p2m.root(), 3, 0, &mut |lv, base, i, raw| {
        let e = crate::EptEntry(raw);
        if e.is_valid() && !e.is_leaf(lv) && e.is_marked() && raw & crate::entry::SCOPED != 0 {
            out.push((lv, base + ((i as u64) << (9 * lv))));
        }
    });
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounting_and_reuse() {
        let mut m = SimMemory::new();
        let a = m.alloc_frame().unwrap();
        let b = m.alloc_frame().unwrap();
        assert_ne!(a, b);
        assert_eq!(m.outstanding(), 2);
        assert_eq!(m.read_entry(a, 5), POISON);
        m.write_entry(a, 5, 42);
        assert_eq!(m.read_entry(a, 5), 42);
        m.free_frame(a);
        assert!(!m.is_allocated(a) && m.is_allocated(b));
        assert_eq!(m.outstanding(), 1);
        let c = m.alloc_frame().unwrap();
        assert_eq!(c, a, "FIFO reuse of the only free slot");
        assert_eq!(
            m.read_entry(c, 5),
            POISON,
            "reused frames are poisoned again"
        );
        assert_eq!(m.peak(), 2);
    }

    #[test]
    fn injected_failure_hits_once() {
        let mut m = SimMemory::new();
        m.fail_nth_alloc(2);
        assert!(m.alloc_frame().is_some());
        assert!(m.failure_pending());
        assert!(m.alloc_frame().is_none());
        assert!(!m.failure_pending());
        assert!(m.alloc_frame().is_some());
        m.set_frame_limit(Some(2));
        assert!(m.alloc_frame().is_none());
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn double_free_is_caught() {
        let mut m = SimMemory::new();
        let a = m.alloc_frame().unwrap();
        m.free_frame(a);
        m.free_frame(a);
    }

    #[test]
    #[should_panic(expected = "not an allocated frame")]
    fn read_after_free_is_caught() {
        let mut m = SimMemory::new();
        let a = m.alloc_frame().unwrap();
        m.free_frame(a);
        m.read_entry(a, 0);
    }

    #[test]
    #[should_panic(expected = "not an allocated frame")]
    fn write_to_unknown_frame_is_caught() {
        let mut m = SimMemory::new();
        m.write_entry(Mfn(3), 0, 0);
    }
}
