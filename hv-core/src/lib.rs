//! hv-core: the VMX layer of the hypervisor. It reads what the CPU's VMX
//! implementation offers (CPUID and the VMX capability MSRs), turns VMX on,
//! manages VMCSs and handles VM exits. Decoding and policy are plain code that
//! builds and tests on the host; the few instructions that touch the hardware
//! sit in small named functions.
#![no_std]

extern crate alloc;

pub use hv_abi as abi;
pub mod caps;
pub mod cr;
pub mod display;
pub mod exit_reason;
pub mod exits;
pub mod guest;
pub mod guest_paging;
pub mod hypercall;
pub mod loader;
pub mod platform;
pub mod state;
#[cfg(test)]
pub(crate) mod testing;
pub mod vcpu;
pub mod views;
pub mod vm;
pub mod vmcs;
pub mod vmx;
