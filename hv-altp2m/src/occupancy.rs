//! Which views may hold entries in a gfn range: the index that keeps a host
//! change from walking views that hold nothing there (a change costs the
//! views that hold the changed pages, not all 511).
//!
//! Per 1G region touched by any view: the views with anything in it (`any`),
//! the views whose entries cover it whole or that could not be recorded more
//! precisely (`whole`), and, once a view installs something smaller than 1G
//! there, a set per 2M sub-region (`sub`). A 2M sub-region where more than
//! [`CROWDED`] views hold parts (4K entries) gets a set per 4K page
//! (`Fine`): KVM's rmap idea turned around, so that a change looks up the
//! views holding its page in one step however many views hold neighbours.
//! The views that already held parts of it when it became crowded are
//! recorded as holding it whole until propagation, which walks them, finds
//! what they do not hold.
//!
//! Every set is a superset: bits are added when a view installs an entry,
//! and cleared when the view is reset or destroyed, or when propagation
//! finds that a candidate holds nothing in a range (it walked it, or it
//! removed the entries itself). A stale bit costs a walk, never a missed
//! view. Recording never fails: when the index cannot grow (out of heap),
//! the view is recorded coarser (`whole` of its region or sub-region, or
//! `everywhere`).

use alloc::vec::Vec;

use crate::viewset::ViewSet;

const REGION_SHIFT: u32 = 18; // 1G
const SUB_SHIFT: u32 = 9; // 2M
const SUBS: usize = 1 << (REGION_SHIFT - SUB_SHIFT);
const PAGES: usize = 1 << SUB_SHIFT;

/// More views than this holding parts of one 2M sub-region make it crowded:
/// it gets a set per 4K page. Its 32 KiB are then at most what the views'
/// own page tables there take (4 KiB each).
pub(crate) const CROWDED: usize = 8;

/// Queries over more pages than this of a crowded sub-region use its 2M set
/// instead of joining per-page sets.
const FINE_QUERY_MAX: u64 = 64;

/// The per-page sets of one crowded 2M sub-region.
struct Fine {
    /// Index of the sub-region in its region.
    sub: usize,
    /// Views that may hold any page of it (held it before it was crowded,
    /// or map it with a 2M entry).
    whole: ViewSet,
    /// Per 4K page: the views that may hold it.
    pages: Vec<ViewSet>,
}

struct Region {
    number: u64,
    any: ViewSet,
    whole: ViewSet,
    /// Empty, or one set per 2M sub-region. While empty, `any == whole`.
    sub: Vec<ViewSet>,
    /// The crowded sub-regions, sorted by `sub`.
    fine: Vec<Fine>,
}

impl Region {
    fn fine(&self, sub: usize) -> Option<&Fine> {
        let i = self.fine.binary_search_by_key(&sub, |f| f.sub).ok()?;
        Some(&self.fine[i])
    }

    fn fine_mut(&mut self, sub: usize) -> Option<&mut Fine> {
        let i = self.fine.binary_search_by_key(&sub, |f| f.sub).ok()?;
        Some(&mut self.fine[i])
    }

    /// Records `view` in sub-region `k` for pages `[a, b]` (offsets in it);
    /// more than `crowded` holders make it crowded.
    fn note_sub(&mut self, view: usize, k: usize, (a, b): (usize, usize), crowded: usize) {
        let whole_block = a == 0 && b == PAGES - 1;
        let before = self.sub[k];
        self.sub[k].insert(view);
        if self.fine(k).is_none()
            && !whole_block
            && !before.contains(view)
            && before.len() >= crowded
        {
            self.crowd(k, before);
        }
        if let Some(f) = self.fine_mut(k) {
            if whole_block {
                f.whole.insert(view);
            } else {
                for p in &mut f.pages[a..=b] {
                    p.insert(view);
                }
            }
        }
    }

    /// Gives sub-region `k` its per-page sets; `holders` (which held parts
    /// of it so far, where is not known) hold it whole there. Stays coarse
    /// if the sets cannot be allocated.
    fn crowd(&mut self, k: usize, holders: ViewSet) {
        let mut pages = Vec::new();
        if pages.try_reserve_exact(PAGES).is_err() || self.fine.try_reserve(1).is_err() {
            return;
        }
        pages.resize(PAGES, ViewSet::EMPTY);
        let at = self.fine.partition_point(|f| f.sub < k);
        self.fine.insert(
            at,
            Fine {
                sub: k,
                whole: holders,
                pages,
            },
        );
    }
}

pub(crate) struct Occupancy {
    /// Sorted by region number.
    regions: Vec<Region>,
    /// Views recorded when the index could not grow: candidates everywhere.
    everywhere: ViewSet,
    /// [`CROWDED`], unless a test asks for less.
    crowded: usize,
}

impl Default for Occupancy {
    fn default() -> Occupancy {
        Occupancy {
            regions: Vec::new(),
            everywhere: ViewSet::EMPTY,
            crowded: CROWDED,
        }
    }
}

fn sub_index(gfn: u64) -> usize {
    ((gfn >> SUB_SHIFT) as usize) & (SUBS - 1)
}

fn page_index(gfn: u64) -> usize {
    (gfn as usize) & (PAGES - 1)
}

