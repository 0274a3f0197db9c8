//! set_entry/get_entry, splits, holes, the bound, suppress-#VE, INVEPT
//! tracking, iteration, reset and frame accounting.

mod common;

use std::ops::ControlFlow;

use common::*;
use hv_ept::walk::{AccessKind, EptFault};
use hv_ept::{EptCaps, EptEntry, Error, Gfn, Leaf, Mfn, Order, P2m, P2mAccess, P2mType};

const G1: u64 = 1 << 18;
const M2: u64 = 1 << 9;

#[test]
fn set_and_get_at_every_order() {
    let (mut mem, mut p2m) = setup();
    p2m.set_entry(
        &mut mem,
        Gfn(5),
        Mfn(0x777),
        Order::PAGE_4K,
        P2mType::RamRo,
        P2mAccess::R,
    )
    .unwrap();
    p2m.set_entry(
        &mut mem,
        Gfn(M2 * 3),
        Mfn(0x1000 * M2),
        Order::PAGE_2M,
        P2mType::MmioDirect,
        P2mAccess::Rw,
    )
    .unwrap();
    p2m.set_entry(
        &mut mem,
        Gfn(G1 * 2),
        Mfn(G1 * 7),
        Order::PAGE_1G,
        P2mType::RamRw,
        P2mAccess::Rx,
    )
    .unwrap();

    let e = p2m.get_entry(&mem, Gfn(5)).unwrap();
    assert_eq!(
        (e.mfn, e.ty, e.access, e.order),
        (
            Some(Mfn(0x777)),
            P2mType::RamRo,
            P2mAccess::R,
            Order::PAGE_4K
        )
    );
    let e = p2m.get_entry(&mem, Gfn(M2 * 3 + 17)).unwrap();
    assert_eq!(
        (e.mfn, e.ty, e.order),
        (
            Some(Mfn(0x1000 * M2 + 17)),
            P2mType::MmioDirect,
            Order::PAGE_2M
        )
    );
    let e = p2m.get_entry(&mem, Gfn(G1 * 2 + 0x12345)).unwrap();
    assert_eq!(
        (e.mfn, e.access, e.order),
        (Some(Mfn(G1 * 7 + 0x12345)), P2mAccess::Rx, Order::PAGE_1G)
    );
    assert!(e.sve && !e.recalc);

    // The CPU sees the same thing.
    let t = walk(&mut mem, &p2m, M2 * 3 + 17, AccessKind::Write).unwrap();
    assert_eq!(
        (t.hpa >> 12, t.emt, t.page),
        (0x1000 * M2 + 17, hv_ept::EMT_UC, Order::PAGE_2M)
    );
    assert!(matches!(
        walk(&mut mem, &p2m, 5, AccessKind::Write),
        Err(EptFault::Violation { .. })
    ));
    assert!(matches!(
        walk(&mut mem, &p2m, G1 * 2, AccessKind::Write),
        Err(EptFault::Violation { .. })
    ));
    assert_eq!(
        walk(&mut mem, &p2m, G1 * 2 + 1, AccessKind::Fetch)
            .unwrap()
            .emt,
        hv_ept::EMT_WB
    );
}

