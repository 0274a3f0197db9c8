//! Scenarios for the guest's platform (docs/platform.md): its timers and
//! interrupts run without the hypervisor (the local APIC timer, the PIT
//! through the 8259, HLT, self-IPIs), NMIs are forwarded, interrupts are not
//! lost while the hypervisor handles exits, IA32_APIC_BASE is virtualized,
//! the ACPI tables describe the guest, Multiboot modules arrive intact, and
//! a reset or ACPI S5 ends the run. Most also run on bare metal (booted by
//! GRUB without the hypervisor), which tells hypervisor bugs from guest
//! bugs; those that need the hypervisor say so.
//!
//! Time is TSC cycles. In Bochs the TSC and the local APIC timer's clock
//! both count emulated instructions (`ips=200000000` in the harness), so
//! the defaults are 200 MHz for both; `tsc-hz=` and `apic-hz=` say
//! otherwise.

use core::sync::atomic::Ordering;

use hv_abi::{access, call, feature};
use hv_boot::bootinfo::{BootInfo, RegionKind};

use crate::altp2m::{self, NOT_RAM, ok};
use crate::interrupts::{self as irq, IPI, NMI, PIC_BASE, TIMER, VE};
use crate::scenarios::{
    Outcome, check, counts, exits_since, hypercall, hypervisor_present, offers, reason, skip,
};
use crate::{apic, firmware, legacy, ports, println, probe, rdtsc};

/// The rates the scenarios' time is measured in.
#[derive(Clone, Copy, Debug)]
pub struct Clocks {
    /// TSC cycles per second.
    pub tsc_hz: u64,
    /// Local APIC timer input clocks per second (before its divider).
    pub apic_hz: u64,
}

impl Clocks {
    /// Bochs as the harness runs it: TSC and APIC timer count emulated
    /// instructions, 200 million a second.
    pub const BOCHS: Self = Self {
        tsc_hz: 200_000_000,
        apic_hz: 200_000_000,
    };

    /// TSC cycles in `clocks` APIC timer clocks.
    pub fn tsc_of_apic(&self, clocks: u64) -> u64 {
        (u128::from(clocks) * u128::from(self.tsc_hz) / u128::from(self.apic_hz)) as u64
    }

    /// APIC timer clocks (divide by 1) in a period of `hz`.
    pub fn apic_period(&self, hz: u64) -> u32 {
        (self.apic_hz / hz).clamp(1, u64::from(u32::MAX)) as u32
    }

    pub fn tsc_of_ms(&self, ms: u64) -> u64 {
        self.tsc_hz * ms / 1000
    }
}

/// A stack in a 2 MiB page nothing else uses (24..26 MiB of guest RAM):
/// in a fresh altp2m view it is not copied yet, so delivering an event onto
/// it is an EPT violation.
const ALT_STACK_TOP: u64 = 0x190_0000;
/// Where `apic-base` moves the local APIC: guest RAM (28 MiB), in a 2 MiB
/// page nothing else uses.
const RELOCATED_APIC: u64 = 0x1c0_0000;

const GP: u8 = 13;
const CR0_NW: u64 = 1 << 29;
const CR0_CD: u64 = 1 << 30;

/// `n` within `expected` ± 20%.
fn within_a_fifth(n: u64, expected: u64) -> bool {
    n * 5 >= expected * 4 && n * 5 <= expected * 6
}

/// Starts the local APIC's periodic timer at `hz` (divide by 1), with
/// interrupts on, and waits for its first tick. Returns the period in TSC
/// cycles.
pub fn start_ticking(clocks: Clocks, hz: u64) -> Result<u64, &'static str> {
    apic::init();
    let initial = clocks.apic_period(hz);
    let period = clocks.tsc_of_apic(u64::from(initial));
    let from = irq::count(TIMER);
    apic::timer_start(TIMER, initial, 1, true);
    irq::enable();
    check(
        irq::wait_for(TIMER, from, 1, 10 * period),
        "the local APIC timer never fired",
    )?;
    Ok(period)
}

pub fn stop_ticking() {
    irq::disable();
    apic::timer_stop();
}

/// Counts `vector`'s arrivals over `cycles` TSC cycles from its next
/// arrival (interrupts on). Returns the count and the TSC span between the
/// first and last arrival counted.
fn count_over(vector: u8, cycles: u64, timeout: u64) -> Result<(u64, u64), &'static str> {
    let first = irq::count(vector);
    check(
        irq::wait_for(vector, first, 1, timeout),
        "the interrupt never arrived",
    )?;
    let (c0, t0) = (irq::count(vector), irq::last_tsc(vector));
    while rdtsc() - t0 < cycles {
        core::hint::spin_loop();
    }
    let (c1, t1) = (irq::count(vector), irq::last_tsc(vector));
    Ok((c1 - c0, t1 - t0))
}

/// The MADT lists exactly one enabled processor, the guest's (its local
/// APIC id, as the APIC and CPUID give it), the local APIC where
/// IA32_APIC_BASE says, and I/O APICs that answer; the FADT names a PM1a
/// control block and the DSDT a `\_S5` sleep type.
pub fn madt(boot: &BootInfo) -> Outcome {
    let d = firmware::read(boot)?;
    apic::init();
    let id = apic::id();
    let initial_id = (core::arch::x86_64::__cpuid(1).ebx >> 24) as u8;
    let base = apic::base_msr() & !0xfff;
    println!(
        "madt: tables through {}: local APIC {:#x}, processors {:?}, I/O APICs {:x?}",
        d.found_by, d.local_apic, d.cpus, d.io_apics
    );
    println!(
        "madt: PM1a_CNT port {:x?}, \\_S5 SLP_TYPa {:?}; this CPU: APIC id {id} (CPUID {initial_id}), base {base:#x}",
        d.pm1a_control, d.s5_sleep_type
    );
    let mut enabled = d.cpus.iter().filter(|c| c.enabled);
    let only = enabled
        .next()
        .ok_or("the MADT lists no enabled processor")?;
    check(
        enabled.next().is_none(),
        "the MADT lists more than one enabled processor",
    )?;
    check(
        only.apic_id == id,
        "the MADT's processor is not this CPU's APIC id",
    )?;
    check(id == initial_id, "the APIC id differs from CPUID's")?;
    check(
        d.local_apic == base,
        "the MADT's local APIC address is not IA32_APIC_BASE's",
    )?;
    check(!d.io_apics.is_empty(), "the MADT lists no I/O APIC")?;
    for &(io_id, address) in &d.io_apics {
        let version = apic::io_apic_read(u64::from(address), 1);
        let answered_id = (apic::io_apic_read(u64::from(address), 0) >> 24) & 0xf;
        println!(
            "madt: I/O APIC {io_id} at {address:#x}: version {:#x}, {} redirection entries, id register {answered_id}",
            version & 0xff,
            (version >> 16 & 0xff) + 1
        );
        check(
            (0x10..=0x2f).contains(&(version & 0xff)),
            "an I/O APIC does not answer at its MADT address",
        )?;
        check(
            answered_id == u32::from(io_id) & 0xf,
            "an I/O APIC's id is not the MADT's",
        )?;
    }
    check(
        d.pm1a_control.is_some(),
        "the FADT names no PM1a control port",
    )?;
    check(d.s5_sleep_type.is_some(), "the DSDT has no \\_S5 package")
}

/// The local APIC timer, periodic at 1 kHz (divide by 16), fires at that
/// rate against the TSC (±20%); one-shot, it fires once, after its count.
pub fn lapic_timer(clocks: Clocks) -> Outcome {
    const HZ: u64 = 1000;
    const DIVIDE: u32 = 16;
    apic::init();
    let initial = clocks.apic_period(HZ) / DIVIDE;
    let period = clocks.tsc_of_apic(u64::from(initial) * u64::from(DIVIDE));
    apic::timer_start(TIMER, initial, DIVIDE, true);
    irq::enable();
    let interval = clocks.tsc_of_ms(50);
    let counted = count_over(TIMER, interval, 10 * period);
    stop_ticking();
    let (n, span) = counted.map_err(|_| "the periodic timer never fired")?;
    let expected = interval / period;
    println!(
        "lapic-timer: periodic {HZ} Hz (initial count {initial}, divide by {DIVIDE}): {n} interrupts in {interval} TSC cycles, expected {expected}; measured period {} cycles (programmed {period})",
        span / n.max(1)
    );
    check(
        within_a_fifth(n, expected),
        "the periodic timer does not fire at its programmed rate",
    )?;
    // One-shot: 2 ms, divide by 1.
    let initial = clocks.apic_period(500);
    let due = clocks.tsc_of_apic(u64::from(initial));
    let from = irq::count(TIMER);
    let armed = rdtsc();
    apic::timer_start(TIMER, initial, 1, false);
    irq::enable();
    let fired = irq::wait_for(TIMER, from, 1, 10 * due);
    irq::spin(3 * due);
    irq::disable();
    let (after, arrived) = (irq::count(TIMER) - from, irq::last_tsc(TIMER));
    let remaining = apic::read(apic::TIMER_CURRENT);
    apic::timer_stop();
    check(fired, "the one-shot timer never fired")?;
    let delay = arrived - armed;
    println!(
        "lapic-timer: one-shot of {initial} clocks fired after {delay} TSC cycles (expected {due}), {after} interrupt(s) in 4 times that, current count then {remaining}"
    );
    check(after == 1, "the one-shot timer fired more than once")?;
    check(remaining == 0, "the one-shot count did not stop at 0")?;
    check(
        within_a_fifth(delay, due),
        "the one-shot timer did not fire after its count",
    )?;
    check(apic::error_status() == 0, "the local APIC reports errors")
}

