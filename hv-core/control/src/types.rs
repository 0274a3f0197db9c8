//! The records messages carry: capabilities, registers, translations,
//! memory ranges, access entries, error codes.

use core::fmt;

use crate::wire::{Item, Malformed, Overflow, Reader, Writer, le};

/// Message ids. Commands and their replies share an id; events have ids of
/// their own (0x80 up), and an answer and its reply carry the event's id.
/// The altp2m and log-dirty ids that mirror a hypercall are that
/// hypercall's number (`hv_abi::call`).
pub mod id {
    pub const HELLO: u16 = 0x01;
    pub const BYE: u16 = 0x02;
    pub const PING: u16 = 0x03;
    pub const CAPABILITIES: u16 = 0x04;
    pub const MEMORY_MAP: u16 = 0x05;
    pub const SET_EVENTS: u16 = 0x06;
    pub const PAUSE: u16 = 0x08;
    pub const RESUME: u16 = 0x09;
    pub const GET_REGISTERS: u16 = 0x0a;
    pub const SET_REGISTERS: u16 = 0x0b;
    pub const TRANSLATE: u16 = 0x0c;
    pub const READ_MEMORY: u16 = 0x0d;
    pub const WRITE_MEMORY: u16 = 0x0e;

    pub const ALTP2M_GET_STATE: u16 = hv_abi::call::ALTP2M_GET_STATE as u16;
    pub const ALTP2M_SET_STATE: u16 = hv_abi::call::ALTP2M_SET_STATE as u16;
    pub const ALTP2M_VCPU_ENABLE_NOTIFY: u16 = hv_abi::call::ALTP2M_VCPU_ENABLE_NOTIFY as u16;
    pub const ALTP2M_VCPU_DISABLE_NOTIFY: u16 = hv_abi::call::ALTP2M_VCPU_DISABLE_NOTIFY as u16;
    pub const ALTP2M_CREATE_VIEW: u16 = hv_abi::call::ALTP2M_CREATE_VIEW as u16;
    pub const ALTP2M_DESTROY_VIEW: u16 = hv_abi::call::ALTP2M_DESTROY_VIEW as u16;
    pub const ALTP2M_SWITCH_VIEW: u16 = hv_abi::call::ALTP2M_SWITCH_VIEW as u16;
    pub const ALTP2M_SWITCH_VCPU_VIEW: u16 = hv_abi::call::ALTP2M_SWITCH_VCPU_VIEW as u16;
    pub const ALTP2M_GET_VCPU_VIEW: u16 = hv_abi::call::ALTP2M_GET_VCPU_VIEW as u16;
    pub const ALTP2M_SET_MEM_ACCESS: u16 = hv_abi::call::ALTP2M_SET_MEM_ACCESS as u16;
    pub const ALTP2M_SET_MEM_ACCESS_MULTI: u16 = hv_abi::call::ALTP2M_SET_MEM_ACCESS_MULTI as u16;
    pub const ALTP2M_GET_MEM_ACCESS: u16 = hv_abi::call::ALTP2M_GET_MEM_ACCESS as u16;
    pub const ALTP2M_CHANGE_GFN: u16 = hv_abi::call::ALTP2M_CHANGE_GFN as u16;
    pub const ALTP2M_SET_SUPPRESS_VE: u16 = hv_abi::call::ALTP2M_SET_SUPPRESS_VE as u16;
    pub const ALTP2M_SET_SUPPRESS_VE_MULTI: u16 = hv_abi::call::ALTP2M_SET_SUPPRESS_VE_MULTI as u16;
    pub const ALTP2M_GET_SUPPRESS_VE: u16 = hv_abi::call::ALTP2M_GET_SUPPRESS_VE as u16;
    pub const ALTP2M_SET_VISIBILITY: u16 = hv_abi::call::ALTP2M_SET_VISIBILITY as u16;

    pub const LOGDIRTY_START: u16 = hv_abi::call::LOGDIRTY_TRACK as u16;
    pub const LOGDIRTY_FETCH: u16 = hv_abi::call::LOGDIRTY_FETCH as u16;
    pub const LOGDIRTY_STOP: u16 = 0x32;

    pub const ALLOC_SHADOW_PAGE: u16 = 0x60;
    pub const FREE_SHADOW_PAGE: u16 = 0x61;

    pub const EVENT_MEM_ACCESS: u16 = 0x80;
    pub const EVENT_BREAKPOINT: u16 = 0x81;
    pub const EVENT_CR3_WRITE: u16 = 0x82;
    pub const EVENT_SINGLE_STEP: u16 = 0x83;
    pub const EVENT_VE: u16 = 0x84;
}

