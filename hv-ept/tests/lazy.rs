//! Lazy type changes through misconfiguration, the dirty log, and the
//! scenarios of the design note, driven the way hardware drives them.

mod common;

use std::collections::BTreeSet;
use std::ops::ControlFlow;

use common::*;
use hv_ept::sim::SimMemory;
use hv_ept::walk::{AccessKind, EptFault};
use hv_ept::{DirtyBitmap, Gfn, Mfn, Order, P2m, P2mAccess, P2mType, WriteFault};

const G1: u64 = 1 << 18;
const M2: u64 = 1 << 9;
const G512: u64 = 1 << 27;
use P2mType::{RamLogdirty as Logdirty, RamRw as Rw};

fn ty(mem: &SimMemory, p2m: &P2m, g: u64) -> P2mType {
    p2m.get_entry(mem, Gfn(g)).unwrap().ty
}

/// Layout used by several tests: a 4K page at 1, a 2M page at 2M, a 1G page
/// at 1G, a 4K page in the second 512G region.
fn layout() -> (SimMemory, P2m) {
    let (mut mem, mut p2m) = setup();
    map(&mut mem, &mut p2m, 1, Order::PAGE_4K, 0);
    map(&mut mem, &mut p2m, M2, Order::PAGE_2M, 0);
    map(&mut mem, &mut p2m, G1, Order::PAGE_1G, 0);
    map(&mut mem, &mut p2m, G512 + 7, Order::PAGE_4K, 0);
    p2m.take_flush_needed();
    (mem, p2m)
}

#[test]
fn a_mark_on_every_level_and_its_resolution() {
    // (range, the single mark expected, a gfn under it)
    let cases = [
        ((0, G512 - 1), (3, 0), 1),          // whole 512G region: the PML4E
        ((G1, 2 * G1 - 1), (2, G1), G1 + 5), // the 1G page
        ((0, G1 - 1), (2, 0), M2 + 3),       // the PDPTE over the PD
        ((M2, 2 * M2 - 1), (1, M2), M2),     // the 2M page
        ((0, M2 - 1), (1, 0), 1),            // the PDE over the PT
        ((1, 1), (0, 1), 1),                 // one PTE
    ];
    for ((s, e), mark, g) in cases {
        let (mut mem, mut p2m) = layout();
        p2m.change_type_range(&mut mem, Gfn(s), Gfn(e), Rw, Logdirty)
            .unwrap();
        assert_eq!(marks(&mem, &p2m), [mark], "range {s:#x}-{e:#x}");
        assert!(p2m.take_flush_needed());
        match walk(&mut mem, &p2m, g, AccessKind::Read) {
            Err(EptFault::Misconfig { level, .. }) => assert_eq!(level, mark.0),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            ty(&mem, &p2m, g),
            Logdirty,
            "get_entry reports the new type before resolution"
        );
        let leaves = raw_leaves(&mem, &p2m)
            .iter()
            .map(|l| (l.0, l.2 & hv_ept::ADDR_MASK))
            .collect::<Vec<_>>();
        assert!(p2m.resolve_misconfig(&mut mem, Gfn(g)).unwrap());
        assert!(
            !p2m.resolve_misconfig(&mut mem, Gfn(g)).unwrap(),
            "nothing left to fix"
        );
        let t = walk(&mut mem, &p2m, g, AccessKind::Read).unwrap();
        assert_eq!(t.hpa >> 12, g);
        assert!(matches!(
            walk(&mut mem, &p2m, g, AccessKind::Write),
            Err(EptFault::Violation { .. })
        ));
        let after = raw_leaves(&mem, &p2m)
            .iter()
            .map(|l| (l.0, l.2 & hv_ept::ADDR_MASK))
            .collect::<Vec<_>>();
        assert_eq!(
            leaves, after,
            "resolution never changes what is mapped where"
        );
        assert!(!p2m.flush_needed(), "resolution needs no INVEPT");
    }
}

