//! The view set and the per-view operations: lifecycle and validation, EPTP
//! lists and switching, lazy copy, access and suppress-#VE, remaps,
//! conversions, what a host change keeps and drops, and INVEPT tracking.

mod common;

use common::*;
use hv_altp2m::{Altp2m, DropReason, Error, INVALID_EPTP, Mapping, MultiError, Outcome};
use hv_ept::walk::{AccessKind, EptFault};
use hv_ept::{EptCaps, EptMemory, Gfn, Mfn, Order, P2m, P2mAccess, P2mType};

use AccessKind::{Fetch, Read, Write};
use P2mType::{RamLogdirty as Logdirty, RamRo as Ro, RamRw as Rw};

/// 4K RAM at gfn 0..0x200 (frame 0x7000 + gfn), a 2M page at 2M, a 1G page
/// at 1G.
fn guest(vcpus: usize) -> World {
    let mut w = World::enabled(vcpus);
    for g in 0..0x200 {
        w.map(g, Order::PAGE_4K, 0x7000 + g, Rw);
    }
    w.map(M2, Order::PAGE_2M, 0x10_0000, Rw);
    w.map(G1, Order::PAGE_1G, 0x100_0000, Rw);
    w
}

#[test]
fn lifecycle_and_argument_checks() {
    let mut w = World::new(2);
    let (mem, host) = (&mut w.mem, &mut w.host);
    assert_eq!(
        w.alt.create_view(mem, host, P2mAccess::Rwx),
        Err(Error::NotEnabled)
    );
    assert_eq!(w.alt.switch_vcpu(0, 0), Err(Error::NotEnabled));
    assert_eq!(w.alt.disable(mem), Err(Error::NotEnabled));
    w.alt.enable(mem, host).unwrap();
    assert_eq!(w.alt.enable(mem, host), Err(Error::AlreadyEnabled));
    assert_eq!(
        w.alt.create_view_at(mem, host, 0, P2mAccess::Rwx),
        Err(Error::DefaultView)
    );
    assert_eq!(
        w.alt.create_view_at(mem, host, 512, P2mAccess::Rwx),
        Err(Error::BadView)
    );
    for bad in [P2mAccess::W, P2mAccess::Wx] {
        assert_eq!(
            w.alt.create_view(mem, host, bad),
            Err(Error::UnsupportedAccess)
        );
    }
    let v = w
        .alt
        .create_view_at(mem, host, 7, P2mAccess::Rx)
        .map(|_| 7u16)
        .unwrap();
    assert_eq!(
        w.alt.create_view_at(mem, host, 7, P2mAccess::Rx),
        Err(Error::ViewExists)
    );
    assert_eq!(
        w.alt.create_view(mem, host, P2mAccess::Rwx),
        Ok(1),
        "lowest free slot"
    );
    for op in [
        w.alt.destroy_view(mem, 0),
        w.alt.reset_view(mem, host, 0),
        w.alt.change_gfn(mem, host, 0, Gfn(1), Some(Gfn(2))),
        w.alt.set_default_access(0, P2mAccess::R),
    ] {
        assert_eq!(op, Err(Error::DefaultView));
    }
    for bad_view in [2u16, 511, 512, u16::MAX] {
        assert_eq!(w.alt.destroy_view(mem, bad_view), Err(Error::BadView));
        assert_eq!(w.alt.switch_vcpu(0, bad_view), Err(Error::BadView));
        assert_eq!(
            w.alt.sync_vcpu_view(0, bad_view as u64),
            Err(Error::BadView)
        );
        assert!(
            w.alt
                .set_mem_access(mem, host, bad_view, Gfn(0), P2mAccess::R)
                .is_err()
        );
    }
    assert_eq!(w.alt.sync_vcpu_view(0, 1 << 40), Err(Error::BadView));
    assert_eq!(w.alt.switch_vcpu(2, v), Err(Error::BadVcpu));
    assert_eq!(w.alt.vcpu_view(99), Err(Error::BadVcpu));
    let too_far = Gfn(Gfn::MAX.0 + 1);
    assert_eq!(
        w.alt.set_mem_access(mem, host, v, too_far, P2mAccess::R),
        Err(Error::GfnOutOfRange)
    );
    assert_eq!(
        w.alt.change_gfn(mem, host, v, Gfn(1), Some(too_far)),
        Err(Error::GfnOutOfRange)
    );
    assert_eq!(
        w.alt.set_mem_access(mem, host, v, Gfn(5), P2mAccess::R),
        Err(Error::NotMapped)
    );
    assert_eq!(
        w.alt.set_mem_access(mem, host, v, Gfn(5), P2mAccess::Wx),
        Err(Error::UnsupportedAccess)
    );
    assert_eq!(
        w.alt.change_gfn(mem, host, v, Gfn(1), None),
        Err(Error::NotRemapped)
    );
    assert_eq!(
        w.alt.change_gfn(mem, host, v, Gfn(1), Some(Gfn(2))),
        Err(Error::NotMapped)
    );
    assert_eq!(
        w.alt
            .host_change_type_range(mem, host, Gfn(9), Gfn(8), Rw, Logdirty),
        Err(Error::BadRange)
    );
    assert_eq!(
        w.alt
            .host_change_type_range(mem, host, Gfn(0), Gfn(8), Rw, Ro),
        Err(Error::UnsupportedTypeChange)
    );
    let mut d = hv_ept::DirtyBitmap::new();
    let gpa_too_wide = 1u64 << 48;
    assert_eq!(
        w.alt
            .handle_violation(mem, host, &mut d, 0, gpa_too_wide, Read),
        Err(Error::GfnOutOfRange)
    );
    assert_eq!(
        w.alt.handle_violation(mem, host, &mut d, 5, 0, Read),
        Err(Error::BadVcpu)
    );
    assert_eq!(
        w.alt.resolve_misconfig(mem, host, 5, 0),
        Err(Error::BadVcpu)
    );
    // Execute-only needs the CPU's support.
    let mut mem2 = hv_ept::sim::SimMemory::new();
    let no_xo = EptCaps {
        exec_only: false,
        ..EptCaps::ALL
    };
    let host2 = P2m::new(&mut mem2, no_xo).unwrap();
    let mut alt2 = Altp2m::new(&mut mem2, 1, 8).unwrap();
    alt2.enable(&mut mem2, &host2).unwrap();
    assert_eq!(
        alt2.create_view(&mut mem2, &host2, P2mAccess::X),
        Err(Error::UnsupportedAccess)
    );
    let v2 = alt2.create_view(&mut mem2, &host2, P2mAccess::Rx).unwrap();
    assert_eq!(
        alt2.set_default_access(v2, P2mAccess::X),
        Err(Error::UnsupportedAccess)
    );
    alt2.destroy(&mut mem2);
    host2.destroy(&mut mem2);
    assert_eq!(mem2.outstanding(), 0);
    assert_eq!(Altp2m::new(&mut mem2, 0, 8).err(), Some(Error::BadVcpu));
    teardown(w);
}