/// PIT channel 0 at 1 kHz, through the master 8259 (IRQ 0 at vector 0x20)
/// and LINT0 in ExtINT mode: it fires at its rate against the TSC (±20%).
pub fn pit(clocks: Clocks) -> Outcome {
    apic::init();
    legacy::pic_init();
    let millihertz = legacy::pit_periodic(1000);
    legacy::pic_unmask(0);
    irq::enable();
    let interval = clocks.tsc_of_ms(50);
    let period = clocks.tsc_hz * 1000 / millihertz;
    let counted = count_over(PIC_BASE, interval, 10 * period);
    irq::disable();
    legacy::pit_stop();
    legacy::pic_mask_all();
    let (n, span) = counted.map_err(|_| "IRQ 0 never arrived")?;
    let expected = interval / period;
    println!(
        "pit: channel 0 at {}.{:03} Hz through the 8259: {n} IRQ 0s in {interval} TSC cycles, expected {expected}; measured period {} cycles (nominal {period})",
        millihertz / 1000,
        millihertz % 1000,
        span / n.max(1)
    );
    check(
        within_a_fifth(n, expected),
        "the PIT's IRQ 0 does not fire at its rate",
    )
}

/// STI; HLT sleeps until the next timer tick and no longer, exactly one
/// tick each time; under the hypervisor without a VM exit (HLT is native).
pub fn hlt_wakes(clocks: Clocks) -> Outcome {
    const ROUNDS: u64 = 20;
    let period = start_ticking(clocks, 1000)?;
    let hv = hypervisor_present();
    let before = hv.then(counts);
    let mut longest = 0;
    let mut wrong = 0;
    for _ in 0..ROUNDS {
        irq::disable();
        let (from, slept) = (irq::count(TIMER), rdtsc());
        irq::sti_hlt();
        longest = longest.max(rdtsc() - slept);
        if irq::count(TIMER) != from + 1 {
            wrong += 1;
        }
    }
    let exits = before.as_ref().map(exits_since);
    stop_ticking();
    let total: u64 = exits.iter().flatten().sum();
    let halts = exits.map_or(0, |e| e[reason::HLT]);
    println!(
        "hlt-wakes: {ROUNDS} HLTs, {wrong} not woken by exactly one tick; longest sleep {longest} TSC cycles (period {period}); VM exits meanwhile: {total}, HLT exits {halts}"
    );
    check(wrong == 0, "an HLT did not end with exactly one tick")?;
    check(longest <= period * 3 / 2, "an HLT slept past the next tick")?;
    check(halts == 0, "HLT exited to the hypervisor")?;
    check(total <= 2, "the guest's idle HLTs caused VM exits")
}

/// Delivers the IPI just sent while interrupts were off: it waits in the
/// IRR, then arrives once when they are turned on.
fn deliver_pending_ipi(sent: bool) -> Outcome {
    check(sent, "the local APIC never sent the IPI")?;
    check(apic::requested(IPI), "the IPI is not pending in the IRR")?;
    let from = irq::count(IPI);
    irq::enable();
    irq::spin(10_000);
    irq::disable();
    check(irq::count(IPI) == from + 1, "the IPI did not arrive once")
}

/// A fixed IPI to itself, through the self shorthand and to its own APIC id.
pub fn self_ipi() -> Outcome {
    apic::init();
    irq::disable();
    let id = apic::id();
    deliver_pending_ipi(apic::send_ipi(0, apic::SHORTHAND_SELF | u32::from(IPI)))?;
    deliver_pending_ipi(apic::send_ipi(id, u32::from(IPI)))?;
    println!(
        "self-ipi: vector {IPI:#x} through the self shorthand and to APIC id {id}: each arrived once"
    );
    check(apic::error_status() == 0, "the local APIC reports errors")
}