#[test]
fn marks_are_pushed_down_one_level_at_a_time() {
    let (mut mem, mut p2m) = layout();
    map(&mut mem, &mut p2m, 2 * G1 + 3 * M2 + 4, Order::PAGE_4K, 0);
    p2m.change_type_global(&mut mem, Rw, Logdirty).unwrap();
    assert_eq!(marks(&mem, &p2m), [(3, 0), (3, G512)]);
    // Resolving gfn 1 clears its path. Pushing into the PDPT fixes the 1G leaf
    // at once (uniform) and marks the two PDPTEs; pushing into PD 0 marks
    // PDE 0 and fixes the 2M leaf; the PT is fixed whole.
    p2m.resolve_misconfig(&mut mem, Gfn(1)).unwrap();
    assert_eq!(marks(&mem, &p2m), [(2, 2 * G1), (3, G512)]);
    assert_eq!(
        walk(&mut mem, &p2m, G1 + 9, AccessKind::Read).unwrap().hpa >> 12,
        G1 + 9
    );
    assert!(matches!(
        walk(&mut mem, &p2m, 2 * G1 + 3 * M2 + 4, AccessKind::Read),
        Err(EptFault::Misconfig { level: 2, .. })
    ));
    for g in [1, M2 + 1, G1 + 1, 2 * G1 + 3 * M2 + 4, G512 + 7] {
        assert_eq!(ty(&mem, &p2m, g), Logdirty, "gfn {g:#x}");
    }
}

#[test]
fn the_one_page_range_at_the_bound_is_marked() {
    let (mut mem, mut p2m) = setup();
    map(&mut mem, &mut p2m, 0x1234, Order::PAGE_4K, 0);
    assert_eq!(p2m.max_mapped_pfn(), Gfn(0x1234));
    p2m.change_type_range(&mut mem, Gfn(0x1234), Gfn(0x1234), Rw, Logdirty)
        .unwrap();
    assert_eq!(marks(&mem, &p2m), [(0, 0x1234)]);
    let mut dirty = DirtyBitmap::new();
    let (r, exits) = guest_access(&mut mem, &mut p2m, &mut dirty, 0x1234, AccessKind::Write);
    r.unwrap();
    assert_eq!(
        exits,
        Exits {
            misconfigs: 1,
            logdirty_faults: 1,
            pml_full: 0,
        }
    );
    assert!(dirty.is_dirty(Gfn(0x1234)));
}

#[test]
fn marks_are_the_fewest_highest_covering_entries() {
    let (mut mem, mut p2m) = setup();
    for g in 0..4 * M2 {
        map(&mut mem, &mut p2m, g, Order::PAGE_4K, 0);
    }
    map(&mut mem, &mut p2m, G1, Order::PAGE_1G, 0);
    p2m.set_entry(
        &mut mem,
        Gfn(M2 + 5),
        Mfn(0),
        Order::PAGE_4K,
        P2mType::MmioDirect,
        P2mAccess::Rw,
    )
    .unwrap();
    mem.reset_counters();
    // Head in PT 0, PT 1 whole, tail in PT 2: the PDEs of PT 0 and PT 2 are
    // marked whole (scoped) rather than 511 PTEs each.
    p2m.change_type_range(&mut mem, Gfn(1), Gfn(3 * M2 - 2), Rw, Logdirty)
        .unwrap();
    assert_eq!(mem.entry_writes(), 3);
    assert_eq!(marks(&mem, &p2m), [(1, 0), (1, M2), (1, 2 * M2)]);
    mem.reset_counters();
    p2m.change_type_range(&mut mem, Gfn(2 * G1 - 1), Gfn(2 * G1 + 5), Rw, Logdirty)
        .unwrap();
    assert_eq!(
        mem.entry_writes(),
        1,
        "a superpage partly covered is marked whole"
    );
    // Already covered by a mark: nothing to write. MMIO leaves are skipped.
    mem.reset_counters();
    p2m.change_type_range(&mut mem, Gfn(M2), Gfn(M2 + 9), Rw, Logdirty)
        .unwrap();
    assert_eq!(mem.entry_writes(), 0);
    p2m.resolve_misconfig(&mut mem, Gfn(M2)).unwrap();
    mem.reset_counters();
    p2m.change_type_range(&mut mem, Gfn(M2 + 5), Gfn(M2 + 5), Logdirty, Rw)
        .unwrap();
    assert_eq!(mem.entry_writes(), 0, "mmio_direct is not changeable");
    assert_eq!(ty(&mem, &p2m, M2 + 5), P2mType::MmioDirect);
    // A range of a few entries stays exact, with no scoped mark.
    let (mut mem, mut p2m) = setup();
    for g in 0..8 * M2 {
        map(&mut mem, &mut p2m, g, Order::PAGE_4K, 0);
    }
    mem.reset_counters();
    p2m.change_type_range(&mut mem, Gfn(2 * M2), Gfn(6 * M2 - 1), Rw, Logdirty)
        .unwrap();
    assert_eq!(mem.entry_writes(), 4);
    assert_eq!(
        marks(&mem, &p2m),
        [(1, 2 * M2), (1, 3 * M2), (1, 4 * M2), (1, 5 * M2)]
    );
}

/// 4 GiB mapped with every page size: 4K pages in the first two and the
/// last 2M blocks of GiB 0 and in the first and last two of GiB 3, 2M pages
/// in the rest of those two GiB, 1G pages for GiB 1 and 2.
fn mixed() -> (SimMemory, P2m) {
    let (mut mem, mut p2m) = setup();
    for gib in [0, 3] {
        for k in 0..512 {
            let b = gib * G1 + k * M2;
            if [0, 1, 511].contains(&k) || (gib == 3 && k == 510) {
                for g in b..b + M2 {
                    map(&mut mem, &mut p2m, g, Order::PAGE_4K, 0);
                }
            } else {
                map(&mut mem, &mut p2m, b, Order::PAGE_2M, 0);
            }
        }
    }
    map(&mut mem, &mut p2m, G1, Order::PAGE_1G, 0);
    map(&mut mem, &mut p2m, 2 * G1, Order::PAGE_1G, 0);
    (mem, p2m)
}

#[test]
fn at_most_two_writes_per_level_per_end_whatever_the_alignment() {
    // Ends at every kind of offset from both edges of the mapping. Below the
    // root, each end costs at most 2 writes per level; these ranges cover no
    // root entry whole, so at most 16 writes in all.
    let offsets = [
        0,
        1,
        2,
        511,
        512,
        513,
        2 * M2 - 1,
        2 * M2 + 1,
        5 * M2 + 3,
        G1 - 1,
        G1,
        G1 + 1,
    ];
    let (mut mem, mut p2m) = mixed();
    for &a in &offsets {
        for &b in &offsets {
            let (s, e) = (a, 4 * G1 - 1 - b);
            for (from, to) in [(Rw, Logdirty), (Logdirty, Rw)] {
                mem.reset_counters();
                p2m.change_type_range(&mut mem, Gfn(s), Gfn(e), from, to)
                    .unwrap();
                let w = mem.entry_writes();
                assert!(w <= 16, "[{s:#x}, {e:#x}]: {w} writes");
                // Resolve everything before the next range.
                let mut g = 0;
                while g < 4 * G1 {
                    p2m.resolve_misconfig(&mut mem, Gfn(g)).unwrap();
                    g += M2;
                }
                for g in [0, 1, M2, G1 + 3, 3 * G1 + 7, 4 * G1 - 1] {
                    let e = p2m.get_entry(&mem, Gfn(g)).unwrap();
                    assert!(!e.recalc, "{g:#x} still marked");
                }
            }
        }
    }
    // The bench's case, small: [s + 1, e - 1] over 64 MiB of 4K pages is
    // one scoped PDPTE.
    let (mut mem, mut p2m) = setup();
    for g in 0..32 * M2 {
        map(&mut mem, &mut p2m, g, Order::PAGE_4K, 0);
    }
    mem.reset_counters();
    p2m.change_type_range(&mut mem, Gfn(1), Gfn(32 * M2 - 2), Rw, Logdirty)
        .unwrap();
    assert_eq!(mem.entry_writes(), 1);
    assert_eq!(marks(&mem, &p2m), [(2, 0)]);
}

