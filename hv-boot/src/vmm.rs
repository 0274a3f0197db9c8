//! The hypervisor proper, on this machine: the platform hv-core runs on
//! (frames from the allocator, physical memory through the direct map, the
//! console), and running the guest given as the first boot module.

use core::sync::atomic::{AtomicU8, Ordering};
use hv_boot::bootinfo::BootInfo;
use hv_boot::cmdline::Options;
use hv_boot::exit;
use hv_core::devices::acpi::HostPlatform;

use hv_core::exits::GuestEnd;
use hv_core::loader::{BootOptions, Module};
use hv_core::platform::Platform;
use hv_core::smp::Coherence;
use hv_core::vcpu::{Vcpu, VcpuId};
use hv_core::vm::{GuestConfig, Vm, VmError};
use hv_core::vmx::caps::VmxCaps;
use hv_core::vmx::{Cpu, ThisCpu};
use hv_ept::{EptMemory, Mfn};
use log::{error, info, warn};

use crate::{memory, platform, println};

/// hv-core's view of this machine. Physical memory is identity-mapped, so a
/// physical address is a valid pointer for every frame the allocator manages.
pub struct KernelPlatform;

fn frame_ptr(mfn: Mfn) -> *mut u8 {
    mfn.hpa() as *mut u8
}

/// The frames a guest may hold: its RAM, and its quota (`guest.frames=`)
/// for everything else made for it (views' tables, shadow pages, display
/// copy, VMCSs). Counted from the VM's creation to its teardown.
mod quota {
    use core::sync::atomic::{AtomicU64, Ordering};

    static IN_USE: AtomicU64 = AtomicU64::new(0);
    static LIMIT: AtomicU64 = AtomicU64::new(u64::MAX);
    static PEAK: AtomicU64 = AtomicU64::new(0);

    /// Whether `count` more frames fit; if so they are counted.
    pub fn take(count: u64) -> bool {
        let before = IN_USE.fetch_add(count, Ordering::Relaxed);
        if before.saturating_add(count) > LIMIT.load(Ordering::Relaxed) {
            IN_USE.fetch_sub(count, Ordering::Relaxed);
            return false;
        }
        PEAK.fetch_max(before + count, Ordering::Relaxed);
        true
    }

    pub fn give(count: u64) {
        // Frames taken before the count started are not in it.
        let _ = IN_USE.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            Some(n.saturating_sub(count))
        });
    }

    pub fn limit(frames: u64) {
        IN_USE.store(0, Ordering::Relaxed);
        PEAK.store(0, Ordering::Relaxed);
        LIMIT.store(frames, Ordering::Relaxed);
    }

    /// No limit any more; returns the peak.
    pub fn unlimit() -> u64 {
        LIMIT.store(u64::MAX, Ordering::Relaxed);
        PEAK.load(Ordering::Relaxed)
    }
}

impl EptMemory for KernelPlatform {
    fn alloc_frame(&mut self) -> Option<Mfn> {
        self.alloc_frames(1, 1)
    }

    fn free_frame(&mut self, frame: Mfn) {
        self.free_frames(frame, 1);
    }

    fn read_entry(&self, table: Mfn, index: usize) -> u64 {
        // SAFETY: `table` is an EPT table frame of the p2m (EptMemory contract),
        // identity-mapped; the index is below 512, so the read stays inside it.
        unsafe { core::ptr::read_volatile(frame_ptr(table).cast::<u64>().add(index)) }
    }

    fn write_entry(&mut self, table: Mfn, index: usize, value: u64) {
        // SAFETY: as for `read_entry`; one aligned 64-bit store, which a
        // concurrent EPT walk sees either before or after.
        unsafe { core::ptr::write_volatile(frame_ptr(table).cast::<u64>().add(index), value) }
    }
}

impl Platform for KernelPlatform {
    fn alloc_frames(&mut self, count: u64, align: u64) -> Option<Mfn> {
        if !quota::take(count) {
            return None;
        }
        let frames = memory::alloc_frames(count, align).map(Mfn);
        if frames.is_none() {
            quota::give(count);
        }
        frames
    }

    fn free_frames(&mut self, first: Mfn, count: u64) {
        memory::free_frames_run(first.0, count);
        quota::give(count);
    }

    fn read_phys(&self, address: u64, buf: &mut [u8]) {
        // SAFETY: hv-core only reads frames it owns (guest RAM, its own
        // structures), all identity-mapped RAM; the range stays in one frame.
        unsafe { core::ptr::copy_nonoverlapping(address as *const u8, buf.as_mut_ptr(), buf.len()) }
    }

    fn write_phys(&mut self, address: u64, data: &[u8]) {
        // SAFETY: as for `read_phys`, for frames hv-core owns.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), address as *mut u8, data.len()) }
    }