#[test]
fn fresh_views_cost_one_table_each_plus_two_lists() {
    let mut w = World::new(1);
    let base = w.mem.outstanding(); // host root + the two lists
    assert_eq!(base, 1 + 2);
    w.alt.enable(&mut w.mem, &w.host).unwrap();
    for i in 1..512 {
        assert_eq!(
            w.alt.create_view(&mut w.mem, &w.host, P2mAccess::Rwx),
            Ok(i)
        );
    }
    assert_eq!(
        w.alt.create_view(&mut w.mem, &w.host, P2mAccess::Rwx),
        Err(Error::NoFreeView)
    );
    assert_eq!(
        w.mem.outstanding() - base,
        511,
        "view 0 is the host: no table of its own"
    );
    for i in 1..512 {
        assert_eq!(w.view(i).max_mapped_pfn(), Gfn(0));
    }
    w.alt.disable(&mut w.mem).unwrap();
    assert_eq!(w.mem.outstanding(), base);
    assert!(w.alt.take_flush(&mut w.host).all_contexts);
    teardown(w);
}

#[test]
fn view_tables_are_the_frames_lazy_copies_took() {
    let mut w = guest(1);
    assert_eq!(w.alt.view_tables(&w.mem), (0, 0));
    let host_and_lists = w.mem.outstanding();
    let a = w.create(P2mAccess::Rwx);
    let b = w.create(P2mAccess::Rwx);
    assert_eq!(
        w.alt.view_tables(&w.mem),
        (2, 2),
        "a fresh view is its root"
    );
    // View a copies a 4K page (directory pointers, directory, page table),
    // then the 2M and 1G pages into the tables it has; view b the 1G page
    // (a directory-pointer table).
    w.switch(0, a);
    for gfn in [5, M2 + 3, G1 + 7] {
        assert!(matches!(w.read(0, gfn), End::Ok(_)));
    }
    w.switch(0, b);
    assert!(matches!(w.read(0, G1), End::Ok(_)));
    assert_eq!(w.alt.view_tables(&w.mem), (2, (1 + 3) + (1 + 1)));
    assert_eq!(
        w.alt.view_tables(&w.mem).1,
        (w.mem.outstanding() - host_and_lists) as u64,
        "every frame the views took is a table of theirs"
    );
    w.switch(0, 0);
    w.alt.disable(&mut w.mem).unwrap();
    assert_eq!(w.alt.view_tables(&w.mem), (0, 0));
    w.flush();
    teardown(w);
}

#[test]
fn lists_visibility_and_switch_paths() {
    let mut w = guest(2);
    let a = w.create(P2mAccess::Rwx);
    let b = w.create(P2mAccess::Rwx);
    let valid = |w: &World, i: usize| w.mem.read_entry(w.alt.valid_list(), i);
    let visible = |w: &World, i: usize| w.mem.read_entry(w.alt.visible_list(), i);
    assert_eq!(valid(&w, 0), w.host.eptp());
    assert_eq!(visible(&w, a as usize), w.alt.eptp(&w.host, a).unwrap());
    assert_eq!(valid(&w, 3), INVALID_EPTP);
    assert_eq!(visible(&w, 3), INVALID_EPTP);

    let (mem, host) = (&mut w.mem, &mut w.host);
    w.alt.set_visibility(mem, host, b, false).unwrap();
    assert_eq!(visible(&w, b as usize), INVALID_EPTP);
    assert_eq!(valid(&w, b as usize), w.alt.eptp(&w.host, b).unwrap());
    // Every switch path honours visibility.
    assert!(!w.vmfunc(0, b as usize), "VMFUNC to a hidden view exits");
    assert_eq!(w.alt.switch_vcpu(0, b), Err(Error::Invisible));
    assert_eq!(w.alt.switch_all(b), Err(Error::Invisible));
    assert_eq!(w.alt.sync_vcpu_view(0, b as u64), Err(Error::Invisible));
    assert!(w.vmfunc(0, a as usize));
    assert_eq!(w.alt.vcpu_view(0), Ok(a));
    assert!(!w.vmfunc(1, 5), "no view there");
    // A vCPU on a view that gets hidden stays on it, and syncing to it is fine.
    w.alt.set_visibility(&mut w.mem, &w.host, a, false).unwrap();
    w.alt.sync_vcpu_view(0, a as u64).unwrap();
    assert_eq!(w.alt.vcpu_view(0), Ok(a));
    assert_eq!(w.alt.destroy_view(&mut w.mem, a), Err(Error::Busy));
    // View 0 can be hidden too.
    w.alt.set_visibility(&mut w.mem, &w.host, 0, false).unwrap();
    assert!(!w.vmfunc(1, 0));
    w.alt.set_visibility(&mut w.mem, &w.host, 0, true).unwrap();
    w.alt.set_visibility(&mut w.mem, &w.host, b, true).unwrap();
    w.alt.switch_all(b).unwrap();
    w.load_eptps();
    assert_eq!(w.eptp, [w.alt.eptp(&w.host, b).unwrap(); 2]);
    assert!(w.vmfunc(1, 0));
    assert_eq!(w.alt.vcpu_eptp(&w.host, 1), Ok(w.host.eptp()));

    // Disable: every vCPU back on view 0, every view gone, lists invalid.
    w.alt.disable(&mut w.mem).unwrap();
    assert_eq!((w.alt.vcpu_view(0), w.alt.vcpu_view(1)), (Ok(0), Ok(0)));
    assert!((0..512).all(|i| valid(&w, i) == INVALID_EPTP && visible(&w, i) == INVALID_EPTP));
    assert!(w.alt.take_flush(&mut w.host).all_contexts);
    assert_eq!(w.mem.outstanding(), tables(&w.mem, &w.host) + 2);
    // The host path still works while disabled (violations go to view 0).
    let m = Mapping {
        mfn: Mfn(0x5000),
        ty: Rw,
        access: P2mAccess::Rwx,
    };
    w.alt
        .host_set_entry(&mut w.mem, &mut w.host, Gfn(0x500), Order::PAGE_4K, m)
        .unwrap();
    w.load_eptps();
    assert_eq!(w.read(0, 0x500), End::Ok(Mfn(0x5000)));
    w.alt.enable(&mut w.mem, &w.host).unwrap();
    assert_eq!(valid(&w, 0), w.host.eptp());
    teardown(w);
}

#[test]
fn lazy_copy_takes_the_largest_order_that_fits() {
    let mut w = guest(1);
    let v = w.create(P2mAccess::Rwx);
    w.switch(0, v);
    for (g, order, faults) in [
        (G1 + 12345, Order::PAGE_1G, 1),
        (G1 + 99, Order::PAGE_1G, 0),
        (M2 + 7, Order::PAGE_2M, 1),
        (M2 + 511, Order::PAGE_2M, 0),
        (3, Order::PAGE_4K, 1),
        (4, Order::PAGE_4K, 1),
    ] {
        let (end, exits) = w.access(0, g, Read);
        assert!(matches!(end, End::Ok(_)), "{g:#x}");
        assert_eq!(exits.lazy_copies, faults, "{g:#x}");
        let e = w.view(v).get_entry(&w.mem, Gfn(g)).unwrap();
        assert_eq!(e.order, order, "{g:#x}");
        assert_eq!(e.access, P2mAccess::Rwx);
    }
    // The view's hole is smaller than the host mapping: copy what fits.
    let u = w.create(P2mAccess::Rwx);
    w.alt
        .change_gfn(&mut w.mem, &w.host, u, Gfn(M2 + 5), Some(Gfn(3)))
        .unwrap();
    w.switch(0, u);
    w.read(0, M2 + 6);
    assert_eq!(
        w.view(u).get_entry(&w.mem, Gfn(M2 + 6)).unwrap().order,
        Order::PAGE_4K
    );
    assert_eq!(
        w.read(0, M2 + 5),
        End::Ok(Mfn(0x7003)),
        "the alias is untouched"
    );
    // Nothing in the host: not mapped, the view stays empty there.
    assert_eq!(w.read(0, 0x4000), End::NotMapped);
    assert_eq!(w.view(u).get_entry(&w.mem, Gfn(0x4000)).unwrap().mfn, None);
    w.check_invariants();
    teardown(w);
}

#[test]
fn access_violations_are_told_apart_and_reported() {
    let mut w = guest(1);
    let v = w.create(P2mAccess::Rwx);
    w.switch(0, v);
    let (mem, host) = (&mut w.mem, &mut w.host);
    w.alt
        .set_mem_access(mem, host, v, Gfn(0x10), P2mAccess::R)
        .unwrap();
    w.alt
        .set_mem_access(mem, host, v, Gfn(G1 + 5), P2mAccess::Rw)
        .unwrap();
    w.alt
        .set_suppress_ve(mem, host, v, Gfn(G1 + 5), false)
        .unwrap();
    w.flush();
    assert_eq!(w.read(0, 0x10), End::Ok(Mfn(0x7010)));
    let End::Violation(av) = w.write(0, 0x10) else {
        panic!()
    };
    assert_eq!(
        (
            av.view,
            av.gfn,
            av.kind,
            av.ty,
            av.access,
            av.suppress_ve,
            av.remap_source
        ),
        (v, Gfn(0x10), Write, Rw, P2mAccess::R, true, None)
    );
    // The split kept the rest of the 1G page as it was.
    assert_eq!(w.read(0, G1 + 4), End::Ok(Mfn(0x100_0004)));
    // A convertible violation: the walk sees suppress-#VE clear.
    match w.walk(0, G1 + 5, Fetch) {
        Err(EptFault::Violation { suppress_ve, .. }) => assert!(!suppress_ve),
        other => panic!("{other:?}"),
    }
    let End::Violation(av) = w.access(0, G1 + 5, Fetch).0 else {
        panic!()
    };
    assert!(!av.suppress_ve && av.access == P2mAccess::Rw);
    assert_eq!(
        w.alt.get_suppress_ve(&w.mem, &w.host, v, Gfn(G1 + 5)),
        Ok(false)
    );
    assert_eq!(
        w.alt.get_suppress_ve(&w.mem, &w.host, v, Gfn(G1 + 6)),
        Ok(true)
    );
    assert_eq!(
        w.alt.get_mem_access(&w.mem, &w.host, v, Gfn(0x11)),
        Ok(P2mAccess::Rwx)
    );
    assert_eq!(
        w.alt.get_mem_access(&w.mem, &w.host, v, Gfn(0x4000)),
        Err(Error::NotMapped)
    );
    // ram_ro denies writes whatever the access.
    w.map(0x20, Order::PAGE_4K, 0x7020, Ro);
    let End::Violation(av) = w.write(0, 0x20) else {
        panic!()
    };
    assert_eq!((av.ty, av.access), (Ro, P2mAccess::Rwx));
    // View 0 is the host: its restrictions live in host entries.
    w.switch(0, 0);
    let (mem, host) = (&mut w.mem, &mut w.host);
    w.alt
        .set_mem_access(mem, host, 0, Gfn(0x30), P2mAccess::Rx)
        .unwrap();
    assert_eq!(
        host.get_entry(mem, Gfn(0x30)).unwrap().access,
        P2mAccess::Rx
    );
    w.flush();
    let End::Violation(av) = w.write(0, 0x30) else {
        panic!()
    };
    assert_eq!((av.view, av.access), (0, P2mAccess::Rx));
    // ... and do not leak into views.
    w.switch(0, v);
    assert_eq!(w.write(0, 0x30), End::Ok(Mfn(0x7030)));
    w.check_invariants();
    teardown(w);
}

