//! The altp2m and log-dirty operations that a guest's hypercalls and a
//! tool's control commands share: one implementation, two front ends. The
//! hypercall decodes registers and guest buffers (`hypercall`), the control
//! server its frames (`control`); both then call here, get the same checks
//! and the same `hv_abi::error` codes, and make the VMCS follow their own
//! way (the hypercall on its own vCPU, the server through a reapply on
//! every vCPU).

use alloc::vec::Vec;

use hv_ept::{Gfn, Mfn, P2mAccess, P2mType, Rights};

use crate::abi::{access, error};
use crate::platform::Platform;
use crate::views;
use crate::vm::Vm;
use crate::vmx::Cpu;

/// Most entries a multi operation takes at once.
pub const MULTI_MAX: u64 = 512;
/// Most pages one log-dirty fetch covers (a 4 KiB bitmap).
pub const FETCH_MAX: u64 = 32768;
/// Most pages one log-dirty start or stop covers.
pub const TRACK_MAX: u64 = 1 << 24;

/// An altp2m operation (Xen's HVMOP_altp2m), arguments decoded.
#[derive(Clone, Copy, Debug)]
pub enum Altp2mOp<'a> {
    GetState,
    SetState(bool),
    CreateView(P2mAccess),
    DestroyView(u16),
    SwitchView(u16),
    SwitchVcpuView {
        vcpu: usize,
        view: u16,
    },
    GetVcpuView(usize),
    SetMemAccess {
        view: u16,
        gfn: Gfn,
        access: P2mAccess,
    },
    SetMemAccessMulti {
        view: u16,
        items: &'a [(Gfn, P2mAccess)],
    },
    GetMemAccess {
        view: u16,
        gfn: Gfn,
    },
    /// `new: None` reverts the remap.
    ChangeGfn {
        view: u16,
        old: Gfn,
        new: Option<Gfn>,
    },
    SetSuppressVe {
        view: u16,
        gfn: Gfn,
        suppress: bool,
    },
    /// `first..=last`, at most [`MULTI_MAX`] pages.
    SetSuppressVeMulti {
        view: u16,
        first: u64,
        last: u64,
        suppress: bool,
    },
    GetSuppressVe {
        view: u16,
        gfn: Gfn,
    },
    SetVisibility {
        view: u16,
        visible: bool,
    },
}

impl Altp2mOp<'_> {
    /// Whether a success changes which view some vCPU runs on or whether
    /// altp2m is on: every vCPU's VMCS must follow.
    pub fn moves_vcpus(&self) -> bool {
        matches!(
            self,
            Self::SetState(_) | Self::SwitchView(_) | Self::SwitchVcpuView { .. }
        )
    }
}

/// An `hv_abi::access` value as a p2m access.
pub fn p2m_access(value: u64) -> Option<P2mAccess> {
    Some(match value {
        access::N => P2mAccess::N,
        access::R => P2mAccess::R,
        access::W => P2mAccess::W,
        access::RW => P2mAccess::Rw,
        access::X => P2mAccess::X,
        access::RX => P2mAccess::Rx,
        access::WX => P2mAccess::Wx,
        access::RWX => P2mAccess::Rwx,
        access::RX2RW => P2mAccess::Rx2rw,
        access::N2RWX => P2mAccess::N2rwx,
        _ => return None,
    })
}

/// A p2m access as its `hv_abi::access` value.
pub fn abi_access(value: P2mAccess) -> u64 {
    match value {
        P2mAccess::N => access::N,
        P2mAccess::R => access::R,
        P2mAccess::W => access::W,
        P2mAccess::Rw => access::RW,
        P2mAccess::X => access::X,
        P2mAccess::Rx => access::RX,
        P2mAccess::Wx => access::WX,
        P2mAccess::Rwx => access::RWX,
        P2mAccess::Rx2rw => access::RX2RW,
        P2mAccess::N2rwx => access::N2RWX,
    }
}

