//! Basic VM-exit reasons (Intel SDM Vol. 3D, appendix C) and their names.

/// Number of basic exit reasons we count (0..NUM_REASONS).
pub const NUM_REASONS: usize = 80;

pub const EXCEPTION_OR_NMI: u16 = 0;
pub const EXTERNAL_INTERRUPT: u16 = 1;
pub const TRIPLE_FAULT: u16 = 2;
pub const INIT_SIGNAL: u16 = 3;
pub const SIPI: u16 = 4;
pub const CPUID: u16 = 10;
pub const HLT: u16 = 12;
pub const INVD: u16 = 13;
pub const VMCALL: u16 = 18;
pub const CR_ACCESS: u16 = 28;
pub const IO_INSTRUCTION: u16 = 30;
pub const RDMSR: u16 = 31;
pub const WRMSR: u16 = 32;
pub const MWAIT: u16 = 36;
pub const MONITOR_TRAP_FLAG: u16 = 37;
pub const MONITOR: u16 = 39;
pub const EPT_VIOLATION: u16 = 48;
pub const EPT_MISCONFIG: u16 = 49;
pub const PREEMPTION_TIMER: u16 = 52;
pub const XSETBV: u16 = 55;
pub const VMFUNC: u16 = 59;

/// Bit 31 of the exit-reason field: the VM entry failed.
pub const ENTRY_FAILURE_BIT: u32 = 1 << 31;

/// The SDM's name for a basic exit reason.
pub fn name(reason: u16) -> &'static str {
    match reason {
        0 => "exception or NMI",
        1 => "external interrupt",
        2 => "triple fault",
        3 => "INIT signal",
        4 => "SIPI",
        5 => "I/O SMI",
        6 => "other SMI",
        7 => "interrupt window",
        8 => "NMI window",
        9 => "task switch",
        10 => "CPUID",
        11 => "GETSEC",
        12 => "HLT",
        13 => "INVD",
        14 => "INVLPG",
        15 => "RDPMC",
        16 => "RDTSC",
        17 => "RSM",
        18 => "VMCALL",
        19 => "VMCLEAR",
        20 => "VMLAUNCH",
        21 => "VMPTRLD",
        22 => "VMPTRST",
        23 => "VMREAD",
        24 => "VMRESUME",
        25 => "VMWRITE",
        26 => "VMXOFF",
        27 => "VMXON",
        28 => "control-register access",
        29 => "MOV DR",
        30 => "I/O instruction",
        31 => "RDMSR",
        32 => "WRMSR",
        33 => "VM-entry failure: invalid guest state",
        34 => "VM-entry failure: MSR loading",
        36 => "MWAIT",
        37 => "monitor trap flag",
        39 => "MONITOR",
        40 => "PAUSE",
        41 => "VM-entry failure: machine check",
        43 => "TPR below threshold",
        44 => "APIC access",
        45 => "virtualized EOI",
        46 => "GDTR/IDTR access",
        47 => "LDTR/TR access",
        48 => "EPT violation",
        49 => "EPT misconfiguration",
        50 => "INVEPT",
        51 => "RDTSCP",
        52 => "VMX-preemption timer expired",
        53 => "INVVPID",
        54 => "WBINVD",
        55 => "XSETBV",
        56 => "APIC write",
        57 => "RDRAND",
        58 => "INVPCID",
        59 => "VMFUNC",
        60 => "ENCLS",
        61 => "RDSEED",
        62 => "page-modification log full",
        63 => "XSAVES",
        64 => "XRSTORS",
        66 => "SPP-related event",
        67 => "UMWAIT",
        68 => "TPAUSE",
        69 => "LOADIWKEY",
        _ => "unknown",
    }
}

/// VM-instruction error numbers (SDM Vol. 3C, "VM-Instruction Error Numbers").
pub fn instruction_error(number: u64) -> &'static str {
    match number {
        1 => "VMCALL executed in VMX root operation",
        2 => "VMCLEAR with invalid physical address",
        3 => "VMCLEAR with VMXON pointer",
        4 => "VMLAUNCH with non-clear VMCS",
        5 => "VMRESUME with non-launched VMCS",
        6 => "VMRESUME after VMXOFF",
        7 => "VM entry with invalid control field(s)",
        8 => "VM entry with invalid host-state field(s)",
        9 => "VMPTRLD with invalid physical address",
        10 => "VMPTRLD with VMXON pointer",
        11 => "VMPTRLD with incorrect VMCS revision identifier",
        12 => "VMREAD/VMWRITE from/to unsupported VMCS component",
        13 => "VMWRITE to read-only VMCS component",
        15 => "VMXON executed in VMX root operation",
        16 => "VM entry with invalid executive-VMCS pointer",
        17 => "VM entry with non-launched executive VMCS",
        18 => "VM entry with executive-VMCS pointer not VMXON pointer",
        19 => "VMCALL with non-clear VMCS",
        20 => "VMCALL with invalid VM-exit control fields",
        22 => "VMCALL with incorrect MSEG revision identifier",
        23 => "VMXOFF under dual-monitor treatment of SMIs and SMM",
        24 => "VMCALL with invalid SMM-monitor features",
        25 => "VM entry with invalid VM-execution control fields in executive VMCS",
        26 => "VM entry with events blocked by MOV SS",
        28 => "invalid operand to INVEPT/INVVPID",
        _ => "unknown VM-instruction error",
    }
}
