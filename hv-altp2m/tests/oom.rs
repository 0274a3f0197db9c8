//! Out of frames at every allocation point of every operation that
//! allocates: a refused operation leaves host and views exactly as they
//! were; one with a fallback (propagation, log-dirty writes) succeeds with
//! consistent state; no frame is ever leaked or freed twice (SimMemory
//! panics on a double free).

mod common;

use common::*;
use hv_altp2m::{Altp2m, Error, Mapping};
use hv_ept::sim::SimMemory;
use hv_ept::walk::AccessKind;
use hv_ept::{Gfn, Mfn, Order, P2m, P2mAccess, P2mType};

use P2mType::{RamLogdirty as Logdirty, RamRw as Rw};

/// 4K pages at 0..0x200, a 2M page at 2M, a 1G page at 1G; view 1 holds the
/// 1G and 2M pages whole (vCPU 0 on it), view 2 is empty.
fn scene() -> World {
    let mut w = World::enabled(2);
    for g in 0..0x200 {
        w.map(g, Order::PAGE_4K, 0x7000 + g, Rw);
    }
    w.map(M2, Order::PAGE_2M, 0x10_0000, Rw);
    w.map(G1, Order::PAGE_1G, 0x100_0000, Rw);
    let v = w.create(P2mAccess::Rwx);
    w.create(P2mAccess::Rwx);
    w.switch(0, v);
    w.read(0, G1 + 5);
    w.read(0, M2 + 5);
    w.flush();
    w
}

fn violation(w: &mut World, vcpu: usize, g: u64, kind: AccessKind) -> Result<(), Error> {
    w.alt
        .handle_violation(&mut w.mem, &mut w.host, &mut w.dirty, vcpu, g << 12, kind)
        .map(|_| ())
}

#[test]
fn creating_the_state_and_views() {
    let mut mem = SimMemory::new();
    let host = P2m::new(&mut mem, CAPS).unwrap();
    for n in 1..=2 {
        mem.fail_nth_alloc(n);
        assert!(Altp2m::new(&mut mem, 1, 8).is_err());
        mem.clear_failure();
        assert_eq!(mem.outstanding(), 1, "the lists came back");
    }
    let alt = Altp2m::new(&mut mem, 1, 8).unwrap();
    alt.destroy(&mut mem);
    host.destroy(&mut mem);
    assert_eq!(mem.outstanding(), 0);

    let n = at_every_allocation_failure(scene, |w| {
        w.alt
            .create_view(&mut w.mem, &w.host, P2mAccess::R)
            .map(|_| ())
    });
    assert_eq!(n, 1, "the root");
}

#[test]
fn lazy_copies() {
    // Into an empty view under vCPU 1: PDPT, PD and PT for a 4K page.
    let setup = || {
        let mut w = scene();
        w.switch(1, 2);
        w
    };
    assert_eq!(
        at_every_allocation_failure(setup, |w| violation(w, 1, 0x33, AccessKind::Read)),
        3
    );
    assert_eq!(
        at_every_allocation_failure(setup, |w| violation(w, 1, M2 + 1, AccessKind::Write)),
        2
    );
    assert_eq!(
        at_every_allocation_failure(setup, |w| violation(w, 1, G1 + 1, AccessKind::Fetch)),
        1
    );
}

type Op = fn(&mut World) -> Result<(), Error>;

#[test]
fn access_sve_and_remaps_splitting_superpages() {
    let cases: [(&str, Op, u64); 5] = [
        (
            "inside the 1G page view 1 holds: a PD and a PT",
            |w| {
                w.alt
                    .set_mem_access(&mut w.mem, &mut w.host, 1, Gfn(G1 + 7), P2mAccess::R)
            },
            2,
        ),
        (
            "inside its 2M page",
            |w| {
                w.alt
                    .set_suppress_ve(&mut w.mem, &mut w.host, 1, Gfn(M2 + 7), false)
            },
            1,
        ),
        (
            "a copy into the empty view",
            |w| {
                w.alt
                    .set_mem_access(&mut w.mem, &mut w.host, 2, Gfn(0x44), P2mAccess::Rx)
            },
            3,
        ),
        (
            "view 0: splits in the host",
            |w| {
                w.alt
                    .set_mem_access(&mut w.mem, &mut w.host, 0, Gfn(G1 + 3), P2mAccess::R)
            },
            2,
        ),
        (
            "a remap inside the 1G page",
            |w| {
                w.alt
                    .change_gfn(&mut w.mem, &w.host, 1, Gfn(G1 + 9), Some(Gfn(0x10)))
            },
            2,
        ),
    ];
    for (what, op, points) in cases {
        assert_eq!(at_every_allocation_failure(scene, op), points, "{what}");
    }
}

#[test]
fn conversions() {
    let setup = || {
        let mut w = scene();
        // rx2rw on the whole 2M page of view 1: the conversion splits it.
        let e = w.view(1).get_entry(&w.mem, Gfn(M2)).unwrap();
        assert_eq!(e.order, Order::PAGE_2M);
        w.alt.set_default_access(1, P2mAccess::Rx2rw).unwrap();
        w.alt.reset_view(&mut w.mem, &w.host, 1).unwrap();
        w.read(0, M2 + 3);
        w
    };
    assert_eq!(
        at_every_allocation_failure(setup, |w| violation(w, 0, M2 + 3, AccessKind::Write)),
        1
    );
}

#[test]
fn host_changes_with_views_holding_them() {
    // The host needs a PT to split its 2M page; view 1 its own (fallback:
    // drop the 2M copy).
    let m = Mapping {
        mfn: Mfn(0x5555),
        ty: Rw,
        access: P2mAccess::Rwx,
    };
    let n = at_every_allocation_failure(scene, |w| {
        w.alt
            .host_set_entry(&mut w.mem, &mut w.host, Gfn(M2 + 8), Order::PAGE_4K, m)
    });
    assert_eq!(
        n, 1,
        "the host's split; the view drops its copy without allocating"
    );
    // A log-dirty write split in the host (PD + PT) and in the view.
    let tracked = || {
        let mut w = scene();
        w.alt
            .host_change_type_range(
                &mut w.mem,
                &mut w.host,
                Gfn(G1),
                Gfn(2 * G1 - 1),
                Rw,
                Logdirty,
            )
            .unwrap();
        w.alt
            .set_mem_access(&mut w.mem, &mut w.host, 1, Gfn(G1 + 100), P2mAccess::Rwx)
            .unwrap();
        w.flush();
        w.read(0, G1 + 5);
        w
    };
    let n = at_every_allocation_failure(tracked, |w| {
        violation(w, 0, G1 + 5, AccessKind::Write)?;
        assert!(
            w.dirty.is_dirty(Gfn(G1 + 5)),
            "the write is logged whatever happened"
        );
        Ok(())
    });
    assert!(n >= 2, "{n}");
    // And the guest then writes successfully, logged, in every case.
    for limit in 0..4 {
        let mut w = tracked();
        w.mem.set_frame_limit(Some(w.mem.outstanding() + limit));
        for g in [G1 + 5, G1 + 6, G1 + 100] {
            assert_eq!(w.write(0, g), End::Ok(Mfn(0x100_0000 + g - G1)));
            assert!(w.dirty.is_dirty(Gfn(g)));
        }
        w.mem.set_frame_limit(None);
        w.check_invariants();
        teardown(w);
    }
}
