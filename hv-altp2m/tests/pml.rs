//! Log-dirty under PML through views: writes to tracked pages in any view,
//! aliases included, are logged by the CPU without an exit (walk model with
//! page-modification logging, behind the model TLB), drained as the kernel
//! does on every exit, resolved through the views whatever view the vCPU
//! switched to since (VMFUNC), and re-armed by clearing exactly the dirty
//! flags of the pages handed over. Property tests drive the same operations
//! through a write-protect world and a PML world and compare what every
//! clean hands over.

mod common;

use std::collections::BTreeSet;

use common::*;
use hv_altp2m::{Error, Mapping, Outcome, REARM_PAGES, REARM_RANGES};
use hv_ept::walk::AccessKind;
use hv_ept::{Gfn, LogMode, Mfn, Order, P2mAccess, P2mType, WriteFault};
use proptest::prelude::*;

/// The framebuffer of the seed scenario: 16 pages in a 2M host page.
const FB: u64 = 4 * M2;
const FB_PAGES: u64 = 16;

fn track(w: &mut World, s: u64, e: u64) {
    w.alt
        .host_change_type_range(
            &mut w.mem,
            &mut w.host,
            Gfn(s),
            Gfn(e),
            P2mType::RamRw,
            P2mType::RamLogdirty,
        )
        .unwrap();
    w.flush();
}

/// Host RAM: 2M pages over `[0, 8 * M2)`, mfn = gfn + 0x10000.
fn ram(mode: LogMode, vcpus: usize) -> World {
    let mut w = World::enabled_in(vcpus, mode);
    for k in 0..8 {
        w.map(k * M2, Order::PAGE_2M, k * M2 + 0x10000, P2mType::RamRw);
    }
    w
}

fn exits_of(e: Exits) -> u32 {
    e.lazy_copies + e.misconfigs + e.logdirty + e.converted + e.retries
}

/// The seed scenario, framed: a view created early copies the framebuffer
/// writable, tracking starts later; each frame writes some pages through
/// the view and cleans. Returns the exits of each frame's writes.
fn display_frames(mode: LogMode) -> Vec<u32> {
    let mut w = ram(mode, 1);
    let v = w.create(P2mAccess::Rwx);
    w.switch(0, v);
    assert_eq!(w.write(0, FB), End::Ok(Mfn(FB + 0x10000)));
    track(&mut w, FB, FB + FB_PAGES - 1);
    let mut per_frame = Vec::new();
    for frame in 0..6u64 {
        let pages: Vec<u64> = (0..FB_PAGES).filter(|p| (p + frame) % 3 != 0).collect();
        let mut exits = 0;
        for &p in &pages {
            let (end, e) = w.access(0, FB + p, AccessKind::Write);
            assert!(matches!(end, End::Ok(_)));
            exits += exits_of(e);
        }
        let got = w.clean(FB, FB + FB_PAGES - 1);
        let want: Vec<u64> = pages.iter().map(|p| FB + p).collect();
        assert_eq!(got, want, "{mode:?} frame {frame}");
        per_frame.push(exits);
    }
    w.check_invariants();
    teardown(w);
    per_frame
}

#[test]
fn a_display_frame_costs_no_exit_under_pml() {
    let pml = display_frames(LogMode::Pml);
    // The first frame recomputes the view's superpage (one misconfig: the
    // framebuffer is part of it, so resolution splits it); then nothing.
    assert_eq!(pml[0], 1, "{pml:?}");
    assert!(pml[1..].iter().all(|&e| e == 0), "{pml:?}");
    // The write-protect path: a fault per page and frame, plus the
    // misconfigurations of the re-arm.
    let wp = display_frames(LogMode::WriteProtect);
    assert!(wp[1..].iter().all(|&e| e >= 10), "{wp:?}");
}

#[test]
fn a_write_through_an_alias_dirties_its_source_without_a_fault() {
    let mut w = ram(LogMode::Pml, 1);
    let (s, a) = (FB + 1, 3 * M2 + 7);
    let v = w.create(P2mAccess::Rwx);
    w.switch(0, v);
    track(&mut w, s, s);
    w.alt
        .change_gfn(&mut w.mem, &w.host, v, Gfn(a), Some(Gfn(s)))
        .unwrap();
    w.flush();
    let (end, exits) = w.access(0, a, AccessKind::Write);
    assert_eq!(end, End::Ok(Mfn(s + 0x10000)));
    assert_eq!(exits_of(exits), 0, "the alias is writable: {exits:?}");
    assert_eq!(w.clean(0, 8 * M2 - 1), [s], "logged against the source");
    // Re-armed: the alias's flag was cleared, its next write logs again.
    let (_, exits) = w.access(0, a, AccessKind::Write);
    assert_eq!(exits_of(exits), 0);
    assert_eq!(w.clean(s, s), [s]);
    assert!(w.clean(0, 8 * M2 - 1).is_empty());
    w.check_invariants();
    teardown(w);
}

#[test]
fn a_vmfunc_before_the_drain_still_finds_the_view_written_through() {
    let mut w = ram(LogMode::Pml, 1);
    let (s, a) = (FB + 1, FB + 9);
    track(&mut w, FB, FB + FB_PAGES - 1);
    let v1 = w.create(P2mAccess::Rwx);
    let v2 = w.create(P2mAccess::Rwx);
    w.alt
        .change_gfn(&mut w.mem, &w.host, v1, Gfn(a), Some(Gfn(s)))
        .unwrap();
    w.flush();
    w.load_eptps();
    // Warm both views (lazy copies, splits), then clean.
    for v in [v1, v2] {
        w.switch(0, v);
        w.write(0, a);
    }
    w.clean(0, 8 * M2 - 1);
    // In v1, a is an alias of s; in v2, a is a itself. Write through v1,
    // switch to v2 without an exit, and only then exit.
    w.switch(0, v1);
    let (_, exits) = w.access(0, a, AccessKind::Write);
    assert_eq!(exits_of(exits), 0);
    assert!(w.vmfunc(0, v2 as usize));
    assert_eq!(w.drain(0), [a << 12], "the CPU logged the alias's address");
    assert!(w.dirty.is_dirty(Gfn(s)) && !w.dirty.is_dirty(Gfn(a)));
    assert_eq!(w.clean(0, 8 * M2 - 1), [s]);
    teardown(w);
}

#[test]
fn a_write_through_a_stale_dirty_translation_is_in_the_clean_that_rearms_it() {
    let mut w = ram(LogMode::Pml, 2);
    track(&mut w, FB, FB + FB_PAGES - 1);
    w.write(0, FB);
    w.write(0, FB);
    assert_eq!(w.clean(FB, FB), [FB]);
    w.write(1, FB);
    w.drain_all();
    // vCPU 0 caches FB as dirty, then the clean's first half clears the flag;
    // a write through the stale translation logs nothing, but the page is
    // handed over by this clean, and read by its caller afterwards.
    w.write(0, FB);
    let armed = w
        .alt
        .arm_dirty(&mut w.mem, &mut w.host, &mut w.dirty, Gfn(FB), Gfn(FB))
        .unwrap();
    assert_eq!(
        w.alt.fetch_dirty(&mut w.dirty, &armed, |_| {}),
        Err(Error::FlushPending)
    );
    assert!(w.pml[0].index == 511 && w.pml[1].index == 511);
    let (_, exits) = w.access(0, FB, AccessKind::Write);
    assert_eq!(exits_of(exits), 0);
    assert_eq!(w.pml[0].index, 511, "the stale translation logged nothing");
    w.flush();
    let mut got = Vec::new();
    w.alt
        .fetch_dirty(&mut w.dirty, &armed, |g| got.push(g.0))
        .unwrap();
    assert_eq!(got, [FB]);
    // After the INVEPT the next write logs.
    w.write(0, FB);
    assert_eq!(w.drain(0), [FB << 12]);
    teardown(w);
}

#[test]
fn pml_fills_and_exits_every_512_logged_pages() {
    let mut w = ram(LogMode::Pml, 1);
    track(&mut w, 0, 4 * M2 - 1);
    // Split every page first (a fault per superpage), then clean.
    for k in 0..4 {
        w.write(0, k * M2);
    }
    w.clean(0, 8 * M2 - 1);
    for g in 0..4 * M2 {
        let (end, exits) = w.access(0, g, AccessKind::Write);
        assert!(matches!(end, End::Ok(_)) && exits_of(exits) == 0, "{g:#x}");
    }
    assert_eq!(w.pml_full, 3, "2048 pages: full after 512, 1024, 1536");
    let got = w.clean(0, 8 * M2 - 1);
    assert_eq!(got, (0..4 * M2).collect::<Vec<_>>());
    teardown(w);
}

#[test]
fn a_clean_of_many_pages_rearms_by_type_and_stays_exact() {
    let mut w = ram(LogMode::Pml, 1);
    let pages = 8 * M2;
    track(&mut w, 0, pages - 1);
    let v = w.create(P2mAccess::Rwx);
    w.switch(0, v);
    for round in 0..3 {
        let written: Vec<u64> = (0..pages).filter(|g| g % 3 != round).collect();
        assert!(2 * written.len() > REARM_PAGES, "host and view re-arms");
        let mut exits = 0;
        for &g in &written {
            exits += exits_of(w.access(0, g, AccessKind::Write).1);
        }
        assert_eq!(w.clean(0, pages - 1), written, "round {round}");
        // More page re-arms than the bound: the window was re-armed by
        // type, so the next round pays misconfigurations.
        if round > 0 {
            assert!(exits > 0);
        }
    }
    w.check_invariants();
    teardown(w);
}

#[test]
fn a_window_with_many_ranges_is_rearmed_as_one_span() {
    for mode in [LogMode::WriteProtect, LogMode::Pml] {
        let mut w = ram(mode, 1);
        let n = 4 * REARM_RANGES as u64;
        for k in 0..n {
            track(&mut w, 4 * k, 4 * k);
        }
        assert_eq!(w.host.logdirty().len(), n as usize);
        for k in 0..n {
            w.write(0, 4 * k);
            w.write(0, 4 * k + 1);
        }
        let writes = w.mem.entry_writes();
        let got = w.clean(0, 8 * M2 - 1);
        assert_eq!(got, (0..n).map(|k| 4 * k).collect::<Vec<_>>(), "{mode:?}");
        assert!(
            w.mem.entry_writes() - writes <= 2 * n,
            "{mode:?}: {} writes",
            w.mem.entry_writes() - writes
        );
        // Re-armed: each page logs again, the untracked ones never.
        for k in 0..n {
            w.write(0, 4 * k);
            w.write(0, 4 * k + 1);
        }
        assert_eq!(w.clean(0, 8 * M2 - 1), got, "{mode:?}");
        w.check_invariants();
        teardown(w);
    }
}

#[test]
fn out_of_frames_a_view_split_falls_back_to_the_write_protect_way() {
    let mut w = ram(LogMode::Pml, 1);
    let v = w.create(P2mAccess::Rwx);
    w.switch(0, v);
    w.write(0, FB);
    // The whole superpage: resolution keeps it whole, write-protected.
    track(&mut w, FB, FB + M2 - 1);
    w.read(0, FB);
    w.mem.set_frame_limit(Some(w.mem.outstanding()));
    let (end, _) = w.access(0, FB + 3, AccessKind::Write);
    w.mem.set_frame_limit(None);
    assert!(matches!(end, End::Ok(_)));
    assert!(
        w.outcomes.iter().any(|o| matches!(
            o,
            Outcome::LogDirty {
                fault: WriteFault::Coarse { .. },
                ..
            }
        )),
        "{:?}",
        w.outcomes
    );
    // The whole superpage was logged and is writable until the clean
    // re-arms it by type; then the pages log again, through splits.
    let got = w.clean(FB, FB + M2 - 1);
    assert_eq!(got, (FB..FB + M2).collect::<Vec<_>>());
    let (_, exits) = w.access(0, FB + 5, AccessKind::Write);
    assert_eq!(
        (exits.misconfigs, exits.logdirty),
        (1, 1),
        "recompute, split"
    );
    assert_eq!(w.clean(FB, FB + M2 - 1), [FB + 5]);
    w.check_invariants();
    teardown(w);
}

// The same operations through both modes.

const PAGES: u64 = 4 * M2;
const SLOTS: u16 = 3;
const VCPUS: usize = 2;

