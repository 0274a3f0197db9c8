//! hv-abi: the interface between the hypervisor and its guests: the hypercall ABI,
//! the CPUID leaves the hypervisor answers, the I/O ports it gives a
//! meaning to, and the choices its command line makes about a guest (altp2m
//! mode, boot views, Linux entry point). One definition, used by the hypervisor and the test guest.
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
/// Leaf 0x40000001, EAX: interface version; EBX: the [`feature`] bits
/// the hypervisor offers this guest.
pub const CPUID_FEATURES: u32 = 0x4000_0001;
/// EBX, ECX, EDX of leaf 0x40000000.
pub const CPUID_SIGNATURE: [u8; 12] = *b"RustAltp2mHV";
/// Interface version reported in leaf 0x40000001 EAX and by [`call::VERSION`].
pub const VERSION: u64 = 1;

/// What the hypervisor offers a guest on this CPU (leaf 0x40000001 EBX),
/// so a guest takes the path that exists. The same bits as the control
/// channel's `CAPABILITIES` features.
pub mod feature {
    /// VMFUNC EPTP switching: views switch without a VM exit. Without it
    /// views switch by hypercall and VMFUNC raises #UD.
    pub const VMFUNC: u32 = 1 << 0;
    /// EPT-violation #VE. Without it the notify calls answer `EOPNOTSUPP`
    /// and every access a view denies exits to the hypervisor.
    pub const VE: u32 = 1 << 1;
    /// The monitor trap flag: the hypervisor's single steps leave RFLAGS.TF alone.
    pub const MTF: u32 = 1 << 2;
    /// Page-modification logging: log-dirty writes cost no exit. Without
    /// it the first write to a tracked page faults.
    pub const PML: u32 = 1 << 3;
}

/// Writing a byte here ends the run with that byte as its status
/// (QEMU's `isa-debug-exit` convention).
pub const EXIT_PORT: u16 = 0xf4;
/// The guest's own serial port (COM1), passed through: its console.
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

    // altp2m, after Xen's HVMOP_altp2m operations. Views are numbered
    // 0..512; view 0 is the host p2m. Accesses are [`super::access`] values.
    /// Returns 1 if altp2m is on for the guest, else 0.
    pub const ALTP2M_GET_STATE: u64 = 0x10;
    /// RDI = 1: turn altp2m on (every vCPU on view 0); 0: off (all views destroyed).
    pub const ALTP2M_SET_STATE: u64 = 0x11;
    /// RDI = gfn of this vCPU's #VE information page (guest RAM).
    pub const ALTP2M_VCPU_ENABLE_NOTIFY: u64 = 0x12;
    pub const ALTP2M_VCPU_DISABLE_NOTIFY: u64 = 0x13;
    /// RDI = default access. Returns the new view's index.
    pub const ALTP2M_CREATE_VIEW: u64 = 0x14;
    /// RDI = view. Refused (EBUSY) while a vCPU runs on it.
    pub const ALTP2M_DESTROY_VIEW: u64 = 0x15;
    /// RDI = view: every vCPU switches to it.
    pub const ALTP2M_SWITCH_VIEW: u64 = 0x16;
    /// RDI = vCPU, RSI = view.
    pub const ALTP2M_SWITCH_VCPU_VIEW: u64 = 0x17;
    /// RDI = vCPU. Returns the view it runs on.
    pub const ALTP2M_GET_VCPU_VIEW: u64 = 0x18;
    /// RDI = view, RSI = gfn, RDX = access.
    pub const ALTP2M_SET_MEM_ACCESS: u64 = 0x19;
    /// RDI = view, RSI = gpa of a u64 gfn array, RDX = gpa of a u8 access
    /// array, R10 = count (at most 512). Returns the number applied before
    /// the first failure.
    pub const ALTP2M_SET_MEM_ACCESS_MULTI: u64 = 0x1a;
    /// RDI = view, RSI = gfn. Returns the access.
    pub const ALTP2M_GET_MEM_ACCESS: u64 = 0x1b;
    /// RDI = view, RSI = old gfn, RDX = new gfn, or [`super::INVALID_GFN`] to revert.
    pub const ALTP2M_CHANGE_GFN: u64 = 0x1c;
    /// RDI = view, RSI = gfn, RDX = 1 to suppress #VE, 0 to allow it.
    pub const ALTP2M_SET_SUPPRESS_VE: u64 = 0x1d;
    /// RDI = view, RSI = first gfn, RDX = last gfn, R10 = 1 suppress / 0 allow.
    pub const ALTP2M_SET_SUPPRESS_VE_MULTI: u64 = 0x1e;
    /// RDI = view, RSI = gfn. Returns 1 if #VE is suppressed.
    pub const ALTP2M_GET_SUPPRESS_VE: u64 = 0x1f;
    /// RDI = view, RSI = 1 visible to VMFUNC, 0 hidden.
    pub const ALTP2M_SET_VISIBILITY: u64 = 0x20;

    /// RDI = first gfn, RSI = number of pages: start log-dirty tracking of
    /// the range (in the host and every view).
    pub const LOGDIRTY_TRACK: u64 = 0x30;
    /// RDI = first gfn, RSI = number of pages (at most 32768), RDX = gpa of a
    /// bitmap (one bit per page): fetch-and-clear the range's dirty bits and
    /// re-arm tracking. Returns the number of dirty pages.
    pub const LOGDIRTY_FETCH: u64 = 0x31;

    /// RDI = gfn: give the page back to the hypervisor (balloon). It is
    /// removed from the host p2m and every view, and its frame freed.
    pub const BALLOON_RELEASE: u64 = 0x40;

    /// RDI = first gfn, RSI = pages (at most 64): the hypervisor tracks this
    /// range as the guest's framebuffer (log-dirty) and keeps a display copy.
    /// RSI = 0 stops tracking.
    pub const DISPLAY_SET: u64 = 0x50;
    /// Copies the framebuffer's dirty pages to the display copy. Returns the
    /// number of pages copied.
    pub const DISPLAY_REFRESH: u64 = 0x51;
    /// Returns the FNV-1a checksum (low 63 bits) of the display copy.
    pub const DISPLAY_CHECKSUM: u64 = 0x52;
}

