//! The guest-physical layout of a PC, as the guest gets it: RAM below the
//! EBDA and from 1 MiB, the legacy area (EBDA, VGA window, option ROMs,
//! BIOS, where the ACPI tables live) backed by guest pages but reserved,
//! a hole below 4 GiB for the I/O APIC and local APIC pages, and RAM beyond
//! the hole moved above 4 GiB.

use alloc::vec::Vec;

use crate::loader::{MemoryKind, MemoryRegion};

/// Guest RAM below the legacy area (the EBDA page at 0x9F000 is not RAM).
pub const LOW_RAM_END: u64 = 0x9_f000;
/// The legacy area ends at 1 MiB.
pub const HIGH_RAM_START: u64 = 0x10_0000;
/// RAM below 4 GiB ends here at most; the rest is the MMIO hole.
pub const HOLE_START: u64 = 0xc000_0000;
pub const FOUR_GIB: u64 = 1 << 32;

/// What the guest-physical address space holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// RAM the guest is told about, sorted.
    pub ram: Vec<(u64, u64)>,
    /// Guest pages that back the reserved legacy area.
    pub legacy: (u64, u64),
    /// The memory map given to the guest: RAM, the legacy area and the
    /// MMIO pages (`mmio`), reserved, sorted by address.
    pub map: Vec<MemoryRegion>,
}

impl Layout {
    /// The layout of `memory_mib` MiB of RAM with the MMIO pages `mmio`
    /// (page-aligned, in the hole) reserved.
    pub fn new(memory_mib: u64, mmio: &[u64]) -> Self {
        let bytes = memory_mib << 20;
        let below = bytes.min(HOLE_START);
        let mut ram = alloc::vec![(0, LOW_RAM_END), (HIGH_RAM_START, below)];
        if bytes > HOLE_START {
            ram.push((FOUR_GIB, FOUR_GIB + (bytes - HOLE_START)));
        }
        let region = |start, end, kind| MemoryRegion { start, end, kind };
        let mut map: Vec<MemoryRegion> = ram
            .iter()
            .map(|&(start, end)| region(start, end, MemoryKind::Ram))
            .collect();
        map.push(region(LOW_RAM_END, HIGH_RAM_START, MemoryKind::Reserved));
        for &page in mmio {
            map.push(region(page, page + 4096, MemoryKind::Reserved));
        }
        map.sort_by_key(|e| e.start);
        map.dedup_by_key(|e| e.start);
        Self {
            ram,
            legacy: (LOW_RAM_END, HIGH_RAM_START),
            map,
        }
    }

    /// Every range backed by guest pages: RAM and the legacy area.
    pub fn backed(&self) -> Vec<(u64, u64)> {
        let mut all = self.ram.clone();
        all.push(self.legacy);
        all.sort_unstable();
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guests_are_one_block_from_1_mib_and_big_ones_skip_the_hole() {
        let small = Layout::new(32, &[0xfee0_0000]);
        assert_eq!(small.ram, [(0, 0x9_f000), (0x10_0000, 0x200_0000)]);
        assert_eq!(
            small
                .map
                .iter()
                .map(|e| (e.start, e.kind == MemoryKind::Ram))
                .collect::<Vec<_>>(),
            [
                (0, true),
                (0x9_f000, false),
                (0x10_0000, true),
                (0xfee0_0000, false)
            ]
        );
        let big = Layout::new(4096, &[0xfec0_0000, 0xfee0_0000]);
        assert_eq!(
            big.ram,
            [
                (0, 0x9_f000),
                (0x10_0000, HOLE_START),
                (FOUR_GIB, FOUR_GIB + 0x4000_0000)
            ]
        );
        let ram: u64 = big.ram.iter().map(|(s, e)| e - s).sum();
        assert_eq!(
            ram,
            (4096 << 20) - (HIGH_RAM_START - LOW_RAM_END),
            "all but the legacy area"
        );
        assert!(
            big.map.windows(2).all(|w| w[0].end <= w[1].start),
            "sorted, no overlap"
        );
        assert_eq!(
            big.backed()[1],
            (0x9_f000, 0x10_0000),
            "the legacy area is backed"
        );
    }
}
