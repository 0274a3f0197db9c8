//! Page-modification logging, a vCPU's side (SDM Vol. 3C "Page-Modification
//! Logging"): with EPT A/D flags on, the CPU logs the guest-physical address
//! of every write that sets the dirty flag of an EPT leaf into this vCPU's
//! buffer (one frame of 512 addresses, filled from index 511 down), without
//! a VM exit; a full buffer exits (page-modification log full).
//!
//! The hypervisor drains the buffer into the guest's dirty log at the start
//! of every exit, before anything else can change the p2ms: altp2m then
//! asks each p2m holding a logged gfn whether its leaf has the dirty flag,
//! which says which view the write went through even when the guest
//! switched views with VMFUNC since (`Altp2m::pml_logged`). A buffer
//! drained late (another vCPU's, on SMP) loses nothing either: the address
//! then counts for every gfn it may stand for.

use hv_ept::Mfn;
use hv_ept::walk::PML_ENTRIES;
use x86::vmx::vmcs::{control, guest};

use crate::exits::{ExitCtx, Flow, StopReason};
use crate::platform::Platform;
use crate::vcpu::events::reinject_vectoring;
use crate::vm::{GuestError, Vm, VmError};
use crate::vmx::Cpu;
use crate::vmx::vmcs::Vmcs;

/// The PML index of an empty buffer.
const EMPTY: u64 = PML_ENTRIES as u64 - 1;

/// A vCPU's PML buffer: a frame while the guest has PML.
pub struct PmlBuffer(Option<Mfn>);

impl PmlBuffer {
    /// The buffer for a vCPU of `vm`: a frame if the guest logs with PML.
    pub fn new(vm: &Vm, platform: &mut impl Platform) -> Result<Self, VmError> {
        if !vm.features.pml {
            return Ok(Self(None));
        }
        let frame = platform
            .alloc_frames(1, 1)
            .ok_or(VmError::Guest(GuestError::NoMemory))?;
        platform.zero_frame(frame);
        Ok(Self(Some(frame)))
    }

    pub fn frame(&self) -> Option<Mfn> {
        self.0
    }

    /// Points the VMCS at the buffer, empty. The "enable PML" control is
    /// in the VM's secondary controls.
    pub fn write_vmcs(&self, vmcs: &mut impl Vmcs) {
        if let Some(frame) = self.0 {
            vmcs.write(control::PML_ADDR_FULL, frame.hpa());
            vmcs.write(guest::PML_INDEX, EMPTY);
        }
    }

    /// Frees the frame; the VMCS that pointed at it is no longer used.
    pub fn destroy(self, platform: &mut impl Platform) {
        if let Some(frame) = self.0 {
            platform.free_frames(frame, 1);
        }
    }
}

/// Hands every address the CPU logged since the last exit to altp2m and
/// empties the buffer. First thing on every exit. Fails only when the dirty
/// log cannot grow: the entries not handed over yet stay in the buffer.
pub fn drain<C: Cpu, P: Platform>(ctx: &mut ExitCtx<'_, C, P>) -> Result<(), hv_altp2m::Error> {
    let Some(frame) = ctx.vcpu.pml.frame() else {
        return Ok(());
    };
    let index = ctx.cpu.read(guest::PML_INDEX);
    // The CPU counts down from 511 and wraps to 0xffff once entry 0 is
    // written: beyond 511 the buffer is full (whatever the value).
    let first = if index <= EMPTY { index + 1 } else { 0 };
    let g = &mut *ctx.vm;
    for i in first..=EMPTY {
        let gpa = ctx.platform.read_entry(frame, i as usize);
        match g.altp2m.pml_logged(ctx.platform, &g.p2m, &mut g.dirty, gpa) {
            Ok(()) => {}
            // Not an address the guest can have: the CPU never logs one.
            Err(hv_altp2m::Error::GfnOutOfRange) => {
                log::warn!("pml: entry {i} holds {gpa:#x}, not a guest-physical address");
            }
            Err(e) => {
                // Entries i..=511 are still to hand over.
                ctx.cpu.write(guest::PML_INDEX, i.wrapping_sub(1) & 0xffff);
                return Err(e);
            }
        }
    }
    ctx.cpu.write(guest::PML_INDEX, EMPTY);
    Ok(())
}

/// The exit's first step: the buffer drained, or the guest stopped (out of
/// memory for the dirty log; a write must not go unlogged).
pub fn drain_or_stop<C: Cpu, P: Platform>(ctx: &mut ExitCtx<'_, C, P>) -> Option<Flow> {
    match drain(ctx) {
        Ok(()) => None,
        Err(_) => Some(ctx.stop(StopReason::Internal(
            "out of memory for the dirty log of logged writes",
        ))),
    }
}

/// A page-modification log-full exit: the buffer was drained on the way in,
/// and the write that found it full runs again on resume. An event whose
/// delivery made the write is delivered again.
pub fn full<C: Cpu, P: Platform>(ctx: &mut ExitCtx<'_, C, P>) -> Flow {
    reinject_vectoring(ctx.cpu, &mut ctx.vcpu.pending);
    Flow::Resume
}
