//! hv-abi: the interface between the hypervisor and its guests: the hypercall ABI,
//! the CPUID leaves the hypervisor answers, and the I/O ports it gives a
//! meaning to. One definition, used by the hypervisor and the test guest.
//!
//! Hypercalls: `VMCALL` with the call number in RAX and arguments in RDI,
//! RSI, RDX, R10 (in that order). The result comes back in RAX: zero or a
//! positive value on success, a negative error code on failure. Only guest
//! kernel code (CPL 0) may call. Guest addresses in arguments are
//! guest-physical. The full list, with arguments, is in `docs/hypercalls.md`.
//!
//! A crate of its own, without dependencies, so guests can use it without
//! pulling in the hypervisor.
#![no_std]

/// First of the hypervisor's CPUID leaves (0x40000000..=0x400000FF).
pub const CPUID_BASE: u32 = 0x4000_0000;
/// Leaf 0x40000001, EAX: interface version.
pub const CPUID_FEATURES: u32 = 0x4000_0001;
/// EBX, ECX, EDX of leaf 0x40000000.
pub const CPUID_SIGNATURE: [u8; 12] = *b"RustAltp2mHV";
/// Interface version reported in leaf 0x40000001 EAX and by [`call::VERSION`].
pub const VERSION: u64 = 1;

/// Writing a byte here ends the run with that byte as its status
/// (QEMU's `isa-debug-exit` convention).
pub const EXIT_PORT: u16 = 0xf4;
/// The guest's serial console (COM1); its lines appear in the run's log.
pub const COM1: u16 = 0x3f8;
/// Emulator debug port: bytes written appear in the guest's console too.
pub const DEBUG_PORT: u16 = 0xe9;

/// Hypercall numbers (RAX).
pub mod call {
    /// Returns [`super::VERSION`].
    pub const VERSION: u64 = 0x00;
    /// Copies the per-reason VM-exit counters (u64 each, indexed by basic
    /// exit reason) to the buffer at RDI (guest-physical), at most RSI
    /// entries. Returns the number of entries written.
    pub const EXIT_COUNTS: u64 = 0x01;
}

/// Negative results in RAX.
pub mod error {
    /// The caller may not make this call (user mode, or the altp2m mode forbids it).
    pub const EPERM: i64 = -1;
    /// No such object (view, mapping).
    pub const ENOENT: i64 = -2;
    /// Out of memory.
    pub const ENOMEM: i64 = -12;
    /// A guest address that is not the guest's RAM.
    pub const EFAULT: i64 = -14;
    /// The object is in use.
    pub const EBUSY: i64 = -16;
    /// A bad argument.
    pub const EINVAL: i64 = -22;
    /// Not supported by this CPU or configuration.
    pub const EOPNOTSUPP: i64 = -95;
    /// No such call.
    pub const ENOSYS: i64 = -38;
}