/// An NMI IPI to its own APIC id (the self shorthand is invalid for NMIs)
/// arrives at vector 2 exactly once; under the hypervisor it exits and is
/// forwarded.
pub fn nmi() -> Outcome {
    apic::init();
    let hv = hypervisor_present();
    let before = hv.then(counts);
    let from = irq::count(NMI);
    check(
        apic::send_nmi(apic::id()),
        "the local APIC never sent the NMI",
    )?;
    let arrived = irq::wait_for(NMI, from, 1, 10_000_000);
    irq::spin(10_000_000);
    let n = irq::count(NMI) - from;
    let exits = before.as_ref().map(exits_since);
    let nmi_exits = exits.map_or(0, |e| e[reason::EXCEPTION_OR_NMI]);
    println!(
        "nmi: NMI IPI to APIC id {}: {n} NMI(s) at vector 2; NMI exits {nmi_exits}",
        apic::id()
    );
    check(arrived, "the NMI never arrived")?;
    check(n == 1, "the NMI arrived more than once")?;
    check(
        !hv || nmi_exits >= 1,
        "the NMI did not go through the hypervisor",
    )
}

/// Leaves the local APIC timer ticking at 1 kHz with interrupts on, for
/// the scenarios after it (the isolation sweep with interrupts arriving).
pub fn ticking(clocks: Clocks) -> Outcome {
    let period = start_ticking(clocks, 1000)?;
    println!("ticking: the local APIC timer ticks every {period} TSC cycles from now on");
    Ok(())
}

/// Waits on `top`'s stack, interrupts on, until the timer's next tick
/// arrives (delivered onto that stack) or `rounds` spins pass. Returns
/// whether it arrived. Nothing but the delivery touches the stack.
fn wait_on_stack(top: u64, rounds: u64) -> bool {
    let counter = irq::counter(TIMER);
    let from = counter.load(Ordering::SeqCst);
    // SAFETY: `top` is the end of guest RAM nothing else uses; the handler
    // runs on it and returns; RSP is restored before anything else runs.
    unsafe {
        core::arch::asm!(
            "mov r12, rsp",
            "mov rsp, {top}",
            "sti",
            "2:",
            "cmp qword ptr [{counter}], {from}",
            "jne 3f",
            "pause",
            "dec {rounds}",
            "jnz 2b",
            "3:",
            "cli",
            "mov rsp, r12",
            top = in(reg) top,
            counter = in(reg) counter.as_ptr(),
            from = in(reg) from,
            rounds = inout(reg) rounds => _,
            out("r12") _,
        )
    };
    counter.load(Ordering::SeqCst) != from
}

/// A periodic timer (50 Hz) keeps firing while the guest makes the
/// hypervisor work: each round makes a fresh altp2m view, switches to it,
/// touches memory it must copy lazily, makes a stray access (an EPT
/// violation, #GP, and a line in the hypervisor's log), and waits for the
/// next tick on a stack that is not copied yet, so the tick's delivery is
/// itself cut short by an EPT violation and must be delivered again. Every
/// tick must arrive: as many interrupts as periods passed, none lost. (The
/// period is longer than any of these exits, the logged one included: a
/// tick that finds the previous one still pending merges with it, as on
/// hardware, and that is no loss of the hypervisor's.) Needs the
/// hypervisor.
pub fn irq_during_exit(clocks: Clocks) -> Outcome {
    check(hypervisor_present(), "needs the hypervisor")?;
    altp2m::enable()?;
    let period = start_ticking(clocks, 50)?;
    let before = counts();
    let (c0, t0) = (irq::count(TIMER), irq::last_tsc(TIMER));
    let mut rounds = 0u64;
    let mut stray = 0u64;
    let result = (|| {
        while rdtsc() - t0 < 50 * period {
            let view = altp2m::create(access::RWX)?;
            altp2m::switch(view)?;
            for superpage in 0..altp2m::LAZY_MIB / 2 {
                altp2m::read_u8(altp2m::LAZY + (superpage << 21));
            }
            if probe::read(NOT_RAM) == Err(GP) {
                stray += 1;
            }
            let woken = wait_on_stack(ALT_STACK_TOP, 10 * period);
            irq::enable();
            altp2m::switch(0)?;
            check(
                woken,
                "a tick delivered onto an uncopied stack never arrived",
            )?;
            ok(
                hypercall(call::ALTP2M_DESTROY_VIEW, &[view]),
                "DESTROY_VIEW",
            )?;
            rounds += 1;
        }
        Ok(())
    })();
    // Up to the last tick counted: as many ticks as whole periods since t0.
    irq::disable();
    let (c1, t1) = (irq::count(TIMER), irq::last_tsc(TIMER));
    let exits = exits_since(&before);
    apic::timer_stop();
    let stuck = apic::in_service(TIMER);
    result?;
    let (n, periods) = (c1 - c0, (t1 - t0 + period / 2) / period);
    println!(
        "irq-during-exit: {rounds} rounds (fresh view, lazy copies, {stray} stray accesses, a tick delivered onto an uncopied stack): {n} ticks over {periods} periods; exits: {} EPT violation, {} VMCALL, {} exception or NMI",
        exits[reason::EPT_VIOLATION],
        exits[reason::VMCALL],
        exits[reason::EXCEPTION_OR_NMI]
    );
    check(rounds >= 10, "too few rounds to say anything")?;
    check(stray == rounds, "a stray access was not refused with #GP")?;
    check(
        exits[reason::EPT_VIOLATION] >= rounds * (altp2m::LAZY_MIB / 2 + 2),
        "fewer EPT-violation exits than the rounds must cause",
    )?;
    check(
        !stuck,
        "a timer interrupt is still in service (lost its handler)",
    )?;
    check(n == periods, "timer interrupts were lost during exits")?;
    altp2m::disable()
}