#[test]
fn hole_orders() {
    let (mut mem, mut p2m) = setup();
    // Empty p2m: gfn 0 is under an empty root slot.
    assert_eq!(p2m.get_entry(&mem, Gfn(0)).unwrap().order, Order::PAGE_1G);
    map(&mut mem, &mut p2m, M2 + 1, Order::PAGE_4K, 0);
    let hole = |p2m: &P2m, mem: &hv_ept::sim::SimMemory, g: u64| {
        let e = p2m.get_entry(mem, Gfn(g)).unwrap();
        assert_eq!((e.mfn, e.ty), (None, P2mType::Invalid), "gfn {g:#x}");
        e.order
    };
    assert_eq!(hole(&p2m, &mem, 0), Order::PAGE_2M, "empty PDE");
    assert_eq!(
        hole(&p2m, &mem, M2),
        Order::PAGE_4K,
        "empty PTE beside the mapping"
    );
    // Above the bound the answer comes without a walk.
    mem.reset_counters();
    assert_eq!(
        hole(&p2m, &mem, M2 + 2),
        Order::PAGE_4K,
        "same 2M block as the bound"
    );
    assert_eq!(hole(&p2m, &mem, 2 * M2), Order::PAGE_2M);
    assert_eq!(hole(&p2m, &mem, G1 + 5), Order::PAGE_1G);
    assert_eq!(hole(&p2m, &mem, Gfn::MAX.0), Order::PAGE_1G);
    assert_eq!(
        mem.entry_reads(),
        0,
        "get_entry above max_mapped_pfn reads nothing"
    );
    assert_eq!(
        p2m.get_entry(&mem, Gfn(Gfn::MAX.0 + 1)),
        Err(Error::GfnOutOfRange)
    );
}

/// Children of a split carry the parent's type, access, memory type and
/// suppress-#VE, with the frame offset.
fn assert_uniform_children(
    mem: &hv_ept::sim::SimMemory,
    p2m: &P2m,
    base: u64,
    pages: u64,
    mfn0: u64,
    skip: u64,
) {
    let mut seen = 0;
    let flow = p2m
        .for_each_leaf(mem, Gfn(base), Gfn(base + pages - 1), |l: &Leaf| {
            if l.gfn.0 != skip {
                assert_eq!(l.mfn.0, mfn0 + (l.gfn.0 - base), "{l:?}");
                assert_eq!(
                    (l.ty, l.access, l.sve),
                    (P2mType::RamRo, P2mAccess::Rx, false),
                    "{l:?}"
                );
            }
            seen += l.order.pages();
            ControlFlow::Continue(())
        })
        .unwrap();
    assert!(flow.is_continue());
    assert_eq!(seen, pages);
}

#[test]
fn split_at_every_level() {
    for (inner, tables) in [(Order::PAGE_2M, 1), (Order::PAGE_4K, 2)] {
        let (mut mem, mut p2m) = setup();
        let mfn0 = 5 * G1;
        p2m.set_entry_sve(
            &mut mem,
            Gfn(G1),
            Mfn(mfn0),
            Order::PAGE_1G,
            P2mType::RamRo,
            P2mAccess::Rx,
            Some(false),
        )
        .unwrap();
        let frames = mem.outstanding();
        let g = G1 + 7 * M2;
        p2m.set_entry(
            &mut mem,
            Gfn(g),
            Mfn(0x42 << 9),
            inner,
            P2mType::RamRw,
            P2mAccess::Rwx,
        )
        .unwrap();
        assert_eq!(
            mem.outstanding(),
            frames + tables,
            "one table per level split"
        );
        let e = p2m.get_entry(&mem, Gfn(g)).unwrap();
        assert_eq!(
            (e.mfn, e.ty, e.order),
            (Some(Mfn(0x42 << 9)), P2mType::RamRw, inner)
        );
        assert!(!e.sve, "sve kept from the split parent");
        assert_uniform_children(&mem, &p2m, G1, G1, mfn0, g);
        let leaves = raw_leaves(&mem, &p2m).len();
        assert_eq!(leaves, if tables == 1 { 512 } else { 511 + 512 });
    }
    // 2M -> 4K.
    let (mut mem, mut p2m) = setup();
    p2m.set_entry_sve(
        &mut mem,
        Gfn(M2),
        Mfn(9 * M2),
        Order::PAGE_2M,
        P2mType::RamRo,
        P2mAccess::Rx,
        Some(false),
    )
    .unwrap();
    p2m.set_entry(
        &mut mem,
        Gfn(M2 + 3),
        Mfn(1),
        Order::PAGE_4K,
        P2mType::Invalid,
        P2mAccess::N,
    )
    .unwrap();
    assert_eq!(p2m.get_entry(&mem, Gfn(M2 + 3)).unwrap().mfn, None);
    let mut n = 0;
    let flow = p2m
        .for_each_leaf(&mem, Gfn(0), Gfn::MAX, |l| {
            assert_eq!(
                (l.order, l.mfn.0 - 9 * M2, l.ty),
                (Order::PAGE_4K, l.gfn.0 - M2, P2mType::RamRo)
            );
            n += 1;
            ControlFlow::Continue(())
        })
        .unwrap();
    assert!(flow.is_continue());
    assert_eq!(n, 511);
}

