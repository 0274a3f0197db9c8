//! Helpers shared by the integration tests: raw views of the tables (read
//! straight from the simulated memory, not through the p2m code under test)
//! and an access loop that behaves like the hypervisor's exit handlers.
#![allow(dead_code)] // each test file uses a subset

use hv_ept::sim::SimMemory;
use hv_ept::walk::{
    Access, AccessKind, EptFault, PML_ENTRIES, PmlLog, Translation, translate, translate_logged,
};
use hv_ept::{
    DirtyBitmap, EptCaps, EptEntry, EptMemory, Gfn, LogMode, Mfn, Order, P2m, P2mAccess, P2mType,
};

pub const CAPS: EptCaps = EptCaps::ALL;

pub fn setup() -> (SimMemory, P2m) {
    let mut mem = SimMemory::new();
    let p2m = P2m::new(&mut mem, CAPS).unwrap();
    (mem, p2m)
}

/// A p2m whose log-dirty writes are noticed by `mode` (A/D on for PML).
pub fn setup_in(mode: LogMode) -> (SimMemory, P2m) {
    let (mem, mut p2m) = setup();
    if mode == LogMode::Pml {
        p2m.set_ad_enabled(true).unwrap();
    }
    p2m.set_log_mode(&mem, mode).unwrap();
    (mem, p2m)
}

/// A vCPU's PML buffer: a frame of `mem`, empty.
pub fn pml_buffer(mem: &mut SimMemory) -> PmlLog {
    PmlLog {
        buffer: mem.alloc_frame().unwrap(),
        index: PML_ENTRIES - 1,
    }
}

/// Empties the PML buffer as the hypervisor does on an exit: every logged
/// address whose leaf the CPU found clean (its dirty flag now set) is a
/// write to log. Returns the gfns logged.
pub fn drain(mem: &SimMemory, p2m: &P2m, dirty: &mut DirtyBitmap, pml: &mut PmlLog) -> Vec<u64> {
    let first = pml.index.wrapping_add(1);
    let mut out = Vec::new();
    for i in first..PML_ENTRIES {
        let gfn = Gfn(mem.read_entry(pml.buffer, i as usize) >> 12);
        assert!(
            p2m.written(mem, gfn).unwrap(),
            "{gfn:?} logged, not written"
        );
        dirty.mark(gfn).unwrap();
        out.push(gfn.0);
    }
    pml.index = PML_ENTRIES - 1;
    out
}

/// Maps `[gfn, gfn + 2^order)` as RAM rw/rwx at mfn = gfn + `offset`.
pub fn map(mem: &mut SimMemory, p2m: &mut P2m, gfn: u64, order: Order, offset: u64) {
    p2m.set_entry(
        mem,
        Gfn(gfn),
        Mfn(gfn + offset),
        order,
        P2mType::RamRw,
        P2mAccess::Rwx,
    )
    .unwrap();
}

/// Every entry of every table reachable from the root: (level, table base
/// gfn, index, raw). Equal snapshots mean the tree did not change.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Snapshot {
    pub entries: Vec<(u8, u64, usize, u64)>,
    pub tables: usize,
    pub outstanding: usize,
    pub max_mapped_pfn: Gfn,
    pub flush_needed: bool,
}

pub fn snapshot(mem: &SimMemory, p2m: &P2m) -> Snapshot {
    let mut entries = Vec::new();
    let tables = walk_tables(mem, p2m.root(), 3, 0, &mut |lv, base, i, raw| {
        if raw != EptEntry::EMPTY.0 {
            entries.push((lv, base, i, raw));
        }
    });
    Snapshot {
        entries,
        tables,
        outstanding: mem.outstanding(),
        max_mapped_pfn: p2m.max_mapped_pfn(),
        flush_needed: p2m.flush_needed(),
    }
}

pub fn walk(
    mem: &mut SimMemory,
    p2m: &P2m,
    gfn: u64,
    kind: AccessKind,
) -> Result<Translation, EptFault> {
    let a = Access {
        kind,
        ..Access::read()
    };
    // Without A/D: a look must not set the flags PML logs by.
    translate(mem, &CAPS, p2m.eptp() & !(1 << 6), (gfn << 12) | 0x18, a)
}

