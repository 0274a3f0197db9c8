//! Commands (tool to hypervisor) and the checks their payloads get.

use crate::types::{
    AccessEntry, MAX_FETCH_PAGES, MAX_MULTI, MAX_TRACK_PAGES, PAGE_SIZE, Record, Registers, id,
};
use crate::wire::{List, Malformed, Overflow, Reader, Writer};

/// Why a payload cannot be taken as a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// No message of this kind has this id.
    Unknown,
    /// The payload has the wrong size or a field has a value its type
    /// cannot have (a flag other than 0/1, reserved bits set).
    Malformed,
    /// Well formed, but a count or size is outside the message's bounds.
    Invalid,
}

impl From<Malformed> for DecodeError {
    fn from(_: Malformed) -> Self {
        Self::Malformed
    }
}

impl DecodeError {
    /// The error a reply carries for it.
    pub fn code(self) -> crate::ErrorCode {
        match self {
            Self::Unknown => crate::ErrorCode::UnknownMessage,
            Self::Malformed => crate::ErrorCode::BadFrame,
            Self::Invalid => crate::ErrorCode::Inval,
        }
    }
}

/// A command. Borrowed data (`WriteMemory`'s bytes, `SetMemAccessMulti`'s
/// entries) is read in place from the frame.
#[expect(
    clippy::large_enum_variant,
    reason = "registers travel by value: no allocation on the hypervisor's side"
)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Command<'a> {
    /// Starts a session (ending any earlier one). `liveness_ms`: the session
    /// ends if no frame comes from the tool for that long (0: never).
    Hello {
        version: u16,
        liveness_ms: u32,
    },
    /// Ends the session: held vCPUs are released, events turned off.
    Bye,
    /// Echoed back.
    Ping {
        nonce: u64,
    },
    Capabilities,
    /// The guest's RAM ranges.
    MemoryMap,
    /// Which [`crate::class`] events are reported (the others are handled as
    /// without a tool).
    SetEvents {
        classes: u32,
    },
    /// Pauses a vCPU or every vCPU ([`crate::ALL_VCPUS`]); the reply comes
    /// once they are paused.
    Pause {
        vcpu: u16,
    },
    Resume {
        vcpu: u16,
    },
    GetRegisters {
        vcpu: u16,
    },
    SetRegisters {
        vcpu: u16,
        regs: Registers,
    },
    /// Translates `gva` with the guest's page tables: those of `cr3`, or the
    /// vCPU's current CR3 if `cr3` is 0, in the vCPU's paging mode.
    Translate {
        vcpu: u16,
        cr3: u64,
        gva: u64,
    },
    /// Reads `len` bytes (1..=4096, within one page) of guest-physical memory.
    ReadMemory {
        gpa: u64,
        len: u16,
    },
    /// Writes 1..=4096 bytes within one page of guest-physical memory.
    WriteMemory {
        gpa: u64,
        data: &'a [u8],
    },
    Altp2mGetState,
    Altp2mSetState {
        on: bool,
    },
    VcpuEnableNotify {
        vcpu: u16,
        gfn: u64,
    },
    VcpuDisableNotify {
        vcpu: u16,
    },
    CreateView {
        default_access: u8,
    },
    DestroyView {
        view: u16,
    },
    SwitchView {
        view: u16,
    },
    SwitchVcpuView {
        vcpu: u16,
        view: u16,
    },
    GetVcpuView {
        vcpu: u16,
    },
    SetMemAccess {
        view: u16,
        gfn: u64,
        access: u8,
    },
    /// 1..=512 entries.
    SetMemAccessMulti {
        view: u16,
        entries: List<'a, AccessEntry>,
    },
    GetMemAccess {
        view: u16,
        gfn: u64,
    },
    /// `new_gfn` = `hv_abi::INVALID_GFN` reverts the remap.
    ChangeGfn {
        view: u16,
        old_gfn: u64,
        new_gfn: u64,
    },
    SetSuppressVe {
        view: u16,
        gfn: u64,
        suppress: bool,
    },
    /// `first_gfn..=last_gfn`, at most 512 pages.
    SetSuppressVeMulti {
        view: u16,
        first_gfn: u64,
        last_gfn: u64,
        suppress: bool,
    },
    GetSuppressVe {
        view: u16,
        gfn: u64,
    },
    SetVisibility {
        view: u16,
        visible: bool,
    },
    /// Starts log-dirty tracking of `pages` (1..=2^24) pages.
    LogdirtyStart {
        first_gfn: u64,
        pages: u32,
    },
    /// Fetches and clears the dirty bits of `pages` (1..=32768) pages.
    LogdirtyFetch {
        first_gfn: u64,
        pages: u32,
    },
    LogdirtyStop {
        first_gfn: u64,
        pages: u32,
    },
    /// A page of hypervisor memory mapped at a gfn outside the guest's
    /// memory map (for shadow copies that `ChangeGfn` maps in a view).
    AllocShadowPage,
    FreeShadowPage {
        gfn: u64,
    },
}

