//! Property test: random sequences of every operation (host mappings and
//! removals, retypes, log-dirty ranges, global log-dirty, cleans, view
//! creation/destruction/reset, disable/enable, visibility, hypervisor switches, VMFUNC
//! switches through the CPU-visible list, set_mem_access, set_suppress_ve,
//! change_gfn and its revert), with out-of-frames injected into the
//! operations that allocate, and guest accesses from random vCPUs driven
//! like hardware (walk model behind a model TLB -> exit handler -> INVEPT ->
//! retry). After every step the machine is checked against a reference
//! model of effective entries:
//!
//! - every access gives what the model says (frame, or the violation with
//!   its type, access and suppress-#VE, or "not mapped");
//! - no view maps a frame the host does not map at that gfn (or, for an
//!   alias, at its source), page for page;
//! - every write to a log-dirty gfn, through any view or alias, is in the
//!   bitmap (logged against the owner), and nothing else is;
//! - no present entry above any p2m's `max_mapped_pfn`; remaps and
//!   `min/max_remapped_gfn` exactly as the model's; no frame leaked.
//!
//! The index of which views hold what gets per-page sets from the second
//! view holding parts of a 2M region on, in half the cases, so that a view
//! it misses shows up as a stale entry.
//!
//! Model of a view's effective entry at g: an alias shows the host's
//! mapping of its source, any other gfn the host's mapping of g; the access
//! and suppress-#VE are the view's own where it set them (`ex`), else the
//! default access and "suppressed". A host change that moves a frame or
//! changes a type (other than ram_rw <-> ram_logdirty) drops `ex` there;
//! one that moves the source's frame drops the alias. Drops the model cannot
//! foresee (out-of-frames fallbacks) are taken from the crate's drop log.
//!
//! Each case runs in one of the two log modes. Under PML a write to a
//! tracked 4K page does not exit: the CPU logs it in the vCPU's PML buffer,
//! drained (as the kernel does) on every exit and right after each access,
//! and the page stays `ram_logdirty`; a superpage splits on its first write;
//! a clean re-arms page by page unless it says it re-armed by type.
//!
//! CI runs a bounded number of cases; `PROPTEST_CASES=N` runs more.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use hv_altp2m::{DropReason, Error, Mapping, Outcome};
use hv_ept::walk::{AccessKind, EptFault};
use hv_ept::{EptMemory, Gfn, LogMode, Mfn, Order, P2mAccess, P2mType, WriteFault};
use proptest::prelude::*;

const LOW: u64 = 1 << 19;
const HIGH_START: u64 = (1 << 27) - (1 << 9);
const HIGH: u64 = 1 << 10;
const UNIVERSE: u64 = LOW + HIGH;
const SLOTS: u16 = 3;
const VCPUS: usize = 2;

fn gfn_of(i: u64) -> u64 {
    if i < LOW { i } else { HIGH_START + (i - LOW) }
}

fn index_of(g: u64) -> usize {
    if g < LOW {
        g as usize
    } else {
        (LOW + g - HIGH_START) as usize
    }
}

fn indices(s: u64, e: u64) -> impl Iterator<Item = u64> {
    let low = s.min(LOW)..(e + 1).min(LOW);
    let high = s.max(HIGH_START)..(e + 1).min(HIGH_START + HIGH);
    low.chain(high)
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Ram,
    Mmio,
    Remove,
    /// Same frame, another type (ram_ro <-> ram).
    Retype,
    /// Same frame and type, another host access.
    Reaccess,
}

