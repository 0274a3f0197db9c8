//! The machine the tests drive: simulated memory, the host p2m, the dirty
//! log, the altp2m state, and per vCPU the EPTP register the CPU walks with.
//! Accesses go through the SDM walk model behind a model TLB (translations
//! cached per EPTP, dropped only by the INVEPTs `take_flush` asks for), and
//! exits go to the crate's handlers, as the kernel will do. Raw table views
//! read the simulated memory directly, not through the code under test.
#![allow(dead_code)] // each test file uses a subset

use std::collections::HashMap;

use hv_altp2m::{AccessViolation, Altp2m, INVALID_EPTP, Mapping, Outcome};
use hv_ept::sim::SimMemory;
use hv_ept::walk::{
    Access, AccessKind, EptFault, PML_ENTRIES, PmlLog, translate, translate_logged,
};
use hv_ept::{
    DirtyBitmap, EptCaps, EptEntry, EptMemory, Gfn, LogMode, Mfn, Order, P2m, P2mAccess, P2mType,
    Rights,
};

pub const CAPS: EptCaps = EptCaps::ALL;
pub const M2: u64 = 1 << 9;
pub const G1: u64 = 1 << 18;

pub fn needed(kind: AccessKind) -> Rights {
    match kind {
        AccessKind::Read => Rights::R,
        AccessKind::Write => Rights::W,
        AccessKind::Fetch => Rights::X,
    }
}

/// Property-test cases: `PROPTEST_CASES`, else `default` (what CI runs).
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// How a guest access ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum End {
    /// The frame reached.
    Ok(Mfn),
    Violation(AccessViolation),
    NotMapped,
}

/// Exits taken on the way.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct Exits {
    pub lazy_copies: u32,
    pub misconfigs: u32,
    pub logdirty: u32,
    pub converted: u32,
    pub retries: u32,
    pub tlb_hits: u32,
}

pub struct World {
    pub mem: SimMemory,
    pub host: P2m,
    pub dirty: DirtyBitmap,
    pub alt: Altp2m,
    /// The EPTP each vCPU's VMCS holds.
    pub eptp: Vec<u64>,
    /// (eptp, gfn) -> (frame, rights, dirty): what the CPU may have cached
    /// (with A/D on, whether it cached the leaf's dirty flag as set: then
    /// writes through it set nothing and log nothing).
    pub tlb: HashMap<(u64, u64), (u64, Rights, bool)>,
    pub outcomes: Vec<Outcome>,
    /// Under PML, each vCPU's buffer.
    pub pml: Vec<PmlLog>,
    /// PML-full exits taken.
    pub pml_full: u64,
}

impl World {
    pub fn new(vcpus: usize) -> World {
        World::in_mode(vcpus, LogMode::WriteProtect)
    }

    /// A world whose log-dirty writes are noticed by `mode` (under PML:
    /// A/D on, a PML buffer per vCPU).
    pub fn in_mode(vcpus: usize, mode: LogMode) -> World {
        let mut mem = SimMemory::new();
        let mut host = P2m::new(&mut mem, CAPS).unwrap();
        let mut pml = Vec::new();
        if mode == LogMode::Pml {
            host.set_ad_enabled(true).unwrap();
            for _ in 0..vcpus {
                let buffer = mem.alloc_frame().unwrap();
                pml.push(PmlLog {
                    buffer,
                    index: PML_ENTRIES - 1,
                });
            }
        }
        host.set_log_mode(&mem, mode).unwrap();
        let alt = Altp2m::new(&mut mem, vcpus, 4096).unwrap();
        let eptp = vec![host.eptp(); vcpus];
        World {
            mem,
            host,
            dirty: DirtyBitmap::new(),
            alt,
            eptp,
            tlb: HashMap::new(),
            outcomes: Vec::new(),
            pml,
            pml_full: 0,
        }
    }

    /// A world with altp2m enabled.
    pub fn enabled(vcpus: usize) -> World {
        World::enabled_in(vcpus, LogMode::WriteProtect)
    }

    pub fn enabled_in(vcpus: usize, mode: LogMode) -> World {
        let mut w = World::in_mode(vcpus, mode);
        w.alt.enable(&mut w.mem, &w.host).unwrap();
        w
    }

