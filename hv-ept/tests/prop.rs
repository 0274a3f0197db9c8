//! Property test: random sequences of set_entry (all orders, with injected
//! allocation failures), change_type_range, change_type_global, guest
//! accesses through the walk model (with misconfig resolution and the
//! log-dirty write handler), explicit resolve_misconfig, cleans with re-arm
//! and suppress-#VE changes, checked after every step against a plain
//! reference map gfn -> (mfn, type, access).
//!
//! The reference is dense over a universe of 2^19 + 2^10 gfns: [0, 2G) (two 1G
//! pages) and 2M either side of the 512G boundary (a root-entry boundary), so a
//! 1G mapping costs 2^18 array writes rather than 2^18 tree inserts.
//!
//! Reference semantics of types: `set_entry` stores the given type; a type
//! change recomputes every `ram_rw`/`ram_logdirty` gfn of its range (all gfns
//! for a global change) from the log-dirty state, and of the mappings that
//! straddle its ends (a superpage partly covered is recomputed whole: the
//! range widened to the stored mappings at its ends, read from the p2m); a
//! logged write makes the gfn `ram_rw`. RAM is mapped with any type, so the
//! stored type may disagree with the log-dirty state (`ram_logdirty`
//! outside it, `ram_rw` inside it): a change must leave such pages beside
//! its range alone, however high it marks (scoped marks), and it must cost
//! at most 2 entry writes per level per end of the range. An access takes at
//! most one misconfiguration exit.
//!
//! Each case runs in one of the two log modes. Under PML the accesses walk
//! with page-modification logging and the buffer is drained after each (as
//! the hypervisor does on every exit): a logged write leaves the page
//! `ram_logdirty`, and a clean re-arms the pages it hands over one by one
//! (`rearm_page`, a type re-arm only where a page is `ram_rw` inside a
//! tracked range). Both modes must log exactly the writes to log-dirty
//! pages, and under PML a log-dirty leaf with its dirty flag set is always
//! one whose page is in the bitmap.
//!
//! CI runs a bounded number of cases; `PROPTEST_CASES=N` runs more.

mod common;

use std::collections::BTreeSet;
use std::ops::ControlFlow;

use common::*;
use hv_ept::sim::SimMemory;
use hv_ept::walk::{AccessKind, EptFault, PmlLog};
use hv_ept::{
    DirtyBitmap, EMT_MARK, EptEntry, EptFlags, Error, Gfn, LogMode, Mfn, Order, P2m, P2mAccess,
    P2mType, Rearm, Rights,
};
use proptest::prelude::*;

const LOW: u64 = 1 << 19;
const HIGH_START: u64 = (1 << 27) - (1 << 9);
const HIGH: u64 = 1 << 10;
const UNIVERSE: u64 = LOW + HIGH;

fn gfn_of(i: u64) -> u64 {
    if i < LOW { i } else { HIGH_START + (i - LOW) }
}

fn index_of(g: u64) -> Option<usize> {
    if g < LOW {
        Some(g as usize)
    } else if (HIGH_START..HIGH_START + HIGH).contains(&g) {
        Some((LOW + g - HIGH_START) as usize)
    } else {
        None
    }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Ram,
    Mmio,
    Remove,
}

#[derive(Clone, Debug)]
enum Op {
    Set {
        at: u64,
        level: u8,
        kind: Kind,
        access: P2mAccess,
        seed: u64,
        fail: Option<u64>,
    },
    Range {
        a: u64,
        b: u64,
        on: bool,
    },
    Global {
        on: bool,
    },
    Access {
        at: u64,
        kind: AccessKind,
    },
    Resolve {
        at: u64,
        fail: Option<u64>,
    },
    Clean {
        a: u64,
        b: u64,
    },
    Sve {
        at: u64,
        sve: bool,
    },
}

