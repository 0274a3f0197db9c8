//! Log-dirty state and the dirty log.
//!
//! Each p2m has its own [`LogDirtyRanges`] (ranges plus a global flag): they
//! decide what a recalculation makes of `ram_rw`/`ram_logdirty` pages in that
//! p2m. The [`DirtyBitmap`] is per guest (host p2m and views share it), so it
//! is a separate object the caller owns and passes in.
//!
//! A write to a `ram_logdirty` page faults (its W bit is clear). The handler,
//! [`P2m::logdirty_write_fault`], marks the gfn dirty and makes its 4K page
//! `ram_rw` in that p2m, splitting a covering 2M/1G page so the other pages
//! stay tracked. If the split cannot get frames it falls back to making the
//! whole superpage writable and marking all its pages dirty: coarser, still
//! correct (a page is never written without being logged), and the guest runs
//! on. A clean is `fetch_and_clear` followed by a re-arm:
//! `change_type_range(start, end, RamRw, RamLogdirty)` (or
//! `change_type_global`) on the host and every active view.

use alloc::vec::Vec;

use crate::Error;
use crate::addr::{Gfn, Order, level_base, level_pages};
use crate::memory::EptMemory;
use crate::p2m::P2m;
use crate::types::P2mType;

/// How a log-dirty state covers a gfn range.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Coverage {
    Outside,
    Inside,
    Straddles,
}

/// A p2m's log-dirty ranges (inclusive, sorted, disjoint, never adjacent) and
/// global flag.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct LogDirtyRanges {
    ranges: Vec<(u64, u64)>,
    global: bool,
}

impl LogDirtyRanges {
    pub const fn new() -> LogDirtyRanges {
        LogDirtyRanges {
            ranges: Vec::new(),
            global: false,
        }
    }

    pub fn global(&self) -> bool {
        self.global
    }

    pub(crate) fn set_global(&mut self, on: bool) {
        self.global = on;
    }

