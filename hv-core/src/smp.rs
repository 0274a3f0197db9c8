//! Keeping every CPU's cached EPT translations coherent with the p2m and
//! the views, and reaching a vCPU that runs a guest.
//!
//! The protocol (an epoch plus a kick):
//!
//! - Whoever removes or reduces a translation (a page dropped, a type or
//!   access change, a remap, a view destroyed, altp2m off) changes the EPT
//!   tables under the VM lock, invalidates its own CPU (INVEPT), then calls
//!   [`Coherence::shootdown`]: it bumps the epoch and, for every other vCPU
//!   that is in guest mode, sends it a kick (an NMI, which exits) and waits
//!   until that vCPU has either seen the new epoch or left guest mode.
//! - Every vCPU, right before VM entry, calls [`Coherence::enter`]: it
//!   announces "in guest" and then reads the epoch; if the epoch moved since
//!   its last flush, it flushes all its cached translations (all-context
//!   INVEPT) and records the epoch before entering. After every VM exit it
//!   calls [`Coherence::exit`], which says which view the vCPU was on;
//!   an NMI exit asks [`Coherence::take_kick`] whether the NMI was a kick
//!   (then it is not the guest's); the next entry flushes.
//!
//! Why no CPU can use a stale translation once `shootdown` returns: the
//! initiator's epoch bump and the vCPU's "in guest" store are each
//! followed by a sequentially consistent fence before the load that comes
//! after them (the initiator's of "in guest", the vCPU's of the epoch). Of
//! the two fences, one comes first in the single total order; so either the initiator sees
//! the vCPU in guest mode (and waits for its flush), or the vCPU sees the
//! new epoch before it enters (and flushes). A vCPU that leaves guest mode
//! during the wait flushes at its next entry. None of this takes the VM
//! lock, so a vCPU never waits for the initiator that waits for it; and no
//! lock is held across a VM entry.
//!
//! The kick is an NMI because external interrupts are the guest's (they do
//! not exit). A guest NMI that arrives together with a kick is merged with
//! it, as the hardware merges two NMIs that arrive before the first is
//! delivered; a kick that lands while the vCPU is in root mode is absorbed
//! by the host NMI handler ([`Coherence::take_kick`]).
//!
//! A view switch of another vCPU (the hypercall's or the control channel's
//! "switch one vCPU", a switch of all, altp2m on or off) follows the same
//! pattern with a per-vCPU request in place of the epoch: the switcher
//! updates the altp2m record under the VM lock and calls
//! [`Coherence::request_reapply`], which returns once the target is out of
//! guest mode (kicked and waited for) or bound to see the request before
//! it enters ([`Coherence::must_reapply`] after [`Coherence::enter`]: it
//! backs out and writes its view fields first). Until it has, the EPTP
//! index its exits report is older than the switch and is not taken for a
//! VMFUNC (`views::sync`).
//!
//! # Locks: which protects what (the one place that says so)
//!
//! - **The VM lock** (the `spin::Mutex<Vm>` each vCPU's run loop is given,
//!   `Vcpu::run`) protects everything in `Vm`: the host p2m, the views and
//!   each vCPU's recorded view (`hv_altp2m`), devices and platform state,
//!   the control channel's state (sessions, events, a stopped vCPU's
//!   published registers), counters and the guest's end. A vCPU takes it
//!   for each exit's handling and for its checks before entry, and drops
//!   it before VM entry: **no lock is held across a VM entry** (the run
//!   loop holds no guard when it calls `entry::enter`; a held vCPU,
//!   `Vcpu::hold`, takes it per round). The control line's server takes it
//!   per command and never across UART I/O.
//! - **No lock: [`Coherence`]** (this module): the epoch and each vCPU's
//!   in-guest, flushed-epoch, kick, reapply, parked and last-view words,
//!   atomics written by their vCPU or by the initiator as described above.
//!   An initiator waits for other vCPUs while it holds the VM lock; that
//!   cannot deadlock, because what it waits for (leaving guest mode, or a
//!   flush) a vCPU does before it takes the VM lock after an exit, and a
//!   vCPU spinning on the VM lock is out of guest mode already.
//! - **No lock: a vCPU's own state** (`Vcpu`: its VMCS, registers,
//!   pending events, step state, #VE page) belongs to the run loop of its
//!   CPU; other CPUs reach it only through `Coherence`'s requests and the
//!   control state in `Vm`.
//! - **Leaf locks of the kernel** (hv-boot): the frame allocator
//!   (`memory::FRAMES`), the heap's allocator, the console (log lines; a
//!   panic breaks it) and the control line's UART (`control_line::LINE`,
//!   never under the VM lock). The first three may be taken while the VM
//!   lock is held, never the other way round, and none is held across a VM
//!   entry either.