#[test]
fn scoped_marks_recompute_only_the_range() {
    // PTs 0..3 (4K pages); beside the range, pages whose stored type
    // disagrees with the log-dirty state: gfn 0 mapped ram_logdirty outside
    // any range, gfn 3M-1 dirtied (ram_rw) inside a tracked range.
    let (mut mem, mut p2m) = setup();
    for g in 0..4 * M2 {
        map(&mut mem, &mut p2m, g, Order::PAGE_4K, 0);
    }
    p2m.set_entry(
        &mut mem,
        Gfn(0),
        Mfn(0),
        Order::PAGE_4K,
        Logdirty,
        P2mAccess::Rwx,
    )
    .unwrap();
    let last = 3 * M2 - 1;
    p2m.change_type_range(&mut mem, Gfn(last), Gfn(4 * M2 - 1), Rw, Logdirty)
        .unwrap();
    let mut dirty = DirtyBitmap::new();
    let (r, _) = guest_access(&mut mem, &mut p2m, &mut dirty, last, AccessKind::Write);
    r.unwrap();
    assert_eq!(ty(&mem, &p2m, last), Rw);
    for g in 0..4 * M2 {
        p2m.resolve_misconfig(&mut mem, Gfn(g)).unwrap();
    }
    p2m.take_flush_needed();

    mem.reset_counters();
    p2m.change_type_range(&mut mem, Gfn(1), Gfn(last - 1), Rw, Logdirty)
        .unwrap();
    assert_eq!(mem.entry_writes(), 3, "PDE 0 and PDE 2 scoped, PDE 1 exact");
    // Before and after resolution: the neighbours keep their types.
    let want = |g: u64| match g {
        0 => Logdirty,
        g if g == last => Rw,
        g if g < last => Logdirty,
        _ => Logdirty,
    };
    for g in [0, 1, M2 - 1, M2, last - 1, last, last + 1] {
        assert_eq!(ty(&mem, &p2m, g), want(g), "before, gfn {g:#x}");
        let e = p2m.get_entry(&mem, Gfn(g)).unwrap();
        assert_eq!(e.retype, g != 0 && g != last && g < last, "gfn {g:#x}");
    }
    // Touching a neighbour beside the range costs one exit (the scoped mark
    // above it), and leaves it as it was.
    for g in [0, last] {
        let (r, exits) = guest_access(&mut mem, &mut p2m, &mut dirty, g, AccessKind::Read);
        r.unwrap();
        assert_eq!(exits.misconfigs, 1, "gfn {g:#x}");
    }
    for g in 0..4 * M2 {
        p2m.resolve_misconfig(&mut mem, Gfn(g)).unwrap();
        assert_eq!(ty(&mem, &p2m, g), want(g), "after, gfn {g:#x}");
    }
    assert!(marks(&mem, &p2m).is_empty());
    // A write to the dirtied page beside the range is not trapped; one
    // inside is.
    assert!(walk(&mut mem, &p2m, last, AccessKind::Write).is_ok());
    assert!(walk(&mut mem, &p2m, 0, AccessKind::Write).is_err());
    assert!(walk(&mut mem, &p2m, 5, AccessKind::Write).is_err());
}