#[test]
fn multi_forms_stop_at_the_first_error() {
    let mut w = guest(1);
    let v = w.create(P2mAccess::Rwx);
    let (mem, host) = (&mut w.mem, &mut w.host);
    let items = [
        (Gfn(1), P2mAccess::R),
        (Gfn(2), P2mAccess::Rx),
        (Gfn(0x9999), P2mAccess::R),
        (Gfn(3), P2mAccess::N),
    ];
    assert_eq!(
        w.alt.set_mem_access_multi(mem, host, v, &items),
        Err(MultiError {
            done: 2,
            error: Error::NotMapped
        })
    );
    assert_eq!(
        w.alt.get_mem_access(mem, host, v, Gfn(2)),
        Ok(P2mAccess::Rx)
    );
    assert_eq!(
        w.alt.get_mem_access(mem, host, v, Gfn(3)),
        Ok(P2mAccess::Rwx)
    );
    w.alt
        .set_suppress_ve_multi(mem, host, v, &[(Gfn(1), false), (Gfn(4), false)])
        .unwrap();
    assert_eq!(w.alt.get_suppress_ve(mem, host, v, Gfn(4)), Ok(false));
    assert_eq!(
        w.alt.get_mem_access(mem, host, v, Gfn(1)),
        Ok(P2mAccess::R),
        "sve kept access"
    );
    teardown(w);
}

#[test]
fn rx2rw_and_n2rwx_convert() {
    let mut w = guest(1);
    let v = w.create(P2mAccess::Rwx);
    w.switch(0, v);
    let (mem, host) = (&mut w.mem, &mut w.host);
    w.alt
        .set_mem_access(mem, host, v, Gfn(5), P2mAccess::Rx2rw)
        .unwrap();
    w.alt
        .set_mem_access(mem, host, v, Gfn(6), P2mAccess::N2rwx)
        .unwrap();
    w.flush();
    let (end, exits) = w.access(0, 5, Read);
    assert_eq!(
        (end, exits.converted),
        (End::Ok(Mfn(0x7005)), 0),
        "rx2rw allows reads"
    );
    let (end, exits) = w.access(0, 5, Write);
    assert_eq!((end, exits.converted), (End::Ok(Mfn(0x7005)), 1));
    assert!(w.outcomes.contains(&Outcome::Converted {
        view: v,
        gfn: Gfn(5),
        from: P2mAccess::Rx2rw,
        to: P2mAccess::Rw
    }));
    assert_eq!(
        w.alt.get_mem_access(&w.mem, &w.host, v, Gfn(5)),
        Ok(P2mAccess::Rw)
    );
    let (end, exits) = w.access(0, 6, Fetch);
    assert_eq!((end, exits.converted), (End::Ok(Mfn(0x7006)), 1));
    assert_eq!(
        w.alt.get_mem_access(&w.mem, &w.host, v, Gfn(6)),
        Ok(P2mAccess::Rwx)
    );
    teardown(w);
}

/// Xen skips `set_mem_access` on a log-dirty page; here it takes effect and
/// the page stays tracked.
#[test]
fn set_mem_access_on_a_logdirty_page() {
    let mut w = guest(1);
    let v = w.create(P2mAccess::Rwx);
    w.switch(0, v);
    w.read(0, 0x40);
    let (mem, host) = (&mut w.mem, &mut w.host);
    w.alt
        .host_change_type_range(mem, host, Gfn(0), Gfn(0x1ff), Rw, Logdirty)
        .unwrap();
    w.alt
        .set_mem_access(mem, host, v, Gfn(0x40), P2mAccess::Rx)
        .unwrap();
    w.alt
        .set_mem_access(mem, host, v, Gfn(0x41), P2mAccess::Rx)
        .unwrap();
    w.flush();
    for g in [0x40, 0x41] {
        let e = w
            .alt
            .get_entry(&w.mem, &w.host, v, Gfn(g))
            .unwrap()
            .unwrap();
        assert_eq!((e.ty, e.access), (Logdirty, P2mAccess::Rx), "{g:#x}");
        let End::Violation(av) = w.write(0, g) else {
            panic!()
        };
        assert_eq!(av.access, P2mAccess::Rx);
        assert!(!w.dirty.is_dirty(Gfn(g)), "a denied write is not a write");
    }
    w.alt
        .set_mem_access(&mut w.mem, &mut w.host, v, Gfn(0x40), P2mAccess::Rwx)
        .unwrap();
    w.flush();
    assert_eq!(w.write(0, 0x40), End::Ok(Mfn(0x7040)));
    assert!(w.dirty.is_dirty(Gfn(0x40)));
    w.check_invariants();
    teardown(w);
}

/// Writes through a remap dirty the gfn that owns the frame (beyond Xen),
/// and an alias of a tracked page is never writable, whatever log-dirty
/// state its own position has.
#[test]
fn writes_through_a_remap_dirty_the_owner() {
    let mut w = guest(1);
    let v = w.create(P2mAccess::Rwx);
    w.switch(0, v);
    let (src, alias) = (0x180u64, 0x10u64);
    let (mem, host) = (&mut w.mem, &mut w.host);
    w.alt
        .change_gfn(mem, host, v, Gfn(alias), Some(Gfn(src)))
        .unwrap();
    // Track the source only, not the alias's position.
    w.alt
        .host_change_type_range(mem, host, Gfn(src), Gfn(src), Rw, Logdirty)
        .unwrap();
    w.flush();
    let e = w
        .alt
        .get_entry(&w.mem, &w.host, v, Gfn(alias))
        .unwrap()
        .unwrap();
    assert_eq!(
        (e.mfn, e.ty, e.remap_source),
        (Mfn(0x7000 + src), Logdirty, Some(Gfn(src)))
    );
    assert_eq!(w.write(0, alias), End::Ok(Mfn(0x7000 + src)));
    assert!(w.dirty.is_dirty(Gfn(src)) && !w.dirty.is_dirty(Gfn(alias)));
    assert!(matches!(
        w.outcomes.last(),
        Some(Outcome::LogDirty { owner, gfn, .. }) if owner.0 == src && gfn.0 == alias
    ));
    // Untrack a range over the alias's position while the source is
    // re-armed: the alias must still fault.
    assert_eq!(w.clean(0, Gfn::MAX.0), [src]);
    let (mem, host) = (&mut w.mem, &mut w.host);
    w.alt
        .host_change_type_range(mem, host, Gfn(0), Gfn(0x20), Logdirty, Rw)
        .unwrap();
    w.flush();
    assert_eq!(w.write(0, alias), End::Ok(Mfn(0x7000 + src)));
    assert!(w.dirty.is_dirty(Gfn(src)), "logged again after the clean");
    // And the other way: position tracked, source not: no spurious logging.
    let (mem, host) = (&mut w.mem, &mut w.host);
    w.alt
        .host_change_type_global(mem, host, Rw, Logdirty)
        .unwrap();
    w.alt
        .host_change_type_range(mem, host, Gfn(src), Gfn(src), Logdirty, Rw)
        .unwrap();
    w.alt
        .host_change_type_global(mem, host, Logdirty, Rw)
        .unwrap();
    w.alt
        .host_change_type_range(mem, host, Gfn(alias), Gfn(alias), Rw, Logdirty)
        .unwrap();
    w.flush();
    let before = w.dirty.dirty_count();
    let (end, exits) = w.access(0, alias, Write);
    assert_eq!((end, exits.logdirty), (End::Ok(Mfn(0x7000 + src)), 0));
    assert_eq!(w.dirty.dirty_count(), before);
    w.check_invariants();
    teardown(w);
}

