//! The guest's memory as the hypervisor handles it: arena tags and the
//! checks that read them through views, touches in the current view, the
//! balloon with markers, log-dirty (no write lost), the display copy, the
//! local APIC relocated onto RAM and back, and the scans.

use hv_abi::{access, call, error::*};

use super::calls::{EXIT_REASONS, TRACK_MAX};
use super::model::{
    ARENA_PAGES, BUFFER_PAGES, CODE_BYTES, CODE_OFFSET, GFN_MAX, Kind, Mode, PAGE, TAG_OFFSET,
    code, marker, marker_of, tag, tag_of,
};
use super::{Expect, Fuzzer};
use crate::apic::{BASE_ENABLE, IA32_APIC_BASE};
use crate::probe;
use crate::scenarios::Outcome;

const GP: u8 = 13;
/// Pages the balloon takes per seed, and in all (the arena must last).
const RELEASES_PER_SEED: u64 = 12;
const RELEASES_MAX: u64 = 640;
/// The buffer page that takes log-dirty bitmaps (after the two arrays).
const BITMAP_PAGE: u64 = 4;
/// Released pages read per view in a scan.
const RELEASED_PER_SCAN: usize = 12;

impl Fuzzer {
    /// The arena's tagged pages, `[first, end)` (some given back).
    fn tagged_range(&self) -> core::ops::Range<u64> {
        self.layout.first..self.layout.end() - BUFFER_PAGES
    }

    /// Writes every live arena page's tag (in view 0).
    pub(super) fn stamp_all(&mut self) -> Outcome {
        for g in self.tagged_range() {
            if self.model.is_released(&self.layout, g) {
                continue;
            }
            let r = probe::write(g * PAGE + TAG_OFFSET, tag(g)).and_then(|()| {
                probe::write(
                    g * PAGE + CODE_OFFSET,
                    code(g, self.layout.is_breakpoint(g)),
                )
            });
            self.ensure(
                r.is_ok(),
                "an arena page could not be written in view 0",
                format_args!("gfn {g:#x}: {r:?}"),
            )?;
        }
        Ok(())
    }

    /// rwx on every live arena page in `view` (512 per call).
    pub(super) fn open_arena(&mut self, view: u64) -> Outcome {
        if self.model.mode != Mode::Mixed {
            return Ok(());
        }
        let gfns = self.array_at(0);
        let accesses = self.array_at(1);
        let mut n = 0u64;
        let first = self.layout.first;
        for g in first..first + ARENA_PAGES + 1 {
            let last = g == first + ARENA_PAGES;
            if !last && !self.model.is_released(&self.layout, g) {
                self.put(gfns + 8 * n, g);
                self.put_u8(accesses + n, access::RWX as u8);
                n += 1;
            }
            if n == 512 || (last && n > 0) {
                self.expect(
                    call::ALTP2M_SET_MEM_ACCESS_MULTI,
                    [view, gfns, accesses, n],
                    Expect::Exact(n as i64),
                )?;
                n = 0;
            }
        }
        Ok(())
    }

    /// Checks what a read of `gfn`'s tag word through the current view gave.
    fn check_tag(&mut self, gfn: u64, read: Result<u64, u8>) -> Outcome {
        let view = self.model.current;
        let alias = (view != 0)
            .then(|| self.model.remap_of(view, gfn))
            .flatten();
        let word = match read {
            Err(GP) => return Ok(()),
            Err(v) => {
                return Err(self.fail(
                    "a read of an arena page raised an exception other than #GP",
                    format_args!("gfn {gfn:#x} view {view}: vector {v}"),
                ));
            }
            Ok(word) => word,
        };
        if let Some(released) = marker_of(word) {
            return Err(self.fail(
                "a page given back is still visible (its marker came back)",
                format_args!("gfn {gfn:#x} in view {view} shows the marker of {released:#x}"),
            ));
        }
        if alias.is_none() && self.model.is_released(&self.layout, gfn) {
            return Err(self.fail(
                "a page given back can still be read",
                format_args!("gfn {gfn:#x} in view {view}: {word:#x}"),
            ));
        }
        let target = alias.unwrap_or(gfn);
        // Only tagged arena pages are checked further.
        let tagged = |g: u64| self.layout.in_arena(g) && !self.layout.is_buffer(g);
        if !tagged(gfn) || !tagged(target) {
            return Ok(());
        }
        match tag_of(word) {
            Some(shown) if shown == gfn || shown == target => Ok(()),
            Some(shown) => Err(self.fail(
                "a view shows another page's frame",
                format_args!(
                    "gfn {gfn:#x} in view {view} shows the tag of {shown:#x} (model: remap to {alias:#x?})"
                ),
            )),
            None => Err(self.fail(
                "a view shows a frame that is not the guest's (a foreign frame)",
                format_args!("gfn {gfn:#x} in view {view}: {word:#x} (model: remap to {alias:#x?})"),
            )),
        }
    }

    /// A read (of the tag) or a write of what is there, in the current view.
    pub(super) fn touch_op(&mut self) -> Outcome {
        let gfn = if self.rng.chance(85) {
            self.tagged_page()
        } else {
            self.layout.end() - 1 - self.rng.below(BUFFER_PAGES)
        };
        let view = self.model.current;
        match self.rng.below(4) {
            0 | 1 => {
                let read = probe::read(gfn * PAGE + TAG_OFFSET);
                self.check_tag(gfn, read)
            }
            2 => {
                let at = self.untagged_offset(gfn);
                let r = probe::read(at).and_then(|v| probe::write(at, v));
                self.ensure(
                    matches!(r, Ok(()) | Err(GP)),
                    "a touch of an arena page raised an exception other than #GP",
                    format_args!("gfn {gfn:#x} view {view}: {r:?}"),
                )
            }
            _ => {
                // Bytes across a page boundary.
                let at = gfn * PAGE + PAGE - 1 - self.rng.below(4);
                let r = probe::read_u8(at).and_then(|b| probe::write_u8(at, b));
                let r2 = probe::read(gfn * PAGE + PAGE - 4);
                self.ensure(
                    matches!(r, Ok(()) | Err(GP)) && matches!(r2, Ok(_) | Err(GP)),
                    "a touch across arena pages raised an exception other than #GP",
                    format_args!("gfn {gfn:#x} view {view}: {r:?} {r2:?}"),
                )
            }
        }
    }

    /// An arena page `view` remaps, if any.
    fn remapped_in(&mut self, view: u16) -> Option<u64> {
        let remapped: heapless::Vec<u64, 256> = self
            .model
            .remaps
            .iter()
            .filter(|r| r.view == view && self.layout.in_arena(r.old))
            .map(|r| r.old)
            .collect();
        (!remapped.is_empty()).then(|| self.rng.pick(&remapped))
    }

    /// An 8-byte aligned address in `gfn` away from its tag, its code and
    /// the #VE information area.
    pub(super) fn untagged_offset(&mut self, gfn: u64) -> u64 {
        let first = CODE_OFFSET + CODE_BYTES;
        let off = first + 8 * self.rng.below((PAGE - first - 8) / 8);
        let off = if off == TAG_OFFSET { off + 8 } else { off };
        gfn * PAGE + off
    }

    /// A call into an arena page's code in the current view: it returns
    /// the gfn of the frame the view shows there (the page's own, or its
    /// remap's), also when a denied fetch is stepped in view 0; an INT3 in
    /// a page the view remaps is a hidden breakpoint (the hypervisor runs
    /// the original instruction: the page's own gfn comes back); the
    /// guest's own INT3 (a breakpoint page not remapped) reaches the guest.
    pub(super) fn exec_op(&mut self) -> Outcome {
        let view = self.model.current;
        let gfn = match self.remapped_in(view) {
            Some(g) if self.rng.chance(50) => g,
            _ => self.tagged_page(),
        };
        let alias = (view != 0)
            .then(|| self.model.remap_of(view, gfn))
            .flatten();
        let shown = alias.unwrap_or(gfn);
        let released = self.model.is_released(&self.layout, gfn);
        // Only arena code: a remap to anything else is not called.
        if !self.layout.in_arena(shown) || self.layout.is_buffer(shown) {
            return Ok(());
        }
        if self.model.mode == Mode::Mixed && !released {
            // A denied fetch is stepped in view 0: allow it there.
            self.expect(
                call::ALTP2M_SET_MEM_ACCESS,
                [0, gfn, access::RWX, 0],
                Expect::Exact(0),
            )?;
        }
        let result = probe::call(gfn * PAGE + CODE_OFFSET).map(|rax| rax & 0xffff_ffff);
        let own_breakpoint = self.layout.is_breakpoint(gfn);
        let ok = match result {
            Ok(x) if alias.is_some() => x == gfn || x == shown,
            Ok(x) => x == gfn && !released,
            // The guest's own INT3, in a page its own frame.
            Err(3) => own_breakpoint,
            Err(GP) => released,
            Err(_) => false,
        };
        self.ensure(
            ok,
            "a call into an arena page ran another frame's code, or a breakpoint went where it must not",
            format_args!(
                "gfn {gfn:#x} in view {view} (model: remap to {alias:#x?}, released {released}, own breakpoint {own_breakpoint}): {result:x?}"
            ),
        )
    }