#[derive(Clone, Debug)]
enum Op {
    HostSet {
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
    /// A clean of `[a, b]`, with writes from vCPUs between its two halves
    /// (after the INVEPT): their faults log for the next clean.
    Clean {
        a: u64,
        b: u64,
        between: Vec<(usize, u64)>,
    },
    Create {
        slot: u16,
        default: P2mAccess,
        fail: Option<u64>,
    },
    Destroy {
        slot: u16,
    },
    Reset {
        slot: u16,
    },
    Visible {
        view: u16,
        on: bool,
    },
    /// disable then enable: every view gone, every vCPU on view 0.
    Restart,
    Switch {
        vcpu: usize,
        view: u16,
        all: bool,
    },
    Vmfunc {
        vcpu: usize,
        index: usize,
    },
    Access {
        vcpu: usize,
        at: u64,
        kind: AccessKind,
        fail: Option<u64>,
    },
    SetAccess {
        view: u16,
        at: u64,
        access: P2mAccess,
        fail: Option<u64>,
    },
    SetSve {
        view: u16,
        at: u64,
        sve: bool,
        fail: Option<u64>,
    },
    ChangeGfn {
        view: u16,
        old: u64,
        new: Option<u64>,
        fail: Option<u64>,
    },
}

fn at() -> impl Strategy<Value = u64> {
    prop_oneof![
        2 => 0..UNIVERSE,
        // Small neighbourhoods, so remaps, restrictions, type changes and
        // accesses keep meeting the same gfns.
        4 => 0..8u64,
        3 => 0..64u64,
        3 => (0..UNIVERSE / 512, prop::sample::select(vec![0u64, 1, 2, 255, 511]))
            .prop_map(|(k, o)| k * 512 + o),
        1 => (0..2u64, 0..3u64).prop_map(|(k, o)| k * (1 << 18) + o),
    ]
}

fn access() -> impl Strategy<Value = P2mAccess> {
    prop_oneof![
        4 => Just(P2mAccess::Rwx),
        6 => prop::sample::select(vec![
            P2mAccess::N, P2mAccess::R, P2mAccess::X, P2mAccess::Rx, P2mAccess::Rw,
            P2mAccess::Rx2rw, P2mAccess::N2rwx,
        ]),
    ]
}

fn fail() -> impl Strategy<Value = Option<u64>> {
    prop::option::weighted(0.15, 1..4u64)
}

fn op() -> impl Strategy<Value = Op> {
    let kind = prop_oneof![
        6 => Just(Kind::Ram), 1 => Just(Kind::Mmio), 2 => Just(Kind::Remove),
        2 => Just(Kind::Retype), 1 => Just(Kind::Reaccess),
    ];
    let access_kind =
        prop::sample::select(vec![AccessKind::Read, AccessKind::Write, AccessKind::Fetch]);
    let view = 0..=SLOTS;
    let slot = 1..=SLOTS;
    prop_oneof![
        6 => (at(), prop_oneof![6 => Just(0u8), 2 => Just(1), 1 => Just(2)], kind, access(), any::<u64>(), fail())
            .prop_map(|(at, level, kind, access, seed, fail)| Op::HostSet { at, level, kind, access, seed, fail }),
        2 => (at(), at(), any::<bool>()).prop_map(|(a, b, on)| Op::Range { a, b, on }),
        1 => any::<bool>().prop_map(|on| Op::Global { on }),
        2 => (at(), at(), prop::collection::vec((0..VCPUS, at()), 0..3))
            .prop_map(|(a, b, between)| Op::Clean { a, b, between }),
        3 => (slot.clone(), access(), fail()).prop_map(|(slot, default, fail)| Op::Create { slot, default, fail }),
        1 => slot.clone().prop_map(|slot| Op::Destroy { slot }),
        1 => slot.clone().prop_map(|slot| Op::Reset { slot }),
        1 => (view.clone(), prop::bool::weighted(0.7)).prop_map(|(view, on)| Op::Visible { view, on }),
        1 => Just(Op::Restart),
        3 => (0..VCPUS, view.clone(), prop::bool::weighted(0.2)).prop_map(|(vcpu, view, all)| Op::Switch { vcpu, view, all }),
        2 => (0..VCPUS, 0..5usize).prop_map(|(vcpu, index)| Op::Vmfunc { vcpu, index }),
        12 => (0..VCPUS, at(), access_kind, fail())
            .prop_map(|(vcpu, at, kind, fail)| Op::Access { vcpu, at, kind, fail }),
        3 => (view.clone(), at(), access(), fail())
            .prop_map(|(view, at, access, fail)| Op::SetAccess { view, at, access, fail }),
        1 => (slot.clone(), at(), any::<bool>(), fail())
            .prop_map(|(view, at, sve, fail)| Op::SetSve { view, at, sve, fail }),
        3 => (slot, at(), prop::option::weighted(0.8, at()), fail())
            .prop_map(|(view, old, new, fail)| Op::ChangeGfn { view, old, new, fail }),
    ]
}

type HostEntry = (u64, P2mType, P2mAccess);

#[derive(Clone, Debug)]
struct ViewRef {
    default: P2mAccess,
    visible: bool,
    /// Access and suppress-#VE the view set itself.
    ex: BTreeMap<u64, (P2mAccess, bool)>,
    /// alias -> source.
    remap: BTreeMap<u64, u64>,
}

/// What a view shows at a gfn.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Eff {
    mfn: u64,
    ty: P2mType,
    access: P2mAccess,
    sve: bool,
    source: Option<u64>,
}

struct Model {
    host: Vec<Option<HostEntry>>,
    logdirty: Vec<bool>,
    global: bool,
    dirty: BTreeSet<u64>,
    /// Every write logged, in order (replayed exits append).
    logged: Vec<u64>,
    views: [Option<ViewRef>; SLOTS as usize + 1],
    view0_visible: bool,
    vcpu: [u16; VCPUS],
}

fn changed(old: Option<HostEntry>, new: Option<HostEntry>) -> bool {
    match (old, new) {
        (Some((m1, t1, _)), Some((m2, t2, _))) => {
            m1 != m2 || (t1 != t2 && !(t1.is_changeable() && t2.is_changeable()))
        }
        (None, None) => false,
        _ => true,
    }
}

fn is_ram(ty: P2mType) -> bool {
    matches!(ty, P2mType::RamRw | P2mType::RamRo | P2mType::RamLogdirty)
}

