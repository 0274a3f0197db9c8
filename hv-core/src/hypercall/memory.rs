//! Hypercalls about the guest's memory: exit counters, log-dirty tracking,
//! the balloon, and the display model.

use hv_ept::Gfn;

use super::Args;
use crate::abi::error;
use crate::exits::ExitCtx;
use crate::operations::{self, FETCH_MAX, errno};
use crate::platform::Platform;
use crate::views;
use crate::vm::display;
use crate::vmx::Cpu;
use crate::vmx::exit::NUM_REASONS;

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

pub fn logdirty_track<C: Cpu, P: Platform>(
    ctx: &mut ExitCtx<'_, C, P>,
    a: &Args,
) -> Result<i64, i64> {
    operations::logdirty_track(ctx.vm, ctx.platform, a.get(0), a.get(1), true).map(|()| 0)
}

pub fn logdirty_fetch<C: Cpu, P: Platform>(
    ctx: &mut ExitCtx<'_, C, P>,
    a: &Args,
) -> Result<i64, i64> {
    let (first, pages, at) = (a.get(0), a.get(1), a.get(2));
    operations::gfn_range(first, pages, FETCH_MAX)?;
    let bytes = pages.div_ceil(8) as usize;
    let mut bitmap = [0u8; (FETCH_MAX / 8) as usize];
    // Check the buffer before clearing anything, so no dirty bit is lost.
    ctx.vm
        .write(ctx.platform, at, &bitmap[..bytes])
        .map_err(|_| error::EFAULT)?;
    let dirty = operations::logdirty_fetch(
        ctx.vm,
        ctx.cpu,
        ctx.platform,
        ctx.vcpu.id.index(),
        first,
        pages,
        &mut bitmap,
    )?;
    ctx.vm
        .write(ctx.platform, at, &bitmap[..bytes])
        .map_err(|_| error::EFAULT)?;
    Ok(i64::from(dirty))
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
