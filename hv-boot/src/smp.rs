//! The machine's other CPUs: starting every processor the MADT lists
//! (INIT-SIPI-SIPI from the BSP through `ap_trampoline.s`), each with its
//! own stacks, GDT/TSS and per-CPU data; running one vCPU on each while a
//! guest runs; and the IPIs the hypervisor sends them (kicks out of guest
//! mode). A CPU that does not come up is reported and left out.

use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU8, AtomicU32, Ordering};

use log::{info, warn};

use hv_boot::ap_start;

use crate::platform::rdtsc;
use crate::{arch, memory};

/// CPUs the hypervisor runs on at most (vCPUs: `hv_core::smp::MAX_VCPUS`).
pub const MAX_CPUS: usize = hv_core::smp::MAX_VCPUS;

/// An AP's stack (and its fault stack): 64 KiB of frames.
const STACK_FRAMES: u64 = 16;

/// The local APIC's registers, at its architectural base (never moved).
const LAPIC: u64 = 0xfee0_0000;
const ICR_LOW: u64 = 0x300;
const ICR_HIGH: u64 = 0x310;
const ICR_PENDING: u32 = 1 << 12;
const ICR_NMI: u32 = 0x400 | 1 << 14;
/// The highest APIC id an IPI reaches in xAPIC mode, the only mode the
/// hypervisor drives its local APIC in (ICR_HIGH holds an 8-bit
/// destination, and 0xff is the broadcast): a CPU the MADT lists with a
/// higher (x2APIC) id is left out.
const MAX_XAPIC_ID: u32 = 0xfe;

unsafe extern "C" {
    static boot_pml4: u8;
}

/// What each CPU publishes about itself.
pub struct PerCpu {
    pub apic_id: AtomicU32,
    /// An NMI reached this CPU while the hypervisor ran.
    pub nmi_seen: AtomicBool,
    state: AtomicU8,
}

const OFFLINE: u8 = 0;
const ONLINE: u8 = 1;
/// Running its vCPU of the current guest.
const RUNNING: u8 = 2;
/// Done with it (VMCS cleared, VMX off).
const DONE: u8 = 3;

pub static CPUS: [PerCpu; MAX_CPUS] = [const {
    PerCpu {
        apic_id: AtomicU32::new(0),
        nmi_seen: AtomicBool::new(false),
        state: AtomicU8::new(OFFLINE),
    }
}; MAX_CPUS];

/// CPUs online (the BSP is 0).
static ONLINE_COUNT: AtomicU32 = AtomicU32::new(1);

pub fn online() -> usize {
    ONLINE_COUNT.load(Ordering::Acquire) as usize
}

/// The APIC ids of the online CPUs, by index.
pub fn apic_ids() -> heapless::Vec<u32, MAX_CPUS> {
    (0..online())
        .map(|i| CPUS[i].apic_id.load(Ordering::Acquire))
        .collect()
}

fn lapic_read(offset: u64) -> u32 {
    // SAFETY: the xAPIC page is identity-mapped device memory; `offset` is
    // one of its 32-bit registers.
    unsafe { core::ptr::read_volatile((LAPIC + offset) as *const u32) }
}

fn lapic_write(offset: u64, value: u32) {
    // SAFETY: as for `lapic_read`; the hypervisor writes only the ICR.
    unsafe { core::ptr::write_volatile((LAPIC + offset) as *mut u32, value) }
}

/// Sends an IPI. The guest shares this CPU's APIC: a guest that was half
/// way through writing the ICR (high part written, then a VM exit) gets its
/// high part back, so its own IPI still goes where it meant.
pub fn send_ipi(apic_id: u32, command: u32) {
    let wait_idle = || {
        for _ in 0..1_000_000 {
            if lapic_read(ICR_LOW) & ICR_PENDING == 0 {
                break;
            }
            core::hint::spin_loop();
        }
    };
    wait_idle();
    let guest_high = lapic_read(ICR_HIGH);
    lapic_write(ICR_HIGH, apic_id << 24);
    lapic_write(ICR_LOW, command);
    wait_idle();
    lapic_write(ICR_HIGH, guest_high);
}

/// An NMI (or, for a vCPU parked in wait-for-SIPI, a SIPI) that takes the
/// CPU of vCPU `index` out of guest mode.
pub fn kick(index: usize, sipi: bool) {
    let apic_id = CPUS[index].apic_id.load(Ordering::Acquire);
    send_ipi(apic_id, if sipi { ap_start::ICR_STARTUP } else { ICR_NMI });
}

