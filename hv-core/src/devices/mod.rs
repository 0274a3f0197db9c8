//! What the hypervisor emulates, virtualizes or filters for a guest.

pub mod uart;
