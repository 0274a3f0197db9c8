//! Guest memory images: the guest paused, its RAM read page by page along
//! its memory map, written as a raw image (file offset = guest-physical
//! address, holes left sparse) and/or in LiME format (one 32-byte header
//! per contiguous range, then its bytes), which volatility3 and other
//! memory-forensics tools read.

use std::io::{self, Seek, SeekFrom, Write};

use hv_control::{ALL_VCPUS, PAGE_SIZE, Range};

use crate::client::{Client, Error, Result};
use crate::transport::Transport;

/// LiME's header magic ("EMiL" little-endian) and version.
pub const LIME_MAGIC: u32 = 0x4c69_4d45;
pub const LIME_VERSION: u32 = 1;
pub const LIME_HEADER_LEN: usize = 32;

/// The LiME header of `range`: magic, version, first and last address
/// (inclusive), 8 reserved bytes.
pub fn lime_header(range: &Range) -> [u8; LIME_HEADER_LEN] {
    let mut h = [0u8; LIME_HEADER_LEN];
    h[0..4].copy_from_slice(&LIME_MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&LIME_VERSION.to_le_bytes());
    h[8..16].copy_from_slice(&range.start.to_le_bytes());
    h[16..24].copy_from_slice(&range.last().to_le_bytes());
    h
}

/// Where a dump goes.
pub struct Sinks<'a> {
    pub raw: Option<&'a mut (dyn WriteSeek + 'a)>,
    pub lime: Option<&'a mut (dyn Write + 'a)>,
}

/// A raw image needs seeking (holes between ranges).
pub trait WriteSeek: Write + Seek {}
impl<T: Write + Seek> WriteSeek for T {}

/// What a dump covered.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dumped {
    pub ranges: Vec<Range>,
    pub bytes: u64,
}

/// Pauses every vCPU, writes the ranges of the memory map (or `only`,
/// clipped to it) to the sinks, resumes. `progress` is called after each
/// page with the bytes done and the total.
pub fn dump<T: Transport>(
    client: &mut Client<T>,
    only: Option<Range>,
    sinks: Sinks<'_>,
    mut progress: impl FnMut(u64, u64),
) -> Result<Dumped> {
    let map = client.memory_map()?;
    let ranges: Vec<Range> = match only {
        None => map,
        Some(want) => map.iter().filter_map(|r| clip(r, &want)).collect(),
    };
    client.pause(ALL_VCPUS)?;
    let result = write_ranges(client, &ranges, sinks, &mut progress);
    // Resumed whatever happened, so that a failed dump does not leave the
    // guest paused.
    let resumed = client.resume(ALL_VCPUS);
    let bytes = result?;
    resumed?;
    Ok(Dumped { ranges, bytes })
}

/// The part of `range` inside `want`, whole pages.
fn clip(range: &Range, want: &Range) -> Option<Range> {
    let page = PAGE_SIZE as u64;
    let start = range.start.max(want.start) & !(page - 1);
    let end = (range.start + range.len).min(want.start.saturating_add(want.len));
    let end = end.div_ceil(page) * page;
    (start < end).then(|| Range {
        start,
        len: end - start,
    })
}

fn write_ranges<T: Transport>(
    client: &mut Client<T>,
    ranges: &[Range],
    mut sinks: Sinks<'_>,
    progress: &mut impl FnMut(u64, u64),
) -> Result<u64> {
    let total: u64 = ranges.iter().map(|r| r.len).sum();
    let mut done = 0u64;
    let io = |e: io::Error| Error::Io(e);
    let mut raw_end = 0u64;
    for range in ranges {
        if let Some(lime) = sinks.lime.as_mut() {
            lime.write_all(&lime_header(range)).map_err(io)?;
        }
        if let Some(raw) = sinks.raw.as_mut() {
            raw.seek(SeekFrom::Start(range.start)).map_err(io)?;
        }
        let mut at = range.start;
        while at < range.start + range.len {
            let n = (range.start + range.len - at).min(PAGE_SIZE as u64) as usize;
            let page = client.read_memory(at, n)?;
            if let Some(lime) = sinks.lime.as_mut() {
                lime.write_all(&page).map_err(io)?;
            }
            if let Some(raw) = sinks.raw.as_mut() {
                raw.write_all(&page).map_err(io)?;
            }
            at += n as u64;
            done += n as u64;
            progress(done, total);
        }
        raw_end = raw_end.max(range.start + range.len);
    }
    if let Some(raw) = sinks.raw.as_mut() {
        // A trailing hole still counts in the image's size.
        raw.seek(SeekFrom::Start(raw_end)).map_err(io)?;
        raw.flush().map_err(io)?;
    }
    if let Some(lime) = sinks.lime.as_mut() {
        lime.flush().map_err(io)?;
    }
    Ok(done)
}

/// Reads a LiME image back: its ranges and where each one's bytes start.
pub fn parse_lime(image: &[u8]) -> std::result::Result<Vec<(Range, usize)>, String> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < image.len() {
        let h = image
            .get(at..at + LIME_HEADER_LEN)
            .ok_or_else(|| format!("truncated LiME header at {at}"))?;
        let word = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().unwrap());
        let quad = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().unwrap());
        if word(0) != LIME_MAGIC || word(4) != LIME_VERSION {
            return Err(format!("no LiME header at {at}"));
        }
        let (start, last) = (quad(8), quad(16));
        if last < start {
            return Err(format!("LiME range ends before it starts at {at}"));
        }
        let len = last - start + 1;
        let data = at + LIME_HEADER_LEN;
        at = data
            .checked_add(usize::try_from(len).map_err(|e| e.to_string())?)
            .filter(|&end| end <= image.len())
            .ok_or_else(|| format!("LiME range at {start:#x} runs past the image"))?;
        out.push((Range { start, len }, data));
    }
    Ok(out)
}
