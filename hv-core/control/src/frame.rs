//! Frames: a 24-byte header (magic, version, kind, message id, sequence
//! number, payload size, payload CRC, header CRC) and a payload of at most
//! [`MAX_PAYLOAD`] bytes. The header has its own CRC so that a corrupted
//! size is caught before the decoder waits for a payload that never comes.

use crc::{CRC_32_ISO_HDLC, Crc};

use crate::wire::{Overflow, Writer};

/// The first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"HVCP";
/// The protocol version this crate speaks (header byte 4).
pub const VERSION: u8 = 1;
/// Bytes in a header.
pub const HEADER_LEN: usize = 24;
/// The largest payload: a page of guest memory and its address fit, and so
/// do 512 (gfn, access) pairs.
pub const MAX_PAYLOAD: usize = 5120;
/// The largest frame.
pub const MAX_FRAME: usize = HEADER_LEN + MAX_PAYLOAD;

/// CRC-32/ISO-HDLC (the CRC of Ethernet, zlib and PNG).
const CRC32: Crc<u32> = Crc::<u32>::new(&CRC_32_ISO_HDLC);

/// CRC-32/ISO-HDLC of `bytes`.
pub fn crc32(bytes: &[u8]) -> u32 {
    CRC32.checksum(bytes)
}

/// Who sent a frame and what it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Tool to hypervisor.
    Command = 1,
    /// Hypervisor to tool: the answer to a command (same id and sequence
    /// number), or to an event answer (the event's id and sequence number).
    Reply = 2,
    /// Hypervisor to tool; the vCPU waits for an [`Kind::Answer`].
    Event = 3,
    /// Tool to hypervisor: what an event's vCPU does next (the event's id
    /// and sequence number).
    Answer = 4,
}

impl Kind {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Command),
            2 => Some(Self::Reply),
            3 => Some(Self::Event),
            4 => Some(Self::Answer),
            _ => None,
        }
    }
}

/// A header whose CRC checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u8,
    /// The raw kind byte ([`Kind::from_u8`]); kept raw so that a frame of
    /// an unknown kind can still be answered.
    pub kind: u8,
    pub id: u16,
    pub seq: u32,
    pub len: u32,
    pub payload_crc: u32,
}

impl Header {
    /// Reads a header from `bytes` (at least [`HEADER_LEN`] long), checking
    /// magic and header CRC only.
    fn parse(bytes: &[u8]) -> Option<Self> {
        let field = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        if bytes[..4] != MAGIC || crc32(&bytes[..20]) != field(20) {
            return None;
        }
        Some(Self {
            version: bytes[4],
            kind: bytes[5],
            id: u16::from_le_bytes([bytes[6], bytes[7]]),
            seq: field(8),
            len: field(12),
            payload_crc: field(16),
        })
    }
}

/// A complete frame whose header and payload checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub kind: Kind,
    pub id: u16,
    pub seq: u32,
    pub payload: &'a [u8],
}

/// A frame whose header checked but that cannot be taken: the header is
/// trustworthy, so the receiver can answer its sequence number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Another protocol version.
    BadVersion(Header),
    /// A kind byte that is none of [`Kind`].
    BadKind(Header),
    /// A payload size over [`MAX_PAYLOAD`].
    TooBig(Header),
    /// The payload's CRC did not match (corruption on the line).
    BadPayloadCrc(Header),
    /// The line went idle before the payload was complete ([`Decoder::expire`]).
    Truncated(Header),
}

impl FrameError {
    pub fn header(&self) -> Header {
        match *self {
            Self::BadVersion(h)
            | Self::BadKind(h)
            | Self::TooBig(h)
            | Self::BadPayloadCrc(h)
            | Self::Truncated(h) => h,
        }
    }
}

