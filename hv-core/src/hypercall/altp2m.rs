//! The altp2m hypercalls (Xen's HVMOP_altp2m operations).

use alloc::vec::Vec;

use hv_ept::Gfn;

use super::{Args, abi_access, errno};
use crate::abi::{call, error};
use crate::exits::ExitCtx;
use crate::platform::Platform;
use crate::views;
use crate::vmx::Cpu;

/// Most entries a multi call takes at once.
const MULTI_MAX: u64 = 512;

pub fn call<C: Cpu, P: Platform>(
    ctx: &mut ExitCtx<'_, C, P>,
    number: u64,
    a: &Args,
) -> Result<i64, i64> {
    let result = run(ctx, number, a);
    // Whatever changed, the VMCS follows (EPTP, index, VMFUNC, #VE,
    // exceptions), here and on the other vCPUs a switch or a state change
    // reached.
    views::apply(ctx.cpu, ctx.vm, ctx.vcpu);
    if result.is_ok()
        && matches!(
            number,
            call::ALTP2M_SET_STATE | call::ALTP2M_SWITCH_VIEW | call::ALTP2M_SWITCH_VCPU_VIEW
        )
    {
        views::reapply_others(ctx.vm, ctx.platform, ctx.vcpu.id.index());
    }
    result
}

fn run<C: Cpu, P: Platform>(
    ctx: &mut ExitCtx<'_, C, P>,
    number: u64,
    a: &Args,
) -> Result<i64, i64> {
    let g = &mut *ctx.vm;
    let mem = &mut *ctx.platform;
    let alt = &mut g.altp2m;
    let host = &mut g.p2m;
    let done = |r: Result<(), hv_altp2m::Error>| r.map(|()| 0).map_err(errno);
    match number {
        call::ALTP2M_GET_STATE => Ok(i64::from(alt.is_enabled())),
        call::ALTP2M_SET_STATE => match (a.flag(0)?, alt.is_enabled()) {
            (true, true) | (false, false) => Ok(0),
            (true, false) => done(alt.enable(mem, host)),
            (false, true) => {
                views::finish_step(ctx.cpu, g, ctx.vcpu);
                ctx.vcpu.ve_page = None;
                done(g.altp2m.disable(mem))
            }
        },
        call::ALTP2M_VCPU_ENABLE_NOTIFY => {
            if !g.features.ve {
                return Err(error::EOPNOTSUPP);
            }
            let gfn = Gfn(a.get(0));
            let mfn = g.ram_page(mem, gfn).ok_or(error::EINVAL)?;
            // The CPU writes #VE information by physical address, past any
            // view's rights: the page must be one every view lets the guest
            // write itself, not a remap and not a page a monitor protects.
            let writable = |view: usize| {
                g.altp2m
                    .get_entry(mem, &g.p2m, view as u16, gfn)
                    .is_ok_and(|e| {
                        e.is_some_and(|e| {
                            e.remap_source.is_none()
                                && e.access.allowed().contains(hv_ept::Rights::W)
                        })
                    })
            };
            if !g.altp2m.active_views().iter().all(writable) {
                return Err(error::EINVAL);
            }
            ctx.vcpu.ve_page = Some((gfn, mfn));
            Ok(0)
        }
        call::ALTP2M_VCPU_DISABLE_NOTIFY => {
            ctx.vcpu.ve_page = None;
            Ok(0)
        }
        call::ALTP2M_CREATE_VIEW => alt
            .create_view(mem, host, a.access(0)?)
            .map(i64::from)
            .map_err(errno),
        call::ALTP2M_DESTROY_VIEW => {
            done(views::destroy_view(g, mem, ctx.vcpu.id.index(), a.view(0)?))
        }
        call::ALTP2M_SWITCH_VIEW => done(alt.switch_all(a.view(0)?)),
        call::ALTP2M_SWITCH_VCPU_VIEW => {
            let vcpu = usize::try_from(a.get(0)).map_err(|_| error::EINVAL)?;
            done(alt.switch_vcpu(vcpu, a.view(1)?))
        }
        call::ALTP2M_GET_VCPU_VIEW => {
            let vcpu = usize::try_from(a.get(0)).map_err(|_| error::EINVAL)?;
            alt.vcpu_view(vcpu).map(i64::from).map_err(errno)
        }
        call::ALTP2M_SET_MEM_ACCESS => {
            done(alt.set_mem_access(mem, host, a.view(0)?, Gfn(a.get(1)), a.access(2)?))
        }
        call::ALTP2M_SET_MEM_ACCESS_MULTI => {
            let (view, gfns_at, access_at, count) = (a.view(0)?, a.get(1), a.get(2), a.get(3));
            if count == 0 || count > MULTI_MAX {
                return Err(error::EINVAL);
            }
            let mut gfns = [0u8; (MULTI_MAX * 8) as usize];
            let mut accesses = [0u8; MULTI_MAX as usize];
            let n = count as usize;
            g.read(mem, gfns_at, &mut gfns[..n * 8])
                .map_err(|_| error::EFAULT)?;
            g.read(mem, access_at, &mut accesses[..n])
                .map_err(|_| error::EFAULT)?;
            let mut items = Vec::new();
            items.try_reserve_exact(n).map_err(|_| error::ENOMEM)?;
            for i in 0..n {
                let gfn = u64::from_le_bytes(gfns[i * 8..i * 8 + 8].try_into().unwrap_or_default());
                let access = super::p2m_access(u64::from(accesses[i])).ok_or(error::EINVAL)?;
                items.push((Gfn(gfn), access));
            }
            match g.altp2m.set_mem_access_multi(mem, &mut g.p2m, view, &items) {
                Ok(()) => Ok(n as i64),
                Err(e) if e.done > 0 => Ok(e.done as i64),
                Err(e) => Err(errno(e.error)),
            }
        }
        call::ALTP2M_GET_MEM_ACCESS => alt
            .get_mem_access(mem, host, a.view(0)?, Gfn(a.get(1)))
            .map(|x| abi_access(x) as i64)
            .map_err(errno),
        call::ALTP2M_CHANGE_GFN => {
            let new = (a.get(2) != crate::abi::INVALID_GFN).then(|| Gfn(a.get(2)));
            done(alt.change_gfn(mem, host, a.view(0)?, Gfn(a.get(1)), new))
        }
        call::ALTP2M_SET_SUPPRESS_VE => {
            done(alt.set_suppress_ve(mem, host, a.view(0)?, Gfn(a.get(1)), a.flag(2)?))
        }
        call::ALTP2M_SET_SUPPRESS_VE_MULTI => {
            let (view, first, last, sve) = (a.view(0)?, a.get(1), a.get(2), a.flag(3)?);
            if first > last || last - first >= MULTI_MAX {
                return Err(error::EINVAL);
            }
            let mut items = Vec::new();
            items
                .try_reserve_exact((last - first + 1) as usize)
                .map_err(|_| error::ENOMEM)?;
            items.extend((first..=last).map(|gfn| (Gfn(gfn), sve)));
            match alt.set_suppress_ve_multi(mem, host, view, &items) {
                Ok(()) => Ok(items.len() as i64),
                Err(e) if e.done > 0 => Ok(e.done as i64),
                Err(e) => Err(errno(e.error)),
            }
        }
        call::ALTP2M_GET_SUPPRESS_VE => alt
            .get_suppress_ve(mem, host, a.view(0)?, Gfn(a.get(1)))
            .map(i64::from)
            .map_err(errno),
        call::ALTP2M_SET_VISIBILITY => done(alt.set_visibility(mem, host, a.view(0)?, a.flag(1)?)),
        _ => Err(error::ENOSYS),
    }
}