    /// The ranges, as inclusive `(start, end)` pairs.
    pub fn ranges(&self) -> impl Iterator<Item = (Gfn, Gfn)> + '_ {
        self.ranges.iter().map(|&(s, e)| (Gfn(s), Gfn(e)))
    }

    /// Whether a write to `gfn` must be logged.
    pub fn contains(&self, gfn: Gfn) -> bool {
        self.coverage(gfn.0, gfn.0) == Coverage::Inside
    }

    pub fn coverage(&self, start: u64, end: u64) -> Coverage {
        if self.global {
            return Coverage::Inside;
        }
        let i = self.ranges.partition_point(|&(_, re)| re < start);
        match self.ranges.get(i) {
            Some(&(rs, re)) if rs <= start && end <= re => Coverage::Inside,
            Some(&(rs, _)) if rs <= end => Coverage::Straddles,
            _ => Coverage::Outside,
        }
    }

    /// The type a page range of type `ty` gets on recalculation, or `None`
    /// if its pages would get different types (a changeable type straddling
    /// a log-dirty boundary).
    pub fn recalc_type(&self, ty: P2mType, start: u64, end: u64) -> Option<P2mType> {
        if !ty.is_changeable() {
            return Some(ty);
        }
        match self.coverage(start, end) {
            Coverage::Inside => Some(P2mType::RamLogdirty),
            Coverage::Outside => Some(P2mType::RamRw),
            Coverage::Straddles => None,
        }
    }

    /// The recalculated type at `gfn` of a marked leaf of type `ty` at
    /// `level`, and the highest level (<= `level`) whose block around `gfn`
    /// has one type.
    pub(crate) fn uniform_at(&self, ty: P2mType, gfn: u64, level: u8) -> (P2mType, u8) {
        (0..=level)
            .rev()
            .find_map(|lv| {
                let base = level_base(gfn, lv);
                self.recalc_type(ty, base, base + level_pages(lv) - 1)
                    .map(|t| (t, lv))
            })
            .unwrap_or((ty, 0))
    }

    /// Adds `[start, end]`, merging with overlapping or adjacent ranges.
    pub(crate) fn add(&mut self, start: u64, end: u64) -> Result<(), Error> {
        let i = self.ranges.partition_point(|&(_, re)| re + 1 < start);
        let j = self.ranges.partition_point(|&(rs, _)| rs <= end + 1);
        if i == j {
            self.ranges.try_reserve(1).map_err(|_| Error::NoMemory)?;
            self.ranges.insert(i, (start, end));
        } else {
            let merged = (start.min(self.ranges[i].0), end.max(self.ranges[j - 1].1));
            self.ranges[i] = merged;
            self.ranges.drain(i + 1..j);
        }
        Ok(())
    }

    /// Removes `[start, end]`; may split one range in two.
    pub(crate) fn remove(&mut self, start: u64, end: u64) -> Result<(), Error> {
        let i = self.ranges.partition_point(|&(_, re)| re < start);
        let j = self.ranges.partition_point(|&(rs, _)| rs <= end);
        if i == j {
            return Ok(());
        }
        let (first, last) = (self.ranges[i], self.ranges[j - 1]);
        let left = (first.0 < start).then(|| (first.0, start - 1));
        let right = (last.1 > end).then(|| (end + 1, last.1));
        match (left, right) {
            (Some(l), Some(r)) => {
                if j - i == 1 {
                    self.ranges.try_reserve(1).map_err(|_| Error::NoMemory)?;
                    self.ranges.insert(i + 1, r);
                } else {
                    self.ranges[j - 1] = r;
                    self.ranges.drain(i + 1..j - 1);
                }
                self.ranges[i] = l;
            }
            (Some(keep), None) | (None, Some(keep)) => {
                self.ranges[i] = keep;
                self.ranges.drain(i + 1..j);
            }
            (None, None) => {
                self.ranges.drain(i..j);
            }
        }
        Ok(())
    }

    /// Makes room for `additional` more ranges: a change that adds or splits
    /// at most that many then cannot fail. Callers that apply one change to
    /// several p2ms (altp2m views) reserve in all of them first.
    pub fn reserve(&mut self, additional: usize) -> Result<(), Error> {
        self.ranges
            .try_reserve(additional)
            .map_err(|_| Error::NoMemory)
    }

    pub(crate) fn copy_from(&mut self, other: &LogDirtyRanges) -> Result<(), Error> {
        let more = other.ranges.len().saturating_sub(self.ranges.len());
        self.ranges.try_reserve(more).map_err(|_| Error::NoMemory)?;
        self.ranges.clear();
        self.ranges.extend_from_slice(&other.ranges);
        self.global = other.global;
        Ok(())
    }
}

/// log2 of the gfns one bitmap chunk covers (4 KiB of bits).
const CHUNK_SHIFT: u32 = 15;
const CHUNK_WORDS: usize = 1 << (CHUNK_SHIFT - 6);

/// The guest's dirty log: one bit per gfn, in chunks allocated on first use.
#[derive(Clone, Debug, Default)]
pub struct DirtyBitmap {
    /// Sorted by chunk number.
    chunks: Vec<(u64, Vec<u64>)>,
    dirty: u64,
}

impl DirtyBitmap {
    pub const fn new() -> DirtyBitmap {
        DirtyBitmap {
            chunks: Vec::new(),
            dirty: 0,
        }
    }

    /// Number of dirty gfns.
    pub fn dirty_count(&self) -> u64 {
        self.dirty
    }

    pub fn is_dirty(&self, gfn: Gfn) -> bool {
        let (c, w, b) = split(gfn.0);
        self.chunk(c).is_some_and(|bits| bits[w] & (1 << b) != 0)
    }

