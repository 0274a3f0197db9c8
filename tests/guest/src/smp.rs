//! The guest's other processors, started the way an OS starts them: the
//! MADT lists them, the boot processor sends each INIT, SIPI, SIPI through
//! its local APIC's ICR, and the shared real-mode trampoline
//! (`hv_boot::ap_start`, at 0x8000 of the guest's low memory) takes each
//! to 64-bit mode on the guest's own page tables and a stack of its own.
//! There it loads the guest's GDT and IDT, enables its local APIC and waits
//! in HLT for work: a job the boot processor posts and wakes it for with a
//! fixed IPI. Every CPU finds its per-CPU data through its GS base.

use core::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};

use hv_boot::ap_start;
use hv_boot::bootinfo::{BootInfo, RegionKind};

use crate::interrupts::{self, SPURIOUS, WAKE};
use crate::scenarios::{Outcome, check};
use crate::{apic, firmware, rdtsc};

/// Processors the guest runs on at most (the boot processor is 0).
pub const MAX_CPUS: usize = 8;
const STACK_SIZE: usize = 32 * 1024;
/// How long the boot processor waits for an AP's part, and either CPU at a
/// rendezvous, in TSC cycles (the other CPU's hypercalls may log lines of
/// about 1.6 million cycles each).
const PATIENCE: u64 = 2_000_000_000;

/// What each CPU keeps of its own; its GS base points at it.
#[repr(C)]
pub struct PerCpu {
    /// Its index; first, so that `gs:[0]` reads it.
    index: u64,
    /// Vector + 1 of the last fault a probe recovered here (0: none).
    pub fault: AtomicU64,
}

static PER_CPU: [PerCpu; MAX_CPUS] = {
    let mut cpus = [const {
        PerCpu {
            index: 0,
            fault: AtomicU64::new(0),
        }
    }; MAX_CPUS];
    let mut i = 0;
    while i < MAX_CPUS {
        cpus[i].index = i as u64;
        i += 1;
    }
    cpus
};

const IA32_GS_BASE: u32 = 0xc000_0101;

/// Points this CPU's GS base at its per-CPU data (the MSR is the guest's
/// own: no exit).
fn set_this_cpu(index: usize) {
    let base = &PER_CPU[index] as *const PerCpu as u64;
    // SAFETY: IA32_GS_BASE exists in long mode; nothing else uses GS.
    unsafe { x86_64::registers::model_specific::Msr::new(IA32_GS_BASE).write(base) };
}

/// This CPU's index (0 for the boot processor).
pub fn index() -> usize {
    let index: u64;
    // SAFETY: GS points at this CPU's `PerCpu` (set first thing on every
    // CPU), whose first field is its index.
    unsafe {
        core::arch::asm!("mov {}, gs:[0]", out(reg) index, options(nostack, readonly, preserves_flags))
    };
    index as usize
}

pub fn this() -> &'static PerCpu {
    &PER_CPU[index()]
}

/// The boot processor's setup, before anything can fault.
pub fn init_boot_cpu() {
    set_this_cpu(0);
}

type Job = fn() -> Outcome;

/// An AP's work slot.
enum Slot {
    Idle,
    Posted(Job),
    Running,
    Done(Outcome),
}

struct Ap {
    apic_id: AtomicU8,
    online: AtomicBool,
    slot: spin::Mutex<Slot>,
}

static APS: [Ap; MAX_CPUS] = [const {
    Ap {
        apic_id: AtomicU8::new(0),
        online: AtomicBool::new(false),
        slot: spin::Mutex::new(Slot::Idle),
    }
}; MAX_CPUS];

/// CPUs online, the boot processor included (0: not started yet).
static ONLINE: AtomicUsize = AtomicUsize::new(0);

#[repr(C, align(4096))]
struct Stack([u8; STACK_SIZE]);

static mut STACKS: [Stack; MAX_CPUS - 1] = [const { Stack([0; STACK_SIZE]) }; MAX_CPUS - 1];

unsafe extern "C" {
    static boot_pml4: u8;
}

