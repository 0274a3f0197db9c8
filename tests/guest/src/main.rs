//! The test guest: a small Multiboot kernel the hypervisor runs. It executes
//! the scenarios named on its command line, prints `PASS name` or
//! `FAIL name: why` for each on COM1, and ends the run through the exit port
//! with status 0 if all passed, 1 otherwise (or the status `exit=N` asks for).
//!
//! Scenarios: `memmap cpuid msr io hypercall` (the default set, checks of
//! what the hypervisor offers), `isolation` (sweeps guest-physical addresses
//! outside its RAM, PCI configuration space and ISA DMA), `triple-fault` and
//! `unhandled` (end the guest the hard way); altp2m: `altp2m` (every call,
//! good and bad arguments), `mode-external`, `mode-limited`, `vmfunc`, `ve`,
//! `hidden-breakpoint`, `balloon`, `display`, `display-late`, `memory-calls`
//! (log-dirty, balloon and display calls with good and bad arguments),
//! `exhaust` (runs the hypervisor out of the guest's heap and frame quotas),
//! `logdirty-limit` (tracks ranges until the guest's heap quota is full;
//! last), `display-vs-logdirty` (the display and the guest's log-dirty
//! calls must not take each other's dirty bits); the
//! platform (`platform.rs`): `madt`, `lapic-timer`, `pit`, `hlt-wakes`,
//! `self-ipi`, `nmi`, `ticking` (leaves a 1 kHz timer running),
//! `irq-during-exit`, `ve-and-timer`, `apic-base`, `modules`, `cr0`, and
//! the run's end: `reset-i8042`, `reset-cf9`, `reset-92`, `acpi-s5`;
//! figures: `cpuid-bench`, `vmfunc-bench`, `lazy-copy-bench`,
//! `display-bench`, `logdirty-bench` (last: it leaves 18,432 ranges
//! tracked), `idle-bench`, `exit-bench`, `hostile-bench`; `control` (the
//! guest's half of the control channel's end-to-end test); the
//! hostile-guest fuzzer: `fuzz`, and `fuzz-end` (a seed's operations, then
//! one of the ways a guest ends the run) (`fuzz/mod.rs`); on 2 CPUs
//! (`smp_scenarios.rs`, the AP started through the local APIC, `smp.rs`):
//! `smp`, `smp-views`, `smp-vmfunc`, `smp-balloon`, and the figure
//! `smp-bench` (first: it measures before the AP starts). Options: `exit=N`,
//! `tsc-hz=`, `apic-hz=` (default 200 MHz, Bochs's), `module=SIZE:CHECKSUM[:WORD]`,
//! the fuzzer's `seed=N calls=N seeds=N trace=1`, and `ap-start=init|sipi`
//! (INIT-SIPI-SIPI, the default, or SIPI-SIPI).
//!
//! It also runs on bare metal (GRUB booting it without the hypervisor),
//! where the scenarios that need no hypervisor tell its bugs from the
//! hypervisor's; it then ends through Bochs's shutdown port.
#![no_std]
#![no_main]

mod altp2m;
mod apic;
mod console;
mod control;
mod figures;
mod firmware;
mod fuzz;
mod interrupts;
mod legacy;
mod paging;
mod platform;
mod ports;
mod probe;
mod scenarios;
mod smp;
mod smp_scenarios;

use core::sync::atomic::{AtomicU64, Ordering};

use hv_boot::bootinfo::BootInfo;
use hv_boot::exception::ExceptionFrame;
use spin::Once;

core::arch::global_asm!(include_str!("../../../hv-boot/src/multiboot_entry.s"), kmain = sym kmain);
core::arch::global_asm!(include_str!("../../../hv-boot/src/exception_stubs.s"), handler = sym exception);

unsafe extern "C" {
    static exception_stubs: [u64; 32];
}

/// TSC at entry to Rust, for the boot figure.
static ENTRY_TSC: AtomicU64 = AtomicU64::new(0);
/// CR0 at entry to Rust (its cache-control bits as the guest got them).
pub static START_CR0: AtomicU64 = AtomicU64::new(0);

static IDT: Once<x86_64::structures::idt::InterruptDescriptorTable> = Once::new();

pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads a counter (it does not exit).
    unsafe { core::arch::x86_64::_rdtsc() }
}

extern "C" fn kmain(magic: u32, info: u32) -> ! {
    ENTRY_TSC.store(rdtsc(), Ordering::Relaxed);
    smp::init_boot_cpu();
    START_CR0.store(
        x86_64::registers::control::Cr0::read_raw(),
        Ordering::Relaxed,
    );
    console::init();
    legacy::pic_init();
    // SAFETY: reading the stub table exported by the assembly.
    let stubs = unsafe { &exception_stubs };
    IDT.call_once(|| {
        let mut idt = hv_boot::exception::idt(stubs, None);
        interrupts::install(&mut idt);
        idt
    })
    .load();
    println!(
        "test guest: started (tsc {})",
        ENTRY_TSC.load(Ordering::Relaxed)
    );
    // SAFETY: EBX from the hypervisor's Multiboot entry state; the guest's page
    // tables identity-map its low 4 GiB.
    let boot = match unsafe { BootInfo::parse(magic, u64::from(info)) } {
        Ok(boot) => boot,
        Err(e) => {
            println!("FAIL boot: {e}");
            exit(1)
        }
    };
    println!("boot: {:?}, command line '{}'", boot.loader, boot.cmdline);
    let status = scenarios::run_all(&boot);
    exit(status)
}

/// Loads the guest's IDT on this CPU (made by the boot processor first).
pub fn load_idt() {
    if let Some(idt) = IDT.get() {
        idt.load();
    }
}

/// Ends the run with `status` through the exit port; on bare metal (no
/// hypervisor to end it) through Bochs's shutdown port.
pub fn exit(status: u8) -> ! {
    ports::outb(hv_abi::EXIT_PORT, status);
    if !scenarios::hypervisor_present() {
        println!("test guest: exit {status} (no hypervisor: Bochs's shutdown port)");
        console::drain();
        for b in b"Shutdown" {
            ports::outb(BOCHS_SHUTDOWN, *b);
        }
    }
    loop {
        // SAFETY: only reached if the hypervisor ignored the exit port.
        unsafe { core::arch::asm!("cli", "hlt") };
    }
}

/// Bochs's shutdown port: writing "Shutdown" ends the emulation.
const BOCHS_SHUTDOWN: u16 = 0x8900;

extern "C" fn exception(frame: &mut ExceptionFrame) {
    // NMIs and #VEs first: one that arrives at a probe's instruction is no
    // fault of the probe's (a #VE is handled and the access retried).
    match frame.vector as u8 {
        interrupts::NMI => return interrupts::note(interrupts::NMI),
        interrupts::VE => {
            interrupts::note(interrupts::VE);
            if !fuzz::on_ve() {
                altp2m::on_ve();
            }
            return;
        }
        _ => {}
    }
    if probe::recover(frame) {
        return;
    }
    let cr2 = x86_64::registers::control::Cr2::read_raw();
    console::print(format_args!("test guest: unexpected {}", frame.report(cr2)));
    exit(3)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    println!("test guest: panic: {info}");
    exit(2)
}