    /// What the kernel does first on every exit of `vcpu` under PML: hand
    /// the addresses its buffer logged to altp2m, empty it. Returns them.
    pub fn drain(&mut self, vcpu: usize) -> Vec<u64> {
        let Some(log) = self.pml.get_mut(vcpu) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for i in log.index.wrapping_add(1)..PML_ENTRIES {
            out.push(self.mem.read_entry(log.buffer, i as usize));
        }
        log.index = PML_ENTRIES - 1;
        for &gpa in &out {
            self.alt
                .pml_logged(&self.mem, &self.host, &mut self.dirty, gpa)
                .unwrap();
        }
        out
    }

    /// [`World::drain`] of every vCPU.
    pub fn drain_all(&mut self) {
        for v in 0..self.pml.len() {
            self.drain(v);
        }
    }

    /// Maps `[gfn, gfn + 2^order)` in the host as `ty`/rwx at `mfn`.
    pub fn map(&mut self, gfn: u64, order: Order, mfn: u64, ty: P2mType) {
        let m = Mapping {
            mfn: Mfn(mfn),
            ty,
            access: P2mAccess::Rwx,
        };
        self.alt
            .host_set_entry(&mut self.mem, &mut self.host, Gfn(gfn), order, m)
            .unwrap();
        self.flush();
    }

    pub fn create(&mut self, default_access: P2mAccess) -> u16 {
        let v = self
            .alt
            .create_view(&mut self.mem, &self.host, default_access)
            .unwrap();
        self.flush();
        v
    }

    /// The kernel's side of a switch: the VMCS gets the view's EPTP.
    pub fn switch(&mut self, vcpu: usize, view: u16) {
        self.alt.switch_vcpu(vcpu, view).unwrap();
        self.load_eptps();
    }

    pub fn load_eptps(&mut self) {
        for v in 0..self.eptp.len() {
            self.eptp[v] = self.alt.vcpu_eptp(&self.host, v).unwrap();
        }
    }

    /// The guest's VMFUNC leaf 0: the CPU reads the visible list; an invalid
    /// slot makes VMFUNC exit (returns false, nothing switched). Otherwise
    /// the EPTP changes and, at the next exit, the kernel syncs the view.
    pub fn vmfunc(&mut self, vcpu: usize, index: usize) -> bool {
        if index >= 512 {
            return false;
        }
        let eptp = self.mem.read_entry(self.alt.visible_list(), index);
        if eptp == INVALID_EPTP {
            return false;
        }
        self.eptp[vcpu] = eptp;
        self.alt.sync_vcpu_view(vcpu, index as u64).unwrap();
        assert_eq!(
            self.alt.vcpu_eptp(&self.host, vcpu).unwrap(),
            eptp,
            "the visible list holds the view's EPTP"
        );
        true
    }

    /// Does the INVEPTs the crate asks for.
    pub fn flush(&mut self) {
        let f = self.alt.take_flush(&mut self.host);
        if f.all_contexts {
            self.tlb.clear();
        }
        for v in f.views.iter() {
            let eptp = self.alt.eptp(&self.host, v as u16).unwrap();
            self.tlb.retain(|&(e, _), _| e != eptp);
        }
    }

    /// One walk (TLB first), no exit handling. With A/D on, a write through
    /// a translation not cached as dirty walks again (the CPU sets the flag,
    /// and under PML logs the page).
    pub fn walk(&mut self, vcpu: usize, gfn: u64, kind: AccessKind) -> Result<Mfn, EptFault> {
        let eptp = self.eptp[vcpu];
        let ad = eptp & 1 << 6 != 0;
        if let Some(&(mfn, rights, dirty)) = self.tlb.get(&(eptp, gfn))
            && rights.contains(needed(kind))
            && (kind != AccessKind::Write || dirty || !ad)
        {
            return Ok(Mfn(mfn));
        }
        let a = Access {
            kind,
            ..Access::read()
        };
        let gpa = (gfn << 12) | 0x18;
        let r = match self.pml.get_mut(vcpu) {
            Some(log) => translate_logged(&mut self.mem, &CAPS, eptp, gpa, a, log),
            None => translate(&mut self.mem, &CAPS, eptp, gpa, a),
        };
        match r {
            Ok(t) => {
                let dirty = t.leaf.is_dirty() || kind == AccessKind::Write;
                self.tlb.insert((eptp, gfn), (t.hpa >> 12, t.rights, dirty));
                Ok(Mfn(t.hpa >> 12))
            }
            Err(EptFault::PmlFull) => Err(EptFault::PmlFull),
            Err(f) => {
                // A violation or misconfig invalidates what was cached there.
                self.tlb.remove(&(eptp, gfn));
                Err(f)
            }
        }
    }