/// Whether the APs have been started.
pub fn started() -> bool {
    ONLINE.load(Ordering::SeqCst) > 0
}

/// Starts every processor the MADT lists besides this one (once; later
/// calls return what the first found), with INIT-SIPI-SIPI, or SIPI-SIPI
/// without `init`. Returns the CPUs online, this one included.
pub fn start(boot: &BootInfo, init: bool) -> Result<usize, &'static str> {
    let online = ONLINE.load(Ordering::SeqCst);
    if online > 0 {
        return Ok(online);
    }
    let d = firmware::read(boot)?;
    let trampoline = ap_start::TRAMPOLINE;
    check(
        boot.regions.iter().any(|r| {
            r.kind == RegionKind::Available && r.start <= trampoline && trampoline + 4096 <= r.end
        }),
        "the trampoline's page is not RAM",
    )?;
    apic::init();
    let me = apic::id();
    APS[0].apic_id.store(me, Ordering::SeqCst);
    APS[0].online.store(true, Ordering::SeqCst);
    let mut count = 1;
    for cpu in d.cpus.iter().filter(|c| c.enabled && c.apic_id != me) {
        check(count < MAX_CPUS, "more processors than the guest supports")?;
        start_ap(count, cpu.apic_id, init)?;
        count += 1;
    }
    ONLINE.store(count, Ordering::SeqCst);
    Ok(count)
}

/// INIT-SIPI-SIPI to one AP, to become CPU `index`.
fn start_ap(index: usize, apic_id: u8, init: bool) -> Outcome {
    let ap = &APS[index];
    ap.apic_id.store(apic_id, Ordering::SeqCst);
    ap.online.store(false, Ordering::SeqCst);
    // SAFETY: only the address of the stack is taken; the AP it belongs to
    // is the only one that ever uses it.
    let stack = unsafe { &raw mut STACKS[index - 1] };
    let params = ap_start::Params {
        cr3: &raw const boot_pml4 as u32,
        stack_top: stack as u64 + STACK_SIZE as u64,
        entry: ap_main,
        index: index as u64,
    };
    // SAFETY: the trampoline's page is guest RAM (checked by `start`) that
    // nothing else of the guest uses, identity-mapped; APs start one at a
    // time, and none runs the trampoline now.
    unsafe { ap_start::write_trampoline(&params) };
    let sent = core::cell::Cell::new(true);
    let up = ap_start::start(
        init,
        |command| sent.set(sent.get() & apic::send_ipi(apic_id, command)),
        |cycles| wait_until(cycles, || ap.online.load(Ordering::SeqCst)),
    );
    check(sent.get(), "the local APIC did not send INIT or SIPI")?;
    check(up, "an AP did not come up after its start-up IPIs")
}

/// Spins until `done`, for at most the time the other CPU is given for its
/// part; returns whether it happened.
pub fn wait_for(done: impl FnMut() -> bool) -> bool {
    wait_until(PATIENCE, done)
}

/// Spins until `done` or `cycles` TSC cycles passed; returns `done()`.
fn wait_until(cycles: u64, mut done: impl FnMut() -> bool) -> bool {
    let start = rdtsc();
    while !done() {
        if rdtsc() - start >= cycles {
            return done();
        }
        core::hint::spin_loop();
    }
    true
}

/// The guest's GDT for its APs: null, 64-bit code (0x08), data (0x10), as
/// the boot processor's (`multiboot_entry.s`), whose selectors the IDT's
/// gates name.
static GDT: [u64; 3] = [0, 0x0020_9a00_0000_0000, 0x0000_9200_0000_0000];