    /// Puts the vCPU on view 0 (showing it first if hidden).
    pub(super) fn go_to_view0(&mut self) -> Outcome {
        if !self.model.enabled || self.model.current == 0 {
            return Ok(());
        }
        if !self.model.view0_visible {
            self.set_visibility(0, 1)?;
        }
        self.switch_view(None, 0)
    }

    /// Gives a page back after filling it with its marker, with aliases to
    /// it in some views; then no view, alias or call may reach it.
    pub(super) fn balloon_op(&mut self) -> Outcome {
        if self.released_now >= RELEASES_PER_SEED
            || self.model.released_count() >= RELEASES_MAX
            || self.model.mode == Mode::External && self.rng.chance(50)
        {
            return self.balloon_refused();
        }
        let gfn = if self.rng.chance(85) {
            self.tagged_page()
        } else {
            // A buffer page past the scratch arrays and the bitmap page.
            self.layout.end() - 1 - self.rng.below(BUFFER_PAGES - BITMAP_PAGE - 2)
        };
        let in_display = self
            .model
            .display
            .is_some_and(|(first, pages)| (first..first + pages).contains(&gfn));
        if self.model.kind(&self.layout, gfn) != Kind::Live || in_display {
            return self.balloon_refused();
        }
        let mixed = self.model.mode == Mode::Mixed;
        self.go_to_view0()?;
        if mixed {
            self.expect(
                call::ALTP2M_SET_MEM_ACCESS,
                [0, gfn, access::RWX, 0],
                Expect::Exact(0),
            )?;
        }
        // Aliases to it in some views.
        let mut aliases: heapless::Vec<(u16, u64), 4> = heapless::Vec::new();
        if mixed && self.model.enabled && !self.model.remaps.is_full() {
            for v in self.model.live_views().iter().take(3) {
                let alias = self.tagged_page();
                if alias == gfn
                    || Some(alias) == self.model.notify
                    || !self.model.altp2m_view(u64::from(*v))
                {
                    continue;
                }
                let expect = if alias > GFN_MAX { EINVAL } else { 0 };
                self.expect(
                    call::ALTP2M_CHANGE_GFN,
                    [u64::from(*v), alias, gfn, 0],
                    Expect::Exact(expect),
                )?;
                self.model.set_remap(*v, alias, gfn);
                let _ = aliases.push((*v, alias));
            }
        }
        for i in 0..PAGE / 8 {
            let r = probe::write(gfn * PAGE + 8 * i, marker(gfn));
            self.ensure(
                r.is_ok(),
                "a page could not be written in view 0 before it was given back",
                format_args!("gfn {gfn:#x}: {r:?}"),
            )?;
        }
        self.expect(call::BALLOON_RELEASE, [gfn, 0, 0, 0], Expect::Exact(0))?;
        self.model.release(&self.layout, gfn);
        super::ve::sync(&self.model);
        self.released_now += 1;
        // Gone for every call.
        self.expect(call::BALLOON_RELEASE, [gfn, 0, 0, 0], Expect::Exact(ENOENT))?;
        self.expect(
            call::EXIT_COUNTS,
            [gfn * PAGE, 1, 0, 0],
            Expect::Exact(EFAULT),
        )?;
        if self.model.mode != Mode::External {
            // Refused, and the page in force (if any) stays.
            self.expect(
                call::ALTP2M_VCPU_ENABLE_NOTIFY,
                [gfn, 0, 0, 0],
                Expect::Exact(EINVAL),
            )?;
        }
        if mixed {
            self.expect(
                call::ALTP2M_SET_MEM_ACCESS,
                [0, gfn, access::R, 0],
                Expect::Exact(ENOENT),
            )?;
            for &(v, alias) in &aliases {
                self.expect(
                    call::ALTP2M_CHANGE_GFN,
                    [u64::from(v), alias, gfn, 0],
                    Expect::Exact(ENOENT),
                )?;
            }
        }
        let read = probe::read(gfn * PAGE + TAG_OFFSET);
        self.ensure(
            read == Err(GP),
            "a page given back is still readable in view 0",
            format_args!("gfn {gfn:#x}: {read:x?}"),
        )?;
        // Through every view the guest can run on, the page and its
        // former aliases.
        let views = self.model.live_views();
        for v in views.iter().copied() {
            if !self.enter_view(u64::from(v))? {
                continue;
            }
            let read = probe::read(gfn * PAGE + TAG_OFFSET);
            self.check_tag(gfn, read)?;
            for &(av, alias) in &aliases {
                if av == v {
                    let read = probe::read(alias * PAGE + TAG_OFFSET);
                    self.check_tag(alias, read)?;
                }
            }
        }
        self.go_to_view0()
    }

