//! The test guest: a small Multiboot kernel the hypervisor runs. It executes
//! the scenarios named on its command line, prints `PASS name` or
//! `FAIL name: why` for each on COM1, and ends the run through the exit port
//! with status 0 if all passed, 1 otherwise (or the status `exit=N` asks for).
//!
//! Scenarios: `memmap cpuid msr io hypercall` (the default set, checks of
//! what the hypervisor offers), `isolation` (sweeps guest-physical addresses
//! outside its RAM), `triple-fault` and `unhandled` (end the guest the hard
//! way); altp2m: `altp2m` (every call, good and bad arguments),
//! `mode-external`, `mode-limited`, `vmfunc`, `ve`, `hidden-breakpoint`,
//! `balloon`, `display`, `display-late`, `memory-calls` (log-dirty, balloon
//! and display calls with good and bad arguments), `logdirty-limit` (tracks
//! ranges until the hypervisor's heap is full; last); figures: `cpuid-bench`,
//! `vmfunc-bench`, `lazy-copy-bench`, `display-bench`, `logdirty-bench` (last: it
//! leaves 18,432 ranges tracked).
#![no_std]
#![no_main]

mod altp2m;
mod console;
mod probe;
mod scenarios;

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

static IDT: Once<x86_64::structures::idt::InterruptDescriptorTable> = Once::new();

pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads a counter (it does not exit).
    unsafe { core::arch::x86_64::_rdtsc() }
}

extern "C" fn kmain(magic: u32, info: u32) -> ! {
    ENTRY_TSC.store(rdtsc(), Ordering::Relaxed);
    console::init();
    // SAFETY: reading the stub table exported by the assembly.
    let stubs = unsafe { &exception_stubs };
    IDT.call_once(|| hv_boot::exception::idt(stubs, None))
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

/// Ends the run with `status` through the exit port.
pub fn exit(status: u8) -> ! {
    console::out(hv_abi::EXIT_PORT, status);
    loop {
        // SAFETY: only reached if the hypervisor ignored the exit port.
        unsafe { core::arch::asm!("cli", "hlt") };
    }
}

/// #VE, the virtualization exception.
const VE: u64 = 20;

extern "C" fn exception(frame: &mut ExceptionFrame) {
    if probe::recover(frame) {
        return;
    }
    if frame.vector == VE {
        altp2m::on_ve();
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