#[test]
fn a_superpage_over_a_subtree_frees_its_tables() {
    let (mut mem, mut p2m) = setup();
    let empty = mem.outstanding(); // the root
    for i in 0..4 {
        map(&mut mem, &mut p2m, G1 + i * M2 + 1, Order::PAGE_4K, 0); // 4 page tables
    }
    map(&mut mem, &mut p2m, 3, Order::PAGE_4K, 0);
    assert_eq!(mem.outstanding(), empty + 1 + 2 + 4 + 1); // PDPT, 2 PDs, 4+1 PTs
    map(&mut mem, &mut p2m, G1, Order::PAGE_2M, 0);
    assert_eq!(mem.outstanding(), empty + 1 + 2 + 3 + 1);
    p2m.take_flush_needed();
    map(&mut mem, &mut p2m, G1, Order::PAGE_1G, 0);
    assert_eq!(
        mem.outstanding(),
        empty + 1 + 1 + 1,
        "the PD and its 3 PTs went back"
    );
    assert!(p2m.take_flush_needed(), "a freed subtree needs an INVEPT");
    // Removing at 1G frees the remaining subtree under gfn 0.
    p2m.set_entry(
        &mut mem,
        Gfn(0),
        Mfn(0),
        Order::PAGE_1G,
        P2mType::Invalid,
        P2mAccess::N,
    )
    .unwrap();
    assert_eq!(mem.outstanding(), empty + 1);
    assert_eq!(raw_leaves(&mem, &p2m).len(), 1);
    p2m.destroy(&mut mem);
    assert_eq!(mem.outstanding(), 0);
}

#[test]
fn table_frames_counts_what_the_tables_hold_of_memory() {
    // The p2m's frames are all tables here: the count must follow every
    // allocation and every freed subtree exactly.
    let (mut mem, mut p2m) = setup();
    let held = |mem: &hv_ept::sim::SimMemory| mem.outstanding() as u64;
    assert_eq!(p2m.table_frames(&mem), 1, "the root alone");
    for i in 0..4 {
        map(&mut mem, &mut p2m, G1 + i * M2 + 1, Order::PAGE_4K, 0);
    }
    map(&mut mem, &mut p2m, 3, Order::PAGE_4K, 0);
    map(&mut mem, &mut p2m, 5 * G1, Order::PAGE_1G, 0);
    assert_eq!(p2m.table_frames(&mem), 1 + 1 + 2 + 4 + 1);
    assert_eq!(p2m.table_frames(&mem), held(&mem));
    // A 2M page replaces a page table; a 1G page a directory and its tables.
    map(&mut mem, &mut p2m, G1, Order::PAGE_2M, 0);
    assert_eq!(p2m.table_frames(&mem), held(&mem));
    map(&mut mem, &mut p2m, G1, Order::PAGE_1G, 0);
    assert_eq!(p2m.table_frames(&mem), 1 + 1 + 1 + 1);
    assert_eq!(p2m.table_frames(&mem), held(&mem));
    p2m.reset(&mut mem);
    assert_eq!(p2m.table_frames(&mem), 1);
    p2m.destroy(&mut mem);
    assert_eq!(mem.outstanding(), 0);
}

#[test]
fn removing_from_a_hole_allocates_nothing() {
    let (mut mem, mut p2m) = setup();
    map(&mut mem, &mut p2m, 0, Order::PAGE_4K, 0);
    let before = snapshot(&mem, &p2m);
    for (g, o) in [
        (G1 * 9, Order::PAGE_4K),
        (M2 * 5, Order::PAGE_2M),
        (7, Order::PAGE_4K),
    ] {
        p2m.set_entry(&mut mem, Gfn(g), Mfn(0), o, P2mType::Invalid, P2mAccess::N)
            .unwrap();
    }
    assert_eq!(snapshot(&mem, &p2m), before);
}

