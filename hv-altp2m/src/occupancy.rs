//! Which views may hold entries in a gfn range: the index that keeps a host
//! change from walking views that hold nothing there (a change costs the
//! views that hold the range, not all 511).
//!
//! Per 1G region touched by any view: the views with anything in it (`any`),
//! the views whose entries cover it whole or that could not be recorded more
//! precisely (`whole`), and, once a view installs something smaller than 1G
//! there, a set per 2M sub-region (`sub`). A set is a superset: bits are
//! added when a view installs an entry and only cleared when the view is
//! reset or destroyed, so a stale bit costs a walk, never a missed view.
//!
//! Recording never fails: when the index cannot grow (out of heap), the view
//! is recorded coarser (`whole` of its region, or `everywhere`).

use alloc::vec::Vec;

use crate::viewset::ViewSet;

const REGION_SHIFT: u32 = 18; // 1G
const SUB_SHIFT: u32 = 9; // 2M
const SUBS: usize = 1 << (REGION_SHIFT - SUB_SHIFT);

struct Region {
    number: u64,
    any: ViewSet,
    whole: ViewSet,
    /// Empty, or one set per 2M sub-region. While empty, `any == whole`.
    sub: Vec<ViewSet>,
}

#[derive(Default)]
pub(crate) struct Occupancy {
    /// Sorted by region number.
    regions: Vec<Region>,
    /// Views recorded when the index could not grow: candidates everywhere.
    everywhere: ViewSet,
}

fn sub_index(gfn: u64) -> usize {
    ((gfn >> SUB_SHIFT) as usize) & (SUBS - 1)
}

impl Occupancy {
    /// Records that `view` may hold entries in `[start, end]`.
    pub(crate) fn note(&mut self, view: usize, start: u64, end: u64) {
        for number in (start >> REGION_SHIFT)..=(end >> REGION_SHIFT) {
            let i = match self.regions.binary_search_by_key(&number, |r| r.number) {
                Ok(i) => i,
                Err(i) => {
                    if self.regions.try_reserve(1).is_err() {
                        self.everywhere.insert(view);
                        return;
                    }
                    self.regions.insert(
                        i,
                        Region {
                            number,
                            any: ViewSet::EMPTY,
                            whole: ViewSet::EMPTY,
                            sub: Vec::new(),
                        },
                    );
                    i
                }
            };
            let r = &mut self.regions[i];
            r.any.insert(view);
            let first = number << REGION_SHIFT;
            let last = first + (1 << REGION_SHIFT) - 1;
            let (a, b) = (start.max(first), end.min(last));
            if a == first && b == last {
                r.whole.insert(view);
                continue;
            }
            if r.sub.is_empty() {
                if r.sub.try_reserve_exact(SUBS).is_err() {
                    r.whole.insert(view);
                    continue;
                }
                r.sub.resize(SUBS, ViewSet::EMPTY);
            }
            for s in &mut r.sub[sub_index(a)..=sub_index(b)] {
                s.insert(view);
            }
        }
    }

    /// The views that may hold entries in `[start, end]`.
    pub(crate) fn candidates(&self, start: u64, end: u64) -> ViewSet {
        let mut out = self.everywhere;
        let (lo, hi) = (start >> REGION_SHIFT, end >> REGION_SHIFT);
        let from = self.regions.partition_point(|r| r.number < lo);
        for r in self.regions[from..].iter().take_while(|r| r.number <= hi) {
            let first = r.number << REGION_SHIFT;
            let last = first + (1 << REGION_SHIFT) - 1;
            let (a, b) = (start.max(first), end.min(last));
            if (a == first && b == last) || r.sub.is_empty() {
                out.union_with(&r.any);
                continue;
            }
            out.union_with(&r.whole);
            for s in &r.sub[sub_index(a)..=sub_index(b)] {
                out.union_with(s);
            }
        }
        out
    }

    /// `view` holds nothing any more (reset or destroyed).
    pub(crate) fn forget(&mut self, view: usize) {
        self.everywhere.remove(view);
        for r in &mut self.regions {
            if !r.any.contains(view) {
                continue;
            }
            r.any.remove(view);
            r.whole.remove(view);
            for s in &mut r.sub {
                s.remove(view);
            }
        }
        self.regions.retain(|r| !r.any.is_empty());
    }

    pub(crate) fn clear(&mut self) {
        self.regions = Vec::new();
        self.everywhere = ViewSet::EMPTY;
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    const G1: u64 = 1 << 18;
    const M2: u64 = 1 << 9;

    fn members(s: ViewSet) -> Vec<usize> {
        s.iter().collect()
    }

    #[test]
    fn precise_to_2m_and_whole_regions() {
        let mut o = Occupancy::default();
        o.note(1, 5, 5);
        o.note(2, M2 + 3, M2 + 3);
        o.note(3, G1, 2 * G1 - 1); // a 1G leaf
        assert_eq!(members(o.candidates(0, 0)), [1]);
        assert_eq!(members(o.candidates(M2, 2 * M2 - 1)), [2]);
        assert_eq!(members(o.candidates(0, G1 - 1)), [1, 2]);
        assert_eq!(members(o.candidates(G1 + 77, G1 + 77)), [3]);
        assert_eq!(members(o.candidates(0, 3 * G1)), [1, 2, 3]);
        assert!(o.candidates(2 * G1, 3 * G1).is_empty());
        // A partial entry in a region that view 3 covers whole.
        o.note(4, G1 + 5 * M2, G1 + 5 * M2);
        assert_eq!(members(o.candidates(G1, G1)), [3]);
        assert_eq!(
            members(o.candidates(G1 + 5 * M2 + 1, G1 + 5 * M2 + 1)),
            [3, 4]
        );
        o.forget(3);
        assert_eq!(members(o.candidates(G1, 2 * G1 - 1)), [4]);
        o.forget(4);
        assert_eq!(o.regions.len(), 1, "empty regions are released");
    }
}
