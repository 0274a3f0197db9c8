//! Frame numbers and mapping orders.

use core::fmt;

use crate::Error;

/// Entries per EPT table.
pub const ENTRIES: usize = 512;
/// Bits of a gfn used by one table level.
pub(crate) const LEVEL_BITS: u32 = 9;
/// Levels of a 4-level EPT: 3 is the PML4 (root), 0 the page table.
pub(crate) const ROOT_LEVEL: u8 = 3;

/// Guest frame number (guest-physical address >> 12).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Gfn(pub u64);

/// Machine frame number (host-physical address >> 12).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Mfn(pub u64);

impl Gfn {
    /// The last gfn a 4-level EPT translates (48-bit guest-physical addresses).
    pub const MAX: Gfn = Gfn((1 << 36) - 1);

    /// The guest-physical address of the frame.
    pub const fn gpa(self) -> u64 {
        self.0 << 12
    }

    /// `Err(GfnOutOfRange)` above [`Gfn::MAX`]: guest-supplied gfns are checked here.
    pub const fn check(self) -> Result<Gfn, Error> {
        if self.0 > Gfn::MAX.0 {
            Err(Error::GfnOutOfRange)
        } else {
            Ok(self)
        }
    }
}

impl Mfn {
    /// The host-physical address of the frame.
    pub const fn hpa(self) -> u64 {
        self.0 << 12
    }
}

impl fmt::Debug for Gfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Gfn({:#x})", self.0)
    }
}

impl fmt::Debug for Mfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mfn({:#x})", self.0)
    }
}

/// log2 of the number of 4K pages of a mapping: 0 (4K), 9 (2M) or 18 (1G).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Order(u8);

impl Order {
    pub const PAGE_4K: Order = Order(0);
    pub const PAGE_2M: Order = Order(9);
    pub const PAGE_1G: Order = Order(18);

    /// Validates an order that came from outside (a hypercall, a monitor).
    pub const fn new(order: u32) -> Result<Order, Error> {
        match order {
            0 | 9 | 18 => Ok(Order(order as u8)),
            _ => Err(Error::BadOrder),
        }
    }

    /// The order of an entry at `level` (0 = PTE, 1 = PDE, 2 = PDPTE).
    pub(crate) const fn of_level(level: u8) -> Order {
        Order(level * LEVEL_BITS as u8)
    }

    pub const fn get(self) -> u32 {
        self.0 as u32
    }

    /// The table level whose entries map this order.
    pub const fn level(self) -> u8 {
        self.0 / LEVEL_BITS as u8
    }

    /// Number of 4K pages.
    pub const fn pages(self) -> u64 {
        1 << self.0
    }

    /// Whether `frame` is a multiple of the mapping size.
    pub const fn aligned(self, frame: u64) -> bool {
        frame & (self.pages() - 1) == 0
    }
}

impl fmt::Debug for Order {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            0 => f.write_str("4K"),
            9 => f.write_str("2M"),
            _ => f.write_str("1G"),
        }
    }
}

/// Pages covered by one entry at `level` (level 3 = 512G).
pub(crate) const fn level_pages(level: u8) -> u64 {
    1 << (level as u32 * LEVEL_BITS)
}

/// Index of the entry for `gfn` in its table at `level`.
pub(crate) const fn index(gfn: u64, level: u8) -> usize {
    ((gfn >> (level as u32 * LEVEL_BITS)) & (ENTRIES as u64 - 1)) as usize
}

/// First gfn of the entry at `level` that covers `gfn`.
pub(crate) const fn level_base(gfn: u64, level: u8) -> u64 {
    gfn & !(level_pages(level) - 1)
}

/// Splits the inclusive range `[start, end]` into the fewest naturally aligned
/// 4K/2M/1G blocks, in gfn order: the strides in which a range is removed or
/// replaced with `set_entry`.
pub fn aligned_blocks(start: Gfn, end: Gfn) -> impl Iterator<Item = (Gfn, Order)> {
    let mut next = Some(start.0).filter(|&s| s <= end.0);
    core::iter::from_fn(move || {
        let gfn = next?;
        let order = [Order::PAGE_1G, Order::PAGE_2M, Order::PAGE_4K]
            .into_iter()
            .find(|o| o.aligned(gfn) && gfn + (o.pages() - 1) <= end.0)
            .unwrap_or(Order::PAGE_4K);
        next = gfn.checked_add(order.pages()).filter(|&n| n <= end.0);
        Some((Gfn(gfn), order))
    })
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    #[test]
    fn order_accepts_only_4k_2m_1g() {
        for o in 0..64 {
            assert_eq!(Order::new(o).is_ok(), matches!(o, 0 | 9 | 18), "order {o}");
        }
        assert_eq!(Order::PAGE_2M.level(), 1);
        assert_eq!(Order::PAGE_1G.pages(), 1 << 18);
        assert!(Order::PAGE_2M.aligned(0x200) && !Order::PAGE_2M.aligned(0x201));
    }

    #[test]
    fn gfn_bound_is_48_bit() {
        assert!(Gfn(0xf_ffff_ffff).check().is_ok());
        assert_eq!(Gfn(0x10_0000_0000).check(), Err(Error::GfnOutOfRange));
    }

    #[test]
    fn aligned_blocks_cover_exactly_and_greedily() {
        let blocks: Vec<_> = aligned_blocks(Gfn(0x1ff), Gfn(0x40400)).collect();
        assert_eq!(blocks.first(), Some(&(Gfn(0x1ff), Order::PAGE_4K)));
        assert!(!blocks.contains(&(Gfn(0x40000), Order::PAGE_1G)));
        let mut next = 0x1ff;
        for &(g, o) in &blocks {
            assert_eq!(g.0, next);
            assert!(o.aligned(g.0));
            next = g.0 + o.pages();
        }
        assert_eq!(next, 0x40401);
        // 0x200..0x3ffff is 511 2M blocks... then 0x40000..0x40400 is 2M + 4K pieces.
        assert_eq!(
            blocks.iter().filter(|b| b.1 == Order::PAGE_2M).count(),
            511 + 2
        );
        let whole: Vec<_> = aligned_blocks(Gfn(0), Gfn((1 << 18) - 1)).collect();
        assert_eq!(whole, [(Gfn(0), Order::PAGE_1G)]);
        assert_eq!(aligned_blocks(Gfn(5), Gfn(4)).count(), 0);
        assert_eq!(aligned_blocks(Gfn::MAX, Gfn::MAX).count(), 1);
    }
}
