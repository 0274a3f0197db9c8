//! The scenarios. Each prints `PASS name`, `FAIL name: why`, or `SKIP
//! name: why` when what it tests cannot run here (the hypervisor does not
//! offer the feature on this CPU, [`offers`]).

use core::arch::x86_64::__cpuid;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use hv_abi::{call, error};
use hv_boot::bootinfo::{BootInfo, RegionKind};

use crate::{
    altp2m, apic, figures, fuzz, paging, platform, ports, println, probe, rdtsc, smp_scenarios,
};

pub type Outcome = Result<(), &'static str>;

const DEFAULT: &str = "memmap cpuid msr io hypercall";

/// What the command line sets besides scenarios (`key=value` words).
pub struct Options {
    /// `exit=N`: the run's status, whatever the scenarios say.
    pub status: Option<u8>,
    /// `tsc-hz=`, `apic-hz=`.
    pub clocks: platform::Clocks,
    /// `module=SIZE:CHECKSUM[:WORD]`: the Multiboot module to expect.
    pub module: Option<platform::ModuleSpec>,
    /// `seed=`, `calls=`, `seeds=`, `trace=`: the fuzzer's.
    pub fuzz: fuzz::Config,
    /// `ap-start=init` (INIT, SIPI, SIPI: the default) or `sipi` (SIPI,
    /// SIPI): how the SMP scenarios start the APs. Bochs 2.7 needs `sipi`:
    /// it keeps an INIT pending after the INIT VM exit (fixed in Bochs 2.8),
    /// so a vCPU that got one exits again at every entry.
    pub init_aps: bool,
}

impl Options {
    fn parse(word: &str, into: &mut Self) -> Result<(), &'static str> {
        let (key, value) = word.split_once('=').ok_or("not an option")?;
        let number = |v: &str| v.parse::<u64>().map_err(|_| "not a number");
        match key {
            "exit" => into.status = Some(value.parse().map_err(|_| "not a status")?),
            "tsc-hz" => into.clocks.tsc_hz = number(value)?.max(1),
            "apic-hz" => into.clocks.apic_hz = number(value)?.max(1),
            "module" => into.module = Some(platform::ModuleSpec::parse(value)?),
            "seed" => into.fuzz.seed = number(value)?,
            "calls" => into.fuzz.calls = number(value)?,
            "seeds" => into.fuzz.seeds = number(value)?.max(1),
            "trace" => into.fuzz.trace = number(value)? != 0,
            "ap-start" => {
                into.init_aps = match value {
                    "init" => true,
                    "sipi" => false,
                    _ => return Err("expected init or sipi"),
                }
            }
            _ => return Err("unknown option"),
        }
        Ok(())
    }
}

/// Runs the scenarios the command line names (bare words; none given: the
/// default set), after its options (`key=value`). Returns the exit status.
pub fn run_all(boot: &BootInfo) -> u8 {
    let mut failed = 0u32;
    let mut passed = 0u32;
    let mut skipped = 0u32;
    // A leading image path (loaders pass one) is not a scenario.
    let given = || {
        boot.cmdline
            .split_ascii_whitespace()
            .filter(|w| !w.contains('/'))
    };
    let mut options = Options {
        status: None,
        clocks: platform::Clocks::BOCHS,
        module: None,
        fuzz: fuzz::Config::default(),
        init_aps: true,
    };
    for word in given().filter(|w| w.contains('=')) {
        if let Err(why) = Options::parse(word, &mut options) {
            failed += 1;
            println!("FAIL {word}: {why}");
        }
    }
    let any_scenario = given().any(|w| !w.contains('='));
    let default = if any_scenario { "" } else { DEFAULT };
    let scenarios = given()
        .filter(|w| !w.contains('='))
        .chain(default.split_ascii_whitespace());
    if hypervisor_present() {
        println!("features offered: {}", FeatureNames(offered()));
    }
    for word in scenarios {
        SKIPPED.store(false, Ordering::Relaxed);
        match run_one(word, boot, &options) {
            Ok(()) => {
                passed += 1;
                println!("PASS {word}");
            }
            Err(why) if SKIPPED.load(Ordering::Relaxed) => {
                skipped += 1;
                println!("SKIP {word}: {why}");
            }
            Err(why) => {
                failed += 1;
                println!("FAIL {word}: {why}");
            }
        }
    }
    if skipped > 0 {
        println!("result: {passed} passed, {failed} failed, {skipped} skipped");
    } else {
        println!("result: {passed} passed, {failed} failed");
    }
    options.status.unwrap_or(u8::from(failed > 0))
}