/// The hypercall error for an altp2m refusal.
pub fn errno(e: hv_altp2m::Error) -> i64 {
    match e {
        hv_altp2m::Error::NoMemory => error::ENOMEM,
        hv_altp2m::Error::NotMapped => error::ENOENT,
        hv_altp2m::Error::Busy => error::EBUSY,
        _ => error::EINVAL,
    }
}

/// Runs `op` for vCPU `caller` (the one whose exit or server loop runs it).
/// Multi operations return how many entries were applied before the first
/// failure, or that failure if it was the first.
pub fn altp2m(
    vm: &mut Vm,
    platform: &mut impl Platform,
    caller: usize,
    op: Altp2mOp<'_>,
) -> Result<i64, i64> {
    let alt = &mut vm.altp2m;
    let host = &mut vm.p2m;
    let done = |r: Result<(), hv_altp2m::Error>| r.map(|()| 0).map_err(errno);
    match op {
        Altp2mOp::GetState => Ok(i64::from(alt.is_enabled())),
        Altp2mOp::SetState(on) => match (on, alt.is_enabled()) {
            (true, true) | (false, false) => Ok(0),
            (true, false) => done(alt.enable(platform, host)),
            (false, true) => done(alt.disable(platform)),
        },
        Altp2mOp::CreateView(access) => alt
            .create_view(platform, host, access)
            .map(i64::from)
            .map_err(errno),
        Altp2mOp::DestroyView(view) => done(views::destroy_view(vm, platform, caller, view)),
        Altp2mOp::SwitchView(view) => done(alt.switch_all(view)),
        Altp2mOp::SwitchVcpuView { vcpu, view } => done(alt.switch_vcpu(vcpu, view)),
        Altp2mOp::GetVcpuView(vcpu) => alt.vcpu_view(vcpu).map(i64::from).map_err(errno),
        Altp2mOp::SetMemAccess { view, gfn, access } => {
            done(alt.set_mem_access(platform, host, view, gfn, access))
        }
        Altp2mOp::SetMemAccessMulti { view, items } => {
            if items.is_empty() || items.len() as u64 > MULTI_MAX {
                return Err(error::EINVAL);
            }
            match alt.set_mem_access_multi(platform, host, view, items) {
                Ok(()) => Ok(items.len() as i64),
                Err(e) if e.done > 0 => Ok(e.done as i64),
                Err(e) => Err(errno(e.error)),
            }
        }
        Altp2mOp::GetMemAccess { view, gfn } => alt
            .get_mem_access(platform, host, view, gfn)
            .map(|a| abi_access(a) as i64)
            .map_err(errno),
        Altp2mOp::ChangeGfn { view, old, new } => {
            done(alt.change_gfn(platform, host, view, old, new))
        }
        Altp2mOp::SetSuppressVe {
            view,
            gfn,
            suppress,
        } => done(alt.set_suppress_ve(platform, host, view, gfn, suppress)),
        Altp2mOp::SetSuppressVeMulti {
            view,
            first,
            last,
            suppress,
        } => {
            if first > last || last - first >= MULTI_MAX {
                return Err(error::EINVAL);
            }
            let mut items = Vec::new();
            items
                .try_reserve_exact((last - first + 1) as usize)
                .map_err(|_| error::ENOMEM)?;
            items.extend((first..=last).map(|gfn| (Gfn(gfn), suppress)));
            match alt.set_suppress_ve_multi(platform, host, view, &items) {
                Ok(()) => Ok(items.len() as i64),
                Err(e) if e.done > 0 => Ok(e.done as i64),
                Err(e) => Err(errno(e.error)),
            }
        }
        Altp2mOp::GetSuppressVe { view, gfn } => alt
            .get_suppress_ve(platform, host, view, gfn)
            .map(i64::from)
            .map_err(errno),
        Altp2mOp::SetVisibility { view, visible } => {
            done(alt.set_visibility(platform, host, view, visible))
        }
    }
}

/// Both notify calls need EPT-violation #VE: without it they answer
/// `EOPNOTSUPP` (as Xen's do), so a guest cannot believe it is notified.
pub fn notify_supported(vm: &Vm) -> Result<(), i64> {
    if vm.features.ve {
        Ok(())
    } else {
        Err(error::EOPNOTSUPP)
    }
}

