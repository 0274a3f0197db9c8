//! The display model of the seed scenario: the hypervisor tracks a guest
//! framebuffer with log-dirty and keeps its own copy of it, refreshed from
//! the dirty pages on every tick (VMX-preemption timer) and on the guest's
//! request; the first page is mirrored to the machine's text screen. If a
//! type change failed to reach a view the guest writes through, the copy
//! would freeze: the guest compares checksums to prove it does not.

use hv_ept::{Gfn, Mfn, P2mType};

use crate::abi::error;
use crate::platform::Platform;
use crate::vm::{PAGE, Vm};
use crate::vmx::Cpu;

/// Largest framebuffer tracked, in pages.
pub const MAX_PAGES: u64 = 64;
/// 80 x 25 text cells of character and attribute.
const TEXT_BYTES: usize = 80 * 25 * 2;

pub struct Display {
    pub first: Gfn,
    pub pages: u64,
    /// The hypervisor's copy: `pages` contiguous frames.
    copy: Mfn,
    pub refreshes: u64,
    pub pages_copied: u64,
    /// The display and the guest's `LOGDIRTY_FETCH` share one dirty log, and
    /// each fetch clears what it takes. So that neither loses a write to the
    /// other, each keeps what the other took for it (bit i: page first + i):
    /// pages the guest's fetch found dirty, still to be copied...
    for_display: u64,
    /// ...and pages a refresh found dirty, still to be reported to the guest.
    for_guest: u64,
}

impl Display {
    fn last(&self) -> Gfn {
        Gfn(self.first.0 + self.pages - 1)
    }

    fn bit(&self, gfn: Gfn) -> Option<u64> {
        let i = gfn.0.checked_sub(self.first.0)?;
        (i < self.pages).then(|| 1 << i)
    }

    /// The guest's fetch took `gfn`'s dirty bit: the copy still needs it.
    pub fn guest_took(&mut self, gfn: Gfn) {
        if let Some(bit) = self.bit(gfn) {
            self.for_display |= bit;
        }
    }

    /// Hands the guest's fetch of `[first, last]` the pages of the display
    /// that a refresh found dirty since, and forgets them.
    pub fn give_guest(&mut self, first: Gfn, last: Gfn, mut f: impl FnMut(Gfn)) {
        for i in 0..self.pages {
            let gfn = Gfn(self.first.0 + i);
            if self.for_guest & (1 << i) != 0 && (first.0..=last.0).contains(&gfn.0) {
                self.for_guest &= !(1 << i);
                f(gfn);
            }
        }
    }

    pub fn destroy(self, platform: &mut impl Platform) {
        platform.free_frames(self.copy, self.pages);
    }

    /// Checksum of the copy, as `hv_abi::display_checksum` defines it.
    pub fn checksum(&self, platform: &impl Platform) -> u64 {
        let pages = (0..self.pages).flat_map(|i| {
            let mut page = [0u8; PAGE as usize];
            platform.read_phys(self.copy.hpa() + i * PAGE, &mut page);
            page
        });
        crate::abi::display_checksum(pages)
    }
}

/// Copies guest page `gfn` into page `index` of the display copy.
fn copy_page(guest: &Vm, platform: &mut impl Platform, copy: Mfn, index: u64, gfn: Gfn) {
    let mut page = [0u8; PAGE as usize];
    if guest.read(platform, gfn.0 * PAGE, &mut page).is_ok() {
        platform.write_phys(copy.hpa() + index * PAGE, &page);
    }
}

/// `DISPLAY_SET`: starts tracking `pages` pages from `first`, or with
/// `pages` = 0 stops tracking. Errors are hypercall results.
pub fn set(
    guest: &mut Vm,
    platform: &mut impl Platform,
    first: Gfn,
    pages: u64,
) -> Result<(), i64> {
    if pages == 0 {
        return stop(guest, platform);
    }
    if guest.display.is_some() {
        return Err(error::EBUSY);
    }
    if !(1..=MAX_PAGES).contains(&pages) {
        return Err(error::EINVAL);
    }
    let last = first.0.checked_add(pages - 1).ok_or(error::EINVAL)?;
    if (first.0..=last).any(|g| guest.ram_page(platform, Gfn(g)).is_none()) {
        return Err(error::EFAULT);
    }
    let copy = platform.alloc_frames(pages, 1).ok_or(error::ENOMEM)?;
    for i in 0..pages {
        platform.zero_frame(Mfn(copy.0 + i));
    }
    for i in 0..pages {
        copy_page(guest, platform, copy, i, Gfn(first.0 + i));
    }
    let tracked = guest.altp2m.host_change_type_range(
        platform,
        &mut guest.p2m,
        first,
        Gfn(last),
        P2mType::RamRw,
        P2mType::RamLogdirty,
    );
    if let Err(e) = tracked {
        platform.free_frames(copy, pages);
        return Err(crate::operations::errno(e));
    }
    guest.display = Some(Display {
        first,
        pages,
        copy,
        refreshes: 0,
        pages_copied: pages,
        for_display: 0,
        for_guest: 0,
    });
    log::info!("display: tracking {pages} pages from gfn {:#x}", first.0);
    Ok(())
}

/// Stops tracking: the framebuffer is plain RAM again, the copy is freed.
fn stop(guest: &mut Vm, platform: &mut impl Platform) -> Result<(), i64> {
    let display = guest.display.as_ref().ok_or(error::ENOENT)?;
    let (first, last) = (display.first, display.last());
    guest
        .altp2m
        .host_change_type_range(
            platform,
            &mut guest.p2m,
            first,
            last,
            P2mType::RamLogdirty,
            P2mType::RamRw,
        )
        .map_err(crate::operations::errno)?;
    guest.dirty.fetch_and_clear(first, last, |_| {});
    if let Some(display) = guest.display.take() {
        display.destroy(platform);
    }
    log::info!("display: tracking stopped");
    Ok(())
}

/// Copies the framebuffer's dirty pages into the display copy, re-arms
/// tracking, mirrors the first page to the text screen. Returns the number
/// of pages copied.
pub fn refresh(
    guest: &mut Vm,
    cpu: &mut impl Cpu,
    platform: &mut impl Platform,
    vcpu: usize,
) -> Result<u64, hv_altp2m::Error> {
    let Some(display) = guest.display.as_ref() else {
        return Ok(0);
    };
    let (first, last, copy) = (display.first, display.last(), display.copy);
    // Re-arm, INVEPT, then take the dirty pages: no write is lost while
    // vCPUs run (see Altp2m::arm_dirty).
    let armed = guest
        .altp2m
        .arm_dirty(platform, &mut guest.p2m, &mut guest.dirty, first, last)?;
    crate::views::flush(guest, cpu, platform, vcpu);
    let mut fetched = 0u64;
    guest.altp2m.fetch_dirty(&mut guest.dirty, &armed, |gfn| {
        if let Some(i) = gfn.0.checked_sub(first.0).filter(|&i| i < MAX_PAGES) {
            fetched |= 1 << i;
        }
    })?;
    let Some(display) = guest.display.as_mut() else {
        return Ok(0);
    };
    display.for_guest |= fetched;
    let pages = fetched | core::mem::take(&mut display.for_display);
    let count = u64::from(pages.count_ones());
    display.refreshes += 1;
    display.pages_copied += count;
    for index in (0..MAX_PAGES).filter(|i| pages & (1 << i) != 0) {
        copy_page(guest, platform, copy, index, Gfn(first.0 + index));
    }
    let mut text = [0u8; TEXT_BYTES];
    platform.read_phys(copy.hpa(), &mut text);
    platform.show_text(&text);
    Ok(count)
}