#[test]
fn a_superpage_straddling_a_log_dirty_boundary_is_split() {
    // One 2M block inside a 1G page: one split. One 4K page: two.
    for (s, e, tables) in [
        (G1 + 3 * M2, G1 + 4 * M2 - 1, 1),
        (G1 + 3 * M2 + 7, G1 + 3 * M2 + 7, 2),
    ] {
        let (mut mem, mut p2m) = setup();
        map(&mut mem, &mut p2m, G1, Order::PAGE_1G, 0);
        p2m.change_type_range(&mut mem, Gfn(s), Gfn(e), Rw, Logdirty)
            .unwrap();
        assert_eq!(marks(&mem, &p2m), [(2, G1)]);
        // Before resolution, get_entry already tells what the pieces will be.
        let inside = p2m.get_entry(&mem, Gfn(s)).unwrap();
        let order = if e - s + 1 == M2 {
            Order::PAGE_2M
        } else {
            Order::PAGE_4K
        };
        assert_eq!(
            (inside.ty, inside.order, inside.mfn),
            (Logdirty, order, Some(Mfn(s)))
        );
        let outside = p2m.get_entry(&mem, Gfn(G1)).unwrap();
        assert_eq!((outside.ty, outside.order), (Rw, Order::PAGE_2M));
        let frames = mem.outstanding();
        assert!(p2m.resolve_misconfig(&mut mem, Gfn(s)).unwrap());
        assert_eq!(mem.outstanding(), frames + tables);
        for g in [G1, s - 1, s, e, e + 1, 2 * G1 - 1] {
            let want = if (s..=e).contains(&g) { Logdirty } else { Rw };
            assert_eq!(ty(&mem, &p2m, g), want, "gfn {g:#x}");
            let t = walk(&mut mem, &p2m, g, AccessKind::Write);
            assert_eq!(t.is_ok(), want == Rw, "gfn {g:#x}: {t:?}");
        }
    }
}

#[test]
fn set_entry_resolves_marks_on_its_path_first() {
    let (mut mem, mut p2m) = layout();
    p2m.change_type_range(&mut mem, Gfn(0), Gfn(G1 - 1), Rw, Logdirty)
        .unwrap();
    assert_eq!(marks(&mem, &p2m), [(2, 0)]);
    // An explicit ram_rw page under the marked PDPTE keeps its type: the mark
    // was pushed out of its path before the write.
    map(&mut mem, &mut p2m, 3, Order::PAGE_4K, 0);
    assert_eq!(ty(&mem, &p2m, 3), Rw);
    assert!(walk(&mut mem, &p2m, 3, AccessKind::Write).is_ok());
    assert_eq!(
        ty(&mem, &p2m, 1),
        Logdirty,
        "its neighbour still follows the range"
    );
    assert_eq!(ty(&mem, &p2m, M2 + 2), Logdirty);
    // Splitting a marked superpage hands the mark to the children.
    p2m.change_type_range(&mut mem, Gfn(M2), Gfn(2 * M2 - 1), Logdirty, Rw)
        .unwrap();
    p2m.change_type_range(&mut mem, Gfn(M2), Gfn(M2 + 1), Rw, Logdirty)
        .unwrap();
    map(&mut mem, &mut p2m, M2 + 100, Order::PAGE_4K, 0);
    let mut dirty = DirtyBitmap::new();
    for (g, want) in [
        (M2, Logdirty),
        (M2 + 1, Logdirty),
        (M2 + 2, Rw),
        (M2 + 100, Rw),
    ] {
        assert_eq!(ty(&mem, &p2m, g), want, "gfn {g:#x}");
        let (r, _) = guest_access(&mut mem, &mut p2m, &mut dirty, g, AccessKind::Read);
        r.unwrap();
        assert_eq!(ty(&mem, &p2m, g), want, "gfn {g:#x} after resolution");
    }
}

