# The application processors' way from a start-up IPI to Rust.
#
# Copied by `ap_start::write_trampoline` to ap_start::TRAMPOLINE (0x8000,
# SIPI vector 0x08) before the INIT-SIPI-SIPI (the hypervisor's CPUs and the
# test guest's vCPUs alike):
# a processor starts here in real mode with CS = 0x0800, IP = 0. It loads the
# small GDT placed at TRAMPOLINE + 0xE00, enters protected mode, turns on
# PAE with the kernel's page tables (CR3 from the parameter block at
# TRAMPOLINE + 0xF00, below 4 GiB), long mode and paging, and calls the
# 64-bit entry with the stack and the CPU index of the parameter block:
#   +0xF00 u32 CR3   +0xF08 u64 stack top   +0xF10 u64 entry   +0xF18 u64 index
# Position-dependent on purpose: every absolute address is TRAMPOLINE
# plus an offset inside the copied page.

    .section .rodata.ap_trampoline, "a"
    .global ap_trampoline_start
    .global ap_trampoline_end
    .code16
ap_trampoline_start:
    cli
    cld
    mov ax, cs
    mov ds, ax
    lgdt [0xE40]
    mov eax, cr0
    or al, 1
    mov cr0, eax
    # jmp far 0x08:(0x8000 + ap32 - ap_trampoline_start), 32-bit offset
    .byte 0x66, 0xEA
    .long 0x8000 + (ap32 - ap_trampoline_start)
    .short 0x08

    .code32
ap32:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov eax, cr4
    or eax, 0x20
    mov cr4, eax
    mov eax, dword ptr [0x8F00]
    mov cr3, eax
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, cr0
    or eax, 0x80000001
    mov cr0, eax
    # jmp far 0x18:(0x8000 + ap64 - ap_trampoline_start)
    .byte 0xEA
    .long 0x8000 + (ap64 - ap_trampoline_start)
    .short 0x18

    .code64
ap64:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov rsp, qword ptr [0x8F08]
    mov rdi, qword ptr [0x8F18]
    mov rax, qword ptr [0x8F10]
    call rax
    ud2
ap_trampoline_end:
