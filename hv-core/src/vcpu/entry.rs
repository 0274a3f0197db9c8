//! Entering the guest (VMLAUNCH / VMRESUME) and coming back at its next VM
//! exit.

use super::regs::GuestRegisters;

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