    /// Goes to `view` if the guest can run there (showing it if hidden),
    /// by VMFUNC or hypercall. False if it cannot.
    pub(super) fn enter_view(&mut self, view: u64) -> Result<bool, &'static str> {
        if !self.model.runnable(view) || !self.model.enabled {
            return Ok(false);
        }
        if !self.model.visible(view) {
            self.set_visibility(view, 1)?;
        }
        if self.vmfunc && self.rng.chance(50) {
            let r = probe::vmfunc(view as u32);
            self.ensure(
                r.is_ok(),
                "VMFUNC to a visible view raised an exception",
                format_args!("view {view}: {r:?}"),
            )?;
            self.model.current = view as u16;
            Ok(true)
        } else {
            self.switch_view(None, view)?;
            Ok(true)
        }
    }

    /// BALLOON_RELEASE of a page that cannot go: not RAM, given back
    /// already, beyond 48 bits, in the framebuffer.
    pub(super) fn balloon_refused(&mut self) -> Outcome {
        if let Some((first, pages)) = self.model.display
            && self.rng.chance(30)
        {
            let gfn = first + self.rng.below(pages);
            return self
                .expect(call::BALLOON_RELEASE, [gfn, 0, 0, 0], Expect::Exact(EBUSY))
                .map(|_| ());
        }
        for _ in 0..8 {
            let gfn = self.mut_gfn();
            let expect = match self.model.kind(&self.layout, gfn) {
                Kind::OutOfRange => EINVAL,
                Kind::Released | Kind::Hole | Kind::Mmio => ENOENT,
                Kind::Live | Kind::Spare => continue,
            };
            return self
                .expect(call::BALLOON_RELEASE, [gfn, 0, 0, 0], Expect::Exact(expect))
                .map(|_| ());
        }
        Ok(())
    }

    fn bitmap_at(&self) -> u64 {
        (self.layout.end() - BUFFER_PAGES + BITMAP_PAGE) * PAGE
    }

    /// Fetches one page's dirty bit: 0 or 1.
    fn fetch_one(&mut self, gfn: u64) -> Result<i64, &'static str> {
        let at = self.bitmap_at();
        self.expect(
            call::LOGDIRTY_FETCH,
            [gfn, 1, at, 0],
            Expect::Set {
                ok: Some((0, 1)),
                errors: &[],
            },
        )
    }

    /// A write through the current view to a tracked page is never lost:
    /// the page (or, through a remap, the page that owns the frame) is
    /// dirty at the next fetch, and clean at the one after.
    pub(super) fn logdirty_op(&mut self) -> Outcome {
        if self.rng.chance(30) {
            return if self.rng.chance(50) {
                self.logdirty_track()
            } else {
                self.logdirty_fetch()
            };
        }
        let view = self.model.current;
        // Half the time a page the view remaps (the write dirties the page
        // that owns the frame).
        let gfn = match self.remapped_in(view) {
            Some(g) if self.rng.chance(50) => g,
            _ => self.tagged_page(),
        };
        if self.model.kind(&self.layout, gfn) != Kind::Live || self.model.notify == Some(gfn) {
            return Ok(());
        }
        let alias = (view != 0)
            .then(|| self.model.remap_of(view, gfn))
            .flatten();
        let owner = alias.unwrap_or(gfn);
        if self.model.kind(&self.layout, owner) != Kind::Live || self.model.notify == Some(owner) {
            return Ok(());
        }
        // Full access in the view and in view 0: the write happens in the
        // view, through the remap if there is one.
        if self.model.mode == Mode::Mixed {
            for v in [u64::from(view), 0] {
                self.expect(
                    call::ALTP2M_SET_MEM_ACCESS,
                    [v, gfn, access::RWX, 0],
                    Expect::Exact(0),
                )?;
            }
        }
        for g in [gfn, owner] {
            self.expect(call::LOGDIRTY_TRACK, [g, 1, 0, 0], Expect::Exact(0))?;
            self.model.logdirty(g, g, true);
            self.fetch_one(g)?;
        }
        let at = self.untagged_offset(gfn);
        let wrote = probe::read(at).and_then(|v| probe::write(at, v));
        let dirty_gfn = self.fetch_one(gfn)?;
        let dirty_owner = if owner == gfn {
            dirty_gfn
        } else {
            self.fetch_one(owner)?
        };
        self.ensure(
            wrote.is_ok(),
            "a write to a page with full access failed",
            format_args!("gfn {gfn:#x} in view {view}: {wrote:?}"),
        )?;
        // The page that owns the frame is dirty, and only it (also when the
        // display's refresh, on its tick, took the bit first).
        self.ensure(
            dirty_owner == 1 && (owner == gfn || dirty_gfn == 0),
            "a write through a view was not logged on the page that owns the frame",
            format_args!(
                "gfn {gfn:#x} (frame of {owner:#x}) in view {view}: dirty {dirty_gfn} / owner {dirty_owner}"
            ),
        )?;
        let again = self.fetch_one(gfn)?;
        self.ensure(
            again == 0,
            "a fetch did not clear the dirty bit",
            format_args!("gfn {gfn:#x}"),
        )
    }

    pub(super) fn logdirty_track(&mut self) -> Outcome {
        let first = self.any_gfn();
        let pages = match self.rng.below(10) {
            0..=4 => self.rng.range(1, 64),
            5 => self.rng.range(1, 1 << 16),
            6 => TRACK_MAX,
            7 => self.rng.pick(&[0, TRACK_MAX + 1, u64::MAX]),
            _ => self.edge(),
        };
        let expect = match first.checked_add(pages.wrapping_sub(1)) {
            _ if pages == 0 || pages > TRACK_MAX => Expect::Exact(EINVAL),
            None => Expect::Exact(EINVAL),
            Some(last) if last > GFN_MAX || first > GFN_MAX => Expect::Exact(EINVAL),
            Some(_) => Expect::Set {
                ok: Some((0, 0)),
                errors: &[ENOMEM],
            },
        };
        if self.expect(call::LOGDIRTY_TRACK, [first, pages, 0, 0], expect)? == 0 {
            self.model.logdirty(first, first + (pages - 1), true);
        }
        Ok(())
    }

    pub(super) fn logdirty_fetch(&mut self) -> Outcome {
        let first = self.any_gfn();
        let pages = match self.rng.below(10) {
            0..=5 => self.rng.range(1, 64),
            6 => self.rng.range(1, 32768),
            7 => 32768,
            8 => self.rng.pick(&[0, 32769, u64::MAX]),
            _ => self.edge(),
        };
        let bytes = pages.min(32768).div_ceil(8);
        let at = self.buffer_arg(bytes);
        let valid_range = (1..=32768).contains(&pages) && first.checked_add(pages - 1).is_some();
        let expect = if !valid_range {
            Expect::Exact(EINVAL)
        } else if !self.model.writable(&self.layout, at, bytes) {
            Expect::Exact(EFAULT)
        } else if first + pages - 1 > GFN_MAX {
            Expect::Exact(EINVAL)
        } else {
            Expect::Set {
                ok: Some((0, pages as i64)),
                errors: &[ENOMEM],
            }
        };
        let dirty = self.expect(call::LOGDIRTY_FETCH, [first, pages, at, 0], expect)?;
        if dirty < 0 {
            return Ok(());
        }
        // The bitmap names `dirty` pages, all of them RAM, none past `pages`.
        let mut bits = 0;
        for i in 0..bytes {
            let byte = probe::read_u8(at + i).unwrap_or(0);
            bits += u64::from(byte.count_ones());
            for b in 0..8 {
                let page = i * 8 + b;
                if byte & (1 << b) == 0 {
                    continue;
                }
                let gfn = first + page;
                let ram = self.layout.is_backed(gfn.saturating_mul(PAGE)) && page < pages;
                self.ensure(
                    ram,
                    "a fetch reported a page dirty that is not RAM or not in the range",
                    format_args!("first {first:#x} pages {pages}: bit {page}"),
                )?;
            }
        }
        self.ensure(
            bits == dirty as u64,
            "a fetch's bitmap does not hold as many dirty pages as it returned",
            format_args!("returned {dirty}, bitmap has {bits}"),
        )
    }

    /// The display: tracked on arena pages; its copy must match them after
    /// every refresh.
    pub(super) fn display_op(&mut self) -> Outcome {
        match self.model.display {
            None => self.display_set(),
            Some((first, pages)) => match self.rng.below(10) {
                0..=4 => self.display_compare(),
                5..=7 => {
                    let gfn = first + self.rng.below(pages);
                    let at = self.untagged_offset(gfn);
                    let _ = probe::read(at).and_then(|v| probe::write(at, v ^ 0x5a5a));
                    self.display_compare()
                }
                8 => self.balloon_refused(),
                _ => {
                    self.expect(call::DISPLAY_SET, [0; 4], Expect::Exact(0))?;
                    self.model.display = None;
                    self.model.logdirty(first, first + pages - 1, false);
                    Ok(())
                }
            },
        }
    }

    pub(super) fn display_set(&mut self) -> Outcome {
        let first = if self.rng.chance(80) {
            self.tagged_page()
        } else {
            self.mut_gfn()
        };
        let pages = match self.rng.below(10) {
            0..=6 => self.rng.range(1, 64),
            7 => 64,
            8 => 0,
            _ => self.rng.pick(&[65, 1000, u64::MAX]),
        };
        let expect = if pages == 0 {
            if self.model.display.is_some() {
                0
            } else {
                ENOENT
            }
        } else if self.model.display.is_some() {
            EBUSY
        } else if pages > 64 || first.checked_add(pages - 1).is_none() {
            EINVAL
        } else if (first..=first + (pages - 1))
            .all(|g| matches!(self.model.kind(&self.layout, g), Kind::Live | Kind::Spare))
        {
            0
        } else {
            EFAULT
        };
        let result = self.call(call::DISPLAY_SET, [first, pages, 0, 0]);
        // Out of memory for the copy is allowed.
        let expect = if expect == 0 && result == ENOMEM {
            ENOMEM
        } else {
            expect
        };
        self.check_result(
            call::DISPLAY_SET,
            [first, pages, 0, 0],
            result,
            Expect::Exact(expect),
        )?;
        if expect == 0 {
            match (self.model.display, pages) {
                (Some((f, p)), 0) => self.model.logdirty(f, f + p - 1, false),
                (_, p) if p > 0 => self.model.logdirty(first, first + p - 1, true),
                _ => {}
            }
            self.model.display = (pages > 0).then_some((first, pages));
        }
        Ok(())
    }

    pub(super) fn display_refresh(&mut self) -> Outcome {
        let expect = match self.model.display {
            None => Expect::Exact(ENOENT),
            Some((_, pages)) => Expect::Set {
                ok: Some((0, pages as i64)),
                errors: &[ENOMEM],
            },
        };
        self.expect(call::DISPLAY_REFRESH, [0; 4], expect)
            .map(|_| ())
    }

    pub(super) fn display_checksum(&mut self) -> Outcome {
        let expect = match self.model.display {
            None => Expect::Exact(ENOENT),
            Some(_) => Expect::Set {
                ok: Some((0, i64::MAX)),
                errors: &[],
            },
        };
        self.expect(call::DISPLAY_CHECKSUM, [0; 4], expect)
            .map(|_| ())
    }

    /// Refresh, then the display copy's checksum equals the framebuffer's
    /// (read in view 0, where nothing is remapped).
    fn display_compare(&mut self) -> Outcome {
        let Some((first, pages)) = self.model.display else {
            return Ok(());
        };
        // The CPU writes #VE information without dirtying the page: a
        // display over the #VE page cannot follow it (docs/limits.md).
        if self
            .model
            .notify
            .is_some_and(|n| (first..first + pages).contains(&n))
        {
            return Ok(());
        }
        self.go_to_view0()?;
        if self.model.mode == Mode::Mixed {
            for g in first..first + pages {
                self.expect(
                    call::ALTP2M_SET_MEM_ACCESS,
                    [0, g, access::RWX, 0],
                    Expect::Exact(0),
                )?;
            }
        }
        self.display_refresh()?;
        let theirs = self.expect(
            call::DISPLAY_CHECKSUM,
            [0; 4],
            Expect::Set {
                ok: Some((0, i64::MAX)),
                errors: &[],
            },
        )? as u64;
        let bytes = (0..pages * PAGE / 8)
            .flat_map(|i| probe::read(first * PAGE + i * 8).unwrap_or(0).to_le_bytes());
        let ours = hv_abi::display_checksum(bytes);
        self.ensure(
            ours == theirs,
            "the display copy differs from the framebuffer after a refresh (a frozen display)",
            format_args!("framebuffer {first:#x}+{pages}: {ours:#x}, display {theirs:#x}"),
        )
    }

    /// A sample of the arena read through the current view: pages given
    /// back, the view's remaps, random pages.
    pub(super) fn scan_op(&mut self) -> Outcome {
        let view = self.model.current;
        let released: heapless::Vec<u64, 16> = (0..64)
            .filter_map(|_| self.tagged_released())
            .take(RELEASED_PER_SCAN)
            .collect();
        let remapped: heapless::Vec<u64, 256> = self
            .model
            .remaps
            .iter()
            .filter(|r| r.view == view)
            .map(|r| r.old)
            .collect();
        let random: heapless::Vec<u64, 16> = (0..16).map(|_| self.tagged_page()).collect();
        for gfn in released.iter().chain(remapped.iter()).chain(random.iter()) {
            let read = probe::read(gfn * PAGE + TAG_OFFSET);
            self.check_tag(*gfn, read)?;
        }
        Ok(())
    }

    /// The end of a seed: through every view the guest can run on (hidden
    /// ones shown), with the arena opened rwx, every page read.
    pub(super) fn final_scan(&mut self) -> Outcome {
        if self.model.mode != Mode::External && self.model.notify.is_some() {
            self.expect(call::ALTP2M_VCPU_DISABLE_NOTIFY, [0; 4], Expect::Exact(0))?;
            self.model.notify = None;
            super::ve::sync(&self.model);
        }
        self.go_to_view0()?;
        let views = self.model.live_views();
        for v in core::iter::once(0).chain(views.iter().copied()) {
            let v = u64::from(v);
            if v != 0 && !self.enter_view(v)? {
                continue;
            }
            self.open_arena(v)?;
            for g in self.tagged_range() {
                if self.model.is_released(&self.layout, g) {
                    continue;
                }
                let read = probe::read(g * PAGE + TAG_OFFSET);
                self.check_tag(g, read)?;
            }
            let released: heapless::Vec<u64, 16> = (0..64)
                .filter_map(|_| self.tagged_released())
                .take(RELEASED_PER_SCAN)
                .collect();
            for g in released {
                let read = probe::read(g * PAGE + TAG_OFFSET);
                self.check_tag(g, read)?;
            }
            let remapped: heapless::Vec<u64, 256> = self
                .model
                .remaps
                .iter()
                .filter(|r| u64::from(r.view) == v)
                .map(|r| r.old)
                .collect();
            for g in remapped {
                let read = probe::read(g * PAGE + TAG_OFFSET);
                self.check_tag(g, read)?;
            }
        }
        self.go_to_view0()
    }

    /// The local APIC moved onto an arena page, a hole or a page given back
    /// (enabled: the APIC answers there; disabled: all ones), with the
    /// calls that must refuse it meanwhile, and moved back: the RAM under
    /// it comes back, a hole stays a hole, and no alias to it survives.
    pub(super) fn apic_op(&mut self) -> Outcome {
        let Ok(base) = probe::rdmsr(IA32_APIC_BASE) else {
            return Err(self.fail("IA32_APIC_BASE cannot be read", format_args!("")));
        };
        let bsp = base & (1 << 8);
        match self.rng.below(10) {
            0 => {
                // Refused values: x2APIC, reserved bits, beyond the
                // physical-address width.
                let bad = self.rng.pick(&[
                    base | 1 << 10,
                    base | 1,
                    base | 1 << 9,
                    base | 1 << self.layout.maxphy,
                    u64::MAX,
                ]);
                let r = probe::wrmsr(IA32_APIC_BASE, bad);
                return self.ensure(
                    r == Err(GP) && probe::rdmsr(IA32_APIC_BASE) == Ok(base),
                    "a bad IA32_APIC_BASE was not refused with #GP",
                    format_args!("{bad:#x}: {r:?}"),
                );
            }
            1 => {
                // Disabled and enabled in place.
                let r1 = probe::wrmsr(IA32_APIC_BASE, base & !BASE_ENABLE);
                let r2 = probe::wrmsr(IA32_APIC_BASE, base);
                return self.ensure(
                    r1.is_ok() && r2.is_ok() && probe::rdmsr(IA32_APIC_BASE) == Ok(base),
                    "the APIC could not be disabled and enabled again",
                    format_args!("{r1:?} {r2:?}"),
                );
            }
            _ => {}
        }
        let target = match self.rng.below(10) {
            0..=6 => self.tagged_page(),
            7 => self
                .rng
                .pick(&[0xfed00, self.layout.end(), self.layout.end() + 0x100]),
            _ => self.tagged_released().unwrap_or(self.layout.end() + 1),
        };
        let in_display = self
            .model
            .display
            .is_some_and(|(first, pages)| (first..first + pages).contains(&target));
        let kind = self.model.kind(&self.layout, target);
        if Some(target) == self.model.notify
            || in_display
            || target * PAGE >= 1 << self.layout.maxphy
        {
            return Ok(());
        }
        self.go_to_view0()?;
        if self.model.mode == Mode::Mixed && kind == Kind::Live {
            self.expect(
                call::ALTP2M_SET_MEM_ACCESS,
                [0, target, access::RWX, 0],
                Expect::Exact(0),
            )?;
        }
        let enabled = self.rng.chance(70);
        if !enabled {
            self.read_only_page = Some(target);
        }
        let value = (target * PAGE) | bsp | if enabled { BASE_ENABLE } else { 0 };
        let r = probe::wrmsr(IA32_APIC_BASE, value);
        self.ensure(
            r.is_ok(),
            "the APIC could not be moved onto a page",
            format_args!("{value:#x}: {r:?}"),
        )?;
        // The APIC replaces whatever was there: aliases of it go.
        self.model.host_frame_changed(target);
        // Dwords: the APIC takes no wider access.
        let seen = probe::read_u32(target * PAGE + 0x30);
        let check = if enabled {
            // The version register of an integrated APIC.
            matches!(seen, Ok(v) if (0x10..=0x15).contains(&(v & 0xff)))
        } else {
            seen == Ok(u32::MAX) && probe::write_u8(target * PAGE + 0x30, 0) == Err(GP)
        };
        let during = self.apic_refusals(target, enabled);
        let back = probe::wrmsr(IA32_APIC_BASE, base);
        self.ensure(
            back.is_ok() && probe::rdmsr(IA32_APIC_BASE) == Ok(base),
            "the APIC could not be moved back",
            format_args!("{base:#x}: {back:?}"),
        )?;
        during?;
        self.ensure(
            check,
            "the page the APIC moved to does not answer as the APIC (or as all ones, disabled)",
            format_args!("gfn {target:#x} enabled {enabled}: {seen:x?}"),
        )?;
        let after = probe::read(target * PAGE + TAG_OFFSET);
        match kind {
            Kind::Live => self.ensure(
                after == Ok(tag(target)),
                "the RAM under the APIC's page did not come back",
                format_args!("gfn {target:#x}: {after:x?}"),
            ),
            _ => self.ensure(
                after == Err(GP),
                "a page that was not RAM became readable after the APIC left it",
                format_args!("gfn {target:#x} ({kind:?}): {after:x?}"),
            ),
        }
    }

    /// While the APIC (or its all-ones page) is at `gfn`: the hypervisor
    /// writes nothing there and gives nothing of it away.
    fn apic_refusals(&mut self, gfn: u64, enabled: bool) -> Outcome {
        self.expect(
            call::EXIT_COUNTS,
            [gfn * PAGE, EXIT_REASONS, 0, 0],
            Expect::Exact(EFAULT),
        )?;
        self.expect(call::BALLOON_RELEASE, [gfn, 0, 0, 0], Expect::Exact(ENOENT))?;
        self.expect(
            call::DISPLAY_SET,
            [gfn, 1, 0, 0],
            Expect::Exact(if self.model.display.is_some() {
                EBUSY
            } else {
                EFAULT
            }),
        )?;
        if self.model.mode == Mode::Mixed && self.model.enabled {
            let views = self.model.live_views();
            if let Some(&v) = views.first() {
                let alias = self.tagged_page();
                if Some(alias) != self.model.notify && alias != gfn {
                    // The APIC is no RAM; the all-ones page is (read-only),
                    // and an alias to it must go when the APIC leaves.
                    let expect = if enabled { EINVAL } else { 0 };
                    self.expect(
                        call::ALTP2M_CHANGE_GFN,
                        [u64::from(v), alias, gfn, 0],
                        Expect::Exact(expect),
                    )?;
                    if expect == 0 {
                        self.model.set_remap(v, alias, gfn);
                        // Dropped when the APIC moves back.
                        self.model.host_frame_changed(gfn);
                    }
                }
            }
        }
        Ok(())
    }
}