    fn zero_frame(&mut self, frame: Mfn) {
        // SAFETY: a frame hv-core owns, identity-mapped; `rep stosq` is fast in emulators.
        unsafe { core::ptr::write_bytes(frame_ptr(frame), 0, 4096) }
    }

    fn guest_console_line(&mut self, line: &str) {
        println!("guest: {line}");
    }

    fn monitor_event(&mut self, line: &str) {
        println!("monitor: {line}");
    }

    fn kick(&mut self, vcpu: usize, kick: hv_core::platform::Kick) {
        crate::smp::kick(vcpu, kick == hv_core::platform::Kick::Sipi);
    }

    fn take_nmi(&mut self) -> bool {
        crate::arch::take_nmi()
    }

    fn has_control_line(&self) -> bool {
        crate::control_line::present()
    }

    fn control_receive(&mut self) -> Option<u8> {
        crate::control_line::receive()
    }

    fn control_send(&mut self, bytes: &[u8]) {
        crate::control_line::send(bytes);
    }

    fn tsc_khz(&self) -> u64 {
        platform::tsc_khz()
    }

    fn show_text(&mut self, cells: &[u8]) {
        /// The VGA text buffer (80x25 cells), identity-mapped like all low memory.
        const VGA_TEXT: usize = 0xb8000;
        let len = cells.len().min(80 * 25 * 2);
        // SAFETY: the legacy VGA text buffer is device memory no allocator
        // hands out (the low megabyte is reserved); writing it only changes
        // what the screen shows.
        unsafe { core::ptr::copy_nonoverlapping(cells.as_ptr(), VGA_TEXT as *mut u8, len) };
    }
}

/// Status of a run whose guest the hypervisor had to stop.
pub const GUEST_STOPPED: u8 = exit::GUEST_STOPPED;

/// Boots the guest in the first module, runs it to its end and tears it
/// down, VMX operation included. Returns the run's status. Every frame the
/// guest and VMX took must be back at the end, and the hypervisor's code and
/// page tables unchanged: both are checked and reported.
pub fn run_guest(
    caps: &VmxCaps,
    boot: &BootInfo,
    options: &Options,
    machine: Option<&crate::acpi::Cpus>,
) -> u8 {
    let Some(module) = boot.modules.first() else {
        info!("vmm: no guest module given; nothing to run");
        return exit::OK;
    };
    // SAFETY: the loader placed the modules at these identity-mapped ranges,
    // which the frame allocator keeps reserved for the whole run.
    let bytes = |m: &hv_boot::bootinfo::Module| unsafe {
        core::slice::from_raw_parts(m.start as *const u8, (m.end - m.start) as usize)
    };
    let image = bytes(module);
    // The modules after the first are the guest's (Multiboot modules, or
    // the parts of a Linux initrd).
    let mut modules = alloc::vec::Vec::new();
    if modules.try_reserve(boot.modules.len()).is_err() {
        error!("vmm: no memory for the module list");
        return exit::BOOT_FAILED;
    }
    modules.extend(boot.modules[1..].iter().map(|m| Module {
        bytes: bytes(m),
        cmdline: &m.cmdline,
    }));
    // Without a MADT the firmware said nothing of I/O APICs: the guest gets
    // its local APIC and the legacy PICs only.
    let fallback = HostPlatform {
        io_apics: alloc::vec::Vec::new(),
        overrides: alloc::vec::Vec::new(),
        lapic_nmis: alloc::vec::Vec::new(),
        ..HostPlatform::pc()
    };
    let host = machine.map_or(&fallback, |m| &m.platform);
    // One vCPU per online CPU (at most `guest.cpus`), vCPU i on CPU i.
    let online = crate::smp::apic_ids();
    let vcpus = options.guest_cpus.clamp(1, online.len());
    let apic_ids = &online[..vcpus];
    let config = GuestConfig {
        memory_mib: options.guest_memory_mib,
        image,
        cmdline: &module.cmdline,
        modules: &modules,
        boot: BootOptions {
            force_multiboot1: options.guest_multiboot1,
            linux_entry: options.linux_entry,
            ..BootOptions::default()
        },
        altp2m_mode: options.altp2m_mode,
        boot_views: options.boot_views,
        logdirty_all: options.logdirty_all,
        host,
        apic_ids,
        coherence: COHERENCE.call_once(|| Coherence::new(hv_core::smp::MAX_VCPUS)),
    };
    let mut platform = KernelPlatform;
    let free_before = memory::free_frames();
    let checksum_before = memory::isolation_checksum();
    let vmx = match hv_core::vmx::enable(caps, &mut platform) {
        Ok(vmx) => vmx,
        Err(e) => {
            error!("vmx: cannot enter VMX operation: {e}");
            return exit::BOOT_FAILED;
        }
    };
    let ram_frames = options.guest_memory_mib * 256;
    quota::limit(ram_frames + options.guest_frames);
    let heap_before = crate::heap::limit_guest(options.guest_heap_kib as usize * 1024);
    let status = run_vm(caps, &config, options, &mut platform);
    let heap_peak = crate::heap::unlimit();
    let frames_peak = quota::unlimit();
    info!(
        "vmm: the guest held at most {} frames beyond its RAM (quota {}) and {} KiB of heap (quota {} KiB)",
        frames_peak.saturating_sub(ram_frames),
        options.guest_frames,
        heap_peak.saturating_sub(heap_before) / 1024,
        options.guest_heap_kib
    );
    if let Err(e) = hv_core::vmx::disable(vmx, &mut platform) {
        error!("vmx: {e}");
    }
    let free_after = memory::free_frames();
    if free_after == free_before {
        info!("vmm: guest torn down, all frames returned ({free_after} free)");
    } else {
        error!("vmm: frame leak: {free_before} free before the guest, {free_after} after");
    }
    let checksum_after = memory::isolation_checksum();
    if checksum_after == checksum_before {
        info!(
            "isolation: hypervisor image and page tables unchanged (checksum {checksum_after:#018x})"
        );
    } else {
        error!(
            "isolation: hypervisor memory changed: checksum {checksum_before:#x} -> {checksum_after:#x}"
        );
    }
    status
}

