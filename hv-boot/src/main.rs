//! The hypervisor kernel: entered from a Multiboot loader, it brings up the
//! machine (console, CPU tables, memory, heap, ACPI), reports what VMX offers
//! and starts the hypervisor.
#![no_std]
#![no_main]

extern crate alloc;

mod acpi;
mod arch;
mod console;
mod control_line;
mod entry;
mod heap;
mod memory;
mod platform;
mod smp;
mod vmm;

use hv_boot::bootinfo::{BootInfo, RegionKind};
use hv_boot::cmdline::{Options, SelfTest};
use hv_boot::exit;
use log::{error, info, warn};

/// Called by the trampoline in 64-bit mode with the loader's magic and info address.
extern "C" fn kmain(magic: u32, info_address: u32) -> ! {
    console::init();
    arch::init();
    platform::mask_legacy_pic();
    platform::enable_xsave();
    println!("hv: starting (tsc {})", platform::rdtsc());
    // SAFETY: `info_address` is what the loader passed in EBX, and the boot page
    // tables identity-map the low 4 GiB where loaders put it.
    let boot = match unsafe { BootInfo::parse(magic, u64::from(info_address)) } {
        Ok(boot) => boot,
        Err(e) => fatal(format_args!("boot: {e}")),
    };
    let options = Options::parse(&boot.cmdline, |problem| warn!("cmdline: {problem}"));
    log::set_max_level(options.log_level);
    info!("boot: {:?}, command line '{}'", boot.loader, boot.cmdline);
    if boot.truncated {
        warn!(
            "boot: boot information did not fit and was cut (too many regions, modules or too long a command line)"
        );
    }
    report_memory_map(&boot);
    if control_line::init(options.control) {
        info!("control: channel on COM3 (tsc {} kHz)", platform::tsc_khz());
    }
    let (image_start, image_end) = memory::image_range();
    info!("boot: hypervisor image {image_start:#x}..{image_end:#x}");
    if let Err(e) = memory::init(&boot) {
        fatal(format_args!("memory: {e}"));
    }
    if let Err(e) = heap::init() {
        fatal(format_args!("heap: {e}"));
    }
    let machine = acpi::discover(boot.acpi_root);
    let bsp_apic_id = raw_cpuid::CpuId::new()
        .get_feature_info()
        .map_or(0, |f| u32::from(f.initial_local_apic_id()));
    let listed = machine.as_ref().map_or(&[][..], |m| m.apic_ids.as_slice());
    smp::start_aps(bsp_apic_id, listed);
    let caps = match hv_core::vmx::caps::probe_this_cpu() {
        Ok(caps) => {
            log::debug!("vmx: capability MSRs {:x?}", caps.msrs);
            // Masked before anything looks at them: the report, the
            // controls and every feature decision see the same CPU.
            let masked = hv_core::vmx::caps::Masked::from_bits_truncate(options.vmx_mask);
            let caps = if masked.is_empty() {
                caps
            } else {
                info!("{}", masked.report());
                caps.mask(masked)
            };
            for line in alloc::format!("{}", caps.report()).lines() {
                info!("{line}");
            }
            Some(caps)
        }
        Err(absent) => {
            info!("{absent}");
            None
        }
    };
    if let Some(test) = options.selftest {
        // A self-test run checks the machine, not a guest: it ends here.
        selftest(test, &boot);
        platform::exit(exit::OK);
    }
    println!("hv: ready (tsc {})", platform::rdtsc());
    let status = match (&caps, boot.modules.is_empty()) {
        (Some(caps), false) => vmm::run_guest(caps, &boot, &options, machine.as_ref()),
        (None, false) => {
            error!("vmm: a guest was given, but this CPU cannot run it without VMX");
            vmm::GUEST_STOPPED
        }
        (_, true) => exit::OK,
    };
    platform::exit(status)
}

fn report_memory_map(boot: &BootInfo) {
    for region in &boot.regions {
        let kind = match region.kind {
            RegionKind::Available => "available",
            RegionKind::Reserved => "reserved",
            RegionKind::AcpiReclaimable => "ACPI reclaimable",
            RegionKind::AcpiNvs => "ACPI NVS",
            RegionKind::Defective => "defective",
        };
        info!(
            "memory map: {:#014x}..{:#014x} {kind}",
            region.start, region.end
        );
    }
    for module in &boot.modules {
        info!(
            "boot: module {:#x}..{:#x} '{}'",
            module.start, module.end, module.cmdline
        );
    }
}

/// The failure paths the tests exercise on purpose.
fn selftest(test: SelfTest, boot: &BootInfo) {
    info!("selftest: {test:?}");
    match test {
        SelfTest::Panic => panic!("selftest: deliberate panic"),
        SelfTest::PageFault => {
            // Just past the 4 GiB boot map (and any RAM of the test machines).
            let address = 0x40_0000_0000usize as *const u64;
            // SAFETY: deliberately unsound: this read must fault.
            let value = unsafe { core::ptr::read_volatile(address) };
            error!("selftest: read {value:#x} from an unmapped address");
        }
        SelfTest::InvalidOpcode => {
            // SAFETY: raises #UD on purpose; the handler ends the run.
            unsafe { core::arch::asm!("ud2") };
        }
        SelfTest::Frames => frames_selftest(boot),
    }
}

/// Takes every free frame and checks none is the kernel's, a module's or
/// below 1 MiB; gives them all back and checks the count.
fn frames_selftest(boot: &BootInfo) {
    let before = memory::free_frames();
    let (image_start, image_end) = memory::image_range();
    let mut taken = alloc::vec::Vec::new();
    let mut bad = 0u64;
    while let Some(frame) = memory::alloc_frame() {
        let address = frame * hv_boot::PAGE_SIZE;
        let in_module = boot
            .modules
            .iter()
            .any(|m| m.start <= address + 4095 && address < m.end);
        if address < 0x100000 || (image_start..image_end).contains(&address) || in_module {
            bad += 1;
        }
        if taken.try_reserve(1).is_err() {
            break;
        }
        taken.push(frame);
    }
    let count = taken.len() as u64;
    for frame in taken {
        memory::free_frame(frame);
    }
    let after = memory::free_frames();
    info!(
        "selftest: frames: took {count} of {before} free frames, {bad} forbidden, {after} free after"
    );
    if bad != 0 || after != before {
        fatal(format_args!(
            "selftest: frame allocator handed out forbidden frames or lost some"
        ));
    }
}

fn fatal(args: core::fmt::Arguments<'_>) -> ! {
    error!("{args}");
    platform::exit(exit::BOOT_FAILED)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    console::break_lock();
    match info.location() {
        Some(l) => println!(
            "hv: panic at {}:{}:{}: {}",
            l.file(),
            l.line(),
            l.column(),
            info.message()
        ),
        None => println!("hv: panic: {}", info.message()),
    }
    platform::exit(exit::PANIC)
}
