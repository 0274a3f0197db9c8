//! VM exits, decoded once: the basic exit reason as a typed enum (SDM Vol.
//! 3D, appendix C), with the SDM's names, and the VM-instruction error
//! numbers. Nothing outside `vmx` and `exits` looks at raw reason numbers.

/// Number of basic exit reasons counted (0..NUM_REASONS).
pub const NUM_REASONS: usize = 80;

/// Bit 31 of the exit-reason field: the VM entry failed.
pub const ENTRY_FAILURE_BIT: u32 = 1 << 31;

macro_rules! exit_reasons {
    ($($number:literal => $variant:ident: $name:literal,)*) => {
        /// A basic VM-exit reason.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum ExitReason {
            $($variant,)*
            /// A number the SDM this was written from does not define.
            Unknown(u16),
        }

        impl ExitReason {
            /// Decodes bits 15:0 of the exit-reason field.
            pub const fn from_basic(basic: u16) -> Self {
                match basic {
                    $($number => Self::$variant,)*
                    other => Self::Unknown(other),
                }
            }

            /// The basic reason number.
            pub const fn basic(self) -> u16 {
                match self {
                    $(Self::$variant => $number,)*
                    Self::Unknown(other) => other,
                }
            }

            /// The SDM's name.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $name,)*
                    Self::Unknown(_) => "unknown",
                }
            }
        }
    };
}

exit_reasons! {
    0 => ExceptionOrNmi: "exception or NMI",
    1 => ExternalInterrupt: "external interrupt",
    2 => TripleFault: "triple fault",
    3 => Init: "INIT signal",
    4 => Sipi: "SIPI",
    5 => IoSmi: "I/O SMI",
    6 => OtherSmi: "other SMI",
    7 => InterruptWindow: "interrupt window",
    8 => NmiWindow: "NMI window",
    9 => TaskSwitch: "task switch",
    10 => Cpuid: "CPUID",
    11 => Getsec: "GETSEC",
    12 => Hlt: "HLT",
    13 => Invd: "INVD",
    14 => Invlpg: "INVLPG",
    15 => Rdpmc: "RDPMC",
    16 => Rdtsc: "RDTSC",
    17 => Rsm: "RSM",
    18 => Vmcall: "VMCALL",
    19 => Vmclear: "VMCLEAR",
    20 => Vmlaunch: "VMLAUNCH",
    21 => Vmptrld: "VMPTRLD",
    22 => Vmptrst: "VMPTRST",
    23 => Vmread: "VMREAD",
    24 => Vmresume: "VMRESUME",
    25 => Vmwrite: "VMWRITE",
    26 => Vmxoff: "VMXOFF",
    27 => Vmxon: "VMXON",
    28 => CrAccess: "control-register access",
    29 => DrAccess: "MOV DR",
    30 => Io: "I/O instruction",
    31 => Rdmsr: "RDMSR",
    32 => Wrmsr: "WRMSR",
    33 => InvalidGuestState: "VM-entry failure: invalid guest state",
    34 => MsrLoading: "VM-entry failure: MSR loading",
    36 => Mwait: "MWAIT",
    37 => MonitorTrapFlag: "monitor trap flag",
    39 => Monitor: "MONITOR",
    40 => Pause: "PAUSE",
    41 => EntryMachineCheck: "VM-entry failure: machine check",
    43 => TprBelowThreshold: "TPR below threshold",
    44 => ApicAccess: "APIC access",
    45 => VirtualizedEoi: "virtualized EOI",
    46 => GdtrIdtrAccess: "GDTR/IDTR access",
    47 => LdtrTrAccess: "LDTR/TR access",
    48 => EptViolation: "EPT violation",
    49 => EptMisconfig: "EPT misconfiguration",
    50 => Invept: "INVEPT",
    51 => Rdtscp: "RDTSCP",
    52 => PreemptionTimer: "VMX-preemption timer expired",
    53 => Invvpid: "INVVPID",
    54 => Wbinvd: "WBINVD",
    55 => Xsetbv: "XSETBV",
    56 => ApicWrite: "APIC write",
    57 => Rdrand: "RDRAND",
    58 => Invpcid: "INVPCID",
    59 => Vmfunc: "VMFUNC",
    60 => Encls: "ENCLS",
    61 => Rdseed: "RDSEED",
    62 => PmlFull: "page-modification log full",
    63 => Xsaves: "XSAVES",
    64 => Xrstors: "XRSTORS",
    66 => Spp: "SPP-related event",
    67 => Umwait: "UMWAIT",
    68 => Tpause: "TPAUSE",
    69 => Loadiwkey: "LOADIWKEY",
}

impl ExitReason {
    /// VMX instructions (and GETSEC): guests get no nested VMX, so these
    /// raise #UD as on a CPU without VMX.
    pub const fn is_vmx_instruction(self) -> bool {
        matches!(
            self,
            Self::Vmclear
                | Self::Vmlaunch
                | Self::Vmptrld
                | Self::Vmptrst
                | Self::Vmread
                | Self::Vmresume
                | Self::Vmwrite
                | Self::Vmxoff
                | Self::Vmxon
                | Self::Invept
                | Self::Invvpid
        )
    }
}

/// The exit-reason field as read after a VM exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    pub reason: ExitReason,
    /// Bit 31: the exit happened on a failed VM entry.
    pub entry_failed: bool,
}

impl Exit {
    pub const fn from_field(field: u32) -> Self {
        Self {
            reason: ExitReason::from_basic(field as u16),
            entry_failed: field & ENTRY_FAILURE_BIT != 0,
        }
    }
}

/// The name of basic reason `number` (exit counters are kept by number).
pub const fn name(number: u16) -> &'static str {
    ExitReason::from_basic(number).name()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_reason_round_trips_and_fits_the_counters() {
        for number in 0..u16::MAX {
            let reason = ExitReason::from_basic(number);
            assert_eq!(reason.basic(), number);
            if !matches!(reason, ExitReason::Unknown(_)) {
                assert!(usize::from(number) < NUM_REASONS, "{number}");
                assert_ne!(reason.name(), "unknown");
            }
        }
        assert_eq!(ExitReason::from_basic(48), ExitReason::EptViolation);
        assert_eq!(ExitReason::from_basic(35), ExitReason::Unknown(35));
    }

    #[test]
    fn the_entry_failure_bit_is_decoded_apart_from_the_reason() {
        let exit = Exit::from_field(ENTRY_FAILURE_BIT | 33);
        assert!(exit.entry_failed);
        assert_eq!(exit.reason, ExitReason::InvalidGuestState);
        assert!(ExitReason::Vmxon.is_vmx_instruction());
        assert!(!ExitReason::Vmfunc.is_vmx_instruction());
    }
}
