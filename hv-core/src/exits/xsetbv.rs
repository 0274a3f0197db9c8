//! XSETBV: the guest sets XCR0. The value is checked against what the CPU
//! supports (SDM Vol. 1 13.3) and set on the real CPU.

use super::{ExitCtx, Flow};
use crate::platform::Platform;
use crate::vcpu::events::advance_rip;
use crate::vmx::Cpu;

const X87: u64 = 1 << 0;
const SSE: u64 = 1 << 1;
const AVX: u64 = 1 << 2;
const BNDREGS_BNDCSR: u64 = 0b11 << 3;
const AVX512: u64 = 0b111 << 5;
const PKRU: u64 = 1 << 9;
const AMX: u64 = 0b11 << 17;
/// The XCR0 components whose rules this handler knows; any other bit is
/// refused, so a value the real XSETBV would reject never reaches it.
const KNOWN: u64 = X87 | SSE | AVX | BNDREGS_BNDCSR | AVX512 | PKRU | AMX;

/// Whether `value` is a valid XCR0 on a CPU supporting `supported` (SDM
/// Vol. 1 13.3): x87 always on, AVX needs SSE, MPX and AMX components in
/// pairs, AVX-512 all three together and with AVX.
pub fn valid_xcr0(value: u64, supported: u64) -> bool {
    let pair = |bits: u64| value & bits == 0 || value & bits == bits;
    value & X87 != 0
        && value & !(supported & KNOWN) == 0
        && (value & AVX == 0 || value & SSE != 0)
        && pair(BNDREGS_BNDCSR)
        && pair(AMX)
        && (value & AVX512 == 0 || (value & AVX512 == AVX512 && value & AVX != 0))
}

pub fn handle<C: Cpu, P: Platform>(ctx: &mut ExitCtx<'_, C, P>) -> Flow {
    let index = ctx.vcpu.regs.rcx as u32;
    let value = ctx.vcpu.regs.edx_eax();
    let [eax, _, _, edx] = ctx.cpu.cpuid(0xd, 0);
    let supported = u64::from(edx) << 32 | u64::from(eax);
    if index != 0 || !valid_xcr0(value, supported) {
        return ctx.general_protection();
    }
    ctx.cpu.xsetbv(0, value);
    advance_rip(ctx.cpu);
    Flow::Resume
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xcr0_rules() {
        let supported = 0b111;
        assert!(valid_xcr0(0b1, supported));
        assert!(valid_xcr0(0b111, supported));
        assert!(!valid_xcr0(0b0, supported), "x87 must stay on");
        assert!(!valid_xcr0(0b101, supported), "AVX needs SSE");
        assert!(!valid_xcr0(0b1011, supported), "unsupported bit");
        let amx = 0b11 << 17 | 0b111;
        assert!(valid_xcr0(amx, amx));
        assert!(
            !valid_xcr0(1 << 17 | 0b111, amx),
            "AMX tile config without tile data"
        );
        assert!(
            !valid_xcr0(1 << 40 | 1, u64::MAX),
            "a component the handler does not know"
        );
    }
}