#[test]
fn writes_to_log_dirty_pages_are_logged_then_rearmed() {
    let (mut mem, mut p2m) = setup();
    // A 16M "framebuffer" in 2M pages, some RAM around it.
    let fb = 0xf000;
    for i in 0..8 {
        map(&mut mem, &mut p2m, fb + i * M2, Order::PAGE_2M, 0x10_0000);
    }
    map(&mut mem, &mut p2m, 0, Order::PAGE_2M, 0);
    p2m.change_type_range(&mut mem, Gfn(fb), Gfn(fb + 8 * M2 - 1), Rw, Logdirty)
        .unwrap();
    let mut dirty = DirtyBitmap::new();
    let written = [fb, fb + 1, fb + 700, fb + 8 * M2 - 1];
    for g in written.into_iter().chain([0, 5]) {
        let (r, exits) = guest_access(&mut mem, &mut p2m, &mut dirty, g, AccessKind::Write);
        assert_eq!(
            r.unwrap().hpa >> 12,
            g + if g >= fb { 0x10_0000 } else { 0 }
        );
        assert_eq!(exits.logdirty_faults, u32::from(g >= fb), "gfn {g:#x}");
    }
    // Second writes do not fault; reads never do.
    let (_, exits) = guest_access(&mut mem, &mut p2m, &mut dirty, fb + 1, AccessKind::Write);
    assert_eq!(exits, Exits::default());
    guest_access(&mut mem, &mut p2m, &mut dirty, fb + 2, AccessKind::Read)
        .0
        .unwrap();
    let mut got = BTreeSet::new();
    dirty.fetch_and_clear(Gfn(0), Gfn::MAX, |g| {
        got.insert(g.0);
    });
    assert_eq!(got, written.into_iter().collect());
    // Split precisely: only the written pages became writable.
    assert_eq!(ty(&mem, &p2m, fb + 2), Logdirty);
    // Re-arm and write again: logged again.
    p2m.change_type_range(&mut mem, Gfn(fb), Gfn(fb + 8 * M2 - 1), Rw, Logdirty)
        .unwrap();
    let (_, exits) = guest_access(&mut mem, &mut p2m, &mut dirty, fb + 1, AccessKind::Write);
    assert_eq!(exits.logdirty_faults, 1);
    assert!(dirty.is_dirty(Gfn(fb + 1)) && dirty.dirty_count() == 1);
    // Stop tracking: writes no longer fault.
    p2m.change_type_range(&mut mem, Gfn(fb), Gfn(fb + 8 * M2 - 1), Logdirty, Rw)
        .unwrap();
    let (_, exits) = guest_access(&mut mem, &mut p2m, &mut dirty, fb + 3, AccessKind::Write);
    assert_eq!(exits.logdirty_faults, 0);
}

#[test]
fn write_fault_handler_outcomes() {
    let (mut mem, mut p2m) = setup();
    map(&mut mem, &mut p2m, G1, Order::PAGE_1G, 0);
    map(&mut mem, &mut p2m, 0, Order::PAGE_4K, 0);
    p2m.change_type_global(&mut mem, Rw, Logdirty).unwrap();
    let mut dirty = DirtyBitmap::new();
    // Precise: the 1G page is split down to the page written.
    let frames = mem.outstanding();
    assert_eq!(
        p2m.logdirty_write_fault(&mut mem, &mut dirty, Gfn(G1 + 5)),
        Ok(WriteFault::Precise)
    );
    assert_eq!(mem.outstanding(), frames + 2);
    assert_eq!(
        (ty(&mem, &p2m, G1 + 5), ty(&mem, &p2m, G1 + 6)),
        (Rw, Logdirty)
    );
    assert_eq!(dirty.dirty_count(), 1);
    // Already writable: logged, nothing else.
    assert_eq!(
        p2m.logdirty_write_fault(&mut mem, &mut dirty, Gfn(G1 + 5)),
        Ok(WriteFault::NotLogdirty)
    );
    // Out of frames: the 2M page around the gfn goes writable whole, every
    // page of it logged.
    mem.set_frame_limit(Some(mem.outstanding()));
    let g = G1 + 7 * M2 + 3;
    assert_eq!(
        p2m.logdirty_write_fault(&mut mem, &mut dirty, Gfn(g)),
        Ok(WriteFault::Coarse {
            gfn: Gfn(G1 + 7 * M2),
            order: Order::PAGE_2M
        })
    );
    assert_eq!(dirty.dirty_count(), 1 + 512);
    assert!(walk(&mut mem, &p2m, G1 + 7 * M2 + 511, AccessKind::Write).is_ok());
    assert_eq!(ty(&mem, &p2m, G1 + 8 * M2), Logdirty);
}