#[test]
fn bad_input_is_refused_without_change() {
    let (mut mem, mut p2m) = setup();
    map(&mut mem, &mut p2m, M2, Order::PAGE_2M, 0);
    let before = snapshot(&mem, &p2m);
    let rw = P2mType::RamRw;
    let cases = [
        (
            Gfn(Gfn::MAX.0 + 1),
            Mfn(0),
            Order::PAGE_4K,
            P2mAccess::Rwx,
            Error::GfnOutOfRange,
        ),
        (
            Gfn(M2 + 1),
            Mfn(0),
            Order::PAGE_2M,
            P2mAccess::Rwx,
            Error::Misaligned,
        ),
        (
            Gfn(G1),
            Mfn(M2),
            Order::PAGE_1G,
            P2mAccess::Rwx,
            Error::Misaligned,
        ),
        (
            Gfn(0),
            Mfn(1 << 34),
            Order::PAGE_4K,
            P2mAccess::Rwx,
            Error::MfnOutOfRange,
        ),
        (
            Gfn(0),
            Mfn(1),
            Order::PAGE_4K,
            P2mAccess::W,
            Error::UnsupportedAccess,
        ),
        (
            Gfn(0),
            Mfn(1),
            Order::PAGE_4K,
            P2mAccess::Wx,
            Error::UnsupportedAccess,
        ),
    ];
    for (g, m, o, a, err) in cases {
        assert_eq!(
            p2m.set_entry(&mut mem, g, m, o, rw, a),
            Err(err),
            "{g:?} {m:?} {o:?} {a:?}"
        );
    }
    assert_eq!(Order::new(12), Err(Error::BadOrder));
    assert_eq!(
        p2m.change_type_range(
            &mut mem,
            Gfn(5),
            Gfn(4),
            P2mType::RamRw,
            P2mType::RamLogdirty
        ),
        Err(Error::BadRange)
    );
    assert_eq!(
        p2m.change_type_range(&mut mem, Gfn(0), Gfn(4), P2mType::RamRw, P2mType::RamRo),
        Err(Error::UnsupportedTypeChange)
    );
    assert_eq!(
        p2m.resolve_misconfig(&mut mem, Gfn(1 << 40)),
        Err(Error::GfnOutOfRange)
    );
    assert_eq!(
        p2m.set_suppress_ve(&mut mem, Gfn(0), false),
        Err(Error::NotMapped)
    );
    assert_eq!(snapshot(&mem, &p2m), before);

    // What the CPU lacks is refused too.
    let caps = EptCaps {
        exec_only: false,
        pages_1g: false,
        ad_flags: false,
        ..EptCaps::ALL
    };
    let mut small = P2m::new(&mut mem, caps).unwrap();
    assert_eq!(
        small.set_entry(&mut mem, Gfn(0), Mfn(0), Order::PAGE_4K, rw, P2mAccess::X),
        Err(Error::UnsupportedAccess)
    );
    assert_eq!(
        small.set_entry(&mut mem, Gfn(0), Mfn(0), Order::PAGE_1G, rw, P2mAccess::R),
        Err(Error::BadOrder)
    );
    assert_eq!(small.set_ad_enabled(true), Err(Error::Unsupported));
    small.destroy(&mut mem);
}