/// One ordering case of `ve-and-timer`: with a timer interrupt pending
/// (interrupts off, the one-shot timer expired), `code` turns interrupts on
/// and writes to `target`, which view `view` makes read-only with #VE
/// allowed. Returns the order in which #VE and the interrupt arrived, and
/// the EPT-violation exits meanwhile.
fn ve_order(
    view: u64,
    target: u64,
    code: fn(u64),
) -> Result<(heapless::Vec<u8, 16>, u64), &'static str> {
    let page = altp2m::gfn(target);
    ok(
        hypercall(call::ALTP2M_SET_MEM_ACCESS, &[view, page, access::RX]),
        "making the page read-only",
    )?;
    ok(
        hypercall(call::ALTP2M_SET_SUPPRESS_VE, &[view, page, 0]),
        "allowing #VE",
    )?;
    altp2m::fix_ve_in(view);
    altp2m::vmfunc_to(view)?;
    // Copied into the view beforehand, so that the only EPT violation left
    // is the one `code` may cause: the page, the APIC, the #VE page.
    altp2m::read_u8(target);
    apic::read(apic::VERSION);
    altp2m::read_u8(altp2m::VE_PAGE);
    irq::disable();
    apic::timer_start(TIMER, 100, 1, false);
    let pending = (0..100_000).any(|_| apic::requested(TIMER));
    let before = counts();
    irq::clear_order();
    if pending {
        code(target);
    }
    irq::disable();
    let exits = exits_since(&before);
    altp2m::vmfunc_to(0)?;
    check(pending, "the one-shot timer never became pending")?;
    Ok((irq::order(), exits[reason::EPT_VIOLATION]))
}

/// STI; NOP; write: the interrupt is recognized at the boundary after the
/// NOP, before the write faults.
fn interrupt_then_write(target: u64) {
    // SAFETY: `target` is guest RAM the scenario owns; the #VE handler
    // grants the write, which then completes.
    unsafe { core::arch::asm!("sti", "nop", "mov byte ptr [{t}], 1", "cli", t = in(reg) target) };
}

/// STI; write: the write runs in the STI shadow, where the interrupt is
/// blocked; its #VE is delivered first, the interrupt after the handler.
fn write_in_sti_shadow(target: u64) {
    // SAFETY: as for `interrupt_then_write`.
    unsafe { core::arch::asm!("sti", "mov byte ptr [{t}], 1", "cli", t = in(reg) target) };
}

/// As `write_in_sti_shadow`, on a stack the view has not copied: the #VE's
/// delivery is cut short by an EPT violation, and the hypervisor must
/// deliver the #VE again before the interrupt.
fn write_in_sti_shadow_on_fresh_stack(target: u64) {
    // SAFETY: as for `interrupt_then_write`; the #VE handler runs on the
    // spare stack, RSP is restored right after.
    unsafe {
        core::arch::asm!(
            "mov r12, rsp",
            "mov rsp, {top}",
            "sti",
            "mov byte ptr [{t}], 1",
            "cli",
            "mov rsp, r12",
            t = in(reg) target,
            top = in(reg) ALT_STACK_TOP,
            out("r12") _,
        )
    };
}

