//! A set of view indices as a 512-bit bitset: the active views, the views
//! with remaps, the views an index says may hold a range, the views whose
//! EPTP needs an INVEPT. O(1) insert/test, iteration over set bits only.

use core::fmt;

/// Views per guest: one EPTP list page holds 512 EPTPs.
pub const MAX_VIEWS: usize = 512;

const WORDS: usize = MAX_VIEWS / 64;

#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct ViewSet([u64; WORDS]);

impl ViewSet {
    pub const EMPTY: ViewSet = ViewSet([0; WORDS]);

    /// Ignores indices of 512 and above (there are no such views).
    pub fn insert(&mut self, view: usize) {
        if let Some(w) = self.0.get_mut(view / 64) {
            *w |= 1 << (view % 64);
        }
    }

    pub fn remove(&mut self, view: usize) {
        if let Some(w) = self.0.get_mut(view / 64) {
            *w &= !(1 << (view % 64));
        }
    }

    pub fn contains(&self, view: usize) -> bool {
        self.0
            .get(view / 64)
            .is_some_and(|w| w & (1 << (view % 64)) != 0)
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }

    pub fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    pub fn union_with(&mut self, other: &ViewSet) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a |= b;
        }
    }

    pub fn intersection(&self, other: &ViewSet) -> ViewSet {
        let mut out = *self;
        for (a, b) in out.0.iter_mut().zip(other.0) {
            *a &= b;
        }
        out
    }

    /// The members, in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = usize> + use<> {
        let words = self.0;
        (0..WORDS).flat_map(move |w| {
            let mut bits = words[w];
            core::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let b = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                Some(w * 64 + b)
            })
        })
    }
}

impl fmt::Debug for ViewSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    #[test]
    fn insert_remove_iterate() {
        let mut s = ViewSet::EMPTY;
        for v in [0, 63, 64, 511, 200] {
            s.insert(v);
        }
        s.insert(512); // out of range: ignored
        assert_eq!(s.iter().collect::<Vec<_>>(), [0, 63, 64, 200, 511]);
        assert_eq!(s.len(), 5);
        s.remove(64);
        assert!(!s.contains(64) && s.contains(63) && !s.contains(9999));
        let mut t = ViewSet::EMPTY;
        t.insert(63);
        t.insert(1);
        assert_eq!(s.intersection(&t).iter().collect::<Vec<_>>(), [63]);
        t.union_with(&s);
        assert_eq!(t.len(), 5);
        assert!(ViewSet::EMPTY.is_empty() && !t.is_empty());
    }
}