#[derive(Clone, Debug)]
enum Op {
    Track {
        a: u64,
        b: u64,
        on: bool,
    },
    Global {
        on: bool,
    },
    Create {
        slot: u16,
    },
    Destroy {
        slot: u16,
    },
    Reset {
        slot: u16,
    },
    Switch {
        vcpu: usize,
        view: u16,
    },
    Vmfunc {
        vcpu: usize,
        index: usize,
    },
    Write {
        vcpu: usize,
        gfn: u64,
    },
    Read {
        vcpu: usize,
        gfn: u64,
    },
    Remap {
        slot: u16,
        alias: u64,
        source: Option<u64>,
    },
    Access {
        view: u16,
        gfn: u64,
        rw: bool,
    },
    /// The host maps a 4K page at `gfn` to another frame.
    Move {
        gfn: u64,
        seed: u64,
    },
    /// A clean by `vcpu` (its buffer drained first; the others' too when
    /// `all`), with writes from vCPUs between its two halves.
    Clean {
        vcpu: usize,
        a: u64,
        b: u64,
        all: bool,
        between: Vec<(usize, u64)>,
    },
}

fn gfn() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => 0..PAGES,
        3 => (0..4u64, 0..8u64).prop_map(|(k, o)| k * M2 + o),
        1 => (0..4u64).prop_map(|k| k * M2 + 511),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let vcpu = 0..VCPUS;
    let slot = 1..=SLOTS;
    prop_oneof![
        2 => (gfn(), gfn(), prop::bool::weighted(0.8)).prop_map(|(a, b, on)| Op::Track { a, b, on }),
        1 => prop::bool::weighted(0.3).prop_map(|on| Op::Global { on }),
        2 => slot.clone().prop_map(|slot| Op::Create { slot }),
        1 => slot.clone().prop_map(|slot| Op::Destroy { slot }),
        1 => slot.clone().prop_map(|slot| Op::Reset { slot }),
        2 => (vcpu.clone(), 0..=SLOTS).prop_map(|(vcpu, view)| Op::Switch { vcpu, view }),
        3 => (vcpu.clone(), 0..=SLOTS as usize).prop_map(|(vcpu, index)| Op::Vmfunc { vcpu, index }),
        14 => (vcpu.clone(), gfn()).prop_map(|(vcpu, gfn)| Op::Write { vcpu, gfn }),
        3 => (vcpu.clone(), gfn()).prop_map(|(vcpu, gfn)| Op::Read { vcpu, gfn }),
        3 => (slot, gfn(), prop::option::weighted(0.8, gfn()))
            .prop_map(|(slot, alias, source)| Op::Remap { slot, alias, source }),
        1 => (0..=SLOTS, gfn(), any::<bool>()).prop_map(|(view, gfn, rw)| Op::Access { view, gfn, rw }),
        1 => (gfn(), any::<u64>()).prop_map(|(gfn, seed)| Op::Move { gfn, seed }),
        3 => (vcpu, gfn(), gfn(), prop::bool::weighted(0.7), prop::collection::vec((0..VCPUS, gfn()), 0..3))
            .prop_map(|(vcpu, a, b, all, between)| Op::Clean { vcpu, a, b, all, between }),
    ]
}

/// A world and what the test knows about it: the view each vCPU is on.
struct Side {
    w: World,
    views: [u16; VCPUS],
    /// Every vCPU's buffer is drained before the hypervisor changes
    /// anything (as with one vCPU); else only the calling vCPU's.
    exact: bool,
}

impl Side {
    fn new(mode: LogMode, exact: bool) -> Side {
        let mut w = World::enabled_in(VCPUS, mode);
        for k in 0..PAGES / M2 {
            w.map(k * M2, Order::PAGE_2M, k * M2 + 0x10000, P2mType::RamRw);
        }
        Side {
            w,
            views: [0; VCPUS],
            exact,
        }
    }

    /// The hypervisor runs for `vcpu` (a hypercall): its buffer is drained
    /// first, and every other one when exact.
    fn exit(&mut self, vcpu: usize) {
        if self.exact {
            self.w.drain_all();
        } else {
            self.w.drain(vcpu);
        }
    }