/// A #VE and a pending timer interrupt together arrive in the SDM's order
/// (Vol. 3A 6.9, priority among simultaneous events): at an instruction
/// boundary a pending, unblocked maskable interrupt goes before the faults
/// of the next instruction, so an interrupt pending when interrupts come on
/// runs before the write that raises #VE; a write in the STI shadow (the
/// interrupt blocked) raises its #VE first and the interrupt is delivered
/// after the #VE handler returns. The second case again with the #VE's own
/// delivery cut short by an EPT violation (a fresh view, an uncopied stack):
/// the hypervisor must deliver the #VE again, still first. Needs the
/// hypervisor.
pub fn ve_and_timer() -> Outcome {
    check(hypervisor_present(), "needs the hypervisor")?;
    if !offers(feature::VE) {
        return skip(
            "#VE is not offered (CPUID leaf 0x40000001): no #VE to order against interrupts",
        );
    }
    const TARGET: u64 = 0x40_6000;
    altp2m::enable()?;
    apic::init();
    ok(
        hypercall(
            call::ALTP2M_VCPU_ENABLE_NOTIFY,
            &[altp2m::gfn(altp2m::VE_PAGE)],
        ),
        "ENABLE_NOTIFY",
    )?;
    let view = altp2m::create(access::RWX)?;
    let ves = altp2m::ve_count();
    let (first, _) = ve_order(view, TARGET, interrupt_then_write)?;
    let (shadow, _) = ve_order(view, TARGET, write_in_sti_shadow)?;
    let fresh = altp2m::create(access::RWX)?;
    let (cut_short, violations) = ve_order(fresh, TARGET, write_in_sti_shadow_on_fresh_stack)?;
    let delivered = altp2m::ve_count() - ves;
    println!(
        "ve-and-timer: pending interrupt, then a write raising #VE: {first:?}; the write in the STI shadow: {shadow:?}; the same with the #VE's delivery cut short ({violations} EPT-violation exits): {cut_short:?} (vector {TIMER:#x} is the timer, {VE} #VE)"
    );
    check(delivered == 3, "not one #VE per write")?;
    check(
        first[..] == [TIMER, VE],
        "the pending interrupt did not go before the faulting write",
    )?;
    check(
        shadow[..] == [VE, TIMER],
        "the #VE of a write in the STI shadow did not go before the interrupt",
    )?;
    check(violations >= 1, "the #VE's delivery was not cut short")?;
    check(
        cut_short[..] == [VE, TIMER],
        "a #VE delivered again after an exit did not go before the interrupt",
    )?;
    ok(
        hypercall(call::ALTP2M_VCPU_DISABLE_NOTIFY, &[]),
        "DISABLE_NOTIFY",
    )?;
    apic::timer_stop();
    altp2m::disable()
}

/// Fills the page at `address` with a pattern, or checks it.
fn pattern(address: u64, check_only: bool) -> bool {
    (0..1024u64).all(|i| {
        let word = (address + 4 * i) as *mut u32;
        let value = 0xa5a5_0000 | i as u32;
        // SAFETY: a guest RAM page the scenario owns, identity-mapped.
        unsafe {
            if !check_only {
                word.write_volatile(value);
            }
            word.read_volatile() == value
        }
    })
}

