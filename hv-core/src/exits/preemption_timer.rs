//! The VMX-preemption timer: the hypervisor's own tick while a guest runs
//! (the guest's timers never exit). Each tick refreshes the display model,
//! if there is one, and is the watchdog: a vCPU found halted with
//! interrupts off and nothing owed to it on two ticks in a row can never
//! wake (with NMI exiting, only the hypervisor could give it an NMI), so
//! the guest is stopped once every vCPU is (or waits for a SIPI). The timer value is saved on exit, so it is rearmed
//! here.

use x86::vmx::vmcs::guest;

use super::{ExitCtx, Flow, StopReason};
use crate::platform::Platform;
use crate::vcpu::state::HLT;
use crate::views;
use crate::vm::{BootViews, display};
use crate::vmx::Cpu;

const RFLAGS_IF: u64 = 1 << 9;
/// Ticks in a row a vCPU may be seen halted for good before it is stopped.
const HALTED_TICKS: u8 = 2;

pub fn handle<C: Cpu, P: Platform>(ctx: &mut ExitCtx<'_, C, P>) -> Flow {
    ctx.cpu.write(
        guest::VMX_PREEMPTION_TIMER_VALUE,
        u64::from(ctx.vm.tick_period()),
    );
    let halted_for_good = ctx.cpu.read(guest::ACTIVITY_STATE) == HLT
        && ctx.cpu.read(guest::RFLAGS) & RFLAGS_IF == 0
        && ctx.vcpu.pending == Default::default();
    ctx.vcpu.halted_ticks = if halted_for_good {
        ctx.vcpu.halted_ticks.saturating_add(1)
    } else {
        0
    };
    // One vCPU halted for good may be a CPU the guest took offline; the
    // guest is dead only when every vCPU is (or is parked in wait-for-SIPI).
    let id = ctx.vcpu.id.index();
    let bit = 1u32 << id;
    if ctx.vcpu.halted_ticks >= HALTED_TICKS {
        ctx.vm.halted |= bit;
    } else {
        ctx.vm.halted &= !bit;
    }
    let vm = &*ctx.vm;
    let dead = (0..vm.vcpus()).all(|v| vm.halted & 1 << v != 0 || vm.coherence.parked(v));
    if dead {
        return ctx.stop(StopReason::Halted);
    }
    // Not in the middle of a single step in view 0: it returns to its view.
    if ctx.vm.boot_views == BootViews::Switching && ctx.vcpu.step.is_none() {
        ctx.vm.switch_boot_view(ctx.vcpu.id.index());
        views::apply(ctx.cpu, ctx.vm, ctx.vcpu);
    }
    if ctx
        .vm
        .logdirty_tick(ctx.cpu, ctx.platform, ctx.vcpu.id.index())
        .is_err()
    {
        return ctx.stop(StopReason::Internal(
            "out of memory fetching the dirty pages",
        ));
    }
    if ctx.vm.display.is_none() {
        return Flow::Resume;
    }
    match display::refresh(ctx.vm, ctx.cpu, ctx.platform, ctx.vcpu.id.index()) {
        Ok(_) => Flow::Resume,
        Err(_) => ctx.stop(StopReason::Internal("out of memory refreshing the display")),
    }
}
