//! hv-control: the hypervisor's control protocol, defined once for both
//! ends (`docs/control.md` is its specification). A tool outside the guest
//! (the `hv-ctl` crate and its `hvctl` CLI) sends commands on a dedicated
//! serial line; the hypervisor replies, and reports events that hold the
//! vCPU until the tool answers.
//!
//! Frames ([`frame`]) carry a checked header and payload; [`Decoder`] takes
//! bytes as they come off a UART and resynchronizes after garbage.
//! [`Message`] turns a frame into a typed [`Command`], [`Reply`], [`Event`]
//! or [`Answer`] and back. Nothing here allocates: the hypervisor decodes
//! from a fixed buffer and encodes into one (at most [`MAX_FRAME`] bytes),
//! and decoded messages borrow their bulk data from the frame.
#![no_std]
#![forbid(unsafe_code)]

mod command;
mod event;
pub mod frame;
mod reply;
mod types;
pub mod wire;

pub use command::{Command, DecodeError};
pub use event::{Answer, Context, Event, EventKind, access_bits};
pub use frame::{
    Decoded, Decoder, Frame, FrameError, HEADER_LEN, Kind, MAX_FRAME, MAX_PAYLOAD, VERSION,
};
pub use reply::{Reply, ReplyBody, Shape, shape as reply_shape};
pub use types::{
    ALL_VCPUS, AccessEntry, Capabilities, ErrorCode, MAX_FETCH_PAGES, MAX_MULTI, MAX_RANGES,
    MAX_TRACK_PAGES, PAGE_SIZE, Range, Registers, Segment, Translation, class, feature, gpr, id,
    mode, paging, perm, seg,
};
pub use wire::{List, Overflow};

/// A typed message with its frame's sequence number.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Message<'a> {
    /// Tool to hypervisor; `seq` is the tool's.
    Command { seq: u32, command: Command<'a> },
    /// Hypervisor to tool: the reply to the command (or answer) with this
    /// id and sequence number.
    Reply { id: u16, seq: u32, reply: Reply<'a> },
    /// Hypervisor to tool; `seq` is the hypervisor's.
    Event { seq: u32, event: Event },
    /// Tool to hypervisor: the answer to the event with this id and `seq`.
    Answer { id: u16, seq: u32, answer: Answer },
}

impl<'a> Message<'a> {
    /// The typed message a checked frame carries.
    pub fn decode(frame: &Frame<'a>) -> Result<Self, DecodeError> {
        let (id, seq) = (frame.id, frame.seq);
        Ok(match frame.kind {
            Kind::Command => Self::Command {
                seq,
                command: Command::decode(id, frame.payload)?,
            },
            Kind::Reply => Self::Reply {
                id,
                seq,
                reply: reply::decode_reply(id, frame.payload)?,
            },
            Kind::Event => Self::Event {
                seq,
                event: Event::decode(id, frame.payload)?,
            },
            Kind::Answer => Self::Answer {
                id,
                seq,
                answer: Answer::decode(id, frame.payload)?,
            },
        })
    }

    pub fn kind(&self) -> Kind {
        match self {
            Self::Command { .. } => Kind::Command,
            Self::Reply { .. } => Kind::Reply,
            Self::Event { .. } => Kind::Event,
            Self::Answer { .. } => Kind::Answer,
        }
    }

    pub fn id(&self) -> u16 {
        match self {
            Self::Command { command, .. } => command.id(),
            Self::Event { event, .. } => event.id(),
            Self::Reply { id, .. } | Self::Answer { id, .. } => *id,
        }
    }

    pub fn seq(&self) -> u32 {
        match *self {
            Self::Command { seq, .. }
            | Self::Reply { seq, .. }
            | Self::Event { seq, .. }
            | Self::Answer { seq, .. } => seq,
        }
    }

    /// Writes the message as one frame into `buf`; returns the frame's size.
    /// Fails if `buf` (or [`MAX_PAYLOAD`]) is too small, or if a reply's
    /// body does not fit its id ([`reply_shape`]).
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, Overflow> {
        frame::encode(buf, self.kind(), self.id(), self.seq(), |w| match self {
            Self::Command { command, .. } => command.write(w),
            Self::Reply { id, reply, .. } => reply::write_reply(*id, reply, w),
            Self::Event { event, .. } => event.write(w),
            Self::Answer { answer, .. } => answer.write(w),
        })
    }
}

impl FrameError {
    /// The error a reply to this frame carries (with the frame's id and
    /// sequence number, which its checked header makes trustworthy).
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::BadVersion(_) => ErrorCode::BadVersion,
            Self::BadKind(_) => ErrorCode::UnknownMessage,
            Self::TooBig(_) => ErrorCode::TooBig,
            Self::BadPayloadCrc(_) | Self::Truncated(_) => ErrorCode::BadFrame,
        }
    }
}

/// The name of a command or event id, as `hvctl` spells its subcommands.
pub fn message_name(id: u16) -> &'static str {
    use crate::id::*;
    match id {
        HELLO => "hello",
        BYE => "bye",
        PING => "ping",
        CAPABILITIES => "capabilities",
        MEMORY_MAP => "memory-map",
        SET_EVENTS => "set-events",
        PAUSE => "pause",
        RESUME => "resume",
        GET_REGISTERS => "get-registers",
        SET_REGISTERS => "set-registers",
        TRANSLATE => "translate",
        READ_MEMORY => "read-memory",
        WRITE_MEMORY => "write-memory",
        ALTP2M_GET_STATE => "altp2m-get-state",
        ALTP2M_SET_STATE => "altp2m-set-state",
        ALTP2M_VCPU_ENABLE_NOTIFY => "vcpu-enable-notify",
        ALTP2M_VCPU_DISABLE_NOTIFY => "vcpu-disable-notify",
        ALTP2M_CREATE_VIEW => "create-view",
        ALTP2M_DESTROY_VIEW => "destroy-view",
        ALTP2M_SWITCH_VIEW => "switch-view",
        ALTP2M_SWITCH_VCPU_VIEW => "switch-vcpu-view",
        ALTP2M_GET_VCPU_VIEW => "get-vcpu-view",
        ALTP2M_SET_MEM_ACCESS => "set-mem-access",
        ALTP2M_SET_MEM_ACCESS_MULTI => "set-mem-access-multi",
        ALTP2M_GET_MEM_ACCESS => "get-mem-access",
        ALTP2M_CHANGE_GFN => "change-gfn",
        ALTP2M_SET_SUPPRESS_VE => "set-suppress-ve",
        ALTP2M_SET_SUPPRESS_VE_MULTI => "set-suppress-ve-multi",
        ALTP2M_GET_SUPPRESS_VE => "get-suppress-ve",
        ALTP2M_SET_VISIBILITY => "set-visibility",
        LOGDIRTY_START => "logdirty-start",
        LOGDIRTY_FETCH => "logdirty-fetch",
        LOGDIRTY_STOP => "logdirty-stop",
        ALLOC_SHADOW_PAGE => "alloc-shadow-page",
        FREE_SHADOW_PAGE => "free-shadow-page",
        EVENT_MEM_ACCESS => "mem-access",
        EVENT_BREAKPOINT => "breakpoint",
        EVENT_CR3_WRITE => "cr3-write",
        EVENT_SINGLE_STEP => "single-step",
        EVENT_VE => "ve",
        _ => "an unknown message",
    }
}
