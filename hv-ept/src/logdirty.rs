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
//! on.
//!
//! A clean while vCPUs run. A page is writable only after its write was
//! logged, so "writable (in a p2m or in a TLB) => its bit is set" must hold
//! at every moment, or a write is lost. The bitmap has two planes for that:
//! logged writes set bits in the live plane; a clean first re-arms the range
//! (`change_type_range(start, end, RamRw, RamLogdirty)` or
//! `change_type_global`, on the host and every active view) and moves the
//! range's live bits aside with [`DirtyBitmap::arm`], then, once the INVEPTs
//! of the re-arm are done on every CPU, reports and clears only the bits set
//! aside ([`DirtyBitmap::fetch_armed`]). A page written through a stale
//! translation before the INVEPT was writable, so its bit was set and is
//! reported now (and the caller reads the page after the fetch); a page
//! written after it faults and logs into the live plane, which the fetch
//! leaves for the next clean, even when the fault happened between arm and
//! fetch and made the page writable again. Clearing a bit while its page can
//! still be written without a fault never happens.
//!
//! Under PML ([`LogMode::Pml`]) the same two halves hold with the dirty flag
//! in place of the write protection: a 4K `ram_logdirty` page is writable,
//! and its flag set means its write was logged (the CPU logs the address in
//! a PML buffer as it sets the flag; the buffer is drained into the bitmap).
//! The re-arm clears the flags of the pages set aside ([`P2m::rearm_page`]),
//! and the INVEPT comes before the fetch: a write through a translation
//! cached dirty logs nothing, but its page is the one this clean hands over.
//! A page the CPU logs after the INVEPT goes to the live plane.

use alloc::vec::Vec;

