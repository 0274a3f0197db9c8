//! hv-boot: the multiboot-loaded kernel that brings up the machine (serial log,
//! memory map, frame allocator, heap, ACPI) and starts the hypervisor. This
//! library half holds the boot logic that needs no hardware, so it is tested on
//! the host; the kernel binary (`src/main.rs`) adds what touches the machine.
#![no_std]

pub mod acpi_tables;
pub mod ap_start;
pub mod bootinfo;
pub mod cmdline;
pub mod exception;
pub mod frames;

/// Size of a 4 KiB frame.
pub const PAGE_SIZE: u64 = 4096;

/// How a run ends, as printed on the last line (`hv: exit N`) and passed to the emulator.
pub mod exit {
    /// The line prefix the test harness looks for.
    pub const LINE_PREFIX: &str = "hv: exit ";
    pub const OK: u8 = 0;
    /// The machine cannot run the hypervisor (bad boot information, no memory).
    pub const BOOT_FAILED: u8 = 1;
    /// A Rust panic in the hypervisor.
    pub const PANIC: u8 = 2;
    /// A CPU exception in the hypervisor.
    pub const CPU_EXCEPTION: u8 = 3;
    /// The hypervisor stopped its guest (a report precedes it).
    pub const GUEST_STOPPED: u8 = 4;
    /// The guest reset the machine (i8042, port 0x92 or 0xCF9).
    pub const GUEST_RESET: u8 = 5;
    /// The guest powered off (ACPI S5): a clean end, like exit status 0.
    pub const GUEST_POWERED_OFF: u8 = 0;
}
