//! The hypervisor's own CPU tables: GDT with a TSS, IDT, and the exception
//! entry stubs. An exception in the hypervisor is a bug: the handler prints
//! the vector, error code and registers, then ends the run with a failure.

use core::sync::atomic::{AtomicBool, Ordering};

use hv_boot::exception::{self, ExceptionFrame};
use hv_boot::exit;
use spin::Once;
use x86_64::VirtAddr;
use x86_64::instructions::segmentation::{CS, DS, ES, SS, Segment};
use x86_64::instructions::tables::load_tss;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::idt::InterruptDescriptorTable;
use x86_64::structures::tss::TaskStateSegment;

/// IST slot (1-based in the IDT, 0-based in the TSS) for faults that must not
/// use a possibly broken stack: #DF, NMI, #MC.
const FAULT_IST: u16 = 0;
const FAULT_STACK_SIZE: usize = 16 * 1024;
const NMI_VECTOR: u64 = 2;

#[repr(align(16))]
struct Stack([u8; FAULT_STACK_SIZE]);
static FAULT_STACK: Stack = Stack([0; FAULT_STACK_SIZE]);

pub struct Selectors {
    pub code: SegmentSelector,
    pub data: SegmentSelector,
    pub tss: SegmentSelector,
}

static TSS: Once<TaskStateSegment> = Once::new();
static GDT: Once<(GlobalDescriptorTable, Selectors)> = Once::new();
static IDT: Once<InterruptDescriptorTable> = Once::new();

unsafe extern "C" {
    /// Entry stubs for vectors 0..32, defined in the assembly below.
    static exception_stubs: [u64; 32];
}

/// Loads the GDT (code, data, TSS) and the IDT on this CPU.
pub fn init() {
    let tss = TSS.call_once(|| {
        let mut tss = TaskStateSegment::new();
        let top = VirtAddr::from_ptr(FAULT_STACK.0.as_ptr_range().end);
        tss.interrupt_stack_table[usize::from(FAULT_IST)] = top;
        tss
    });
    let (gdt, selectors) = GDT.call_once(|| {
        let mut gdt = GlobalDescriptorTable::new();
        let code = gdt.append(Descriptor::kernel_code_segment());
        let data = gdt.append(Descriptor::kernel_data_segment());
        let tss = gdt.append(Descriptor::tss_segment(tss));
        (gdt, Selectors { code, data, tss })
    });
    gdt.load();
    // SAFETY: the selectors index the GDT just loaded, with matching descriptor types.
    unsafe {
        CS::set_reg(selectors.code);
        for set in [DS::set_reg, ES::set_reg, SS::set_reg] {
            set(selectors.data);
        }
        load_tss(selectors.tss);
    }
    // SAFETY: reading an immutable table of addresses defined in assembly.
    let stubs = unsafe { &exception_stubs };
    IDT.call_once(|| exception::idt(stubs, Some(FAULT_IST)))
        .load();
}

core::arch::global_asm!(include_str!("exception_stubs.s"), handler = sym exception_handler);

/// An NMI reached this CPU while the hypervisor ran: the guest's (guests
/// own every NMI source but the hypervisor's cross-CPU kicks), noted here
/// for the next VM entry.
static NMI_SEEN: AtomicBool = AtomicBool::new(false);

/// Whether an NMI arrived since the last call.
pub fn take_nmi() -> bool {
    NMI_SEEN.swap(false, Ordering::AcqRel)
}

extern "C" fn exception_handler(frame: &ExceptionFrame) {
    if frame.vector == NMI_VECTOR {
        NMI_SEEN.store(true, Ordering::Release);
        return;
    }
    crate::console::break_lock();
    let cr2 = x86_64::registers::control::Cr2::read_raw();
    crate::console::print(format_args!("hv: {}", frame.report(cr2)));
    crate::platform::exit(exit::CPU_EXCEPTION)
}
