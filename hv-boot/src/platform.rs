//! The machine underneath: port I/O, the time stamp counter, and how a run
//! ends on each engine (Bochs, QEMU, hardware).

use hv_boot::exit::LINE_PREFIX;
use spin::Once;

/// Writes a byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: the ports this kernel writes (COM2, 0xE9, the emulator exit
    // ports) have no effect on memory safety.
    unsafe { x86::io::outb(port, value) }
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    // SAFETY: reading the ports this kernel probes has no side effect on memory.
    unsafe { x86::io::inb(port) }
}

/// Time stamp counter. In Bochs it counts emulated instructions.
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC only reads a counter.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The TSC's rate in kHz, measured once against the PIT (channel 2, its
/// gate through port 0x61, 10 ms); 1 GHz if the PIT never answers. In
/// Bochs both count emulated time.
pub fn tsc_khz() -> u64 {
    static KHZ: Once<u64> = Once::new();
    *KHZ.call_once(|| {
        const PIT_HZ: u64 = 1_193_182;
        const MS: u64 = 10;
        let count = (PIT_HZ * MS / 1000) as u16;
        let saved = inb(0x61);
        // Gate 2 on, speaker off; channel 2, lobyte/hibyte, mode 0 (OUT
        // goes high at the terminal count, seen in port 0x61 bit 5).
        outb(0x61, saved & !0x02 | 0x01);
        outb(0x43, 0xb0);
        outb(0x42, count as u8);
        outb(0x42, (count >> 8) as u8);
        let start = rdtsc();
        let mut ended = false;
        for _ in 0..50_000_000u32 {
            if inb(0x61) & 0x20 != 0 {
                ended = true;
                break;
            }
            core::hint::spin_loop();
        }
        let elapsed = rdtsc() - start;
        outb(0x61, saved);
        if ended {
            (elapsed / MS).max(1)
        } else {
            1_000_000
        }
    })
}

/// Masks both legacy 8259 PICs: the hypervisor polls, and a stray timer
/// interrupt must not reach it or a guest.
pub fn mask_legacy_pic() {
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
}

/// Sets CR4.OSXSAVE when the CPU has XSAVE, so XSETBV can be executed for guests.
pub fn enable_xsave() {
    let xsave = raw_cpuid::CpuId::new()
        .get_feature_info()
        .is_some_and(|f| f.has_xsave());
    if xsave {
        // SAFETY: OSXSAVE only enables XGETBV/XSETBV/XSAVE; the hypervisor itself
        // uses no extended state.
        unsafe {
            x86_64::registers::control::Cr4::update(|cr4| {
                cr4.insert(x86_64::registers::control::Cr4Flags::OSXSAVE)
            })
        };
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// QEMU, with TCG or KVM: leaves through `isa-debug-exit` at port 0xF4.
    Qemu,
    /// Anything else: Bochs leaves through its shutdown port, hardware halts.
    Other,
}

static ENGINE: Once<Engine> = Once::new();

pub fn engine() -> Engine {
    *ENGINE.call_once(|| {
        let cpuid = raw_cpuid::CpuId::new();
        let qemu = cpuid.get_hypervisor_info().is_some_and(|h| {
            matches!(
                h.identify(),
                raw_cpuid::Hypervisor::QEMU | raw_cpuid::Hypervisor::KVM
            )
        });
        if qemu { Engine::Qemu } else { Engine::Other }
    })
}

/// QEMU's `isa-debug-exit` device (the harness adds it at this port).
const QEMU_EXIT_PORT: u16 = 0xf4;
/// Bochs ends the simulation when "Shutdown" is written to this port.
const BOCHS_SHUTDOWN_PORT: u16 = 0x8900;

/// Ends the run with `status`: prints the final line, then leaves the engine.
pub fn exit(status: u8) -> ! {
    crate::println!("{LINE_PREFIX}{status}");
    crate::console::flush();
    match engine() {
        // QEMU exits with (status << 1) | 1; the harness reads the line above.
        Engine::Qemu => outb(QEMU_EXIT_PORT, status),
        Engine::Other => b"Shutdown"
            .iter()
            .for_each(|&b| outb(BOCHS_SHUTDOWN_PORT, b)),
    }
    halt_forever()
}

/// Stops this CPU for good (hardware, or an engine without an exit device).
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: disabling interrupts and halting only stops this CPU.
        unsafe { core::arch::asm!("cli", "hlt", options(nomem, nostack)) };
    }
}
