//! Scenarios on two vCPUs at once (boot with 2 CPUs): the APs started
//! through INIT-SIPI-SIPI (`smp`), a view per vCPU, VMFUNC on both at once,
//! a page dropped on one CPU while the other reads it, and the cost of a
//! cross-CPU invalidation. The boot processor is vCPU 0, the first AP vCPU 1
//! (the hypervisor numbers vCPUs in the MADT's order, as the guest does).
//! Pages used: 0x58_0000.. (the views' pages), 0x59_0000.. (dropped pages).

use core::sync::atomic::{AtomicU64, Ordering};

use hv_abi::{access, call};
use hv_boot::bootinfo::BootInfo;

use crate::altp2m::{self, create, gfn, ok, read_u8, vmfunc_to};
use crate::scenarios::{Options, Outcome, check, counts, hypercall, reason};
use crate::smp::{self, Rendezvous};
use crate::{apic, println, probe, rdtsc};

/// X shows X's bytes in view 0, Y's in view A (remapped), Z's in view B.
const X: u64 = 0x58_0000;
const Y: u64 = 0x58_1000;
const Z: u64 = 0x58_2000;
/// Restricted and given back by the invalidation figure.
const BENCH_PAGE: u64 = 0x58_3000;
const IN_X: u8 = 0x11;
const IN_Y: u8 = 0x22;
const IN_Z: u8 = 0x33;
/// The dropped pages: one per round.
const DROPPED: u64 = 0x59_0000;
const GP: u8 = 13;

/// Views the two halves of a scenario share.
static VIEW_A: AtomicU64 = AtomicU64::new(0);
static VIEW_B: AtomicU64 = AtomicU64::new(0);
static MEET: Rendezvous = Rendezvous::new();

/// Starts the APs and checks there is one to run scenarios on.
fn two_cpus(boot: &BootInfo, options: &Options) -> Outcome {
    let online = smp::start(boot, options.init_aps)?;
    check(
        online >= 2,
        "one CPU: the SMP scenarios need 2 (boot with 2 CPUs)",
    )
}

/// The other vCPU of the two.
fn other() -> u64 {
    1 - smp::index() as u64
}

fn this() -> u64 {
    smp::index() as u64
}

fn expect_view(vcpu: u64, view: u64, why: &'static str) -> Outcome {
    check(
        hypercall(call::ALTP2M_GET_VCPU_VIEW, &[vcpu]) == view as i64,
        why,
    )
}

fn switch_vcpu(vcpu: u64, view: u64) -> Outcome {
    ok(
        hypercall(call::ALTP2M_SWITCH_VCPU_VIEW, &[vcpu, view]),
        "SWITCH_VCPU_VIEW failed",
    )
    .map(|_| ())
}

/// Fills X, Y, Z and makes view A show Y at X, and (with `both`) view B
/// show Z at X.
fn remapped_views(both: bool) -> Outcome {
    for (page, value) in [(X, IN_X), (Y, IN_Y), (Z, IN_Z)] {
        altp2m::fill(page, value);
    }
    altp2m::enable()?;
    let (a, b) = (create(access::RWX)?, create(access::RWX)?);
    ok(
        hypercall(call::ALTP2M_CHANGE_GFN, &[a, gfn(X), gfn(Y)]),
        "CHANGE_GFN in view A",
    )?;
    if both {
        ok(
            hypercall(call::ALTP2M_CHANGE_GFN, &[b, gfn(X), gfn(Z)]),
            "CHANGE_GFN in view B",
        )?;
    }
    VIEW_A.store(a, Ordering::SeqCst);
    VIEW_B.store(b, Ordering::SeqCst);
    MEET.reset();
    Ok(())
}

/// Both vCPUs back on view 0, altp2m off.
fn views_off() -> Outcome {
    altp2m::disable()
}

/// `smp`: the APs come up through INIT-SIPI-SIPI and run guest code in
/// 64-bit mode, each on its own APIC id, with hypercalls that work there.
pub fn bring_up(boot: &BootInfo, options: &Options) -> Outcome {
    two_cpus(boot, options)?;
    smp::on_two_cpus(report_here, report_here)?;
    println!(
        "smp: vCPU 1 runs as APIC id {}, vCPU 0 as {}",
        SEEN_APIC_ID[1].load(Ordering::SeqCst),
        SEEN_APIC_ID[0].load(Ordering::SeqCst)
    );
    Ok(())
}