impl Model {
    fn new() -> Model {
        Model {
            host: vec![None; UNIVERSE as usize],
            logdirty: vec![false; UNIVERSE as usize],
            global: false,
            dirty: BTreeSet::new(),
            logged: Vec::new(),
            views: [None, None, None, None],
            view0_visible: true,
            vcpu: [0; VCPUS],
        }
    }

    fn host_at(&self, g: u64) -> Option<HostEntry> {
        self.host[index_of(g)]
    }

    fn tracked(&self, g: u64) -> bool {
        self.global || self.logdirty[index_of(g)]
    }

    fn recompute(&mut self, g: u64) {
        let tracked = self.tracked(g);
        if let Some((_, ty, _)) = &mut self.host[index_of(g)]
            && ty.is_changeable()
        {
            *ty = if tracked {
                P2mType::RamLogdirty
            } else {
                P2mType::RamRw
            };
        }
    }

    fn view(&self, v: u16) -> Option<&ViewRef> {
        self.views.get(v as usize)?.as_ref()
    }

    fn active(&self, v: u16) -> bool {
        v == 0 || self.view(v).is_some()
    }

    fn visible(&self, v: u16) -> bool {
        if v == 0 {
            self.view0_visible
        } else {
            self.view(v).is_some_and(|r| r.visible)
        }
    }

    fn eff(&self, v: u16, g: u64) -> Option<Eff> {
        if v == 0 {
            let (mfn, ty, access) = self.host_at(g)?;
            return Some(Eff {
                mfn,
                ty,
                access,
                sve: true,
                source: None,
            });
        }
        let r = self.view(v)?;
        let source = r.remap.get(&g).copied();
        let (mfn, ty, _) = self.host_at(source.unwrap_or(g))?;
        let (access, sve) = r.ex.get(&g).copied().unwrap_or((r.default, true));
        Some(Eff {
            mfn,
            ty,
            access,
            sve,
            source,
        })
    }

    /// The host's block `[b, b + n)` becomes `new(g)`. Returns the divergence
    /// the views must drop and report: (view, gfn).
    fn host_change(
        &mut self,
        b: u64,
        n: u64,
        new: impl Fn(u64) -> Option<HostEntry>,
    ) -> BTreeSet<(u16, u64)> {
        let mut dropped = BTreeSet::new();
        let mut moved = BTreeSet::new();
        for g in indices(b, b + n - 1) {
            let old = self.host_at(g);
            let nw = new(g);
            if changed(old, nw) {
                moved.insert(g);
                for (v, r) in self.views.iter_mut().enumerate() {
                    let Some(r) = r else { continue };
                    if r.remap.contains_key(&g) {
                        continue;
                    }
                    if let Some(ex) = r.ex.remove(&g)
                        && ex != (r.default, true)
                    {
                        dropped.insert((v as u16, g));
                    }
                }
            }
            self.host[index_of(g)] = nw;
        }
        for (v, r) in self.views.iter_mut().enumerate() {
            let Some(r) = r else { continue };
            let gone: Vec<u64> = r
                .remap
                .iter()
                .filter(|(_, s)| moved.contains(s))
                .map(|(&a, _)| a)
                .collect();
            for a in gone {
                r.remap.remove(&a);
                r.ex.remove(&a);
                dropped.insert((v as u16, a));
            }
        }
        dropped
    }

    /// Applies what the crate's drop log says went (the out-of-frames
    /// fallbacks the model cannot foresee).
    fn apply_drops(&mut self, drops: &[hv_altp2m::Dropped], foreseen: &BTreeSet<(u16, u64)>) {
        for d in drops
            .iter()
            .filter(|d| !(d.pages == 1 && foreseen.contains(&(d.view, d.gfn.0))))
        {
            let Some(r) = self.views[d.view as usize].as_mut() else {
                panic!("drop reported for a view that does not exist: {d:?}");
            };
            if let Some(src) = d.remap_source {
                assert_eq!(r.remap.remove(&d.gfn.0), Some(src.0), "{d:?}");
                r.ex.remove(&d.gfn.0);
                continue;
            }
            let keys: Vec<u64> =
                r.ex.range(d.gfn.0..d.gfn.0 + d.pages)
                    .map(|(&k, _)| k)
                    .collect();
            for k in keys {
                if !r.remap.contains_key(&k) {
                    r.ex.remove(&k);
                }
            }
        }
    }
}

struct Run {
    w: World,
    m: Model,
    mode: LogMode,
}

impl Run {
    fn arm(&mut self, fail: Option<u64>) {
        if let Some(n) = fail {
            self.w.mem.fail_nth_alloc(n);
        }
    }

    /// Whether an armed failure was hit; disarms.
    fn hit(&mut self, fail: Option<u64>) -> bool {
        let hit = fail.is_some() && !self.w.mem.failure_pending();
        self.w.mem.clear_failure();
        hit
    }

