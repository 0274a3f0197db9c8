//! Log-dirty under PML: a tracked 4K page is writable and the CPU logs its
//! first write in the PML buffer (walk model: `translate_logged`); a tracked
//! superpage splits on its first write; a clean re-arms a page by clearing
//! its dirty flag. Compared with the write-protect mode where it matters.

mod common;

use common::*;
use hv_ept::walk::{AccessKind, EptFault, PML_ENTRIES};
use hv_ept::{
    DirtyBitmap, EptEntry, Error, Gfn, LogMode, Mfn, Order, P2m, P2mAccess, P2mType, Rearm,
    WriteFault,
};

const M2: u64 = 512;

fn track(mem: &mut hv_ept::sim::SimMemory, p2m: &mut P2m, s: u64, e: u64) {
    p2m.change_type_range(mem, Gfn(s), Gfn(e), P2mType::RamRw, P2mType::RamLogdirty)
        .unwrap();
    p2m.take_flush_needed();
}

/// A guest write to `gfn` with PML.
fn write(
    mem: &mut hv_ept::sim::SimMemory,
    p2m: &mut P2m,
    dirty: &mut DirtyBitmap,
    pml: &mut hv_ept::walk::PmlLog,
    gfn: u64,
) -> Exits {
    let (r, exits) = guest_access_logged(mem, p2m, dirty, Some(pml), gfn, AccessKind::Write);
    r.unwrap();
    exits
}

fn leaf(mem: &hv_ept::sim::SimMemory, p2m: &P2m, gfn: u64) -> (u8, EptEntry) {
    raw_leaves(mem, p2m)
        .into_iter()
        .find(|&(first, level, _)| first <= gfn && gfn < first + (1 << (9 * level)))
        .map(|(_, level, raw)| (level, EptEntry(raw)))
        .unwrap()
}

#[test]
fn pml_needs_ad_flags_and_an_empty_p2m() {
    let (mut mem, mut p2m) = setup();
    assert_eq!(
        p2m.set_log_mode(&mem, LogMode::Pml),
        Err(Error::Unsupported)
    );
    p2m.set_ad_enabled(true).unwrap();
    map(&mut mem, &mut p2m, 0, Order::PAGE_4K, 100);
    assert_eq!(
        p2m.set_log_mode(&mem, LogMode::Pml),
        Err(Error::Unsupported),
        "leaves already encoded for write protection"
    );
    let (mem, mut p2m) = setup_in(LogMode::Pml);
    assert_eq!(p2m.log_mode(), LogMode::Pml);
    assert_eq!(p2m.set_ad_enabled(false), Err(Error::Unsupported));
    assert_ne!(p2m.eptp() & 1 << 6, 0);
    p2m.set_log_mode(&mem, LogMode::Pml).unwrap();
}

#[test]
fn a_tracked_4k_page_logs_its_writes_without_a_fault() {
    let (mut mem, mut p2m) = setup_in(LogMode::Pml);
    let mut pml = pml_buffer(&mut mem);
    let mut dirty = DirtyBitmap::new();
    for g in 0..4 {
        map(&mut mem, &mut p2m, g, Order::PAGE_4K, 100);
    }
    track(&mut mem, &mut p2m, 1, 2);
    let exits = write(&mut mem, &mut p2m, &mut dirty, &mut pml, 1);
    assert_eq!(
        (exits.misconfigs, exits.logdirty_faults),
        (1, 0),
        "the recompute only"
    );
    assert!(dirty.is_dirty(Gfn(1)) && p2m.written(&mem, Gfn(1)).unwrap());
    let exits = write(&mut mem, &mut p2m, &mut dirty, &mut pml, 2);
    assert_eq!(
        exits.misconfigs + exits.logdirty_faults,
        0,
        "nothing at all"
    );
    // Untracked pages never log: their dirty flag is preset.
    write(&mut mem, &mut p2m, &mut dirty, &mut pml, 3);
    assert!(!dirty.is_dirty(Gfn(3)) && !p2m.written(&mem, Gfn(3)).unwrap());
    let preset = hv_ept::EptFlags::ACCESSED | hv_ept::EptFlags::DIRTY;
    assert!(leaf(&mem, &p2m, 3).1.flags().contains(preset));
    // Written again: nothing logged, the flag is set.
    let mut logged = Vec::new();
    let mut again = DirtyBitmap::new();
    write(&mut mem, &mut p2m, &mut again, &mut pml, 1);
    logged.extend(drain(&mem, &p2m, &mut again, &mut pml));
    assert!(logged.is_empty() && again.dirty_count() == 0);
    // The re-arm of a clean clears the flag and asks for an INVEPT; the
    // next write logs again, still without an exit.
    assert_eq!(p2m.rearm_page(&mut mem, Gfn(1)).unwrap(), Rearm::Cleared);
    assert!(p2m.take_flush_needed());
    assert_eq!(p2m.rearm_page(&mut mem, Gfn(1)).unwrap(), Rearm::Unchanged);
    assert_eq!(p2m.rearm_page(&mut mem, Gfn(3)).unwrap(), Rearm::Unchanged);
    assert!(!p2m.flush_needed());
    let exits = write(&mut mem, &mut p2m, &mut again, &mut pml, 1);
    assert_eq!(exits.misconfigs + exits.logdirty_faults, 0);
    assert!(again.is_dirty(Gfn(1)));
    // Untracking makes the page plain ram_rw again, flag preset.
    p2m.change_type_range(
        &mut mem,
        Gfn(1),
        Gfn(2),
        P2mType::RamLogdirty,
        P2mType::RamRw,
    )
    .unwrap();
    p2m.resolve_misconfig(&mut mem, Gfn(1)).unwrap();
    let (_, e) = leaf(&mem, &p2m, 1);
    assert!(e.p2m_type() == P2mType::RamRw && e.is_dirty());
}