impl Command<'_> {
    /// Every command id, in order.
    pub const IDS: [u16; 35] = [
        id::HELLO,
        id::BYE,
        id::PING,
        id::CAPABILITIES,
        id::MEMORY_MAP,
        id::SET_EVENTS,
        id::PAUSE,
        id::RESUME,
        id::GET_REGISTERS,
        id::SET_REGISTERS,
        id::TRANSLATE,
        id::READ_MEMORY,
        id::WRITE_MEMORY,
        id::ALTP2M_GET_STATE,
        id::ALTP2M_SET_STATE,
        id::ALTP2M_VCPU_ENABLE_NOTIFY,
        id::ALTP2M_VCPU_DISABLE_NOTIFY,
        id::ALTP2M_CREATE_VIEW,
        id::ALTP2M_DESTROY_VIEW,
        id::ALTP2M_SWITCH_VIEW,
        id::ALTP2M_SWITCH_VCPU_VIEW,
        id::ALTP2M_GET_VCPU_VIEW,
        id::ALTP2M_SET_MEM_ACCESS,
        id::ALTP2M_SET_MEM_ACCESS_MULTI,
        id::ALTP2M_GET_MEM_ACCESS,
        id::ALTP2M_CHANGE_GFN,
        id::ALTP2M_SET_SUPPRESS_VE,
        id::ALTP2M_SET_SUPPRESS_VE_MULTI,
        id::ALTP2M_GET_SUPPRESS_VE,
        id::ALTP2M_SET_VISIBILITY,
        id::LOGDIRTY_START,
        id::LOGDIRTY_FETCH,
        id::LOGDIRTY_STOP,
        id::ALLOC_SHADOW_PAGE,
        id::FREE_SHADOW_PAGE,
    ];

    pub fn id(&self) -> u16 {
        match self {
            Self::Hello { .. } => id::HELLO,
            Self::Bye => id::BYE,
            Self::Ping { .. } => id::PING,
            Self::Capabilities => id::CAPABILITIES,
            Self::MemoryMap => id::MEMORY_MAP,
            Self::SetEvents { .. } => id::SET_EVENTS,
            Self::Pause { .. } => id::PAUSE,
            Self::Resume { .. } => id::RESUME,
            Self::GetRegisters { .. } => id::GET_REGISTERS,
            Self::SetRegisters { .. } => id::SET_REGISTERS,
            Self::Translate { .. } => id::TRANSLATE,
            Self::ReadMemory { .. } => id::READ_MEMORY,
            Self::WriteMemory { .. } => id::WRITE_MEMORY,
            Self::Altp2mGetState => id::ALTP2M_GET_STATE,
            Self::Altp2mSetState { .. } => id::ALTP2M_SET_STATE,
            Self::VcpuEnableNotify { .. } => id::ALTP2M_VCPU_ENABLE_NOTIFY,
            Self::VcpuDisableNotify { .. } => id::ALTP2M_VCPU_DISABLE_NOTIFY,
            Self::CreateView { .. } => id::ALTP2M_CREATE_VIEW,
            Self::DestroyView { .. } => id::ALTP2M_DESTROY_VIEW,
            Self::SwitchView { .. } => id::ALTP2M_SWITCH_VIEW,
            Self::SwitchVcpuView { .. } => id::ALTP2M_SWITCH_VCPU_VIEW,
            Self::GetVcpuView { .. } => id::ALTP2M_GET_VCPU_VIEW,
            Self::SetMemAccess { .. } => id::ALTP2M_SET_MEM_ACCESS,
            Self::SetMemAccessMulti { .. } => id::ALTP2M_SET_MEM_ACCESS_MULTI,
            Self::GetMemAccess { .. } => id::ALTP2M_GET_MEM_ACCESS,
            Self::ChangeGfn { .. } => id::ALTP2M_CHANGE_GFN,
            Self::SetSuppressVe { .. } => id::ALTP2M_SET_SUPPRESS_VE,
            Self::SetSuppressVeMulti { .. } => id::ALTP2M_SET_SUPPRESS_VE_MULTI,
            Self::GetSuppressVe { .. } => id::ALTP2M_GET_SUPPRESS_VE,
            Self::SetVisibility { .. } => id::ALTP2M_SET_VISIBILITY,
            Self::LogdirtyStart { .. } => id::LOGDIRTY_START,
            Self::LogdirtyFetch { .. } => id::LOGDIRTY_FETCH,
            Self::LogdirtyStop { .. } => id::LOGDIRTY_STOP,
            Self::AllocShadowPage => id::ALLOC_SHADOW_PAGE,
            Self::FreeShadowPage { .. } => id::FREE_SHADOW_PAGE,
        }
    }

    /// Writes the payload.
    pub fn write(&self, w: &mut Writer<'_>) -> Result<(), Overflow> {
        match *self {
            Self::Hello {
                version,
                liveness_ms,
            } => {
                w.u16(version)?;
                w.u32(liveness_ms)
            }
            Self::Bye
            | Self::Capabilities
            | Self::MemoryMap
            | Self::Altp2mGetState
            | Self::AllocShadowPage => Ok(()),
            Self::Ping { nonce } => w.u64(nonce),
            Self::SetEvents { classes } => w.u32(classes),
            Self::Pause { vcpu }
            | Self::Resume { vcpu }
            | Self::GetRegisters { vcpu }
            | Self::VcpuDisableNotify { vcpu }
            | Self::GetVcpuView { vcpu } => w.u16(vcpu),
            Self::SetRegisters { vcpu, ref regs } => {
                w.u16(vcpu)?;
                regs.write(w)
            }
            Self::Translate { vcpu, cr3, gva } => {
                w.u16(vcpu)?;
                w.u64(cr3)?;
                w.u64(gva)
            }
            Self::ReadMemory { gpa, len } => {
                w.u64(gpa)?;
                w.u16(len)
            }
            Self::WriteMemory { gpa, data } => {
                w.u64(gpa)?;
                w.bytes(data)
            }
            Self::Altp2mSetState { on } => w.bool(on),
            Self::VcpuEnableNotify { vcpu, gfn } => {
                w.u16(vcpu)?;
                w.u64(gfn)
            }
            Self::CreateView { default_access } => w.u8(default_access),
            Self::DestroyView { view } | Self::SwitchView { view } => w.u16(view),
            Self::SwitchVcpuView { vcpu, view } => {
                w.u16(vcpu)?;
                w.u16(view)
            }
            Self::SetMemAccess { view, gfn, access } => {
                w.u16(view)?;
                w.u64(gfn)?;
                w.u8(access)
            }
            Self::SetMemAccessMulti { view, ref entries } => {
                w.u16(view)?;
                w.u16(u16::try_from(entries.len()).map_err(|_| Overflow)?)?;
                entries.write(w)
            }
            Self::GetMemAccess { view, gfn } | Self::GetSuppressVe { view, gfn } => {
                w.u16(view)?;
                w.u64(gfn)
            }
            Self::ChangeGfn {
                view,
                old_gfn,
                new_gfn,
            } => {
                w.u16(view)?;
                w.u64(old_gfn)?;
                w.u64(new_gfn)
            }
            Self::SetSuppressVe {
                view,
                gfn,
                suppress,
            } => {
                w.u16(view)?;
                w.u64(gfn)?;
                w.bool(suppress)
            }
            Self::SetSuppressVeMulti {
                view,
                first_gfn,
                last_gfn,
                suppress,
            } => {
                w.u16(view)?;
                w.u64(first_gfn)?;
                w.u64(last_gfn)?;
                w.bool(suppress)
            }
            Self::SetVisibility { view, visible } => {
                w.u16(view)?;
                w.bool(visible)
            }
            Self::LogdirtyStart { first_gfn, pages }
            | Self::LogdirtyFetch { first_gfn, pages }
            | Self::LogdirtyStop { first_gfn, pages } => {
                w.u64(first_gfn)?;
                w.u32(pages)
            }
            Self::FreeShadowPage { gfn } => w.u64(gfn),
        }
    }
}

