//! The physical frame allocator: one bit per 4 KiB frame (set = free).
//!
//! A bitmap rather than a free list because the hypervisor also needs aligned
//! runs of frames (2 MiB guest pages, the heap), and because it can tell a
//! double free from a first free: a frame is never lost or handed out twice.

/// A frame number (physical address >> 12).
pub type Frame = u64;

/// Why a free was refused. The bitmap is left unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FreeError {
    /// The frame is already free.
    DoubleFree(Frame),
    /// The frame lies outside the memory the allocator manages.
    OutOfRange(Frame),
}

pub struct FrameAllocator<'a> {
    /// Bit `f % 64` of word `f / 64` is set when frame `f` is free.
    bitmap: &'a mut [u64],
    /// Frames `0..frames` are covered.
    frames: u64,
    free: u64,
    /// Word to start the next single-frame search at.
    hint: usize,
}

/// Words of bitmap needed to cover `frames` frames.
pub const fn bitmap_words(frames: u64) -> usize {
    frames.div_ceil(64) as usize
}

impl<'a> FrameAllocator<'a> {
    /// An allocator over frames `0..frames` with every frame in use; `bitmap`
    /// must hold at least [`bitmap_words`]`(frames)` words.
    pub fn new(bitmap: &'a mut [u64], frames: u64) -> Self {
        let frames = frames.min(bitmap.len() as u64 * 64);
        bitmap.fill(0);
        Self {
            bitmap,
            frames,
            free: 0,
            hint: 0,
        }
    }

    pub fn total_frames(&self) -> u64 {
        self.frames
    }

    pub fn free_frames(&self) -> u64 {
        self.free
    }

    pub fn is_free(&self, frame: Frame) -> bool {
        frame < self.frames && self.bitmap[(frame / 64) as usize] & (1 << (frame % 64)) != 0
    }

    fn set(&mut self, frame: Frame, free: bool) {
        let (word, bit) = ((frame / 64) as usize, 1u64 << (frame % 64));
        if free {
            self.bitmap[word] |= bit;
        } else {
            self.bitmap[word] &= !bit;
        }
    }

    /// Makes the frames `start..end` free (clipped to the managed range);
    /// frames already free stay free. Used to seed the allocator from the memory map.
    pub fn add_free(&mut self, start: Frame, end: Frame) {
        for frame in start..end.min(self.frames) {
            if !self.is_free(frame) {
                self.set(frame, true);
                self.free += 1;
            }
        }
    }

    /// Marks the frames `start..end` as in use, whatever they were.
    pub fn reserve(&mut self, start: Frame, end: Frame) {
        for frame in start..end.min(self.frames) {
            if self.is_free(frame) {
                self.set(frame, false);
                self.free -= 1;
            }
        }
    }

    /// Allocates one frame.
    pub fn alloc(&mut self) -> Option<Frame> {
        let words = self.bitmap.len();
        for i in 0..words {
            let word = (self.hint + i) % words;
            let bits = self.bitmap[word];
            if bits != 0 {
                let frame = word as u64 * 64 + u64::from(bits.trailing_zeros());
                if frame >= self.frames {
                    continue;
                }
                self.set(frame, false);
                self.free -= 1;
                self.hint = word;
                return Some(frame);
            }
        }
        None
    }

    /// Allocates `count` contiguous frames starting at a multiple of `align`
    /// (a power of two, in frames). Returns the first frame.
    pub fn alloc_contiguous(&mut self, count: u64, align: u64) -> Option<Frame> {
        if count == 0 || !align.is_power_of_two() || count > self.free {
            return None;
        }
        let mut start = 0;
        while start + count <= self.frames {
            // Skip to the frame after the last used one in the candidate run.
            match (start..start + count).rev().find(|&f| !self.is_free(f)) {
                None => {
                    self.reserve(start, start + count);
                    return Some(start);
                }
                Some(used) => start = (used + 1).next_multiple_of(align),
            }
        }
        None
    }

    /// Returns one frame.
    pub fn free(&mut self, frame: Frame) -> Result<(), FreeError> {
        if frame >= self.frames {
            return Err(FreeError::OutOfRange(frame));
        }
        if self.is_free(frame) {
            return Err(FreeError::DoubleFree(frame));
        }
        self.set(frame, true);
        self.free += 1;
        Ok(())
    }

    /// Returns `count` frames from `start`; refuses (changing nothing) if any is
    /// already free or out of range.
    pub fn free_contiguous(&mut self, start: Frame, count: u64) -> Result<(), FreeError> {
        let end = start
            .checked_add(count)
            .ok_or(FreeError::OutOfRange(start))?;
        if end > self.frames {
            return Err(FreeError::OutOfRange(end - 1));
        }
        if let Some(f) = (start..end).find(|&f| self.is_free(f)) {
            return Err(FreeError::DoubleFree(f));
        }
        self.add_free(start, end);
        Ok(())
    }
}

