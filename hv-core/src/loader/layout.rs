//! Where things go in guest RAM: the RAM ranges of the memory map, the
//! ranges already given out, and first-fit searches from below or from above
//! for the next piece. All arithmetic is checked: sizes come from images.

use alloc::vec::Vec;

use super::{Content, ImageError, MemoryKind, MemoryRegion};

/// Exclusive end of what 32-bit pointer fields can describe, ends included
/// (Multiboot's `mod_end`, `ramdisk_image + ramdisk_size`).
pub const LIMIT_32: u64 = u32::MAX as u64;

#[derive(Clone, Debug)]
pub struct Layout {
    /// RAM ranges, sorted, adjacent ones merged.
    ram: Vec<(u64, u64)>,
    /// Ranges already given out, in no order.
    taken: Vec<(u64, u64)>,
}

impl Layout {
    /// The RAM of `map`; refuses a map with an empty or inverted region.
    pub fn new(map: &[MemoryRegion]) -> Result<Self, ImageError> {
        let mut ram = Vec::new();
        for region in map {
            if region.start >= region.end {
                return Err(ImageError::BadMemoryMap {
                    start: region.start,
                    end: region.end,
                });
            }
            if region.kind == MemoryKind::Ram {
                ram.push((region.start, region.end));
            }
        }
        ram.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ram.len());
        for (start, end) in ram {
            match merged.last_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        Ok(Self {
            ram: merged,
            taken: Vec::new(),
        })
    }

    /// The RAM ranges, for checks that need them as a list.
    pub fn ram(&self) -> &[(u64, u64)] {
        &self.ram
    }

    /// Whether `start..end` is RAM and free.
    pub fn is_free(&self, start: u64, end: u64) -> bool {
        start <= end
            && self.ram.iter().any(|&(a, b)| a <= start && end <= b)
            && !self.taken.iter().any(|&(a, b)| a < end && start < b)
    }

    /// Marks `start..end` as given out.
    pub fn take(&mut self, start: u64, end: u64) {
        if start < end {
            self.taken.push((start, end));
        }
    }

    /// Free stretches of RAM, ascending.
    fn free(&self) -> Vec<(u64, u64)> {
        let mut taken = self.taken.clone();
        taken.sort_unstable();
        let mut free = Vec::new();
        for &(mut start, end) in &self.ram {
            for &(a, b) in &taken {
                if b <= start || a >= end {
                    continue;
                }
                if a > start {
                    free.push((start, a));
                }
                start = start.max(b);
            }
            if start < end {
                free.push((start, end));
            }
        }
        free
    }

    /// The lowest `align`-aligned start at or above `from` where `len` bytes
    /// of free RAM end at or below `limit`. `align` is a power of two.
    pub fn lowest(&self, from: u64, len: u64, align: u64, limit: u64) -> Option<u64> {
        self.free().into_iter().find_map(|(a, b)| {
            let start = a.max(from).checked_next_multiple_of(align)?;
            let end = start.checked_add(len)?;
            (end <= b.min(limit)).then_some(start)
        })
    }

    /// Takes `size` bytes for `what` at the lowest `align`-aligned free RAM
    /// from `from` that ends below 4 GiB ([`LIMIT_32`]).
    pub fn place(
        &mut self,
        what: Content,
        from: u64,
        size: u64,
        align: u64,
    ) -> Result<u64, ImageError> {
        let at = self
            .lowest(from, size, align, LIMIT_32)
            .ok_or(ImageError::NoRoom { what, size })?;
        self.take(at, at + size);
        Ok(at)
    }

    /// The highest `align`-aligned start at or above `from` where `len`
    /// bytes of free RAM end at or below `limit`.
    pub fn highest(&self, from: u64, len: u64, align: u64, limit: u64) -> Option<u64> {
        self.free().into_iter().rev().find_map(|(a, b)| {
            let end = b.min(limit);
            let start = end.checked_sub(len)? & !(align - 1);
            (start >= a.max(from)).then_some(start)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        let region = |start, end, kind| MemoryRegion { start, end, kind };
        Layout::new(&[
            region(0x10_0000, 0x20_0000, MemoryKind::Ram),
            region(0, 0x9_f000, MemoryKind::Ram),
            region(0x9_f000, 0x10_0000, MemoryKind::Reserved),
            region(0x20_0000, 0x40_0000, MemoryKind::Ram),
        ])
        .unwrap()
    }

    #[test]
    fn ram_is_sorted_and_merged() {
        assert_eq!(
            layout().ram(),
            [(0, 0x9_f000), (0x10_0000, 0x40_0000)],
            "the reserved hole stays out, the adjacent RAM regions are one"
        );
    }

    #[test]
    fn searches_skip_what_is_taken_and_what_is_not_ram() {
        let mut l = layout();
        assert_eq!(l.lowest(0x1000, 0x1000, 0x1000, LIMIT_32), Some(0x1000));
        l.take(0x1000, 0x9_e000);
        // 0x9e000..0x9f000 is free but too small for two pages: next RAM is at 1 MiB.
        assert_eq!(l.lowest(0x1000, 0x2000, 0x1000, LIMIT_32), Some(0x10_0000));
        assert_eq!(l.lowest(0x1000, 0x1000, 0x1000, LIMIT_32), Some(0x9_e000));
        assert_eq!(l.highest(0, 0x1800, 0x1000, LIMIT_32), Some(0x3f_e000));
        assert_eq!(l.highest(0, 0x1000, 0x1000, 0x30_0800), Some(0x2f_f000));
        l.take(0x10_0000, 0x40_0000);
        assert_eq!(l.highest(0, 0x1000, 0x1000, LIMIT_32), Some(0x9_e000));
        assert_eq!(l.highest(0x9_e001, 0x1000, 0x1000, LIMIT_32), None);
        assert_eq!(l.lowest(0, 0x2000, 0x1000, LIMIT_32), None);
        assert!(!l.is_free(0x9_e000, 0x9_f001), "crosses into the hole");
        assert!(l.is_free(0x9_e000, 0x9_f000));
        assert!(!l.is_free(0x9_d000, 0x9_e001), "overlaps a taken range");
    }

    #[test]
    fn huge_sizes_do_not_overflow() {
        let l = layout();
        assert_eq!(l.lowest(u64::MAX - 10, 100, 0x1000, u64::MAX), None);
        assert_eq!(l.lowest(0, u64::MAX, 1, u64::MAX), None);
        assert_eq!(l.highest(0, u64::MAX, 1, u64::MAX), None);
    }

    #[test]
    fn inverted_regions_are_refused() {
        let bad = MemoryRegion {
            start: 0x2000,
            end: 0x1000,
            kind: MemoryKind::Ram,
        };
        assert_eq!(
            Layout::new(&[bad]).unwrap_err(),
            ImageError::BadMemoryMap {
                start: 0x2000,
                end: 0x1000
            }
        );
    }
}
