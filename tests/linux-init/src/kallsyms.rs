//! The kernel's symbol table, read from its own image. Debian's kernel
//! package ships a placeholder System.map (the real one is in the 850 MB
//! `-dbg` package), but every kernel built with CONFIG_KALLSYMS carries
//! its symbols for /proc/kallsyms in compressed tables, which this module
//! finds in the uncompressed image (`vmlinux`, the bzImage's payload) and
//! decodes into System.map lines.
//!
//! The tables, as scripts/kallsyms emits them (CONFIG_KALLSYMS_BASE_RELATIVE,
//! Linux 4.6 to 6.3), each aligned to 8 bytes, in this order: `offsets`
//! (one i32 per symbol), `relative_base` (u64), `num_syms` (u32), `names`
//! (per symbol a length, then that many token codes; the first decoded
//! character is the symbol's type), `markers` (u32 offset into `names` of
//! every 256th symbol), since 6.2 (and in 6.1.y) `seqs_of_names` (3 bytes
//! per symbol), `token_table` (256 NUL-terminated strings), `token_index`
//! (u16 offset of each token). Codes of characters that occur in names stand for
//! themselves, so the tokens for `0`..`9` are the strings "0".."9": that
//! run is what locates the tables; every other part is then checked
//! against the ones next to it.

/// One symbol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Symbol {
    pub address: u64,
    /// `T`, `t`, `D`, ... as in System.map.
    pub kind: char,
    pub name: String,
}

impl Symbol {
    /// The System.map line.
    pub fn line(&self) -> String {
        format!("{:016x} {} {}", self.address, self.kind, self.name)
    }
}

const DIGIT_TOKENS: &[u8] = b"0\x001\x002\x003\x004\x005\x006\x007\x008\x009\x00";

fn u16_at(image: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(image.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(image: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(image.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(image: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(image.get(at..at + 8)?.try_into().ok()?))
}

fn align8_up(at: usize) -> usize {
    at.next_multiple_of(8)
}

/// The 256 tokens, given the table's start and its index.
struct Tokens {
    table_start: usize,
    tokens: Vec<Vec<u8>>,
}

/// Checks a token index candidate at `index_at` for the digit run at
/// `digits`: it must start at 0, and each entry must point just past the
/// previous token's NUL, with the digit tokens where they were found.
fn tokens_at(image: &[u8], digits: usize, index_at: usize) -> Option<Tokens> {
    let index: Vec<usize> = (0..256)
        .map(|i| u16_at(image, index_at + 2 * i).map(usize::from))
        .collect::<Option<_>>()?;
    if index[0] != 0 {
        return None;
    }
    let table_start = digits.checked_sub(index[usize::from(b'0')])?;
    let mut tokens = Vec::with_capacity(256);
    for (i, &offset) in index.iter().enumerate() {
        let start = table_start + offset;
        let len = image.get(start..index_at)?.iter().position(|&b| b == 0)?;
        if len == 0
            || index
                .get(i + 1)
                .is_some_and(|&next| next != offset + len + 1)
        {
            return None;
        }
        tokens.push(image[start..start + len].to_vec());
    }
    let end = table_start + index[255] + tokens[255].len() + 1;
    (align8_up(end) == index_at).then_some(Tokens {
        table_start,
        tokens,
    })
}

fn find_tokens(image: &[u8]) -> Option<Tokens> {
    let mut from = 0;
    while let Some(found) = find(&image[from..], DIGIT_TOKENS) {
        let digits = from + found;
        let after = digits + DIGIT_TOKENS.len();
        // The index follows the rest of the table (under 4 KiB of tokens).
        let mut at = align8_up(after);
        while at < (after + 4096).min(image.len()) {
            if let Some(tokens) = tokens_at(image, digits, at) {
                return Some(tokens);
            }
            at += 8;
        }
        from = digits + 1;
    }
    None
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Marker arrays that may end before the token table at `tokens_start`:
/// 8-aligned runs of u32 counting up from 0, that end (padded to 8)
/// either at the token table or before a gap that `seqs_of_names` (3
/// bytes per symbol, Linux 6.2 and 6.1.y) could fill. Longest first.
fn marker_candidates(image: &[u8], tokens_start: usize) -> Vec<(usize, Vec<usize>)> {
    const WINDOW: usize = 4 << 20;
    let mut candidates = Vec::new();
    let first = tokens_start.saturating_sub(WINDOW) & !7;
    for start in (first..tokens_start).step_by(8) {
        if u32_at(image, start) != Some(0) {
            continue;
        }
        let mut run = vec![0usize];
        while let Some(next) = u32_at(image, start + 4 * run.len()).map(|v| v as usize) {
            if next <= run[run.len() - 1] || start + 4 * run.len() >= tokens_start {
                break;
            }
            run.push(next);
        }
        for count in (1..=run.len()).rev() {
            let gap = tokens_start - align8_up(start + 4 * count);
            let (low, high) = ((count - 1) * 256 + 1, count * 256);
            if gap == 0 || (3 * low..=align8_up(3 * high)).contains(&gap) {
                candidates.push((start, run[..count].to_vec()));
            }
        }
    }
    candidates.sort_by_key(|(_, markers)| std::cmp::Reverse(markers.len()));
    candidates
}

/// Decodes `count` names from `start`; returns the names (type first) and
/// the offset of each 256th name relative to `start`, and the end.
fn decode_names(
    image: &[u8],
    start: usize,
    count: usize,
    tokens: &Tokens,
) -> Option<(Vec<Vec<u8>>, Vec<usize>, usize)> {
    let mut at = start;
    let mut names = Vec::with_capacity(count);
    let mut markers = Vec::with_capacity(count / 256 + 1);
    for i in 0..count {
        if i % 256 == 0 {
            markers.push(at - start);
        }
        let mut len = usize::from(*image.get(at)?);
        at += 1;
        // Names of 128 codes or more take a second length byte (Linux 6.1).
        if len & 0x80 != 0 {
            len = (len & 0x7f) | usize::from(*image.get(at)?) << 7;
            at += 1;
        }
        if len == 0 {
            return None;
        }
        let mut name = Vec::new();
        for &code in image.get(at..at + len)? {
            name.extend_from_slice(&tokens.tokens[usize::from(code)]);
        }
        at += len;
        names.push(name);
    }
    Some((names, markers, at))
}

/// The names that end at the markers at `markers_start`: num_syms sits 8
/// bytes before them and agrees with the number of markers, and decoding
/// that many names must reproduce the markers and end where they start.
/// Returns (count, start, names).
fn names_before(
    image: &[u8],
    markers_start: usize,
    markers: &[usize],
    tokens: &Tokens,
) -> Option<(usize, usize, Vec<Vec<u8>>)> {
    // The last 256 names take at least a byte each and at most a few hundred.
    const LAST_CHUNK_MAX: usize = 256 * 512;
    let (low, high) = ((markers.len() - 1) * 256 + 1, markers.len() * 256);
    let latest = markers_start.checked_sub(8 + markers[markers.len() - 1] + 1)? & !7;
    let earliest = latest.saturating_sub(LAST_CHUNK_MAX);
    (earliest..=latest).rev().step_by(8).find_map(|at| {
        let count = u32_at(image, at)? as usize;
        if !(low..=high).contains(&count) || u32_at(image, at + 4) != Some(0) {
            return None;
        }
        let (names, found, end) = decode_names(image, at + 8, count, tokens)?;
        (found == markers && align8_up(end) == markers_start).then_some((count, at + 8, names))
    })
}

/// Finds and decodes the symbol table of an uncompressed kernel image.
pub fn symbols(image: &[u8]) -> Result<Vec<Symbol>, String> {
    let tokens = find_tokens(image).ok_or("no kallsyms token table (digit tokens) found")?;
    let (count, names_start, names) = marker_candidates(image, tokens.table_start)
        .into_iter()
        .find_map(|(start, markers)| {
            let found = names_before(image, start, &markers, &tokens)?;
            // With seqs_of_names between, its size must match the count.
            let gap = tokens.table_start - align8_up(start + 4 * markers.len());
            (gap == 0 || gap == align8_up(3 * found.0)).then_some(found)
        })
        .ok_or("no kallsyms names and markers before the token table")?;
    let base_at = names_start - 16;
    let relative_base = u64_at(image, base_at).ok_or("no relative base")?;
    let offsets_start = base_at
        .checked_sub(align8_up(4 * count))
        .ok_or("offsets before the image")?;
    let offsets: Vec<i32> = (0..count)
        .map(|i| u32_at(image, offsets_start + 4 * i).map(|o| o as i32))
        .collect::<Option<_>>()
        .ok_or("offsets out of the image")?;
    // CONFIG_KALLSYMS_ABSOLUTE_PERCPU: non-negative offsets are absolute
    // (per-CPU symbols), negative ones count down from relative_base - 1.
    // Without it every offset is an unsigned distance from relative_base,
    // below 2 GiB, so none looks negative.
    let absolute_percpu = offsets.iter().any(|&o| o < 0);
    let address = |offset: i32| -> u64 {
        match (absolute_percpu, offset >= 0) {
            (true, true) => offset as u64,
            (true, false) => relative_base
                .wrapping_sub(1)
                .wrapping_sub(offset as i64 as u64),
            (false, _) => relative_base.wrapping_add(u64::from(offset as u32)),
        }
    };
    names
        .into_iter()
        .zip(offsets)
        .map(|(name, offset)| {
            let (&kind, rest) = name.split_first().ok_or("empty symbol name")?;
            Ok(Symbol {
                address: address(offset),
                kind: char::from(kind),
                name: String::from_utf8_lossy(rest).into_owned(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lays out kallsyms tables as scripts/kallsyms does, with a token
    /// set where codes 0x80.. stand for two-character tokens.
    fn image(symbols: &[(i32, &str)], relative_base: u64, big_name: bool, seqs: bool) -> Vec<u8> {
        let pairs = ["_t", "ex", "st", "ar", "ke", "rn", "el", "in"];
        let mut tokens: Vec<Vec<u8>> = (0..256u32).map(|c| vec![(c as u8).max(1)]).collect();
        for (i, pair) in pairs.iter().enumerate() {
            tokens[0x80 + i] = pair.as_bytes().to_vec();
        }
        let encode = |name: &str| -> Vec<u8> {
            let mut codes = Vec::new();
            let mut rest = name.as_bytes();
            while !rest.is_empty() {
                match pairs.iter().position(|p| rest.starts_with(p.as_bytes())) {
                    Some(i) => {
                        codes.push(0x80 + i as u8);
                        rest = &rest[2..];
                    }
                    None => {
                        codes.push(rest[0]);
                        rest = &rest[1..];
                    }
                }
            }
            codes
        };
        let pad = |out: &mut Vec<u8>| out.resize(align8_up(out.len()), 0);
        let mut out = b"unrelated bytes: 0\x001\x002\x00 and more".to_vec();
        pad(&mut out);
        for (offset, _) in symbols {
            out.extend_from_slice(&offset.to_le_bytes());
        }
        pad(&mut out);
        out.extend_from_slice(&relative_base.to_le_bytes());
        out.extend_from_slice(&(symbols.len() as u32).to_le_bytes());
        pad(&mut out);
        let names_start = out.len();
        let mut markers = Vec::new();
        for (i, (_, name)) in symbols.iter().enumerate() {
            if i % 256 == 0 {
                markers.push((out.len() - names_start) as u32);
            }
            let codes = encode(name);
            if big_name && i == 1 {
                out.extend_from_slice(&[
                    0x80 | (codes.len() as u8 & 0x7f),
                    (codes.len() >> 7) as u8,
                ]);
            } else {
                out.push(codes.len() as u8);
            }
            out.extend_from_slice(&codes);
        }
        pad(&mut out);
        for marker in markers {
            out.extend_from_slice(&marker.to_le_bytes());
        }
        pad(&mut out);
        if seqs {
            for i in 0..symbols.len() as u32 {
                out.extend_from_slice(&i.to_be_bytes()[1..]);
            }
            pad(&mut out);
        }
        let table_start = out.len();
        let mut index = Vec::new();
        for token in &tokens {
            index.push((out.len() - table_start) as u16);
            out.extend_from_slice(token);
            out.push(0);
        }
        pad(&mut out);
        for i in index {
            out.extend_from_slice(&i.to_le_bytes());
        }
        out.extend_from_slice(b"trailing data");
        out
    }

    const BASE: u64 = 0xffff_ffff_8100_0000;

    #[test]
    fn decodes_names_and_absolute_percpu_addresses() {
        let symbols = [
            (0x0, "Afixed_percpu_data"),
            (-1, "T_text"),
            (-1, "Tstartup_64"),
            (-0x123457, "Tstart_kernel"),
            (-0x200001, "dinit_task"),
        ];
        let found = super::symbols(&image(&symbols, BASE, false, false)).unwrap();
        let lines: Vec<String> = found.iter().map(Symbol::line).collect();
        assert_eq!(
            lines,
            [
                "0000000000000000 A fixed_percpu_data",
                "ffffffff81000000 T _text",
                "ffffffff81000000 T startup_64",
                "ffffffff81123456 T start_kernel",
                "ffffffff81200000 d init_task",
            ]
        );
    }

    #[test]
    fn relative_offsets_and_many_symbols_and_long_names() {
        let names: Vec<String> = (0..700).map(|i| format!("tsym_{i:04}_text")).collect();
        let mut symbols: Vec<(i32, &str)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (i as i32 * 16, n.as_str()))
            .collect();
        let long = format!("T{}", "x".repeat(300));
        symbols[1].1 = &long;
        let found = super::symbols(&image(&symbols, BASE, true, true)).unwrap();
        assert_eq!(found.len(), 700);
        assert_eq!(found[1].name.len(), 300);
        assert_eq!(found[699].line(), "ffffffff81002bb0 t sym_0699_text");
        assert_eq!(found[300].address, BASE + 300 * 16);
    }

    #[test]
    fn damaged_tables_are_refused() {
        let symbols = [(-1, "T_text"), (-0x10, "Tstart_kernel")];
        let good = image(&symbols, BASE, false, true);
        assert!(super::symbols(&good).is_ok());
        assert!(super::symbols(b"no tables here").is_err());
        // A name length that runs the names past the markers.
        let mut bad = good.clone();
        let at = find(&bad, &[4, b'T', 0x80]).unwrap();
        bad[at] = 5;
        assert!(super::symbols(&bad).is_err());
        // A token index entry that does not match the table.
        let mut bad = good;
        let index_at = bad.len() - b"trailing data".len() - 512;
        bad[index_at + 2 * 0x41] ^= 1;
        assert!(super::symbols(&bad).is_err());
    }
}