/// Writes a frame into `buf`: the payload is written by `payload` (into a
/// writer limited to [`MAX_PAYLOAD`]), then the header. Returns the frame's
/// size.
pub fn encode(
    buf: &mut [u8],
    kind: Kind,
    id: u16,
    seq: u32,
    payload: impl FnOnce(&mut Writer<'_>) -> Result<(), Overflow>,
) -> Result<usize, Overflow> {
    if buf.len() < HEADER_LEN {
        return Err(Overflow);
    }
    let (head, body) = buf.split_at_mut(HEADER_LEN);
    let limit = body.len().min(MAX_PAYLOAD);
    let mut w = Writer::new(&mut body[..limit]);
    payload(&mut w)?;
    let len = w.len();
    write_header(head, kind as u8, id, seq, &body[..len]);
    Ok(HEADER_LEN + len)
}

/// Fills a header for `payload` (any kind byte and length: tests forge bad ones).
pub fn write_header(head: &mut [u8], kind: u8, id: u16, seq: u32, payload: &[u8]) {
    head[..4].copy_from_slice(&MAGIC);
    head[4] = VERSION;
    head[5] = kind;
    head[6..8].copy_from_slice(&id.to_le_bytes());
    head[8..12].copy_from_slice(&seq.to_le_bytes());
    head[12..16].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    head[16..20].copy_from_slice(&crc32(payload).to_le_bytes());
    seal_header(head);
}

/// Recomputes a header's own CRC (bytes 20..24) over bytes 0..20.
pub fn seal_header(head: &mut [u8]) {
    let crc = crc32(&head[..20]);
    head[20..24].copy_from_slice(&crc.to_le_bytes());
}

/// What [`Decoder::push`] produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    Frame(Frame<'a>),
    Error(FrameError),
}

/// A result of the decoder that borrows nothing yet.
#[derive(Clone, Copy)]
enum Outcome {
    /// A frame that starts at `buf[at]`.
    Frame {
        kind: Kind,
        header: Header,
        at: usize,
    },
    Error(FrameError),
}

/// A streaming decoder for bytes as they come off a serial line. It holds
/// at most one frame's worth of bytes in a fixed buffer and never
/// allocates. Bytes that cannot start a frame are skipped (and counted).
/// When a frame turns out bad (a header or payload CRC that fails, a
/// version, kind or size it cannot take), the decoder looks for the next
/// magic from the byte after the bad frame's first one, so a frame that
/// arrives right after a truncated one is still found.
///
/// After [`Decoder::push`] returns something, call [`Decoder::poll`] until
/// it returns `None`: bytes already buffered may hold more frames.
pub struct Decoder {
    /// `buf[start..start + len]`: the frame being assembled;
    /// `buf[start + len..end]`: bytes received but not looked at yet (they
    /// follow a bad frame's start). Dropping a byte moves `start`, so
    /// resynchronizing copies nothing.
    buf: [u8; MAX_FRAME],
    start: usize,
    len: usize,
    end: usize,
    /// The current frame's header, once it checked.
    header: Option<Header>,
    skipped: u64,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    pub const fn new() -> Self {
        Self {
            buf: [0; MAX_FRAME],
            start: 0,
            len: 0,
            end: 0,
            header: None,
            skipped: 0,
        }
    }

    /// Bytes dropped so far while looking for a frame.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Whether bytes of an incomplete frame are buffered.
    pub fn is_mid_frame(&self) -> bool {
        self.end > self.start
    }

    /// Drops everything buffered (for example after a line reset).
    pub fn reset(&mut self) {
        self.start = 0;
        self.len = 0;
        self.end = 0;
        self.header = None;
    }

