//! The hypervisor's own CPU tables: GDT with a TSS, IDT, and the exception
//! entry stubs. An exception in the hypervisor is a bug: the handler prints
//! the vector, error code and registers, then ends the run with a failure.

use core::fmt;

use hv_boot::exit;
use spin::Once;
use x86_64::VirtAddr;
use x86_64::instructions::segmentation::{CS, DS, ES, SS, Segment};
use x86_64::instructions::tables::load_tss;
use x86_64::registers::control::Cr2;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::idt::InterruptDescriptorTable;
use x86_64::structures::tss::TaskStateSegment;

/// IST slot (1-based in the IDT, 0-based in the TSS) for faults that must not
/// use a possibly broken stack: #DF, NMI, #MC.
const FAULT_IST: u16 = 0;
const FAULT_STACK_SIZE: usize = 16 * 1024;

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
    IDT.call_once(build_idt).load();
}

fn build_idt() -> InterruptDescriptorTable {
    let mut idt = InterruptDescriptorTable::new();
    // SAFETY: reading an immutable table of addresses defined in assembly.
    let stubs = unsafe { &exception_stubs };
    let addr = |vector: usize| VirtAddr::new(stubs[vector]);
    macro_rules! install {
        ($($field:ident = $vector:expr),* $(,)?) => {$(
            // SAFETY: each stub is a valid interrupt entry point for its vector
            // (it pushes a dummy error code where the CPU pushes none).
            unsafe { idt.$field.set_handler_addr(addr($vector)) };
        )*};
    }
    install!(
        divide_error = 0,
        debug = 1,
        breakpoint = 3,
        overflow = 4,
        bound_range_exceeded = 5,
        invalid_opcode = 6,
        device_not_available = 7,
        invalid_tss = 10,
        segment_not_present = 11,
        stack_segment_fault = 12,
        general_protection_fault = 13,
        page_fault = 14,
        x87_floating_point = 16,
        alignment_check = 17,
        simd_floating_point = 19,
        virtualization = 20,
        cp_protection_exception = 21,
        hv_injection_exception = 28,
        vmm_communication_exception = 29,
        security_exception = 30,
    );
    // SAFETY: as above; these three run on the fault IST stack set up in the TSS.
    unsafe {
        idt.non_maskable_interrupt
            .set_handler_addr(addr(2))
            .set_stack_index(FAULT_IST);
        idt.double_fault
            .set_handler_addr(addr(8))
            .set_stack_index(FAULT_IST);
        idt.machine_check
            .set_handler_addr(addr(18))
            .set_stack_index(FAULT_IST);
    }
    idt
}

/// The stack as the stubs leave it: general registers (last pushed first),
/// then vector, error code and the CPU's interrupt frame.
#[repr(C)]
pub struct ExceptionFrame {
    r15: u64,
    r14: u64,
    r13: u64,
    r12: u64,
    r11: u64,
    r10: u64,
    r9: u64,
    r8: u64,
    rbp: u64,
    rdi: u64,
    rsi: u64,
    rdx: u64,
    rcx: u64,
    rbx: u64,
    rax: u64,
    vector: u64,
    error_code: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

const NAMES: [&str; 32] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved 15",
    "#MF x87 error",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD error",
    "#VE virtualization",
    "#CP control protection",
    "reserved 22",
    "reserved 23",
    "reserved 24",
    "reserved 25",
    "reserved 26",
    "reserved 27",
    "#HV hypervisor injection",
    "#VC VMM communication",
    "#SX security",
    "reserved 31",
];

impl fmt::Display for ExceptionFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = NAMES
            .get(self.vector as usize)
            .copied()
            .unwrap_or("unknown");
        writeln!(
            f,
            "hv: CPU exception {name} (vector {}) error code {:#x}",
            self.vector, self.error_code
        )?;
        writeln!(
            f,
            "  rip {:#018x} cs {:#06x} rflags {:#010x} rsp {:#018x} ss {:#06x}",
            self.rip, self.cs, self.rflags, self.rsp, self.ss
        )?;
        if self.vector == 14 {
            writeln!(f, "  cr2 {:#018x} (faulting address)", Cr2::read_raw())?;
        }
        let regs = [
            ("rax", self.rax),
            ("rbx", self.rbx),
            ("rcx", self.rcx),
            ("rdx", self.rdx),
            ("rsi", self.rsi),
            ("rdi", self.rdi),
            ("rbp", self.rbp),
            ("r8 ", self.r8),
            ("r9 ", self.r9),
            ("r10", self.r10),
            ("r11", self.r11),
            ("r12", self.r12),
            ("r13", self.r13),
            ("r14", self.r14),
            ("r15", self.r15),
        ];
        for row in regs.chunks(4) {
            write!(f, " ")?;
            for (name, value) in row {
                write!(f, " {name} {value:#018x}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

extern "C" fn exception_handler(frame: &ExceptionFrame) -> ! {
    crate::console::break_lock();
    crate::console::print(format_args!("{frame}"));
    crate::platform::exit(exit::CPU_EXCEPTION)
}

core::arch::global_asm!(
    r#"
    .macro EXCEPTION_STUB vector, has_error_code
    exception_stub_\vector:
    .if \has_error_code == 0
        push 0
    .endif
        push \vector
        jmp exception_common
    .endm

    .section .text.exceptions, "ax"
    .irp v, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31
    EXCEPTION_STUB \v, 0
    .endr
    .irp v, 8,10,11,12,13,14,17,21,29,30
    EXCEPTION_STUB \v, 1
    .endr

exception_common:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov rdi, rsp
    and rsp, -16
    cld
    call {handler}
    ud2

    .section .rodata.exceptions, "a"
    .balign 8
    .global exception_stubs
exception_stubs:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad exception_stub_\v
    .endr
"#,
    handler = sym exception_handler,
);