fn at() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => 0..UNIVERSE,
        // Near 2M/1G boundaries, where splits and head/tail marks happen.
        3 => (0..UNIVERSE / 512, prop::sample::select(vec![0u64, 1, 2, 255, 510, 511]))
            .prop_map(|(k, o)| k * 512 + o),
        1 => (0..4u64, 0..3u64).prop_map(|(k, o)| (k * (1 << 18) + o).min(UNIVERSE - 1)),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let access = prop::sample::select(
        P2mAccess::ALL
            .into_iter()
            .filter(|a| !matches!(a, P2mAccess::W | P2mAccess::Wx))
            .collect::<Vec<_>>(),
    );
    let kind = prop_oneof![5 => Just(Kind::Ram), 1 => Just(Kind::Mmio), 2 => Just(Kind::Remove)];
    let access_kind =
        prop::sample::select(vec![AccessKind::Read, AccessKind::Write, AccessKind::Fetch]);
    prop_oneof![
        6 => (at(), 0..3u8, kind, access, any::<u64>(), prop::option::weighted(0.15, 1..4u64))
            .prop_map(|(at, level, kind, access, seed, fail)| Op::Set { at, level, kind, access, seed, fail }),
        2 => (at(), at(), any::<bool>()).prop_map(|(a, b, on)| Op::Range { a, b, on }),
        1 => any::<bool>().prop_map(|on| Op::Global { on }),
        6 => (at(), access_kind).prop_map(|(at, kind)| Op::Access { at, kind }),
        1 => (at(), prop::option::weighted(0.3, 1..3u64)).prop_map(|(at, fail)| Op::Resolve { at, fail }),
        1 => (at(), at()).prop_map(|(a, b)| Op::Clean { a, b }),
        1 => (at(), any::<bool>()).prop_map(|(at, sve)| Op::Sve { at, sve }),
    ]
}

type Entry = (u64, P2mType, P2mAccess);

/// The reference: a plain map plus the log-dirty state and the dirty set.
struct Ref {
    map: Vec<Option<Entry>>,
    logdirty: Vec<bool>,
    global: bool,
    present: u64,
    dirty: BTreeSet<u64>,
}

impl Ref {
    fn new() -> Ref {
        Ref {
            map: vec![None; UNIVERSE as usize],
            logdirty: vec![false; UNIVERSE as usize],
            global: false,
            present: 0,
            dirty: BTreeSet::new(),
        }
    }

    fn tracked(&self, i: usize) -> bool {
        self.global || self.logdirty[i]
    }

    fn put(&mut self, i: usize, e: Option<Entry>) {
        self.present = self.present + e.is_some() as u64 - self.map[i].is_some() as u64;
        self.map[i] = e;
    }

    fn recompute(&mut self, i: usize) {
        let tracked = self.tracked(i);
        if let Some((_, ty, _)) = &mut self.map[i]
            && ty.is_changeable()
        {
            *ty = if tracked {
                P2mType::RamLogdirty
            } else {
                P2mType::RamRw
            };
        }
    }

    /// Universe indices of `[s, e]`.
    fn indices(s: u64, e: u64) -> impl Iterator<Item = usize> {
        let low = s.min(LOW)..(e + 1).min(LOW);
        let high = s.max(HIGH_START)..(e + 1).min(HIGH_START + HIGH);
        low.chain(high).map(|g| index_of(g).unwrap())
    }
}

fn needed(kind: AccessKind) -> Rights {
    match kind {
        AccessKind::Read => Rights::R,
        AccessKind::Write => Rights::W,
        AccessKind::Fetch => Rights::X,
    }
}

struct World {
    mem: SimMemory,
    p2m: P2m,
    dirty: DirtyBitmap,
    r: Ref,
    /// The vCPU's PML buffer, under PML.
    pml: Option<PmlLog>,
}

impl World {
    fn mode(&self) -> LogMode {
        self.p2m.log_mode()
    }

