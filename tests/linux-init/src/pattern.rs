//! The memory test's pattern: each 64-bit word holds a value derived from
//! its own virtual address and a seed, so a word that lands in the wrong
//! place (two pages backed by one frame, a lost or stale write) reads back
//! wrong. Volatile accesses keep the compiler from skipping the round trip
//! through memory.

use std::collections::TryReserveError;
use std::ptr;

/// The value of the word at `address`: a multiply-xorshift mix, cheap
/// enough for an emulator and different for every address and seed.
pub fn word(seed: u64, address: u64) -> u64 {
    let x = (address ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^ (x >> 29)
}

/// Folds one word into a checksum; the order of words matters.
fn fold(sum: u64, value: u64) -> u64 {
    sum.rotate_left(1) ^ value
}

/// Makes `words` hold `len` words of the pattern, written once each into
/// freshly reserved memory (no zeroing pass first: in an emulator every
/// pass costs seconds); returns the checksum of what was written.
pub fn fill(words: &mut Vec<u64>, len: usize, seed: u64) -> Result<u64, TryReserveError> {
    words.clear();
    words.try_reserve_exact(len)?;
    let mut sum = 0;
    for slot in &mut words.spare_capacity_mut()[..len] {
        let value = word(seed, slot.as_ptr() as u64);
        slot.write(value);
        sum = fold(sum, value);
    }
    // SAFETY: the first `len` words were written just above, within the
    // capacity reserved for them.
    unsafe { words.set_len(len) };
    Ok(sum)
}

/// What reading the pattern back found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readback {
    /// Checksum of the words as read.
    pub checksum: u64,
    /// Words that differ from the pattern.
    pub mismatches: u64,
    /// Index of the first such word.
    pub first_mismatch: Option<usize>,
}

/// Reads `words` back and compares each with the pattern.
pub fn verify(words: &[u64], seed: u64) -> Readback {
    let mut readback = Readback {
        checksum: 0,
        mismatches: 0,
        first_mismatch: None,
    };
    for (index, slot) in words.iter().enumerate() {
        let slot: *const u64 = slot;
        // SAFETY: `slot` comes from a live `&u64`.
        let value = unsafe { ptr::read_volatile(slot) };
        readback.checksum = fold(readback.checksum, value);
        if value != word(seed, slot as u64) {
            readback.mismatches += 1;
            readback.first_mismatch.get_or_insert(index);
        }
    }
    readback
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_matches_and_damage_is_found() {
        let mut words = Vec::new();
        let written = fill(&mut words, 4096, 0x1234).unwrap();
        assert_eq!(words.len(), 4096);
        let clean = verify(&words, 0x1234);
        assert_eq!(clean.checksum, written);
        assert_eq!(clean.mismatches, 0);
        assert_eq!(clean.first_mismatch, None);

        words[1000] ^= 1 << 17;
        words[3000] = 0;
        let damaged = verify(&words, 0x1234);
        assert_ne!(damaged.checksum, written);
        assert_eq!(damaged.mismatches, 2);
        assert_eq!(damaged.first_mismatch, Some(1000));
    }

    #[test]
    fn pattern_depends_on_address_and_seed() {
        let mut words = vec![1, 2, 3];
        fill(&mut words, 512, 7).unwrap();
        assert_eq!(words.len(), 512);
        // Swapping two words (a misplaced write) is seen.
        words.swap(10, 11);
        assert_eq!(verify(&words, 7).mismatches, 2);
        // Another seed reads every word as wrong.
        words.swap(10, 11);
        assert_eq!(verify(&words, 8).mismatches, 512);
        assert_ne!(word(1, 0x1000), word(1, 0x1008));
        assert_ne!(word(1, 0x1000), word(2, 0x1000));
    }
}
