//! hv-core: the VMX layer of the hypervisor. It reads what the CPU's VMX
//! implementation offers, turns VMX on, builds a guest's VM (RAM on the host
//! p2m, views, devices, loaded image) and its vCPUs, and handles their VM
//! exits. Decoding and policy are plain code that builds and tests on the
//! host; the instructions that touch the hardware sit in `vmx::instructions`.
//!
//! Layout: `vmx` (the CPU's VMX and nothing else), `vm` (what the vCPUs of
//! a guest share), `vcpu` (one vCPU), `exits` (one file per exit reason),
//! `hypercall`, `views` (the kernel's side of altp2m), `devices` (what the
//! hypervisor emulates for the guest), `loader` (guest images), `control`
//! (the control channel's server), `operations` (what hypercalls and
//! control commands share).
#![no_std]

extern crate alloc;

pub use hv_abi as abi;
pub mod control;
pub mod devices;
pub mod exits;
pub mod hypercall;
pub mod loader;
pub mod operations;
pub mod platform;
pub mod smp;
#[cfg(test)]
pub(crate) mod testing;
pub mod vcpu;
pub mod views;
pub mod vm;
pub mod vmx;