/// The documented decision: a host change keeps a view's divergence where
/// frame and type stay (a log-dirty transition counts as staying), drops
/// it where the mapping changed, and reports what it dropped.
#[test]
fn host_changes_keep_divergence_unless_the_mapping_changed() {
    let mut w = guest(1);
    let v = w.create(P2mAccess::Rwx);
    w.switch(0, v);
    let g = 0x42u64;
    let (mem, host) = (&mut w.mem, &mut w.host);
    w.alt
        .set_mem_access(mem, host, v, Gfn(g), P2mAccess::Rx)
        .unwrap();
    w.alt
        .set_suppress_ve(mem, host, v, Gfn(g + 1), false)
        .unwrap();
    w.alt
        .change_gfn(mem, host, v, Gfn(g + 2), Some(Gfn(0x1a0)))
        .unwrap();
    w.flush();
    let same = |ty, access| Mapping {
        mfn: Mfn(0x7000 + g),
        ty,
        access,
    };
    // Same frame and type, other host access: kept.
    let (mem, host) = (&mut w.mem, &mut w.host);
    w.alt
        .host_set_entry(mem, host, Gfn(g), Order::PAGE_4K, same(Rw, P2mAccess::N))
        .unwrap();
    // Log-dirty in and out, and a logged write: kept.
    w.alt
        .host_change_type_range(mem, host, Gfn(0), Gfn(0xff), Rw, Logdirty)
        .unwrap();
    w.flush();
    w.switch(0, 0);
    w.alt
        .set_mem_access(&mut w.mem, &mut w.host, 0, Gfn(g), P2mAccess::Rwx)
        .unwrap();
    assert_eq!(
        w.write(0, g),
        End::Ok(Mfn(0x7000 + g)),
        "logged write through the host"
    );
    w.switch(0, v);
    assert_eq!(
        w.alt
            .get_entry(&w.mem, &w.host, v, Gfn(g))
            .unwrap()
            .unwrap()
            .ty,
        Rw
    );
    assert_eq!(
        w.alt.get_mem_access(&w.mem, &w.host, v, Gfn(g)),
        Ok(P2mAccess::Rx)
    );
    let (mem, host) = (&mut w.mem, &mut w.host);
    w.alt
        .host_change_type_range(mem, host, Gfn(0), Gfn(0xff), Logdirty, Rw)
        .unwrap();
    // The host remaps the alias's own gfn: the alias stays.
    let other = Mapping {
        mfn: Mfn(0xabc),
        ty: Rw,
        access: P2mAccess::Rwx,
    };
    w.alt
        .host_set_entry(mem, host, Gfn(g + 2), Order::PAGE_4K, other)
        .unwrap();
    w.flush();
    assert!(w.dropped().is_empty(), "nothing dropped so far");
    assert_eq!(
        w.alt.get_mem_access(&w.mem, &w.host, v, Gfn(g)),
        Ok(P2mAccess::Rx)
    );
    assert_eq!(
        w.alt.get_suppress_ve(&w.mem, &w.host, v, Gfn(g + 1)),
        Ok(false)
    );
    assert_eq!(w.read(0, g + 2), End::Ok(Mfn(0x71a0)));

    // Type change at the same frame (ram_rw -> ram_ro): the mapping changed.
    let (mem, host) = (&mut w.mem, &mut w.host);
    w.alt
        .host_set_entry(mem, host, Gfn(g), Order::PAGE_4K, same(Ro, P2mAccess::Rwx))
        .unwrap();
    // Another frame under the sve entry.
    let moved = Mapping {
        mfn: Mfn(0xdef),
        ty: Rw,
        access: P2mAccess::Rwx,
    };
    w.alt
        .host_set_entry(mem, host, Gfn(g + 1), Order::PAGE_4K, moved)
        .unwrap();
    // Another frame under the alias's source.
    w.alt
        .host_set_entry(mem, host, Gfn(0x1a0), Order::PAGE_4K, moved)
        .unwrap();
    w.flush();
    let d: Vec<_> = w
        .dropped()
        .iter()
        .map(|d| (d.gfn.0, d.access, d.suppress_ve, d.remap_source, d.reason))
        .collect();
    assert_eq!(
        d,
        [
            (g, P2mAccess::Rx, true, None, DropReason::MappingChanged),
            (
                g + 1,
                P2mAccess::Rwx,
                false,
                None,
                DropReason::MappingChanged
            ),
            (
                g + 2,
                P2mAccess::Rwx,
                true,
                Some(Gfn(0x1a0)),
                DropReason::SourceChanged
            ),
        ]
    );
    assert_eq!(
        w.alt.get_mem_access(&w.mem, &w.host, v, Gfn(g)),
        Ok(P2mAccess::Rwx)
    );
    assert_eq!(w.read(0, g + 1), End::Ok(Mfn(0xdef)));
    assert_eq!(
        w.read(0, g + 2),
        End::Ok(Mfn(0xabc)),
        "the alias's own gfn, from the host"
    );
    w.check_invariants();
    teardown(w);
}