/// IA32_APIC_BASE under the hypervisor: disabling the APIC makes its page
/// read all ones and stops its timer; enabling brings it back; relocating
/// it (onto guest RAM) makes it answer at the new base while the old page
/// is not mapped any more (an access is an EPT violation, #GP), and moving
/// it back restores the RAM it covered. Afterwards the hypervisor's own
/// tick (the VMX-preemption timer) still runs. Needs the hypervisor.
pub fn apic_base(clocks: Clocks) -> Outcome {
    check(hypervisor_present(), "needs the hypervisor")?;
    let period = start_ticking(clocks, 1000)?;
    let msr = apic::base_msr();
    let base = apic::base();
    let (version, id) = (apic::read(apic::VERSION), apic::id());
    let result = (|| {
        // Disabled right after a tick (none pending or in service): all
        // ones, and no ticks from then on (the exit that disables it is
        // long, the hypervisor logs a line, but the APIC is masked first).
        let from = irq::count(TIMER);
        check(
            irq::wait_for(TIMER, from, 1, 10 * period),
            "the timer stopped before the APIC was disabled",
        )?;
        let from = irq::count(TIMER);
        apic::set_base_msr(msr & !apic::BASE_ENABLE).map_err(|_| "disabling faulted")?;
        let disabled_reads = apic::read_at(base, apic::VERSION);
        irq::spin(10 * period);
        let while_disabled = irq::count(TIMER) - from;
        apic::set_base_msr(msr).map_err(|_| "re-enabling faulted")?;
        let owed = irq::pay_owed_eois();
        let svr = apic::read(apic::SVR);
        println!(
            "apic-base: disabled: the page read {disabled_reads:#x}, {while_disabled} ticks in 10 periods; enabled again: version {:#x}, SVR {svr:#x}, {owed} EOI(s) owed",
            apic::read(apic::VERSION)
        );
        check(
            disabled_reads == u32::MAX,
            "a disabled APIC's page does not read all ones",
        )?;
        check(
            while_disabled == 0,
            "the timer ticked while the APIC was disabled",
        )?;
        check(
            apic::read(apic::VERSION) == version,
            "the re-enabled APIC does not answer",
        )?;
        start_ticking(clocks, 1000).map_err(|_| "no ticks after re-enabling")?;
        // Relocated onto RAM.
        pattern(RELOCATED_APIC, false);
        apic::set_base_msr(RELOCATED_APIC | (msr & 0xfff)).map_err(|_| "relocating faulted")?;
        let (moved_version, moved_id) = (apic::read(apic::VERSION), apic::id());
        let old = probe::read(base + u64::from(apic::VERSION));
        let from = irq::count(TIMER);
        let ticks = irq::wait_for(TIMER, from, 3, 10 * period);
        println!(
            "apic-base: relocated to {RELOCATED_APIC:#x}: version {moved_version:#x}, id {moved_id}; the old page: {old:x?}; ticks there: {ticks}"
        );
        check(
            moved_version == version && moved_id == id,
            "the APIC does not answer at its new base",
        )?;
        check(old == Err(GP), "the old APIC page is still mapped")?;
        check(ticks, "no ticks at the new base")?;
        apic::set_base_msr(msr).map_err(|_| "moving back faulted")?;
        check(
            apic::read(apic::VERSION) == version,
            "the APIC does not answer at its old base again",
        )?;
        check(
            pattern(RELOCATED_APIC, true),
            "the RAM under the relocated APIC did not come back",
        )?;
        // The hypervisor's tick: over three of its periods, with the guest
        // idle in HLT between its own ticks.
        let before = counts();
        let start = rdtsc();
        while rdtsc() - start < 3 << 28 {
            irq::sti_hlt();
        }
        let exits = exits_since(&before);
        println!(
            "apic-base: the hypervisor's tick afterwards: {} VMX-preemption-timer exits in {} TSC cycles",
            exits[reason::PREEMPTION_TIMER],
            rdtsc() - start
        );
        check(
            exits[reason::PREEMPTION_TIMER] >= 2,
            "the hypervisor's tick (VMX-preemption timer) stopped",
        )
    })();
    stop_ticking();
    result
}

/// What the `modules` scenario expects of the first Multiboot module:
/// `module=SIZE:CHECKSUM[:WORD]`, the checksum in hex
/// ([`hv_abi::display_checksum`], FNV-1a), WORD a word of its command line.
#[derive(Clone, Debug)]
pub struct ModuleSpec {
    pub size: u64,
    pub checksum: u64,
    pub word: Option<heapless::String<64>>,
}

impl ModuleSpec {
    pub fn parse(value: &str) -> Result<Self, &'static str> {
        let mut parts = value.split(':');
        let size = parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or("bad size")?;
        let checksum = parts
            .next()
            .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
            .ok_or("bad checksum")?;
        let word = match parts.next() {
            Some(w) => Some(heapless::String::try_from(w).map_err(|_| "word too long")?),
            None => None,
        };
        Ok(Self {
            size,
            checksum,
            word,
        })
    }
}

/// The first Multiboot module arrives intact: its size and checksum as the
/// command line gives them, its command line, page-aligned in RAM.
pub fn modules(boot: &BootInfo, spec: Option<&ModuleSpec>) -> Outcome {
    let spec = spec.ok_or("no module=SIZE:CHECKSUM option")?;
    let m = boot.modules.first().ok_or("no module")?;
    let size = m.end - m.start;
    // SAFETY: the loader placed the module there, in the guest's RAM,
    // identity-mapped; nothing writes it.
    let bytes = unsafe { core::slice::from_raw_parts(m.start as *const u8, size as usize) };
    let checksum = hv_abi::display_checksum(bytes.iter().copied());
    println!(
        "modules: {} module(s) ({:?}); the first at {:#x}..{:#x}: {size} bytes, checksum {checksum:#x}, command line '{}'",
        boot.modules.len(),
        boot.loader,
        m.start,
        m.end,
        m.cmdline
    );
    let in_ram = boot
        .regions
        .iter()
        .any(|r| r.kind == RegionKind::Available && r.start <= m.start && m.end <= r.end);
    check(in_ram, "the module is not in RAM the memory map gives")?;
    check(m.start % 4096 == 0, "the module is not page-aligned")?;
    check(size == spec.size, "the module's size is wrong")?;
    check(checksum == spec.checksum, "the module's contents differ")?;
    match &spec.word {
        Some(word) => check(
            m.cmdline
                .split_ascii_whitespace()
                .any(|w| w == word.as_str()),
            "the module's command line is wrong",
        ),
        None => Ok(()),
    }
}

