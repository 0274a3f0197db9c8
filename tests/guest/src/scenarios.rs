//! The scenarios. Each prints `PASS name` or `FAIL name: why`.

use core::arch::x86_64::__cpuid;
use core::sync::atomic::{AtomicU64, Ordering};

use hv_abi::{call, error};
use hv_boot::bootinfo::{BootInfo, RegionKind};

use crate::{altp2m, console, println, probe, rdtsc};

pub type Outcome = Result<(), &'static str>;

const DEFAULT: &str = "memmap cpuid msr io hypercall";

/// Runs the scenarios the command line names (`scenarios=a,b,...` or bare
/// words; none given: the default set). Returns the exit status.
pub fn run_all(boot: &BootInfo) -> u8 {
    let mut failed = 0u32;
    let mut passed = 0u32;
    let mut status_override = None;
    // A leading image path (loaders pass one) is not a scenario.
    let given = || {
        boot.cmdline
            .split_ascii_whitespace()
            .filter(|w| !w.contains('/'))
    };
    let any_scenario = given().any(|w| !w.starts_with("exit="));
    let default = if any_scenario { "" } else { DEFAULT };
    for word in given().chain(default.split_ascii_whitespace()) {
        if let Some(n) = word.strip_prefix("exit=") {
            status_override = n.parse::<u8>().ok();
            continue;
        }
        let outcome = match word {
            "memmap" => memmap(boot),
            "cpuid" => cpuid(),
            "msr" => msr(),
            "io" => io(),
            "hypercall" => hypercall_scenario(),
            "cpuid-bench" => cpuid_bench(),
            "isolation" => isolation(boot),
            "triple-fault" => triple_fault(),
            "unhandled" => unhandled(),
            "altp2m" => altp2m::calls(),
            "mode-external" => altp2m::refused(false),
            "mode-limited" => altp2m::refused(true),
            "vmfunc" => altp2m::vmfunc(),
            "ve" => altp2m::ve(),
            "hidden-breakpoint" => altp2m::hidden_breakpoint(),
            "balloon" => altp2m::balloon(),
            "display" => altp2m::display(false),
            "display-late" => altp2m::display(true),
            "memory-calls" => altp2m::memory_calls(),
            "vmfunc-bench" => altp2m::vmfunc_bench(),
            "lazy-copy-bench" => altp2m::lazy_copy_bench(),
            "display-bench" => altp2m::display_bench(),
            "logdirty-bench" => altp2m::logdirty_bench(),
            "logdirty-limit" => altp2m::logdirty_limit(),
            _ => Err("no such scenario"),
        };
        match outcome {
            Ok(()) => {
                passed += 1;
                println!("PASS {word}");
            }
            Err(why) => {
                failed += 1;
                println!("FAIL {word}: {why}");
            }
        }
    }
    println!("result: {passed} passed, {failed} failed");
    status_override.unwrap_or(u8::from(failed > 0))
}

pub fn check(ok: bool, why: &'static str) -> Outcome {
    if ok { Ok(()) } else { Err(why) }
}

fn memmap(boot: &BootInfo) -> Outcome {
    let ram: u64 = boot
        .regions
        .iter()
        .filter(|r| r.kind == RegionKind::Available)
        .map(|r| r.end - r.start)
        .sum();
    println!(
        "memmap: {} regions, {} KiB of RAM",
        boot.regions.len(),
        ram >> 10
    );
    for r in &boot.regions {
        println!("memmap: {:#x}..{:#x} {:?}", r.start, r.end, r.kind);
    }
    check(
        boot.regions.len() >= 2 && ram >= 2 << 20,
        "the memory map lacks RAM",
    )
}

fn cpuid() -> Outcome {
    let leaf = __cpuid(hv_abi::CPUID_BASE);
    let mut sig = [0u8; 12];
    sig[..4].copy_from_slice(&leaf.ebx.to_le_bytes());
    sig[4..8].copy_from_slice(&leaf.ecx.to_le_bytes());
    sig[8..].copy_from_slice(&leaf.edx.to_le_bytes());
    println!(
        "cpuid: leaf {:#x}: max {:#x}, signature {:?}",
        hv_abi::CPUID_BASE,
        leaf.eax,
        core::str::from_utf8(&sig)
    );
    check(sig == hv_abi::CPUID_SIGNATURE, "wrong hypervisor signature")?;
    let basic = __cpuid(1);
    check(basic.ecx & (1 << 31) != 0, "hypervisor bit clear")?;
    check(basic.ecx & (1 << 5) == 0, "VMX offered to the guest")
}

