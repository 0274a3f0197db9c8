//! Figures of the platform (scripts/figures, group `platform`): VM exits
//! per second while the guest idles in HLT under a 1 kHz local APIC timer,
//! and the TSC cycles (in Bochs: instructions, the hypervisor's included)
//! one round trip through each exit kind the guest can cause costs.

use core::arch::x86_64::__cpuid;

use hv_abi::{access, call};

use crate::altp2m::{self, NOT_RAM};
use crate::interrupts::{self as irq, TIMER};
use crate::platform::{self, Clocks};
use crate::scenarios::{
    Outcome, check, counts, exits_since, hypercall, hypervisor_present, reason,
};
use crate::{ports, println, probe, rdtsc};

/// `x / y` with two decimals, as text parts.
fn per(x: u64, y: u64) -> (u64, u64) {
    let hundredths = (u128::from(x) * 100 / u128::from(y.max(1))) as u64;
    (hundredths / 100, hundredths % 100)
}

/// Idle for five seconds of guest time (TSC) in HLT, woken by a 1 kHz local
/// APIC timer: the VM exits meanwhile, per second and by reason. The timer
/// and HLT are the guest's, so what remains is the hypervisor's own tick.
pub fn idle_bench(clocks: Clocks) -> Outcome {
    const SECONDS: u64 = 5;
    check(hypervisor_present(), "needs the hypervisor")?;
    platform::start_ticking(clocks, 1000)?;
    let before = counts();
    let ticks = irq::count(TIMER);
    let start = rdtsc();
    while rdtsc() - start < SECONDS * clocks.tsc_hz {
        irq::sti_hlt();
    }
    let elapsed = rdtsc() - start;
    let exits = exits_since(&before);
    platform::stop_ticking();
    let ticks = irq::count(TIMER) - ticks;
    let total: u64 = exits.iter().sum();
    let (whole, frac) = per(total * clocks.tsc_hz, elapsed);
    println!(
        "idle-bench: {} ms of guest time in HLT with a 1000 Hz local APIC timer: {ticks} ticks, {total} VM exits, {whole}.{frac:02} per second",
        elapsed * 1000 / clocks.tsc_hz
    );
    for (r, &n) in exits.iter().enumerate().filter(|(_, n)| **n > 0) {
        let (whole, frac) = per(n * clocks.tsc_hz, elapsed);
        println!(
            "idle-bench: exit reason {r} ({}): {n}, {whole}.{frac:02} per second",
            reason::name(r)
        );
    }
    check(ticks > 0, "the timer never ticked")?;
    check(
        exits[reason::EXTERNAL_INTERRUPT] == 0 && exits[reason::HLT] == 0,
        "the guest's timer or HLT exited",
    )
}

/// Times `n` runs of `exiting` against `n` runs of `baseline` (the same
/// loop without the exit) and prints the difference per exit, with the
/// exits of `expected` reason the hypervisor counted meanwhile.
fn time_exit(
    kind: &str,
    n: u64,
    expected: usize,
    mut exiting: impl FnMut(),
    mut baseline: impl FnMut(),
) {
    let before = counts();
    let start = rdtsc();
    for _ in 0..n {
        exiting();
    }
    let with = rdtsc() - start;
    let exits = exits_since(&before);
    let start = rdtsc();
    for _ in 0..n {
        baseline();
    }
    let without = rdtsc() - start;
    println!(
        "exit-bench: {kind}: {n} round trips, {} {} exits counted: {} TSC cycles each",
        exits[expected],
        reason::name(expected),
        with.saturating_sub(without) / n
    );
}

fn lfence() {
    // SAFETY: LFENCE has no architectural effect; it stands in for the
    // exiting instruction in baselines.
    unsafe { core::arch::asm!("lfence", options(nostack)) };
}

fn rdmsr(msr: u32) -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: reading an MSR the hypervisor emulates for guests (no #GP).
    unsafe {
        core::arch::asm!("rdmsr", in("ecx") msr, out("eax") low, out("edx") high, options(nostack))
    };
    u64::from(high) << 32 | u64::from(low)
}

fn wrmsr(msr: u32, value: u64) {
    // SAFETY: writing an MSR the hypervisor accepts and ignores.
    unsafe {
        core::arch::asm!(
            "wrmsr",
            in("ecx") msr,
            in("eax") value as u32,
            in("edx") (value >> 32) as u32,
            options(nostack)
        )
    };
}

const IA32_MISC_ENABLE: u32 = 0x1a0;
/// A port nothing answers (hidden: all ones).
const HIDDEN_PORT: u16 = 0x510;
const CR0_CD: u64 = 1 << 30;