    /// The operation; returns what a comparison needs: the end of an
    /// access, the pages of a clean, or an error.
    fn apply(&mut self, op: &Op) -> String {
        let w = &mut self.w;
        match *op {
            Op::Track { a, b, on } => {
                self.exit(0);
                let w = &mut self.w;
                let (from, to) = tracking(on);
                let r = w.alt.host_change_type_range(
                    &mut w.mem,
                    &mut w.host,
                    Gfn(a.min(b)),
                    Gfn(a.max(b)),
                    from,
                    to,
                );
                w.flush();
                format!("{r:?}")
            }
            Op::Global { on } => {
                self.exit(0);
                let w = &mut self.w;
                let (from, to) = tracking(on);
                let r = w
                    .alt
                    .host_change_type_global(&mut w.mem, &mut w.host, from, to);
                w.flush();
                format!("{r:?}")
            }
            Op::Create { slot } => {
                self.exit(0);
                let w = &mut self.w;
                let r = w
                    .alt
                    .create_view_at(&mut w.mem, &w.host, slot, P2mAccess::Rwx);
                w.flush();
                format!("{r:?}")
            }
            Op::Destroy { slot } => {
                self.exit(0);
                let w = &mut self.w;
                let r = w.alt.destroy_view(&mut w.mem, slot);
                w.flush();
                format!("{r:?}")
            }
            Op::Reset { slot } => {
                self.exit(0);
                let w = &mut self.w;
                let r = w.alt.reset_view(&mut w.mem, &w.host, slot);
                w.flush();
                format!("{r:?}")
            }
            Op::Switch { vcpu, view } => {
                self.exit(vcpu);
                let r = self.w.alt.switch_vcpu(vcpu, view);
                self.w.load_eptps();
                if r.is_ok() {
                    self.views[vcpu] = view;
                }
                format!("{r:?}")
            }
            Op::Vmfunc { vcpu, index } => {
                let ok = w.vmfunc(vcpu, index);
                if ok {
                    self.views[vcpu] = index as u16;
                }
                format!("{ok}")
            }
            Op::Write { vcpu, gfn } => end(w.access(vcpu, gfn, AccessKind::Write).0),
            Op::Read { vcpu, gfn } => end(w.access(vcpu, gfn, AccessKind::Read).0),
            Op::Remap {
                slot,
                alias,
                source,
            } => {
                self.exit(0);
                let w = &mut self.w;
                let r = w
                    .alt
                    .change_gfn(&mut w.mem, &w.host, slot, Gfn(alias), source.map(Gfn));
                w.flush();
                format!("{r:?}")
            }
            Op::Access { view, gfn, rw } => {
                self.exit(0);
                let w = &mut self.w;
                let access = if rw { P2mAccess::Rwx } else { P2mAccess::Rx };
                let r = w
                    .alt
                    .set_mem_access(&mut w.mem, &mut w.host, view, Gfn(gfn), access);
                w.flush();
                format!("{r:?}")
            }
            Op::Move { gfn, seed } => {
                self.exit(0);
                let w = &mut self.w;
                let tracked = w.host.logdirty().contains(Gfn(gfn));
                let ty = if tracked {
                    P2mType::RamLogdirty
                } else {
                    P2mType::RamRw
                };
                let m = Mapping {
                    mfn: Mfn(0x100000 + seed % 4096),
                    ty,
                    access: P2mAccess::Rwx,
                };
                let r = w
                    .alt
                    .host_set_entry(&mut w.mem, &mut w.host, Gfn(gfn), Order::PAGE_4K, m);
                w.flush();
                let _ = w.dropped();
                format!("{r:?}")
            }
            Op::Clean {
                vcpu,
                a,
                b,
                all,
                ref between,
            } => {
                if all {
                    self.w.drain_all();
                } else {
                    self.exit(vcpu);
                }
                let w = &mut self.w;
                let (s, e) = (a.min(b), a.max(b));
                let armed = w
                    .alt
                    .arm_dirty(&mut w.mem, &mut w.host, &mut w.dirty, Gfn(s), Gfn(e))
                    .unwrap();
                w.flush();
                for &(v, g) in between {
                    w.access(v, g, AccessKind::Write);
                }
                let mut got = Vec::new();
                w.alt
                    .fetch_dirty(&mut w.dirty, &armed, |g| got.push(g.0))
                    .unwrap();
                format!("{got:?}")
            }
        }
    }
}

/// The type change that starts (`on`) or stops log-dirty tracking.
fn tracking(on: bool) -> (P2mType, P2mType) {
    if on {
        (P2mType::RamRw, P2mType::RamLogdirty)
    } else {
        (P2mType::RamLogdirty, P2mType::RamRw)
    }
}

