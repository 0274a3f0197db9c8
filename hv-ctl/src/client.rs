//! The typed client: one method per command, events queued as they arrive
//! between replies, answers acknowledged.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::time::{Duration, Instant};

use hv_control::{
    AccessEntry, Answer, Capabilities, Command, Decoded, Decoder, ErrorCode, Event, FrameError,
    Kind, List, MAX_FRAME, MAX_MULTI, Message, PAGE_SIZE, Range, Registers, ReplyBody, Translation,
};

use crate::transport::Transport;

/// What went wrong with a call.
#[derive(Debug)]
pub enum Error {
    /// The channel failed or closed.
    Io(io::Error),
    /// No reply within the client's timeout.
    Timeout { what: &'static str, after: Duration },
    /// The hypervisor refused the command.
    Refused(ErrorCode),
    /// The hypervisor's frames do not make sense (a reply of the wrong
    /// shape, a corrupted reply).
    Protocol(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(e) => write!(f, "control channel: {e}"),
            Self::Timeout { what, after } => {
                write!(f, "no reply to {what} within {:.1} s", after.as_secs_f64())
            }
            Self::Refused(code) => write!(f, "refused: {code}"),
            Self::Protocol(why) => write!(f, "protocol error: {why}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// An event the hypervisor reported; its vCPU waits for [`Client::answer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventRecord {
    /// The hypervisor's sequence number: the answer echoes it.
    pub seq: u32,
    pub event: Event,
}

/// What `Hello` agreed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Session {
    /// The hypervisor's protocol version.
    pub version: u16,
    pub max_payload: u32,
}

/// A frame read off the channel, owned.
struct OwnedFrame {
    kind: Kind,
    id: u16,
    seq: u32,
    payload: Vec<u8>,
    /// A frame whose header checked but whose payload did not: only its
    /// id and sequence number are known.
    corrupt: bool,
}

/// Keeps what the decoder produced: frames, and the headers of corrupted
/// frames (a corrupted reply fails its call at once instead of timing out).
fn collect(ready: &mut VecDeque<OwnedFrame>, decoded: Decoded<'_>) {
    let (kind, id, seq, payload, corrupt) = match decoded {
        Decoded::Frame(f) => (f.kind, f.id, f.seq, f.payload.to_vec(), false),
        Decoded::Error(FrameError::BadPayloadCrc(h) | FrameError::Truncated(h)) => {
            match Kind::from_u8(h.kind) {
                Some(kind) => (kind, h.id, h.seq, Vec::new(), true),
                None => return,
            }
        }
        Decoded::Error(_) => return,
    };
    ready.push_back(OwnedFrame {
        kind,
        id,
        seq,
        payload,
        corrupt,
    });
}

/// A connection to the hypervisor's control port.
pub struct Client<T: Transport> {
    transport: T,
    decoder: Box<Decoder>,
    /// Frames decoded but not yet looked at.
    ready: VecDeque<OwnedFrame>,
    next_seq: u32,
    events: VecDeque<EventRecord>,
    /// Sequence numbers of the last events taken.
    seen: VecDeque<u32>,
    /// How long a reply may take.
    pub timeout: Duration,
    pub session: Session,
}

/// How long a HELLO waits for its reply before it is sent again.
pub const HELLO_RETRY: Duration = Duration::from_secs(10);

/// How many recent event sequence numbers a client remembers to drop repeats.
const SEEN_EVENTS: usize = 256;

/// The default reply timeout: a page of memory at Bochs's slowest measured
/// rate (docs/control.md, "Transport") takes about 4 s each way.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

impl<T: Transport> Client<T> {
    /// Starts a session on `transport` (no liveness timeout).
    pub fn connect(transport: T) -> Result<Self> {
        Self::connect_with(transport, 0, DEFAULT_TIMEOUT)
    }

    /// Starts a session in which the hypervisor ends the session (releasing
    /// held vCPUs) when nothing comes from this client for `liveness_ms`
    /// (0: never), and in which a reply may take `timeout`.
    pub fn connect_with(transport: T, liveness_ms: u32, timeout: Duration) -> Result<Self> {
        let mut client = Self {
            transport,
            decoder: Box::new(Decoder::new()),
            ready: VecDeque::new(),
            next_seq: 1,
            events: VecDeque::new(),
            seen: VecDeque::new(),
            timeout,
            session: Session {
                version: 0,
                max_payload: 0,
            },
        };
        client.session = client.hello(liveness_ms)?;
        Ok(client)
    }

    /// Opens the session. A HELLO without a reply is sent again every
    /// [`HELLO_RETRY`] until the timeout: its first bytes may have been
    /// lost while the hypervisor set up its line (a tool that connects
    /// while the machine boots), and the hypervisor finds the next frame.
    fn hello(&mut self, liveness_ms: u32) -> Result<Session> {
        let timeout = self.timeout;
        let deadline = Instant::now() + timeout;
        loop {
            self.timeout = HELLO_RETRY.min(deadline.saturating_duration_since(Instant::now()));
            let reply = self.call(
                Command::Hello {
                    version: u16::from(hv_control::VERSION),
                    liveness_ms,
                },
                |body| match body {
                    ReplyBody::Hello {
                        version,
                        max_payload,
                    } => Some(Session {
                        version,
                        max_payload,
                    }),
                    _ => None,
                },
            );
            self.timeout = timeout;
            match reply {
                Err(Error::Timeout { .. }) if Instant::now() < deadline => continue,
                Err(Error::Timeout { what, .. }) => {
                    return Err(Error::Timeout {
                        what,
                        after: timeout,
                    });
                }
                Ok(session) => {
                    // The hypervisor ends the previous session before it
                    // replies, and the line keeps order: an event that came
                    // before this reply was the previous session's (a held
                    // vCPU's event, sent again while unanswered).
                    self.events.clear();
                    self.seen.clear();
                    return Ok(session);
                }
                other => return other,
            }
        }
    }

    /// The transport, for a caller that needs it back.
    pub fn into_transport(self) -> T {
        self.transport
    }

    fn send(&mut self, message: &Message<'_>) -> Result<()> {
        let mut buf = vec![0; MAX_FRAME];
        let n = message.encode(&mut buf).map_err(|_| {
            Error::Protocol(format!(
                "message {:#x} does not fit a frame ({} bytes at most)",
                message.id(),
                hv_control::MAX_PAYLOAD
            ))
        })?;
        self.transport.send(&buf[..n])?;
        Ok(())
    }

    /// Sends `command` and waits for its reply; events that arrive
    /// meanwhile are queued. `take` turns the body into the result, or
    /// says it has the wrong shape.
    fn call<R>(
        &mut self,
        command: Command<'_>,
        take: impl FnOnce(ReplyBody<'_>) -> Option<R>,
    ) -> Result<R> {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1).max(1);
        let id = command.id();
        self.send(&Message::Command { seq, command })?;
        let payload = self.await_reply(id, seq, command_name(id))?;
        self.take_reply(id, &payload, take)
    }

    fn take_reply<R>(
        &self,
        id: u16,
        payload: &[u8],
        take: impl FnOnce(ReplyBody<'_>) -> Option<R>,
    ) -> Result<R> {
        let frame = hv_control::Frame {
            kind: Kind::Reply,
            id,
            seq: 0,
            payload,
        };
        match Message::decode(&frame) {
            Ok(Message::Reply {
                reply: Ok(body), ..
            }) => take(body).ok_or_else(|| {
                Error::Protocol(format!("reply to {} of the wrong shape", command_name(id)))
            }),
            Ok(Message::Reply { reply: Err(e), .. }) => Err(Error::Refused(e)),
            Ok(_) => unreachable!("a reply frame decodes as a reply"),
            Err(e) => Err(Error::Protocol(format!(
                "reply to {} does not decode: {e:?}",
                command_name(id)
            ))),
        }
    }

    /// Reads frames until the reply `(id, seq)`; returns its payload.
    fn await_reply(&mut self, id: u16, seq: u32, what: &'static str) -> Result<Vec<u8>> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(frame) = self.read_frame(left)? else {
                return Err(Error::Timeout {
                    what,
                    after: self.timeout,
                });
            };
            match frame.kind {
                Kind::Reply if frame.seq == seq && frame.corrupt => {
                    return Err(Error::Protocol(format!(
                        "the reply to {what} was corrupted on the line"
                    )));
                }
                Kind::Event if frame.corrupt => {}
                Kind::Reply if frame.seq == seq && frame.id == id => return Ok(frame.payload),
                // A reply to our sequence number under another id: the
                // hypervisor could not read our frame's id (an error reply).
                Kind::Reply if frame.seq == seq => {
                    return self.take_reply(frame.id, &frame.payload, |_| None::<Vec<u8>>);
                }
                Kind::Event => self.queue_event(&frame)?,
                // A late reply to a command that timed out, or something a
                // hypervisor does not send: not ours.
                _ => {}
            }
        }
    }

    fn queue_event(&mut self, frame: &OwnedFrame) -> Result<()> {
        let event = Event::decode(frame.id, &frame.payload).map_err(|e| {
            Error::Protocol(format!("event {:#x} does not decode: {e:?}", frame.id))
        })?;
        // The hypervisor sends an unanswered event again (its first copy
        // may have been lost on the line): take each once.
        if self.seen.contains(&frame.seq) {
            return Ok(());
        }
        if self.seen.len() == SEEN_EVENTS {
            self.seen.pop_front();
        }
        self.seen.push_back(frame.seq);
        self.events.push_back(EventRecord {
            seq: frame.seq,
            event,
        });
        Ok(())
    }

    /// The next complete frame, waiting at most `timeout`.
    fn read_frame(&mut self, timeout: Duration) -> Result<Option<OwnedFrame>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(frame) = self.ready.pop_front() {
                return Ok(Some(frame));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let mut buf = [0u8; 8192];
            let n = self.transport.recv(&mut buf, left)?;
            if n == 0 && Instant::now() >= deadline {
                return Ok(None);
            }
            for &byte in &buf[..n] {
                if let Some(d) = self.decoder.push(byte) {
                    collect(&mut self.ready, d);
                    while let Some(d) = self.decoder.poll() {
                        collect(&mut self.ready, d);
                    }
                }
            }
        }
    }

