//! Figures for hv-ept on the simulated memory: `cargo bench -p hv-ept`.
//!
//! - set_entry / get_entry per operation;
//! - change_type_range (ram_rw -> ram_logdirty) over 4 GiB and 1 TiB mapped
//!   with 4K, 2M and 1G pages: entries written and time, aligned and
//!   unaligned (`[s+1, e-1]`), lazy against an eager implementation in the
//!   same run (rewrite every leaf of the range), and what the lazy marks cost
//!   later when every leaf table is touched (resolve_misconfig per fault);
//! - a range in the middle of a mapping: writes, and the exits a guest
//!   touching every leaf table takes inside and beside the range (scoped
//!   marks cost at most one exit each beside it);
//! - table frames per GiB mapped;
//! - the re-arm of a clean over a window of 128 MiB holding 16384 one-page
//!   tracked ranges: one mark per range (what a clean did) against one mark
//!   over the window's span (`rearm_range`), and, under PML, clearing the
//!   dirty flags of 4096 written pages (`rearm_page`).
//!
//! 1 TiB of 4K pages (2^28 leaves, 2 GiB of tables) is only built with
//! `HV_EPT_BENCH_TIB_4K=1`. Entry writes are counted by the simulated memory;
//! they include the 512 writes that fill each new table.

use std::hint::black_box;
use std::time::{Duration, Instant};

use hv_ept::sim::SimMemory;
use hv_ept::{EptCaps, EptEntry, EptMemory, Gfn, Mfn, Order, P2m, P2mAccess, P2mType};

const GIB: u64 = 1 << 18; // pages
const TIB: u64 = 1 << 28;

fn build(order: Order, pages: u64) -> (SimMemory, P2m, Duration) {
    let mut mem = SimMemory::new();
    let mut p2m = P2m::new(&mut mem, EptCaps::ALL).unwrap();
    let t = Instant::now();
    let mut g = 0;
    while g < pages {
        p2m.set_entry(
            &mut mem,
            Gfn(g),
            Mfn(g),
            order,
            P2mType::RamRw,
            P2mAccess::Rwx,
        )
        .unwrap();
        g += order.pages();
    }
    (mem, p2m, t.elapsed())
}

fn ns(d: Duration, n: u64) -> f64 {
    d.as_nanos() as f64 / n as f64
}

fn size(pages: u64) -> String {
    if pages >= TIB {
        format!("{} TiB", pages / TIB)
    } else {
        format!("{} GiB", pages / GIB)
    }
}

fn order_name(o: Order) -> &'static str {
    match o.get() {
        0 => "4K",
        9 => "2M",
        _ => "1G",
    }
}