/// Exits the hypervisor handled on the way to a successful access.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct Exits {
    pub misconfigs: u32,
    pub logdirty_faults: u32,
    pub pml_full: u32,
}

/// Accesses `gfn` as a guest would: walk; on a misconfig call
/// `resolve_misconfig`, on a write violation on a `ram_logdirty` page call the
/// write-fault handler; retry. Returns the translation or the fault a monitor
/// would see, and the exits taken.
pub fn guest_access(
    mem: &mut SimMemory,
    p2m: &mut P2m,
    dirty: &mut DirtyBitmap,
    gfn: u64,
    kind: AccessKind,
) -> (Result<Translation, EptFault>, Exits) {
    guest_access_logged(mem, p2m, dirty, None, gfn, kind)
}

/// [`guest_access`] by a vCPU with PML on (`pml`, for a p2m in PML mode):
/// writes log through the buffer, drained on a log-full exit and after the
/// access, as the hypervisor does on every exit.
pub fn guest_access_logged(
    mem: &mut SimMemory,
    p2m: &mut P2m,
    dirty: &mut DirtyBitmap,
    mut pml: Option<&mut PmlLog>,
    gfn: u64,
    kind: AccessKind,
) -> (Result<Translation, EptFault>, Exits) {
    let mut exits = Exits::default();
    for _ in 0..8 {
        let a = Access {
            kind,
            ..Access::read()
        };
        let gpa = (gfn << 12) | 0x18;
        let res = match pml.as_deref_mut() {
            Some(log) => translate_logged(mem, &CAPS, p2m.eptp(), gpa, a, log),
            None => walk(mem, p2m, gfn, kind),
        };
        if let Some(log) = pml.as_deref_mut() {
            drain(mem, p2m, dirty, log);
        }
        match res {
            Err(EptFault::PmlFull) => exits.pml_full += 1,
            Err(EptFault::Misconfig { .. }) => {
                exits.misconfigs += 1;
                assert!(
                    p2m.resolve_misconfig(mem, Gfn(gfn)).unwrap(),
                    "a misconfig exit must be ours to fix"
                );
            }
            Err(EptFault::Violation { .. })
                if kind == AccessKind::Write
                    && p2m.get_entry(mem, Gfn(gfn)).unwrap().ty == P2mType::RamLogdirty =>
            {
                exits.logdirty_faults += 1;
                p2m.logdirty_write_fault(mem, dirty, Gfn(gfn)).unwrap();
            }
            other => return (other, exits),
        }
    }
    panic!("access to {gfn:#x} did not settle");
}

/// Runs `op` on a fresh `setup()` with the n-th allocation failing, for n =
/// 1, 2, ... until `op` no longer hits the failure. Each failing run must
/// return `NoMemory` and leave the tree exactly as it was. Returns the number
/// of allocation points found.
pub fn at_every_allocation_failure<S, O>(mut setup: S, mut op: O) -> u64
where
    S: FnMut() -> (SimMemory, P2m),
    O: FnMut(&mut SimMemory, &mut P2m) -> Result<(), hv_ept::Error>,
{
    for n in 1.. {
        let (mut mem, mut p2m) = setup();
        let before = snapshot(&mem, &p2m);
        mem.fail_nth_alloc(n);
        let r = op(&mut mem, &mut p2m);
        if mem.failure_pending() {
            r.unwrap();
            return n - 1;
        }
        assert_eq!(r, Err(hv_ept::Error::NoMemory), "allocation {n}");
        assert_eq!(
            snapshot(&mem, &p2m),
            before,
            "allocation {n} failed: tree changed"
        );
        p2m.destroy(&mut mem);
        assert_eq!(mem.outstanding(), 0, "allocation {n}: frames leaked");
    }
    unreachable!()
}

// Each test binary uses some of these.
#[allow(unused_imports)]
pub use hv_ept::sim::{marks, raw_leaves, scoped_marks, walk_tables};
