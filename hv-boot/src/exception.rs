//! CPU exception frames as the shared entry stubs (`exception_stubs.s`) lay
//! them out, and their report. Used by the hypervisor and the test guest.

use core::fmt;

use x86_64::VirtAddr;
use x86_64::structures::idt::InterruptDescriptorTable;

/// The stack as the stubs leave it: general registers (last pushed first),
/// then vector, error code and the CPU's interrupt frame.
#[repr(C)]
#[derive(Clone, Debug, Default)]
pub struct ExceptionFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// Exception names by vector (Intel SDM Vol. 3A, table 6-1).
pub const NAMES: [&str; 32] = [
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

/// Vectors for which the CPU pushes an error code.
pub const fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10..=14 | 17 | 21 | 29 | 30)
}

impl ExceptionFrame {
    pub fn name(&self) -> &'static str {
        NAMES
            .get(self.vector as usize)
            .copied()
            .unwrap_or("unknown")
    }

    /// The report: name, vector, error code, `cr2` for a page fault, registers.
    pub fn report(&self, cr2: u64) -> Report<'_> {
        Report { frame: self, cr2 }
    }
}

pub struct Report<'a> {
    frame: &'a ExceptionFrame,
    cr2: u64,
}

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let x = self.frame;
        writeln!(
            f,
            "CPU exception {} (vector {}) error code {:#x}",
            x.name(),
            x.vector,
            x.error_code
        )?;
        writeln!(
            f,
            "  rip {:#018x} cs {:#06x} rflags {:#010x} rsp {:#018x} ss {:#06x}",
            x.rip, x.cs, x.rflags, x.rsp, x.ss
        )?;
        if x.vector == 14 {
            writeln!(f, "  cr2 {:#018x} (faulting address)", self.cr2)?;
        }
        let regs = [
            ("rax", x.rax),
            ("rbx", x.rbx),
            ("rcx", x.rcx),
            ("rdx", x.rdx),
            ("rsi", x.rsi),
            ("rdi", x.rdi),
            ("rbp", x.rbp),
            ("r8 ", x.r8),
            ("r9 ", x.r9),
            ("r10", x.r10),
            ("r11", x.r11),
            ("r12", x.r12),
            ("r13", x.r13),
            ("r14", x.r14),
            ("r15", x.r15),
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

/// An IDT routing vectors 0..32 to the entry stubs at `stubs` (the table
/// `exception_stubs.s` exports). With `fault_ist`, NMI, #DF and #MC run on
/// that interrupt stack (a 0-based TSS IST index).
pub fn idt(stubs: &[u64; 32], fault_ist: Option<u16>) -> InterruptDescriptorTable {
    let mut idt = InterruptDescriptorTable::new();
    let addr = |vector: usize| VirtAddr::new(stubs[vector]);
    macro_rules! install {
        ($($field:ident = $vector:expr),* $(,)?) => {$(
            // SAFETY: each stub is a valid interrupt entry point for its vector
            // (it pushes a dummy error code where the CPU pushes none).
            let options = unsafe { idt.$field.set_handler_addr(addr($vector)) };
            if let (Some(ist), 2 | 8 | 18) = (fault_ist, $vector) {
                // SAFETY: the caller's TSS has a valid stack at this IST index.
                unsafe { options.set_stack_index(ist) };
            }
        )*};
    }
    install!(
        divide_error = 0,
        debug = 1,
        non_maskable_interrupt = 2,
        breakpoint = 3,
        overflow = 4,
        bound_range_exceeded = 5,
        invalid_opcode = 6,
        device_not_available = 7,
        double_fault = 8,
        invalid_tss = 10,
        segment_not_present = 11,
        stack_segment_fault = 12,
        general_protection_fault = 13,
        page_fault = 14,
        x87_floating_point = 16,
        alignment_check = 17,
        machine_check = 18,
        simd_floating_point = 19,
        virtualization = 20,
        cp_protection_exception = 21,
        hv_injection_exception = 28,
        vmm_communication_exception = 29,
        security_exception = 30,
    );
    idt
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::string::ToString;

    use super::*;

    #[test]
    fn page_fault_report_names_the_address_and_registers() {
        let frame = ExceptionFrame {
            vector: 14,
            error_code: 2,
            rip: 0x1234,
            rax: 7,
            ..Default::default()
        };
        let text = frame.report(0xdead_0000).to_string();
        assert!(text.starts_with("CPU exception #PF page fault (vector 14) error code 0x2\n"));
        assert!(text.contains("cr2 0x00000000dead0000 (faulting address)"));
        assert!(text.contains("rip 0x0000000000001234"));
        assert!(text.contains("rax 0x0000000000000007"));
    }

    #[test]
    fn error_code_vectors_match_the_sdm() {
        let with: std::vec::Vec<u8> = (0..32).filter(|&v| has_error_code(v)).collect();
        assert_eq!(with, [8, 10, 11, 12, 13, 14, 17, 21, 29, 30]);
    }
}