/// The frame of a #VE information page at `gfn`, if it may be one. The CPU
/// writes #VE information by physical address, past any view's rights: the
/// page must be guest RAM that every view lets the guest write itself, not
/// a remap and not a page a monitor protects.
pub fn notify_page(vm: &Vm, platform: &impl Platform, gfn: Gfn) -> Result<Mfn, i64> {
    notify_supported(vm)?;
    let mfn = vm.ram_page(platform, gfn).ok_or(error::EINVAL)?;
    let writable = |view: usize| {
        vm.altp2m
            .get_entry(platform, &vm.p2m, view as u16, gfn)
            .is_ok_and(|e| {
                e.is_some_and(|e| {
                    e.remap_source.is_none() && e.access.allowed().contains(Rights::W)
                })
            })
    };
    if vm.altp2m.active_views().iter().all(writable) {
        Ok(mfn)
    } else {
        Err(error::EINVAL)
    }
}

/// `[first, first + pages)` as an inclusive gfn range, if `pages` is in `1..=max`.
pub fn gfn_range(first: u64, pages: u64, max: u64) -> Result<(Gfn, Gfn), i64> {
    if pages == 0 || pages > max {
        return Err(error::EINVAL);
    }
    let last = first.checked_add(pages - 1).ok_or(error::EINVAL)?;
    Ok((Gfn(first), Gfn(last)))
}

/// Starts (`on`) or ends log-dirty tracking of `pages` pages from `first`,
/// in the host and every view.
pub fn logdirty_track(
    vm: &mut Vm,
    platform: &mut impl Platform,
    first: u64,
    pages: u64,
    on: bool,
) -> Result<(), i64> {
    let (first, last) = gfn_range(first, pages, TRACK_MAX)?;
    let (from, to) = if on {
        (P2mType::RamRw, P2mType::RamLogdirty)
    } else {
        (P2mType::RamLogdirty, P2mType::RamRw)
    };
    vm.altp2m
        .host_change_type_range(platform, &mut vm.p2m, first, last, from, to)
        .map_err(errno)
}

/// Fetches and clears the dirty bits of `pages` pages from `first` into
/// `bitmap` (bit i = page first + i; at least `ceil(pages / 8)` bytes,
/// zeroed by the caller), re-arming the tracking; returns how many were
/// dirty. The write protection is back in force on every CPU before the
/// bits are read, so no write is lost between fetches.
pub fn logdirty_fetch(
    vm: &mut Vm,
    cpu: &mut impl Cpu,
    platform: &mut impl Platform,
    caller: usize,
    first: u64,
    pages: u64,
    bitmap: &mut [u8],
) -> Result<u32, i64> {
    let (first, last) = gfn_range(first, pages, FETCH_MAX)?;
    if (bitmap.len() as u64) < pages.div_ceil(8) {
        return Err(error::EINVAL);
    }
    let armed = vm
        .altp2m
        .arm_dirty(platform, &mut vm.p2m, &mut vm.dirty, first, last)
        .map_err(errno)?;
    views::flush(vm, cpu, platform, caller);
    let mut dirty = 0;
    let mut mark = |gfn: Gfn| {
        let i = (gfn.0 - first.0) as usize;
        if bitmap[i / 8] & (1 << (i % 8)) == 0 {
            bitmap[i / 8] |= 1 << (i % 8);
            dirty += 1;
        }
    };
    let display = &mut vm.display;
    vm.altp2m
        .fetch_dirty(&mut vm.dirty, &armed, |gfn| {
            mark(gfn);
            // The display's copy still needs what the guest takes.
            if let Some(display) = display.as_mut() {
                display.guest_took(gfn);
            }
        })
        .map_err(errno)?;
    // And the guest gets what the display's refreshes took.
    if let Some(display) = vm.display.as_mut() {
        display.give_guest(first, last, &mut mark);
    }
    Ok(dirty)
}
