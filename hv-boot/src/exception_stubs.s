# Entry stubs for exception vectors 0..32, shared by the hypervisor
# (hv-boot/src/arch.rs) and the test guest, which include this file with
# `global_asm!` and supply `{handler}`: `extern "C" fn(&mut ExceptionFrame)`
# (hv_boot::exception). Each stub pushes a dummy error code where the CPU
# pushes none, then the vector; the common path saves the general registers
# (the frame), calls the handler and, if it returns, resumes with the frame's
# (possibly changed) registers and RIP.

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
    mov rbx, rsp
    and rsp, -16
    cld
    call {handler}
    mov rsp, rbx
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    add rsp, 16
    iretq

    .section .rodata.exceptions, "a"
    .balign 8
    .global exception_stubs
exception_stubs:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad exception_stub_\v
    .endr