/// Where an AP arrives in 64-bit mode from the trampoline, on its stack.
extern "C" fn ap_main(index: u64) -> ! {
    let index = index as usize;
    let gdt = x86_64::structures::DescriptorTablePointer {
        limit: (core::mem::size_of_val(&GDT) - 1) as u16,
        base: x86_64::VirtAddr::new(GDT.as_ptr() as u64),
    };
    // SAFETY: the GDT is static and valid; CS is reloaded with its 64-bit
    // code selector through a far return to the next instruction, and the
    // data segments with its data selector.
    unsafe {
        x86_64::instructions::tables::lgdt(&gdt);
        core::arch::asm!(
            "push 0x08",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov {sel:e}, 0x10",
            "mov ds, {sel:e}",
            "mov es, {sel:e}",
            "mov ss, {sel:e}",
            tmp = out(reg) _,
            sel = out(reg) _,
        );
    }
    set_this_cpu(index);
    crate::load_idt();
    // After INIT the caches are off (CR0.CD, NW): an OS turns them on.
    // SAFETY: clearing CD and NW only changes caching.
    unsafe {
        x86_64::registers::control::Cr0::update(|cr0| {
            cr0.remove(
                x86_64::registers::control::Cr0Flags::CACHE_DISABLE
                    | x86_64::registers::control::Cr0Flags::NOT_WRITE_THROUGH,
            )
        })
    };
    // Software-enabled, so that the wake-up IPI (a fixed interrupt) is accepted.
    apic::write(apic::SVR, apic::SVR_ENABLE | u32::from(SPURIOUS));
    APS[index].online.store(true, Ordering::SeqCst);
    serve(&APS[index])
}

/// An AP's life: run what is posted, else sleep until the wake-up IPI.
fn serve(ap: &Ap) -> ! {
    loop {
        interrupts::disable();
        let job = {
            let mut slot = ap.slot.lock();
            match *slot {
                Slot::Posted(job) => {
                    *slot = Slot::Running;
                    Some(job)
                }
                _ => None,
            }
        };
        match job {
            Some(job) => {
                let outcome = job();
                *ap.slot.lock() = Slot::Done(outcome);
            }
            // The STI shadow keeps the wake-up from arriving before HLT.
            None => interrupts::sti_hlt(),
        }
    }
}

/// Runs `ap_part` on AP 1 and `bsp_part` here at the same time; the first
/// failure of either (the boot processor's first), or `Ok`.
pub fn on_two_cpus(ap_part: Job, bsp_part: Job) -> Outcome {
    post(1, ap_part)?;
    let here = bsp_part();
    let there = wait(1);
    here.and(there)
}

/// Posts `job` to AP `index` and wakes it.
pub fn post(index: usize, job: Job) -> Outcome {
    let ap = &APS[index];
    check(
        index < ONLINE.load(Ordering::SeqCst) && ap.online.load(Ordering::SeqCst),
        "no such AP online (start the APs first; boot with 2 CPUs)",
    )?;
    {
        let mut slot = ap.slot.lock();
        check(
            matches!(*slot, Slot::Idle | Slot::Done(_)),
            "the AP is still busy",
        )?;
        *slot = Slot::Posted(job);
    }
    check(
        apic::send_ipi(ap.apic_id.load(Ordering::SeqCst), u32::from(WAKE)),
        "the wake-up IPI was not sent",
    )
}

/// Waits for AP `index`'s outcome.
pub fn wait(index: usize) -> Outcome {
    let ap = &APS[index];
    let mut outcome = None;
    wait_until(PATIENCE, || {
        let mut slot = ap.slot.lock();
        if let Slot::Done(o) = *slot {
            outcome = Some(o);
            *slot = Slot::Idle;
        }
        outcome.is_some()
    });
    outcome.unwrap_or(Err("the AP did not finish its part in time"))
}

/// A meeting point of two CPUs: both call [`Rendezvous::meet`] with the
/// same round numbers (1, 2, ...), and each returns once the other arrived.
pub struct Rendezvous(AtomicU64);

impl Rendezvous {
    pub const fn new() -> Self {
        Self(AtomicU64::new(0))
    }

    /// Starts over (before the CPUs use it).
    pub fn reset(&self) {
        self.0.store(0, Ordering::SeqCst);
    }

    pub fn meet(&self, round: u64) -> Outcome {
        self.0.fetch_add(1, Ordering::SeqCst);
        check(
            wait_until(PATIENCE, || self.0.load(Ordering::SeqCst) >= 2 * round),
            "the other CPU never came to the rendezvous",
        )
    }
}
