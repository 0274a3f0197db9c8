# Multiboot headers and the 32-bit entry that switches to 64-bit long mode.
# Shared by the hypervisor (hv-boot/src/entry.rs) and the test guest
# (tests/guest), which both include it with `global_asm!` and supply `{kmain}`,
# the `extern "C" fn(magic: u32, info: u32) -> !` to call in 64-bit mode.
# The linker script (hv-boot/linker.ld) defines __image_start, __load_end and
# __bss_end for the Multiboot 1 address fields.
    .section .multiboot, "a"
    .balign 8
mb2_header:
    .long 0xE85250D6
    .long 0
    .long mb2_header_end - mb2_header
    .long 0x100000000 - (0xE85250D6 + (mb2_header_end - mb2_header))
    .short 0
    .short 0
    .long 8
mb2_header_end:

    .balign 4
mb1_header:
    .long 0x1BADB002
    .long 0x00010003
    .long 0x100000000 - (0x1BADB002 + 0x00010003)
    .long mb1_header
    .long __image_start
    .long __load_end
    .long __bss_end
    .long _start

    .section .text.boot, "ax"
    .code32
    .global _start
_start:
    cli
    cld
    mov esp, offset boot_stack_top
    mov edi, eax
    mov esi, ebx

    mov eax, 0x80000000
    cpuid
    cmp eax, 0x80000001
    jb no_long_mode
    mov eax, 0x80000001
    cpuid
    test edx, 0x20000000
    jz no_long_mode

    push edi
    mov edi, offset boot_pml4
    mov ecx, 6 * 1024
    xor eax, eax
    rep stosd
    pop edi

    mov eax, offset boot_pdpt
    or eax, 3
    mov dword ptr [boot_pml4], eax

    mov eax, offset boot_pd
    or eax, 3
    xor ecx, ecx
1:
    mov dword ptr [boot_pdpt + ecx * 8], eax
    add eax, 4096
    inc ecx
    cmp ecx, 4
    jb 1b

    xor ecx, ecx
2:
    mov eax, ecx
    shl eax, 21
    or eax, 0x83
    mov dword ptr [boot_pd + ecx * 8], eax
    inc ecx
    cmp ecx, 2048
    jb 2b

    mov eax, offset boot_pml4
    mov cr3, eax
    mov eax, cr4
    or eax, 0x20
    mov cr4, eax
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, cr0
    or eax, 0x80010001
    mov cr0, eax

    lgdt [boot_gdt_ptr]
    mov eax, offset long_mode_entry
    push 0x08
    push eax
    retf

no_long_mode:
    mov ebx, offset no_long_mode_msg
3:
    mov al, byte ptr [ebx]
    test al, al
    jz 4f
    out 0xE9, al
    mov dx, 0x3F8
    out dx, al
    inc ebx
    jmp 3b
4:
    mov ebx, offset bochs_shutdown
    mov dx, 0x8900
5:
    mov al, byte ptr [ebx]
    test al, al
    jz 6f
    out dx, al
    inc ebx
    jmp 5b
6:
    cli
    hlt
    jmp 6b

    .code64
long_mode_entry:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    lea rsp, [rip + boot_stack_top]
    mov edi, edi
    mov esi, esi
    call {kmain}
    ud2

    .section .rodata.boot, "a"
    .balign 8
boot_gdt:
    .quad 0
    .quad 0x00209A0000000000
    .quad 0x0000920000000000
boot_gdt_ptr:
    .short boot_gdt_ptr - boot_gdt - 1
    .long boot_gdt
no_long_mode_msg:
    .asciz "fatal: this CPU has no 64-bit long mode\nhv: exit 1\n"
bochs_shutdown:
    .asciz "Shutdown"

    .section .bss.boot, "aw", @nobits
    .balign 4096
    .global boot_pml4
boot_pml4:
    .skip 4096
    .global boot_pdpt
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4 * 4096
    .balign 16
boot_stack:
    .skip 64 * 1024
    .global boot_stack_top
boot_stack_top:
