//! The scenarios of the seed (shared/seed, shared/design/p2m-and-altp2m.md),
//! driven the way hardware drives them: accesses through the walk model,
//! exits to the crate's handlers, INVEPT as asked.

mod common;

use std::collections::BTreeSet;

use common::*;
use hv_altp2m::{DropReason, Outcome};
use hv_ept::{EptMemory, Gfn, Mfn, Order, P2mAccess, P2mType};

use P2mType::{RamLogdirty as Logdirty, RamRw as Rw};

/// (1) The display freeze. A view created and switched to early in boot
/// copies the framebuffer writable; then log-dirty starts on the
/// framebuffer with a bulk type change. Every later write through the view
/// must be in the dirty bitmap, round after round of cleans.
#[test]
fn display_freeze() {
    const RAM: u64 = 0; // 64 MiB of RAM in 2M pages
    const FB: u64 = 0x8_0000; // an 8 MiB framebuffer at 2 GiB, 2M pages
    const FB_PAGES: u64 = 4 * M2;
    let mut w = World::enabled(2);
    for k in 0..32 {
        w.map(RAM + k * M2, Order::PAGE_2M, 0x10_0000 + k * M2, Rw);
    }
    for k in 0..4 {
        w.map(FB + k * M2, Order::PAGE_2M, 0x20_0000 + k * M2, Rw);
    }
    // Early boot: a view, both vCPUs on it, the console drawn through it.
    let v = w.create(P2mAccess::Rwx);
    w.switch(0, v);
    w.switch(1, v);
    for p in (0..FB_PAGES).step_by(61) {
        assert_eq!(w.write(0, FB + p), End::Ok(Mfn(0x20_0000 + p)));
    }
    assert_eq!(w.read(1, 7), End::Ok(Mfn(0x10_0007)));
    let held = w.view(v).get_entry(&w.mem, Gfn(FB)).unwrap();
    assert_eq!(
        (held.ty, held.order),
        (Rw, Order::PAGE_2M),
        "copied writable, one fault per 2M"
    );
    assert_eq!(w.view(v).max_mapped_pfn().0, FB + FB_PAGES - 1);

    // The display model starts tracking the framebuffer.
    w.alt
        .host_change_type_range(
            &mut w.mem,
            &mut w.host,
            Gfn(FB),
            Gfn(FB + FB_PAGES - 1),
            Rw,
            Logdirty,
        )
        .unwrap();
    let f = w.alt.take_flush(&mut w.host);
    assert!(
        f.views.contains(v as usize),
        "the view's cached writable copies must go"
    );
    assert!(!marks(&w.mem, w.view(v)).is_empty());
    for k in 0..4 {
        let e = w.view(v).get_entry(&w.mem, Gfn(FB + k * M2)).unwrap();
        assert!(
            e.recalc && e.retype && e.ty == Logdirty,
            "the view's 2M copy {k} is marked"
        );
    }
    w.tlb.clear();

    let mut rng = 0x1234_5678u64;
    for round in 0..4 {
        let mut written = BTreeSet::new();
        for _ in 0..200 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let p = rng % FB_PAGES;
            let vcpu = (rng >> 40) as usize % 2;
            assert_eq!(w.write(vcpu, FB + p), End::Ok(Mfn(0x20_0000 + p)));
            assert!(
                w.dirty.is_dirty(Gfn(FB + p)),
                "round {round}: write to {p:#x} not logged"
            );
            written.insert(FB + p);
        }
        // RAM outside the framebuffer stays untracked.
        w.write(0, 9);
        let got: BTreeSet<u64> = w.clean(0, Gfn::MAX.0).into_iter().collect();
        assert_eq!(
            got, written,
            "round {round}: the dirty log is exactly what was written"
        );
        // After the clean every framebuffer page is tracked again, in the view too.
        for p in [0, 1, FB_PAGES - 1] {
            assert_eq!(
                w.alt
                    .get_entry(&w.mem, &w.host, v, Gfn(FB + p))
                    .unwrap()
                    .unwrap()
                    .ty,
                Logdirty
            );
        }
    }
    w.check_invariants();
    teardown(w);
}