fn run_one(word: &str, boot: &BootInfo, options: &Options) -> Outcome {
    let clocks = options.clocks;
    match word {
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
        "display-vs-logdirty" => altp2m::display_vs_logdirty(),
        "vmfunc-bench" => altp2m::vmfunc_bench(),
        "lazy-copy-bench" => altp2m::lazy_copy_bench(),
        "display-bench" => altp2m::display_bench(),
        "logdirty-bench" => altp2m::logdirty_bench(),
        "logdirty-limit" => altp2m::logdirty_limit(),
        "madt" => platform::madt(boot),
        "lapic-timer" => platform::lapic_timer(clocks),
        "pit" => platform::pit(clocks),
        "hlt-wakes" => platform::hlt_wakes(clocks),
        "self-ipi" => platform::self_ipi(),
        "nmi" => platform::nmi(),
        "ticking" => platform::ticking(clocks),
        "irq-during-exit" => platform::irq_during_exit(clocks),
        "ve-and-timer" => platform::ve_and_timer(),
        "apic-base" => platform::apic_base(clocks),
        "modules" => platform::modules(boot, options.module.as_ref()),
        "cr0" => platform::cr0(),
        "reset-i8042" => platform::reset_i8042(),
        "reset-cf9" => platform::reset_cf9(),
        "reset-92" => platform::reset_92(),
        "acpi-s5" => platform::acpi_s5(boot),
        "idle-bench" => figures::idle_bench(clocks),
        "exit-bench" => figures::exit_bench(clocks),
        "control" => crate::control::scenario(),
        "exhaust" => altp2m::exhaust(),
        "fuzz" => fuzz::run(boot, options),
        "fuzz-end" => fuzz::run_end(boot, options),
        "hostile-bench" => fuzz::bench::hostile_bench(boot),
        "smp" => smp_scenarios::bring_up(boot, options),
        "smp-views" => smp_scenarios::views(boot, options),
        "smp-vmfunc" => smp_scenarios::vmfunc(boot, options),
        "smp-balloon" => smp_scenarios::balloon(boot, options),
        "smp-bench" => smp_scenarios::bench(boot, options),
        _ => Err("no such scenario"),
    }
}

static SKIPPED: AtomicBool = AtomicBool::new(false);

/// The scenario cannot run here, for `why`: it ends as `SKIP name: why`
/// (neither passed nor failed). Only for what truly cannot run.
pub fn skip(why: &'static str) -> Outcome {
    SKIPPED.store(true, Ordering::Relaxed);
    Err(why)
}

/// The [`hv_abi::feature`] bits the hypervisor offers this guest (CPUID
/// leaf 0x40000001 EBX); none without the hypervisor.
pub fn offered() -> u32 {
    if hypervisor_present() {
        __cpuid(hv_abi::CPUID_FEATURES).ebx
    } else {
        0
    }
}

/// Whether the hypervisor offers `feature` (an [`hv_abi::feature`] bit).
pub fn offers(feature: u32) -> bool {
    offered() & feature != 0
}

/// The names of [`hv_abi::feature`] bits, for the log.
struct FeatureNames(u32);

impl core::fmt::Display for FeatureNames {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        use hv_abi::feature;
        write!(f, "{:#x} (", self.0)?;
        let mut first = true;
        for (bit, name) in [
            (feature::VMFUNC, "vmfunc"),
            (feature::VE, "ve"),
            (feature::MTF, "mtf"),
            (feature::PML, "pml"),
        ] {
            if self.0 & bit != 0 {
                f.write_str(if first { "" } else { " " })?;
                f.write_str(name)?;
                first = false;
            }
        }
        f.write_str(if first { "none)" } else { ")" })
    }
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

/// Leaf 0x40000000: its EAX (the highest hypervisor leaf) and the
/// signature in EBX, ECX, EDX.
fn hypervisor_leaf() -> (u32, [u8; 12]) {
    let leaf = __cpuid(hv_abi::CPUID_BASE);
    let mut sig = [0u8; 12];
    sig[..4].copy_from_slice(&leaf.ebx.to_le_bytes());
    sig[4..8].copy_from_slice(&leaf.ecx.to_le_bytes());
    sig[8..].copy_from_slice(&leaf.edx.to_le_bytes());
    (leaf.eax, sig)
}

