//! The altp2m hypercalls (Xen's HVMOP_altp2m operations): arguments from
//! the guest's registers and buffers, the work in `operations`.

use alloc::vec::Vec;

use hv_ept::Gfn;

use super::Args;
use crate::abi::{call, error};
use crate::exits::ExitCtx;
use crate::operations::{self, Altp2mOp, MULTI_MAX, p2m_access};
use crate::platform::Platform;
use crate::views;
use crate::vmx::Cpu;

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
    let vcpu = |i: usize| usize::try_from(a.get(i)).map_err(|_| error::EINVAL);
    // Held until the call is done: the multi call's entries.
    let mut items = Vec::new();
    let op = match number {
        call::ALTP2M_GET_STATE => Altp2mOp::GetState,
        call::ALTP2M_SET_STATE => {
            let on = a.flag(0)?;
            if !on && ctx.vm.altp2m.is_enabled() {
                views::finish_step(ctx.cpu, ctx.vm, ctx.vcpu);
                ctx.vcpu.ve_page = None;
            }
            Altp2mOp::SetState(on)
        }
        call::ALTP2M_VCPU_ENABLE_NOTIFY => {
            let gfn = Gfn(a.get(0));
            let mfn = operations::notify_page(ctx.vm, ctx.platform, gfn)?;
            ctx.vcpu.ve_page = Some((gfn, mfn));
            return Ok(0);
        }
        call::ALTP2M_VCPU_DISABLE_NOTIFY => {
            operations::notify_supported(ctx.vm)?;
            ctx.vcpu.ve_page = None;
            return Ok(0);
        }
        call::ALTP2M_CREATE_VIEW => Altp2mOp::CreateView(a.access(0)?),
        call::ALTP2M_DESTROY_VIEW => Altp2mOp::DestroyView(a.view(0)?),
        call::ALTP2M_SWITCH_VIEW => Altp2mOp::SwitchView(a.view(0)?),
        call::ALTP2M_SWITCH_VCPU_VIEW => Altp2mOp::SwitchVcpuView {
            vcpu: vcpu(0)?,
            view: a.view(1)?,
        },
        call::ALTP2M_GET_VCPU_VIEW => Altp2mOp::GetVcpuView(vcpu(0)?),
        call::ALTP2M_SET_MEM_ACCESS => Altp2mOp::SetMemAccess {
            view: a.view(0)?,
            gfn: Gfn(a.get(1)),
            access: a.access(2)?,
        },
        call::ALTP2M_SET_MEM_ACCESS_MULTI => {
            let (view, gfns_at, access_at, count) = (a.view(0)?, a.get(1), a.get(2), a.get(3));
            if count == 0 || count > MULTI_MAX {
                return Err(error::EINVAL);
            }
            let mut gfns = [0u8; (MULTI_MAX * 8) as usize];
            let mut accesses = [0u8; MULTI_MAX as usize];
            let n = count as usize;
            let g = &*ctx.vm;
            g.read(ctx.platform, gfns_at, &mut gfns[..n * 8])
                .map_err(|_| error::EFAULT)?;
            g.read(ctx.platform, access_at, &mut accesses[..n])
                .map_err(|_| error::EFAULT)?;
            items.try_reserve_exact(n).map_err(|_| error::ENOMEM)?;
            for (gfn, &access) in gfns.chunks_exact(8).zip(&accesses[..n]) {
                let gfn = u64::from_le_bytes(gfn.try_into().unwrap_or_default());
                let access = p2m_access(u64::from(access)).ok_or(error::EINVAL)?;
                items.push((Gfn(gfn), access));
            }
            Altp2mOp::SetMemAccessMulti {
                view,
                items: &items,
            }
        }
        call::ALTP2M_GET_MEM_ACCESS => Altp2mOp::GetMemAccess {
            view: a.view(0)?,
            gfn: Gfn(a.get(1)),
        },
        call::ALTP2M_CHANGE_GFN => Altp2mOp::ChangeGfn {
            view: a.view(0)?,
            old: Gfn(a.get(1)),
            new: (a.get(2) != crate::abi::INVALID_GFN).then(|| Gfn(a.get(2))),
        },
        call::ALTP2M_SET_SUPPRESS_VE => Altp2mOp::SetSuppressVe {
            view: a.view(0)?,
            gfn: Gfn(a.get(1)),
            suppress: a.flag(2)?,
        },
        call::ALTP2M_SET_SUPPRESS_VE_MULTI => Altp2mOp::SetSuppressVeMulti {
            view: a.view(0)?,
            first: a.get(1),
            last: a.get(2),
            suppress: a.flag(3)?,
        },
        call::ALTP2M_GET_SUPPRESS_VE => Altp2mOp::GetSuppressVe {
            view: a.view(0)?,
            gfn: Gfn(a.get(1)),
        },
        call::ALTP2M_SET_VISIBILITY => Altp2mOp::SetVisibility {
            view: a.view(0)?,
            visible: a.flag(1)?,
        },
        _ => return Err(error::ENOSYS),
    };
    operations::altp2m(ctx.vm, ctx.platform, ctx.vcpu.id.index(), op)
}