/// What the index takes: for the bench and the README.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct IndexMemory {
    /// Heap bytes of the whole index.
    pub bytes: usize,
    /// 1G regions with a record.
    pub regions: usize,
    /// 2M sub-regions with per-page sets.
    pub crowded: usize,
    /// Heap bytes of one crowded sub-region's sets.
    pub per_crowded: usize,
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
                            fine: Vec::new(),
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
            for k in sub_index(a)..=sub_index(b) {
                let block = first + ((k as u64) << SUB_SHIFT);
                let pa = a.max(block) - block;
                let pb = b.min(block + PAGES as u64 - 1) - block;
                r.note_sub(view, k, (pa as usize, pb as usize), self.crowded);
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
            for k in sub_index(a)..=sub_index(b) {
                let block = first + ((k as u64) << SUB_SHIFT);
                let (pa, pb) = (a.max(block), b.min(block + PAGES as u64 - 1));
                match r.fine(k) {
                    Some(f) if pb - pa < FINE_QUERY_MAX => {
                        out.union_with(&f.whole);
                        for p in &f.pages[page_index(pa)..=page_index(pb)] {
                            out.union_with(p);
                        }
                    }
                    _ => out.union_with(&r.sub[k]),
                }
            }
        }
        out
    }

    /// `view` holds nothing in `[start, end]` (propagation walked it or
    /// removed it there): the crowded sub-regions forget it for those pages,
    /// the others for sub-regions it covers whole.
    pub(crate) fn absent(&mut self, view: usize, start: u64, end: u64) {
        let from = self
            .regions
            .partition_point(|r| r.number < start >> REGION_SHIFT);
        for r in self.regions[from..].iter_mut() {
            let first = r.number << REGION_SHIFT;
            if first > end {
                break;
            }
            if !r.any.contains(view) || r.whole.contains(view) || r.sub.is_empty() {
                continue;
            }
            let last = first + (1 << REGION_SHIFT) - 1;
            let (a, b) = (start.max(first), end.min(last));
            for k in sub_index(a)..=sub_index(b) {
                if !r.sub[k].contains(view) {
                    continue;
                }
                let block = first + ((k as u64) << SUB_SHIFT);
                let (pa, pb) = (
                    page_index(a.max(block)),
                    page_index(b.min(block + PAGES as u64 - 1)),
                );
                if pa == 0 && pb == PAGES - 1 {
                    r.sub[k].remove(view);
                }
                let Some(f) = r.fine_mut(k) else { continue };
                if f.whole.contains(view) {
                    // Held somewhere in the block: now known not in [pa, pb].
                    f.whole.remove(view);
                    for (p, set) in f.pages.iter_mut().enumerate() {
                        if p < pa || p > pb {
                            set.insert(view);
                        }
                    }
                }
                for set in &mut f.pages[pa..=pb] {
                    set.remove(view);
                }
            }
        }
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
            for f in &mut r.fine {
                f.whole.remove(view);
                for p in &mut f.pages {
                    p.remove(view);
                }
            }
        }
        self.regions.retain(|r| !r.any.is_empty());
    }

    /// Sets how many views may hold parts of a 2M sub-region before it gets
    /// per-page sets (tests use few views).
    pub(crate) fn set_crowded(&mut self, views: usize) {
        self.crowded = views;
    }

    pub(crate) fn clear(&mut self) {
        self.regions = Vec::new();
        self.everywhere = ViewSet::EMPTY;
    }

    pub(crate) fn memory(&self) -> IndexMemory {
        let set = core::mem::size_of::<ViewSet>();
        let per_crowded = PAGES * set;
        let mut m = IndexMemory {
            bytes: self.regions.capacity() * core::mem::size_of::<Region>(),
            regions: self.regions.len(),
            crowded: 0,
            per_crowded,
        };
        for r in &self.regions {
            m.bytes += r.sub.capacity() * set + r.fine.capacity() * core::mem::size_of::<Fine>();
            m.bytes += r
                .fine
                .iter()
                .map(|f| f.pages.capacity() * set)
                .sum::<usize>();
            m.crowded += r.fine.len();
        }
        m
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

    #[test]
    fn crowded_2m_regions_are_exact_per_page() {
        let mut o = Occupancy::default();
        // Views 1..=CROWDED hold one page each: not crowded yet.
        for v in 1..=CROWDED {
            o.note(v, 10 + v as u64, 10 + v as u64);
        }
        assert_eq!(o.memory().crowded, 0);
        assert_eq!(o.candidates(11, 11).len(), CROWDED, "2M-grained");
        // One more: per-page sets. Earlier holders count as holding it all.
        o.note(100, 200, 200);
        o.note(101, 201, 201);
        o.note(102, 0, M2 - 1); // a 2M entry
        assert_eq!(o.memory().crowded, 1);
        let c = members(o.candidates(200, 200));
        assert!(c.contains(&100) && !c.contains(&101) && c.contains(&102) && c.contains(&1));
        // Propagation walked view 2 at page 11 and found nothing: it stays
        // a candidate only elsewhere in the block.
        o.absent(2, 11, 11);
        assert!(!o.candidates(11, 11).contains(2));
        assert!(o.candidates(12, 12).contains(2));
        o.absent(101, 201, 201);
        assert!(!o.candidates(201, 201).contains(101));
        // Wide queries use the 2M set.
        assert!(o.candidates(0, M2 - 1).contains(101));
        o.forget(100);
        assert!(!o.candidates(200, 200).contains(100));
        assert!(o.memory().per_crowded == 512 * 64 && o.memory().bytes > 2 * 512 * 64);
    }
}