/// The display checksum (`DISPLAY_CHECKSUM`): FNV-1a over the bytes, low 63
/// bits (so it is a non-negative hypercall result). Guests compute the same
/// over their framebuffer to compare.
pub fn display_checksum(bytes: impl IntoIterator<Item = u8>) -> u64 {
    let hash = bytes.into_iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    hash & (u64::MAX >> 1)
}

/// What the guest itself may call of the altp2m interface (Xen's
/// `altp2m=external|mixed|limited`), set on the hypervisor's command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Altp2mMode {
    /// Only the hypervisor's own policy uses altp2m; guest calls are refused.
    External,
    /// The guest may call everything.
    Mixed,
    /// The guest may only enable and disable #VE notification.
    Limited,
}

impl Altp2mMode {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "external" => Some(Self::External),
            "mixed" => Some(Self::Mixed),
            "limited" => Some(Self::Limited),
            _ => None,
        }
    }

    /// Whether a guest may make hypercall `number` in this mode.
    pub fn guest_may_call(self, number: u64) -> bool {
        let altp2m = (call::ALTP2M_GET_STATE..=call::ALTP2M_SET_VISIBILITY).contains(&number);
        let notify = matches!(
            number,
            call::ALTP2M_VCPU_ENABLE_NOTIFY | call::ALTP2M_VCPU_DISABLE_NOTIFY
        );
        match self {
            Self::Mixed => true,
            Self::External => !altp2m,
            Self::Limited => !altp2m || notify,
        }
    }
}

/// The views a guest runs on from its first instruction: a way to put a
/// real OS on altp2m from power-on, for tests and figures (the seed's
/// "switch to a new view early" case).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BootViews {
    /// The host p2m (view 0), altp2m off.
    #[default]
    Host,
    /// A fresh view (1, empty: every page is copied lazily).
    Fresh,
    /// Two fresh views (1 and 2), the hypervisor switching every vCPU from
    /// one to the other on each tick.
    Switching,
}

impl BootViews {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "host" => Some(Self::Host),
            "fresh" => Some(Self::Fresh),
            "switch" => Some(Self::Switching),
            _ => None,
        }
    }
}

/// Which Linux entry point to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LinuxEntry {
    /// The 64-bit one when the kernel has it (`XLF_KERNEL_64`), else 32-bit.
    #[default]
    Auto,
    /// The 32-bit one (every bzImage has it).
    Force32,
    /// The 64-bit one; a kernel without it is refused.
    Force64,
}

impl LinuxEntry {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "auto" => Some(Self::Auto),
            "32" => Some(Self::Force32),
            "64" => Some(Self::Force64),
            _ => None,
        }
    }
}

/// `ALTP2M_CHANGE_GFN` new gfn that reverts the remap.
pub const INVALID_GFN: u64 = u64::MAX;

/// Access values (Xen's `xenmem_access_t` order).
pub mod access {
    pub const N: u64 = 0;
    pub const R: u64 = 1;
    pub const W: u64 = 2;
    pub const RW: u64 = 3;
    pub const X: u64 = 4;
    pub const RX: u64 = 5;
    pub const WX: u64 = 6;
    pub const RWX: u64 = 7;
    pub const RX2RW: u64 = 8;
    pub const N2RWX: u64 = 9;
}

/// The #VE information area (SDM Vol. 3C "Virtualization-Exception
/// Information"), at the start of the page given by `ALTP2M_VCPU_ENABLE_NOTIFY`.
pub mod ve_info {
    /// u32: the exit reason (48, EPT violation).
    pub const EXIT_REASON: usize = 0;
    /// u32: the CPU sets it to 0xFFFFFFFF when it delivers a #VE and delivers
    /// no other until the guest writes 0 here.
    pub const SEMAPHORE: usize = 4;
    /// u64: the exit qualification.
    pub const QUALIFICATION: usize = 8;
    pub const GUEST_LINEAR_ADDRESS: usize = 16;
    pub const GUEST_PHYSICAL_ADDRESS: usize = 24;
    /// u16: the EPTP index (the view).
    pub const EPTP_INDEX: usize = 32;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_decide_what_the_guest_may_call() {
        assert!(Altp2mMode::Mixed.guest_may_call(call::ALTP2M_CREATE_VIEW));
        assert!(!Altp2mMode::External.guest_may_call(call::ALTP2M_CREATE_VIEW));
        assert!(!Altp2mMode::External.guest_may_call(call::ALTP2M_VCPU_ENABLE_NOTIFY));
        assert!(Altp2mMode::Limited.guest_may_call(call::ALTP2M_VCPU_ENABLE_NOTIFY));
        assert!(!Altp2mMode::Limited.guest_may_call(call::ALTP2M_SWITCH_VIEW));
        // Calls outside altp2m are not the mode's business.
        for mode in [Altp2mMode::External, Altp2mMode::Mixed, Altp2mMode::Limited] {
            assert!(
                mode.guest_may_call(call::VERSION) && mode.guest_may_call(call::LOGDIRTY_TRACK)
            );
        }
    }
}