/// A superpage the view copied, partly changed in the host: split when
/// frames allow, dropped whole when not; never left stale.
#[test]
fn partial_change_under_a_view_superpage() {
    for frames in [None, Some(0)] {
        let mut w = guest(1);
        let v = w.create(P2mAccess::Rwx);
        w.switch(0, v);
        w.read(0, M2 + 1);
        w.alt
            .host_change_type_range(
                &mut w.mem,
                &mut w.host,
                Gfn(M2),
                Gfn(2 * M2 - 1),
                Rw,
                Logdirty,
            )
            .unwrap();
        w.flush();
        w.read(0, M2 + 1);
        if let Some(extra) = frames {
            w.mem.set_frame_limit(Some(w.mem.outstanding() + extra));
        }
        // The host splits its 2M page for the logged write when it can; so
        // does the view.
        assert_eq!(w.write(0, M2 + 9), End::Ok(Mfn(0x10_0009)));
        assert!(w.dirty.is_dirty(Gfn(M2 + 9)));
        let held = w.view(v).get_entry(&w.mem, Gfn(M2 + 1)).unwrap();
        match frames {
            None => assert_eq!(
                (held.mfn, held.ty, held.order),
                (Some(Mfn(0x10_0001)), Logdirty, Order::PAGE_4K)
            ),
            Some(_) => assert!(held.mfn.is_none() || held.ty == Rw, "{held:?}"),
        }
        w.mem.set_frame_limit(None);
        assert_eq!(w.write(0, M2 + 1), End::Ok(Mfn(0x10_0001)));
        assert!(w.dirty.is_dirty(Gfn(M2 + 1)));
        w.check_invariants();
        teardown(w);
    }
}

#[test]
fn flush_tracking() {
    let mut w = guest(1);
    let v = w.create(P2mAccess::Rwx);
    let idle = w.create(P2mAccess::Rwx);
    w.switch(0, v);
    let take = |w: &mut World| {
        let f = w.alt.take_flush(&mut w.host);
        (f.all_contexts, f.views.iter().collect::<Vec<_>>())
    };
    w.read(0, 0x10);
    assert_eq!(
        take(&mut w),
        (false, vec![]),
        "a lazy copy adds rights only"
    );
    w.alt
        .set_mem_access(&mut w.mem, &mut w.host, v, Gfn(0x10), P2mAccess::R)
        .unwrap();
    assert_eq!(take(&mut w), (false, vec![v as usize]));
    w.alt
        .set_mem_access(&mut w.mem, &mut w.host, v, Gfn(0x10), P2mAccess::Rwx)
        .unwrap();
    assert_eq!(take(&mut w), (false, vec![]), "rights added");
    let m = Mapping {
        mfn: Mfn(0x5000),
        ty: Rw,
        access: P2mAccess::Rwx,
    };
    w.alt
        .host_set_entry(&mut w.mem, &mut w.host, Gfn(0x800), Order::PAGE_4K, m)
        .unwrap();
    assert_eq!(take(&mut w), (false, vec![]), "a new host mapping");
    w.alt
        .host_remove(&mut w.mem, &mut w.host, Gfn(0x10), Order::PAGE_4K)
        .unwrap();
    assert_eq!(
        take(&mut w),
        (false, vec![0, v as usize]),
        "the idle view held nothing"
    );
    w.alt
        .host_change_type_range(&mut w.mem, &mut w.host, Gfn(0), Gfn(0x1ff), Rw, Logdirty)
        .unwrap();
    assert_eq!(
        take(&mut w),
        (false, vec![0]),
        "the views held nothing there"
    );
    w.read(0, 0x20);
    w.alt
        .host_change_type_range(&mut w.mem, &mut w.host, Gfn(0), Gfn(0x1ff), Logdirty, Rw)
        .unwrap();
    // The host's mark from before still covers the range: nothing new there.
    assert_eq!(take(&mut w), (false, vec![v as usize]));
    w.alt.reset_view(&mut w.mem, &w.host, v).unwrap();
    assert_eq!(take(&mut w), (false, vec![v as usize]));
    w.alt.destroy_view(&mut w.mem, idle).unwrap();
    assert_eq!(take(&mut w), (true, vec![]));
    teardown(w);
}

#[test]
fn reset_and_default_access() {
    let mut w = guest(1);
    let v = w.create(P2mAccess::Rx);
    w.switch(0, v);
    assert!(matches!(w.write(0, 0x10), End::Violation(_)));
    w.alt.set_default_access(v, P2mAccess::Rwx).unwrap();
    assert!(
        matches!(w.write(0, 0x10), End::Violation(_)),
        "copies keep their access"
    );
    assert_eq!(
        w.write(0, 0x11),
        End::Ok(Mfn(0x7011)),
        "later copies take the new default"
    );
    w.alt
        .change_gfn(&mut w.mem, &w.host, v, Gfn(0x12), Some(Gfn(0x13)))
        .unwrap();
    w.alt.reset_view(&mut w.mem, &w.host, v).unwrap();
    w.flush();
    assert_eq!(w.view(v).max_mapped_pfn(), Gfn(0));
    assert_eq!(tables(&w.mem, w.view(v)), 1);
    assert_eq!(w.alt.remapped_gfns(v), Ok(None));
    assert_eq!(
        w.alt.vcpu_view(0),
        Ok(v),
        "vCPUs may stay on a view being reset"
    );
    assert_eq!(w.write(0, 0x10), End::Ok(Mfn(0x7010)));
    assert_eq!(w.read(0, 0x12), End::Ok(Mfn(0x7012)));
    w.check_invariants();
    teardown(w);
}