/// `Pause`/`Resume` vCPU meaning every vCPU.
pub const ALL_VCPUS: u16 = 0xffff;
/// The most bytes one `ReadMemory`/`WriteMemory` moves (they stay in one page).
pub const PAGE_SIZE: usize = 4096;
/// The most entries of a `SetMemAccessMulti`, and pages of a `SetSuppressVeMulti`
/// (as the hypercalls).
pub const MAX_MULTI: usize = 512;
/// The most pages one `LogdirtyFetch` covers (its bitmap is one page).
pub const MAX_FETCH_PAGES: u32 = 32768;
/// The most pages one `LogdirtyStart`/`LogdirtyStop` covers (as the hypercall).
pub const MAX_TRACK_PAGES: u32 = 1 << 24;
/// The most ranges of a memory map reply.
pub const MAX_RANGES: usize = 64;

/// Feature bits of [`Capabilities::features`].
pub mod feature {
    /// VMFUNC EPTP switching: guests switch views without exits.
    pub const VMFUNC: u32 = 1 << 0;
    /// EPT-violation #VE.
    pub const VE: u32 = 1 << 1;
    /// The monitor trap flag: single steps without touching RFLAGS.TF
    /// (without it the hypervisor steps with TF and intercepts exceptions).
    pub const MTF: u32 = 1 << 2;
    /// Page-modification logging for log-dirty.
    pub const PML: u32 = 1 << 3;
    /// `AllocShadowPage`/`FreeShadowPage` are supported.
    pub const SHADOW_PAGES: u32 = 1 << 4;
}

/// Event class bits (`SetEvents`, [`Capabilities::events`]). Single-step
/// events have no bit: they come when an answer asks for a step.
pub mod class {
    pub const MEM_ACCESS: u32 = 1 << 0;
    pub const BREAKPOINT: u32 = 1 << 1;
    /// Opt-in and costly: every guest CR3 write exits.
    pub const CR3_WRITE: u32 = 1 << 2;
    /// Informational: a #VE the CPU or hypervisor delivered to the guest.
    pub const VE: u32 = 1 << 4;
    pub const ALL: u32 = MEM_ACCESS | BREAKPOINT | CR3_WRITE | VE;
}

/// What the guest itself may call of the altp2m interface (`altp2m=`).
pub mod mode {
    pub const EXTERNAL: u8 = 0;
    pub const MIXED: u8 = 1;
    pub const LIMITED: u8 = 2;
}

/// A reply's error code (a negative i32 on the wire; 0 is success). The
/// hypercall errors of `hv_abi::error` keep their numbers; protocol errors
/// are -1000 and below.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    /// Not allowed.
    Perm,
    /// No such object (view, mapping, vCPU).
    NoEnt,
    /// The hypervisor is out of memory.
    NoMem,
    /// A guest-physical address that is not the guest's RAM, or a virtual
    /// address the guest's page tables do not map.
    Fault,
    /// The object is in use.
    Busy,
    /// A bad argument.
    Inval,
    /// Not implemented by this hypervisor.
    NoSys,
    /// Not supported by this CPU or configuration.
    NotSupported,
    /// A frame whose payload failed its CRC or does not have its message's shape.
    BadFrame,
    /// A message id (or kind) the receiver does not know.
    UnknownMessage,
    /// Another protocol version.
    BadVersion,
    /// A payload over `MAX_PAYLOAD`.
    TooBig,
    /// The hypervisor cannot take the command now; try again.
    TryAgain,
    /// The vCPU must be paused (or held by an event) for this command.
    NotPaused,
    /// An answer to an event that is not waiting.
    NoSuchEvent,
    /// A command other than `Hello` before `Hello`.
    NoSession,
    /// A code this crate does not know (from a newer peer).
    Other(i32),
}

impl ErrorCode {
    const TABLE: [(ErrorCode, i32); 16] = [
        (Self::Perm, hv_abi::error::EPERM as i32),
        (Self::NoEnt, hv_abi::error::ENOENT as i32),
        (Self::NoMem, hv_abi::error::ENOMEM as i32),
        (Self::Fault, hv_abi::error::EFAULT as i32),
        (Self::Busy, hv_abi::error::EBUSY as i32),
        (Self::Inval, hv_abi::error::EINVAL as i32),
        (Self::NoSys, hv_abi::error::ENOSYS as i32),
        (Self::NotSupported, hv_abi::error::EOPNOTSUPP as i32),
        (Self::BadFrame, -1000),
        (Self::UnknownMessage, -1001),
        (Self::BadVersion, -1002),
        (Self::TooBig, -1003),
        (Self::TryAgain, -1004),
        (Self::NotPaused, -1005),
        (Self::NoSuchEvent, -1006),
        (Self::NoSession, -1007),
    ];