/// Xorshift: cheap deterministic gfns.
struct Rng(u64);
impl Rng {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

fn per_op() {
    println!("== set_entry / get_entry");
    for (order, pages) in [
        (Order::PAGE_4K, 4 * GIB),
        (Order::PAGE_2M, 256 * GIB),
        (Order::PAGE_1G, 4 * TIB),
    ] {
        let (mut mem, mut p2m, t) = build(order, pages);
        let n = pages / order.pages();
        println!(
            "set_entry {:>2} building      {:>8.1} ns/op   ({n} ops over {}, sequential)",
            order_name(order),
            ns(t, n),
            size(pages)
        );
        if order == Order::PAGE_4K {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
            let reps = 1_000_000;
            let t = Instant::now();
            for _ in 0..reps {
                let g = rng.next(pages);
                p2m.set_entry(
                    &mut mem,
                    Gfn(g),
                    Mfn(g + 1),
                    order,
                    P2mType::RamRw,
                    P2mAccess::Rx,
                )
                .unwrap();
            }
            println!(
                "set_entry 4K overwrite     {:>8.1} ns/op   (random gfns, path exists)",
                ns(t.elapsed(), reps)
            );
        }
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let reps = 2_000_000;
        let t = Instant::now();
        for _ in 0..reps {
            black_box(p2m.get_entry(&mem, Gfn(rng.next(pages))).unwrap());
        }
        println!(
            "get_entry {:>2} mapped        {:>8.1} ns/op   (random gfns)",
            order_name(order),
            ns(t.elapsed(), reps)
        );
        let t = Instant::now();
        for i in 0..reps {
            black_box(p2m.get_entry(&mem, Gfn(pages + i)).unwrap());
        }
        println!(
            "get_entry above max_mapped {:>8.1} ns/op",
            ns(t.elapsed(), reps)
        );
        p2m.destroy(&mut mem);
    }
}

/// The eager alternative: rewrite every present leaf of `[s, e]` with the
/// new type (no marks, no faults later). Works on ranges aligned to the leaves.
fn eager(mem: &mut SimMemory, table: Mfn, level: u8, base: u64, s: u64, e: u64) {
    let span = 1u64 << (9 * level);
    for i in 0..512u64 {
        let first = base + i * span;
        if first > e || first + span - 1 < s {
            continue;
        }
        let entry = EptEntry(mem.read_entry(table, i as usize));
        if !entry.is_valid() {
            continue;
        }
        if entry.is_leaf(level) {
            let new = entry.with_type(P2mType::RamLogdirty).with_type_derived();
            mem.write_entry(table, i as usize, new.0);
        } else {
            eager(mem, entry.mfn(), level - 1, first, s, e);
        }
    }
}

/// Touches every leaf table once (one gfn per 512 entries): the misconfig
/// exits a guest writing the whole range would take, at most.
fn resolve_all(
    mem: &mut SimMemory,
    p2m: &mut P2m,
    s: u64,
    e: u64,
    order: Order,
) -> (u64, u64, Duration) {
    let stride = order.pages() * 512;
    let (w0, mut faults) = (mem.entry_writes(), 0);
    let t = Instant::now();
    let mut g = s;
    while g <= e {
        if p2m.resolve_misconfig(mem, Gfn(g)).unwrap() {
            faults += 1;
        }
        g += stride;
    }
    (faults, mem.entry_writes() - w0, t.elapsed())
}

fn type_change(order: Order, pages: u64) -> Unaligned {
    let (mut mem, mut p2m, t_build) = build(order, pages);
    let frames = mem.outstanding();
    println!(
        "-- {} mapped with {} pages: {} leaves, {} table frames, built in {:.2} s",
        size(pages),
        order_name(order),
        pages / order.pages(),
        frames,
        t_build.as_secs_f64()
    );
    let (s, e) = (0, pages - 1);
    // Lazy, a few rounds (marks are consumed by resolving everything between),
    // ending with every page ram_rw again.
    let mut lazy_writes = 0;
    let mut lazy_time = Duration::MAX;
    let mut resolved = (0, 0, Duration::ZERO);
    for round in 0..4 {
        let (from, to) = if round % 2 == 0 {
            (P2mType::RamRw, P2mType::RamLogdirty)
        } else {
            (P2mType::RamLogdirty, P2mType::RamRw)
        };
        let w0 = mem.entry_writes();
        let t = Instant::now();
        p2m.change_type_range(&mut mem, Gfn(s), Gfn(e), from, to)
            .unwrap();
        lazy_time = lazy_time.min(t.elapsed());
        lazy_writes = mem.entry_writes() - w0;
        resolved = resolve_all(&mut mem, &mut p2m, s, e, order);
    }
    // Unaligned: head and tail inside the first and last leaf tables.
    let (hs, he) = (s + 1, e - 1);
    let w0 = mem.entry_writes();
    let t = Instant::now();
    p2m.change_type_range(
        &mut mem,
        Gfn(hs),
        Gfn(he),
        P2mType::RamRw,
        P2mType::RamLogdirty,
    )
    .unwrap();
    let (unaligned_time, unaligned_writes) = (t.elapsed(), mem.entry_writes() - w0);
    let unaligned_resolved = resolve_all(&mut mem, &mut p2m, s, e, order);
    // Eager, same range, on the mapping as built (the ends split above).
    p2m.destroy(&mut mem);
    assert_eq!(mem.outstanding(), 0);
    let (mut mem, p2m, _) = build(order, pages);
    let w0 = mem.entry_writes();
    let t = Instant::now();
    eager(&mut mem, p2m.root(), 3, 0, s, e);
    let (eager_time, eager_writes) = (t.elapsed(), mem.entry_writes() - w0);

    println!(
        "   lazy  aligned   {:>10} writes {:>12.1} us",
        lazy_writes,
        lazy_time.as_secs_f64() * 1e6
    );
    println!(
        "   lazy  [s+1,e-1] {:>10} writes {:>12.1} us",
        unaligned_writes,
        unaligned_time.as_secs_f64() * 1e6
    );
    println!(
        "   eager           {:>10} writes {:>12.1} us   ratio eager/lazy writes: {:.0}x aligned, {:.0}x unaligned",
        eager_writes,
        eager_time.as_secs_f64() * 1e6,
        eager_writes as f64 / lazy_writes.max(1) as f64,
        eager_writes as f64 / unaligned_writes.max(1) as f64
    );
    for (what, (faults, writes, t)) in [("aligned", resolved), ("[s+1,e-1]", unaligned_resolved)] {
        println!(
            "   later, {what:>9}: touching every leaf table = {} misconfig exits, {} writes, {:.0} ns and {:.0} writes per resolve_misconfig",
            faults,
            writes,
            ns(t, faults.max(1)),
            writes as f64 / faults.max(1) as f64
        );
    }
    p2m.destroy(&mut mem);
    assert_eq!(mem.outstanding(), 0);
    Unaligned {
        order,
        pages,
        writes: unaligned_writes,
        exits: unaligned_resolved.0,
    }
}

/// The figures of a `[s+1, e-1]` change over a whole mapping.
struct Unaligned {
    order: Order,
    pages: u64,
    writes: u64,
    /// Exits to touch every leaf table afterwards.
    exits: u64,
}

fn summary(rows: &[Unaligned]) {
    println!(
        "== unaligned range change [s+1, e-1] over the whole mapping (target: <= 16 writes, exits per touched leaf table unchanged)"
    );
    println!("pages  mapped    writes   exits to touch every leaf table");
    for r in rows {
        println!(
            "{:>5}  {:>6}  {:>8}   {:>8}",
            order_name(r.order),
            size(r.pages),
            r.writes,
            r.exits
        );
    }
}

/// A range in the middle of 4 GiB of 4K pages, its ends at odd offsets a
/// few leaf tables into a GiB: what marking costs, and what touching every
/// leaf table costs inside the range and beside it (the leaf tables wholly
/// outside it; exact marks would cost none there).
fn beside() {
    println!("== a range inside 4 GiB of 4K pages: [1G + 4M + 3, 3G - 4M - 5]");
    let (mut mem, mut p2m, _) = build(Order::PAGE_4K, 4 * GIB);
    let (s, e) = (GIB + 1024 + 3, 3 * GIB - 1024 - 5);
    let w0 = mem.entry_writes();
    p2m.change_type_range(
        &mut mem,
        Gfn(s),
        Gfn(e),
        P2mType::RamRw,
        P2mType::RamLogdirty,
    )
    .unwrap();
    let writes = mem.entry_writes() - w0;
    let (mut inside, mut outside, mut tables_in, mut tables_out) = (0, 0, 0, 0);
    let mut g = 0;
    while g < 4 * GIB {
        let meets = g + 511 >= s && g <= e;
        let fixed = p2m.resolve_misconfig(&mut mem, Gfn(g)).unwrap() as u64;
        if meets {
            inside += fixed;
            tables_in += 1;
        } else {
            outside += fixed;
            tables_out += 1;
        }
        g += 512;
    }
    println!(
        "   {writes} writes; touching every leaf table: {inside} exits for {tables_in} tables meeting the range, {outside} exits for {tables_out} tables beside it"
    );
    p2m.destroy(&mut mem);
}

fn table_memory() {
    println!("== table memory (frames of 4 KiB, root included)");
    for (order, pages) in [
        (Order::PAGE_4K, 4 * GIB),
        (Order::PAGE_2M, 4 * GIB),
        (Order::PAGE_2M, TIB),
        (Order::PAGE_1G, 4 * GIB),
        (Order::PAGE_1G, TIB),
    ] {
        let (mut mem, p2m, _) = build(order, pages);
        let frames = mem.outstanding() as f64;
        let gib = (pages / GIB) as f64;
        println!(
            "{} pages over {:>6}: {:>6} frames = {:>9.4} frames/GiB = {:>8.2} KiB of tables per GiB mapped",
            order_name(order),
            size(pages),
            frames,
            frames / gib,
            frames * 4.0 / gib
        );
        p2m.destroy(&mut mem);
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        // Built by `cargo test --all-targets`, which does not pass --bench.
        println!("hv-ept bench: run with `cargo bench -p hv-ept`");
        return;
    }
    per_op();
    println!("== change_type_range ram_rw -> ram_logdirty, lazy vs eager");
    let mut rows = vec![
        type_change(Order::PAGE_4K, 4 * GIB),
        type_change(Order::PAGE_2M, 4 * GIB),
        type_change(Order::PAGE_2M, TIB),
        type_change(Order::PAGE_1G, TIB),
    ];
    if std::env::var_os("HV_EPT_BENCH_TIB_4K").is_some() {
        rows.push(type_change(Order::PAGE_4K, TIB));
    } else {
        println!(
            "-- 1 TiB with 4K pages: not built (2 GiB of tables); HV_EPT_BENCH_TIB_4K=1 builds it"
        );
    }
    summary(&rows);
    beside();
    table_memory();
    rearm();
}

/// The re-arm of a clean, per range, per span, per page under PML.
fn rearm() {
    const WINDOW: u64 = 32768;
    println!();
    println!("== re-arm of a 128 MiB window (4K pages) holding 16384 one-page ranges");
    let (mut mem, mut p2m, _) = build(Order::PAGE_4K, WINDOW);
    for k in 0..WINDOW / 2 {
        p2m.change_type_range(
            &mut mem,
            Gfn(2 * k),
            Gfn(2 * k),
            P2mType::RamRw,
            P2mType::RamLogdirty,
        )
        .unwrap();
    }
    // Every leaf table recomputed, as after a guest touched them all.
    let resolve = |mem: &mut SimMemory, p2m: &mut P2m| {
        for g in (0..WINDOW).step_by(512) {
            p2m.resolve_misconfig(mem, Gfn(g)).unwrap();
        }
    };
    let runs = 5;
    let (mut per_range, mut span) = (Duration::MAX, Duration::MAX);
    let (mut w_range, mut w_span) = (0, 0);
    for _ in 0..runs {
        resolve(&mut mem, &mut p2m);
        let (w0, t) = (mem.entry_writes(), Instant::now());
        let ranges: Vec<_> = p2m.logdirty().within(Gfn(0), Gfn(WINDOW - 1)).collect();
        for (a, b) in ranges {
            p2m.change_type_range(&mut mem, a, b, P2mType::RamRw, P2mType::RamLogdirty)
                .unwrap();
        }
        per_range = per_range.min(t.elapsed());
        w_range = mem.entry_writes() - w0;
        resolve(&mut mem, &mut p2m);
        let (w0, t) = (mem.entry_writes(), Instant::now());
        p2m.rearm_range(&mut mem, Gfn(0), Gfn(WINDOW - 1)).unwrap();
        span = span.min(t.elapsed());
        w_span = mem.entry_writes() - w0;
    }
    println!(
        "one mark per range: {w_range} entry writes, {:.0} us; one mark over the span: {w_span} writes, {:.2} us",
        per_range.as_secs_f64() * 1e6,
        span.as_secs_f64() * 1e6
    );
    // Under PML: 4096 written pages, each flag cleared in place.
    let mut mem = SimMemory::new();
    let mut p2m = P2m::new(&mut mem, EptCaps::ALL).unwrap();
    p2m.set_ad_enabled(true).unwrap();
    p2m.set_log_mode(&mem, hv_ept::LogMode::Pml).unwrap();
    for g in 0..4096 {
        p2m.set_entry(
            &mut mem,
            Gfn(g),
            Mfn(g),
            Order::PAGE_4K,
            P2mType::RamLogdirty,
            P2mAccess::Rwx,
        )
        .unwrap();
    }
    let leaf_table = |mem: &SimMemory, p2m: &P2m, g: u64| {
        let pdpt = EptEntry(mem.read_entry(p2m.root(), 0)).mfn();
        let pd = EptEntry(mem.read_entry(pdpt, 0)).mfn();
        EptEntry(mem.read_entry(pd, (g >> 9) as usize)).mfn()
    };
    let mut best = Duration::MAX;
    for _ in 0..runs {
        for g in 0..4096u64 {
            // The CPU's write: the dirty flag set.
            let t = leaf_table(&mem, &p2m, g);
            let raw = mem.read_entry(t, (g & 511) as usize);
            mem.write_entry(t, (g & 511) as usize, raw | 1 << 9);
        }
        let t = Instant::now();
        for g in 0..4096 {
            let r = p2m.rearm_page(&mut mem, Gfn(g)).unwrap();
            assert_eq!(black_box(r), hv_ept::Rearm::Cleared);
        }
        best = best.min(t.elapsed());
    }
    println!(
        "PML: 4096 written pages re-armed one by one (rearm_page): {:.0} ns a page",
        ns(best, 4096)
    );
}