    /// Makes sure marking any gfn of `[start, end]` cannot fail. Allocates
    /// 4 KiB per 128 MiB of guest memory in the range not yet covered.
    pub fn reserve(&mut self, start: Gfn, end: Gfn) -> Result<(), Error> {
        if start.check()? > end.check()? {
            return Err(Error::BadRange);
        }
        for c in (start.0 >> CHUNK_SHIFT)..=(end.0 >> CHUNK_SHIFT) {
            let i = match self.chunks.binary_search_by_key(&c, |&(n, _)| n) {
                Ok(_) => continue,
                Err(i) => i,
            };
            let mut bits = Vec::new();
            bits.try_reserve_exact(CHUNK_WORDS)
                .map_err(|_| Error::NoMemory)?;
            bits.resize(CHUNK_WORDS, 0);
            self.chunks.try_reserve(1).map_err(|_| Error::NoMemory)?;
            self.chunks.insert(i, (c, bits));
        }
        Ok(())
    }

    pub fn mark(&mut self, gfn: Gfn) -> Result<(), Error> {
        self.mark_range(gfn, gfn)
    }

    pub fn mark_range(&mut self, start: Gfn, end: Gfn) -> Result<(), Error> {
        self.reserve(start, end)?;
        self.for_words(start.0, end.0, |word, mask| {
            let new = mask & !*word;
            *word |= mask;
            new.count_ones() as u64
        });
        Ok(())
    }

    /// Calls `f` for every dirty gfn of `[start, end]`, in order, and clears it.
    pub fn fetch_and_clear(&mut self, start: Gfn, end: Gfn, mut f: impl FnMut(Gfn)) {
        let mut base_of = |word: &mut u64, mask: u64, first_gfn: u64| {
            let mut bits = *word & mask;
            *word &= !mask;
            let n = bits.count_ones() as u64;
            while bits != 0 {
                f(Gfn(first_gfn + bits.trailing_zeros() as u64));
                bits &= bits - 1;
            }
            n
        };
        let cleared = self.visit_words(start.0, end.0, &mut base_of);
        self.dirty -= cleared;
    }

    fn chunk(&self, c: u64) -> Option<&Vec<u64>> {
        let i = self.chunks.binary_search_by_key(&c, |&(n, _)| n).ok()?;
        Some(&self.chunks[i].1)
    }

    /// Applies `f(word, mask)` to the allocated words covering `[start, end]`,
    /// where `mask` selects the range's bits; `f` returns bits newly set.
    fn for_words(&mut self, start: u64, end: u64, mut f: impl FnMut(&mut u64, u64) -> u64) {
        let added = self.visit_words(start, end, &mut |w, m, _| f(w, m));
        self.dirty += added;
    }

    /// Walks the allocated words covering `[start, end]`; `f(word, mask,
    /// gfn of bit 0)` returns a count, summed.
    fn visit_words(
        &mut self,
        start: u64,
        end: u64,
        f: &mut impl FnMut(&mut u64, u64, u64) -> u64,
    ) -> u64 {
        let first = self
            .chunks
            .partition_point(|&(n, _)| n < start >> CHUNK_SHIFT);
        let mut total = 0;
        for (c, bits) in &mut self.chunks[first..] {
            let chunk_first = *c << CHUNK_SHIFT;
            if chunk_first > end {
                break;
            }
            for (w, word) in bits.iter_mut().enumerate() {
                let word_first = chunk_first + (w as u64) * 64;
                let word_last = word_first + 63;
                if word_last < start || word_first > end {
                    continue;
                }
                let lo = start.saturating_sub(word_first).min(64);
                let hi = (end.min(word_last) - word_first) + 1;
                let mask = (u64::MAX >> (64 - (hi - lo))) << lo;
                total += f(word, mask, word_first);
            }
        }
        total
    }
}