    pub fn code(self) -> i32 {
        match self {
            Self::Other(code) => code,
            known => Self::TABLE
                .iter()
                .find(|(e, _)| *e == known)
                .map(|&(_, code)| code)
                .expect("every named code is in the table"),
        }
    }

    /// The error for a non-zero code (`None` for 0, success).
    pub fn from_code(code: i32) -> Option<Self> {
        if code == 0 {
            return None;
        }
        Some(
            Self::TABLE
                .iter()
                .find(|&&(_, c)| c == code)
                .map_or(Self::Other(code), |&(e, _)| e),
        )
    }

    /// A hypercall result (`hv_abi::error`) as a protocol error.
    pub fn from_hypercall(result: i64) -> Option<Self> {
        (result < 0).then(|| Self::from_code(i32::try_from(result).unwrap_or(i32::MIN)))?
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Perm => "EPERM",
            Self::NoEnt => "ENOENT",
            Self::NoMem => "ENOMEM",
            Self::Fault => "EFAULT",
            Self::Busy => "EBUSY",
            Self::Inval => "EINVAL",
            Self::NoSys => "ENOSYS",
            Self::NotSupported => "EOPNOTSUPP",
            Self::BadFrame => "BAD_FRAME",
            Self::UnknownMessage => "UNKNOWN_MESSAGE",
            Self::BadVersion => "BAD_VERSION",
            Self::TooBig => "TOO_BIG",
            Self::TryAgain => "TRY_AGAIN",
            Self::NotPaused => "NOT_PAUSED",
            Self::NoSuchEvent => "NO_SUCH_EVENT",
            Self::NoSession => "NO_SESSION",
            Self::Other(_) => "unknown error",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.code())
    }
}

/// A wire record with a fixed layout.
pub(crate) trait Record: Sized {
    fn read(r: &mut Reader<'_>) -> Result<Self, Malformed>;
    fn write(&self, w: &mut Writer<'_>) -> Result<(), Overflow>;
}

/// What the hypervisor and its CPU offer (reply to `Capabilities`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// [`feature`] bits.
    pub features: u32,
    /// The [`class`] bits the hypervisor can report.
    pub events: u32,
    pub vcpus: u16,
    /// Views next to view 0 (511 with the full EPTP list).
    pub max_views: u16,
    /// [`mode`]: what the guest itself may call of altp2m.
    pub altp2m_mode: u8,
    /// The hypercall interface version (`hv_abi::VERSION`).
    pub hv_version: u32,
    /// Guest RAM in bytes (the sum of the memory map's ranges).
    pub ram_bytes: u64,
}

impl Record for Capabilities {
    fn read(r: &mut Reader<'_>) -> Result<Self, Malformed> {
        Ok(Self {
            features: r.u32()?,
            events: r.u32()?,
            vcpus: r.u16()?,
            max_views: r.u16()?,
            altp2m_mode: r.u8()?,
            hv_version: r.u32()?,
            ram_bytes: r.u64()?,
        })
    }

    fn write(&self, w: &mut Writer<'_>) -> Result<(), Overflow> {
        w.u32(self.features)?;
        w.u32(self.events)?;
        w.u16(self.vcpus)?;
        w.u16(self.max_views)?;
        w.u8(self.altp2m_mode)?;
        w.u32(self.hv_version)?;
        w.u64(self.ram_bytes)
    }
}

/// A segment register as VMX keeps it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub selector: u16,
    pub base: u64,
    pub limit: u32,
    /// VMX access-rights format (type, S, DPL, P, AVL, L, D/B, G, unusable).
    pub access: u32,
}

/// Indices of [`Registers::gprs`], in the x86 encoding order.
pub mod gpr {
    pub const RAX: usize = 0;
    pub const RCX: usize = 1;
    pub const RDX: usize = 2;
    pub const RBX: usize = 3;
    pub const RSP: usize = 4;
    pub const RBP: usize = 5;
    pub const RSI: usize = 6;
    pub const RDI: usize = 7;
    /// R8..R15 are 8..15.
    pub const R8: usize = 8;
    pub const NAMES: [&str; 16] = [
        "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12",
        "r13", "r14", "r15",
    ];
}

/// Indices of [`Registers::segments`].
pub mod seg {
    pub const ES: usize = 0;
    pub const CS: usize = 1;
    pub const SS: usize = 2;
    pub const DS: usize = 3;
    pub const FS: usize = 4;
    pub const GS: usize = 5;
    pub const NAMES: [&str; 6] = ["es", "cs", "ss", "ds", "fs", "gs"];
}