#[test]
fn global_log_dirty_reaches_every_page_and_can_be_copied() {
    let (mut mem, mut host) = layout();
    let mut dirty = DirtyBitmap::new();
    host.change_type_global(&mut mem, Rw, Logdirty).unwrap();
    for g in [1, M2 + 1, G1 + 1, G512 + 7] {
        let (r, exits) = guest_access(&mut mem, &mut host, &mut dirty, g, AccessKind::Write);
        r.unwrap();
        assert_eq!(exits.logdirty_faults, 1, "gfn {g:#x}");
    }
    assert_eq!(dirty.dirty_count(), 4);
    // A second p2m (a view) with its own copy of the state.
    let mut view = P2m::new(&mut mem, CAPS).unwrap();
    map(&mut mem, &mut view, M2, Order::PAGE_2M, 0);
    view.copy_logdirty_from(&mut mem, &host).unwrap();
    assert!(view.logdirty().global());
    assert_eq!(
        ty(&mem, &view, M2 + 9),
        Logdirty,
        "existing entries follow the copied state"
    );
    host.change_type_global(&mut mem, Logdirty, Rw).unwrap();
    assert_eq!(ty(&mem, &host, M2 + 9), Rw);
    assert_eq!(
        ty(&mem, &view, M2 + 9),
        Logdirty,
        "each p2m has its own state"
    );
    view.destroy(&mut mem);
    host.destroy(&mut mem);
    assert_eq!(mem.outstanding(), 0);
}

