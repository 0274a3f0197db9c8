//! Little-endian fields in fixed buffers: a reader that refuses short or
//! over-long payloads, a writer that refuses to overflow its buffer, and
//! lists that are either typed items (to encode) or the bytes they were
//! decoded from (no copy, no allocation).

use core::fmt;

/// A payload that does not have the shape its message id says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Malformed;

/// Reads fields in order from a payload.
pub struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if n > self.bytes.len() {
            return Err(Malformed);
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Malformed> {
        let mut out = [0; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    pub fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.array::<1>()?[0])
    }

    pub fn u16(&mut self) -> Result<u16, Malformed> {
        self.array().map(u16::from_le_bytes)
    }

    pub fn u32(&mut self) -> Result<u32, Malformed> {
        self.array().map(u32::from_le_bytes)
    }

    pub fn i32(&mut self) -> Result<i32, Malformed> {
        self.array().map(i32::from_le_bytes)
    }

    pub fn u64(&mut self) -> Result<u64, Malformed> {
        self.array().map(u64::from_le_bytes)
    }

    /// A byte that must be 0 or 1.
    pub fn bool(&mut self) -> Result<bool, Malformed> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(Malformed),
        }
    }

    /// Everything that is left.
    pub fn rest(&mut self) -> &'a [u8] {
        core::mem::take(&mut self.bytes)
    }

    /// Fails unless the whole payload was read: a payload has exactly the
    /// size its message says.
    pub fn finish(self) -> Result<(), Malformed> {
        if self.bytes.is_empty() {
            Ok(())
        } else {
            Err(Malformed)
        }
    }
}

/// A buffer that is too small for what is written to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overflow;

/// Writes fields in order into a fixed buffer.
pub struct Writer<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> Writer<'a> {
    pub fn new(buf: &'a mut [u8]) -> Self {
        Self { buf, len: 0 }
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn bytes(&mut self, bytes: &[u8]) -> Result<(), Overflow> {
        let end = self.len.checked_add(bytes.len()).ok_or(Overflow)?;
        self.buf
            .get_mut(self.len..end)
            .ok_or(Overflow)?
            .copy_from_slice(bytes);
        self.len = end;
        Ok(())
    }

    pub fn u8(&mut self, v: u8) -> Result<(), Overflow> {
        self.bytes(&[v])
    }

    pub fn u16(&mut self, v: u16) -> Result<(), Overflow> {
        self.bytes(&v.to_le_bytes())
    }

    pub fn u32(&mut self, v: u32) -> Result<(), Overflow> {
        self.bytes(&v.to_le_bytes())
    }

    pub fn i32(&mut self, v: i32) -> Result<(), Overflow> {
        self.bytes(&v.to_le_bytes())
    }

    pub fn u64(&mut self, v: u64) -> Result<(), Overflow> {
        self.bytes(&v.to_le_bytes())
    }

    pub fn bool(&mut self, v: bool) -> Result<(), Overflow> {
        self.u8(u8::from(v))
    }
}

/// A fixed-size record of a [`List`].
pub trait Item: Copy + PartialEq + fmt::Debug {
    /// Bytes per item on the wire.
    const SIZE: usize;
    /// Reads one item from exactly [`Item::SIZE`] bytes.
    fn read(bytes: &[u8]) -> Self;
    fn write(&self, w: &mut Writer<'_>) -> Result<(), Overflow>;
}

/// Items of a message: typed (built by a sender) or the payload bytes they
/// were decoded from (a receiver reads them in place). Both compare equal
/// when they hold the same items.
#[derive(Clone, Copy)]
pub enum List<'a, T: Item> {
    Items(&'a [T]),
    Wire(&'a [u8]),
}

impl<'a, T: Item> List<'a, T> {
    /// `count` items read from `r`.
    pub fn read(r: &mut Reader<'a>, count: usize) -> Result<Self, Malformed> {
        let size = count.checked_mul(T::SIZE).ok_or(Malformed)?;
        r.bytes(size).map(List::Wire)
    }

    pub fn write(&self, w: &mut Writer<'_>) -> Result<(), Overflow> {
        match self {
            List::Items(items) => items.iter().try_for_each(|item| item.write(w)),
            List::Wire(bytes) => w.bytes(bytes),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            List::Items(items) => items.len(),
            List::Wire(bytes) => bytes.len() / T::SIZE,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = T> + 'a {
        let (items, bytes): (&'a [T], &'a [u8]) = match *self {
            List::Items(items) => (items, &[]),
            List::Wire(bytes) => (&[], bytes),
        };
        items
            .iter()
            .copied()
            .chain(bytes.chunks_exact(T::SIZE).map(T::read))
    }
}

impl<T: Item> PartialEq for List<'_, T> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl<T: Item> fmt::Debug for List<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// The `N` little-endian bytes at the start of `bytes` (for [`Item::read`],
/// whose input has the item's exact size).
pub fn le<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0; N];
    out.copy_from_slice(&bytes[..N]);
    out
}