/// The cross-CPU invalidation state: one guest per boot, so one for all.
static COHERENCE: spin::Once<Coherence> = spin::Once::new();

/// What the BSP hands to each AP for a guest's run: where the VM is, and
/// each AP's report on its vCPU.
pub struct ApWork {
    /// The VM, owned by the BSP's `run_vm`, which waits for every AP to be
    /// done before it drops it (`smp::run_on_aps`).
    vm: *const spin::Mutex<Vm>,
    caps: *const VmxCaps,
    /// Per AP: 0 preparing, 1 its vCPU is ready, 2 it failed.
    ready: [AtomicU8; crate::smp::MAX_CPUS],
}

// SAFETY: the pointers are only dereferenced while the BSP keeps what they
// point at alive (see `vm`), and `spin::Mutex<Vm>` serializes access.
unsafe impl Sync for ApWork {}

const PREPARING: u8 = 0;
const READY: u8 = 1;
const FAILED: u8 = 2;

/// On AP `index`: VMX on, its vCPU made and loaded, run until the guest
/// ends, then torn down (VMCS cleared, VMX off), all on this CPU.
pub fn run_ap(work: &ApWork, index: usize) {
    // SAFETY: see `ApWork::vm`: both outlive this call.
    let (machine, caps) = unsafe { (&*work.vm, &*work.caps) };
    let mut platform = KernelPlatform;
    let mut cpu = ThisCpu;
    let report = |state: u8| work.ready[index].store(state, Ordering::Release);
    let vmx = match hv_core::vmx::enable(caps, &mut platform) {
        Ok(vmx) => vmx,
        Err(e) => {
            error!("vmx: CPU {index} cannot enter VMX operation: {e}");
            report(FAILED);
            return;
        }
    };
    let vcpu = {
        let vm = machine.lock();
        Vcpu::new(&vm, VcpuId(index as u16), &mut platform).and_then(|mut vcpu| {
            match vcpu.load(&vm, &mut cpu) {
                Ok(()) => Ok(vcpu),
                Err(e) => {
                    vcpu.destroy(&mut cpu, &mut platform);
                    Err(VmError::Vmx(e))
                }
            }
        })
    };
    match vcpu {
        Ok(mut vcpu) => {
            report(READY);
            vcpu.run(machine, &mut platform);
            vcpu.destroy(&mut cpu, &mut platform);
        }
        Err(e) => {
            error!("vmm: vCPU {index} could not be made: {e}");
            report(FAILED);
        }
    }
    if let Err(e) = hv_core::vmx::disable(vmx, &mut platform) {
        error!("vmx: CPU {index}: {e}");
    }
}

