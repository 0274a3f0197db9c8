//! Starting an application processor the way an OS does (SDM Vol. 3A
//! 9.4.4.1): INIT, then two start-up IPIs, through a real-mode trampoline
//! (`ap_trampoline.s`) in a low page that takes the processor to 64-bit
//! long mode on the caller's page tables and its own stack. Shared by the
//! hypervisor (the machine's CPUs) and the test guest (its vCPUs).

/// Where the trampoline runs: a page of the low megabyte, below 4 GiB as
/// the trampoline's 32-bit CR3 load needs; the SIPI vector is its page number.
pub const TRAMPOLINE: u64 = 0x8000;
pub const SIPI_VECTOR: u32 = (TRAMPOLINE >> 12) as u32;

/// Interrupt command register values (low dword, destination in the high
/// dword): INIT and STARTUP, level assert.
pub const ICR_INIT: u32 = 0x500 | 1 << 14;
pub const ICR_STARTUP: u32 = 0x600 | 1 << 14;

/// TSC cycles to wait after INIT and after each SIPI (the SDM's 10 ms and
/// 200 us, generous for real CPUs and about what the emulators' clocks
/// need), and at most for the processor to report after the second SIPI.
const AFTER_INIT: u64 = 10_000_000;
const AFTER_SIPI: u64 = 1_000_000;
const TO_REPORT: u64 = 500_000_000;

/// What the processor finds in the trampoline's parameter block.
#[derive(Clone, Copy, Debug)]
pub struct Params {
    /// The page tables to run on (a PML4 below 4 GiB).
    pub cr3: u32,
    pub stack_top: u64,
    /// Called in 64-bit mode on that stack, with `index` as its argument.
    pub entry: extern "C" fn(u64) -> !,
    pub index: u64,
}

#[cfg(target_os = "none")]
core::arch::global_asm!(include_str!("ap_trampoline.s"));

#[cfg(target_os = "none")]
unsafe extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
}

/// Copies the trampoline, its GDT and `params` to [`TRAMPOLINE`].
///
/// # Safety
///
/// The page at [`TRAMPOLINE`] must be identity-mapped memory that nothing
/// else uses, and no processor may be running the trampoline meanwhile.
#[cfg(target_os = "none")]
pub unsafe fn write_trampoline(params: &Params) {
    // Offsets in the page: the GDT, its pointer and the parameter block,
    // where `ap_trampoline.s` reads them.
    const GDT_OFFSET: u64 = 0xe00;
    const GDT_POINTER_OFFSET: u64 = GDT_OFFSET + 0x40;
    const PARAMS_OFFSET: u64 = 0xf00;
    let start = &raw const ap_trampoline_start;
    let len = &raw const ap_trampoline_end as usize - start as usize;
    assert!(
        len < GDT_OFFSET as usize,
        "the AP trampoline outgrew its page"
    );
    // Null, 32-bit code (0x08), data (0x10), 64-bit code (0x18).
    let gdt: [u64; 4] = [
        0,
        0x00cf_9a00_0000_ffff,
        0x00cf_9200_0000_ffff,
        0x00af_9a00_0000_ffff,
    ];
    let at = |offset: u64| (TRAMPOLINE + offset) as *mut u8;
    // SAFETY: the caller gives us the page; every write stays inside it
    // (the code is shorter than GDT_OFFSET, checked above).
    unsafe {
        core::ptr::copy_nonoverlapping(start, at(0), len);
        core::ptr::copy_nonoverlapping(gdt.as_ptr(), at(GDT_OFFSET).cast::<u64>(), gdt.len());
        let pointer = at(GDT_POINTER_OFFSET);
        core::ptr::write_unaligned(pointer.cast::<u16>(), (gdt.len() * 8 - 1) as u16);
        core::ptr::write_unaligned(pointer.add(2).cast::<u32>(), at(GDT_OFFSET) as u32);
        let params_at = at(PARAMS_OFFSET);
        core::ptr::write_volatile(params_at.cast::<u32>(), params.cr3);
        core::ptr::write_volatile(params_at.add(8).cast::<u64>(), params.stack_top);
        core::ptr::write_volatile(
            params_at.add(0x10).cast::<u64>(),
            params.entry as usize as u64,
        );
        core::ptr::write_volatile(params_at.add(0x18).cast::<u64>(), params.index);
    }
}

/// INIT-SIPI-SIPI to one processor whose trampoline is written (without
/// the INIT if not `init`: for a processor known to wait for SIPI):
/// `send(command)` sends an IPI to it; `wait(cycles)` spins that many TSC
/// cycles, or less if the processor reported in, and says whether it did.
/// Returns whether it reported in.
pub fn start(init: bool, mut send: impl FnMut(u32), mut wait: impl FnMut(u64) -> bool) -> bool {
    if init {
        send(ICR_INIT);
        wait(AFTER_INIT);
    }
    for _ in 0..2 {
        send(ICR_STARTUP | SIPI_VECTOR);
        if wait(AFTER_SIPI) {
            return true;
        }
    }
    wait(TO_REPORT)
}

#[cfg(test)]
mod tests {
    use super::*;

    type Log = heapless::Vec<u64, 8>;

    #[test]
    fn init_then_startups_until_the_processor_reports() {
        // Reports in during the wait after the first SIPI: one SIPI is enough.
        let mut sent = Log::new();
        let mut waits = 0;
        let up = start(
            true,
            |c| sent.push(u64::from(c)).unwrap(),
            |_| {
                waits += 1;
                waits == 2
            },
        );
        assert!(up);
        assert_eq!(sent, [u64::from(ICR_INIT), u64::from(ICR_STARTUP | 8)]);
        // Without the INIT: SIPIs only.
        let mut sent = Log::new();
        assert!(start(false, |c| sent.push(u64::from(c)).unwrap(), |_| true));
        assert_eq!(sent, [u64::from(ICR_STARTUP | 8)]);
        // Never reports: INIT, two SIPIs, then the long wait fails.
        let (mut sent, mut cycles) = (Log::new(), Log::new());
        let up = start(
            true,
            |c| sent.push(u64::from(c)).unwrap(),
            |n| {
                cycles.push(n).unwrap();
                false
            },
        );
        assert!(!up);
        let startup = u64::from(ICR_STARTUP | 8);
        assert_eq!(sent, [u64::from(ICR_INIT), startup, startup]);
        assert_eq!(cycles, [AFTER_INIT, AFTER_SIPI, AFTER_SIPI, TO_REPORT]);
    }
}
