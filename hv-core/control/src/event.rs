//! Events (hypervisor to tool) and answers (tool to hypervisor). Every
//! event holds its vCPU until its answer comes.

use crate::command::DecodeError;
use crate::types::id;
use crate::wire::{Malformed, Overflow, Reader, Writer};

/// Where the vCPU was when the event happened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Context {
    pub vcpu: u16,
    /// The view the vCPU ran on.
    pub view: u16,
    pub rip: u64,
    pub cr3: u64,
}

/// Bits of an attempted access (`MemAccess`, `Ve`), as in the EPT
/// violation's exit qualification.
pub mod access_bits {
    pub const READ: u8 = 1 << 0;
    pub const WRITE: u8 = 1 << 1;
    pub const EXECUTE: u8 = 1 << 2;
    pub const ALL: u8 = READ | WRITE | EXECUTE;
}

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// An access the view's entry denies. `access`: [`access_bits`] of the
    /// attempt; `entry`: the entry's `hv_abi::access` value; `gla`: the
    /// linear address, when the CPU gave one.
    MemAccess {
        gpa: u64,
        gla: Option<u64>,
        access: u8,
        entry: u8,
    },
    /// An INT3 in a page the view remaps (`ChangeGfn`): a hidden breakpoint.
    Breakpoint { gpa: u64, gla: u64 },
    /// A write to CR3 (before it takes effect).
    Cr3Write { old: u64, new: u64 },
    /// The single step an answer asked for is done.
    SingleStep,
    /// A #VE was delivered to the guest (informational).
    Ve {
        gpa: u64,
        gla: Option<u64>,
        access: u8,
    },
}

/// An event: where, and what.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub context: Context,
    pub kind: EventKind,
}

impl Event {
    pub const IDS: [u16; 5] = [
        id::EVENT_MEM_ACCESS,
        id::EVENT_BREAKPOINT,
        id::EVENT_CR3_WRITE,
        id::EVENT_SINGLE_STEP,
        id::EVENT_VE,
    ];

    pub fn id(&self) -> u16 {
        match self.kind {
            EventKind::MemAccess { .. } => id::EVENT_MEM_ACCESS,
            EventKind::Breakpoint { .. } => id::EVENT_BREAKPOINT,
            EventKind::Cr3Write { .. } => id::EVENT_CR3_WRITE,
            EventKind::SingleStep => id::EVENT_SINGLE_STEP,
            EventKind::Ve { .. } => id::EVENT_VE,
        }
    }

    pub fn write(&self, w: &mut Writer<'_>) -> Result<(), Overflow> {
        let c = &self.context;
        w.u16(c.vcpu)?;
        w.u16(c.view)?;
        w.u64(c.rip)?;
        w.u64(c.cr3)?;
        match self.kind {
            EventKind::MemAccess {
                gpa,
                gla,
                access,
                entry,
            } => {
                w.u64(gpa)?;
                write_gla(w, gla)?;
                w.u8(access)?;
                w.u8(entry)
            }
            EventKind::Breakpoint { gpa, gla } => {
                w.u64(gpa)?;
                w.u64(gla)
            }
            EventKind::Cr3Write { old, new } => {
                w.u64(old)?;
                w.u64(new)
            }
            EventKind::SingleStep => Ok(()),
            EventKind::Ve { gpa, gla, access } => {
                w.u64(gpa)?;
                write_gla(w, gla)?;
                w.u8(access)
            }
        }
    }

    pub fn decode(id: u16, payload: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(payload);
        let context = Context {
            vcpu: r.u16()?,
            view: r.u16()?,
            rip: r.u64()?,
            cr3: r.u64()?,
        };
        let kind = match id {
            id::EVENT_MEM_ACCESS => EventKind::MemAccess {
                gpa: r.u64()?,
                gla: read_gla(&mut r)?,
                access: access(&mut r)?,
                entry: r.u8()?,
            },
            id::EVENT_BREAKPOINT => EventKind::Breakpoint {
                gpa: r.u64()?,
                gla: r.u64()?,
            },
            id::EVENT_CR3_WRITE => EventKind::Cr3Write {
                old: r.u64()?,
                new: r.u64()?,
            },
            id::EVENT_SINGLE_STEP => EventKind::SingleStep,
            id::EVENT_VE => EventKind::Ve {
                gpa: r.u64()?,
                gla: read_gla(&mut r)?,
                access: access(&mut r)?,
            },
            _ => return Err(DecodeError::Unknown),
        };
        r.finish()?;
        Ok(Self { context, kind })
    }
}

/// A validity flag, then the address (0 when not valid).
fn write_gla(w: &mut Writer<'_>, gla: Option<u64>) -> Result<(), Overflow> {
    w.bool(gla.is_some())?;
    w.u64(gla.unwrap_or(0))
}

fn read_gla(r: &mut Reader<'_>) -> Result<Option<u64>, Malformed> {
    let valid = r.bool()?;
    let gla = r.u64()?;
    match (valid, gla) {
        (true, gla) => Ok(Some(gla)),
        (false, 0) => Ok(None),
        (false, _) => Err(Malformed),
    }
}

fn access(r: &mut Reader<'_>) -> Result<u8, Malformed> {
    let bits = r.u8()?;
    if bits & !access_bits::ALL != 0 {
        return Err(Malformed);
    }
    Ok(bits)
}

/// What an event's vCPU does next: optionally switch view, optionally
/// run one instruction and report a `SingleStep` event, then continue.
/// `Answer::default()` is plain continue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Answer {
    /// Switch the vCPU to this view first.
    pub switch_view: Option<u16>,
    /// Then single-step one instruction (with MTF where the CPU has it)
    /// and hold the vCPU again with a `SingleStep` event.
    pub single_step: bool,
}

const SWITCH: u8 = 1 << 0;
const STEP: u8 = 1 << 1;

impl Answer {
    pub const CONTINUE: Self = Self {
        switch_view: None,
        single_step: false,
    };

    pub fn write(&self, w: &mut Writer<'_>) -> Result<(), Overflow> {
        let flags = if self.switch_view.is_some() {
            SWITCH
        } else {
            0
        } | if self.single_step { STEP } else { 0 };
        w.u8(flags)?;
        w.u16(self.switch_view.unwrap_or(0))
    }

    /// Reads an answer to an event of id `id`.
    pub fn decode(id: u16, payload: &[u8]) -> Result<Self, DecodeError> {
        if !Event::IDS.contains(&id) {
            return Err(DecodeError::Unknown);
        }
        let mut r = Reader::new(payload);
        let flags = r.u8()?;
        let view = r.u16()?;
        r.finish()?;
        if flags & !(SWITCH | STEP) != 0 || (flags & SWITCH == 0 && view != 0) {
            return Err(DecodeError::Malformed);
        }
        Ok(Self {
            switch_view: (flags & SWITCH != 0).then_some(view),
            single_step: flags & STEP != 0,
        })
    }
}