const IA32_APIC_BASE: u32 = 0x1b;
const IA32_FEATURE_CONTROL: u32 = 0x3a;
const IA32_KERNEL_GS_BASE: u32 = 0xc000_0102;
const APIC_ENABLE: u64 = 1 << 11;
const GP: u8 = 13;

fn msr() -> Outcome {
    probe::wrmsr(IA32_KERNEL_GS_BASE, 0xffff_8000_1234_5000)
        .map_err(|_| "KERNEL_GS_BASE write faulted")?;
    let value = probe::rdmsr(IA32_KERNEL_GS_BASE).map_err(|_| "KERNEL_GS_BASE read faulted")?;
    check(
        value == 0xffff_8000_1234_5000,
        "KERNEL_GS_BASE did not keep its value",
    )?;
    let apic = probe::rdmsr(IA32_APIC_BASE).map_err(|_| "APIC_BASE read faulted")?;
    check(apic & APIC_ENABLE != 0, "APIC disabled at start")?;
    probe::wrmsr(IA32_APIC_BASE, apic & !APIC_ENABLE).map_err(|_| "disabling the APIC faulted")?;
    check(
        probe::rdmsr(IA32_APIC_BASE) == Ok(apic & !APIC_ENABLE),
        "APIC still enabled",
    )?;
    probe::wrmsr(IA32_APIC_BASE, apic).map_err(|_| "re-enabling the APIC faulted")?;
    check(
        probe::rdmsr(IA32_APIC_BASE) == Ok(apic),
        "APIC base not restored",
    )?;
    println!("msr: APIC base {apic:#x} disabled and re-enabled");
    check(
        probe::wrmsr(IA32_APIC_BASE, apic | 1 << 10) == Err(GP),
        "x2APIC mode was accepted",
    )?;
    check(
        probe::rdmsr(IA32_FEATURE_CONTROL) == Ok(1),
        "feature control offers VMX",
    )?;
    check(
        probe::rdmsr(0x8d4) == Err(GP),
        "an unknown MSR did not raise #GP",
    )
}

fn io() -> Outcome {
    console::out(0x80, 0x55);
    // COM2 is the hypervisor's log: hidden, like every port the guest does
    // not own.
    console::out(0x2ff, 0x5a);
    check(
        console::inb(0x2ff) == 0xff,
        "a hidden port did not read as all ones",
    )?;
    console::out(hv_abi::COM1 + 7, 0xa5);
    check(
        console::inb(hv_abi::COM1 + 7) == 0xa5,
        "UART scratch register lost its value",
    )?;
    // COM1 is the guest's real UART: it drains what was sent before.
    check(
        (0..1_000_000).any(|_| console::inb(hv_abi::COM1 + 5) & 0x20 != 0),
        "UART never ready to send",
    )
}

/// VMCALL with up to four arguments (RDI, RSI, RDX, R10).
pub fn hypercall(number: u64, args: &[u64]) -> i64 {
    let arg = |i: usize| args.get(i).copied().unwrap_or(0);
    let result: u64;
    // SAFETY: VMCALL exits to the hypervisor, which only changes RAX.
    unsafe {
        core::arch::asm!(
            "vmcall",
            inlateout("rax") number => result,
            in("rdi") arg(0),
            in("rsi") arg(1),
            in("rdx") arg(2),
            in("r10") arg(3),
        )
    };
    result as i64
}

static COUNTS: [AtomicU64; 80] = [const { AtomicU64::new(0) }; 80];

/// The hypervisor's VM-exit counters, by basic exit reason (one VMCALL).
pub fn counts() -> [u64; 80] {
    hypercall(call::EXIT_COUNTS, &[COUNTS.as_ptr() as u64, 80]);
    core::array::from_fn(|i| COUNTS[i].load(Ordering::Relaxed))
}