/// An access's end as both modes must agree on it: a written page is
/// `ram_rw` after a write fault and stays `ram_logdirty` under PML, so a
/// violation says `ram_rw` for either.
fn end(e: End) -> String {
    match e {
        End::Violation(mut v) if v.ty.is_changeable() => {
            v.ty = P2mType::RamRw;
            format!("{:?}", End::Violation(v))
        }
        e => format!("{e:?}"),
    }
}

/// The owner of a write by `vcpu` to `gfn` as the write-protect world saw
/// it: the source of an alias there in the vCPU's view, else the gfn.
fn owner(side: &Side, vcpu: usize, gfn: u64) -> u64 {
    let view = side.views[vcpu];
    if view == 0 {
        return gfn;
    }
    side.w
        .alt
        .remap_source(view, Gfn(gfn))
        .ok()
        .flatten()
        .map_or(gfn, |s| s.0)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(128),
        max_shrink_iters: 4000,
        ..ProptestConfig::default()
    })]

    /// With every buffer drained before the hypervisor changes anything,
    /// the PML world hands over exactly what the write-protect world does,
    /// clean for clean, and both see the same end for every access.
    #[test]
    fn pml_logs_exactly_what_write_protection_logs(ops in prop::collection::vec(op(), 1..80)) {
        let mut wp = Side::new(LogMode::WriteProtect, true);
        let mut pml = Side::new(LogMode::Pml, true);
        for op in &ops {
            let (x, y) = (wp.apply(op), pml.apply(op));
            prop_assert_eq!(&x, &y, "{:?}", op);
            prop_assert_eq!(wp.views, pml.views);
        }
        pml.w.check_invariants();
        wp.w.check_invariants();
        teardown(wp.w);
        teardown(pml.w);
    }

    /// With buffers drained only on their own vCPU's exits (as on SMP), a
    /// clean may miss a write another vCPU logged and not yet drained; it
    /// comes in a later clean. Nothing is lost: once every buffer is
    /// drained, the cleans together handed over every page the
    /// write-protect world handed over.
    #[test]
    fn pml_loses_no_write_when_buffers_drain_late(ops in prop::collection::vec(op(), 1..80)) {
        let mut wp = Side::new(LogMode::WriteProtect, false);
        let mut pml = Side::new(LogMode::Pml, false);
        let (mut seen_wp, mut seen_pml) = (BTreeSet::new(), BTreeSet::new());
        let mut written = BTreeSet::new();
        for op in &ops {
            let writes = match op {
                Op::Write { vcpu, gfn } => vec![(*vcpu, *gfn)],
                Op::Clean { between, .. } => between.clone(),
                // A late drain that finds no dirty flag any more marks
                // every gfn the address may stand for: sources too.
                Op::Remap { source: Some(s), .. } => {
                    written.insert(*s);
                    vec![]
                }
                _ => vec![],
            };
            for (vcpu, gfn) in writes {
                written.insert(owner(&wp, vcpu, gfn));
                written.insert(gfn);
            }
            let (x, y) = (wp.apply(op), pml.apply(op));
            if let Op::Clean { .. } = op {
                let parse = |s: &str| -> Vec<u64> {
                    s.trim_matches(|c| c == '[' || c == ']')
                        .split(", ")
                        .filter(|t| !t.is_empty())
                        .map(|t| t.parse().unwrap())
                        .collect()
                };
                seen_wp.extend(parse(&x));
                seen_pml.extend(parse(&y));
            } else {
                prop_assert_eq!(&x, &y, "{:?}", op);
            }
        }
        let last = Op::Clean { vcpu: 0, a: 0, b: Gfn::MAX.0, all: true, between: vec![] };
        for (side, seen) in [(&mut wp, &mut seen_wp), (&mut pml, &mut seen_pml)] {
            let got = side.apply(&last);
            seen.extend(got.trim_matches(|c| c == '[' || c == ']').split(", ").filter(|t| !t.is_empty()).map(|t| t.parse::<u64>().unwrap()));
        }
        for g in &seen_wp {
            prop_assert!(seen_pml.contains(g), "{:#x} written, never handed over under PML", g);
        }
        for g in &seen_pml {
            prop_assert!(written.contains(g), "{:#x} handed over, never written nor a source", g);
        }
        teardown(wp.w);
        teardown(pml.w);
    }
}
