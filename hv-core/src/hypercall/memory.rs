//! Hypercalls about the guest's memory: exit counters, log-dirty tracking,
//! the balloon, and the display model.

use hv_ept::{Gfn, P2mType};

use super::{Args, errno};
use crate::abi::error;
use crate::exits::ExitCtx;
use crate::platform::Platform;
use crate::views;
use crate::vm::display;
use crate::vmx::Cpu;
use crate::vmx::exit::NUM_REASONS;

/// Most pages one `LOGDIRTY_FETCH` covers (a 4 KiB bitmap).
const FETCH_MAX: u64 = 32768;
/// Most pages one `LOGDIRTY_TRACK` covers.
const TRACK_MAX: u64 = 1 << 24;

pub fn exit_counts<C: Cpu, P: Platform>(ctx: &mut ExitCtx<'_, C, P>, a: &Args) -> Result<i64, i64> {
    let count = ctx
        .vm
        .counters
        .len()
        .min(usize::try_from(a.get(1)).unwrap_or(usize::MAX));
    let mut bytes = [0u8; NUM_REASONS * 8];
    for (i, counter) in ctx.vm.counters[..count].iter().enumerate() {
        bytes[i * 8..i * 8 + 8].copy_from_slice(&counter.to_le_bytes());
    }
    ctx.vm
        .write(ctx.platform, a.get(0), &bytes[..count * 8])
        .map_err(|_| error::EFAULT)?;
    Ok(count as i64)
}

/// `[first, first + pages)` as an inclusive gfn range, if `pages` is in `1..=max`.
fn range(first: u64, pages: u64, max: u64) -> Result<(Gfn, Gfn), i64> {
    if pages == 0 || pages > max {
        return Err(error::EINVAL);
    }
    let last = first.checked_add(pages - 1).ok_or(error::EINVAL)?;
    Ok((Gfn(first), Gfn(last)))
}

pub fn logdirty_track<C: Cpu, P: Platform>(
    ctx: &mut ExitCtx<'_, C, P>,
    a: &Args,
) -> Result<i64, i64> {
    let (first, last) = range(a.get(0), a.get(1), TRACK_MAX)?;
    let g = &mut *ctx.vm;
    g.altp2m
        .host_change_type_range(
            ctx.platform,
            &mut g.p2m,
            first,
            last,
            P2mType::RamRw,
            P2mType::RamLogdirty,
        )
        .map(|()| 0)
        .map_err(errno)
}

pub fn logdirty_fetch<C: Cpu, P: Platform>(
    ctx: &mut ExitCtx<'_, C, P>,
    a: &Args,
) -> Result<i64, i64> {
    let (first, last) = range(a.get(0), a.get(1), FETCH_MAX)?;
    let bytes = a.get(1).div_ceil(8) as usize;
    let at = a.get(2);
    let mut bitmap = [0u8; (FETCH_MAX / 8) as usize];
    let g = &mut *ctx.vm;
    // Check the buffer before clearing anything, so no dirty bit is lost.
    g.write(ctx.platform, at, &bitmap[..bytes])
        .map_err(|_| error::EFAULT)?;
    let mut dirty = 0;
    let armed = g
        .altp2m
        .arm_dirty(ctx.platform, &mut g.p2m, &mut g.dirty, first, last)
        .map_err(errno)?;
    crate::views::flush(g, ctx.cpu, ctx.platform, ctx.vcpu.id.index());
    g.altp2m
        .fetch_dirty(&mut g.dirty, &armed, |gfn| {
            let i = (gfn.0 - first.0) as usize;
            bitmap[i / 8] |= 1 << (i % 8);
            dirty += 1;
        })
        .map_err(errno)?;
    g.write(ctx.platform, at, &bitmap[..bytes])
        .map_err(|_| error::EFAULT)?;
    Ok(dirty)
}

pub fn balloon_release<C: Cpu, P: Platform>(
    ctx: &mut ExitCtx<'_, C, P>,
    a: &Args,
) -> Result<i64, i64> {
    let gfn = Gfn(a.get(0));
    let g = &mut *ctx.vm;
    if g.display
        .as_ref()
        .is_some_and(|d| (d.first.0..d.first.0 + d.pages).contains(&gfn.0))
    {
        return Err(error::EBUSY);
    }
    // The CPU must never write #VE information into a frame the guest gave
    // up: notification goes off first, and comes back if the release fails.
    let ve_page = ctx.vcpu.ve_page;
    if ve_page.is_some_and(|(page, _)| page == gfn) {
        ctx.vcpu.ve_page = None;
        views::apply(ctx.cpu, g, ctx.vcpu);
    }
    if let Err(e) = g.release_page(ctx.platform, ctx.cpu, ctx.vcpu.id.index(), gfn) {
        ctx.vcpu.ve_page = ve_page;
        views::apply(ctx.cpu, g, ctx.vcpu);
        return Err(errno(e));
    }
    Ok(0)
}

pub fn display_set<C: Cpu, P: Platform>(ctx: &mut ExitCtx<'_, C, P>, a: &Args) -> Result<i64, i64> {
    display::set(ctx.vm, ctx.platform, Gfn(a.get(0)), a.get(1))?;
    // The tick follows at once: the display's rate, or the watchdog's again.
    ctx.cpu.write(
        x86::vmx::vmcs::guest::VMX_PREEMPTION_TIMER_VALUE,
        u64::from(ctx.vm.tick_period()),
    );
    Ok(0)
}

pub fn display_refresh<C: Cpu, P: Platform>(ctx: &mut ExitCtx<'_, C, P>) -> Result<i64, i64> {
    if ctx.vm.display.is_none() {
        return Err(error::ENOENT);
    }
    display::refresh(ctx.vm, ctx.cpu, ctx.platform, ctx.vcpu.id.index())
        .map(|n| n as i64)
        .map_err(errno)
}

pub fn display_checksum<C: Cpu, P: Platform>(ctx: &mut ExitCtx<'_, C, P>) -> Result<i64, i64> {
    let display = ctx.vm.display.as_ref().ok_or(error::ENOENT)?;
    Ok(display.checksum(ctx.platform) as i64)
}