fn hypercall_scenario() -> Outcome {
    check(
        hypercall(call::VERSION, &[]) == hv_abi::VERSION as i64,
        "wrong interface version",
    )?;
    let n = hypercall(call::EXIT_COUNTS, &[COUNTS.as_ptr() as u64, 80]);
    check(n == 80, "EXIT_COUNTS did not fill the buffer")?;
    let cpuid = COUNTS[10].load(Ordering::Relaxed);
    let io = COUNTS[30].load(Ordering::Relaxed);
    println!(
        "hypercall: exits so far: {cpuid} CPUID, {io} I/O, {} VMCALL",
        COUNTS[18].load(Ordering::Relaxed)
    );
    check(io > 0, "no I/O exits counted")?;
    check(
        hypercall(call::EXIT_COUNTS, &[crate::altp2m::NOT_RAM, 80]) == error::EFAULT,
        "a buffer in the MMIO hole was accepted",
    )?;
    check(
        hypercall(call::EXIT_COUNTS, &[1 << 40, 80]) == error::EFAULT,
        "a buffer beyond RAM was accepted",
    )?;
    check(
        hypercall(0xdead, &[]) == error::ENOSYS,
        "an unknown call did not return ENOSYS",
    )
}

fn cpuid_bench() -> Outcome {
    const N: u64 = 20_000;
    let start = rdtsc();
    for _ in 0..N {
        core::hint::black_box(__cpuid(hv_abi::CPUID_BASE));
    }
    let with_cpuid = rdtsc() - start;
    let start = rdtsc();
    for _ in 0..N {
        // Same loop shape with a non-exiting instruction in place of CPUID.
        // SAFETY: LFENCE has no architectural effect here.
        unsafe { core::arch::asm!("lfence", options(nostack)) };
        core::hint::black_box(0u32);
    }
    let baseline = rdtsc() - start;
    let per_exit = with_cpuid.saturating_sub(baseline) / N;
    println!(
        "cpuid-bench: {N} CPUIDs: {with_cpuid} TSC ticks, loop alone {baseline}: {per_exit} per CPUID exit round trip"
    );
    Ok(())
}

unsafe extern "C" {
    static mut boot_pdpt: [u64; 512];
}

fn isolation(boot: &BootInfo) -> Outcome {
    let ram_end = boot.ram_end();
    // Map 4..16 GiB with 1 GiB pages so the sweep can reach past 4 GiB.
    // SAFETY: the guest's own PDPT (from the shared entry code); entries
    // 4..16 are unused; the TLB is flushed right after.
    unsafe {
        let pdpt = &raw mut boot_pdpt;
        for gib in 4..16u64 {
            (*pdpt)[gib as usize] = gib << 30 | 0x83;
        }
        x86_64::instructions::tlb::flush_all();
    }
    let mut targets = [0u64; 64];
    let mut n = 0;
    let mut add = |a: u64| {
        if n < targets.len() {
            targets[n] = a;
            n += 1;
        }
    };
    // The MMIO hole below 4 GiB but for the local APIC and I/O APIC pages
    // (the guest's), and every 256 MiB from the end of RAM to 16 GiB.
    for a in [
        0xc000_0000,
        0xe000_0000,
        0xfeb0_0000,
        0xfed0_0000,
        0xffff_0000,
    ] {
        add(a);
    }
    let mut a = ram_end.next_multiple_of(1 << 28);
    while a < 16 << 30 {
        add(a);
        a += 1 << 28;
    }
    let mut faults = 0;
    for &address in &targets[..n] {
        let read = probe::read(address);
        let write = probe::write(address, 0xdead_beef_dead_beef);
        if read == Err(GP) && write == Err(GP) {
            faults += 2;
        } else {
            println!("isolation: {address:#x}: read {read:?}, write {write:?}");
        }
    }
    println!(
        "isolation: {} probes outside RAM (end {ram_end:#x}), {faults} refused with #GP",
        2 * n
    );
    check(
        faults == 2 * n,
        "an access outside the guest's RAM was not refused",
    )
}

fn triple_fault() -> Outcome {
    println!("triple-fault: loading an empty IDT and raising #BP");
    let empty = x86_64::structures::DescriptorTablePointer {
        limit: 0,
        base: x86_64::VirtAddr::new(0),
    };
    // SAFETY: deliberately unrecoverable: #BP -> #GP -> #DF -> triple fault.
    unsafe {
        x86_64::instructions::tables::lidt(&empty);
        core::arch::asm!("int3");
    }
    Err("still running after a triple fault")
}

fn unhandled() -> Outcome {
    println!("unhandled: executing INVD");
    // SAFETY: INVD always exits; the hypervisor refuses to emulate it.
    unsafe { core::arch::asm!("invd") };
    Err("INVD returned")
}