#[test]
fn a_tracked_superpage_splits_on_its_first_write_and_each_page_logs_alone() {
    let (mut mem, mut p2m) = setup_in(LogMode::Pml);
    let mut pml = pml_buffer(&mut mem);
    let mut dirty = DirtyBitmap::new();
    map(&mut mem, &mut p2m, M2, Order::PAGE_2M, 0);
    track(&mut mem, &mut p2m, M2, 2 * M2 - 1);
    let exits = write(&mut mem, &mut p2m, &mut dirty, &mut pml, M2 + 7);
    assert_eq!((exits.misconfigs, exits.logdirty_faults), (1, 1));
    assert_eq!(leaf(&mem, &p2m, M2 + 7).0, 0, "split to 4K");
    let mut total = exits;
    for g in M2..2 * M2 {
        let e = write(&mut mem, &mut p2m, &mut dirty, &mut pml, g);
        total.misconfigs += e.misconfigs;
        total.logdirty_faults += e.logdirty_faults;
        total.pml_full += e.pml_full;
    }
    assert_eq!(dirty.dirty_count(), 512, "every page logged");
    assert_eq!(
        (total.misconfigs, total.logdirty_faults),
        (1, 1),
        "one fault for all 512 pages"
    );
    assert_eq!(total.pml_full, 0, "drained after every access");
    // The fault-mode result of the same writes: the same pages, 512 faults.
    let (mut mem, mut p2m) = setup_in(LogMode::WriteProtect);
    let mut wp = DirtyBitmap::new();
    map(&mut mem, &mut p2m, M2, Order::PAGE_2M, 0);
    track(&mut mem, &mut p2m, M2, 2 * M2 - 1);
    let mut faults = 0;
    for g in M2..2 * M2 {
        faults += guest_access(&mut mem, &mut p2m, &mut wp, g, AccessKind::Write)
            .1
            .logdirty_faults;
    }
    assert_eq!(faults, 512);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    dirty.fetch_and_clear(Gfn(0), Gfn::MAX, |g| a.push(g));
    wp.fetch_and_clear(Gfn(0), Gfn::MAX, |g| b.push(g));
    assert_eq!(a, b);
}