static SEEN_APIC_ID: [AtomicU64; 2] = [const { AtomicU64::new(u64::MAX) }; 2];

fn report_here() -> Outcome {
    let id = apic::id();
    let initial = (core::arch::x86_64::__cpuid(1).ebx >> 24) as u8;
    SEEN_APIC_ID[smp::index()].store(u64::from(id), Ordering::SeqCst);
    check(id == initial, "the APIC id differs from CPUID's")?;
    check(
        crate::scenarios::hypervisor_present(),
        "no hypervisor leaves on this CPU",
    )?;
    check(
        hypercall(call::VERSION, &[]) == hv_abi::VERSION as i64,
        "a hypercall from this CPU failed",
    )?;
    MEET.meet(1)?;
    check(
        SEEN_APIC_ID[other() as usize].load(Ordering::SeqCst) != u64::from(id),
        "both CPUs have the same APIC id",
    )
}

/// `smp-views`: each vCPU on a view of its own, switched from the other
/// vCPU and by itself, checked with GET_VCPU_VIEW from both and by what
/// each reads at X (remapped in view A only). Last, vCPU 0 switches vCPU 1
/// while it reads X in a loop: once the call returned, vCPU 1 reads A's page.
pub fn views(boot: &BootInfo, options: &Options) -> Outcome {
    two_cpus(boot, options)?;
    remapped_views(false)?;
    let (a, b) = (VIEW_A.load(Ordering::SeqCst), VIEW_B.load(Ordering::SeqCst));
    // Another vCPU's view, switched from here, and this one's own.
    switch_vcpu(1, a)?;
    switch_vcpu(0, b)?;
    SWITCHED.store(0, Ordering::SeqCst);
    smp::on_two_cpus(views_part, views_part)?;
    views_off()
}

/// vCPU 0 switched vCPU 1 (in round 3).
static SWITCHED: AtomicU64 = AtomicU64::new(0);

fn views_part() -> Outcome {
    let (a, b) = (VIEW_A.load(Ordering::SeqCst), VIEW_B.load(Ordering::SeqCst));
    let (me, you) = (this(), other());
    let shows = |view: u64| if view == a { IN_Y } else { IN_X };
    // Round 1: vCPU 1 on A, vCPU 0 on B, as vCPU 0 switched both.
    let (mine, yours) = if me == 1 { (a, b) } else { (b, a) };
    expect_view(me, mine, "GET_VCPU_VIEW of this vCPU (switched by vCPU 0)")?;
    expect_view(you, yours, "GET_VCPU_VIEW of the other vCPU")?;
    check(
        read_u8(X) == shows(mine),
        "a vCPU does not read through its own view",
    )?;
    MEET.meet(1)?;
    // Round 2: each switches itself to the other view.
    switch_vcpu(me, yours)?;
    MEET.meet(2)?;
    expect_view(me, yours, "GET_VCPU_VIEW after switching itself")?;
    expect_view(
        you,
        mine,
        "GET_VCPU_VIEW of the other vCPU after it switched itself",
    )?;
    check(
        read_u8(X) == shows(yours),
        "a vCPU does not read through the view it switched to",
    )?;
    MEET.meet(3)?;
    // Round 3: vCPU 1 is on B now; vCPU 0 switches it to A while it reads.
    if me == 0 {
        switch_vcpu(1, a)?;
        SWITCHED.store(1, Ordering::SeqCst);
    } else {
        let mut reads = 0u64;
        loop {
            let switched = SWITCHED.load(Ordering::SeqCst) == 1;
            let seen = read_u8(X);
            if switched {
                check(
                    seen == IN_Y,
                    "vCPU 1 read through its old view after another vCPU's switch returned",
                )?;
                break;
            }
            check(seen == IN_X, "vCPU 1 left view B before it was switched")?;
            reads += 1;
            check(reads < 100_000_000, "vCPU 0 never switched vCPU 1's view")?;
        }
    }
    MEET.meet(4)
}

