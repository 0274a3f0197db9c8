//! The hypervisor's own CPU tables: GDT with a TSS, IDT, and the exception
//! entry stubs. An exception in the hypervisor is a bug: the handler prints
//! the vector, error code and registers, then ends the run with a failure.

use core::sync::atomic::Ordering;

use hv_boot::exception::{self, ExceptionFrame};
use hv_boot::exit;
use spin::Once;
use x86_64::VirtAddr;
use x86_64::instructions::segmentation::{CS, DS, ES, SS, Segment};
use x86_64::instructions::tables::load_tss;
use x86_64::registers::model_specific::GsBase;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::idt::InterruptDescriptorTable;
use x86_64::structures::tss::TaskStateSegment;

use crate::smp::{self, MAX_CPUS};

/// IST slot (1-based in the IDT, 0-based in the TSS) for faults that must not
/// use a possibly broken stack: #DF, NMI, #MC.
const FAULT_IST: u16 = 0;
const FAULT_STACK_SIZE: usize = 16 * 1024;
const NMI_VECTOR: u64 = 2;

/// A stack the CPU writes on (in .bss, not in the image's read-only part,
/// which the isolation checksum covers).
#[repr(align(16))]
struct Stack(core::cell::UnsafeCell<[u8; FAULT_STACK_SIZE]>);

// SAFETY: each stack is only ever used by the CPU whose TSS names it, and
// only through the CPU's own pushes; Rust code never reads or writes it.
unsafe impl Sync for Stack {}

/// One fault stack per CPU (a fault on one CPU must not share a stack with
/// another's), 16 KiB each.
static FAULT_STACKS: [Stack; MAX_CPUS] =
    [const { Stack(core::cell::UnsafeCell::new([0; FAULT_STACK_SIZE])) }; MAX_CPUS];

pub struct Selectors {
    pub code: SegmentSelector,
    pub data: SegmentSelector,
    pub tss: SegmentSelector,
}

static TSS: [Once<TaskStateSegment>; MAX_CPUS] = [const { Once::new() }; MAX_CPUS];
static GDT: [Once<(GlobalDescriptorTable, Selectors)>; MAX_CPUS] =
    [const { Once::new() }; MAX_CPUS];
static IDT: Once<InterruptDescriptorTable> = Once::new();

/// What GS points at on each CPU: its index, read back by `cpu_index`.
#[repr(C)]
struct CpuTag {
    index: u64,
}

static TAGS: [CpuTag; MAX_CPUS] = {
    let mut tags = [const { CpuTag { index: 0 } }; MAX_CPUS];
    let mut i = 0;
    while i < MAX_CPUS {
        tags[i].index = i as u64;
        i += 1;
    }
    tags
};

unsafe extern "C" {
    /// Entry stubs for vectors 0..32, defined in the assembly below.
    static exception_stubs: [u64; 32];
}

/// Loads the BSP's GDT (code, data, TSS) and the IDT.
pub fn init() {
    init_cpu(0);
}

/// Loads CPU `index`'s own GDT and TSS (with its own fault stack), the
/// shared IDT, and points GS at its tag (VM exits restore that GS base from
/// the VMCS host state).
pub fn init_cpu(index: usize) {
    let tss = TSS[index].call_once(|| {
        let mut tss = TaskStateSegment::new();
        let stack = FAULT_STACKS[index].0.get();
        let top = VirtAddr::from_ptr(stack.wrapping_add(1));
        tss.interrupt_stack_table[usize::from(FAULT_IST)] = top;
        tss
    });
    let (gdt, selectors) = GDT[index].call_once(|| {
        let mut gdt = GlobalDescriptorTable::new();
        let code = gdt.append(Descriptor::kernel_code_segment());
        let data = gdt.append(Descriptor::kernel_data_segment());
        let tss = gdt.append(Descriptor::tss_segment(tss));
        (gdt, Selectors { code, data, tss })
    });
    gdt.load();
    // SAFETY: the selectors index the GDT just loaded, with matching
    // descriptor types; GS base is the hypervisor's (the guest's is switched
    // by VM entry and exit).
    unsafe {
        CS::set_reg(selectors.code);
        for set in [DS::set_reg, ES::set_reg, SS::set_reg] {
            set(selectors.data);
        }
        load_tss(selectors.tss);
        GsBase::write(VirtAddr::from_ptr(&TAGS[index]));
    }
    // SAFETY: reading an immutable table of addresses defined in assembly.
    let stubs = unsafe { &exception_stubs };
    IDT.call_once(|| exception::idt(stubs, Some(FAULT_IST)))
        .load();
}

/// The index of the CPU this runs on (0 = BSP).
pub fn cpu_index() -> usize {
    let index: u64;
    // SAFETY: GS points at this CPU's tag since `init_cpu` (before anything
    // asks), and the load only reads it.
    unsafe { core::arch::asm!("mov {}, gs:[0]", out(reg) index, options(nostack, readonly)) };
    index as usize
}

core::arch::global_asm!(include_str!("exception_stubs.s"), handler = sym exception_handler);

/// Whether an NMI arrived on this CPU since the last call. It was noted by
/// the handler below while the hypervisor ran: the guest's, or a kick
/// (`hv_core::smp` tells them apart).
pub fn take_nmi() -> bool {
    smp::CPUS[cpu_index()]
        .nmi_seen
        .swap(false, Ordering::AcqRel)
}

extern "C" fn exception_handler(frame: &ExceptionFrame) {
    if frame.vector == NMI_VECTOR {
        smp::CPUS[cpu_index()]
            .nmi_seen
            .store(true, Ordering::Release);
        return;
    }
    crate::console::break_lock();
    let cr2 = x86_64::registers::control::Cr2::read_raw();
    crate::console::print(format_args!("hv: {}", frame.report(cr2)));
    crate::platform::exit(exit::CPU_EXCEPTION)
}