#[cfg(not(loom))]
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};
#[cfg(loom)]
use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};

/// Most vCPUs a VM may have (the EPTP list and the MADT would allow more).
pub const MAX_VCPUS: usize = 16;

/// What one vCPU publishes without the VM lock.
#[derive(Debug)]
pub struct CpuState {
    in_guest: AtomicBool,
    /// The epoch of this vCPU's last full flush.
    seen: AtomicU64,
    /// A kick is on its way: its NMI is not the guest's.
    kick: AtomicBool,
    /// Where the hardware ran at the vCPU's last exit: the EPTP index where
    /// the CPU has #VE (the index comes with it), else the EPTP itself
    /// (`views::where_hardware_is`).
    view: AtomicU64,
    /// The vCPU must write its view-related VMCS fields again before entry
    /// (another vCPU switched its view).
    reapply: AtomicBool,
    /// In guest mode but parked in wait-for-SIPI: it accesses no memory
    /// (so it is left out of shootdowns) and blocks NMIs (an INIT reaches it).
    parked: AtomicBool,
}

impl CpuState {
    fn new() -> Self {
        Self {
            in_guest: AtomicBool::new(false),
            seen: AtomicU64::new(0),
            kick: AtomicBool::new(false),
            view: AtomicU64::new(0),
            reapply: AtomicBool::new(false),
            parked: AtomicBool::new(false),
        }
    }
}

/// The shared state of the protocol for one VM's vCPUs.
#[derive(Debug)]
pub struct Coherence {
    epoch: AtomicU64,
    cpus: [CpuState; MAX_VCPUS],
    vcpus: usize,
}

impl Coherence {
    pub fn new(vcpus: usize) -> Self {
        Self {
            epoch: AtomicU64::new(0),
            cpus: core::array::from_fn(|_| CpuState::new()),
            vcpus: vcpus.min(MAX_VCPUS),
        }
    }

    pub fn vcpus(&self) -> usize {
        self.vcpus
    }

    /// Right before VM entry of `vcpu`: whether its cached translations must
    /// be flushed first (then call [`Coherence::flushed`]).
    pub fn enter(&self, vcpu: usize) -> Option<u64> {
        let cpu = &self.cpus[vcpu];
        cpu.in_guest.store(true, Ordering::SeqCst);
        // The store above and the load below must not be reordered (the
        // store-buffering pattern): a full fence, as on the initiator's side.
        fence(Ordering::SeqCst);
        let epoch = self.epoch.load(Ordering::SeqCst);
        (cpu.seen.load(Ordering::Relaxed) != epoch).then_some(epoch)
    }

    /// `vcpu` flushed everything cached up to `epoch`.
    pub fn flushed(&self, vcpu: usize, epoch: u64) {
        self.cpus[vcpu].seen.store(epoch, Ordering::SeqCst);
    }

    /// Right before a VM entry of `vcpu` into wait-for-SIPI: it stays out
    /// of shootdowns (it uses no translation until a SIPI exit, and the
    /// entry after that flushes if the epoch moved).
    pub fn park(&self, vcpu: usize) {
        self.cpus[vcpu].parked.store(true, Ordering::SeqCst);
    }

    /// Whether `vcpu` is parked in wait-for-SIPI.
    pub fn parked(&self, vcpu: usize) -> bool {
        self.cpus[vcpu].parked.load(Ordering::SeqCst)
    }

    /// After a VM exit of `vcpu`, running on `view` (see [`CpuState`]).
    pub fn exit(&self, vcpu: usize, view: u64) {
        let cpu = &self.cpus[vcpu];
        cpu.view.store(view, Ordering::SeqCst);
        cpu.parked.store(false, Ordering::SeqCst);
        cpu.in_guest.store(false, Ordering::SeqCst);
    }

    /// On an NMI exit of `vcpu`: whether it was a kick (then not the
    /// guest's NMI). The caller flushes if [`Coherence::enter`] says so.
    pub fn take_kick(&self, vcpu: usize) -> bool {
        self.cpus[vcpu].kick.swap(false, Ordering::SeqCst)
    }

    /// Makes every other vCPU drop the translations cached before now: see
    /// the module documentation. `kick(vcpu)` sends the NMI.
    pub fn shootdown(&self, initiator: usize, mut kick: impl FnMut(usize)) {
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        fence(Ordering::SeqCst);
        // The initiator flushed itself already.
        self.flushed(initiator, epoch);
        for vcpu in (0..self.vcpus).filter(|&v| v != initiator) {
            let cpu = &self.cpus[vcpu];
            self.kick_out(vcpu, &mut kick, || cpu.seen.load(Ordering::SeqCst) >= epoch);
        }
    }