/// Creates the VM and its vCPUs (one on each CPU), runs it, destroys all;
/// returns the run's status.
fn run_vm(
    caps: &VmxCaps,
    config: &GuestConfig<'_>,
    options: &Options,
    platform: &mut KernelPlatform,
) -> u8 {
    let mut cpu = ThisCpu;
    let created = Vm::create(caps, config, platform).and_then(|vm| {
        match Vcpu::new(&vm, VcpuId::BSP, platform) {
            Ok(vcpu) => Ok((vm, vcpu)),
            Err(e) => {
                vm.destroy(platform);
                Err(e)
            }
        }
    });
    let (vm, mut vcpu) = match created {
        Ok(both) => both,
        Err(e) => {
            error!("vmm: guest refused: {e}");
            return GUEST_STOPPED;
        }
    };
    if let Err(e) = vcpu.load(&vm, &mut cpu) {
        error!("vmm: guest refused: {}", VmError::Vmx(e));
        vcpu.destroy(&mut cpu, platform);
        vm.destroy(platform);
        return GUEST_STOPPED;
    }
    info!(
        "vmm: guest of {} MiB ({} frames), {} vCPU(s), {}, altp2m mode {:?}, boot views {:?}, log-dirty by {}, view switches by {}, #VE {}, command line '{}', {} module(s)",
        options.guest_memory_mib,
        vm.ram_frames(),
        vm.vcpus(),
        vm.entry,
        options.altp2m_mode,
        options.boot_views,
        if vm.features.pml {
            "PML"
        } else {
            "write protection"
        },
        if vm.features.vmfunc {
            "VMFUNC and hypercall"
        } else {
            "hypercall (VMFUNC raises #UD)"
        },
        if vm.features.ve {
            "on"
        } else {
            "off (denied accesses exit)"
        },
        config.cmdline,
        config.modules.len()
    );
    let aps = vm.vcpus() - 1;
    let machine = spin::Mutex::new(vm);
    let work = ApWork {
        vm: &machine,
        caps,
        ready: [const { AtomicU8::new(PREPARING) }; crate::smp::MAX_CPUS],
    };
    let end = crate::smp::run_on_aps(&work, aps, || {
        // Every AP's vCPU must exist before the guest can start one.
        let failed = (1..=aps).any(|index| {
            loop {
                match work.ready[index].load(Ordering::Acquire) {
                    PREPARING => core::hint::spin_loop(),
                    state => break state == FAILED,
                }
            }
        });
        if failed {
            let end = GuestEnd::Stopped(hv_core::exits::StopReason::Internal(
                "a CPU could not run its vCPU",
            ));
            machine.lock().end = Some(end.clone());
            for index in 1..=aps {
                let parked = machine.lock().coherence.parked(index);
                crate::smp::kick(index, parked);
            }
            return end;
        }
        println!("vmx: launching the guest (tsc {})", platform::rdtsc());
        vcpu.run(&machine, platform)
    });
    let status = match end {
        GuestEnd::Exited(status) => {
            info!("vmm: guest exited with status {status}");
            status
        }
        GuestEnd::Reset(path) => {
            info!("vmm: guest reset the machine through {path}");
            exit::GUEST_RESET
        }
        GuestEnd::PoweredOff => {
            info!("vmm: guest powered off (ACPI S5)");
            exit::GUEST_POWERED_OFF
        }
        GuestEnd::Stopped(why) => {
            error!("vmm: guest stopped: {why}");
            GUEST_STOPPED
        }
    };
    let vm = machine.into_inner();
    report_exits(&vm.counters);
    // Views fill lazily: their tables at the end say what the guest made
    // them copy, next to the host p2m's, which maps all of its RAM.
    let (views, frames) = vm.altp2m.view_tables(&*platform);
    info!(
        "views: {views} view(s) besides view 0 held {frames} table frames at teardown, the host p2m {}",
        vm.p2m.table_frames(&*platform)
    );
    if let Some(totals) = vm.logdirty_all {
        info!(
            "logdirty: {} fetches of all guest RAM found {} dirty pages",
            totals.fetches, totals.pages
        );
    }
    if vm.control.has_line() {
        info!("control: served {}", vm.control.stats);
    }
    if vm.stray_accesses > 0 {
        warn!(
            "vmm: the guest touched memory outside its RAM {} times",
            vm.stray_accesses
        );
    }
    vcpu.destroy(&mut cpu, platform);
    // Views and host: every EPTP this guest ever used, before its tables
    // go back to the allocator.
    cpu.invept(None);
    vm.destroy(platform);
    status
}

/// One line with the exit count of every reason that occurred.
/// Formatted without the heap, which the guest may have used up.
fn report_exits(counters: &[u64]) {
    struct Counts<'a>(&'a [u64]);
    impl core::fmt::Display for Counts<'_> {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            let total: u64 = self.0.iter().sum();
            write!(f, "{total} in all")?;
            for (reason, &count) in self.0.iter().enumerate().filter(|(_, c)| **c > 0) {
                write!(f, "; {} {count}", hv_core::vmx::exit::name(reason as u16))?;
            }
            Ok(())
        }
    }
    info!("exits: {}", Counts(counters));
}