/// The same at the edge the design note calls out: a view whose bound is
/// exactly the one page it holds, and a one-page log-dirty range there. The
/// clip is inclusive, so the page is marked (Xen's strict comparison
/// skipped it).
#[test]
fn display_freeze_one_page_at_the_bound() {
    let mut w = World::enabled(1);
    for g in 0..16 {
        w.map(g, Order::PAGE_4K, 0x900 + g, Rw);
    }
    let v = w.create(P2mAccess::Rwx);
    w.switch(0, v);
    assert_eq!(w.write(0, 12), End::Ok(Mfn(0x90c)));
    assert_eq!(w.view(v).max_mapped_pfn(), Gfn(12));
    w.alt
        .host_change_type_range(&mut w.mem, &mut w.host, Gfn(12), Gfn(12), Rw, Logdirty)
        .unwrap();
    w.flush();
    assert_eq!(marks(&w.mem, w.view(v)), [(0, 12)]);
    let (end, exits) = w.access(0, 12, hv_ept::walk::AccessKind::Write);
    assert_eq!(end, End::Ok(Mfn(0x90c)));
    assert_eq!((exits.misconfigs, exits.logdirty), (1, 1));
    assert!(w.dirty.is_dirty(Gfn(12)));
    teardown(w);
}

/// Host: 4K RAM pages over [0, 0x4000).
fn small_guest() -> World {
    let mut w = World::enabled(1);
    for k in 0..8 {
        w.map(k * M2, Order::PAGE_2M, 0x4_0000 + k * M2, Rw);
    }
    for g in 0x1000..0x1100 {
        w.map(g, Order::PAGE_4K, 0x8_0000 + g, Rw);
    }
    w
}

/// (2) The mail, case A: the view's bound equals the highest gfn it holds.
/// `get_entry` above it answers "hole" without reading a table; a type change
/// before the lazy copies marks nothing in the view and the later copy takes
/// the host's new type; a type change after the copies marks them and the
/// misconfiguration is resolved in the view.
#[test]
fn mail_case_a_bound_equals_what_the_view_holds() {
    let mut w = small_guest();
    let v = w.create(P2mAccess::Rwx);
    w.switch(0, v);
    w.read(0, 0x1010);
    assert_eq!(w.view(v).max_mapped_pfn(), Gfn(0x1010));

    // get_entry above the bound: hole, no walk.
    w.mem.reset_counters();
    let e = w.view(v).get_entry(&w.mem, Gfn(0x1011)).unwrap();
    assert_eq!((e.mfn, w.mem.entry_reads()), (None, 0));
    let eff = w
        .alt
        .get_entry(&w.mem, &w.host, v, Gfn(0x1011))
        .unwrap()
        .unwrap();
    assert!(
        !eff.held && eff.mfn == Mfn(0x8_1011),
        "the view shows the host's mapping"
    );

    // Before the lazy copies of [0x1011, 0x10ff].
    w.mem.reset_counters();
    w.alt
        .host_change_type_range(
            &mut w.mem,
            &mut w.host,
            Gfn(0x1011),
            Gfn(0x10ff),
            Rw,
            Logdirty,
        )
        .unwrap();
    assert!(
        marks(&w.mem, w.view(v)).is_empty(),
        "nothing held there, nothing marked"
    );
    w.flush();
    let (end, exits) = w.access(0, 0x1080, hv_ept::walk::AccessKind::Write);
    assert_eq!(end, End::Ok(Mfn(0x8_1080)));
    assert_eq!(
        (exits.lazy_copies, exits.misconfigs, exits.logdirty),
        (1, 0, 1),
        "a violation and a lazy copy of the new type, then the logged write"
    );
    assert!(w.dirty.is_dirty(Gfn(0x1080)));

    // After lazy copies: [0x1000, 0x1010] is held (0x1010 at least).
    w.read(0, 0x1003);
    w.alt
        .host_change_type_range(
            &mut w.mem,
            &mut w.host,
            Gfn(0x1000),
            Gfn(0x1010),
            Rw,
            Logdirty,
        )
        .unwrap();
    w.flush();
    assert!(!marks(&w.mem, w.view(v)).is_empty());
    let (end, exits) = w.access(0, 0x1003, hv_ept::walk::AccessKind::Write);
    assert_eq!(end, End::Ok(Mfn(0x8_1003)));
    assert_eq!(
        (exits.lazy_copies, exits.misconfigs, exits.logdirty),
        (0, 1, 1)
    );
    assert!(w.dirty.is_dirty(Gfn(0x1003)));
    w.check_invariants();
    teardown(w);
}

