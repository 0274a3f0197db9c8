//! CPUID: the real CPU's answers, minus what guests do not get, plus the
//! hypervisor bit and our leaves at 0x40000000. Every feature advertised
//! works as the SDM says or is hidden: what is hidden is what would need an
//! MSR the hypervisor does not give guests (machine checks, debug store,
//! performance monitoring, thermal and power management, TSC adjust and
//! deadline, speculation controls, MPX, PT, SGX, RDT, WAITPKG), or hardware
//! it keeps (VMX, SMX, MONITOR/MWAIT, x2APIC, XSAVES). [`FEATURE_MSRS`]
//! lists each feature with its MSRs; a test holds it against the MSR
//! handling so the two cannot drift apart. Kept short: it is the cheapest
//! exit and the figure of merit.

use crate::abi;
use crate::vcpu::cr::guest_cr4;

use super::{ExitCtx, Flow};
use crate::platform::Platform;
use crate::vcpu::events::advance_rip;
use crate::vmx::Cpu;

const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const CR4_OSXSAVE: u64 = 1 << 18;

/// Leaf 1 ECX: DTES64 (2), MONITOR (3), DS-CPL (4), VMX (5), SMX (6),
/// EST (7), TM2 (8), xTPR (14), PDCM (15), x2APIC (21), TSC-deadline (24),
/// OSXSAVE (27, follows the guest's CR4).
const LEAF1_ECX_HIDDEN: u32 = 1 << 2
    | 1 << 3
    | 1 << 4
    | 1 << 5
    | 1 << 6
    | 1 << 7
    | 1 << 8
    | 1 << 14
    | 1 << 15
    | 1 << 21
    | 1 << 24
    | LEAF1_ECX_OSXSAVE;
/// Leaf 1 EDX: MCE (7), MCA (14), DS (21), ACPI thermal (22), TM (29), PBE (31).
const LEAF1_EDX_HIDDEN: u32 = 1 << 7 | 1 << 14 | 1 << 21 | 1 << 22 | 1 << 29 | 1 << 31;
/// Leaf 7 EBX: TSC_ADJUST (1), SGX (2), PQM (12), MPX (14), PQE (15),
/// Intel PT (25).
const LEAF7_EBX_HIDDEN: u32 = 1 << 1 | 1 << 2 | 1 << 12 | 1 << 14 | 1 << 15 | 1 << 25;
/// Leaf 7 ECX: WAITPKG (5), SGX launch control (30), PKS (31).
const LEAF7_ECX_HIDDEN: u32 = 1 << 5 | 1 << 30 | 1 << 31;
/// Leaf 7 EDX: PCONFIG (18), IBRS/IBPB (26), STIBP (27), L1D_FLUSH (28),
/// ARCH_CAPABILITIES (29), CORE_CAPABILITIES (30), SSBD (31).
const LEAF7_EDX_HIDDEN: u32 = 1 << 18 | 0x3f << 26;
/// Leaf 0xD subleaf 1 EAX: XSAVES/XRSTORS (3): IA32_XSS is not emulated.
const LEAF_D1_EAX_XSAVES: u32 = 1 << 3;

/// A CPUID feature bit: leaf, subleaf, register (0 EAX .. 3 EDX), bit.
#[cfg(test)]
type FeatureBit = (u32, u32, usize, u32);

/// Features that come with MSRs, and those MSRs (Intel SDM Vol. 4 and the
/// CPUID leaf descriptions of Vol. 2A). A feature the guest sees must have
/// every one of its MSRs handled (the test below checks it).
#[cfg(test)]
const FEATURE_MSRS: &[(FeatureBit, &[u32])] = &[
    ((1, 0, 3, 4), &[0x10]),                       // TSC: IA32_TIME_STAMP_COUNTER
    ((1, 0, 3, 7), &[0x179, 0x17a]),               // MCE: IA32_MCG_CAP, STATUS
    ((1, 0, 3, 9), &[0x1b]),                       // APIC: IA32_APIC_BASE
    ((1, 0, 3, 11), &[0x174, 0x175, 0x176]),       // SEP: SYSENTER
    ((1, 0, 3, 12), &[0xfe, 0x2ff, 0x200, 0x250]), // MTRR
    ((1, 0, 3, 14), &[0x179, 0x17b]),              // MCA
    ((1, 0, 3, 16), &[0x277]),                     // PAT
    ((1, 0, 3, 21), &[0x600]),                     // DS: IA32_DS_AREA
    ((1, 0, 3, 22), &[0x19a, 0x19b, 0x19c]),       // ACPI: thermal control
    ((1, 0, 3, 29), &[0x19c]),                     // TM
    ((1, 0, 2, 2), &[0x600]),                      // DTES64
    ((1, 0, 2, 4), &[0x600]),                      // DS-CPL
    ((1, 0, 2, 5), &[0x3a, 0x480]),                // VMX
    ((1, 0, 2, 7), &[0x198, 0x199]),               // EST: PERF_STATUS/CTL
    ((1, 0, 2, 14), &[0x1a0]),                     // xTPR: MISC_ENABLE bit 23
    ((1, 0, 2, 15), &[0x345]),                     // PDCM: PERF_CAPABILITIES
    ((1, 0, 2, 21), &[0x802, 0x80f]),              // x2APIC
    ((1, 0, 2, 24), &[0x6e0]),                     // TSC-deadline
    ((6, 0, 2, 0), &[0xe7, 0xe8]),                 // APERF/MPERF
    ((6, 0, 2, 3), &[0x1b0]),                      // ENERGY_PERF_BIAS
    ((6, 0, 0, 7), &[0x770, 0x771]),               // HWP
    ((7, 0, 1, 1), &[0x3b]),                       // TSC_ADJUST
    ((7, 0, 1, 14), &[0xd90]),                     // MPX: BNDCFGS
    ((7, 0, 1, 25), &[0x570]),                     // Intel PT: RTIT_CTL
    ((7, 0, 2, 5), &[0xe1]),                       // WAITPKG: UMWAIT_CONTROL
    ((7, 0, 3, 26), &[0x48, 0x49]),                // IBRS/IBPB
    ((7, 0, 3, 27), &[0x48]),                      // STIBP
    ((7, 0, 3, 28), &[0x10b]),                     // L1D_FLUSH
    ((7, 0, 3, 29), &[0x10a]),                     // ARCH_CAPABILITIES
    ((7, 0, 3, 30), &[0xcf]),                      // CORE_CAPABILITIES
    ((7, 0, 3, 31), &[0x48]),                      // SSBD
    ((0xd, 1, 0, 3), &[0xda0]),                    // XSAVES: IA32_XSS
    (
        (0x8000_0001, 0, 3, 11),
        &[0xc000_0081, 0xc000_0082, 0xc000_0084],
    ), // SYSCALL
    ((0x8000_0001, 0, 3, 27), &[0xc000_0103]),     // RDTSCP: TSC_AUX
];

/// What the guest sees for `leaf`/`subleaf`, given the real CPU's answer
/// (`native`, only called for leaves outside the hypervisor range), the
/// guest's CR4 and the [`abi::feature`] bits its VM has.
pub fn guest_cpuid(
    leaf: u32,
    subleaf: u32,
    native: impl FnOnce(u32, u32) -> [u32; 4],
    cr4: u64,
    features: u32,
) -> [u32; 4] {
    match leaf {
        abi::CPUID_BASE => {
            let s = abi::CPUID_SIGNATURE;
            let word = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
            [abi::CPUID_FEATURES, word(0), word(4), word(8)]
        }
        abi::CPUID_FEATURES => [abi::VERSION as u32, features, 0, 0],
        0x4000_0002..=0x4000_00ff => [0; 4],
        // MONITOR/MWAIT, thermal and power management, the architectural
        // PMU, RDT monitoring and allocation, SGX, Intel PT: not offered.
        0x5 | 0x6 | 0xa | 0xf | 0x10 | 0x12 | 0x14 => [0; 4],
        0xd if subleaf == 1 => {
            let [eax, ebx, ecx, edx] = native(leaf, subleaf);
            [eax & !LEAF_D1_EAX_XSAVES, ebx, ecx, edx]
        }
        7 if subleaf == 0 => {
            let [eax, ebx, ecx, edx] = native(leaf, subleaf);
            [
                eax,
                ebx & !LEAF7_EBX_HIDDEN,
                ecx & !LEAF7_ECX_HIDDEN,
                edx & !LEAF7_EDX_HIDDEN,
            ]
        }
        1 => {
            let [eax, ebx, mut ecx, edx] = native(leaf, subleaf);
            ecx &= !LEAF1_ECX_HIDDEN;
            ecx |= LEAF1_ECX_HYPERVISOR;
            if cr4 & CR4_OSXSAVE != 0 {
                ecx |= LEAF1_ECX_OSXSAVE;
            }
            [eax, ebx, ecx, edx & !LEAF1_EDX_HIDDEN]
        }
        _ => native(leaf, subleaf),
    }
}

