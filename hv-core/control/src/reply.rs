//! Replies (hypervisor to tool): an error code, then, on success, the
//! body the command's id calls for.

use crate::command::DecodeError;
use crate::types::{
    Capabilities, ErrorCode, MAX_RANGES, PAGE_SIZE, Range, Record, Registers, Translation, id,
};
use crate::wire::{List, Overflow, Reader, Writer};

/// The body of a successful reply.
#[expect(
    clippy::large_enum_variant,
    reason = "registers travel by value: no allocation on the hypervisor's side"
)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ReplyBody<'a> {
    /// Nothing to say but success.
    Done,
    Hello {
        version: u16,
        max_payload: u32,
    },
    Pong {
        nonce: u64,
    },
    Capabilities(Capabilities),
    /// At most [`MAX_RANGES`] ranges.
    MemoryMap(List<'a, Range>),
    /// The event classes now reported.
    Events {
        classes: u32,
    },
    Registers(Registers),
    Translation(Translation),
    /// `ReadMemory`'s bytes.
    Memory(&'a [u8]),
    /// `AllocShadowPage`'s gfn.
    Gfn(u64),
    /// `Altp2mGetState`, `GetSuppressVe`.
    Flag(bool),
    /// `CreateView`, `GetVcpuView`.
    View(u16),
    /// `GetMemAccess`: an `hv_abi::access` value.
    Access(u8),
    /// The multi operations: how many were applied before the first failure.
    Applied(u32),
    /// `LogdirtyFetch`: dirty pages and the bitmap (bit i = page first + i,
    /// `ceil(pages / 8)` bytes).
    Dirty {
        dirty: u32,
        bitmap: &'a [u8],
    },
}

/// Which body a reply to a message id has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    Done,
    Hello,
    Pong,
    Capabilities,
    MemoryMap,
    Events,
    Registers,
    Translation,
    Memory,
    Gfn,
    Flag,
    View,
    Access,
    Applied,
    Dirty,
}

/// The body of a successful reply to message `id` (a command, or an event
/// whose answer is acknowledged); `None` for an id nobody sends.
pub fn shape(id: u16) -> Option<Shape> {
    Some(match id {
        id::HELLO => Shape::Hello,
        id::PING => Shape::Pong,
        id::CAPABILITIES => Shape::Capabilities,
        id::MEMORY_MAP => Shape::MemoryMap,
        id::SET_EVENTS => Shape::Events,
        id::GET_REGISTERS => Shape::Registers,
        id::TRANSLATE => Shape::Translation,
        id::READ_MEMORY => Shape::Memory,
        id::ALLOC_SHADOW_PAGE => Shape::Gfn,
        id::ALTP2M_GET_STATE | id::ALTP2M_GET_SUPPRESS_VE => Shape::Flag,
        id::ALTP2M_CREATE_VIEW | id::ALTP2M_GET_VCPU_VIEW => Shape::View,
        id::ALTP2M_GET_MEM_ACCESS => Shape::Access,
        id::ALTP2M_SET_MEM_ACCESS_MULTI | id::ALTP2M_SET_SUPPRESS_VE_MULTI => Shape::Applied,
        id::LOGDIRTY_FETCH => Shape::Dirty,
        id::BYE
        | id::PAUSE
        | id::RESUME
        | id::SET_REGISTERS
        | id::WRITE_MEMORY
        | id::ALTP2M_SET_STATE
        | id::ALTP2M_VCPU_ENABLE_NOTIFY
        | id::ALTP2M_VCPU_DISABLE_NOTIFY
        | id::ALTP2M_DESTROY_VIEW
        | id::ALTP2M_SWITCH_VIEW
        | id::ALTP2M_SWITCH_VCPU_VIEW
        | id::ALTP2M_SET_MEM_ACCESS
        | id::ALTP2M_CHANGE_GFN
        | id::ALTP2M_SET_SUPPRESS_VE
        | id::ALTP2M_SET_VISIBILITY
        | id::LOGDIRTY_START
        | id::LOGDIRTY_STOP
        | id::FREE_SHADOW_PAGE => Shape::Done,
        id::EVENT_MEM_ACCESS..=id::EVENT_VE => Shape::Done,
        _ => return None,
    })
}