#[test]
fn max_mapped_pfn_grows_only_through_set_entry() {
    let (mut mem, mut p2m) = setup();
    assert_eq!(p2m.max_mapped_pfn(), Gfn(0));
    map(&mut mem, &mut p2m, M2 * 4, Order::PAGE_2M, 0);
    assert_eq!(
        p2m.max_mapped_pfn(),
        Gfn(M2 * 5 - 1),
        "last gfn the entry covers"
    );
    map(&mut mem, &mut p2m, 3, Order::PAGE_4K, 0);
    assert_eq!(p2m.max_mapped_pfn(), Gfn(M2 * 5 - 1), "never lowered");
    p2m.set_entry(
        &mut mem,
        Gfn(G1 * 3),
        Mfn(0),
        Order::PAGE_1G,
        P2mType::Invalid,
        P2mAccess::N,
    )
    .unwrap();
    p2m.set_entry(
        &mut mem,
        Gfn(M2 * 4),
        Mfn(0),
        Order::PAGE_2M,
        P2mType::Invalid,
        P2mAccess::N,
    )
    .unwrap();
    assert_eq!(
        p2m.max_mapped_pfn(),
        Gfn(M2 * 5 - 1),
        "removal does not move it"
    );
    p2m.change_type_range(
        &mut mem,
        Gfn(0),
        Gfn::MAX,
        P2mType::RamRw,
        P2mType::RamLogdirty,
    )
    .unwrap();
    p2m.resolve_misconfig(&mut mem, Gfn(3)).unwrap();
    assert_eq!(
        p2m.max_mapped_pfn(),
        Gfn(M2 * 5 - 1),
        "type changes do not move it"
    );
    map(&mut mem, &mut p2m, G1, Order::PAGE_1G, 0);
    assert_eq!(p2m.max_mapped_pfn(), Gfn(2 * G1 - 1));
    // reset: the only way down, with the tables gone.
    p2m.reset(&mut mem);
    assert_eq!(p2m.max_mapped_pfn(), Gfn(0));
    assert_eq!(mem.outstanding(), 1);
    assert!(raw_leaves(&mem, &p2m).is_empty());
    assert!(
        p2m.logdirty().ranges().next().is_some(),
        "log-dirty state survives a reset"
    );
}

#[test]
fn suppress_ve_bits() {
    let (mut mem, mut p2m) = setup();
    map(&mut mem, &mut p2m, M2, Order::PAGE_2M, 0);
    // Fresh tables are all "empty, #VE suppressed".
    walk_tables(&mem, p2m.root(), 3, 0, &mut |_, _, _, raw| {
        assert!(raw & (1 << 63) != 0 || EptEntry(raw).is_present());
    });
    p2m.set_suppress_ve(&mut mem, Gfn(M2 + 9), false).unwrap();
    let e = p2m.get_entry(&mem, Gfn(M2 + 9)).unwrap();
    assert!(!e.sve && e.order == Order::PAGE_4K && e.mfn == Some(Mfn(M2 + 9)));
    assert!(p2m.get_entry(&mem, Gfn(M2 + 8)).unwrap().sve);
    // The CPU reports the leaf's bit with a permission violation.
    p2m.set_entry(
        &mut mem,
        Gfn(M2 + 9),
        Mfn(M2 + 9),
        Order::PAGE_4K,
        P2mType::RamRw,
        P2mAccess::R,
    )
    .unwrap();
    match walk(&mut mem, &p2m, M2 + 9, AccessKind::Write) {
        Err(EptFault::Violation {
            suppress_ve, level, ..
        }) => assert!(!suppress_ve && level == 0),
        other => panic!("{other:?}"),
    }
    // Explicit sve on set_entry, and removal keeps the slot's bit.
    p2m.set_entry_sve(
        &mut mem,
        Gfn(M2 + 9),
        Mfn(0),
        Order::PAGE_4K,
        P2mType::Invalid,
        P2mAccess::N,
        None,
    )
    .unwrap();
    match walk(&mut mem, &p2m, M2 + 9, AccessKind::Read) {
        Err(EptFault::Violation { suppress_ve, .. }) => assert!(!suppress_ve),
        other => panic!("{other:?}"),
    }
}

