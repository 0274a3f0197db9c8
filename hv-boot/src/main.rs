//! hv-boot: the multiboot-loaded kernel that brings up the machine and starts the hypervisor.
#![no_std]
#![no_main]

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}