impl<'a> Command<'a> {
    /// Reads the command `id` from its payload, checking its shape and bounds.
    pub fn decode(id: u16, payload: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(payload);
        let command = match id {
            id::HELLO => Self::Hello {
                version: r.u16()?,
                liveness_ms: r.u32()?,
            },
            id::BYE => Self::Bye,
            id::PING => Self::Ping { nonce: r.u64()? },
            id::CAPABILITIES => Self::Capabilities,
            id::MEMORY_MAP => Self::MemoryMap,
            id::SET_EVENTS => Self::SetEvents { classes: r.u32()? },
            id::PAUSE => Self::Pause { vcpu: r.u16()? },
            id::RESUME => Self::Resume { vcpu: r.u16()? },
            id::GET_REGISTERS => Self::GetRegisters { vcpu: r.u16()? },
            id::SET_REGISTERS => Self::SetRegisters {
                vcpu: r.u16()?,
                regs: Registers::read(&mut r)?,
            },
            id::TRANSLATE => Self::Translate {
                vcpu: r.u16()?,
                cr3: r.u64()?,
                gva: r.u64()?,
            },
            id::READ_MEMORY => {
                let gpa = r.u64()?;
                let len = r.u16()?;
                r.finish()?;
                within_page(gpa, usize::from(len))?;
                return Ok(Self::ReadMemory { gpa, len });
            }
            id::WRITE_MEMORY => {
                let gpa = r.u64()?;
                let data = r.rest();
                within_page(gpa, data.len())?;
                Self::WriteMemory { gpa, data }
            }
            id::ALTP2M_GET_STATE => Self::Altp2mGetState,
            id::ALTP2M_SET_STATE => Self::Altp2mSetState { on: r.bool()? },
            id::ALTP2M_VCPU_ENABLE_NOTIFY => Self::VcpuEnableNotify {
                vcpu: r.u16()?,
                gfn: r.u64()?,
            },
            id::ALTP2M_VCPU_DISABLE_NOTIFY => Self::VcpuDisableNotify { vcpu: r.u16()? },
            id::ALTP2M_CREATE_VIEW => Self::CreateView {
                default_access: r.u8()?,
            },
            id::ALTP2M_DESTROY_VIEW => Self::DestroyView { view: r.u16()? },
            id::ALTP2M_SWITCH_VIEW => Self::SwitchView { view: r.u16()? },
            id::ALTP2M_SWITCH_VCPU_VIEW => Self::SwitchVcpuView {
                vcpu: r.u16()?,
                view: r.u16()?,
            },
            id::ALTP2M_GET_VCPU_VIEW => Self::GetVcpuView { vcpu: r.u16()? },
            id::ALTP2M_SET_MEM_ACCESS => Self::SetMemAccess {
                view: r.u16()?,
                gfn: r.u64()?,
                access: r.u8()?,
            },
            id::ALTP2M_SET_MEM_ACCESS_MULTI => {
                let view = r.u16()?;
                let count = usize::from(r.u16()?);
                let entries = List::read(&mut r, count)?;
                r.finish()?;
                bounded((1..=MAX_MULTI).contains(&count))?;
                return Ok(Self::SetMemAccessMulti { view, entries });
            }
            id::ALTP2M_GET_MEM_ACCESS => Self::GetMemAccess {
                view: r.u16()?,
                gfn: r.u64()?,
            },
            id::ALTP2M_CHANGE_GFN => Self::ChangeGfn {
                view: r.u16()?,
                old_gfn: r.u64()?,
                new_gfn: r.u64()?,
            },
            id::ALTP2M_SET_SUPPRESS_VE => Self::SetSuppressVe {
                view: r.u16()?,
                gfn: r.u64()?,
                suppress: r.bool()?,
            },
            id::ALTP2M_SET_SUPPRESS_VE_MULTI => {
                let (view, first_gfn, last_gfn, suppress) =
                    (r.u16()?, r.u64()?, r.u64()?, r.bool()?);
                r.finish()?;
                bounded(last_gfn >= first_gfn && last_gfn - first_gfn < MAX_MULTI as u64)?;
                return Ok(Self::SetSuppressVeMulti {
                    view,
                    first_gfn,
                    last_gfn,
                    suppress,
                });
            }
            id::ALTP2M_GET_SUPPRESS_VE => Self::GetSuppressVe {
                view: r.u16()?,
                gfn: r.u64()?,
            },
            id::ALTP2M_SET_VISIBILITY => Self::SetVisibility {
                view: r.u16()?,
                visible: r.bool()?,
            },
            id::LOGDIRTY_START | id::LOGDIRTY_FETCH | id::LOGDIRTY_STOP => {
                let first_gfn = r.u64()?;
                let pages = r.u32()?;
                let max = if id == id::LOGDIRTY_FETCH {
                    MAX_FETCH_PAGES
                } else {
                    MAX_TRACK_PAGES
                };
                r.finish()?;
                bounded((1..=max).contains(&pages))?;
                return Ok(match id {
                    id::LOGDIRTY_START => Self::LogdirtyStart { first_gfn, pages },
                    id::LOGDIRTY_FETCH => Self::LogdirtyFetch { first_gfn, pages },
                    _ => Self::LogdirtyStop { first_gfn, pages },
                });
            }
            id::ALLOC_SHADOW_PAGE => Self::AllocShadowPage,
            id::FREE_SHADOW_PAGE => Self::FreeShadowPage { gfn: r.u64()? },
            _ => return Err(DecodeError::Unknown),
        };
        r.finish()?;
        Ok(command)
    }
}

/// A count or size inside its message's bounds (checked once the shape is).
fn bounded(ok: bool) -> Result<(), DecodeError> {
    if ok {
        Ok(())
    } else {
        Err(DecodeError::Invalid)
    }
}

/// 1..=4096 bytes from `gpa` that stay in its page.
pub(crate) fn within_page(gpa: u64, len: usize) -> Result<(), DecodeError> {
    let offset = (gpa % PAGE_SIZE as u64) as usize;
    bounded(len > 0 && offset + len <= PAGE_SIZE)
}