#[test]
fn eptp_value() {
    let (mut mem, mut p2m) = setup();
    assert_eq!(p2m.eptp(), p2m.root().hpa() | 6 | 3 << 3);
    p2m.set_ad_enabled(true).unwrap();
    assert_eq!(p2m.eptp(), p2m.root().hpa() | 6 | 3 << 3 | 1 << 6);
    map(&mut mem, &mut p2m, 0, Order::PAGE_4K, 0x100);
    walk(&mut mem, &p2m, 0, AccessKind::Write).unwrap();
    assert!(
        p2m.get_entry(&mem, Gfn(0)).unwrap().mfn == Some(Mfn(0x100)),
        "A/D bits do not disturb the p2m"
    );
}

#[test]
fn invept_is_requested_exactly_when_rights_shrink() {
    let (mut mem, mut p2m) = setup();
    let set = |mem: &mut hv_ept::sim::SimMemory, p2m: &mut P2m, m: u64, ty, a| {
        p2m.set_entry(mem, Gfn(0), Mfn(m), Order::PAGE_4K, ty, a)
            .unwrap();
        p2m.take_flush_needed()
    };
    use P2mAccess::*;
    use P2mType::*;
    assert!(!set(&mut mem, &mut p2m, 1, RamRo, R), "new mapping");
    assert!(!set(&mut mem, &mut p2m, 1, RamRw, Rwx), "more rights");
    assert!(set(&mut mem, &mut p2m, 1, RamRw, Rx), "W dropped");
    assert!(set(&mut mem, &mut p2m, 2, RamRw, Rx), "other frame");
    assert!(
        set(&mut mem, &mut p2m, 2, MmioDirect, Rx),
        "other memory type"
    );
    assert!(!set(&mut mem, &mut p2m, 2, MmioDirect, Rx), "no change");
    assert!(set(&mut mem, &mut p2m, 2, Invalid, N), "dropped");
    assert!(!set(&mut mem, &mut p2m, 2, Invalid, N), "hole to hole");
    // A split alone does not, a mark does, a resolution does not.
    map(&mut mem, &mut p2m, M2, Order::PAGE_2M, 0);
    p2m.take_flush_needed();
    map(&mut mem, &mut p2m, M2, Order::PAGE_4K, 0);
    assert!(!p2m.take_flush_needed());
    p2m.change_type_range(&mut mem, Gfn(M2), Gfn(M2 + 5), RamRw, RamLogdirty)
        .unwrap();
    assert!(p2m.take_flush_needed());
    p2m.resolve_misconfig(&mut mem, Gfn(M2)).unwrap();
    assert!(!p2m.take_flush_needed());
    // Marking nothing (a range with no present entry) asks for nothing.
    p2m.change_type_range(&mut mem, Gfn(G1), Gfn(2 * G1), RamRw, RamLogdirty)
        .unwrap();
    assert!(!p2m.take_flush_needed());
}

#[test]
fn for_each_leaf_and_any_present_skip_empty_subtrees() {
    let (mut mem, mut p2m) = setup();
    map(&mut mem, &mut p2m, 3, Order::PAGE_4K, 0);
    map(&mut mem, &mut p2m, 300 * G1, Order::PAGE_1G, 0);
    mem.reset_counters();
    let mut got = vec![];
    let flow = p2m
        .for_each_leaf(&mem, Gfn(0), Gfn::MAX, |l| {
            got.push((l.gfn.0, l.order));
            ControlFlow::Continue(())
        })
        .unwrap();
    assert!(flow.is_continue());
    assert_eq!(got, [(3, Order::PAGE_4K), (300 * G1, Order::PAGE_1G)]);
    // Root (2 slots used but 512 read), PDPT 0 and 1, PD, PT: far fewer than a
    // per-gfn scan would need.
    assert!(mem.entry_reads() <= 512 * 5, "{} reads", mem.entry_reads());
    assert!(p2m.any_present(&mem, Gfn(0), Gfn(3)).unwrap());
    assert!(!p2m.any_present(&mem, Gfn(4), Gfn(300 * G1 - 1)).unwrap());
    assert!(
        p2m.any_present(&mem, Gfn(300 * G1 + 5), Gfn(300 * G1 + 5))
            .unwrap()
    );
    assert!(!p2m.any_present(&mem, Gfn(301 * G1), Gfn::MAX).unwrap());
    // A range is removed by aligned strides.
    for (g, o) in hv_ept::aligned_blocks(Gfn(2), Gfn(301 * G1 - 1)) {
        p2m.set_entry(&mut mem, g, Mfn(0), o, P2mType::Invalid, P2mAccess::N)
            .unwrap();
    }
    assert!(!p2m.any_present(&mem, Gfn(0), Gfn::MAX).unwrap());
}