#[test]
fn a_full_buffer_exits_and_loses_nothing() {
    let (mut mem, mut p2m) = setup_in(LogMode::Pml);
    let mut pml = pml_buffer(&mut mem);
    let mut dirty = DirtyBitmap::new();
    for k in 0..2 {
        map(&mut mem, &mut p2m, k * M2, Order::PAGE_2M, 0);
    }
    track(&mut mem, &mut p2m, 0, 2 * M2 - 1);
    // Split every page up front, then write without draining in between.
    for k in 0..2 {
        p2m.set_entry(
            &mut mem,
            Gfn(k * M2),
            Mfn(k * M2),
            Order::PAGE_4K,
            P2mType::RamLogdirty,
            P2mAccess::Rwx,
        )
        .unwrap();
    }
    p2m.resolve_misconfig(&mut mem, Gfn(0)).unwrap();
    p2m.resolve_misconfig(&mut mem, Gfn(M2)).unwrap();
    let eptp = p2m.eptp();
    let mut full = 0;
    let mut logged = Vec::new();
    for g in 0..2 * M2 {
        let a = hv_ept::walk::Access::write();
        loop {
            match hv_ept::walk::translate_logged(&mut mem, &CAPS, eptp, g << 12, a, &mut pml) {
                Ok(_) => break,
                Err(EptFault::PmlFull) => {
                    full += 1;
                    logged.extend(drain(&mem, &p2m, &mut dirty, &mut pml));
                }
                Err(e) => panic!("{g:#x}: {e:?}"),
            }
        }
    }
    logged.extend(drain(&mem, &p2m, &mut dirty, &mut pml));
    assert_eq!(full, 1, "1024 pages, 512 entries a buffer: full once");
    assert_eq!(logged.len(), 1024);
    assert_eq!(dirty.dirty_count(), 1024);
    assert_eq!(pml.index, PML_ENTRIES - 1);
}

#[test]
fn out_of_frames_the_superpage_becomes_writable_whole_until_a_type_rearm() {
    let (mut mem, mut p2m) = setup_in(LogMode::Pml);
    let mut dirty = DirtyBitmap::new();
    map(&mut mem, &mut p2m, M2, Order::PAGE_2M, 0);
    track(&mut mem, &mut p2m, M2, 2 * M2 - 1);
    p2m.resolve_misconfig(&mut mem, Gfn(M2)).unwrap();
    mem.set_frame_limit(Some(mem.outstanding()));
    let fault = p2m
        .logdirty_write_fault(&mut mem, &mut dirty, Gfn(M2 + 3))
        .unwrap();
    mem.set_frame_limit(None);
    assert_eq!(
        fault,
        WriteFault::Coarse {
            gfn: Gfn(M2),
            order: Order::PAGE_2M
        }
    );
    assert_eq!(dirty.dirty_count(), 512, "all its pages are dirty");
    assert_eq!(
        p2m.rearm_page(&mut mem, Gfn(M2 + 3)).unwrap(),
        Rearm::Writable
    );
    p2m.rearm_range(&mut mem, Gfn(M2), Gfn(M2)).unwrap();
    assert_eq!(
        p2m.rearm_page(&mut mem, Gfn(M2 + 3)).unwrap(),
        Rearm::Unchanged,
        "pending"
    );
    p2m.resolve_misconfig(&mut mem, Gfn(M2)).unwrap();
    let (level, e) = leaf(&mem, &p2m, M2 + 3);
    assert_eq!((level, e.p2m_type()), (1, P2mType::RamLogdirty));
    assert!(
        !e.rights().contains(hv_ept::Rights::W),
        "write-protected again"
    );
    // With a frame the next write splits it.
    let fault = p2m
        .logdirty_write_fault(&mut mem, &mut dirty, Gfn(M2 + 3))
        .unwrap();
    assert_eq!(fault, WriteFault::Split);
}

#[test]
fn a_rearm_range_recomputes_the_window_without_changing_the_ranges() {
    let (mut mem, mut p2m) = setup_in(LogMode::WriteProtect);
    let mut dirty = DirtyBitmap::new();
    for g in 0..8 {
        map(&mut mem, &mut p2m, g, Order::PAGE_4K, 100);
    }
    track(&mut mem, &mut p2m, 1, 1);
    track(&mut mem, &mut p2m, 5, 5);
    for g in [1, 5] {
        guest_access(&mut mem, &mut p2m, &mut dirty, g, AccessKind::Write)
            .0
            .unwrap();
    }
    let ranges: Vec<_> = p2m.logdirty().ranges().collect();
    p2m.rearm_range(&mut mem, Gfn(0), Gfn(7)).unwrap();
    assert!(p2m.take_flush_needed());
    assert_eq!(p2m.logdirty().ranges().collect::<Vec<_>>(), ranges);
    for g in 0..8 {
        let want = if g == 1 || g == 5 {
            P2mType::RamLogdirty
        } else {
            P2mType::RamRw
        };
        assert_eq!(p2m.get_entry(&mem, Gfn(g)).unwrap().ty, want, "gfn {g}");
    }
    assert_eq!(
        p2m.rearm_range(&mut mem, Gfn(3), Gfn(2)),
        Err(Error::BadRange)
    );
}