/// The seed bug at this crate's level: a view (second p2m over the same
/// memory) copies the framebuffer lazily as writable early; later the
/// framebuffer goes under log-dirty. The change must reach the view (clipped
/// to the view's own bound, inclusively) and writes through the view must be
/// logged.
#[test]
fn seed_scenario_change_type_before_and_after_lazy_copies() {
    let mut mem = SimMemory::new();
    let mut host = P2m::new(&mut mem, CAPS).unwrap();
    let fb = 0xe000;
    for i in 0..4 {
        map(&mut mem, &mut host, fb + i * M2, Order::PAGE_2M, 0x4_0000);
    }
    map(&mut mem, &mut host, 0, Order::PAGE_2M, 0);
    let mut view = P2m::new(&mut mem, CAPS).unwrap();
    assert_eq!(view.max_mapped_pfn(), Gfn(0), "a fresh view starts at 0");
    let mut dirty = DirtyBitmap::new();

    // Lazy copy: on a violation in the view, copy the host's effective entry.
    let lazy_copy = |mem: &mut SimMemory, host: &P2m, view: &mut P2m, g: u64| {
        let e = host.get_entry(mem, Gfn(g)).unwrap();
        let base = g & !(e.order.pages() - 1);
        let mfn = e.mfn.unwrap().0 - (g - base);
        view.set_entry(mem, Gfn(base), Mfn(mfn), e.order, e.ty, P2mAccess::Rwx)
            .unwrap();
    };
    // The guest touches the first framebuffer page through the view early.
    assert!(matches!(
        walk(&mut mem, &view, fb, AccessKind::Write),
        Err(EptFault::Violation { .. })
    ));
    lazy_copy(&mut mem, &host, &mut view, fb);
    assert!(walk(&mut mem, &view, fb, AccessKind::Write).is_ok());
    assert_eq!(view.max_mapped_pfn(), Gfn(fb + M2 - 1));

    // Log-dirty starts: applied to the host and the view, each clipped to its bound.
    for p in [&mut host, &mut view] {
        p.change_type_range(&mut mem, Gfn(fb), Gfn(fb + 4 * M2 - 1), Rw, Logdirty)
            .unwrap();
    }
    assert_eq!(marks(&mem, &view), [(1, fb)]);
    // A write through the view: misconfig resolved in the view, then the
    // log-dirty fault logs the gfn and makes it writable in the host; the
    // caller propagates to the view (here: drop the view's entry, recopy).
    let g = fb + 3;
    let (r, exits) = guest_access(&mut mem, &mut view, &mut dirty, g, AccessKind::Write);
    r.unwrap();
    assert_eq!(
        exits,
        Exits {
            misconfigs: 1,
            logdirty_faults: 1,
            pml_full: 0,
        }
    );
    assert!(dirty.is_dirty(Gfn(g)));
    assert_eq!(
        host.logdirty_write_fault(&mut mem, &mut dirty, Gfn(g)),
        Ok(WriteFault::Precise)
    );
    assert_eq!(ty(&mem, &host, g), Rw);
    assert_eq!(ty(&mem, &host, g + 1), Logdirty);

    // After the change: a page first copied now gets the host's recomputed type.
    let later = fb + 2 * M2 + 8;
    assert_eq!(
        ty(&mem, &host, later),
        Logdirty,
        "host entry still marked, reported recomputed"
    );
    lazy_copy(&mut mem, &host, &mut view, later);
    let (r, exits) = guest_access(&mut mem, &mut view, &mut dirty, later, AccessKind::Write);
    r.unwrap();
    assert_eq!(
        exits.logdirty_faults, 1,
        "a write through a later copy is logged too"
    );
    assert!(dirty.is_dirty(Gfn(later)));
    // get_entry above the view's bound answers without a walk.
    mem.reset_counters();
    assert_eq!(view.get_entry(&mem, Gfn(fb + 4 * M2)).unwrap().mfn, None);
    assert_eq!(mem.entry_reads(), 0);

    let leaves = |p: &P2m, mem: &SimMemory| {
        let mut n = 0;
        let flow = p.for_each_leaf(mem, Gfn(0), Gfn::MAX, |_| {
            n += 1;
            ControlFlow::Continue(())
        });
        assert!(flow.unwrap().is_continue());
        n
    };
    assert!(leaves(&view, &mem) >= 2);
    view.destroy(&mut mem);
    host.destroy(&mut mem);
    assert_eq!(mem.outstanding(), 0);
}

#[test]
fn stored_leaf_is_the_whole_mapping_a_change_recomputes() {
    let (mut mem, mut p2m) = setup();
    map(&mut mem, &mut p2m, G1, Order::PAGE_1G, 0);
    map(&mut mem, &mut p2m, 5, Order::PAGE_4K, 0);
    p2m.change_type_range(&mut mem, Gfn(G1 + M2), Gfn(G1 + 2 * M2 - 1), Rw, Logdirty)
        .unwrap();
    let l = p2m.stored_leaf(&mem, Gfn(G1 + M2 + 3)).unwrap().unwrap();
    assert_eq!(
        (l.gfn, l.order, l.ty, l.marked),
        (Gfn(G1), Order::PAGE_1G, Rw, true)
    );
    // get_entry reports the uniform block it will resolve into instead.
    let e = p2m.get_entry(&mem, Gfn(G1 + M2 + 3)).unwrap();
    assert_eq!((e.order, e.ty), (Order::PAGE_2M, Logdirty));
    let small = p2m.stored_leaf(&mem, Gfn(5)).unwrap().unwrap();
    assert_eq!(
        (small.gfn, small.order, small.marked),
        (Gfn(5), Order::PAGE_4K, false)
    );
    assert_eq!(p2m.stored_leaf(&mem, Gfn(6)).unwrap(), None);
    assert_eq!(p2m.stored_leaf(&mem, Gfn(3 * G1)).unwrap(), None);
    assert!(p2m.stored_leaf(&mem, Gfn(Gfn::MAX.0 + 1)).is_err());
}
