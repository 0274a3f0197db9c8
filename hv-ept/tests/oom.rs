//! Out of frames at every allocation point: the p2m must come back exactly as
//! it was, with every frame it took given back.

mod common;

use common::*;
use hv_ept::sim::SimMemory;
use hv_ept::{DirtyBitmap, Error, Gfn, Mfn, Order, P2m, P2mAccess, P2mType, WriteFault};

const G1: u64 = 1 << 18;
const M2: u64 = 1 << 9;

fn with(f: impl Fn(&mut SimMemory, &mut P2m)) -> impl FnMut() -> (SimMemory, P2m) {
    move || {
        let (mut mem, mut p2m) = setup();
        f(&mut mem, &mut p2m);
        p2m.take_flush_needed();
        (mem, p2m)
    }
}

fn set(
    g: u64,
    order: Order,
    ty: P2mType,
) -> impl FnMut(&mut SimMemory, &mut P2m) -> Result<(), Error> {
    move |mem, p2m| p2m.set_entry(mem, Gfn(g), Mfn(g), order, ty, P2mAccess::Rwx)
}

#[test]
fn set_entry_into_an_empty_p2m() {
    let n = at_every_allocation_failure(
        with(|_, _| {}),
        set(G1 + M2 + 3, Order::PAGE_4K, P2mType::RamRw),
    );
    assert_eq!(n, 3, "PDPT, PD, PT");
    let n =
        at_every_allocation_failure(with(|_, _| {}), set(G1 * 5, Order::PAGE_1G, P2mType::RamRw));
    assert_eq!(n, 1);
}

#[test]
fn set_entry_splitting_superpages() {
    let one_g = with(|mem, p2m| {
        map(mem, p2m, G1, Order::PAGE_1G, 0);
        map(mem, p2m, 0, Order::PAGE_4K, 0);
    });
    assert_eq!(
        at_every_allocation_failure(one_g, set(G1 + M2 * 9 + 1, Order::PAGE_4K, P2mType::RamRo)),
        2
    );
    let one_g = with(|mem, p2m| map(mem, p2m, G1, Order::PAGE_1G, 0));
    assert_eq!(
        at_every_allocation_failure(one_g, set(G1 + M2 * 9, Order::PAGE_2M, P2mType::RamRo)),
        1
    );
    // Removing a page from a superpage needs a split as well.
    let two_m = with(|mem, p2m| map(mem, p2m, M2, Order::PAGE_2M, 0));
    assert_eq!(
        at_every_allocation_failure(two_m, set(M2 + 7, Order::PAGE_4K, P2mType::Invalid)),
        1
    );
    // With marks on the path (pushed down while descending).
    let marked = with(|mem, p2m| {
        map(mem, p2m, G1, Order::PAGE_1G, 0);
        map(mem, p2m, 3, Order::PAGE_4K, 0);
        p2m.change_type_range(
            mem,
            Gfn(G1 + 5),
            Gfn(G1 + 5),
            P2mType::RamRw,
            P2mType::RamLogdirty,
        )
        .unwrap();
        p2m.change_type_global(mem, P2mType::RamRw, P2mType::RamLogdirty)
            .unwrap();
    });
    assert_eq!(
        at_every_allocation_failure(marked, set(G1 + 5, Order::PAGE_4K, P2mType::RamRw)),
        2
    );
    // A superpage over a subtree allocates nothing.
    let subtree = with(|mem, p2m| map(mem, p2m, G1 + 3, Order::PAGE_4K, 0));
    assert_eq!(
        at_every_allocation_failure(subtree, set(G1, Order::PAGE_1G, P2mType::RamRw)),
        0
    );
}

#[test]
fn resolve_misconfig_splitting_a_straddling_superpage() {
    for (s, e, splits) in [(G1 + M2, G1 + 2 * M2 - 1, 1), (G1 + M2 + 4, G1 + M2 + 4, 2)] {
        let straddle = with(move |mem, p2m| {
            map(mem, p2m, G1, Order::PAGE_1G, 0);
            p2m.change_type_range(mem, Gfn(s), Gfn(e), P2mType::RamRw, P2mType::RamLogdirty)
                .unwrap();
        });
        let n = at_every_allocation_failure(straddle, |mem, p2m| {
            assert!(p2m.resolve_misconfig(mem, Gfn(s))?);
            Ok(())
        });
        assert_eq!(n, splits);
    }
}

#[test]
fn creating_a_p2m() {
    let mut mem = SimMemory::new();
    mem.fail_nth_alloc(1);
    assert_eq!(P2m::new(&mut mem, CAPS).err(), Some(Error::NoMemory));
    assert_eq!(mem.outstanding(), 0);
}

#[test]
fn log_dirty_write_fault_never_fails_for_want_of_frames() {
    for limit_extra in [0, 1] {
        let (mut mem, mut p2m) = setup();
        map(&mut mem, &mut p2m, G1, Order::PAGE_1G, 0);
        p2m.change_type_global(&mut mem, P2mType::RamRw, P2mType::RamLogdirty)
            .unwrap();
        mem.set_frame_limit(Some(mem.outstanding() + limit_extra));
        let mut dirty = DirtyBitmap::new();
        let r = p2m
            .logdirty_write_fault(&mut mem, &mut dirty, Gfn(G1 + 5))
            .unwrap();
        // The split needs two tables: with fewer, the whole 1G page is
        // made writable and logged, and no table is left half-used.
        assert_eq!(
            r,
            WriteFault::Coarse {
                gfn: Gfn(G1),
                order: Order::PAGE_1G
            }
        );
        assert_eq!(dirty.dirty_count(), G1);
        assert_eq!(snapshot(&mem, &p2m).tables, mem.outstanding());
        p2m.destroy(&mut mem);
        assert_eq!(mem.outstanding(), 0);
    }
}