impl ReplyBody<'_> {
    pub fn shape(&self) -> Shape {
        match self {
            Self::Done => Shape::Done,
            Self::Hello { .. } => Shape::Hello,
            Self::Pong { .. } => Shape::Pong,
            Self::Capabilities(_) => Shape::Capabilities,
            Self::MemoryMap(_) => Shape::MemoryMap,
            Self::Events { .. } => Shape::Events,
            Self::Registers(_) => Shape::Registers,
            Self::Translation(_) => Shape::Translation,
            Self::Memory(_) => Shape::Memory,
            Self::Gfn(_) => Shape::Gfn,
            Self::Flag(_) => Shape::Flag,
            Self::View(_) => Shape::View,
            Self::Access(_) => Shape::Access,
            Self::Applied(_) => Shape::Applied,
            Self::Dirty { .. } => Shape::Dirty,
        }
    }

    fn write(&self, w: &mut Writer<'_>) -> Result<(), Overflow> {
        match *self {
            Self::Done => Ok(()),
            Self::Hello {
                version,
                max_payload,
            } => {
                w.u16(version)?;
                w.u32(max_payload)
            }
            Self::Pong { nonce } => w.u64(nonce),
            Self::Capabilities(ref caps) => caps.write(w),
            Self::MemoryMap(ref ranges) => {
                w.u16(u16::try_from(ranges.len()).map_err(|_| Overflow)?)?;
                ranges.write(w)
            }
            Self::Events { classes } => w.u32(classes),
            Self::Registers(ref regs) => regs.write(w),
            Self::Translation(ref t) => t.write(w),
            Self::Memory(bytes) => w.bytes(bytes),
            Self::Gfn(gfn) => w.u64(gfn),
            Self::Flag(flag) => w.bool(flag),
            Self::View(view) => w.u16(view),
            Self::Access(access) => w.u8(access),
            Self::Applied(n) => w.u32(n),
            Self::Dirty { dirty, bitmap } => {
                w.u32(dirty)?;
                w.bytes(bitmap)
            }
        }
    }
}

/// A reply: the body on success, else the error.
pub type Reply<'a> = Result<ReplyBody<'a>, ErrorCode>;

/// Writes a reply's payload for message `id`. A body of the wrong shape
/// for `id` is refused (a programming error on the sender's side).
pub fn write_reply(id: u16, reply: &Reply<'_>, w: &mut Writer<'_>) -> Result<(), Overflow> {
    match reply {
        Ok(body) => {
            if shape(id) != Some(body.shape()) {
                return Err(Overflow);
            }
            w.i32(0)?;
            body.write(w)
        }
        Err(e) => w.i32(e.code()),
    }
}

/// Reads a reply to message `id`.
pub fn decode_reply(id: u16, payload: &[u8]) -> Result<Reply<'_>, DecodeError> {
    let mut r = Reader::new(payload);
    let status = r.i32()?;
    if let Some(error) = ErrorCode::from_code(status) {
        r.finish()?;
        return Ok(Err(error));
    }
    let body = match shape(id).ok_or(DecodeError::Unknown)? {
        Shape::Done => ReplyBody::Done,
        Shape::Hello => ReplyBody::Hello {
            version: r.u16()?,
            max_payload: r.u32()?,
        },
        Shape::Pong => ReplyBody::Pong { nonce: r.u64()? },
        Shape::Capabilities => ReplyBody::Capabilities(Capabilities::read(&mut r)?),
        Shape::MemoryMap => {
            let count = usize::from(r.u16()?);
            let ranges = List::read(&mut r, count)?;
            if count > MAX_RANGES {
                return Err(DecodeError::Invalid);
            }
            ReplyBody::MemoryMap(ranges)
        }
        Shape::Events => ReplyBody::Events { classes: r.u32()? },
        Shape::Registers => ReplyBody::Registers(Registers::read(&mut r)?),
        Shape::Translation => ReplyBody::Translation(Translation::read(&mut r)?),
        Shape::Memory => {
            let bytes = r.rest();
            if bytes.is_empty() || bytes.len() > PAGE_SIZE {
                return Err(DecodeError::Invalid);
            }
            ReplyBody::Memory(bytes)
        }
        Shape::Gfn => ReplyBody::Gfn(r.u64()?),
        Shape::Flag => ReplyBody::Flag(r.bool()?),
        Shape::View => ReplyBody::View(r.u16()?),
        Shape::Access => ReplyBody::Access(r.u8()?),
        Shape::Applied => ReplyBody::Applied(r.u32()?),
        Shape::Dirty => {
            let dirty = r.u32()?;
            let bitmap = r.rest();
            if bitmap.len() > PAGE_SIZE {
                return Err(DecodeError::Invalid);
            }
            ReplyBody::Dirty { dirty, bitmap }
        }
    };
    r.finish()?;
    Ok(Ok(body))
}