/// (2) The mail, case B: the view's bound lies above what it holds (it
/// held a higher gfn once; the bound only grows). `get_entry` between them
/// walks and still answers "hole"; a type change over that stretch marks
/// only what the view holds, and accessing the rest is a lazy copy (never
/// an entry made valid by a misconfiguration resolution: George's last
/// point in the mail). Resolution leaves the bound alone.
#[test]
fn mail_case_b_bound_above_what_the_view_holds() {
    let mut w = small_guest();
    let v = w.create(P2mAccess::Rwx);
    w.switch(0, v);
    w.read(0, 0x1003);
    w.read(0, 0x10f0);
    // The host takes 0x10f0 back: the view drops it, its bound stays.
    w.alt
        .host_remove(&mut w.mem, &mut w.host, Gfn(0x10f0), Order::PAGE_4K)
        .unwrap();
    w.flush();
    assert_eq!(w.view(v).max_mapped_pfn(), Gfn(0x10f0));
    assert_eq!(w.view(v).get_entry(&w.mem, Gfn(0x10f0)).unwrap().mfn, None);

    w.mem.reset_counters();
    let e = w.view(v).get_entry(&w.mem, Gfn(0x1050)).unwrap();
    assert_eq!(e.mfn, None);
    assert!(
        w.mem.entry_reads() > 0,
        "below the bound the tables are read"
    );

    // A type change over [0x1000, 0x10ff]: before any further copy, only
    // 0x1003 (held) is marked in the view.
    w.alt
        .host_change_type_range(
            &mut w.mem,
            &mut w.host,
            Gfn(0x1000),
            Gfn(0x10ff),
            Rw,
            Logdirty,
        )
        .unwrap();
    w.flush();
    let leaves_before = raw_leaves(&w.mem, w.view(v)).len();
    assert_eq!(
        marks(&w.mem, w.view(v)),
        [(0, 0x1003)],
        "only what the view holds"
    );
    let (end, exits) = w.access(0, 0x1050, hv_ept::walk::AccessKind::Write);
    assert_eq!(end, End::Ok(Mfn(0x8_1050)));
    assert_eq!(
        exits.lazy_copies, 1,
        "0x1050 was never held: copied, not resolved into being"
    );
    assert_eq!(raw_leaves(&w.mem, w.view(v)).len(), leaves_before + 1);
    // The held page goes through a misconfiguration resolved in the view.
    let bound = w.view(v).max_mapped_pfn();
    let (end, exits) = w.access(0, 0x1003, hv_ept::walk::AccessKind::Write);
    assert_eq!(end, End::Ok(Mfn(0x8_1003)));
    assert!(exits.misconfigs >= 1 && exits.logdirty == 1);
    assert_eq!(
        w.view(v).max_mapped_pfn(),
        bound,
        "resolution never moves the bound"
    );
    assert!(w.dirty.is_dirty(Gfn(0x1003)) && w.dirty.is_dirty(Gfn(0x1050)));
    // 0x10f0 is gone from the host: not reachable.
    assert_eq!(w.read(0, 0x10f0), End::NotMapped);
    w.check_invariants();
    teardown(w);
}