/// The first page-aligned address `a` with `a..a + size` inside one of the
/// `available` ranges, above `min`, below `limit`, and clear of every range in
/// `reserved` (all ranges are `start..end` in bytes). Used to place the
/// allocator's own bitmap before the allocator exists.
pub fn find_free_run(
    available: &[(u64, u64)],
    reserved: &[(u64, u64)],
    size: u64,
    min: u64,
    limit: u64,
) -> Option<u64> {
    const PAGE: u64 = crate::PAGE_SIZE;
    for &(start, end) in available {
        let end = (end & !(PAGE - 1)).min(limit);
        let mut at = start.max(min).next_multiple_of(PAGE);
        while at.checked_add(size).is_some_and(|run_end| run_end <= end) {
            match reserved.iter().find(|&&(rs, re)| rs < at + size && at < re) {
                None => return Some(at),
                Some(&(_, re)) => at = re.next_multiple_of(PAGE),
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::collections::BTreeSet;
    use std::vec;

    use super::*;

    fn with_allocator(frames: u64, f: impl FnOnce(&mut FrameAllocator<'_>)) {
        let mut bitmap = vec![u64::MAX; bitmap_words(frames)];
        let mut a = FrameAllocator::new(&mut bitmap, frames);
        f(&mut a);
    }

    #[test]
    fn starts_empty_and_hands_out_only_free_frames() {
        with_allocator(1000, |a| {
            assert_eq!(a.alloc(), None);
            a.add_free(100, 200);
            a.reserve(150, 160);
            assert_eq!(a.free_frames(), 90);
            let mut got = BTreeSet::new();
            while let Some(f) = a.alloc() {
                assert!((100..150).contains(&f) || (160..200).contains(&f), "{f}");
                assert!(got.insert(f), "frame {f} handed out twice");
            }
            assert_eq!(got.len(), 90);
            assert_eq!(a.free_frames(), 0);
        });
    }

    #[test]
    fn frames_beyond_the_end_are_never_handed_out() {
        with_allocator(70, |a| {
            a.add_free(0, 1000);
            assert_eq!(a.free_frames(), 70);
            let mut count = 0;
            while let Some(f) = a.alloc() {
                assert!(f < 70);
                count += 1;
            }
            assert_eq!(count, 70);
        });
    }

    #[test]
    fn free_run_avoids_reserved_ranges_and_respects_bounds() {
        let available = [(0, 0x9f000), (0x100000, 0x800000)];
        let reserved = [(0x200000, 0x280000), (0x300000, 0x301000)];
        // Below `min` nothing is taken; the kernel at 2 MiB is skipped.
        assert_eq!(
            find_free_run(&available, &reserved, 0x100000, 0x100000, u64::MAX),
            Some(0x100000)
        );
        assert_eq!(
            find_free_run(&available, &reserved, 0x100001, 0x100000, u64::MAX),
            Some(0x301000)
        );
        assert_eq!(
            find_free_run(&available, &reserved, 0x100000, 0x180000, u64::MAX),
            Some(0x301000)
        );
        assert_eq!(
            find_free_run(&available, &reserved, 0x600000, 0x100000, u64::MAX),
            None
        );
        assert_eq!(
            find_free_run(&available, &reserved, 0x1000, 0x100000, 0x100000),
            None
        );
        // Unaligned starts are rounded up to a page.
        assert_eq!(
            find_free_run(&[(0x1234, 0x10000)], &[], 0x1000, 0, u64::MAX),
            Some(0x2000)
        );
    }

    #[test]
    fn double_free_and_out_of_range_are_refused() {
        with_allocator(128, |a| {
            a.add_free(0, 128);
            let f = a.alloc().unwrap();
            assert_eq!(a.free(f), Ok(()));
            assert_eq!(a.free(f), Err(FreeError::DoubleFree(f)));
            assert_eq!(a.free(128), Err(FreeError::OutOfRange(128)));
            assert_eq!(a.free_frames(), 128);
        });
    }

    #[test]
    fn contiguous_runs_are_aligned_and_skip_holes() {
        with_allocator(4096, |a| {
            a.add_free(0, 4096);
            a.reserve(5, 6); // poisons the first 512-aligned run
            let run = a.alloc_contiguous(512, 512).unwrap();
            assert_eq!(run, 512);
            assert!((512..1024).all(|f| !a.is_free(f)));
            assert_eq!(a.alloc_contiguous(4096, 1), None, "not enough free frames");
            assert_eq!(a.free_contiguous(run, 512), Ok(()));
            assert_eq!(a.free_contiguous(run, 512), Err(FreeError::DoubleFree(run)));
            assert_eq!(a.free_frames(), 4095);
        });
    }

    #[test]
    fn partial_double_free_of_a_run_changes_nothing() {
        with_allocator(256, |a| {
            a.add_free(0, 256);
            let run = a.alloc_contiguous(16, 16).unwrap();
            a.free(run + 3).unwrap();
            let before = a.free_frames();
            assert_eq!(
                a.free_contiguous(run, 16),
                Err(FreeError::DoubleFree(run + 3))
            );
            assert_eq!(a.free_frames(), before);
            assert!(!a.is_free(run));
        });
    }
}