use crate::Error;
use crate::addr::{Gfn, Order, ROOT_LEVEL, index, level_base, level_pages};
use crate::memory::EptMemory;
use crate::p2m::{P2m, read, write};
use crate::types::{LogMode, P2mType};

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

    /// Number of ranges (merged: no two overlap or touch).
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The tracked parts of `[start, end]`, in order: the ranges that meet
    /// it, clipped to it (under global log-dirty, the whole of it). Found by
    /// binary search, so the cost follows the ranges inside the window, not
    /// those outside.
    pub fn within(&self, start: Gfn, end: Gfn) -> impl Iterator<Item = (Gfn, Gfn)> + '_ {
        let (s, e) = (start.0, end.0);
        let whole = (self.global && s <= e).then_some((start, end));
        let slice = if self.global {
            &[][..]
        } else {
            self.window(s, e)
        };
        whole.into_iter().chain(
            slice
                .iter()
                .map(move |&(rs, re)| (Gfn(rs.max(s)), Gfn(re.min(e)))),
        )
    }

    /// How many tracked parts [`LogDirtyRanges::within`] gives, and the
    /// first and last gfn they cover (`None`: nothing of the window is
    /// tracked). Two binary searches.
    pub fn span_within(&self, start: Gfn, end: Gfn) -> Option<(usize, Gfn, Gfn)> {
        let (s, e) = (start.0, end.0);
        if self.global {
            return (s <= e).then_some((1, start, end));
        }
        let w = self.window(s, e);
        let (first, last) = (w.first()?, w.last()?);
        Some((w.len(), Gfn(first.0.max(s)), Gfn(last.1.min(e))))
    }

    /// The ranges that meet `[s, e]`.
    fn window(&self, s: u64, e: u64) -> &[(u64, u64)] {
        if s > e {
            return &[];
        }
        let i = self.ranges.partition_point(|&(_, re)| re < s);
        let j = self.ranges.partition_point(|&(rs, _)| rs <= e);
        &self.ranges[i..j.max(i)]
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

/// One chunk of the dirty log: its number and two planes of bits.
#[derive(Clone, Debug)]
struct Chunk {
    number: u64,
    /// Set by logged writes.
    live: Vec<u64>,
    /// Set aside by [`DirtyBitmap::arm`] for the next `fetch_armed`; empty
    /// until the chunk is first armed.
    armed: Vec<u64>,
}

/// The guest's dirty log: one bit per gfn, in chunks allocated on first use,
/// in two planes (see the module doc).
#[derive(Clone, Debug, Default)]
pub struct DirtyBitmap {
    /// Sorted by chunk number.
    chunks: Vec<Chunk>,
    /// Gfns dirty in either plane.
    dirty: u64,
}

impl DirtyBitmap {
    pub const fn new() -> DirtyBitmap {
        DirtyBitmap {
            chunks: Vec::new(),
            dirty: 0,
        }
    }

    /// Number of dirty gfns (logged since the last fetch that reported them).
    pub fn dirty_count(&self) -> u64 {
        self.dirty
    }

    pub fn is_dirty(&self, gfn: Gfn) -> bool {
        let (c, w, b) = split(gfn.0);
        self.chunk(c).is_some_and(|ch| {
            let armed = ch.armed.get(w).copied().unwrap_or(0);
            (ch.live[w] | armed) & (1 << b) != 0
        })
    }

    /// Whether `gfn` is set aside by an `arm`, awaiting `fetch_armed`.
    pub fn is_armed(&self, gfn: Gfn) -> bool {
        let (c, w, b) = split(gfn.0);
        self.chunk(c)
            .is_some_and(|ch| ch.armed.get(w).is_some_and(|a| a & (1 << b) != 0))
    }

    /// Makes sure marking any gfn of `[start, end]` cannot fail. Allocates
    /// 4 KiB per 128 MiB of guest memory in the range not yet covered.
    pub fn reserve(&mut self, start: Gfn, end: Gfn) -> Result<(), Error> {
        if start.check()? > end.check()? {
            return Err(Error::BadRange);
        }
        for c in (start.0 >> CHUNK_SHIFT)..=(end.0 >> CHUNK_SHIFT) {
            let i = match self.chunks.binary_search_by_key(&c, |ch| ch.number) {
                Ok(_) => continue,
                Err(i) => i,
            };
            let live = zeroed_words()?;
            self.chunks.try_reserve(1).map_err(|_| Error::NoMemory)?;
            self.chunks.insert(
                i,
                Chunk {
                    number: c,
                    live,
                    armed: Vec::new(),
                },
            );
        }
        Ok(())
    }

    pub fn mark(&mut self, gfn: Gfn) -> Result<(), Error> {
        self.mark_range(gfn, gfn)
    }

    /// Logs writes to `[start, end]` (the live plane).
    pub fn mark_range(&mut self, start: Gfn, end: Gfn) -> Result<(), Error> {
        self.reserve(start, end)?;
        let added = self.visit_words(start.0, end.0, &mut |live, armed, mask, _| {
            let new = mask & !*live & !armed.map_or(0, |a| *a);
            *live |= mask;
            new.count_ones() as u64
        });
        self.dirty += added;
        Ok(())
    }

    /// The first half of a clean of `[start, end]`, done with the re-arm:
    /// sets the range's live bits aside for [`DirtyBitmap::fetch_armed`].
    /// Fails only with `NoMemory`, before changing anything (the set-aside
    /// plane of a chunk is allocated on its first arm: 4 KiB per 128 MiB).
    pub fn arm(&mut self, start: Gfn, end: Gfn) -> Result<(), Error> {
        if start.check()? > end.check()? {
            return Err(Error::BadRange);
        }
        let (lo, hi) = (start.0 >> CHUNK_SHIFT, end.0 >> CHUNK_SHIFT);
        let first = self.chunks.partition_point(|ch| ch.number < lo);
        for ch in self.chunks[first..].iter_mut() {
            if ch.number > hi {
                break;
            }
            if ch.armed.is_empty() {
                ch.armed = zeroed_words()?;
            }
        }
        self.visit_words(start.0, end.0, &mut |live, armed, mask, _| {
            if let Some(a) = armed {
                *a |= *live & mask;
                *live &= !mask;
            }
            0
        });
        Ok(())
    }

    /// Calls `f` for every gfn of `[start, end]` set aside by `arm` (in
    /// order), leaving it set aside: what the re-arm of a clean under PML
    /// must reach.
    pub fn for_each_armed(&self, start: Gfn, end: Gfn, mut f: impl FnMut(Gfn)) {
        let (s, e) = (start.0, end.0);
        if s > e {
            return;
        }
        let first = self
            .chunks
            .partition_point(|ch| ch.number < s >> CHUNK_SHIFT);
        for ch in &self.chunks[first..] {
            let chunk_first = ch.number << CHUNK_SHIFT;
            if chunk_first > e {
                break;
            }
            for (w, &armed) in ch.armed.iter().enumerate() {
                let word_first = chunk_first + (w as u64) * 64;
                if armed == 0 || word_first + 63 < s || word_first > e {
                    continue;
                }
                report(armed & word_mask(word_first, s, e), word_first, &mut f);
            }
        }
    }

    /// The second half of a clean: calls `f` for every gfn of `[start, end]`
    /// set aside by `arm`, in order, and clears it there. Bits logged since
    /// the arm stay for the next clean. Call it only once the INVEPTs of the
    /// re-arm are done on every CPU (`hv-altp2m` enforces that).
    pub fn fetch_armed(&mut self, start: Gfn, end: Gfn, mut f: impl FnMut(Gfn)) {
        let gone = self.visit_words(start.0, end.0, &mut |live, armed, mask, first| {
            let Some(a) = armed else { return 0 };
            let bits = *a & mask;
            *a &= !mask;
            report(bits, first, &mut f);
            (bits & !*live).count_ones() as u64
        });
        self.dirty -= gone;
    }

    /// Calls `f` for every dirty gfn of `[start, end]` (either plane), in
    /// order, and clears it. For when no vCPU can write meanwhile (stopping
    /// tracking, tests); a clean while vCPUs run is `arm` then `fetch_armed`.
    pub fn fetch_and_clear(&mut self, start: Gfn, end: Gfn, mut f: impl FnMut(Gfn)) {
        let gone = self.visit_words(start.0, end.0, &mut |live, armed, mask, first| {
            let mut bits = *live & mask;
            *live &= !mask;
            if let Some(a) = armed {
                bits |= *a & mask;
                *a &= !mask;
            }
            report(bits, first, &mut f);
            bits.count_ones() as u64
        });
        self.dirty -= gone;
    }

    fn chunk(&self, c: u64) -> Option<&Chunk> {
        let i = self.chunks.binary_search_by_key(&c, |ch| ch.number).ok()?;
        Some(&self.chunks[i])
    }

    /// Walks the allocated words covering `[start, end]`: `f(live word,
    /// armed word if that plane exists, mask of the range's bits, gfn of bit
    /// 0)` returns a count, summed.
    fn visit_words(
        &mut self,
        start: u64,
        end: u64,
        f: &mut impl FnMut(&mut u64, Option<&mut u64>, u64, u64) -> u64,
    ) -> u64 {
        let first = self
            .chunks
            .partition_point(|ch| ch.number < start >> CHUNK_SHIFT);
        let mut total = 0;
        for ch in &mut self.chunks[first..] {
            let chunk_first = ch.number << CHUNK_SHIFT;
            if chunk_first > end {
                break;
            }
            let mut armed = ch.armed.iter_mut();
            for (w, live) in ch.live.iter_mut().enumerate() {
                let a = armed.next();
                let word_first = chunk_first + (w as u64) * 64;
                let word_last = word_first + 63;
                if word_last < start || word_first > end {
                    continue;
                }
                total += f(live, a, word_mask(word_first, start, end), word_first);
            }
        }
        total
    }
}

/// The bits of the word whose bit 0 is `word_first` that lie in `[start,
/// end]` (which must meet the word).
fn word_mask(word_first: u64, start: u64, end: u64) -> u64 {
    let lo = start.saturating_sub(word_first).min(64);
    let hi = (end.min(word_first + 63) - word_first) + 1;
    (u64::MAX >> (64 - (hi - lo))) << lo
}

/// One chunk's worth of zeroed words, or `NoMemory`.
fn zeroed_words() -> Result<Vec<u64>, Error> {
    let mut bits = Vec::new();
    bits.try_reserve_exact(CHUNK_WORDS)
        .map_err(|_| Error::NoMemory)?;
    bits.resize(CHUNK_WORDS, 0);
    Ok(bits)
}

/// Calls `f` for the gfn of every set bit of `bits` (bit 0 = `first`).
fn report(mut bits: u64, first: u64, f: &mut impl FnMut(Gfn)) {
    while bits != 0 {
        f(Gfn(first + bits.trailing_zeros() as u64));
        bits &= bits - 1;
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
    /// Under PML: the `ram_logdirty` superpage holding the gfn was split so
    /// that its 4K page is writable and the CPU logs its writes (nothing was
    /// marked: the retried write is logged by PML).
    Split,
}

/// What [`P2m::rearm_page`] did.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Rearm {
    /// Nothing to re-arm here: not mapped, not log-dirty, not written, or a
    /// pending type change recomputes the mapping anyway.
    Unchanged,
    /// The dirty flag of the page's `ram_logdirty` leaf was cleared: its
    /// next write is logged once the INVEPT this p2m asks for is done.
    Cleared,
    /// A `ram_rw` mapping inside a tracked range (the out-of-frames fallback
    /// of a write fault, or mapped so by the kernel): it writes without
    /// logging until a type re-arm ([`P2m::rearm_range`]) recomputes it.
    Writable,
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
        if self.log_mode == LogMode::Pml && leaf.level > 0 {
            // The 4K page becomes writable, its writes logged by the CPU.
            match self.set_entry(mem, gfn, mfn, Order::PAGE_4K, info.ty, info.access) {
                Ok(()) => return Ok(WriteFault::Split),
                Err(Error::NoMemory) => {} // the coarse fallback below
                Err(e) => return Err(e),
            }
        }
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

    /// Under PML: whether the leaf holding `gfn` is `ram_logdirty` with the
    /// dirty flag the CPU sets on a write through it: a write to the page
    /// through this p2m not handed over by a clean yet. Draining a PML
    /// buffer asks this of every p2m that may have logged an address.
    pub fn written<M: EptMemory + ?Sized>(&self, mem: &M, gfn: Gfn) -> Result<bool, Error> {
        let g = gfn.check()?.0;
        if g > self.max_mapped_pfn().0 {
            return Ok(false);
        }
        let l = self.lookup(mem, g);
        Ok(l.entry.is_valid()
            && l.entry.is_leaf(l.level)
            && l.entry.p2m_type() == P2mType::RamLogdirty
            && l.entry.is_dirty())
    }

    /// Under PML, the re-arm of one page a clean hands over: clears the
    /// dirty flag of its `ram_logdirty` leaf (whatever marks lie above it:
    /// a scoped one may leave the leaf as it is when resolved), so the
    /// CPU logs the next write once the INVEPT this p2m then asks for is
    /// done. One walk, one entry write, no exit for the guest later (a type
    /// re-arm marks, and costs a misconfiguration exit per leaf table).
    pub fn rearm_page<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        gfn: Gfn,
    ) -> Result<Rearm, Error> {
        let g = gfn.check()?.0;
        if g > self.max_mapped_pfn().0 {
            return Ok(Rearm::Unchanged);
        }
        let mut table = self.root();
        let mut level = ROOT_LEVEL;
        let e = loop {
            let i = index(g, level);
            let e = read(mem, table, i);
            if !e.is_valid() {
                return Ok(Rearm::Unchanged);
            }
            if e.is_leaf(level) {
                if e.p2m_type() == P2mType::RamLogdirty && e.is_dirty() {
                    write(mem, table, i, e.without_dirty());
                    self.request_flush();
                    return Ok(Rearm::Cleared);
                }
                break e;
            }
            table = e.mfn();
            level -= 1;
        };
        let base = level_base(g, level);
        let last = base + level_pages(level) - 1;
        let writable = e.p2m_type() == P2mType::RamRw
            && self.logdirty.coverage(base, last) != Coverage::Outside
            && !self.lookup(mem, g).recompute;
        Ok(if writable {
            Rearm::Writable
        } else {
            Rearm::Unchanged
        })
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
    fn within_finds_the_ranges_of_a_window_clipped() {
        let mut r = LogDirtyRanges::new();
        for k in 0..1000u64 {
            r.add(10 * k, 10 * k + 2).unwrap();
        }
        assert_eq!(r.len(), 1000);
        let w = |r: &LogDirtyRanges, s, e| -> Vec<(u64, u64)> {
            r.within(Gfn(s), Gfn(e)).map(|(a, b)| (a.0, b.0)).collect()
        };
        assert_eq!(w(&r, 21, 41), [(21, 22), (30, 32), (40, 41)]);
        assert_eq!(w(&r, 3, 9), []);
        assert_eq!(w(&r, 9999, 20000), []);
        assert_eq!(w(&r, 9990, 20000), [(9990, 9992)]);
        assert_eq!(w(&r, 5, 4), []);
        assert_eq!(r.span_within(Gfn(21), Gfn(41)), Some((3, Gfn(21), Gfn(41))));
        assert_eq!(r.span_within(Gfn(3), Gfn(9)), None);
        // Adjacent adds merge: one range, however many calls made it.
        r.add(3, 9).unwrap();
        assert_eq!(w(&r, 0, 12), [(0, 12)]);
        assert_eq!(r.len(), 999);
        r.set_global(true);
        assert_eq!(w(&r, 3, 4), [(3, 4)], "global: the whole window");
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

    #[test]
    fn arm_sets_bits_aside_and_fetch_reports_only_those() {
        let mut d = DirtyBitmap::new();
        d.mark_range(Gfn(10), Gfn(12)).unwrap();
        d.mark(Gfn(1 << 20)).unwrap();
        d.arm(Gfn(0), Gfn(11)).unwrap();
        assert!(d.is_armed(Gfn(10)) && d.is_armed(Gfn(11)) && !d.is_armed(Gfn(12)));
        assert_eq!(d.dirty_count(), 4, "setting aside changes no count");
        // Logged between the two halves: 11 again (written after its fault
        // made it writable) and 13.
        d.mark(Gfn(11)).unwrap();
        d.mark(Gfn(13)).unwrap();
        assert_eq!(d.dirty_count(), 5);
        let mut got = vec![];
        d.fetch_armed(Gfn(0), Gfn::MAX, |g| got.push(g.0));
        assert_eq!(got, [10, 11]);
        assert!(
            d.is_dirty(Gfn(11)) && !d.is_dirty(Gfn(10)),
            "11 stays for the next clean"
        );
        assert_eq!(d.dirty_count(), 4);
        got.clear();
        d.fetch_armed(Gfn(0), Gfn::MAX, |g| got.push(g.0));
        assert!(got.is_empty(), "nothing set aside any more");
        // A second arm adds to what is set aside; fetch_and_clear takes both planes.
        d.arm(Gfn(0), Gfn(12)).unwrap();
        d.mark(Gfn(5)).unwrap();
        d.fetch_and_clear(Gfn(0), Gfn(20), |g| got.push(g.0));
        assert_eq!(got, [5, 11, 12, 13]);
        assert_eq!(d.dirty_count(), 1);
        assert_eq!(d.arm(Gfn(3), Gfn(2)), Err(Error::BadRange));
    }

    #[test]
    fn for_each_armed_reads_the_set_aside_bits_of_a_window() {
        let mut d = DirtyBitmap::new();
        for g in [3, 64, 65, 200, 1 << 20, (1 << 20) + 5] {
            d.mark(Gfn(g)).unwrap();
        }
        d.arm(Gfn(0), Gfn(199)).unwrap();
        d.arm(Gfn(1 << 20), Gfn(1 << 20)).unwrap();
        let mut got = vec![];
        d.for_each_armed(Gfn(0), Gfn::MAX, |g| got.push(g.0));
        assert_eq!(got, [3, 64, 65, 1 << 20]);
        got.clear();
        d.for_each_armed(Gfn(4), Gfn(64), |g| got.push(g.0));
        assert_eq!(got, [64]);
        got.clear();
        d.for_each_armed(Gfn(9), Gfn(8), |g| got.push(g.0));
        assert!(got.is_empty());
        assert!(d.is_armed(Gfn(64)), "still set aside");
        assert_eq!(d.dirty_count(), 6);
    }
}