    /// Accesses `gfn` from `vcpu` as the guest would: walk, on an exit call
    /// the handler, INVEPT what it asks for, retry.
    pub fn access(&mut self, vcpu: usize, gfn: u64, kind: AccessKind) -> (End, Exits) {
        let mut exits = Exits::default();
        for _ in 0..12 {
            let r = self.walk(vcpu, gfn, kind);
            if r.is_err() {
                self.drain(vcpu);
            }
            match r {
                Ok(mfn) => return (End::Ok(mfn), exits),
                Err(EptFault::PmlFull) => self.pml_full += 1,
                Err(EptFault::Misconfig { gpa, .. }) => {
                    exits.misconfigs += 1;
                    let fixed = self
                        .alt
                        .resolve_misconfig(&mut self.mem, &mut self.host, vcpu, gpa)
                        .unwrap();
                    assert!(fixed, "misconfig at {gfn:#x} that is not ours");
                }
                Err(EptFault::Violation { gpa, .. }) => {
                    let o = self
                        .alt
                        .handle_violation(
                            &mut self.mem,
                            &mut self.host,
                            &mut self.dirty,
                            vcpu,
                            gpa,
                            kind,
                        )
                        .unwrap();
                    self.outcomes.push(o);
                    match o {
                        Outcome::LazyCopied { .. } => exits.lazy_copies += 1,
                        Outcome::LogDirty { .. } => exits.logdirty += 1,
                        Outcome::Converted { .. } => exits.converted += 1,
                        Outcome::Retry => exits.retries += 1,
                        Outcome::Violation(v) => return (End::Violation(v), exits),
                        Outcome::NotMapped { .. } => return (End::NotMapped, exits),
                    }
                }
                Err(other) => panic!("access to {gfn:#x}: {other:?}"),
            }
            self.flush();
        }
        panic!("access to {gfn:#x} {kind:?} from vCPU {vcpu} did not settle");
    }

    /// A log-dirty clean of `[start, end]` as the kernel does it: re-arm
    /// and set the bits aside, INVEPT, take the bits. Returns them. Under
    /// PML every vCPU's buffer is drained first (each would have exited).
    pub fn clean(&mut self, start: u64, end: u64) -> Vec<u64> {
        self.drain_all();
        let armed = self
            .alt
            .arm_dirty(
                &mut self.mem,
                &mut self.host,
                &mut self.dirty,
                Gfn(start),
                Gfn(end),
            )
            .unwrap();
        self.flush();
        let mut got = Vec::new();
        self.alt
            .fetch_dirty(&mut self.dirty, &armed, |g| got.push(g.0))
            .unwrap();
        got
    }

    pub fn read(&mut self, vcpu: usize, gfn: u64) -> End {
        self.access(vcpu, gfn, AccessKind::Read).0
    }

    pub fn write(&mut self, vcpu: usize, gfn: u64) -> End {
        self.access(vcpu, gfn, AccessKind::Write).0
    }

    pub fn view(&self, view: u16) -> &P2m {
        self.alt.view_p2m(view).unwrap()
    }

    /// Frames reachable from the host, every view and the two lists (and
    /// the PML buffers).
    pub fn frames_in_use(&self) -> usize {
        let mut n = tables(&self.mem, &self.host) + 2 + self.pml.len();
        for v in self.alt.active_views().iter().filter(|&v| v > 0) {
            n += tables(&self.mem, self.view(v as u16));
        }
        n
    }

    pub fn dropped(&mut self) -> Vec<hv_altp2m::Dropped> {
        let mut out = Vec::new();
        let lost = self.alt.drain_dropped(|d| out.push(d));
        assert_eq!(lost, 0, "drop log overflowed");
        out
    }

    /// Everything observable, for "unchanged" checks: raw tables of the host
    /// and every view, the lists, bookkeeping, vCPU views, frame count.
    pub fn snapshot(&self) -> Snapshot {
        let mut trees = vec![(
            0u16,
            raw_entries(&self.mem, &self.host),
            self.host.max_mapped_pfn(),
        )];
        let mut remaps = Vec::new();
        for v in self.alt.active_views().iter().filter(|&v| v > 0) {
            let p = self.view(v as u16);
            trees.push((v as u16, raw_entries(&self.mem, p), p.max_mapped_pfn()));
            remaps.push((
                v as u16,
                self.alt.remaps(v as u16).unwrap().collect::<Vec<_>>(),
                self.alt.remapped_gfns(v as u16).unwrap(),
                self.alt.default_access(v as u16).unwrap(),
            ));
        }
        let lists = (0..512)
            .map(|i| {
                (
                    self.mem.read_entry(self.alt.valid_list(), i),
                    self.mem.read_entry(self.alt.visible_list(), i),
                )
            })
            .collect();
        Snapshot {
            trees,
            remaps,
            lists,
            vcpus: (0..self.alt.vcpus())
                .map(|v| self.alt.vcpu_view(v).unwrap())
                .collect(),
            outstanding: self.mem.outstanding(),
            dirty: self.dirty.dirty_count(),
            logdirty: self.host.logdirty().clone(),
        }
    }