    /// If `vcpu` is in guest mode, kicks it and waits until it left, or
    /// until `done` says it has what it was kicked for.
    fn kick_out(&self, vcpu: usize, kick: impl FnOnce(usize), done: impl Fn() -> bool) {
        let cpu = &self.cpus[vcpu];
        if !cpu.in_guest.load(Ordering::SeqCst) {
            return;
        }
        cpu.kick.store(true, Ordering::SeqCst);
        kick(vcpu);
        while cpu.in_guest.load(Ordering::SeqCst) && !done() {
            spin();
        }
    }

    /// Asks `vcpu` to write its view-related VMCS fields again (another
    /// vCPU switched its view: the altp2m record is newer than its
    /// hardware) and returns once it cannot run on the old fields any
    /// more: it was out of guest mode (and sees the request before it
    /// enters, [`Coherence::must_reapply`]), or it was kicked out. The same
    /// store-buffering argument as for the epoch holds, with the request in
    /// place of the epoch.
    pub fn request_reapply(&self, vcpu: usize, kick: impl FnOnce(usize)) {
        self.cpus[vcpu].reapply.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        self.kick_out(vcpu, kick, || false);
    }

    /// Whether `vcpu`'s view-related fields are older than its altp2m
    /// record (another vCPU switched it): then its hardware's EPTP index
    /// is no VMFUNC of its own, and it must not enter before it wrote them
    /// again. Called after [`Coherence::enter`] (which orders the check
    /// after "in guest"); the vCPU then backs out ([`Coherence::back_out`]).
    pub fn must_reapply(&self, vcpu: usize) -> bool {
        self.cpus[vcpu].reapply.load(Ordering::SeqCst)
    }

    /// `vcpu` announced "in guest" ([`Coherence::enter`]) but does not
    /// enter after all: nothing ran since its last exit.
    pub fn back_out(&self, vcpu: usize) {
        self.cpus[vcpu].in_guest.store(false, Ordering::SeqCst);
    }

    /// Whether `vcpu` must write its view-related fields again (clears it).
    pub fn take_reapply(&self, vcpu: usize) -> bool {
        self.cpus[vcpu].reapply.swap(false, Ordering::SeqCst)
    }

    /// The view `vcpu`'s hardware was on at its last exit.
    pub fn last_view(&self, vcpu: usize) -> u64 {
        self.cpus[vcpu].view.load(Ordering::SeqCst)
    }
}

#[cfg(not(loom))]
fn spin() {
    core::hint::spin_loop();
}

#[cfg(loom)]
fn spin() {
    loom::thread::yield_now();
}

#[cfg(all(test, loom))]
mod loom_tests {
    use loom::sync::Arc;
    use loom::sync::atomic::{AtomicU64, Ordering};
    use loom::thread;

    use super::*;

    /// The model: one translation, the frame it points at (the "EPT"), and
    /// a vCPU's TLB caching it. The initiator drops the mapping (frame 0)
    /// and shoots down; the vCPU runs the entry protocol around "guest
    /// mode" and uses its TLB there. Once the shootdown returned, the vCPU
    /// may never use the old frame again.
    #[test]
    fn no_vcpu_uses_a_dropped_translation_after_the_shootdown() {
        loom::model(|| {
            let shared = Arc::new((Coherence::new(2), AtomicU64::new(7), AtomicU64::new(0)));
            let vcpu = {
                let shared = shared.clone();
                thread::spawn(move || {
                    let (c, ept, done) = &*shared;
                    let mut tlb = ept.load(Ordering::SeqCst);
                    for _ in 0..2 {
                        if let Some(epoch) = c.enter(1) {
                            tlb = ept.load(Ordering::SeqCst);
                            c.flushed(1, epoch);
                        }
                        // In guest mode: the access goes through the TLB.
                        if done.load(Ordering::SeqCst) == 1 {
                            assert_eq!(tlb, 0, "a stale translation after the shootdown");
                        }
                        if c.take_kick(1) {
                            // The kick's exit: the next entry flushes.
                        }
                        c.exit(1, 0);
                    }
                })
            };
            let (c, ept, done) = &*shared;
            ept.store(0, Ordering::SeqCst);
            c.shootdown(0, |_| {});
            done.store(1, Ordering::SeqCst);
            vcpu.join().unwrap();
        });
    }