/// `smp-vmfunc`: both vCPUs switch views with VMFUNC at once, 200 times
/// each, reading X through every view they land on (A shows Y's page, B
/// Z's); vCPU 0 ends on A, vCPU 1 on B; each asks GET_VCPU_VIEW of itself
/// (an exit: the hypervisor learns of its VMFUNCs there), then, once both
/// did, of the other. (Another vCPU's view is as of its last VM exit, as
/// in Xen: a VMFUNC exits nothing.)
pub fn vmfunc(boot: &BootInfo, options: &Options) -> Outcome {
    two_cpus(boot, options)?;
    remapped_views(true)?;
    DONE_SWITCHING.store(0, Ordering::SeqCst);
    smp::on_two_cpus(vmfunc_part, vmfunc_part)?;
    views_off()
}

/// vCPUs that ended their VMFUNCs (bit per vCPU).
static DONE_SWITCHING: AtomicU64 = AtomicU64::new(0);
const VMFUNC_ROUNDS: u64 = 200;

fn vmfunc_part() -> Outcome {
    let (a, b) = (VIEW_A.load(Ordering::SeqCst), VIEW_B.load(Ordering::SeqCst));
    let (me, you) = (this(), other());
    let shows = |view: u64| match view {
        0 => IN_X,
        v if v == a => IN_Y,
        _ => IN_Z,
    };
    // vCPU 0 ends on A, vCPU 1 on B.
    let (first, last) = if me == 0 { (b, a) } else { (a, b) };
    // The first visits copy X into each view (lazy-copy exits): before the race.
    for view in [first, last, 0] {
        vmfunc_to(view)?;
        check(
            read_u8(X) == shows(view),
            "a view shows the wrong page at X",
        )?;
    }
    MEET.meet(1)?;
    for round in 0..VMFUNC_ROUNDS {
        let view = if round % 2 == 0 { first } else { last };
        vmfunc_to(view)?;
        check(
            read_u8(X) == shows(view),
            "after its VMFUNC a vCPU read through another view (the other vCPU's?)",
        )?;
    }
    // This hypercall's exit is where the hypervisor learns of the VMFUNCs.
    expect_view(me, last, "GET_VCPU_VIEW of this vCPU after its VMFUNCs")?;
    DONE_SWITCHING.fetch_or(1 << me, Ordering::SeqCst);
    let both = smp::wait_for(|| DONE_SWITCHING.load(Ordering::SeqCst) == 0b11);
    check(both, "the other vCPU never finished its VMFUNCs")?;
    // Each vCPU's VMFUNCs moved that vCPU alone.
    let yours = if you == 0 { a } else { b };
    expect_view(
        you,
        yours,
        "GET_VCPU_VIEW of the other vCPU after its VMFUNCs",
    )?;
    check(
        read_u8(X) == shows(last),
        "not on the view of the last VMFUNC",
    )?;
    MEET.meet(2)?;
    vmfunc_to(0)
}

/// `smp-balloon`: in each round one vCPU drops a page (BALLOON_RELEASE)
/// while the other reads it in a tight loop; the reader must fault (the
/// page is gone: an EPT violation the hypervisor answers with #GP) and may
/// never read the page's marker once the call returned on the dropper.
/// Rounds: vCPU 0 drops, vCPU 1 reads; the other way; vCPU 0 drops while
/// vCPU 1 reads through a view it VMFUNCed to.
pub fn balloon(boot: &BootInfo, options: &Options) -> Outcome {
    two_cpus(boot, options)?;
    for round in 1..=DROP_ROUNDS {
        let page = dropped_page(round);
        for qword in 0..512 {
            // SAFETY: a page of guest RAM the scenario owns, identity-mapped.
            unsafe { core::ptr::write_volatile((page + qword * 8) as *mut u64, marker(round)) };
        }
    }
    altp2m::enable()?;
    VIEW_A.store(create(access::RWX)?, Ordering::SeqCst);
    MEET.reset();
    READING.store(0, Ordering::SeqCst);
    RELEASED.store(0, Ordering::SeqCst);
    smp::on_two_cpus(balloon_part, balloon_part)?;
    for (cpu, reads) in READS.iter().enumerate() {
        let reads = reads.load(Ordering::SeqCst);
        if reads > 0 {
            println!(
                "smp-balloon: vCPU {cpu} as the reader: {reads} reads of the marker before the fault"
            );
        }
    }
    views_off()
}