/// TSC cycles per VM exit round trip, by exit kind: CPUID, VMCALL, RDMSR
/// and WRMSR of emulated MSRs, IN and OUT of a hidden port, MOV to CR0
/// (the CD bit, which the hypervisor owns), an EPT violation that copies a
/// superpage into a fresh view, an EPT violation outside guest memory (#GP
/// injected, one line logged), and the hypervisor's VMX-preemption-timer
/// tick.
pub fn exit_bench(_clocks: Clocks) -> Outcome {
    check(hypervisor_present(), "needs the hypervisor")?;
    irq::disable();
    time_exit(
        "CPUID",
        2000,
        reason::CPUID,
        || {
            core::hint::black_box(__cpuid(hv_abi::CPUID_BASE));
        },
        lfence,
    );
    time_exit(
        "VMCALL (VERSION)",
        2000,
        reason::VMCALL,
        || {
            hypercall(call::VERSION, &[]);
        },
        lfence,
    );
    time_exit(
        "RDMSR (IA32_MISC_ENABLE, emulated)",
        2000,
        reason::RDMSR,
        || {
            core::hint::black_box(rdmsr(IA32_MISC_ENABLE));
        },
        lfence,
    );
    let misc = rdmsr(IA32_MISC_ENABLE);
    time_exit(
        "WRMSR (IA32_MISC_ENABLE, ignored)",
        2000,
        reason::WRMSR,
        || wrmsr(IA32_MISC_ENABLE, misc),
        lfence,
    );
    time_exit(
        "IN (hidden port)",
        2000,
        reason::IO,
        || {
            core::hint::black_box(ports::inb(HIDDEN_PORT));
        },
        lfence,
    );
    time_exit(
        "OUT (hidden port)",
        2000,
        reason::IO,
        || ports::outb(HIDDEN_PORT, 0),
        lfence,
    );
    let cr0 = x86_64::registers::control::Cr0::read_raw();
    let mut flip = false;
    time_exit(
        "MOV to CR0 (CD)",
        2000,
        reason::CR_ACCESS,
        || {
            flip = !flip;
            let value = if flip { cr0 | CR0_CD } else { cr0 };
            probe::write_cr0(value).expect("CR0.CD writes are accepted");
        },
        // Rewriting the value CR0 has (the CD bit as the shadow holds it)
        // does not exit.
        || probe::write_cr0(cr0).expect("CR0 writes are accepted"),
    );
    probe::write_cr0(cr0).map_err(|_| "restoring CR0 faulted")?;
    time_exit(
        "EPT violation outside RAM (#GP injected, logged)",
        20,
        reason::EPT_VIOLATION,
        || {
            let _ = probe::read(NOT_RAM);
        },
        || {
            let _ = probe::read(0x40_0000);
        },
    );
    lazy_copy_cost()?;
    preemption_timer_cost();
    Ok(())
}

/// EPT violations that copy a 2 MiB superpage into a fresh view (one per
/// superpage touched), against the same touches in view 0.
fn lazy_copy_cost() -> Outcome {
    const ROUNDS: u64 = 8;
    let superpages = altp2m::LAZY_MIB / 2;
    let touch = || {
        let start = rdtsc();
        for i in 0..superpages {
            altp2m::read_u8(altp2m::LAZY + (i << 21));
        }
        rdtsc() - start
    };
    altp2m::enable()?;
    let mut with = 0;
    let mut copies = 0;
    for _ in 0..ROUNDS {
        let view = altp2m::create(access::RWX)?;
        altp2m::switch(view)?;
        let before = counts();
        with += touch();
        copies += exits_since(&before)[reason::EPT_VIOLATION];
        altp2m::switch(0)?;
        altp2m::ok(
            hypercall(call::ALTP2M_DESTROY_VIEW, &[view]),
            "DESTROY_VIEW",
        )?;
    }
    let without: u64 = (0..ROUNDS).map(|_| touch()).sum();
    let n = ROUNDS * superpages;
    println!(
        "exit-bench: EPT violation, lazy copy of a superpage into a fresh view: {n} round trips, {copies} EPT violation exits counted: {} TSC cycles each",
        with.saturating_sub(without) / n
    );
    altp2m::disable()
}

/// The hypervisor's tick, seen from a guest spinning on RDTSC with
/// interrupts off: the tick's exits are the only gaps in the TSC it sees.
fn preemption_timer_cost() {
    const GAPS: usize = 2;
    /// A loop iteration takes about ten cycles; an exit hundreds.
    const GAP: u64 = 100;
    let before = counts();
    let mut gaps = [0u64; GAPS];
    let mut found = 0;
    let mut iterations = 0u64;
    let start = rdtsc();
    let mut last = start;
    while found < GAPS && last - start < 4 << 28 {
        let now = rdtsc();
        if now - last > GAP {
            gaps[found] = now - last;
            found += 1;
        }
        last = now;
        iterations += 1;
    }
    let exits = exits_since(&before);
    let gap_total: u64 = gaps.iter().sum();
    let loop_cost = (last - start - gap_total) / iterations.max(1);
    let each = gaps[..found].iter().map(|g| g - loop_cost).sum::<u64>() / found.max(1) as u64;
    println!(
        "exit-bench: VMX-preemption timer (the hypervisor's tick): {found} round trips, {} {} exits counted: {each} TSC cycles each",
        exits[reason::PREEMPTION_TIMER],
        reason::name(reason::PREEMPTION_TIMER)
    );
}