    /// Another vCPU's view switch: the switcher updates the vCPU's recorded
    /// view under the VM lock and requests a reapply; the vCPU reads the
    /// record into its fields before entry when asked to, and after an exit
    /// takes its hardware's view for a VMFUNC (`views::sync`) unless a
    /// reapply is pending. The switch is never lost, and once the request
    /// returned the vCPU never runs on its old fields.
    #[test]
    fn another_vcpus_view_switch_is_never_lost_nor_run_around() {
        loom::model(|| {
            use loom::sync::Mutex;
            use loom::sync::atomic::AtomicBool;
            const NEW: u16 = 2;
            // The VM lock over the recorded view; "switched" is set once
            // the switcher's call returned.
            let shared = Arc::new((Coherence::new(2), Mutex::new(1u16), AtomicBool::new(false)));
            let vcpu = {
                let shared = shared.clone();
                thread::spawn(move || {
                    let (c, record, switched) = &*shared;
                    let mut fields = 1u16;
                    for _ in 0..2 {
                        {
                            let record = record.lock().unwrap();
                            if c.take_reapply(1) {
                                fields = *record;
                            }
                        }
                        if let Some(epoch) = c.enter(1) {
                            c.flushed(1, epoch);
                        }
                        if c.must_reapply(1) {
                            c.back_out(1);
                            continue;
                        }
                        // In guest mode, on `fields`.
                        if switched.load(Ordering::SeqCst) {
                            assert_eq!(fields, NEW, "ran on its old view after the switch");
                        }
                        c.take_kick(1);
                        c.exit(1, u64::from(fields));
                        let mut record = record.lock().unwrap();
                        if !c.must_reapply(1) {
                            *record = fields;
                        }
                    }
                })
            };
            let (c, record, switched) = &*shared;
            {
                let mut record = record.lock().unwrap();
                *record = NEW;
                c.request_reapply(1, |_| {});
            }
            switched.store(true, Ordering::SeqCst);
            vcpu.join().unwrap();
            assert_eq!(*record.lock().unwrap(), NEW, "the switch was lost");
        });
    }

    /// A view destroyed while a vCPU may switch to it with VMFUNC: the
    /// destroyer hides the view (takes it out of the EPTP list), shoots
    /// down, and destroys it only if no vCPU was on it at its last exit.
    /// The vCPU must never run on the view once it is destroyed.
    #[test]
    fn a_view_is_never_destroyed_under_a_vcpu_that_vmfuncs_to_it() {
        loom::model(|| {
            use loom::sync::atomic::AtomicBool;
            const VIEW: u64 = 1;
            let shared = Arc::new((
                Coherence::new(2),
                AtomicBool::new(true),
                AtomicBool::new(false),
            ));
            let vcpu = {
                let shared = shared.clone();
                thread::spawn(move || {
                    let (c, visible, destroyed) = &*shared;
                    let mut view = 0;
                    for _ in 0..2 {
                        if let Some(epoch) = c.enter(1) {
                            c.flushed(1, epoch);
                        }
                        // VMFUNC to the view, if the EPTP list still has it.
                        if visible.load(Ordering::SeqCst) {
                            view = VIEW;
                        }
                        assert!(
                            !(view == VIEW && destroyed.load(Ordering::SeqCst)),
                            "running on a destroyed view"
                        );
                        c.take_kick(1);
                        c.exit(1, view);
                    }
                })
            };
            let (c, visible, destroyed) = &*shared;
            visible.store(false, Ordering::SeqCst);
            c.shootdown(0, |_| {});
            if c.last_view(1) != VIEW {
                destroyed.store(true, Ordering::SeqCst);
            }
            vcpu.join().unwrap();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vcpu_out_of_guest_mode_is_not_waited_for_and_flushes_at_entry() {
        let c = Coherence::new(2);
        assert_eq!(c.enter(1), None, "nothing changed yet");
        c.exit(1, 0);
        let mut kicked = 0;
        c.shootdown(0, |_| kicked += 1);
        assert_eq!(kicked, 0, "vCPU 1 was not in guest mode");
        let epoch = c.enter(1).expect("a flush before entry");
        c.flushed(1, epoch);
        assert_eq!(c.enter(1), None);
    }

    #[test]
    fn a_vcpu_in_guest_mode_is_kicked_and_waited_for() {
        let c = Coherence::new(2);
        let epoch = c.enter(1);
        assert_eq!(epoch, None);
        // The kick "handler" flushes as the kicked vCPU would at its exit.
        let mut kicked = alloc::vec::Vec::new();
        c.shootdown(0, |v| {
            kicked.push(v);
            assert!(c.take_kick(v), "the kick flag is set before the NMI");
            c.exit(v, 3);
        });
        assert_eq!(kicked, [1]);
        assert_eq!(c.last_view(1), 3);
        c.request_reapply(1, |_| panic!("not in guest mode: no kick"));
        assert!(c.take_reapply(1));
        assert!(!c.take_reapply(1));
        // In guest mode (flushing for the shootdown first): kicked, and
        // waited for until it left.
        let epoch = c.enter(1).expect("the shootdown moved the epoch");
        c.flushed(1, epoch);
        c.request_reapply(1, |v| c.exit(v, 0));
        assert!(c.must_reapply(1));
    }
}