const DROP_ROUNDS: u64 = 3;
/// The last round the reader reached its loop in, and the last round
/// whose BALLOON_RELEASE returned.
static READING: AtomicU64 = AtomicU64::new(0);
static RELEASED: AtomicU64 = AtomicU64::new(0);
/// 1 if the last BALLOON_RELEASE failed (the page stays).
static DROP_FAILED: AtomicU64 = AtomicU64::new(0);
/// Marker reads before the fault, summed per vCPU.
static READS: [AtomicU64; 2] = [const { AtomicU64::new(0) }; 2];

fn dropped_page(round: u64) -> u64 {
    DROPPED + round * 0x1000
}

fn marker(round: u64) -> u64 {
    0x5afe_d00d_0000_0000 | round
}

fn balloon_part() -> Outcome {
    let me = this();
    for round in 1..=DROP_ROUNDS {
        // (dropper, reader's view)
        let (dropper, view) = match round {
            1 => (0, 0),
            2 => (1, 0),
            _ => (0, VIEW_A.load(Ordering::SeqCst)),
        };
        MEET.meet(2 * round - 1)?;
        if me == dropper {
            drop_page(round)?;
        } else {
            read_until_gone(round, view)?;
        }
        MEET.meet(2 * round)?;
    }
    Ok(())
}

fn drop_page(round: u64) -> Outcome {
    let reading = smp::wait_for(|| READING.load(Ordering::SeqCst) >= round);
    check(reading, "the reader never started")?;
    // Let the reader's loop run a while on its cached translation.
    let start = rdtsc();
    while rdtsc() - start < 20_000 {
        core::hint::spin_loop();
    }
    let released = ok(
        hypercall(call::BALLOON_RELEASE, &[gfn(dropped_page(round))]),
        "BALLOON_RELEASE",
    );
    // The reader's loop ends on this either way.
    DROP_FAILED.store(u64::from(released.is_err()), Ordering::SeqCst);
    RELEASED.store(round, Ordering::SeqCst);
    released.map(|_| ())
}

fn read_until_gone(round: u64, view: u64) -> Outcome {
    let page = dropped_page(round);
    if view != 0 {
        vmfunc_to(view)?;
    }
    // One read first: the translation is in this CPU's TLB before the drop.
    let first = probe::read(page);
    READING.store(round, Ordering::SeqCst);
    let r = probe::read_loop(page + 8 * round, &RELEASED, round, marker(round));
    let again = probe::read(page);
    if view != 0 {
        vmfunc_to(0)?;
    }
    READS[this() as usize].fetch_add(r.reads, Ordering::SeqCst);
    check(
        DROP_FAILED.load(Ordering::SeqCst) == 0,
        "the other vCPU's BALLOON_RELEASE failed",
    )?;
    check(
        first == Ok(marker(round)),
        "the page did not hold its marker before the drop",
    )?;
    match r.fault {
        Some(GP) => {}
        Some(_) => return Err("the read of the dropped page raised another fault than #GP"),
        None if r.value == marker(round) => {
            return Err(
                "the reader saw the dropped page's contents after BALLOON_RELEASE returned on the other vCPU",
            );
        }
        None => return Err("the reader read other contents than the dropped page's"),
    }
    check(
        again == Err(GP),
        "a later read of the dropped page did not fault",
    )
}