#[test]
fn revert_and_repoint_remaps() {
    let mut w = guest(1);
    let v = w.create(P2mAccess::Rwx);
    w.switch(0, v);
    let (mem, host) = (&mut w.mem, &mut w.host);
    w.alt
        .set_mem_access(mem, host, v, Gfn(0x60), P2mAccess::Rx)
        .unwrap();
    w.alt
        .change_gfn(mem, host, v, Gfn(0x50), Some(Gfn(0x60)))
        .unwrap();
    assert_eq!(
        w.alt.get_mem_access(mem, host, v, Gfn(0x50)),
        Ok(P2mAccess::Rx),
        "the source's access in the view"
    );
    w.alt
        .change_gfn(mem, host, v, Gfn(0x50), Some(Gfn(0x70)))
        .unwrap();
    assert_eq!(w.alt.remapped_gfns(v), Ok(Some((Gfn(0x70), Gfn(0x70)))));
    w.flush();
    assert_eq!(w.read(0, 0x50), End::Ok(Mfn(0x7070)));
    // Remap inside a 1G page the view holds: the rest stays.
    w.read(0, G1 + 1);
    w.alt
        .change_gfn(&mut w.mem, &w.host, v, Gfn(G1 + 2), Some(Gfn(0x70)))
        .unwrap();
    w.flush();
    assert_eq!(w.read(0, G1 + 1), End::Ok(Mfn(0x100_0001)));
    assert_eq!(w.read(0, G1 + 2), End::Ok(Mfn(0x7070)));
    w.alt
        .change_gfn(&mut w.mem, &w.host, v, Gfn(0x50), None)
        .unwrap();
    w.flush();
    assert_eq!(w.read(0, 0x50), End::Ok(Mfn(0x7050)));
    assert_eq!(w.alt.remapped_gfns(v), Ok(Some((Gfn(0x70), Gfn(0x70)))));
    // Sources must be RAM.
    w.map(0x90, Order::PAGE_4K, 0xfee00, P2mType::MmioDirect);
    assert_eq!(
        w.alt
            .change_gfn(&mut w.mem, &w.host, v, Gfn(0x50), Some(Gfn(0x90))),
        Err(Error::NotRam)
    );
    w.check_invariants();
    teardown(w);
}

/// After the out-of-frames log-dirty fallback made a whole 1G host page
/// writable (and logged it all dirty), a type change over part of it
/// recomputes the host's whole 1G mapping but only the view's mappings in
/// the range (the view holds that gigabyte in smaller pieces): the views are
/// brought in line beyond the range too, and writes stay logged.
#[test]
fn partial_type_change_over_a_coarse_fallback() {
    let mut w = guest(2);
    let v = w.create(P2mAccess::Rwx);
    w.switch(0, v);
    w.read(0, G1 + 3);
    // The view's 1G copy becomes 2M pieces and a page table.
    w.alt
        .set_mem_access(&mut w.mem, &mut w.host, v, Gfn(G1 + 5), P2mAccess::Rw)
        .unwrap();
    w.read(0, G1 + 4 * M2);
    let (mem, host) = (&mut w.mem, &mut w.host);
    w.alt
        .host_change_type_global(mem, host, Rw, Logdirty)
        .unwrap();
    w.flush();
    // vCPU 1 writes through the host with no frame to split its 1G page.
    w.mem.set_frame_limit(Some(w.mem.outstanding()));
    assert_eq!(w.write(1, G1 + 7), End::Ok(Mfn(0x100_0007)));
    w.mem.set_frame_limit(None);
    assert!(w.outcomes.iter().any(|o| matches!(
        o,
        Outcome::LogDirty {
            fault: hv_ept::WriteFault::Coarse {
                order: Order::PAGE_1G,
                ..
            },
            ..
        }
    )));
    assert_eq!(w.dirty.dirty_count(), G1);
    w.check_invariants();
    // Stop tracking two pages: the host's 1G mapping is recomputed whole.
    let (mem, host) = (&mut w.mem, &mut w.host);
    w.alt
        .host_change_type_range(mem, host, Gfn(G1), Gfn(G1 + 1), Logdirty, Rw)
        .unwrap();
    w.flush();
    w.check_invariants();
    let e = w
        .alt
        .get_entry(&w.mem, &w.host, v, Gfn(G1 + 4 * M2))
        .unwrap()
        .unwrap();
    assert_eq!(e.ty, w.host.get_entry(&w.mem, Gfn(G1 + 4 * M2)).unwrap().ty);
    assert_eq!(w.clean(0, Gfn::MAX.0).len() as u64, G1);
    for g in [G1 + 4 * M2, G1 + 4 * M2 + 1, G1 + 9] {
        assert_eq!(w.write(0, g), End::Ok(Mfn(0x100_0000 + g - G1)));
        assert!(w.dirty.is_dirty(Gfn(g)), "{g:#x}");
    }
    w.check_invariants();
    teardown(w);
}

/// The view-side half of the margins a type change reaches beyond its range:
/// the host maps a 2M page `ram_logdirty` outside any log-dirty range, a
/// view copies it whole, an access change in view 0 splits the host's page,
/// and a type change covers part of it. The view's 2M copy straddles the
/// range and is recomputed whole (its other pages would become `ram_rw`
/// while the host keeps them `ram_logdirty`): the view must follow the host
/// there, so a write through it beside the range is still logged.
#[test]
fn a_view_copy_straddling_a_change_follows_the_host_beside_it() {
    let mut w = World::enabled(1);
    w.map(0, Order::PAGE_2M, 0x40_0000, Logdirty);
    let v = w.create(P2mAccess::Rwx);
    w.switch(0, v);
    assert_eq!(w.read(0, 0x10), End::Ok(Mfn(0x40_0010)));
    let copy = w.view(v).get_entry(&w.mem, Gfn(0)).unwrap();
    assert_eq!((copy.ty, copy.order), (Logdirty, Order::PAGE_2M));
    let (mem, host) = (&mut w.mem, &mut w.host);
    w.alt
        .set_mem_access(mem, host, 0, Gfn(0x180), P2mAccess::Rw)
        .unwrap();
    assert_eq!(
        w.host.stored_leaf(&w.mem, Gfn(0)).unwrap().unwrap().order,
        Order::PAGE_4K,
        "the host's page is split"
    );
    let (mem, host) = (&mut w.mem, &mut w.host);
    w.alt
        .host_change_type_range(mem, host, Gfn(0x100), Gfn(0x1ff), Rw, Logdirty)
        .unwrap();
    w.flush();
    w.check_invariants();
    for g in [0, 0x10, 0xff, 0x100, 0x1ff] {
        let e = w
            .alt
            .get_entry(&w.mem, &w.host, v, Gfn(g))
            .unwrap()
            .unwrap();
        assert_eq!(e.ty, Logdirty, "view at {g:#x}");
    }
    assert_eq!(w.write(0, 0x10), End::Ok(Mfn(0x40_0010)));
    assert!(
        w.dirty.is_dirty(Gfn(0x10)),
        "a write through the view's copy beside the range escaped log-dirty"
    );
    assert_eq!(w.write(0, 0x110), End::Ok(Mfn(0x40_0110)));
    assert!(w.dirty.is_dirty(Gfn(0x110)));
    teardown(w);
}