fn cpuid() -> Outcome {
    let (max, sig) = hypervisor_leaf();
    println!(
        "cpuid: leaf {:#x}: max {:#x}, signature {:?}",
        hv_abi::CPUID_BASE,
        max,
        core::str::from_utf8(&sig)
    );
    check(sig == hv_abi::CPUID_SIGNATURE, "wrong hypervisor signature")?;
    let basic = __cpuid(1);
    check(basic.ecx & (1 << 31) != 0, "hypervisor bit clear")?;
    check(basic.ecx & (1 << 5) == 0, "VMX offered to the guest")
}

const IA32_FEATURE_CONTROL: u32 = 0x3a;
const IA32_KERNEL_GS_BASE: u32 = 0xc000_0102;
const GP: u8 = 13;

fn msr() -> Outcome {
    probe::wrmsr(IA32_KERNEL_GS_BASE, 0xffff_8000_1234_5000)
        .map_err(|_| "KERNEL_GS_BASE write faulted")?;
    let value = probe::rdmsr(IA32_KERNEL_GS_BASE).map_err(|_| "KERNEL_GS_BASE read faulted")?;
    check(
        value == 0xffff_8000_1234_5000,
        "KERNEL_GS_BASE did not keep its value",
    )?;
    let base = probe::rdmsr(apic::IA32_APIC_BASE).map_err(|_| "APIC_BASE read faulted")?;
    check(base & apic::BASE_ENABLE != 0, "APIC disabled at start")?;
    probe::wrmsr(apic::IA32_APIC_BASE, base & !apic::BASE_ENABLE)
        .map_err(|_| "disabling the APIC faulted")?;
    check(
        probe::rdmsr(apic::IA32_APIC_BASE) == Ok(base & !apic::BASE_ENABLE),
        "APIC still enabled",
    )?;
    probe::wrmsr(apic::IA32_APIC_BASE, base).map_err(|_| "re-enabling the APIC faulted")?;
    check(
        probe::rdmsr(apic::IA32_APIC_BASE) == Ok(base),
        "APIC base not restored",
    )?;
    println!("msr: APIC base {base:#x} disabled and re-enabled");
    check(
        probe::wrmsr(apic::IA32_APIC_BASE, base | 1 << 10) == Err(GP),
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
    ports::outb(0x80, 0x55);
    // COM2 is the hypervisor's log: hidden, like every port the guest does
    // not own.
    ports::outb(0x2ff, 0x5a);
    check(
        ports::inb(0x2ff) == 0xff,
        "a hidden port did not read as all ones",
    )?;
    ports::outb(hv_abi::COM1 + 7, 0xa5);
    check(
        ports::inb(hv_abi::COM1 + 7) == 0xa5,
        "UART scratch register lost its value",
    )?;
    // COM1 is the guest's real UART: it drains what was sent before.
    check(
        (0..1_000_000).any(|_| ports::inb(hv_abi::COM1 + 5) & 0x20 != 0),
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

/// Basic VM-exit reasons (SDM Vol. 3C, appendix C), as EXIT_COUNTS indexes them.
pub mod reason {
    pub const EXCEPTION_OR_NMI: usize = 0;
    pub const EXTERNAL_INTERRUPT: usize = 1;
    pub const INTERRUPT_WINDOW: usize = 7;
    pub const NMI_WINDOW: usize = 8;
    pub const CPUID: usize = 10;
    pub const HLT: usize = 12;
    pub const VMCALL: usize = 18;
    pub const CR_ACCESS: usize = 28;
    pub const IO: usize = 30;
    pub const RDMSR: usize = 31;
    pub const WRMSR: usize = 32;
    pub const EPT_VIOLATION: usize = 48;
    pub const PREEMPTION_TIMER: usize = 52;

    /// A short name for the reasons the scenarios meet.
    pub fn name(reason: usize) -> &'static str {
        match reason {
            EXCEPTION_OR_NMI => "exception or NMI",
            EXTERNAL_INTERRUPT => "external interrupt",
            INTERRUPT_WINDOW => "interrupt window",
            NMI_WINDOW => "NMI window",
            CPUID => "CPUID",
            HLT => "HLT",
            VMCALL => "VMCALL",
            CR_ACCESS => "CR access",
            IO => "I/O",
            RDMSR => "RDMSR",
            WRMSR => "WRMSR",
            EPT_VIOLATION => "EPT violation",
            PREEMPTION_TIMER => "preemption timer",
            _ => "other",
        }
    }
}

/// Whether the guest runs under this hypervisor (CPUID's hypervisor bit
/// and its signature); on bare metal there are no hypercalls.
pub fn hypervisor_present() -> bool {
    __cpuid(1).ecx & (1 << 31) != 0 && hypervisor_leaf().1 == hv_abi::CPUID_SIGNATURE
}

/// The VM exits since `before` (a [`counts`] snapshot), by reason, without
/// the EXIT_COUNTS call this makes.
pub fn exits_since(before: &[u64; 80]) -> [u64; 80] {
    let now = counts();
    let mut delta: [u64; 80] = core::array::from_fn(|i| now[i].wrapping_sub(before[i]));
    delta[reason::VMCALL] = delta[reason::VMCALL].saturating_sub(1);
    delta
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

fn isolation(boot: &BootInfo) -> Outcome {
    let ram_end = boot.ram_end();
    paging::map_up_to_16_gib();
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
    )?;
    pci_sweep()?;
    isa_dma()
}

const PCI_ADDRESS: u16 = 0xcf8;
const PCI_DATA: u16 = 0xcfc;

/// PCI configuration mechanism 1: function 0 of every device on every bus
/// reads all ones (no bus, so no device and no bus-master DMA), and the
/// address register does not keep what was written.
fn pci_sweep() -> Outcome {
    let mut answered = 0u32;
    for bus in 0..256u32 {
        for device in 0..32u32 {
            ports::outl(PCI_ADDRESS, 1 << 31 | bus << 16 | device << 11);
            if ports::inl(PCI_DATA) != u32::MAX {
                answered += 1;
            }
        }
    }
    let address = ports::inl(PCI_ADDRESS);
    ports::outl(PCI_ADDRESS, 0);
    println!(
        "isolation: PCI configuration space: function 0 of 256 x 32 bus/device pairs: {answered} answered; CONFIG_ADDRESS reads {address:#x}"
    );
    check(answered == 0, "a PCI function answered")?;
    check(address == u32::MAX, "CONFIG_ADDRESS kept what was written")
}

/// A page of guest RAM below 16 MiB (ISA DMA's reach) the DMA attempts target.
const DMA_BUFFER: u64 = 0xe0_0000;

/// ISA DMA: channel 1 of the first 8237 and channel 5 of the second,
/// programmed to write a page of guest RAM and started by a software
/// request. Nothing is written, and the controllers' registers read all
/// ones (hidden: a real transfer would reach physical memory).
fn isa_dma() -> Outcome {
    // SAFETY: a guest RAM page the scenario owns, identity-mapped.
    let buffer = unsafe { core::slice::from_raw_parts_mut(DMA_BUFFER as *mut u8, 4096) };
    buffer.fill(0x5a);
    let address = DMA_BUFFER;
    let word = address >> 1;
    // (port, value): mask, clear flip-flop, mode (single, increment, write
    // to memory), address, page, count 4095, unmask, software request.
    let first: [(u16, u64); 10] = [
        (0x0a, 0x05),
        (0x0c, 0),
        (0x0b, 0x45),
        (0x02, address),
        (0x02, address >> 8),
        (0x83, address >> 16),
        (0x03, 0xff),
        (0x03, 0x0f),
        (0x0a, 0x01),
        (0x09, 0x05),
    ];
    let second: [(u16, u64); 10] = [
        (0xd4, 0x05),
        (0xd8, 0),
        (0xd6, 0x45),
        (0xc4, word),
        (0xc4, word >> 8),
        (0x8b, (address >> 16) & 0xfe),
        (0xc6, 0xff),
        (0xc6, 0x07),
        (0xd4, 0x01),
        (0xd2, 0x05),
    ];
    for (port, value) in first.iter().chain(second.iter()) {
        ports::outb(*port, *value as u8);
    }
    crate::interrupts::spin(1_000_000);
    let registers = [0x08, 0x02, 0x03, 0x83, 0xd0, 0xc4, 0xc6, 0x8b, 0x81, 0x8f];
    let answered = registers
        .iter()
        .filter(|&&port| ports::inb(port) != 0xff)
        .count();
    let changed = buffer.iter().filter(|&&b| b != 0x5a).count();
    println!(
        "isolation: ISA DMA to {address:#x} through channels 1 and 5: {changed} bytes changed; {answered} of {} controller registers answered",
        registers.len()
    );
    check(changed == 0, "an ISA DMA transfer reached guest memory")?;
    check(answered == 0, "the ISA DMA controllers answer")
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
