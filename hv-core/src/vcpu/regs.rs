//! The guest's general registers while the hypervisor runs.

use x86::vmx::vmcs::guest;

use crate::vmx::vmcs::Vmcs;

/// The guest's general registers while the hypervisor runs (RSP and RIP live
/// in the VMCS). The layout is fixed: the entry assembly uses the offsets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestRegisters {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
}

impl GuestRegisters {
    /// General register by its encoding in exit qualifications (0 = RAX ..
    /// 15 = R15; 4 = RSP, which lives in the VMCS).
    pub fn get(&self, index: u8, vmcs: &impl Vmcs) -> u64 {
        match index {
            0 => self.rax,
            1 => self.rcx,
            2 => self.rdx,
            3 => self.rbx,
            4 => vmcs.read(guest::RSP),
            5 => self.rbp,
            6 => self.rsi,
            7 => self.rdi,
            8 => self.r8,
            9 => self.r9,
            10 => self.r10,
            11 => self.r11,
            12 => self.r12,
            13 => self.r13,
            14 => self.r14,
            _ => self.r15,
        }
    }

    pub fn set(&mut self, index: u8, value: u64, vmcs: &mut impl Vmcs) {
        match index {
            0 => self.rax = value,
            1 => self.rcx = value,
            2 => self.rdx = value,
            3 => self.rbx = value,
            4 => vmcs.write(guest::RSP, value),
            5 => self.rbp = value,
            6 => self.rsi = value,
            7 => self.rdi = value,
            8 => self.r8 = value,
            9 => self.r9 = value,
            10 => self.r10 = value,
            11 => self.r11 = value,
            12 => self.r12 = value,
            13 => self.r13 = value,
            14 => self.r14 = value,
            _ => self.r15 = value,
        }
    }

    /// EDX:EAX as one value (RDMSR/WRMSR/XSETBV operands).
    pub fn edx_eax(&self) -> u64 {
        (self.rdx & 0xffff_ffff) << 32 | (self.rax & 0xffff_ffff)
    }

    /// Writes a value to EDX:EAX, clearing the upper halves as the CPU does.
    pub fn set_edx_eax(&mut self, value: u64) {
        self.rax = value & 0xffff_ffff;
        self.rdx = value >> 32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmx::vmcs::tests::FakeVmcs;

    #[test]
    fn register_layout_matches_the_assembly() {
        assert_eq!(core::mem::offset_of!(GuestRegisters, rdi), 0x28);
        assert_eq!(core::mem::offset_of!(GuestRegisters, r15), 0x70);
        assert_eq!(core::mem::size_of::<GuestRegisters>(), 15 * 8);
    }

    #[test]
    fn register_encoding_follows_the_sdm() {
        let mut vmcs = FakeVmcs::default();
        let mut regs = GuestRegisters::default();
        regs.set(3, 0xb, &mut vmcs);
        regs.set(4, 0x5000, &mut vmcs);
        assert_eq!(regs.rbx, 0xb);
        assert_eq!(vmcs.read(guest::RSP), 0x5000);
        assert_eq!(regs.get(4, &vmcs), 0x5000);
        regs.set_edx_eax(0x1234_5678_9abc_def0);
        assert_eq!((regs.rdx, regs.rax), (0x1234_5678, 0x9abc_def0));
        assert_eq!(regs.edx_eax(), 0x1234_5678_9abc_def0);
    }
}
