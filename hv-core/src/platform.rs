//! What the VMX layer needs from the machine, in one trait: frames (for guest
//! RAM, VMCSs, bitmaps and EPT tables), byte access to physical memory, and
//! where a guest's console lines and monitor events go and its display is
//! shown. The kernel implements it over its frame allocator and direct map;
//! host tests over a simulated memory. (The CPU itself is `vmx::Cpu`.)

use hv_ept::{EptMemory, Mfn};

/// How to make a vCPU leave guest mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kick {
    Nmi,
    Sipi,
}

pub trait Platform: EptMemory {
    /// `count` contiguous frames starting at a multiple of `align` frames.
    fn alloc_frames(&mut self, count: u64, align: u64) -> Option<Mfn>;

    /// Returns frames from [`Platform::alloc_frames`] (or one from `alloc_frame`).
    fn free_frames(&mut self, first: Mfn, count: u64);

    /// Reads physical memory.
    fn read_phys(&self, address: u64, buf: &mut [u8]);

    /// Writes physical memory.
    fn write_phys(&mut self, address: u64, data: &[u8]);

    /// Fills a frame with zeroes.
    fn zero_frame(&mut self, frame: Mfn) {
        let zeroes = [0u8; 512];
        for chunk in 0..8 {
            self.write_phys(frame.hpa() + chunk * 512, &zeroes);
        }
    }

    /// A complete line the guest wrote to its console.
    fn guest_console_line(&mut self, line: &str);

    /// A monitor event (altp2m access violation, breakpoint, dropped view
    /// entry...), one structured line.
    fn monitor_event(&mut self, line: &str);

    /// Makes the CPU that runs `vcpu` leave guest mode: an NMI, or a SIPI
    /// for a vCPU parked in wait-for-SIPI (which blocks NMIs and INITs). A
    /// kicked vCPU tells a kick from the guest's own NMI by
    /// `smp::Coherence`; a SIPI kick only ever ends a run.
    fn kick(&mut self, vcpu: usize, kick: Kick);

    /// Whether an NMI reached this CPU while the hypervisor ran (the host
    /// NMI handler notes it; this clears the note). It belongs to the guest.
    fn take_nmi(&mut self) -> bool;

    /// Shows a text screen (80x25 cells of character and attribute bytes):
    /// the VGA text buffer on a PC.
    fn show_text(&mut self, cells: &[u8]);

    /// Whether the machine has a control line (`control`): a serial port
    /// of the hypervisor's own that a tool is or may be connected to.
    fn has_control_line(&self) -> bool;

    /// A byte the tool sent on the control line, if one is waiting.
    fn control_receive(&mut self) -> Option<u8>;

    /// Sends bytes on the control line (waiting for the transmitter, but
    /// boundedly: a line nobody reads must not hang the hypervisor).
    fn control_send(&mut self, bytes: &[u8]);

    /// The time-stamp counter's rate in kHz (for the control channel's
    /// timeouts; an estimate is enough).
    fn tsc_khz(&self) -> u64;
}

/// Reports a monitor event, formatted without the heap (a guest may have
/// exhausted its share of it); a line longer than 256 bytes is cut.
pub fn monitor_event(platform: &mut impl Platform, args: core::fmt::Arguments<'_>) {
    let mut line = heapless::String::<256>::new();
    let _ = core::fmt::Write::write_fmt(&mut line, args);
    platform.monitor_event(&line);
}