/// Chunk number, word index, bit index of a gfn.
fn split(gfn: u64) -> (u64, usize, u32) {
    let in_chunk = gfn & ((1 << CHUNK_SHIFT) - 1);
    (
        gfn >> CHUNK_SHIFT,
        (in_chunk / 64) as usize,
        (in_chunk % 64) as u32,
    )
}

/// What [`P2m::logdirty_write_fault`] did.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum WriteFault {
    /// The gfn was marked dirty and its 4K page is now `ram_rw` here.
    Precise,
    /// No frame to split the covering superpage: the whole mapping at `gfn`
    /// of `order` became `ram_rw` and all its pages were marked dirty.
    Coarse { gfn: Gfn, order: Order },
    /// The gfn was marked dirty; this p2m did not hold it as `ram_logdirty`
    /// (already writable here, another type, or not mapped), so nothing else
    /// changed.
    NotLogdirty,
}

impl P2m {
    /// A write to `gfn` faulted on a `ram_logdirty` entry, of this p2m or of a
    /// view over it: mark `gfn` dirty and make it `ram_rw` here (the caller
    /// propagates the host change to views). Fails only with `NoMemory` when
    /// the bitmap cannot grow, before anything changed.
    pub fn logdirty_write_fault<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        dirty: &mut DirtyBitmap,
        gfn: Gfn,
    ) -> Result<WriteFault, Error> {
        let info = self.get_entry(mem, gfn)?;
        let (Some(mfn), P2mType::RamLogdirty) = (info.mfn, info.ty) else {
            dirty.mark(gfn)?;
            return Ok(WriteFault::NotLogdirty);
        };
        // The leaf as stored (not the recomputed order) is what a fallback rewrites.
        let leaf = self.lookup(mem, gfn.0);
        let (first, last) = (
            Gfn(level_base(gfn.0, leaf.level)),
            Gfn(level_base(gfn.0, leaf.level) + level_pages(leaf.level) - 1),
        );
        dirty.reserve(first, last)?;
        let fault = match self.set_entry(mem, gfn, mfn, Order::PAGE_4K, P2mType::RamRw, info.access)
        {
            Ok(()) => {
                dirty.mark(gfn)?;
                WriteFault::Precise
            }
            Err(Error::NoMemory) => {
                // Rewriting the leaf at its own level needs no table.
                let order = Order::of_level(leaf.level);
                let base_mfn = leaf.entry.mfn();
                self.set_entry(mem, first, base_mfn, order, P2mType::RamRw, info.access)?;
                dirty.mark_range(first, last)?;
                WriteFault::Coarse { gfn: first, order }
            }
            Err(e) => return Err(e),
        };
        Ok(fault)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec;
    use std::vec::Vec;

    fn ranges(r: &LogDirtyRanges) -> Vec<(u64, u64)> {
        r.ranges().map(|(s, e)| (s.0, e.0)).collect()
    }

    #[test]
    fn add_merges_overlapping_and_adjacent() {
        let mut r = LogDirtyRanges::new();
        r.add(10, 20).unwrap();
        r.add(30, 40).unwrap();
        assert_eq!(ranges(&r), [(10, 20), (30, 40)]);
        r.add(21, 29).unwrap();
        assert_eq!(ranges(&r), [(10, 40)]);
        r.add(0, 5).unwrap();
        r.add(50, 60).unwrap();
        r.add(3, 55).unwrap();
        assert_eq!(ranges(&r), [(0, 60)]);
        r.add(Gfn::MAX.0, Gfn::MAX.0).unwrap();
        assert_eq!(ranges(&r), [(0, 60), (Gfn::MAX.0, Gfn::MAX.0)]);
    }

    #[test]
    fn remove_trims_and_splits() {
        let mut r = LogDirtyRanges::new();
        r.add(0, 100).unwrap();
        r.remove(40, 49).unwrap();
        assert_eq!(ranges(&r), [(0, 39), (50, 100)]);
        r.add(200, 300).unwrap();
        r.remove(90, 210).unwrap();
        assert_eq!(ranges(&r), [(0, 39), (50, 89), (211, 300)]);
        r.remove(0, 39).unwrap();
        r.remove(60, 250).unwrap();
        assert_eq!(ranges(&r), [(50, 59), (251, 300)]);
        r.remove(0, 1000).unwrap();
        assert!(ranges(&r).is_empty());
        r.remove(5, 6).unwrap();
    }

    #[test]
    fn a_reserved_change_does_not_grow() {
        let mut r = LogDirtyRanges::new();
        r.add(0, 100).unwrap();
        r.reserve(1).unwrap();
        let cap = r.ranges.capacity();
        r.remove(40, 49).unwrap(); // splits: one more range
        assert_eq!(r.ranges.len(), 2);
        assert_eq!(r.ranges.capacity(), cap, "no reallocation after reserve");
    }

    #[test]
    fn coverage_and_types() {
        let mut r = LogDirtyRanges::new();
        r.add(512, 1023).unwrap();
        assert_eq!(r.coverage(512, 1023), Coverage::Inside);
        assert_eq!(r.coverage(0, 511), Coverage::Outside);
        assert_eq!(r.coverage(1024, 2000), Coverage::Outside);
        assert_eq!(r.coverage(0, 512), Coverage::Straddles);
        assert_eq!(r.coverage(1023, 1024), Coverage::Straddles);
        assert_eq!(
            r.recalc_type(P2mType::RamRw, 600, 600),
            Some(P2mType::RamLogdirty)
        );
        assert_eq!(
            r.recalc_type(P2mType::RamLogdirty, 0, 10),
            Some(P2mType::RamRw)
        );
        assert_eq!(r.recalc_type(P2mType::RamRw, 0, 1 << 18), None);
        assert_eq!(
            r.recalc_type(P2mType::MmioDirect, 0, 1 << 18),
            Some(P2mType::MmioDirect)
        );
        // A 1G page over [0, 2^18): gfn 600 sits in a uniform 2M block.
        assert_eq!(
            r.uniform_at(P2mType::RamRw, 600, 2),
            (P2mType::RamLogdirty, 1)
        );
        assert_eq!(r.uniform_at(P2mType::RamRw, 5000, 2), (P2mType::RamRw, 1));
        r.set_global(true);
        assert_eq!(r.coverage(0, Gfn::MAX.0), Coverage::Inside);
    }

    #[test]
    fn bitmap_marks_fetches_and_clears() {
        let mut d = DirtyBitmap::new();
        d.mark(Gfn(5)).unwrap();
        d.mark(Gfn(5)).unwrap();
        d.mark_range(Gfn(60), Gfn(70)).unwrap();
        d.mark(Gfn(1 << 30)).unwrap();
        assert_eq!(d.dirty_count(), 1 + 11 + 1);
        assert!(d.is_dirty(Gfn(64)) && !d.is_dirty(Gfn(71)) && !d.is_dirty(Gfn(1 << 29)));
        let mut got = vec![];
        d.fetch_and_clear(Gfn(0), Gfn(65), |g| got.push(g.0));
        assert_eq!(got, [5, 60, 61, 62, 63, 64, 65]);
        assert_eq!(d.dirty_count(), 6);
        got.clear();
        d.fetch_and_clear(Gfn(0), Gfn::MAX, |g| got.push(g.0));
        assert_eq!(got, [66, 67, 68, 69, 70, 1 << 30]);
        assert_eq!(d.dirty_count(), 0);
        d.mark_range(Gfn(0), Gfn((1 << 18) - 1)).unwrap();
        assert_eq!(d.dirty_count(), 1 << 18);
        assert_eq!(d.mark(Gfn(Gfn::MAX.0 + 1)), Err(Error::GfnOutOfRange));
        assert_eq!(d.mark_range(Gfn(9), Gfn(8)), Err(Error::BadRange));
    }
}