/// `smp-bench` (figure): the cost of one cross-CPU invalidation. vCPU 0
/// restricts a page of a view (SET_MEM_ACCESS r: a reduced right, so an
/// INVEPT here and a shootdown of the other vCPUs) and gives the right back
/// (no flush) 100 times: first while vCPU 1 still waits for its SIPI (the
/// hypervisor leaves a vCPU in wait-for-SIPI out of shootdowns), then with
/// vCPU 1 started and spinning in guest mode without exits. The difference
/// is the shootdown's kick and wait; NMI exits count the kicks. The first
/// scenario of its run: it starts the APs itself.
pub fn bench(boot: &BootInfo, options: &Options) -> Outcome {
    const N: u64 = 100;
    check(
        !smp::started(),
        "smp-bench measures before the APs start: run it first",
    )?;
    altp2m::enable()?;
    let v = create(access::RWX)?;
    // The view holds the page before it is restricted.
    altp2m::switch(v)?;
    read_u8(BENCH_PAGE);
    altp2m::switch(0)?;
    // The median of N calls (a tick or a log line of the other CPU lands
    // in some), after one call that splits the page's superpage.
    let restrict = |n: usize| -> Result<(u64, u64), &'static str> {
        let mut ticks = [0u64; N as usize];
        let mut before = counts();
        for i in 0..=n {
            let start = rdtsc();
            let r = hypercall(
                call::ALTP2M_SET_MEM_ACCESS,
                &[v, gfn(BENCH_PAGE), access::R],
            );
            let took = rdtsc() - start;
            ok(r, "SET_MEM_ACCESS r")?;
            ok(
                hypercall(
                    call::ALTP2M_SET_MEM_ACCESS,
                    &[v, gfn(BENCH_PAGE), access::RWX],
                ),
                "SET_MEM_ACCESS rwx",
            )?;
            match i {
                0 => before = counts(),
                _ => ticks[i - 1] = took,
            }
        }
        let exits = crate::scenarios::exits_since(&before);
        ticks.sort_unstable();
        Ok((ticks[n / 2], exits[reason::EXCEPTION_OR_NMI]))
    };
    let (alone, nmis_alone) = restrict(N as usize)?;
    two_cpus(boot, options)?;
    SPIN.store(1, Ordering::SeqCst);
    smp::post(1, spin_part)?;
    check(
        smp::wait_for(|| SPIN.load(Ordering::SeqCst) == 2),
        "vCPU 1 never started spinning",
    )?;
    let kicked = restrict(N as usize);
    SPIN.store(0, Ordering::SeqCst);
    let spun = smp::wait(1);
    let (kicked, nmis) = kicked?;
    spun?;
    views_off()?;
    println!(
        "smp-bench: per invalidation (SET_MEM_ACCESS r of a view's page, with INVEPT; median of {N}): {alone} TSC ticks with vCPU 1 waiting for SIPI, {kicked} with vCPU 1 spinning in guest mode ({} NMI exits per call): the shootdown costs {} ticks",
        nmis as f64 / N as f64,
        kicked.saturating_sub(alone)
    );
    let gaps = GAPS.load(Ordering::SeqCst);
    println!(
        "smp-bench: vCPU 1 spent {} TSC ticks out of the guest per exit, {gaps} exits while vCPU 0 made {N} invalidations",
        GAP_TICKS.load(Ordering::SeqCst) / gaps.max(1)
    );
    check(nmis_alone == 0, "a vCPU waiting for SIPI was kicked")?;
    check(
        nmis >= N,
        "fewer NMI exits than invalidations: vCPU 1 was not kicked each time",
    )
}

/// 1: vCPU 1 should spin; 2: it spins; 0: it should stop.
static SPIN: AtomicU64 = AtomicU64::new(0);

/// Gaps vCPU 1's spin loop saw (time out of the guest: an exit) and their
/// TSC ticks in all.
static GAPS: AtomicU64 = AtomicU64::new(0);
static GAP_TICKS: AtomicU64 = AtomicU64::new(0);
/// A round of the spin loop takes a few dozen ticks; an exit thousands.
const GAP: u64 = 400;

/// Spins in guest mode with no exit until told to stop (a load and RDTSC,
/// which does not exit: no PAUSE, no hypercall), counting the gaps in its
/// TSC: the time each exit (a kick, a tick) kept it out of the guest.
fn spin_part() -> Outcome {
    let (mut gaps, mut gap_ticks) = (0, 0);
    SPIN.store(2, Ordering::SeqCst);
    let mut last = rdtsc();
    while SPIN.load(Ordering::SeqCst) != 0 {
        let now = rdtsc();
        if now - last > GAP {
            gaps += 1;
            gap_ticks += now - last;
        }
        last = now;
    }
    GAPS.store(gaps, Ordering::SeqCst);
    GAP_TICKS.store(gap_ticks, Ordering::SeqCst);
    Ok(())
}