    /// Invariants straight from the tables: no present entry above a p2m's
    /// bound, every outstanding frame reachable (no leak), and every view
    /// entry maps what the host maps there (or, for an alias, at its source):
    /// no view reaches a frame the host does not map for that gfn.
    pub fn check_invariants(&self) {
        check_bound(&self.mem, &self.host);
        assert_eq!(
            self.host.scoped_entries(),
            scoped_marks(&self.mem, &self.host),
            "host: scoped marks and their ranges"
        );
        assert_eq!(
            self.frames_in_use(),
            self.mem.outstanding(),
            "frames leaked"
        );
        for v in self.alt.active_views().iter().filter(|&v| v > 0) {
            let v = v as u16;
            let p = self.view(v);
            check_bound(&self.mem, p);
            assert_eq!(
                p.scoped_entries(),
                scoped_marks(&self.mem, p),
                "view {v}: scoped marks and their ranges"
            );
            let remaps: HashMap<u64, u64> = self
                .alt
                .remaps(v)
                .unwrap()
                .map(|(a, s)| (a.0, s.0))
                .collect();
            if let Some((lo, hi)) = self.alt.remapped_gfns(v).unwrap() {
                assert_eq!(lo.0, *remaps.values().min().unwrap(), "min_remapped_gfn");
                assert_eq!(hi.0, *remaps.values().max().unwrap(), "max_remapped_gfn");
            } else {
                assert!(remaps.is_empty());
            }
            for (first, level, raw) in raw_leaves(&self.mem, p) {
                let e = EptEntry(raw);
                if let Some(&src) = remaps.get(&first) {
                    assert_eq!(level, 0, "an alias is a 4K leaf");
                    let h = self.host.get_entry(&self.mem, Gfn(src)).unwrap();
                    assert_eq!(
                        h.mfn,
                        Some(e.mfn()),
                        "view {v}: alias {first:#x} -> {src:#x}"
                    );
                    let want = if h.ty == P2mType::RamLogdirty
                        && self.host.log_mode() == LogMode::WriteProtect
                    {
                        P2mType::RamRo
                    } else {
                        h.ty
                    };
                    assert_eq!(e.p2m_type(), want, "view {v}: alias {first:#x} type");
                    assert!(
                        !self
                            .view(v)
                            .get_entry(&self.mem, Gfn(first))
                            .unwrap()
                            .retype,
                        "alias {first:#x} under a mark that recomputes it"
                    );
                }
            }
            // Every other mapping of the view (types recomputed) is the
            // host's, page for page: compared piece by piece with the host's
            // mappings over the same range, which must cover it.
            let mut pieces = Vec::new();
            let all = p.for_each_leaf(&self.mem, Gfn(0), Gfn::MAX, |l| {
                pieces.push(*l);
                std::ops::ControlFlow::Continue(())
            });
            assert!(all.unwrap().is_continue());
            for l in pieces
                .iter()
                .filter(|l| !remaps.contains_key(&l.gfn.0) || l.order != Order::PAGE_4K)
            {
                let last = l.gfn.0 + l.order.pages() - 1;
                let mut covered = 0;
                let _ = self.host
                    .for_each_leaf(&self.mem, l.gfn, Gfn(last), |h| {
                        let a = h.gfn.0.max(l.gfn.0);
                        let b = (h.gfn.0 + h.order.pages() - 1).min(last);
                        assert_eq!(
                            h.mfn.0 + (a - h.gfn.0),
                            l.mfn.0 + (a - l.gfn.0),
                            "view {v} maps {a:#x} to a frame the host does not map there ({l:?} vs {h:?})"
                        );
                        assert_eq!(h.ty, l.ty, "view {v} type at {a:#x}");
                        covered += b - a + 1;
                        std::ops::ControlFlow::Continue(())
                    })
                    .unwrap();
                assert_eq!(
                    covered,
                    l.order.pages(),
                    "view {v} maps {l:?} where the host has holes"
                );
            }
            for &a in remaps.keys() {
                assert!(
                    self.view(v)
                        .get_entry(&self.mem, Gfn(a))
                        .unwrap()
                        .mfn
                        .is_some(),
                    "remap record without an entry"
                );
            }
        }
    }
}

