//! Control-register accesses: guest MOV to CR0/CR4 (and LMSW/CLTS) that touch
//! bits the hypervisor owns. Qualification layout: SDM Vol. 3C table
//! "Exit Qualification for Control-Register Accesses".

use super::{ExitCtx, Flow, StopReason};
use crate::cr::{self, Refused};
use crate::platform::Platform;
use crate::vcpu::advance_rip;
use crate::vmcs::Vmcs;

const MOV_TO_CR: u64 = 0;
const CLTS: u64 = 2;
const LMSW: u64 = 3;
const CR0_TS: u64 = 1 << 3;

pub fn handle<V: Vmcs, P: Platform>(ctx: &mut ExitCtx<'_, V, P>) -> Flow {
    let q = ctx.qualification();
    let (number, access, register) = (q & 0xf, (q >> 4) & 3, ((q >> 8) & 0xf) as u8);
    let fixed = ctx.guest.cr_fixed;
    let result = match (access, number) {
        (MOV_TO_CR, 0) => cr::mov_to_cr0(ctx.vmcs, &fixed, ctx.regs.get(register, &*ctx.vmcs)),
        (MOV_TO_CR, 4) => cr::mov_to_cr4(ctx.vmcs, &fixed, ctx.regs.get(register, &*ctx.vmcs)),
        (CLTS, _) => cr::mov_to_cr0(ctx.vmcs, &fixed, cr::guest_cr0(&*ctx.vmcs) & !CR0_TS),
        (LMSW, _) => {
            // LMSW loads CR0[3:0] but can set PE, never clear it.
            let source = (q >> 16) & 0xf;
            let old = cr::guest_cr0(&*ctx.vmcs);
            cr::mov_to_cr0(
                ctx.vmcs,
                &fixed,
                old & !0xe | source & 0xf | old & cr::CR0_PE,
            )
        }
        _ => {
            return ctx.stop(StopReason::Unsupported(
                "a control-register access the hypervisor does not intercept",
            ));
        }
    };
    match result {
        Ok(()) => {
            advance_rip(ctx.vmcs);
            Flow::Resume
        }
        Err(Refused::Vmx) => {
            log::debug!("guest: CR4.VMXE refused (no nested VMX)");
            ctx.general_protection()
        }
        Err(_) => ctx.general_protection(),
    }
}