/// A vCPU's registers (`GetRegisters`, `SetRegisters`). FS and GS bases
/// are `segments[seg::FS].base` and `segments[seg::GS].base`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Registers {
    pub gprs: [u64; 16],
    pub rip: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub dr7: u64,
    pub efer: u64,
    pub kernel_gs_base: u64,
    pub gdtr_base: u64,
    pub gdtr_limit: u16,
    pub idtr_base: u64,
    pub idtr_limit: u16,
    pub segments: [Segment; 6],
}

impl Record for Registers {
    fn read(r: &mut Reader<'_>) -> Result<Self, Malformed> {
        let mut regs = Self::default();
        for g in &mut regs.gprs {
            *g = r.u64()?;
        }
        for v in [
            &mut regs.rip,
            &mut regs.rflags,
            &mut regs.cr0,
            &mut regs.cr2,
            &mut regs.cr3,
            &mut regs.cr4,
            &mut regs.dr7,
            &mut regs.efer,
            &mut regs.kernel_gs_base,
        ] {
            *v = r.u64()?;
        }
        regs.gdtr_base = r.u64()?;
        regs.gdtr_limit = r.u16()?;
        regs.idtr_base = r.u64()?;
        regs.idtr_limit = r.u16()?;
        for s in &mut regs.segments {
            *s = Segment {
                selector: r.u16()?,
                base: r.u64()?,
                limit: r.u32()?,
                access: r.u32()?,
            };
        }
        Ok(regs)
    }

    fn write(&self, w: &mut Writer<'_>) -> Result<(), Overflow> {
        for g in self.gprs {
            w.u64(g)?;
        }
        for v in [
            self.rip,
            self.rflags,
            self.cr0,
            self.cr2,
            self.cr3,
            self.cr4,
            self.dr7,
            self.efer,
            self.kernel_gs_base,
        ] {
            w.u64(v)?;
        }
        w.u64(self.gdtr_base)?;
        w.u16(self.gdtr_limit)?;
        w.u64(self.idtr_base)?;
        w.u16(self.idtr_limit)?;
        for s in &self.segments {
            w.u16(s.selector)?;
            w.u64(s.base)?;
            w.u32(s.limit)?;
            w.u32(s.access)?;
        }
        Ok(())
    }
}

/// The guest's paging mode a translation used.
pub mod paging {
    /// Paging off: the address is physical.
    pub const NONE: u8 = 0;
    pub const BITS32: u8 = 1;
    pub const PAE: u8 = 2;
    pub const LEVEL4: u8 = 3;
    pub const LEVEL5: u8 = 4;
}

/// Permission bits of a [`Translation`] (what every level allows).
pub mod perm {
    pub const WRITE: u8 = 1 << 0;
    pub const USER: u8 = 1 << 1;
    pub const NO_EXECUTE: u8 = 1 << 2;
}

/// A guest-virtual address translated by the guest's page tables.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Translation {
    pub gpa: u64,
    /// log2 of the page's size: 12, 21, 22 or 30.
    pub page_shift: u8,
    /// [`paging`] mode.
    pub paging: u8,
    /// [`perm`] bits.
    pub perms: u8,
}

impl Record for Translation {
    fn read(r: &mut Reader<'_>) -> Result<Self, Malformed> {
        Ok(Self {
            gpa: r.u64()?,
            page_shift: r.u8()?,
            paging: r.u8()?,
            perms: r.u8()?,
        })
    }

    fn write(&self, w: &mut Writer<'_>) -> Result<(), Overflow> {
        w.u64(self.gpa)?;
        w.u8(self.page_shift)?;
        w.u8(self.paging)?;
        w.u8(self.perms)
    }
}

/// A range of guest RAM: `start .. start + len` (bytes, page-aligned).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Range {
    pub start: u64,
    pub len: u64,
}

impl Range {
    /// The last byte (inclusive), as LiME headers want it.
    pub fn last(&self) -> u64 {
        self.start + self.len.saturating_sub(1)
    }
}

impl Item for Range {
    const SIZE: usize = 16;

    fn read(bytes: &[u8]) -> Self {
        Self {
            start: u64::from_le_bytes(le(&bytes[..8])),
            len: u64::from_le_bytes(le(&bytes[8..])),
        }
    }

    fn write(&self, w: &mut Writer<'_>) -> Result<(), Overflow> {
        w.u64(self.start)?;
        w.u64(self.len)
    }
}

/// One page's access for `SetMemAccessMulti`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccessEntry {
    pub gfn: u64,
    /// `hv_abi::access` value.
    pub access: u8,
}

impl Item for AccessEntry {
    const SIZE: usize = 9;

    fn read(bytes: &[u8]) -> Self {
        Self {
            gfn: u64::from_le_bytes(le(&bytes[..8])),
            access: bytes[8],
        }
    }

    fn write(&self, w: &mut Writer<'_>) -> Result<(), Overflow> {
        w.u64(self.gfn)?;
        w.u8(self.access)
    }
}