/// (3) A host page dropped while two views alias it: both aliases are
/// invalidated (and only they: other remaps and restrictions stay), the
/// drops are reported, and no view reaches the frame any more.
#[test]
fn host_page_dropped_while_two_views_alias_it() {
    let mut w = World::enabled(2);
    for g in 0..0x400 {
        w.map(g, Order::PAGE_4K, 0x7000 + g, Rw);
    }
    const S: u64 = 0x100; // the page the balloon takes back
    const T: u64 = 0x101;
    let (a1, a2, a3) = (0x200, 0x300, 0x301);
    let v1 = w.create(P2mAccess::Rwx);
    let v2 = w.create(P2mAccess::Rwx);
    let (mem, host) = (&mut w.mem, &mut w.host);
    w.alt
        .change_gfn(mem, host, v1, Gfn(a1), Some(Gfn(S)))
        .unwrap();
    w.alt
        .change_gfn(mem, host, v2, Gfn(a2), Some(Gfn(S)))
        .unwrap();
    w.alt
        .change_gfn(mem, host, v2, Gfn(a3), Some(Gfn(T)))
        .unwrap();
    w.alt
        .set_mem_access(mem, host, v1, Gfn(0x50), P2mAccess::Rx)
        .unwrap();
    w.alt
        .set_mem_access(mem, host, v1, Gfn(S), P2mAccess::R)
        .unwrap();
    w.flush();
    w.switch(0, v1);
    w.switch(1, v2);
    let frame_s = Mfn(0x7000 + S);
    assert_eq!(w.read(0, a1), End::Ok(frame_s));
    assert_eq!(w.read(1, a2), End::Ok(frame_s));
    assert_eq!(w.read(0, S), End::Ok(frame_s));
    assert_eq!(w.alt.remapped_gfns(v2).unwrap(), Some((Gfn(S), Gfn(T))));

    w.alt
        .host_remove(&mut w.mem, &mut w.host, Gfn(S), Order::PAGE_4K)
        .unwrap();
    let f = w.alt.take_flush(&mut w.host);
    assert!(f.views.contains(0) && f.views.contains(v1 as usize) && f.views.contains(v2 as usize));
    assert!(!f.all_contexts);
    w.tlb.clear();

    let mut dropped = w.dropped();
    dropped.sort_by_key(|d| (d.view, d.gfn));
    let summary: Vec<_> = dropped
        .iter()
        .map(|d| {
            (
                d.view,
                d.gfn.0,
                d.pages,
                d.access,
                d.remap_source.map(|g| g.0),
                d.reason,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (v1, S, 1, P2mAccess::R, None, DropReason::MappingChanged),
            (
                v1,
                a1,
                1,
                P2mAccess::Rwx,
                Some(S),
                DropReason::SourceChanged
            ),
            (
                v2,
                a2,
                1,
                P2mAccess::Rwx,
                Some(S),
                DropReason::SourceChanged
            ),
        ]
    );
    // Nothing reaches the frame: the aliases show their own gfns again.
    assert_eq!(w.read(0, a1), End::Ok(Mfn(0x7000 + a1)));
    assert_eq!(w.read(1, a2), End::Ok(Mfn(0x7000 + a2)));
    assert_eq!(w.read(0, S), End::NotMapped);
    assert_eq!(w.read(1, S), End::NotMapped);
    // What the drop did not concern stays.
    assert_eq!(w.read(1, a3), End::Ok(Mfn(0x7000 + T)));
    assert_eq!(w.alt.remapped_gfns(v2).unwrap(), Some((Gfn(T), Gfn(T))));
    assert_eq!(w.alt.remapped_gfns(v1).unwrap(), None);
    assert_eq!(
        w.alt
            .get_mem_access(&w.mem, &w.host, v1, Gfn(0x50))
            .unwrap(),
        P2mAccess::Rx
    );
    for v in [v1, v2] {
        for (first, _, raw) in raw_leaves(&w.mem, w.view(v)) {
            assert_ne!(
                hv_ept::EptEntry(raw).mfn(),
                frame_s,
                "view {v} still maps the frame at {first:#x}"
            );
        }
    }
    w.check_invariants();
    teardown(w);
}

/// (4) Destroy and re-create a view: nothing of the old one survives, not
/// its entries, restrictions, remaps, suppress-#VE bits, visibility, default
/// access, bound, nor its frames.
#[test]
fn destroy_and_recreate_a_view() {
    let mut w = World::enabled(1);
    w.map(0, Order::PAGE_1G, 0x4_0000, Rw);
    for g in 0x4_0000..0x4_0010 {
        w.map(g, Order::PAGE_4K, 0x9_0000 + g, Rw);
    }
    let frames_before = w.mem.outstanding();
    let v = w.create(P2mAccess::R);
    assert_eq!(v, 1);
    w.switch(0, v);
    w.read(0, 0x1234);
    w.read(0, 0x4_0003);
    let (mem, host) = (&mut w.mem, &mut w.host);
    w.alt
        .set_mem_access(mem, host, v, Gfn(0x77), P2mAccess::N)
        .unwrap();
    w.alt
        .set_suppress_ve(mem, host, v, Gfn(0x78), false)
        .unwrap();
    w.alt
        .change_gfn(mem, host, v, Gfn(0x79), Some(Gfn(0x4_0005)))
        .unwrap();
    w.alt.set_visibility(mem, host, v, false).unwrap();
    w.flush();
    assert!(w.view(v).max_mapped_pfn().0 >= 0x4_0003);

    assert_eq!(
        w.alt.destroy_view(&mut w.mem, v),
        Err(hv_altp2m::Error::Busy)
    );
    w.alt.switch_vcpu(0, 0).unwrap();
    w.load_eptps();
    let old_eptp = w.alt.eptp(&w.host, v).unwrap();
    w.alt.destroy_view(&mut w.mem, v).unwrap();
    assert!(
        w.alt.take_flush(&mut w.host).all_contexts,
        "the old EPTP must be flushed"
    );
    w.tlb.clear();
    assert_eq!(
        w.mem.outstanding(),
        frames_before,
        "every frame of the view came back"
    );
    assert_eq!(
        w.mem.read_entry(w.alt.valid_list(), 1),
        hv_altp2m::INVALID_EPTP
    );
    assert!(w.alt.get_entry(&w.mem, &w.host, v, Gfn(0)).is_err());

    let again = w.create(P2mAccess::Rwx);
    assert_eq!(again, v, "the same index");
    assert_eq!(tables(&w.mem, w.view(v)), 1, "one root table, nothing else");
    assert_eq!(w.view(v).max_mapped_pfn(), Gfn(0));
    assert!(raw_leaves(&w.mem, w.view(v)).is_empty());
    assert_eq!(w.alt.remapped_gfns(v).unwrap(), None);
    assert_eq!(w.alt.remap_source(v, Gfn(0x79)).unwrap(), None);
    assert!(w.alt.is_visible(v).unwrap());
    assert_eq!(w.alt.default_access(v).unwrap(), P2mAccess::Rwx);
    let new_eptp = w.alt.eptp(&w.host, v).unwrap();
    assert_eq!(w.mem.read_entry(w.alt.visible_list(), 1), new_eptp);
    let _ = old_eptp;
    for (g, want) in [
        (0x77, 0x4_0077),
        (0x78, 0x4_0078),
        (0x79, 0x4_0079),
        (0x4_0003, 0x9_0000 + 0x4_0003),
    ] {
        let e = w
            .alt
            .get_entry(&w.mem, &w.host, v, Gfn(g))
            .unwrap()
            .unwrap();
        assert_eq!(
            (e.mfn, e.access, e.suppress_ve, e.held, e.remap_source),
            (Mfn(want), P2mAccess::Rwx, true, false, None),
            "gfn {g:#x}"
        );
    }
    assert!(w.vmfunc(0, v as usize), "visible again");
    let (end, exits) = w.access(0, 0x77, hv_ept::walk::AccessKind::Write);
    assert_eq!(end, End::Ok(Mfn(0x4_0077)));
    assert_eq!(exits.lazy_copies, 1);
    assert!(
        matches!(
            w.outcomes.last(),
            Some(Outcome::LazyCopied {
                order: Order::PAGE_1G,
                ..
            })
        ),
        "{:?}",
        w.outcomes.last()
    );
    w.check_invariants();
    teardown(w);
}
