//! CPUID: the real CPU's answers, minus what guests do not get (VMX, SMX,
//! MONITOR/MWAIT, x2APIC, the PMU), plus the hypervisor bit and our leaves
//! at 0x40000000. Kept short: it is the cheapest exit and the figure of merit.

use crate::abi;
use crate::vcpu::cr::guest_cr4;

use super::{ExitCtx, Flow};
use crate::platform::Platform;
use crate::vcpu::events::advance_rip;
use crate::vmx::Cpu;

const LEAF1_ECX_MONITOR: u32 = 1 << 3;
const LEAF1_ECX_VMX: u32 = 1 << 5;
const LEAF1_ECX_SMX: u32 = 1 << 6;
const LEAF1_ECX_X2APIC: u32 = 1 << 21;
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const CR4_OSXSAVE: u64 = 1 << 18;
const LEAF_D1_EAX_XSAVES: u32 = 1 << 3;

/// What the guest sees for `leaf`/`subleaf`, given the real CPU's answer
/// (`native`, only called for leaves outside the hypervisor range) and the
/// guest's CR4.
pub fn guest_cpuid(
    leaf: u32,
    subleaf: u32,
    native: impl FnOnce(u32, u32) -> [u32; 4],
    cr4: u64,
) -> [u32; 4] {
    match leaf {
        abi::CPUID_BASE => {
            let s = abi::CPUID_SIGNATURE;
            let word = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
            [abi::CPUID_FEATURES, word(0), word(4), word(8)]
        }
        abi::CPUID_FEATURES => [abi::VERSION as u32, 0, 0, 0],
        0x4000_0002..=0x4000_00ff => [0; 4],
        // MONITOR/MWAIT and the architectural PMU are not offered.
        0x5 | 0xa => [0; 4],
        // XSAVES/XRSTORS are not enabled for guests (IA32_XSS is not emulated).
        0xd if subleaf == 1 => {
            let [eax, ebx, ecx, edx] = native(leaf, subleaf);
            [eax & !LEAF_D1_EAX_XSAVES, ebx, ecx, edx]
        }
        1 => {
            let [eax, ebx, mut ecx, edx] = native(leaf, subleaf);
            ecx &= !(LEAF1_ECX_MONITOR
                | LEAF1_ECX_VMX
                | LEAF1_ECX_SMX
                | LEAF1_ECX_X2APIC
                | LEAF1_ECX_OSXSAVE);
            ecx |= LEAF1_ECX_HYPERVISOR;
            if cr4 & CR4_OSXSAVE != 0 {
                ecx |= LEAF1_ECX_OSXSAVE;
            }
            [eax, ebx, ecx, edx]
        }
        _ => native(leaf, subleaf),
    }
}

pub fn handle<C: Cpu, P: Platform>(ctx: &mut ExitCtx<'_, C, P>) -> Flow {
    let (leaf, subleaf) = (ctx.vcpu.regs.rax as u32, ctx.vcpu.regs.rcx as u32);
    let cpu = &*ctx.cpu;
    let cr4 = if leaf == 1 { guest_cr4(&*ctx.cpu) } else { 0 };
    let [a, b, c, d] = guest_cpuid(leaf, subleaf, |l, s| cpu.cpuid(l, s), cr4);
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

    #[test]
    fn hypervisor_leaf_carries_our_signature() {
        let [max, b, c, d] = guest_cpuid(abi::CPUID_BASE, 0, |_, _| unreachable!(), 0);
        assert_eq!(max, abi::CPUID_FEATURES);
        let mut sig = [0u8; 12];
        sig[..4].copy_from_slice(&b.to_le_bytes());
        sig[4..8].copy_from_slice(&c.to_le_bytes());
        sig[8..].copy_from_slice(&d.to_le_bytes());
        assert_eq!(&sig, b"RustAltp2mHV");
    }

    #[test]
    fn leaf1_hides_vmx_and_sets_the_hypervisor_bit() {
        let native = |_, _| [0x906ea, 0, u32::MAX, 0];
        let [_, _, ecx, _] = guest_cpuid(1, 0, native, 0);
        assert_eq!(ecx & LEAF1_ECX_VMX, 0);
        assert_eq!(ecx & LEAF1_ECX_X2APIC, 0);
        assert_eq!(
            ecx & LEAF1_ECX_OSXSAVE,
            0,
            "OSXSAVE follows the guest's CR4"
        );
        assert_ne!(ecx & LEAF1_ECX_HYPERVISOR, 0);
        let [_, _, ecx, _] = guest_cpuid(1, 0, native, CR4_OSXSAVE);
        assert_ne!(ecx & LEAF1_ECX_OSXSAVE, 0);
    }
}