/// A clean while vCPUs run: writes between its two halves. vCPU 1 has page
/// P cached writable (its write was logged); vCPU 0 writes page Q after the
/// INVEPT, which faults and makes Q writable before the fetch. P's write
/// through the stale translation belongs to this clean; Q's stays logged
/// for the next one, and so do Q's later writes, which no longer fault.
#[test]
fn a_clean_loses_no_write_while_vcpus_run() {
    let mut w = guest(2);
    let (p, q) = (0x10, 0x11);
    let (mem, host) = (&mut w.mem, &mut w.host);
    w.alt
        .host_change_type_range(mem, host, Gfn(0), Gfn(0x1f), Rw, Logdirty)
        .unwrap();
    w.flush();
    assert_eq!(w.write(1, p), End::Ok(Mfn(0x7000 + p)));
    assert!(w.dirty.is_dirty(Gfn(p)));

    let armed = w
        .alt
        .arm_dirty(&mut w.mem, &mut w.host, &mut w.dirty, Gfn(0), Gfn(0x1f))
        .unwrap();
    // Before the INVEPT, vCPU 1 still writes P through its TLB: no exit.
    let (end, exits) = w.access(1, p, Write);
    assert_eq!(end, End::Ok(Mfn(0x7000 + p)));
    assert_eq!(exits.logdirty + exits.misconfigs, 0, "a stale translation");
    assert_eq!(
        w.alt.fetch_dirty(&mut w.dirty, &armed, |_| {}),
        Err(Error::FlushPending),
        "no fetch before the INVEPT"
    );
    w.flush();
    // After it, vCPU 0's write to Q faults, is logged, and Q is writable.
    let (end, exits) = w.access(0, q, Write);
    assert_eq!(end, End::Ok(Mfn(0x7000 + q)));
    assert_eq!(exits.logdirty, 1);
    let mut got = vec![];
    w.alt
        .fetch_dirty(&mut w.dirty, &armed, |g| got.push(g.0))
        .unwrap();
    assert_eq!(got, [p], "P (and its write through the stale entry) only");
    assert!(w.dirty.is_dirty(Gfn(q)), "Q is kept for the next clean");
    // Q is written again without a fault; the next clean still has it.
    let (_, exits) = w.access(0, q, Write);
    assert_eq!(exits.logdirty, 0);
    assert_eq!(w.clean(0, 0x1f), [q]);
    // And P was re-armed: its next write faults and is logged.
    let (_, exits) = w.access(1, p, Write);
    assert_eq!(exits.logdirty, 1);
    assert_eq!(w.clean(0, 0x1f), [p]);
    teardown(w);
}

/// Drop-log entries of a view that is destroyed (or of every view, when
/// altp2m is disabled) go with it: a view created later at the same index
/// must not be told it lost entries it never had.
#[test]
fn the_drop_log_forgets_destroyed_views() {
    let mut w = guest(1);
    let restrict = |w: &mut World, v: u16| {
        let (mem, host) = (&mut w.mem, &mut w.host);
        w.alt
            .set_mem_access(mem, host, v, Gfn(5), P2mAccess::R)
            .unwrap();
    };
    let v = w.create(P2mAccess::Rwx);
    let other = w.create(P2mAccess::Rwx);
    restrict(&mut w, v);
    restrict(&mut w, other);
    w.map(5, Order::PAGE_4K, 0x9000, Rw); // another frame: both lose gfn 5
    let (mem, _) = (&mut w.mem, &mut w.host);
    w.alt.destroy_view(mem, v).unwrap();
    assert_eq!(w.create(P2mAccess::Rwx), v, "the index is reused");
    let drops = w.dropped();
    assert_eq!(drops.len(), 1, "{drops:?}");
    assert_eq!((drops[0].view, drops[0].gfn), (other, Gfn(5)));

    restrict(&mut w, other);
    w.map(5, Order::PAGE_4K, 0xa000, Rw);
    w.alt.disable(&mut w.mem).unwrap();
    w.alt.enable(&mut w.mem, &w.host).unwrap();
    assert_eq!(w.create(P2mAccess::Rwx), 1);
    assert!(w.dropped().is_empty(), "nothing survives a disable");
    teardown(w);
}

/// Host changes in a 2M region where many views hold 4K pages (the index
/// keeps a set per page there): every view that holds a changed page
/// follows, whichever view first crowded the region, and after a view lost
/// its page it is found again when it copies it anew.
#[test]
fn crowded_regions_miss_no_view() {
    let mut w = guest(1);
    let views: Vec<u16> = (0..12).map(|_| w.create(P2mAccess::Rwx)).collect();
    for (k, &v) in views.iter().enumerate() {
        w.switch(0, v);
        w.read(0, 0x20 + k as u64);
        if k % 4 == 0 {
            w.read(0, 0x100);
        }
    }
    assert!(
        w.alt.index_memory().crowded >= 1,
        "{:?}",
        w.alt.index_memory()
    );
    // Remaps to other frames: a view left out would keep the old one.
    let mut frame = 0x50_0000;
    for round in 0..3 {
        for g in [0x100, 0x20, 0x27, 0x1ff] {
            frame += 1;
            w.map(g, Order::PAGE_4K, frame, Rw);
            w.check_invariants();
        }
        // The views copy what they held again (and view 1 a new page).
        for (k, &v) in views.iter().enumerate() {
            w.switch(0, v);
            w.read(0, 0x20 + k as u64);
            if k % 4 == round {
                w.read(0, 0x100);
            }
        }
        w.check_invariants();
    }
    teardown(w);
}