/// A raw entry: (level, table base gfn, index, value).
pub type RawEntry = (u8, u64, usize, u64);
/// A view's tree: (index, entries, max_mapped_pfn).
pub type Tree = (u16, Vec<RawEntry>, Gfn);
/// A view's bookkeeping: (index, remaps, min/max_remapped_gfn, default access).
pub type Books = (u16, Vec<(Gfn, Gfn)>, Option<(Gfn, Gfn)>, P2mAccess);

#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Snapshot {
    pub trees: Vec<Tree>,
    pub remaps: Vec<Books>,
    pub lists: Vec<(u64, u64)>,
    pub vcpus: Vec<u16>,
    pub outstanding: usize,
    pub dirty: u64,
    pub logdirty: hv_ept::LogDirtyRanges,
}

pub fn tables(mem: &SimMemory, p2m: &P2m) -> usize {
    walk_tables(mem, p2m.root(), 3, 0, &mut |_, _, _, _| {})
}

pub fn raw_entries(mem: &SimMemory, p2m: &P2m) -> Vec<RawEntry> {
    let mut out = Vec::new();
    walk_tables(mem, p2m.root(), 3, 0, &mut |lv, base, i, raw| {
        if raw != EptEntry::EMPTY.0 {
            out.push((lv, base, i, raw));
        }
    });
    out
}

/// No valid entry above the bound, and empty slots keep suppress-#VE set
/// (a hole with it clear would raise #VE instead of exiting).
pub fn check_bound(mem: &SimMemory, p2m: &P2m) {
    let max = p2m.max_mapped_pfn().0;
    walk_tables(mem, p2m.root(), 3, 0, &mut |lv, base, i, raw| {
        let e = EptEntry(raw);
        let first = base + ((i as u64) << (9 * lv));
        if e.is_valid() {
            assert!(
                first <= max,
                "entry at {first:#x} above max_mapped_pfn {max:#x}"
            );
            if e.is_leaf(lv) {
                assert!(
                    first + (1 << (9 * lv)) - 1 <= max,
                    "leaf at {first:#x} crosses the bound"
                );
            }
        } else {
            assert!(
                e.suppress_ve(),
                "hole at {first:#x} (level {lv}) without suppress-#VE"
            );
        }
    });
}

/// Runs `op` on fresh copies of a scenario with the n-th allocation failing,
/// n = 1, 2, ... until `op` no longer reaches the failure. `op` returns
/// whether it failed; a failure must leave everything as it was, and every
/// run must leave no frame unaccounted for. Returns the allocation points.
pub fn at_every_allocation_failure<S, O>(mut setup: S, mut op: O) -> u64
where
    S: FnMut() -> World,
    O: FnMut(&mut World) -> Result<(), hv_altp2m::Error>,
{
    for n in 1.. {
        let mut w = setup();
        w.flush();
        let _ = w.dropped();
        let before = w.snapshot();
        w.mem.fail_nth_alloc(n);
        let r = op(&mut w);
        let hit = !w.mem.failure_pending();
        w.mem.clear_failure();
        if !hit {
            r.unwrap();
            w.check_invariants();
            return n - 1;
        }
        match r {
            Err(hv_altp2m::Error::NoMemory) => {
                assert_eq!(w.snapshot(), before, "allocation {n} failed: state changed");
            }
            // Operations with a fallback succeed anyway (checked by invariants).
            Ok(()) => {}
            Err(e) => panic!("allocation {n}: {e:?}"),
        }
        w.check_invariants();
        teardown(w);
    }
    unreachable!()
}

/// Destroys everything and checks that every frame came back.
pub fn teardown(w: World) {
    let World {
        mut mem,
        host,
        alt,
        pml,
        ..
    } = w;
    alt.destroy(&mut mem);
    host.destroy(&mut mem);
    for log in pml {
        mem.free_frame(log.buffer);
    }
    assert_eq!(mem.outstanding(), 0, "frames leaked");
}

// Each test binary uses some of these.
#[allow(unused_imports)]
pub use hv_ept::sim::{marks, raw_leaves, scoped_marks, walk_tables};