    fn apply(&mut self, op: &Op) {
        let mode = self.mode();
        let World {
            mem,
            p2m,
            dirty,
            r,
            pml,
        } = self;
        match *op {
            Op::Set {
                at,
                level,
                kind,
                access,
                seed,
                fail,
            } => {
                // 1G pages only in the low window; the high one is 2M each side.
                let level = if at >= LOW { level.min(1) } else { level };
                let order = Order::new(level as u32 * 9).unwrap();
                let g = gfn_of(at) & !(order.pages() - 1);
                let mfn = ((seed % 4096) + 1) << order.get();
                let idx: Vec<usize> = Ref::indices(g, g + order.pages() - 1).collect();
                let ty = match kind {
                    Kind::Remove => P2mType::Invalid,
                    Kind::Mmio => P2mType::MmioDirect,
                    // Any RAM type, whatever the log-dirty state says.
                    Kind::Ram if seed % 3 > 0 => {
                        [P2mType::RamRw, P2mType::RamLogdirty, P2mType::RamRo]
                            [(seed >> 16) as usize % 3]
                    }
                    Kind::Ram => {
                        let tracked = idx.iter().filter(|&&i| r.tracked(i)).count();
                        if tracked == idx.len() {
                            P2mType::RamLogdirty
                        } else if tracked == 0 {
                            P2mType::RamRw
                        } else {
                            P2mType::RamRo
                        }
                    }
                };
                let before = fail.map(|n| {
                    mem.fail_nth_alloc(n);
                    snapshot(mem, p2m)
                });
                let res = p2m.set_entry(mem, Gfn(g), Mfn(mfn), order, ty, access);
                let hit = before.is_some() && !mem.failure_pending();
                mem.clear_failure();
                if hit {
                    assert_eq!(res, Err(Error::NoMemory));
                    assert_eq!(
                        Some(snapshot(mem, p2m)),
                        before,
                        "failed set_entry changed the tree"
                    );
                    return;
                }
                res.unwrap();
                for (k, i) in idx.into_iter().enumerate() {
                    r.put(i, ty.is_present().then_some((mfn + k as u64, ty, access)));
                }
            }
            Op::Range { a, b, on } => {
                let (s, e) = (gfn_of(a.min(b)), gfn_of(a.max(b)));
                let (from, to) = if on {
                    (P2mType::RamRw, P2mType::RamLogdirty)
                } else {
                    (P2mType::RamLogdirty, P2mType::RamRw)
                };
                // The stored mappings at the ends, recomputed whole.
                let leaf = |g: u64| p2m.stored_leaf(mem, Gfn(g)).unwrap();
                let lo = leaf(s).map_or(s, |l| l.gfn.0.min(s));
                let hi = leaf(e).map_or(e, |l| (l.gfn.0 + l.order.pages() - 1).max(e));
                let w0 = mem.entry_writes();
                p2m.change_type_range(mem, Gfn(s), Gfn(e), from, to)
                    .unwrap();
                let root_entries_covered = (0..2u64)
                    .filter(|&k| s <= k << 27 && ((k + 1) << 27) - 1 <= e)
                    .count() as u64;
                let writes = mem.entry_writes() - w0;
                assert!(
                    writes <= 16 + root_entries_covered,
                    "{writes} writes to mark {s:#x}-{e:#x}"
                );
                for i in Ref::indices(s, e) {
                    r.logdirty[i] = on;
                }
                for i in Ref::indices(lo, hi) {
                    r.recompute(i);
                }
            }
            Op::Global { on } => {
                let (from, to) = if on {
                    (P2mType::RamRw, P2mType::RamLogdirty)
                } else {
                    (P2mType::RamLogdirty, P2mType::RamRw)
                };
                p2m.change_type_global(mem, from, to).unwrap();
                r.global = on;
                for i in 0..UNIVERSE as usize {
                    r.recompute(i);
                }
            }
            Op::Access { at, kind } => {
                let g = gfn_of(at);
                let i = at as usize;
                let (res, exits) = guest_access_logged(mem, p2m, dirty, pml.as_mut(), g, kind);
                assert!(exits.misconfigs <= 1, "{exits:?} for one access");
                let expect = r.map[i].map(|(mfn, ty, access)| {
                    // Under PML a logged write leaves the page log-dirty
                    // (and 4K: writable). Where the access denies the
                    // write, the helper calls the fault handler anyway,
                    // which logs it the write-protect way.
                    let ty = if kind == AccessKind::Write && ty == P2mType::RamLogdirty {
                        r.dirty.insert(g);
                        if mode == LogMode::WriteProtect
                            || !P2mType::RamRw.rights(access).contains(Rights::W)
                        {
                            r.map[i] = Some((mfn, P2mType::RamRw, access));
                            P2mType::RamRw
                        } else {
                            ty
                        }
                    } else {
                        ty
                    };
                    (
                        mfn,
                        ty.rights_in(access, mode, false).contains(needed(kind)),
                    )
                });
                match (expect, res) {
                    (Some((mfn, true)), Ok(t)) => assert_eq!(t.hpa >> 12, mfn, "gfn {g:#x}"),
                    (Some((_, false)) | None, Err(EptFault::Violation { .. })) => {}
                    (e, res) => panic!("gfn {g:#x} {kind:?}: reference {e:?}, walk {res:?}"),
                }
            }
            Op::Resolve { at, fail } => {
                let before = fail.map(|n| {
                    mem.fail_nth_alloc(n);
                    snapshot(mem, p2m)
                });
                let res = p2m.resolve_misconfig(mem, Gfn(gfn_of(at)));
                if before.is_some() && !mem.failure_pending() {
                    assert_eq!(res, Err(Error::NoMemory));
                    assert_eq!(
                        Some(snapshot(mem, p2m)),
                        before,
                        "failed resolve_misconfig changed the tree"
                    );
                } else {
                    res.unwrap();
                }
                mem.clear_failure();
            }
            Op::Clean { a, b } if mode == LogMode::Pml => {
                let (s, e) = (gfn_of(a.min(b)), gfn_of(a.max(b)));
                dirty.arm(Gfn(s), Gfn(e)).unwrap();
                let want: BTreeSet<u64> = r.dirty.range(s..=e).copied().collect();
                let mut armed = Vec::new();
                dirty.for_each_armed(Gfn(s), Gfn(e), |g| armed.push(g.0));
                assert_eq!(armed.iter().copied().collect::<BTreeSet<_>>(), want);
                for g in armed {
                    if p2m.rearm_page(mem, Gfn(g)).unwrap() == Rearm::Writable {
                        let l = p2m.stored_leaf(mem, Gfn(g)).unwrap().unwrap();
                        p2m.rearm_range(mem, Gfn(g), Gfn(g)).unwrap();
                        let last = l.gfn.0 + l.order.pages() - 1;
                        for i in Ref::indices(l.gfn.0, last) {
                            r.recompute(i);
                        }
                    }
                }
                let mut got = BTreeSet::new();
                dirty.fetch_armed(Gfn(s), Gfn(e), |g| {
                    got.insert(g.0);
                });
                assert_eq!(got, want, "clean of {s:#x}-{e:#x}");
                r.dirty.retain(|g| !(s..=e).contains(g));
            }
            Op::Clean { a, b } => {
                let (s, e) = (gfn_of(a.min(b)), gfn_of(a.max(b)));
                // Set the bits aside, re-arm, then take them (the INVEPT in
                // between is the caller's, and there is no TLB here).
                dirty.arm(Gfn(s), Gfn(e)).unwrap();
                let want: BTreeSet<u64> = r.dirty.range(s..=e).copied().collect();
                self.apply(&Op::Range { a, b, on: true });
                let World { dirty, r, .. } = self;
                let mut got = BTreeSet::new();
                dirty.fetch_armed(Gfn(s), Gfn(e), |g| {
                    got.insert(g.0);
                });
                assert_eq!(got, want, "clean of {s:#x}-{e:#x}");
                r.dirty.retain(|g| !(s..=e).contains(g));
            }
            Op::Sve { at, sve } => {
                let res = p2m.set_suppress_ve(mem, Gfn(gfn_of(at)), sve);
                if r.map[at as usize].is_some() {
                    res.unwrap();
                } else {
                    assert_eq!(res, Err(Error::NotMapped));
                }
            }
        }
    }