/// CR0.CD and NW (issue 10): under the hypervisor the guest starts with
/// both clear (firmware may leave them set: Bochs's BIOS does), and MOV
/// CR0 setting and clearing them reads back what was written; NW without
/// CD is refused (#GP), as the SDM says.
pub fn cr0() -> Outcome {
    let start = crate::START_CR0.load(Ordering::Relaxed);
    let cr0 = x86_64::registers::control::Cr0::read_raw();
    let clear = cr0 & !(CR0_CD | CR0_NW);
    let mut read_back = [0u64; 4];
    let values = [clear, clear | CR0_CD, clear | CR0_CD | CR0_NW, clear];
    for (value, seen) in values.iter().zip(read_back.iter_mut()) {
        probe::write_cr0(*value).map_err(|_| "MOV CR0 faulted")?;
        *seen = x86_64::registers::control::Cr0::read_raw();
    }
    let nw_alone = probe::write_cr0(clear | CR0_NW);
    let _ = probe::write_cr0(cr0);
    println!(
        "cr0: at start {start:#x}; wrote {values:x?}, read {read_back:x?}; NW without CD: {nw_alone:?}"
    );
    check(
        !hypervisor_present() || start & (CR0_CD | CR0_NW) == 0,
        "the guest started with CR0.CD or NW set",
    )?;
    check(
        read_back == values,
        "CR0 did not read back what was written",
    )?;
    check(nw_alone == Err(GP), "NW without CD was accepted")
}

/// How long a scenario that ends the run waits for the end.
const END_WAIT: u64 = 100_000_000;

fn still_running() -> Outcome {
    irq::spin(END_WAIT);
    Err("still running")
}

/// Command 0xFE to the i8042 pulses the reset line: the run ends (status 5
/// under the hypervisor; bare metal reboots).
pub fn reset_i8042() -> Outcome {
    println!("reset-i8042: pulsing the reset line (command 0xfe to port 0x64)");
    // Wait for the controller's input buffer to empty, as a driver must.
    let _ = (0..100_000).any(|_| ports::inb(0x64) & 2 == 0);
    crate::console::drain();
    ports::outb(0x64, 0xfe);
    still_running()
}

/// The reset control register: system reset, then CPU reset.
pub fn reset_cf9() -> Outcome {
    println!("reset-cf9: writing 0x02 then 0x06 to port 0xcf9");
    crate::console::drain();
    ports::outb(0xcf9, 0x02);
    ports::outb(0xcf9, 0x06);
    still_running()
}

/// System control port A: a rising edge of bit 0 is a fast reset.
pub fn reset_92() -> Outcome {
    let value = ports::inb(0x92);
    println!("reset-92: port 0x92 reads {value:#x}; raising bit 0");
    crate::console::drain();
    ports::outb(0x92, value & !1);
    ports::outb(0x92, value | 1);
    still_running()
}

/// ACPI S5 the way an OS powers off: SLP_TYPa from `\_S5` with SLP_EN, to
/// the PM1a control port the FADT names.
pub fn acpi_s5(boot: &BootInfo) -> Outcome {
    let d = firmware::read(boot)?;
    let port = d
        .pm1a_control
        .ok_or("the FADT names no PM1a control port")?;
    let sleep_type = d.s5_sleep_type.ok_or("the DSDT has no \\_S5")?;
    // As an OS does: keep the register's other bits (SCI_EN), set SLP_TYP
    // and SLP_EN.
    let current = ports::inw(port);
    let value = current & !(7 << 10) | u16::from(sleep_type & 7) << 10 | 1 << 13;
    println!(
        "acpi-s5: PM1a_CNT port {port:#x} reads {current:#x}; writing {value:#x} (SLP_TYP {sleep_type}, SLP_EN)"
    );
    crate::console::drain();
    ports::outw(port, value);
    still_running()
}