pub fn handle<C: Cpu, P: Platform>(ctx: &mut ExitCtx<'_, C, P>) -> Flow {
    let (leaf, subleaf) = (ctx.vcpu.regs.rax as u32, ctx.vcpu.regs.rcx as u32);
    let cpu = &*ctx.cpu;
    let cr4 = if leaf == 1 { guest_cr4(&*ctx.cpu) } else { 0 };
    let features = ctx.vm.features.abi_bits();
    let [a, b, c, d] = guest_cpuid(leaf, subleaf, |l, s| cpu.cpuid(l, s), cr4, features);
    (
        ctx.vcpu.regs.rax,
        ctx.vcpu.regs.rbx,
        ctx.vcpu.regs.rcx,
        ctx.vcpu.regs.rdx,
    ) = (a.into(), b.into(), c.into(), d.into());
    advance_rip(ctx.cpu);
    Flow::Resume
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exits::msr;

    #[test]
    fn hypervisor_leaf_carries_our_signature() {
        let [max, b, c, d] = guest_cpuid(abi::CPUID_BASE, 0, |_, _| unreachable!(), 0, 0);
        assert_eq!(max, abi::CPUID_FEATURES);
        let mut sig = [0u8; 12];
        sig[..4].copy_from_slice(&b.to_le_bytes());
        sig[4..8].copy_from_slice(&c.to_le_bytes());
        sig[8..].copy_from_slice(&d.to_le_bytes());
        assert_eq!(&sig, b"RustAltp2mHV");
    }

    #[test]
    fn the_feature_leaf_carries_the_version_and_the_vms_features() {
        let unused = |_, _| unreachable!();
        let features = abi::feature::VMFUNC | abi::feature::PML;
        let [version, ebx, ecx, edx] = guest_cpuid(abi::CPUID_FEATURES, 0, unused, 0, features);
        assert_eq!(u64::from(version), abi::VERSION);
        assert_eq!((ebx, ecx, edx), (features, 0, 0));
    }

    #[test]
    fn leaf1_hides_vmx_and_sets_the_hypervisor_bit() {
        let native = |_, _| [0x906ea, 0, u32::MAX, 0];
        let [_, _, ecx, _] = guest_cpuid(1, 0, native, 0, 0);
        assert_eq!(ecx & 1 << 5, 0, "VMX");
        assert_eq!(ecx & 1 << 21, 0, "x2APIC");
        assert_eq!(
            ecx & LEAF1_ECX_OSXSAVE,
            0,
            "OSXSAVE follows the guest's CR4"
        );
        assert_ne!(ecx & LEAF1_ECX_HYPERVISOR, 0);
        let [_, _, ecx, _] = guest_cpuid(1, 0, native, CR4_OSXSAVE, 0);
        assert_ne!(ecx & LEAF1_ECX_OSXSAVE, 0);
    }

    /// On a CPU that has every feature, every one the guest is still told
    /// about has all its MSRs handled (passed through or emulated).
    #[test]
    fn every_advertised_feature_has_its_msrs() {
        let all = |_, _| [u32::MAX; 4];
        let mut advertised = 0;
        for &((leaf, subleaf, reg, bit), msrs) in FEATURE_MSRS {
            let regs = guest_cpuid(leaf, subleaf, all, CR4_OSXSAVE, 0);
            if regs[reg] & 1 << bit == 0 {
                continue;
            }
            advertised += 1;
            for &m in msrs {
                assert!(
                    msr::handled(m),
                    "CPUID {leaf:#x}.{subleaf} reg {reg} bit {bit} is advertised, but MSR {m:#x} raises #GP"
                );
            }
        }
        // TSC, APIC, SEP, MTRR, PAT, SYSCALL and RDTSCP stay.
        assert_eq!(advertised, 7, "the table covers the basic features too");
    }

    /// A feature CPUID hides has its CR4 bit refused (`vcpu::cr::CR4_HIDDEN`),
    /// as on a CPU without it; one it shows has its bit free.
    #[test]
    fn cr4_bits_of_hidden_features_are_refused() {
        use crate::vcpu::cr::CR4_HIDDEN;
        // CR4 bit, and the CPUID bit that offers its feature.
        const CR4_FEATURES: [(u32, (u32, usize, u32)); 6] = [
            (6, (1, 3, 7)),   // MCE
            (14, (1, 2, 6)),  // SMXE
            (24, (7, 2, 31)), // PKS
            (22, (7, 2, 3)),  // PKE
            (20, (7, 1, 7)),  // SMEP
            (16, (7, 1, 0)),  // FSGSBASE
        ];
        let all = |_, _| [u32::MAX; 4];
        for (cr4_bit, (leaf, reg, bit)) in CR4_FEATURES {
            let shown = guest_cpuid(leaf, 0, all, 0, 0)[reg] & 1 << bit != 0;
            assert_eq!(
                CR4_HIDDEN & 1 << cr4_bit == 0,
                shown,
                "CR4 bit {cr4_bit}: CPUID {leaf:#x} reg {reg} bit {bit} shown {shown}"
            );
        }
    }
}
