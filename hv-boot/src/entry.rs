//! Multiboot headers and the 32-bit entry that switches to 64-bit long mode.
//!
//! Hand-written because the first instructions run in 32-bit protected mode
//! without a stack or paging, before any Rust code can: no crate provides a
//! Multiboot 1+2 trampoline for a custom-linked kernel. It builds an identity
//! map of the low 4 GiB with 2 MiB pages (enough to reach Rust; `memory`
//! extends the direct map to all RAM), enables PAE + long mode + paging and
//! calls `kmain(magic, boot_info_address)`.
//!
//! The assembly lives in `multiboot_entry.s`, shared with the test guest.
//!
//! Two headers: Multiboot 2 for GRUB (`multiboot2` in grub.cfg, loads the ELF
//! segments) and Multiboot 1 with address fields for QEMU's `-kernel`, which
//! refuses ELF64 images unless the header says where to load the file.

core::arch::global_asm!(include_str!("multiboot_entry.s"), kmain = sym crate::kmain);
