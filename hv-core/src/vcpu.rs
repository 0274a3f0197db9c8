//! A virtual CPU: its general registers, entering the guest (VMLAUNCH /
//! VMRESUME) and the small state changes exit handlers make (advance RIP,
//! inject an exception).

use x86::vmx::vmcs::{control, guest, ro};

use crate::vmcs::Vmcs;

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

/// Interruption types for VM-entry event injection (SDM Vol. 3C
/// "VM-Entry Controls for Event Injection").
const TYPE_HARDWARE_EXCEPTION: u64 = 3;
pub const TYPE_SOFTWARE_INTERRUPT: u64 = 4;
pub const TYPE_PRIVILEGED_SOFTWARE_EXCEPTION: u64 = 5;
pub const TYPE_SOFTWARE_EXCEPTION: u64 = 6;
const DELIVER_ERROR_CODE: u64 = 1 << 11;
pub const VALID: u64 = 1 << 31;

/// Interruptibility: blocking by STI (bit 0) and by MOV SS (bit 1).
pub const BLOCKING_STI_MOVSS: u64 = 0b11;
/// Pending debug exceptions: single step (BS).
pub const PENDING_BS: u64 = 1 << 14;
const RFLAGS_TF: u64 = 1 << 8;
const CR0_PE: u64 = 1;
/// CS access rights: the L bit (64-bit code).
const CS_LONG: u64 = 1 << 13;

/// The VPID of guest vCPUs (the hypervisor runs with VPID 0).
pub const GUEST_VPID: u16 = 1;

/// Whether the guest executes 64-bit code (IA-32e mode and CS.L).
pub fn in_64bit_mode(vmcs: &impl Vmcs) -> bool {
    vmcs.read(control::VMENTRY_CONTROLS) & crate::cr::ENTRY_IA32E_MODE != 0
        && vmcs.read(guest::CS_ACCESS_RIGHTS) & CS_LONG != 0
}

/// Moves the guest past the instruction that caused the exit, as the CPU
/// would have: EIP wraps at 4 GiB outside 64-bit mode, an STI or MOV SS
/// shadow ends, and a guest single-stepping with TF gets its #DB.
pub fn advance_rip(vmcs: &mut impl Vmcs) {
    let rip = vmcs.read(guest::RIP);
    let len = vmcs.read(ro::VMEXIT_INSTRUCTION_LEN);
    let mut next = rip.wrapping_add(len);
    if next > 0xffff_ffff && !in_64bit_mode(vmcs) {
        next &= 0xffff_ffff;
    }
    vmcs.write(guest::RIP, next);
    let state = vmcs.read(guest::INTERRUPTIBILITY_STATE);
    if state & BLOCKING_STI_MOVSS != 0 {
        vmcs.write(guest::INTERRUPTIBILITY_STATE, state & !BLOCKING_STI_MOVSS);
    }
    if vmcs.read(guest::RFLAGS) & RFLAGS_TF != 0 {
        let pending = vmcs.read(guest::PENDING_DBG_EXCEPTIONS);
        vmcs.write(guest::PENDING_DBG_EXCEPTIONS, pending | PENDING_BS);
    }
}

/// Exception vectors the hypervisor injects or intercepts.
pub mod vector {
    pub const DB: u8 = 1;
    pub const BP: u8 = 3;
    pub const UD: u8 = 6;
    pub const GP: u8 = 13;
    pub const MC: u8 = 18;
}

/// Makes the next VM entry deliver hardware exception `vector` to the guest.
/// In real mode no error code is pushed (SDM Vol. 3C 26.2.1.3: with
/// unrestricted guest and CR0.PE = 0, "deliver error code" must be 0).
pub fn inject_exception(vmcs: &mut impl Vmcs, vector: u8, error_code: Option<u32>) {
    let mut info = u64::from(vector) | TYPE_HARDWARE_EXCEPTION << 8 | VALID;
    if let Some(code) = error_code.filter(|_| vmcs.read(guest::CR0) & CR0_PE != 0) {
        info |= DELIVER_ERROR_CODE;
        vmcs.write(control::VMENTRY_EXCEPTION_ERR_CODE, u64::from(code));
    }
    vmcs.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, info);
}

/// Makes the next VM entry deliver software exception `vector` (INT3,
/// INTO) of an instruction `len` bytes long.
pub fn inject_software_exception(vmcs: &mut impl Vmcs, vector: u8, len: u64) {
    vmcs.write(control::VMENTRY_INSTRUCTION_LEN, len);
    let info = u64::from(vector) | TYPE_SOFTWARE_EXCEPTION << 8 | VALID;
    vmcs.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, info);
}

/// Whether the next VM entry injects an event.
pub fn injecting(vmcs: &impl Vmcs) -> bool {
    vmcs.read(control::VMENTRY_INTERRUPTION_INFO_FIELD) & VALID != 0
}

/// If the exit interrupted the delivery of an event (IDT-vectoring
/// information valid), delivers it again on the next entry (SDM Vol. 3C
/// 27.2.4, "Information for VM Exits During Event Delivery"). Returns
/// whether there was one.
pub fn reinject_vectoring(vmcs: &mut impl Vmcs) -> bool {
    let info = vmcs.read(ro::IDT_VECTORING_INFO);
    if info & VALID == 0 || injecting(vmcs) {
        return false;
    }
    if info & DELIVER_ERROR_CODE != 0 {
        vmcs.write(
            control::VMENTRY_EXCEPTION_ERR_CODE,
            vmcs.read(ro::IDT_VECTORING_ERR_CODE),
        );
    }
    let kind = (info >> 8) & 7;
    if matches!(
        kind,
        TYPE_SOFTWARE_INTERRUPT | TYPE_PRIVILEGED_SOFTWARE_EXCEPTION | TYPE_SOFTWARE_EXCEPTION
    ) {
        vmcs.write(
            control::VMENTRY_INSTRUCTION_LEN,
            vmcs.read(ro::VMEXIT_INSTRUCTION_LEN),
        );
    }
    // Bit 12 is undefined in the vectoring information; reserved at entry.
    vmcs.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, info & !(1 << 12));
    true
}

/// The guest's current privilege level (DPL of SS, SDM Vol. 3A 5.5).
pub fn guest_cpl(vmcs: &impl Vmcs) -> u8 {
    ((vmcs.read(guest::SS_ACCESS_RIGHTS) >> 5) & 3) as u8
}

/// How an attempt to enter the guest ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// The guest ran and a VM exit brought us back.
    Exited,
    /// VMLAUNCH/VMRESUME failed without a current VMCS (VMfailInvalid).
    FailInvalid,
    /// VMLAUNCH/VMRESUME failed; the VM-instruction error field says why.
    FailValid,
}

unsafe extern "C" {
    /// Loads `regs`, enters the guest with VMLAUNCH (`launched` = 0) or
    /// VMRESUME, and on VM exit stores the guest's registers back into `regs`.
    /// Returns 0 after a VM exit, 1 for VMfailInvalid, 2 for VMfailValid.
    fn vmx_enter(regs: *mut GuestRegisters, launched: u64) -> u64;
}

/// Enters the guest of the current VMCS and returns at its next VM exit.
///
/// # Safety
///
/// VMX must be on, the current VMCS must be fully set up for this guest, and
/// its host-state RIP must be `vmx_exit_entry` (see [`exit_entry_address`]).
pub unsafe fn enter(regs: &mut GuestRegisters, launched: bool) -> Entry {
    // SAFETY: forwarded from the caller; `regs` is a valid, exclusive pointer.
    match unsafe { vmx_enter(regs, u64::from(launched)) } {
        0 => Entry::Exited,
        1 => Entry::FailInvalid,
        _ => Entry::FailValid,
    }
}

unsafe extern "C" {
    static vmx_exit_entry: u8;
}

/// The host RIP for VM exits: where `vmx_enter` resumes.
pub fn exit_entry_address() -> u64 {
    &raw const vmx_exit_entry as u64
}

// VM entry and exit. Host RSP is set to the stack right here on every entry,
// with the `regs` pointer on top, so the exit path finds it. Only the
// callee-saved registers need saving: the host uses no FPU/SSE state
// (soft-float target), so the guest's stays live in the CPU.
core::arch::global_asm!(
    r#"
    .section .text.vmx, "ax"
    .global vmx_enter
vmx_enter:
    push rbp
    push rbx
    push r12
    push r13
    push r14
    push r15
    push rdi
    mov rax, 0x6C14
    vmwrite rax, rsp
    test rsi, rsi
    mov rax, [rdi + 0x00]
    mov rbx, [rdi + 0x08]
    mov rcx, [rdi + 0x10]
    mov rdx, [rdi + 0x18]
    mov rsi, [rdi + 0x20]
    mov rbp, [rdi + 0x30]
    mov r8,  [rdi + 0x38]
    mov r9,  [rdi + 0x40]
    mov r10, [rdi + 0x48]
    mov r11, [rdi + 0x50]
    mov r12, [rdi + 0x58]
    mov r13, [rdi + 0x60]
    mov r14, [rdi + 0x68]
    mov r15, [rdi + 0x70]
    mov rdi, [rdi + 0x28]
    jnz 1f
    vmlaunch
    jmp 2f
1:
    vmresume
2:
    mov eax, 2
    jz 3f
    mov eax, 1
3:
    add rsp, 8
    jmp 4f

    .global vmx_exit_entry
vmx_exit_entry:
    push rdi
    mov rdi, [rsp + 8]
    mov [rdi + 0x00], rax
    mov [rdi + 0x08], rbx
    mov [rdi + 0x10], rcx
    mov [rdi + 0x18], rdx
    mov [rdi + 0x20], rsi
    mov [rdi + 0x30], rbp
    mov [rdi + 0x38], r8
    mov [rdi + 0x40], r9
    mov [rdi + 0x48], r10
    mov [rdi + 0x50], r11
    mov [rdi + 0x58], r12
    mov [rdi + 0x60], r13
    mov [rdi + 0x68], r14
    mov [rdi + 0x70], r15
    pop rax
    mov [rdi + 0x28], rax
    add rsp, 8
    xor eax, eax
4:
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbx
    pop rbp
    ret
"#
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmcs::tests::FakeVmcs;

    #[test]
    fn register_layout_matches_the_assembly() {
        assert_eq!(core::mem::offset_of!(GuestRegisters, rdi), 0x28);
        assert_eq!(core::mem::offset_of!(GuestRegisters, r15), 0x70);
        assert_eq!(core::mem::size_of::<GuestRegisters>(), 15 * 8);
    }

    #[test]
    fn advance_rip_skips_the_instruction_and_ends_an_sti_shadow() {
        let mut vmcs = FakeVmcs::default();
        vmcs.write(guest::RIP, 0x1000);
        vmcs.write(ro::VMEXIT_INSTRUCTION_LEN, 3);
        vmcs.write(guest::INTERRUPTIBILITY_STATE, 0b1001);
        advance_rip(&mut vmcs);
        assert_eq!(vmcs.read(guest::RIP), 0x1003);
        assert_eq!(vmcs.read(guest::INTERRUPTIBILITY_STATE), 0b1000);
    }

    #[test]
    fn gp_injection_carries_its_error_code() {
        let mut vmcs = FakeVmcs::default();
        vmcs.write(guest::CR0, CR0_PE);
        inject_exception(&mut vmcs, vector::GP, Some(0));
        assert_eq!(
            vmcs.read(control::VMENTRY_INTERRUPTION_INFO_FIELD),
            0x8000_0b0d
        );
        inject_exception(&mut vmcs, vector::UD, None);
        assert_eq!(
            vmcs.read(control::VMENTRY_INTERRUPTION_INFO_FIELD),
            0x8000_0306
        );
    }

    #[test]
    fn real_mode_injection_has_no_error_code() {
        let mut vmcs = FakeVmcs::default();
        inject_exception(&mut vmcs, vector::GP, Some(0));
        assert_eq!(
            vmcs.read(control::VMENTRY_INTERRUPTION_INFO_FIELD),
            0x8000_030d
        );
    }

    #[test]
    fn outside_64_bit_mode_eip_wraps_and_tf_gets_its_debug_trap() {
        let mut vmcs = FakeVmcs::default();
        vmcs.write(guest::RIP, 0xffff_fffe);
        vmcs.write(ro::VMEXIT_INSTRUCTION_LEN, 3);
        vmcs.write(guest::RFLAGS, 0x2 | RFLAGS_TF);
        advance_rip(&mut vmcs);
        assert_eq!(vmcs.read(guest::RIP), 1);
        assert_eq!(vmcs.read(guest::PENDING_DBG_EXCEPTIONS), PENDING_BS);
    }

    #[test]
    fn an_event_cut_short_by_an_exit_is_delivered_again() {
        let mut vmcs = FakeVmcs::default();
        vmcs.write(
            ro::IDT_VECTORING_INFO,
            VALID | 3 << 8 | DELIVER_ERROR_CODE | 14,
        );
        vmcs.write(ro::IDT_VECTORING_ERR_CODE, 2);
        assert!(reinject_vectoring(&mut vmcs));
        assert_eq!(
            vmcs.read(control::VMENTRY_INTERRUPTION_INFO_FIELD),
            VALID | 3 << 8 | DELIVER_ERROR_CODE | 14
        );
        assert_eq!(vmcs.read(control::VMENTRY_EXCEPTION_ERR_CODE), 2);
        assert!(
            !reinject_vectoring(&mut vmcs),
            "an injection is already set up"
        );
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