    /// Takes one byte; returns a frame or a frame error if one is complete.
    pub fn push(&mut self, byte: u8) -> Option<Decoded<'_>> {
        let outcome = self.push_outcome(byte)?;
        Some(self.decoded(outcome))
    }

    /// Looks at bytes buffered but not yet looked at (see [`Decoder`]).
    pub fn poll(&mut self) -> Option<Decoded<'_>> {
        let outcome = self.process()?;
        Some(self.decoded(outcome))
    }

    /// Gives up on the frame being assembled, for a receiver whose line
    /// went idle mid-frame (a sender that died, or bytes lost: a size that
    /// promises more than comes would otherwise hide the frames that
    /// follow until enough bytes arrive). Its bytes but the first are
    /// looked at again; poll afterwards as after any result.
    pub fn expire(&mut self) -> Option<Decoded<'_>> {
        let outcome = match self.header {
            Some(header) => Some(self.fail(FrameError::Truncated(header))),
            None if self.len > 0 => {
                self.drop_first();
                self.skipped += 1;
                self.process()
            }
            None => None,
        }?;
        Some(self.decoded(outcome))
    }

    /// Feeds bytes from `bytes` until a frame or error is complete (or,
    /// with none, all of them); returns how many bytes were used.
    pub fn feed(&mut self, bytes: &[u8]) -> (usize, Option<Decoded<'_>>) {
        if let Some(outcome) = self.process() {
            return (0, Some(self.decoded(outcome)));
        }
        for (i, &b) in bytes.iter().enumerate() {
            if let Some(outcome) = self.push_outcome(b) {
                return (i + 1, Some(self.decoded(outcome)));
            }
        }
        (bytes.len(), None)
    }

    fn push_outcome(&mut self, byte: u8) -> Option<Outcome> {
        if self.end == self.buf.len() {
            self.compact();
        }
        // Room after compacting: after any call returns, fewer than
        // MAX_FRAME bytes are buffered (a complete frame is returned, a bad
        // one gives back all its bytes but the first).
        self.buf[self.end] = byte;
        self.end += 1;
        self.process()
    }

    fn decoded(&self, outcome: Outcome) -> Decoded<'_> {
        match outcome {
            Outcome::Frame { kind, header, at } => Decoded::Frame(Frame {
                kind,
                id: header.id,
                seq: header.seq,
                payload: &self.buf[at + HEADER_LEN..at + HEADER_LEN + header.len as usize],
            }),
            Outcome::Error(e) => Decoded::Error(e),
        }
    }

    /// Moves the buffered bytes to the front.
    fn compact(&mut self) {
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
    }

    /// Takes buffered bytes into the frame until it completes or fails.
    fn process(&mut self) -> Option<Outcome> {
        while self.start + self.len < self.end {
            self.len += 1;
            if let Some(outcome) = self.step() {
                return Some(outcome);
            }
        }
        None
    }

    /// Looks at the frame after one more byte.
    fn step(&mut self) -> Option<Outcome> {
        if let Some(header) = self.header {
            let total = HEADER_LEN + header.len as usize;
            if self.len < total {
                return None;
            }
            let payload = &self.buf[self.start + HEADER_LEN..self.start + total];
            if crc32(payload) != header.payload_crc {
                return Some(self.fail(FrameError::BadPayloadCrc(header)));
            }
            return Some(self.complete(header));
        }
        loop {
            let magic_len = self.len.min(MAGIC.len());
            if self.buf[self.start..self.start + magic_len] != MAGIC[..magic_len] {
                self.drop_first();
                self.skipped += 1;
                continue;
            }
            if self.len < HEADER_LEN {
                return None;
            }
            let Some(header) = Header::parse(&self.buf[self.start..self.start + HEADER_LEN]) else {
                // Not a header after all (corruption, or magic bytes inside
                // garbage): look again from the next byte.
                self.drop_first();
                self.skipped += 1;
                continue;
            };
            let error = if header.version != VERSION {
                FrameError::BadVersion(header)
            } else if Kind::from_u8(header.kind).is_none() {
                FrameError::BadKind(header)
            } else if header.len as usize > MAX_PAYLOAD {
                FrameError::TooBig(header)
            } else if header.len == 0 {
                return Some(self.complete(header));
            } else {
                self.header = Some(header);
                return None;
            };
            return Some(self.fail(error));
        }
    }

    fn complete(&mut self, header: Header) -> Outcome {
        let kind = Kind::from_u8(header.kind).expect("checked with the header");
        let at = self.start;
        self.start += HEADER_LEN + header.len as usize;
        self.len = 0;
        self.header = None;
        Outcome::Frame { kind, header, at }
    }

    /// A bad frame: its first byte is dropped, the rest looked at again.
    fn fail(&mut self, error: FrameError) -> Outcome {
        self.drop_first();
        self.len = 0;
        self.header = None;
        Outcome::Error(error)
    }

    /// Drops the first buffered byte (the frame's, or a skipped one).
    fn drop_first(&mut self) {
        self.start += 1;
        self.len -= 1;
    }
}
