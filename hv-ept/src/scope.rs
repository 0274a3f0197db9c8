//! Scoped marks: a mark on a non-leaf entry that recomputes only part of
//! what lies below it.
//!
//! A type change over `[s, e]` marks the fewest, highest entries it can. An
//! entry that straddles `s` or `e` holds pages outside the range; marking it
//! whole (instead of marking up to 511 entries of each level below it) costs
//! one write, but a plain mark would recompute those outside pages too:
//! dirtied pages beside the range would be re-armed, differently in the host
//! and in views whose tables are shaped differently, and every leaf table
//! beside the range would take a misconfiguration exit. So such a mark is
//! *scoped*: the entry carries `SCOPED` (bit 52) next to the mark, and the
//! p2m records the gfn ranges it stands for, per entry. Pushing a scoped mark
//! down leaves the children outside its ranges as they are, marks exactly
//! the children inside, and scopes the children that straddle. A leaf under
//! it is recomputed iff it meets the ranges (a superpage that straddles an
//! end is recomputed whole, as an exactly marked one is). The result is the
//! same as marking the range exactly, for the cost of one exit per scoped
//! entry when the guest first touches, beside the range, what it covers.
//!
//! The records are optional: where one cannot be stored (out of heap), the
//! code marks exactly below the entry instead, so nothing fails for want of
//! them. A scoped entry spawns at most two scoped children per level (one per
//! end of each range), so records stay few; every record belongs to a scoped
//! entry of the tree and goes when the mark is pushed, converted, or its
//! subtree freed.

use alloc::vec::Vec;

/// One range of one scoped entry: the entry at `level` whose first gfn is
/// `base` recomputes `[start, end]` (within its span).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Rec {
    level: u8,
    base: u64,
    start: u64,
    end: u64,
}

/// The ranges of every scoped entry of a p2m. Sorted by (level, base,
/// start); the ranges of one entry are disjoint and never adjacent.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub(crate) struct Scopes {
    recs: Vec<Rec>,
}

impl Scopes {
    pub(crate) const fn new() -> Scopes {
        Scopes { recs: Vec::new() }
    }

    /// Indices of the records of the entry (`level`, `base`).
    fn block(&self, level: u8, base: u64) -> core::ops::Range<usize> {
        let lo = self
            .recs
            .partition_point(|r| (r.level, r.base) < (level, base));
        let n = self.recs[lo..].partition_point(|r| (r.level, r.base) == (level, base));
        lo..lo + n
    }

    /// Whether the entry's ranges meet `[a, b]`.
    pub(crate) fn intersects(&self, level: u8, base: u64, a: u64, b: u64) -> bool {
        self.recs[self.block(level, base)]
            .iter()
            .any(|r| r.start <= b && a <= r.end)
    }

    /// Whether the entry's ranges contain `[a, b]` (one range does: they are
    /// merged).
    pub(crate) fn covers(&self, level: u8, base: u64, a: u64, b: u64) -> bool {
        self.recs[self.block(level, base)]
            .iter()
            .any(|r| r.start <= a && b <= r.end)
    }

    /// The first range of the entry that ends at or after `from`.
    pub(crate) fn next_range(&self, level: u8, base: u64, from: u64) -> Option<(u64, u64)> {
        self.recs[self.block(level, base)]
            .iter()
            .find(|r| r.end >= from)
            .map(|r| (r.start, r.end))
    }

    /// How many of the entry's ranges meet `[a, b]`.
    pub(crate) fn count_meeting(&self, level: u8, base: u64, a: u64, b: u64) -> usize {
        self.recs[self.block(level, base)]
            .iter()
            .filter(|r| r.start <= b && a <= r.end)
            .count()
    }

    /// Makes room for `n` more records, so that that many `add`s cannot fail.
    pub(crate) fn reserve(&mut self, n: usize) -> Result<(), ()> {
        self.recs.try_reserve(n).map_err(|_| ())
    }

    /// Adds `[a, b]` to the entry's ranges, merging with those it overlaps or
    /// touches. Fails, changing nothing, when the list cannot grow.
    pub(crate) fn add(&mut self, level: u8, base: u64, a: u64, b: u64) -> Result<(), ()> {
        let block = self.block(level, base);
        let first =
            block.start + self.recs[block.clone()].partition_point(|r| r.end.saturating_add(1) < a);
        let last = block.start
            + self.recs[block.clone()].partition_point(|r| r.start <= b.saturating_add(1));
        if first == last {
            self.reserve(1)?;
            let rec = Rec {
                level,
                base,
                start: a,
                end: b,
            };
            self.recs.insert(first, rec);
            return Ok(());
        }
        let merged = Rec {
            level,
            base,
            start: a.min(self.recs[first].start),
            end: b.max(self.recs[last - 1].end),
        };
        self.recs[first] = merged;
        self.recs.drain(first + 1..last);
        Ok(())
    }

    /// Forgets the entry's ranges (its mark was pushed or made exact).
    pub(crate) fn remove(&mut self, level: u8, base: u64) {
        let block = self.block(level, base);
        self.recs.drain(block);
    }

    /// Forgets every entry at `level` or below whose first gfn lies in
    /// `[first, last]`: a subtree that was freed or replaced.
    pub(crate) fn remove_within(&mut self, level: u8, first: u64, last: u64) {
        if self.recs.is_empty() {
            return;
        }
        self.recs
            .retain(|r| !(r.level <= level && first <= r.base && r.base <= last));
    }

    pub(crate) fn clear(&mut self) {
        self.recs.clear();
    }

    /// Number of records (ranges over all scoped entries).
    pub(crate) fn len(&self) -> usize {
        self.recs.len()
    }

    /// The entries with records, in order.
    #[cfg(feature = "sim")]
    pub(crate) fn keys(&self) -> Vec<(u8, u64)> {
        let mut out: Vec<(u8, u64)> = self.recs.iter().map(|r| (r.level, r.base)).collect();
        out.dedup();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_per_entry() {
        let mut s = Scopes::new();
        s.add(2, 0, 10, 20).unwrap();
        s.add(2, 0, 30, 40).unwrap();
        s.add(1, 512, 600, 700).unwrap();
        s.add(2, 1 << 18, 5, 6).unwrap();
        assert!(s.intersects(2, 0, 20, 25) && !s.intersects(2, 0, 21, 29));
        assert!(s.covers(2, 0, 12, 18) && !s.covers(2, 0, 15, 35));
        s.add(2, 0, 21, 29).unwrap(); // touches both: one range
        assert!(s.covers(2, 0, 10, 40));
        assert_eq!(s.next_range(2, 0, 0), Some((10, 40)));
        assert_eq!(s.next_range(2, 0, 41), None);
        assert_eq!(s.count_meeting(2, 0, 0, 100), 1);
        assert_eq!(s.len(), 3);
        assert!(!s.intersects(1, 0, 0, u64::MAX), "other entries apart");
        s.remove(2, 0);
        assert!(!s.intersects(2, 0, 0, 100));
        assert!(s.intersects(1, 512, 650, 650));
        s.remove_within(2, 0, (1 << 18) - 1);
        assert_eq!(s.len(), 1, "only the entry outside the freed span stays");
        assert!(s.intersects(2, 1 << 18, 5, 5));
    }
}