/// Starts every processor the MADT lists besides this one (the BSP, index
/// 0), at most `MAX_CPUS` in all, and waits for each to report online.
pub fn start_aps(bsp_apic_id: u32, listed: &[u32]) {
    CPUS[0].apic_id.store(bsp_apic_id, Ordering::Release);
    CPUS[0].state.store(ONLINE, Ordering::Release);
    let others = listed.iter().filter(|&&id| id != bsp_apic_id);
    for &apic_id in others.clone().filter(|&&id| id > MAX_XAPIC_ID) {
        warn!("smp: APIC id {apic_id} needs x2APIC, which the hypervisor does not use; left out");
    }
    for (n, &apic_id) in others.filter(|&&id| id <= MAX_XAPIC_ID).enumerate() {
        let index = n + 1;
        if index >= MAX_CPUS {
            warn!("smp: more than {MAX_CPUS} CPUs; the rest stay off");
            break;
        }
        if start_ap(index, apic_id) {
            ONLINE_COUNT.store(index as u32 + 1, Ordering::Release);
        } else {
            warn!("smp: CPU {index} (APIC id {apic_id}) did not come up; left out");
            break;
        }
    }
    info!("smp: {} CPU(s) online, APIC ids {:?}", online(), apic_ids());
}

/// INIT-SIPI-SIPI to one AP (`hv_boot::ap_start`), with a stack of its own.
fn start_ap(index: usize, apic_id: u32) -> bool {
    let Some(stack) = memory::alloc_frames(STACK_FRAMES, 1) else {
        return false;
    };
    CPUS[index].apic_id.store(apic_id, Ordering::Release);
    let params = ap_start::Params {
        cr3: &raw const boot_pml4 as u32,
        stack_top: (stack + STACK_FRAMES) * hv_boot::PAGE_SIZE,
        entry: ap_entry,
        index: index as u64,
    };
    // SAFETY: the trampoline's page is low memory nothing else uses (the
    // frame allocator keeps out of the first megabyte), identity-mapped; the
    // APs start one at a time, and the last one left it for Rust already.
    unsafe { ap_start::write_trampoline(&params) };
    ap_start::start(
        true,
        |command| send_ipi(apic_id, command),
        |cycles| {
            let start = rdtsc();
            while rdtsc().wrapping_sub(start) < cycles {
                if CPUS[index].state.load(Ordering::Acquire) == ONLINE {
                    return true;
                }
                core::hint::spin_loop();
            }
            false
        },
    )
}

/// Where an AP arrives in 64-bit mode, on its own stack.
extern "C" fn ap_entry(index: u64) -> ! {
    let index = index as usize;
    arch::init_cpu(index);
    crate::platform::enable_xsave();
    CPUS[index].state.store(ONLINE, Ordering::Release);
    loop {
        wait_for_work(index);
    }
}

/// The guest an AP runs its vCPU of, while one runs: set by the BSP before
/// it wakes the APs, cleared after every AP is done with it.
static WORK: AtomicPtr<crate::vmm::ApWork> = AtomicPtr::new(core::ptr::null_mut());

/// Waits (with interrupts off, as everywhere in the hypervisor) until the
/// BSP hands out a guest, runs this CPU's vCPU of it, reports done.
fn wait_for_work(index: usize) {
    while CPUS[index].state.load(Ordering::Acquire) != RUNNING {
        core::hint::spin_loop();
    }
    let work = WORK.load(Ordering::Acquire);
    // SAFETY: the BSP set WORK to a value that lives until every AP it
    // started reports DONE (`run_on_aps` waits for that before returning).
    if let Some(work) = unsafe { work.as_ref() } {
        crate::vmm::run_ap(work, index);
    }
    CPUS[index].state.store(DONE, Ordering::Release);
}

/// Runs `work` on every AP (one vCPU each) while `bsp` runs on this CPU,
/// then waits until every AP is done. The APs' vCPUs are 1..online().
pub fn run_on_aps<R>(work: &crate::vmm::ApWork, aps: usize, bsp: impl FnOnce() -> R) -> R {
    WORK.store(core::ptr::from_ref(work).cast_mut(), Ordering::Release);
    for cpu in CPUS.iter().take(aps + 1).skip(1) {
        cpu.state.store(RUNNING, Ordering::Release);
    }
    let result = bsp();
    for (index, cpu) in CPUS.iter().enumerate().take(aps + 1).skip(1) {
        let start = rdtsc();
        while cpu.state.load(Ordering::Acquire) != DONE {
            if rdtsc().wrapping_sub(start) > 20_000_000_000 {
                warn!("smp: CPU {index} did not finish its vCPU");
                break;
            }
            core::hint::spin_loop();
        }
        cpu.state.store(ONLINE, Ordering::Release);
    }
    WORK.store(core::ptr::null_mut(), Ordering::Release);
    result
}