    /// The next event: a queued one, or one that arrives within `timeout`.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<EventRecord>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(event) = self.events.pop_front() {
                return Ok(Some(event));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read_frame(left)? {
                None => return Ok(None),
                Some(frame) if frame.kind == Kind::Event && !frame.corrupt => {
                    self.queue_event(&frame)?
                }
                Some(_) => {}
            }
        }
    }

    /// Events that arrived and were not taken yet.
    pub fn pending_events(&self) -> usize {
        self.events.len()
    }

    /// Answers `event`: its vCPU goes on as `answer` says.
    pub fn answer(&mut self, event: &EventRecord, answer: Answer) -> Result<()> {
        let id = event.event.id();
        self.send(&Message::Answer {
            id,
            seq: event.seq,
            answer,
        })?;
        let payload = self.await_reply(id, event.seq, "an event answer")?;
        self.take_reply(id, &payload, |body| {
            matches!(body, ReplyBody::Done).then_some(())
        })
    }

    fn done(&mut self, command: Command<'_>) -> Result<()> {
        self.call(command, |body| {
            matches!(body, ReplyBody::Done).then_some(())
        })
    }

    /// Ends the session: the hypervisor releases held vCPUs and stops events.
    pub fn bye(mut self) -> Result<T> {
        self.done(Command::Bye)?;
        Ok(self.transport)
    }

    pub fn ping(&mut self, nonce: u64) -> Result<u64> {
        self.call(Command::Ping { nonce }, |body| match body {
            ReplyBody::Pong { nonce } => Some(nonce),
            _ => None,
        })
    }

    pub fn capabilities(&mut self) -> Result<Capabilities> {
        self.call(Command::Capabilities, |body| match body {
            ReplyBody::Capabilities(caps) => Some(caps),
            _ => None,
        })
    }

    pub fn memory_map(&mut self) -> Result<Vec<Range>> {
        self.call(Command::MemoryMap, |body| match body {
            ReplyBody::MemoryMap(ranges) => Some(ranges.iter().collect()),
            _ => None,
        })
    }

    /// Sets the reported event classes; returns those now reported.
    pub fn set_events(&mut self, classes: u32) -> Result<u32> {
        self.call(Command::SetEvents { classes }, |body| match body {
            ReplyBody::Events { classes } => Some(classes),
            _ => None,
        })
    }

    pub fn pause(&mut self, vcpu: u16) -> Result<()> {
        self.done(Command::Pause { vcpu })
    }

    pub fn resume(&mut self, vcpu: u16) -> Result<()> {
        self.done(Command::Resume { vcpu })
    }

    pub fn registers(&mut self, vcpu: u16) -> Result<Registers> {
        self.call(Command::GetRegisters { vcpu }, |body| match body {
            ReplyBody::Registers(regs) => Some(regs),
            _ => None,
        })
    }

    pub fn set_registers(&mut self, vcpu: u16, regs: Registers) -> Result<()> {
        self.done(Command::SetRegisters { vcpu, regs })
    }

    /// Translates `gva` with the page tables of `cr3` (0: the vCPU's own).
    pub fn translate(&mut self, vcpu: u16, cr3: u64, gva: u64) -> Result<Translation> {
        self.call(Command::Translate { vcpu, cr3, gva }, |body| match body {
            ReplyBody::Translation(t) => Some(t),
            _ => None,
        })
    }

    /// Reads guest-physical memory: any length, one command per page piece.
    pub fn read_memory(&mut self, gpa: u64, len: usize) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(len);
        for (at, n) in page_pieces(gpa, len) {
            let bytes = self.call(
                Command::ReadMemory {
                    gpa: at,
                    len: n as u16,
                },
                |body| match body {
                    ReplyBody::Memory(bytes) if bytes.len() == n => Some(bytes.to_vec()),
                    _ => None,
                },
            )?;
            out.extend_from_slice(&bytes);
        }
        Ok(out)
    }

    /// Writes guest-physical memory, one command per page piece.
    pub fn write_memory(&mut self, gpa: u64, data: &[u8]) -> Result<()> {
        let mut done = 0;
        for (at, n) in page_pieces(gpa, data.len()) {
            self.done(Command::WriteMemory {
                gpa: at,
                data: &data[done..done + n],
            })?;
            done += n;
        }
        Ok(())
    }

    pub fn altp2m_state(&mut self) -> Result<bool> {
        self.flag(Command::Altp2mGetState)
    }

    pub fn set_altp2m_state(&mut self, on: bool) -> Result<()> {
        self.done(Command::Altp2mSetState { on })
    }

    pub fn enable_notify(&mut self, vcpu: u16, gfn: u64) -> Result<()> {
        self.done(Command::VcpuEnableNotify { vcpu, gfn })
    }

    pub fn disable_notify(&mut self, vcpu: u16) -> Result<()> {
        self.done(Command::VcpuDisableNotify { vcpu })
    }

    pub fn create_view(&mut self, default_access: u8) -> Result<u16> {
        self.view(Command::CreateView { default_access })
    }

    pub fn destroy_view(&mut self, view: u16) -> Result<()> {
        self.done(Command::DestroyView { view })
    }

    pub fn switch_view(&mut self, view: u16) -> Result<()> {
        self.done(Command::SwitchView { view })
    }

    pub fn switch_vcpu_view(&mut self, vcpu: u16, view: u16) -> Result<()> {
        self.done(Command::SwitchVcpuView { vcpu, view })
    }

    pub fn vcpu_view(&mut self, vcpu: u16) -> Result<u16> {
        self.view(Command::GetVcpuView { vcpu })
    }

    pub fn set_mem_access(&mut self, view: u16, gfn: u64, access: u8) -> Result<()> {
        self.done(Command::SetMemAccess { view, gfn, access })
    }

    /// Sets many pages' access, [`MAX_MULTI`] per command; returns how many
    /// were applied (all, or those before the first failure).
    pub fn set_mem_access_multi(&mut self, view: u16, entries: &[AccessEntry]) -> Result<usize> {
        let mut applied = 0;
        for chunk in entries.chunks(MAX_MULTI) {
            let n = self.applied(Command::SetMemAccessMulti {
                view,
                entries: List::Items(chunk),
            })?;
            applied += n;
            if n < chunk.len() {
                break;
            }
        }
        Ok(applied)
    }

    pub fn mem_access(&mut self, view: u16, gfn: u64) -> Result<u8> {
        self.call(Command::GetMemAccess { view, gfn }, |body| match body {
            ReplyBody::Access(access) => Some(access),
            _ => None,
        })
    }

    /// Shows the frame of `new_gfn` at `old_gfn` in `view`
    /// (`hv_abi::INVALID_GFN` reverts).
    pub fn change_gfn(&mut self, view: u16, old_gfn: u64, new_gfn: u64) -> Result<()> {
        self.done(Command::ChangeGfn {
            view,
            old_gfn,
            new_gfn,
        })
    }

    pub fn set_suppress_ve(&mut self, view: u16, gfn: u64, suppress: bool) -> Result<()> {
        self.done(Command::SetSuppressVe {
            view,
            gfn,
            suppress,
        })
    }

    pub fn set_suppress_ve_multi(
        &mut self,
        view: u16,
        first_gfn: u64,
        last_gfn: u64,
        suppress: bool,
    ) -> Result<usize> {
        self.applied(Command::SetSuppressVeMulti {
            view,
            first_gfn,
            last_gfn,
            suppress,
        })
    }

    pub fn suppress_ve(&mut self, view: u16, gfn: u64) -> Result<bool> {
        self.flag(Command::GetSuppressVe { view, gfn })
    }

    pub fn set_visibility(&mut self, view: u16, visible: bool) -> Result<()> {
        self.done(Command::SetVisibility { view, visible })
    }

    pub fn logdirty_start(&mut self, first_gfn: u64, pages: u32) -> Result<()> {
        self.done(Command::LogdirtyStart { first_gfn, pages })
    }

    /// Fetches and clears the dirty bits; returns the dirty count and the
    /// bitmap (bit i = page `first_gfn + i`).
    pub fn logdirty_fetch(&mut self, first_gfn: u64, pages: u32) -> Result<(u32, Vec<u8>)> {
        self.call(
            Command::LogdirtyFetch { first_gfn, pages },
            |body| match body {
                ReplyBody::Dirty { dirty, bitmap } => Some((dirty, bitmap.to_vec())),
                _ => None,
            },
        )
    }

    pub fn logdirty_stop(&mut self, first_gfn: u64, pages: u32) -> Result<()> {
        self.done(Command::LogdirtyStop { first_gfn, pages })
    }

    pub fn alloc_shadow_page(&mut self) -> Result<u64> {
        self.call(Command::AllocShadowPage, |body| match body {
            ReplyBody::Gfn(gfn) => Some(gfn),
            _ => None,
        })
    }

    pub fn free_shadow_page(&mut self, gfn: u64) -> Result<()> {
        self.done(Command::FreeShadowPage { gfn })
    }

    fn flag(&mut self, command: Command<'_>) -> Result<bool> {
        self.call(command, |body| match body {
            ReplyBody::Flag(flag) => Some(flag),
            _ => None,
        })
    }

    fn view(&mut self, command: Command<'_>) -> Result<u16> {
        self.call(command, |body| match body {
            ReplyBody::View(view) => Some(view),
            _ => None,
        })
    }

    fn applied(&mut self, command: Command<'_>) -> Result<usize> {
        self.call(command, |body| match body {
            ReplyBody::Applied(n) => Some(n as usize),
            _ => None,
        })
    }
}

/// `gpa..gpa + len` cut at page boundaries: (address, length) pieces.
pub fn page_pieces(gpa: u64, len: usize) -> impl Iterator<Item = (u64, usize)> {
    let end = gpa + len as u64;
    std::iter::successors(Some(gpa).filter(|&a| a < end), move |&at| {
        let next = (at | (PAGE_SIZE as u64 - 1)) + 1;
        (next < end).then_some(next)
    })
    .map(move |at| {
        let page_end = (at | (PAGE_SIZE as u64 - 1)) + 1;
        (at, (page_end.min(end) - at) as usize)
    })
}

/// A command's name, for messages.
pub fn command_name(id: u16) -> &'static str {
    hv_control::message_name(id)
}