    /// Everything that must hold after every step.
    fn check(&mut self, probes: &[u64]) {
        let mode = self.mode();
        let World {
            mem,
            p2m,
            dirty,
            r,
            pml,
        } = self;
        // Straight from the tables: no present entry above the bound, marks
        // carry the invalid memory type, every outstanding frame is a table
        // of this p2m (no leak).
        let max = p2m.max_mapped_pfn().0;
        let tables = walk_tables(mem, p2m.root(), 3, 0, &mut |lv, base, i, raw| {
            let e = EptEntry(raw);
            if e.is_valid() {
                let first = base + ((i as u64) << (9 * lv));
                assert!(
                    first <= max,
                    "present entry at {first:#x} above max_mapped_pfn {max:#x}"
                );
                if e.is_leaf(lv) {
                    assert!(
                        first + (1 << (9 * lv)) - 1 <= max,
                        "leaf at {first:#x} crosses the bound"
                    );
                }
                assert_eq!(e.is_marked(), e.emt() == EMT_MARK, "{e:?}");
            }
        });
        assert_eq!(
            tables + pml.is_some() as usize,
            mem.outstanding(),
            "frames not reachable from the root"
        );
        if mode == LogMode::Pml {
            // The dirty flag is the log-dirty state: set on a log-dirty leaf
            // only once its page was logged, preset everywhere else.
            for (first, level, raw) in raw_leaves(mem, p2m) {
                let e = EptEntry(raw);
                if e.p2m_type() == P2mType::RamLogdirty {
                    if e.is_dirty() {
                        assert!(dirty.is_dirty(Gfn(first)), "{first:#x} dirty, not logged");
                    }
                    let rights = P2mType::RamLogdirty.rights_in(e.access(), mode, level > 0);
                    assert!(e.is_marked() || e.rights() == rights, "{first:#x}: {e:?}");
                } else {
                    let ad = EptFlags::ACCESSED | EptFlags::DIRTY;
                    assert!(e.flags().contains(ad), "{first:#x}: {e:?} not preset");
                }
            }
        }
        // Every scoped mark has its ranges, and no range outlives its mark.
        assert_eq!(p2m.scoped_entries(), scoped_marks(mem, p2m));

        // The p2m's view (types recomputed) equals the reference.
        let mut covered = 0;
        let flow = p2m.for_each_leaf(mem, Gfn(0), Gfn::MAX, |l| {
            for k in 0..l.order.pages() {
                let g = l.gfn.0 + k;
                let i =
                    index_of(g).unwrap_or_else(|| panic!("mapping outside the universe: {l:?}"));
                assert_eq!(
                    r.map[i],
                    Some((l.mfn.0 + k, l.ty, l.access)),
                    "gfn {g:#x} in {l:?}"
                );
                covered += 1;
            }
            ControlFlow::Continue(())
        });
        assert!(flow.unwrap().is_continue());
        assert_eq!(
            covered, r.present,
            "the p2m maps gfns the reference does not"
        );

        // Walks (without handling exits) agree with the reference.
        for &at in probes {
            let g = gfn_of(at);
            let info = p2m.get_entry(mem, Gfn(g)).unwrap();
            let want = r.map[at as usize];
            assert_eq!(
                info.mfn.map(|m| (m.0, info.ty, info.access)),
                want,
                "get_entry {g:#x}"
            );
            for kind in [AccessKind::Read, AccessKind::Write, AccessKind::Fetch] {
                match (walk(mem, p2m, g, kind), want) {
                    (Ok(t), Some((mfn, ty, access))) => {
                        assert_eq!(t.hpa >> 12, mfn);
                        assert!(
                            ty.rights_in(access, mode, t.page != Order::PAGE_4K)
                                .contains(needed(kind)),
                            "{g:#x} {kind:?} allowed"
                        );
                    }
                    (Err(EptFault::Misconfig { .. }), _) => {
                        assert!(
                            info.recalc || info.mfn.is_none(),
                            "misconfig at {g:#x} without a mark"
                        );
                    }
                    (Err(EptFault::Violation { .. }), Some((_, ty, access))) => {
                        let superpage = info.order != Order::PAGE_4K;
                        assert!(
                            !ty.rights_in(access, mode, superpage).contains(needed(kind)),
                            "{g:#x} {kind:?} denied"
                        )
                    }
                    (Err(EptFault::Violation { .. }), None) => {}
                    (res, want) => panic!("{g:#x} {kind:?}: {res:?} vs {want:?}"),
                }
            }
        }

        // Every logged write is in the bitmap, and only those.
        assert_eq!(dirty.dirty_count(), r.dirty.len() as u64);
        for &g in &r.dirty {
            assert!(
                dirty.is_dirty(Gfn(g)),
                "write to log-dirty gfn {g:#x} not logged"
            );
        }
        // The log-dirty state of the p2m is the reference's.
        assert_eq!(p2m.logdirty().global(), r.global);
    }
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(64)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        max_shrink_iters: 2000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn p2m_matches_reference(ops in prop::collection::vec(op(), 1..40), extra in prop::collection::vec(0..UNIVERSE, 4), mode in prop::sample::select(vec![LogMode::WriteProtect, LogMode::Pml])) {
        let (mut mem, p2m) = setup_in(mode);
        let pml = (mode == LogMode::Pml).then(|| pml_buffer(&mut mem));
        let mut w = World { mem, p2m, dirty: DirtyBitmap::new(), r: Ref::new(), pml };
        for op in &ops {
            w.apply(op);
            let at = match *op {
                Op::Set { at, .. } | Op::Access { at, .. } | Op::Resolve { at, .. } | Op::Sve { at, .. } => at,
                Op::Range { a, .. } | Op::Clean { a, .. } => a,
                Op::Global { .. } => extra[0],
            };
            let mut probes = vec![at, at.saturating_sub(1), (at + 1).min(UNIVERSE - 1)];
            probes.extend(&extra);
            w.check(&probes);
        }
        let World { mut mem, p2m, pml, .. } = w;
        p2m.destroy(&mut mem);
        if let Some(pml) = pml {
            hv_ept::EptMemory::free_frame(&mut mem, pml.buffer);
        }
        prop_assert_eq!(mem.outstanding(), 0);
    }
}