#[test]
fn many_p2ms_share_one_memory_and_give_everything_back() {
    let mut mem = hv_ept::sim::SimMemory::new();
    let mut p2ms: Vec<P2m> = (0..8).map(|_| P2m::new(&mut mem, CAPS).unwrap()).collect();
    for (i, p) in p2ms.iter_mut().enumerate() {
        let i = i as u64;
        map(&mut mem, p, i * G1 + 1, Order::PAGE_4K, 0);
        map(&mut mem, p, (i + 1) * G1 + M2, Order::PAGE_2M, 0);
        p.change_type_global(&mut mem, P2mType::RamRw, P2mType::RamLogdirty)
            .unwrap();
    }
    // Each: root, PDPT, PD + PT for the 4K page, PD for the 2M page.
    assert_eq!(mem.outstanding(), 8 * 5);
    for p in p2ms {
        p.destroy(&mut mem);
    }
    assert_eq!(mem.outstanding(), 0);
}

/// Access `n` leaves R/W/X all clear: the CPU sees "not present", but the p2m
/// still holds a mapping there (found by get_entry, split, marked, freed).
#[test]
fn a_mapping_without_rights_is_still_a_mapping() {
    let (mut mem, mut p2m) = setup();
    p2m.set_entry(
        &mut mem,
        Gfn(M2),
        Mfn(7 * M2),
        Order::PAGE_2M,
        P2mType::RamRw,
        P2mAccess::N,
    )
    .unwrap();
    let e = p2m.get_entry(&mem, Gfn(M2 + 1)).unwrap();
    assert_eq!(
        (e.mfn, e.ty, e.access, e.order),
        (
            Some(Mfn(7 * M2 + 1)),
            P2mType::RamRw,
            P2mAccess::N,
            Order::PAGE_2M
        )
    );
    match walk(&mut mem, &p2m, M2 + 1, AccessKind::Read) {
        Err(EptFault::Violation {
            level,
            qualification,
            ..
        }) => {
            assert_eq!(level, 1);
            assert!(!qualification.intersects(hv_ept::walk::ViolationQual::READABLE));
        }
        other => panic!("{other:?}"),
    }
    // Splitting it keeps the other 511 pages mapped.
    p2m.set_entry(
        &mut mem,
        Gfn(M2 + 1),
        Mfn(7 * M2 + 1),
        Order::PAGE_4K,
        P2mType::RamRw,
        P2mAccess::Rwx,
    )
    .unwrap();
    assert_eq!(
        p2m.get_entry(&mem, Gfn(M2 + 2)).unwrap().mfn,
        Some(Mfn(7 * M2 + 2))
    );
    assert!(walk(&mut mem, &p2m, M2 + 1, AccessKind::Write).is_ok());
    // A type change reaches it; dropping rights on a mapping asks for INVEPT.
    p2m.take_flush_needed();
    p2m.change_type_range(
        &mut mem,
        Gfn(M2),
        Gfn(M2 + 2),
        P2mType::RamRw,
        P2mType::RamLogdirty,
    )
    .unwrap();
    assert_eq!(
        p2m.get_entry(&mem, Gfn(M2 + 2)).unwrap().ty,
        P2mType::RamLogdirty
    );
    assert!(p2m.take_flush_needed());
    p2m.set_entry(
        &mut mem,
        Gfn(M2 + 1),
        Mfn(7 * M2 + 1),
        Order::PAGE_4K,
        P2mType::RamRw,
        P2mAccess::N,
    )
    .unwrap();
    assert!(p2m.take_flush_needed());
}