    /// `[s, e]` widened to the host mappings that straddle its ends: a lazy
    /// type change recomputes whole mappings (which changes nothing beyond
    /// the range unless a mapping's type disagrees with the log-dirty state,
    /// as after an out-of-frames log-dirty fallback). The mapping structure
    /// is read from the machine; the types are the model's.
    fn span(&self, s: u64, e: u64) -> (u64, u64) {
        let w = &self.w;
        let leaf = |g: u64| w.host.stored_leaf(&w.mem, Gfn(g)).unwrap();
        let lo = leaf(s).map_or(s, |l| l.gfn.0.min(s));
        let hi = leaf(e).map_or(e, |l| (l.gfn.0 + l.order.pages() - 1).max(e));
        (lo, hi)
    }

    fn drops(&mut self) -> Vec<hv_altp2m::Dropped> {
        self.w.dropped()
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::HostSet {
                at,
                level,
                kind,
                access,
                seed,
                fail,
            } => self.host_set(at, level, kind, access, seed, fail),
            Op::Range { a, b, on } => {
                let (s, e) = (gfn_of(a.min(b)), gfn_of(a.max(b)));
                let (from, to) = if on {
                    (P2mType::RamRw, P2mType::RamLogdirty)
                } else {
                    (P2mType::RamLogdirty, P2mType::RamRw)
                };
                let span = self.span(s, e);
                let w = &mut self.w;
                w.alt
                    .host_change_type_range(&mut w.mem, &mut w.host, Gfn(s), Gfn(e), from, to)
                    .unwrap();
                for g in indices(s, e) {
                    self.m.logdirty[index_of(g)] = on;
                }
                for g in indices(span.0, span.1) {
                    self.m.recompute(g);
                }
            }
            Op::Global { on } => {
                let (from, to) = if on {
                    (P2mType::RamRw, P2mType::RamLogdirty)
                } else {
                    (P2mType::RamLogdirty, P2mType::RamRw)
                };
                let w = &mut self.w;
                w.alt
                    .host_change_type_global(&mut w.mem, &mut w.host, from, to)
                    .unwrap();
                self.m.global = on;
                for i in 0..UNIVERSE {
                    self.m.recompute(gfn_of(i));
                }
            }
            Op::Clean { a, b, ref between } => {
                let (s, e) = (gfn_of(a.min(b)), gfn_of(a.max(b)));
                // The re-arm by type: each tracked part of [s, e] (as one
                // span beyond REARM_RANGES of them), or everything.
                let parts: Vec<_> = self.w.host.logdirty().within(Gfn(s), Gfn(e)).collect();
                let rearm: Vec<(u64, u64)> = if self.m.global {
                    vec![(0, Gfn::MAX.0)]
                } else if parts.len() > hv_altp2m::REARM_RANGES {
                    vec![self.span(parts[0].0.0, parts[parts.len() - 1].1.0)]
                } else {
                    parts
                        .into_iter()
                        .map(|(rs, re)| self.span(rs.0, re.0))
                        .collect()
                };
                let w = &mut self.w;
                w.drain_all();
                let armed = w
                    .alt
                    .arm_dirty(&mut w.mem, &mut w.host, &mut w.dirty, Gfn(s), Gfn(e))
                    .unwrap();
                let want: BTreeSet<u64> = self.m.dirty.range(s..=e).copied().collect();
                let by_type = armed.by_type();
                assert!(by_type || self.mode == LogMode::Pml);
                for (a, b) in rearm.into_iter().filter(|_| by_type) {
                    for g in indices(a, b) {
                        self.m.recompute(g);
                    }
                }
                if w.alt.flush_pending(&w.host) {
                    let r = w.alt.fetch_dirty(&mut w.dirty, &armed, |_| {});
                    assert_eq!(r, Err(Error::FlushPending), "fetch before the INVEPT");
                }
                w.flush();
                self.m.logged.clear();
                for &(vcpu, at) in between {
                    self.access(vcpu, gfn_of(at), AccessKind::Write, None);
                }
                let mut got = BTreeSet::new();
                let w = &mut self.w;
                w.alt
                    .fetch_dirty(&mut w.dirty, &armed, |g| {
                        got.insert(g.0);
                    })
                    .unwrap();
                assert_eq!(got, want, "clean of {s:#x}-{e:#x}");
                // What was handed over is clean, unless written again since.
                self.m.dirty.retain(|g| !want.contains(g));
                self.m.dirty.extend(self.m.logged.drain(..));
            }
            Op::Create {
                slot,
                default,
                fail,
            } => {
                self.arm(fail);
                let w = &mut self.w;
                let r = w.alt.create_view_at(&mut w.mem, &w.host, slot, default);
                if self.hit(fail) {
                    assert_eq!(r, Err(Error::NoMemory));
                    return;
                }
                if self.m.views[slot as usize].is_some() {
                    assert_eq!(r, Err(Error::ViewExists));
                } else {
                    r.unwrap();
                    self.m.views[slot as usize] = Some(ViewRef {
                        default,
                        visible: true,
                        ex: BTreeMap::new(),
                        remap: BTreeMap::new(),
                    });
                }
            }
            Op::Destroy { slot } => {
                let w = &mut self.w;
                let r = w.alt.destroy_view(&mut w.mem, slot);
                if self.m.views[slot as usize].is_none() {
                    assert_eq!(r, Err(Error::BadView));
                } else if self.m.vcpu.contains(&slot) {
                    assert_eq!(r, Err(Error::Busy));
                } else {
                    r.unwrap();
                    self.m.views[slot as usize] = None;
                }
            }
            Op::Reset { slot } => {
                let w = &mut self.w;
                let r = w.alt.reset_view(&mut w.mem, &w.host, slot);
                match self.m.views[slot as usize].as_mut() {
                    None => assert_eq!(r, Err(Error::BadView)),
                    Some(v) => {
                        r.unwrap();
                        v.ex.clear();
                        v.remap.clear();
                    }
                }
            }
            Op::Visible { view, on } => {
                let w = &mut self.w;
                let r = w.alt.set_visibility(&mut w.mem, &w.host, view, on);
                if !self.m.active(view) {
                    assert_eq!(r, Err(Error::BadView));
                } else {
                    r.unwrap();
                    if view == 0 {
                        self.m.view0_visible = on;
                    } else if let Some(v) = self.m.views[view as usize].as_mut() {
                        v.visible = on;
                    }
                }
            }
            Op::Restart => {
                let w = &mut self.w;
                w.alt.disable(&mut w.mem).unwrap();
                w.alt.enable(&mut w.mem, &w.host).unwrap();
                w.load_eptps();
                self.m.views = [None, None, None, None];
                self.m.vcpu = [0; VCPUS];
                self.m.view0_visible = true;
            }
            Op::Switch { vcpu, view, all } => {
                let r = if all {
                    self.w.alt.switch_all(view)
                } else {
                    self.w.alt.switch_vcpu(vcpu, view)
                };
                if !self.m.active(view) {
                    assert_eq!(r, Err(Error::BadView));
                } else if !self.m.visible(view) {
                    assert_eq!(r, Err(Error::Invisible));
                } else {
                    r.unwrap();
                    if all {
                        self.m.vcpu = [view; VCPUS];
                    } else {
                        self.m.vcpu[vcpu] = view;
                    }
                }
                self.w.load_eptps();
            }
            Op::Vmfunc { vcpu, index } => {
                let ok = self.w.vmfunc(vcpu, index);
                let v = index as u16;
                assert_eq!(
                    ok,
                    self.m.active(v) && self.m.visible(v),
                    "VMFUNC to {index}"
                );
                if ok {
                    self.m.vcpu[vcpu] = v;
                }
            }
            Op::Access {
                vcpu,
                at,
                kind,
                fail,
            } => self.access(vcpu, gfn_of(at), kind, fail),
            Op::SetAccess {
                view,
                at,
                access,
                fail,
            } => {
                let g = gfn_of(at);
                let call = |w: &mut World| {
                    w.alt
                        .set_mem_access(&mut w.mem, &mut w.host, view, Gfn(g), access)
                };
                self.per_gfn(view, g, fail, call, |m, e| {
                    if view == 0 {
                        m.host[index_of(g)] = Some((e.mfn, e.ty, access));
                    } else if let Some(v) = m.views[view as usize].as_mut() {
                        v.ex.insert(g, (access, e.sve));
                    }
                });
            }
            Op::SetSve {
                view,
                at,
                sve,
                fail,
            } => {
                let g = gfn_of(at);
                let call = |w: &mut World| {
                    w.alt
                        .set_suppress_ve(&mut w.mem, &mut w.host, view, Gfn(g), sve)
                };
                self.per_gfn(view, g, fail, call, |m, e| {
                    if let Some(v) = m.views[view as usize].as_mut() {
                        v.ex.insert(g, (e.access, sve));
                    }
                });
            }
            Op::ChangeGfn {
                view,
                old,
                new,
                fail,
            } => {
                let (old, new) = (gfn_of(old), new.map(gfn_of));
                self.arm(fail);
                let w = &mut self.w;
                let r = w
                    .alt
                    .change_gfn(&mut w.mem, &w.host, view, Gfn(old), new.map(Gfn));
                if self.hit(fail) {
                    assert_eq!(r, Err(Error::NoMemory));
                    return;
                }
                let Some(vr) = self.m.views[view as usize].clone() else {
                    assert_eq!(r, Err(Error::BadView));
                    return;
                };
                let Some(n) = new else {
                    if vr.remap.contains_key(&old) {
                        r.unwrap();
                        let v = self.m.views[view as usize].as_mut().unwrap();
                        v.remap.remove(&old);
                        v.ex.remove(&old);
                    } else {
                        assert_eq!(r, Err(Error::NotRemapped));
                    }
                    return;
                };
                match self.m.host_at(n) {
                    None => assert_eq!(r, Err(Error::NotMapped)),
                    Some((_, ty, _)) if !is_ram(ty) => assert_eq!(r, Err(Error::NotRam)),
                    Some(_) => {
                        r.unwrap();
                        let access = self.m.eff(view, n).unwrap().access;
                        let sve = vr.ex.get(&old).is_none_or(|e| e.1);
                        let v = self.m.views[view as usize].as_mut().unwrap();
                        v.remap.insert(old, n);
                        if (access, sve) == (v.default, true) {
                            v.ex.remove(&old);
                        } else {
                            v.ex.insert(old, (access, sve));
                        }
                    }
                }
            }
        }
    }

    /// `set_mem_access`/`set_suppress_ve`: the call (with `fail` armed) must
    /// be refused as the model says, else succeed; `apply` updates the model
    /// from the effective entry before the call.
    fn per_gfn(
        &mut self,
        view: u16,
        g: u64,
        fail: Option<u64>,
        call: impl FnOnce(&mut World) -> Result<(), Error>,
        apply: impl FnOnce(&mut Model, Eff),
    ) {
        self.arm(fail);
        let r = call(&mut self.w);
        if self.hit(fail) {
            assert_eq!(r, Err(Error::NoMemory));
            return;
        }
        if !self.m.active(view) {
            assert_eq!(r, Err(Error::BadView));
            return;
        }
        let Some(e) = self.m.eff(view, g) else {
            assert_eq!(r, Err(Error::NotMapped));
            return;
        };
        r.unwrap();
        apply(&mut self.m, e);
    }

    fn host_set(
        &mut self,
        at: u64,
        level: u8,
        kind: Kind,
        access: P2mAccess,
        seed: u64,
        fail: Option<u64>,
    ) {
        // 1G pages only in the low window; the high one is 2M either side.
        let level = if at >= LOW { level.min(1) } else { level };
        let level = if matches!(kind, Kind::Retype | Kind::Reaccess) {
            0
        } else {
            level
        };
        let order = Order::new(level as u32 * 9).unwrap();
        let b = gfn_of(at) & !(order.pages() - 1);
        let n = order.pages();
        let tracked = indices(b, b + n - 1).filter(|&g| self.m.tracked(g)).count() as u64;
        // Mostly the type the log-dirty state gives; else any RAM type, so
        // that stored types disagree with the state (ram_logdirty outside
        // it, ram_rw inside it).
        let ram = if seed.is_multiple_of(3) {
            [P2mType::RamRw, P2mType::RamLogdirty, P2mType::RamRo][(seed >> 16) as usize % 3]
        } else if tracked == n {
            P2mType::RamLogdirty
        } else if tracked == 0 {
            P2mType::RamRw
        } else {
            P2mType::RamRo
        };
        let (mfn, ty, access) = match kind {
            Kind::Ram => (((seed % 4096) + 1) << order.get(), ram, access),
            Kind::Mmio => (
                ((seed % 4096) + 1) << order.get(),
                P2mType::MmioDirect,
                access,
            ),
            Kind::Remove => (0, P2mType::Invalid, access),
            Kind::Retype | Kind::Reaccess => {
                let Some((m, t, _)) = self.m.host_at(b) else {
                    return;
                };
                let t = match (kind, t) {
                    (Kind::Reaccess, t) => t,
                    (_, P2mType::RamRo) => ram,
                    _ => P2mType::RamRo,
                };
                (m, t, access)
            }
        };
        self.arm(fail);
        let w = &mut self.w;
        let m = Mapping {
            mfn: Mfn(mfn),
            ty,
            access,
        };
        let r = w
            .alt
            .host_set_entry(&mut w.mem, &mut w.host, Gfn(b), order, m);
        let hit = self.hit(fail);
        if hit && r.is_err() {
            assert_eq!(r, Err(Error::NoMemory));
            assert!(self.drops().is_empty());
            return;
        }
        r.unwrap();
        let want = self.m.host_change(b, n, |g| {
            ty.is_present().then_some((mfn + (g - b), ty, access))
        });
        self.check_drops(want);
    }

    /// The drop log has every drop the model foresaw, and otherwise only
    /// out-of-frames fallbacks, which the model then applies.
    fn check_drops(&mut self, want: BTreeSet<(u16, u64)>) {
        let drops = self.drops();
        let mut got = BTreeSet::new();
        for d in &drops {
            if d.reason != DropReason::OutOfMemory {
                assert_eq!(d.pages, 1, "{d:?}");
                assert!(want.contains(&(d.view, d.gfn.0)), "unexpected drop {d:?}");
            }
            for k in d.gfn.0..d.gfn.0 + d.pages {
                got.insert((d.view, k));
            }
        }
        for x in &want {
            assert!(got.contains(x), "drop of {x:?} not reported");
        }
        self.m.apply_drops(&drops, &want);
    }

    fn access(&mut self, vcpu: usize, g: u64, kind: AccessKind, fail: Option<u64>) {
        let view = self.m.vcpu[vcpu];
        assert_eq!(self.w.alt.vcpu_view(vcpu), Ok(view));
        let mut armed = fail;
        let mut end = None;
        let mut outcomes = Vec::new();
        for _ in 0..16 {
            let w = &mut self.w;
            let r = w.walk(vcpu, g, kind);
            // What the kernel does first on every exit.
            w.drain(vcpu);
            match r {
                Ok(mfn) => {
                    end = Some(End::Ok(mfn));
                    break;
                }
                Err(EptFault::PmlFull) => {}
                Err(EptFault::Misconfig { gpa, .. }) => {
                    if let Some(n) = armed.take() {
                        w.mem.fail_nth_alloc(n);
                    }
                    match w.alt.resolve_misconfig(&mut w.mem, &mut w.host, vcpu, gpa) {
                        Ok(fixed) => assert!(fixed, "misconfig at {g:#x} not ours"),
                        Err(Error::NoMemory) => {}
                        Err(e) => panic!("{e:?}"),
                    }
                    w.mem.clear_failure();
                }
                Err(EptFault::Violation { gpa, .. }) => {
                    if let Some(n) = armed.take() {
                        w.mem.fail_nth_alloc(n);
                    }
                    let r = w.alt.handle_violation(
                        &mut w.mem,
                        &mut w.host,
                        &mut w.dirty,
                        vcpu,
                        gpa,
                        kind,
                    );
                    w.mem.clear_failure();
                    match r {
                        Ok(o) => {
                            outcomes.push(o);
                            match o {
                                Outcome::Violation(av) => {
                                    end = Some(End::Violation(av));
                                    break;
                                }
                                Outcome::NotMapped { .. } => {
                                    end = Some(End::NotMapped);
                                    break;
                                }
                                _ => {}
                            }
                        }
                        Err(Error::NoMemory) => {}
                        Err(e) => panic!("{e:?}"),
                    }
                }
                Err(other) => panic!("{other:?}"),
            }
            w.flush();
        }
        let Some(end) = end else {
            panic!("access to {g:#x} did not settle: {outcomes:?}")
        };
        // Replay the exits on the model, checking each was due.
        for o in &outcomes {
            match *o {
                Outcome::LogDirty {
                    owner,
                    fault,
                    gfn,
                    view: ov,
                } => {
                    let e = self.m.eff(view, g).expect("log-dirty fault on nothing");
                    assert_eq!((ov, gfn.0), (view, g));
                    assert_eq!(owner.0, e.source.unwrap_or(g), "logged against the owner");
                    assert_eq!(e.ty, P2mType::RamLogdirty, "{o:?}");
                    let (s, n) = match fault {
                        WriteFault::Coarse { gfn, order } => (gfn.0, order.pages()),
                        // Under PML: split, the write logs when retried.
                        WriteFault::Split => {
                            assert_eq!(self.mode, LogMode::Pml);
                            continue;
                        }
                        _ => (owner.0, 1),
                    };
                    for k in indices(s, s + n - 1) {
                        self.m.dirty.insert(k);
                        self.m.logged.push(k);
                        if let Some((_, t, _)) = &mut self.m.host[index_of(k)]
                            && t.is_changeable()
                        {
                            *t = P2mType::RamRw;
                        }
                    }
                }
                Outcome::Converted { from, to, .. } => {
                    let e = self.m.eff(view, g).unwrap();
                    assert_eq!(e.access, from);
                    if view == 0 {
                        self.m.host[index_of(g)] = Some((e.mfn, e.ty, to));
                    } else if let Some(v) = self.m.views[view as usize].as_mut() {
                        v.ex.insert(g, (to, e.sve));
                    }
                }
                Outcome::LazyCopied { .. } | Outcome::Retry => {}
                Outcome::Violation(_) | Outcome::NotMapped { .. } => {}
            }
        }
        let drops = self.drops();
        for d in &drops {
            assert_eq!(d.reason, DropReason::OutOfMemory, "an access dropped {d:?}");
        }
        self.m.apply_drops(&drops, &BTreeSet::new());
        let e = self.m.eff(view, g);
        let mode = self.mode;
        match (end, e) {
            (End::NotMapped, None) => {}
            (End::Ok(mfn), Some(e)) => {
                assert_eq!(mfn.0, e.mfn, "view {view} gfn {g:#x}");
                assert!(
                    e.ty.rights_in(e.access, mode, false).contains(needed(kind)),
                    "{kind:?} of {g:#x} allowed: {e:?}"
                );
                // Under PML the CPU logged it (drained above): the page
                // stays log-dirty.
                if kind == AccessKind::Write && e.ty == P2mType::RamLogdirty {
                    assert_eq!(mode, LogMode::Pml);
                    let owner = e.source.unwrap_or(g);
                    self.m.dirty.insert(owner);
                    self.m.logged.push(owner);
                }
            }
            (End::Violation(av), Some(e)) => {
                assert!(
                    !e.ty.rights_in(e.access, mode, false).contains(needed(kind)),
                    "{g:#x}: {av:?} vs {e:?}"
                );
                assert_eq!(
                    (av.ty, av.access, av.remap_source.map(|s| s.0)),
                    (e.ty, e.access, e.source)
                );
                if view > 0 {
                    assert_eq!(av.suppress_ve, e.sve);
                }
                let allows_w = e.access.allowed().contains(hv_ept::Rights::W);
                assert!(
                    !(kind == AccessKind::Write && allows_w && e.ty == P2mType::RamLogdirty),
                    "a write to a log-dirty page was not handled"
                );
                assert!(!matches!(
                    (e.access, kind),
                    (P2mAccess::Rx2rw, AccessKind::Write) | (P2mAccess::N2rwx, _)
                ));
            }
            (end, e) => panic!("view {view} {kind:?} {g:#x}: machine {end:?}, model {e:?}"),
        }
    }

    fn check(&mut self, probes: &[u64]) {
        self.w.flush();
        self.w.check_invariants();
        let (w, m) = (&self.w, &self.m);
        for v in 0..VCPUS {
            assert_eq!(w.alt.vcpu_view(v), Ok(m.vcpu[v]));
            assert_eq!(w.eptp[v], w.alt.vcpu_eptp(&w.host, v).unwrap());
        }
        for i in 0..=SLOTS {
            let (valid, visible) = (
                w.mem.read_entry(w.alt.valid_list(), i as usize),
                w.mem.read_entry(w.alt.visible_list(), i as usize),
            );
            if m.active(i) {
                let eptp = w.alt.eptp(&w.host, i).unwrap();
                assert_eq!(valid, eptp);
                assert_eq!(
                    visible,
                    if m.visible(i) {
                        eptp
                    } else {
                        hv_altp2m::INVALID_EPTP
                    }
                );
            } else {
                assert_eq!(
                    (valid, visible),
                    (hv_altp2m::INVALID_EPTP, hv_altp2m::INVALID_EPTP)
                );
            }
        }
        // The dirty log is exactly the logged writes.
        assert_eq!(w.dirty.dirty_count(), m.dirty.len() as u64);
        for &g in &m.dirty {
            assert!(
                w.dirty.is_dirty(Gfn(g)),
                "write to log-dirty gfn {g:#x} not logged"
            );
        }
        for v in 0..=SLOTS {
            if !m.active(v) {
                assert!(!w.alt.is_active(v) || v == 0);
                continue;
            }
            let mut gfns: BTreeSet<u64> = probes.iter().map(|&a| gfn_of(a)).collect();
            if let Some(r) = m.view(v) {
                gfns.extend(r.ex.keys());
                gfns.extend(r.remap.keys());
                gfns.extend(r.remap.values());
                // Remaps and their bounds, exactly.
                let got: Vec<(u64, u64)> =
                    w.alt.remaps(v).unwrap().map(|(a, s)| (a.0, s.0)).collect();
                let want: Vec<(u64, u64)> = r.remap.iter().map(|(&a, &s)| (a, s)).collect();
                assert_eq!(got, want, "view {v} remaps");
                let bounds = r
                    .remap
                    .values()
                    .min()
                    .map(|&lo| (Gfn(lo), Gfn(*r.remap.values().max().unwrap())));
                assert_eq!(
                    w.alt.remapped_gfns(v).unwrap(),
                    bounds,
                    "view {v} min/max_remapped_gfn"
                );
                assert_eq!(w.alt.is_visible(v), Ok(r.visible));
            }
            for g in gfns {
                let got = w.alt.get_entry(&w.mem, &w.host, v, Gfn(g)).unwrap();
                let want = m.eff(v, g);
                match (got, want) {
                    (None, None) => {}
                    (Some(got), Some(want)) => {
                        assert_eq!(
                            (got.mfn.0, got.ty, got.access, got.remap_source.map(|s| s.0)),
                            (want.mfn, want.ty, want.access, want.source),
                            "view {v} gfn {g:#x}"
                        );
                        if v > 0 {
                            assert_eq!(got.suppress_ve, want.sve, "view {v} gfn {g:#x} sve");
                        }
                    }
                    (got, want) => panic!("view {v} gfn {g:#x}: machine {got:?}, model {want:?}"),
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(128),
        max_shrink_iters: 4000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn views_match_the_reference(ops in prop::collection::vec(op(), 1..60), extra in prop::collection::vec(0..UNIVERSE, 4), crowding in prop::sample::select(vec![1usize, 8]), mode in prop::sample::select(vec![LogMode::WriteProtect, LogMode::Pml])) {
        // Start with view 1 in use by vCPU 0 (later steps may change that).
        // With 3 views, a 2M region is crowded (per-page index sets) from
        // its second partial holder on in half the cases.
        let mut run = Run { w: World::enabled_in(VCPUS, mode), m: Model::new(), mode };
        run.w.alt.set_index_crowding(crowding);
        run.apply(&Op::Create { slot: 1, default: P2mAccess::Rwx, fail: None });
        run.apply(&Op::Switch { vcpu: 0, view: 1, all: false });
        for op in &ops {
            run.apply(op);
            let at = match *op {
                Op::HostSet { at, .. } | Op::Access { at, .. } | Op::SetAccess { at, .. } | Op::SetSve { at, .. } => at,
                Op::ChangeGfn { old, .. } => old,
                Op::Range { a, .. } | Op::Clean { a, .. } => a,
                _ => extra[0],
            };
            let mut probes = vec![at, at.saturating_sub(1), (at + 1).min(UNIVERSE - 1)];
            probes.extend(&extra);
            run.check(&probes);
        }
        teardown(run.w);
    }
}
