//! The fuzzer's #VE handler and its operations: notification on and off on
//! arena pages, restricted pages with #VE allowed touched in the current
//! view. The handler checks what the CPU reported (exit reason 48, an
//! address in the arena, no #VE while notification is off), lets the
//! access through (rwx in the view the hypervisor says the vCPU is on) and
//! re-arms, unless the same address keeps faulting (then the hypervisor's
//! own handling takes over).

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use hv_abi::{access, call, error, ve_info};

use super::model::{self, Kind, Layout, Model, PAGE};
use super::{Expect, Fuzzer};
use crate::probe;
use crate::scenarios::{Outcome, hypercall};

/// The fuzzer owns #VE (else `altp2m::on_ve` handles it).
static CLAIMED: AtomicBool = AtomicBool::new(false);
/// Notification is in force, as the fuzzer's model says.
static EXPECTED: AtomicBool = AtomicBool::new(false);
/// The #VE information page's gpa.
static PAGE_GPA: AtomicU64 = AtomicU64::new(0);
static ARENA: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
static COUNT: AtomicU64 = AtomicU64::new(0);
/// A #VE whose access was not restricted: the hypervisor's own protection
/// (log-dirty) reached the guest.
static SPURIOUS: AtomicU64 = AtomicU64::new(0);
/// Such #VEs not yet looked at by the fuzzer: gpa and view.
static UNEXPLAINED: spin::Mutex<heapless::Vec<(u64, u64), 16>> =
    spin::Mutex::new(heapless::Vec::new());
static LAST_GPA: AtomicU64 = AtomicU64::new(u64::MAX);
static REPEATS: AtomicU64 = AtomicU64::new(0);
/// The handler left the semaphore set (the same address faulted again and again).
static UNARMED: AtomicBool = AtomicBool::new(false);
/// The first broken invariant: its reason, gpa and view.
static PROBLEM: spin::Mutex<Option<(&'static str, u64, u64)>> = spin::Mutex::new(None);

/// Faults at the same address before the handler stops re-arming.
const MAX_REPEATS: u64 = 3;
const EPT_VIOLATION: u32 = 48;

/// Print each #VE (`trace=1`).
static TRACE: AtomicBool = AtomicBool::new(false);

pub fn claim(layout: &Layout, trace: bool) {
    TRACE.store(trace, Ordering::SeqCst);
    ARENA[0].store(layout.first * PAGE, Ordering::SeqCst);
    ARENA[1].store(layout.end() * PAGE, Ordering::SeqCst);
    CLAIMED.store(true, Ordering::SeqCst);
}

pub fn release() {
    CLAIMED.store(false, Ordering::SeqCst);
}

/// Tells the handler what the model says of notification.
pub fn sync(model: &Model) {
    EXPECTED.store(model.ve_active(), Ordering::SeqCst);
    PAGE_GPA.store(model.notify.map_or(0, |g| g * PAGE), Ordering::SeqCst);
}

pub fn count() -> u64 {
    COUNT.load(Ordering::SeqCst)
}

pub fn spurious() -> u64 {
    SPURIOUS.load(Ordering::SeqCst)
}

/// The #VEs for pages the guest did not restrict since the last call.
pub fn take_unexplained() -> heapless::Vec<(u64, u64), 16> {
    core::mem::take(&mut *UNEXPLAINED.lock())
}

pub fn problem() -> Option<(&'static str, u64, u64)> {
    *PROBLEM.lock()
}

fn report(why: &'static str, gpa: u64, view: u64) {
    let mut p = PROBLEM.lock();
    if p.is_none() {
        *p = Some((why, gpa, view));
    }
}

fn read_u64(gpa: u64) -> u64 {
    probe::read(gpa).unwrap_or(u64::MAX)
}

/// The #VE handler while the fuzzer runs. Returns false if the fuzzer does
/// not own #VE.
pub fn on_ve() -> bool {
    if !CLAIMED.load(Ordering::SeqCst) {
        return false;
    }
    COUNT.fetch_add(1, Ordering::SeqCst);
    let page = PAGE_GPA.load(Ordering::SeqCst);
    if !EXPECTED.load(Ordering::SeqCst) || page == 0 {
        report("a #VE arrived while notification was off", 0, 0);
        return true;
    }
    let view = hypercall(call::ALTP2M_GET_VCPU_VIEW, &[0]) as u64;
    // The guest may have restricted its own #VE page (in view 0 a denied
    // read is a #GP): lift that first (docs/limits.md).
    if probe::read(page).is_err() {
        hypercall(
            call::ALTP2M_SET_MEM_ACCESS,
            &[view, page / PAGE, access::RWX],
        );
    }
    let reason = read_u64(page + ve_info::EXIT_REASON as u64) as u32;
    let gpa = read_u64(page + ve_info::GUEST_PHYSICAL_ADDRESS as u64);
    if reason != EPT_VIOLATION {
        report(
            "the #VE information names another exit reason than 48",
            gpa,
            view,
        );
    }
    let gfn = gpa / PAGE;
    let access = hypercall(call::ALTP2M_GET_MEM_ACCESS, &[view, gfn]);
    if TRACE.load(Ordering::SeqCst) {
        let q = read_u64(page + ve_info::QUALIFICATION as u64);
        crate::println!(
            "fuzz:   #VE gpa {gpa:#x} view {view} qualification {q:#x} access {access}"
        );
    }
    let arena = ARENA[0].load(Ordering::SeqCst)..ARENA[1].load(Ordering::SeqCst);
    if access == access::RWX as i64 {
        // Nothing the guest restricted: the fuzzer checks it is the
        // hypervisor's own write protection (log-dirty).
        SPURIOUS.fetch_add(1, Ordering::SeqCst);
        let _ = UNEXPLAINED.lock().push((gpa, view));
    } else if !arena.contains(&gpa) {
        report("a #VE for a page the guest never restricted", gpa, view);
    }
    hypercall(call::ALTP2M_SET_MEM_ACCESS, &[view, gfn, access::RWX]);
    let repeats = if LAST_GPA.swap(gpa, Ordering::SeqCst) == gpa {
        REPEATS.fetch_add(1, Ordering::SeqCst) + 1
    } else {
        REPEATS.store(0, Ordering::SeqCst);
        0
    };
    if repeats < MAX_REPEATS {
        let _ = probe::write_u8(page + ve_info::SEMAPHORE as u64, 0);
        // The whole dword: the CPU set 0xFFFFFFFF.
        for i in 1..4 {
            let _ = probe::write_u8(page + ve_info::SEMAPHORE as u64 + i, 0);
        }
    } else {
        UNARMED.store(true, Ordering::SeqCst);
    }
    true
}

/// Clears the semaphore (through the current view) so the next violation
/// with #VE allowed is a #VE again. False if the write faulted (view 0
/// restricts the page).
fn rearm(page: u64) -> bool {
    let cleared =
        (0..4).all(|i| probe::write_u8(page * PAGE + ve_info::SEMAPHORE as u64 + i, 0).is_ok());
    LAST_GPA.store(u64::MAX, Ordering::SeqCst);
    REPEATS.store(0, Ordering::SeqCst);
    UNARMED.store(!cleared, Ordering::SeqCst);
    cleared
}

impl Fuzzer {
    pub(super) fn ve_op(&mut self) -> Outcome {
        let mode = self.model.mode;
        if mode == model::Mode::External {
            return self
                .expect(
                    call::ALTP2M_VCPU_ENABLE_NOTIFY,
                    [self.layout.first, 0, 0, 0],
                    Expect::Exact(error::EPERM),
                )
                .map(|_| ());
        }
        match self.rng.below(10) {
            0 => {
                self.expect(call::ALTP2M_VCPU_DISABLE_NOTIFY, [0; 4], Expect::Exact(0))?;
                self.model.notify = None;
                sync(&self.model);
                Ok(())
            }
            1 | 2 => self.enable_notify(),
            _ if mode == model::Mode::Limited => self.enable_notify(),
            _ => self.provoke_ve(),
        }
    }

    /// Notification on an arena page (or a page that cannot be one).
    fn enable_notify(&mut self) -> Outcome {
        let gfn = if self.rng.chance(80) {
            self.tagged_page()
        } else {
            self.mut_gfn()
        };
        let kind = self.model.kind(&self.layout, gfn);
        let remapped_somewhere = self.model.remaps.iter().any(|r| r.old == gfn);
        if kind == Kind::Live && !self.layout.is_buffer(gfn) && !remapped_somewhere {
            // The page must be writable in every view: make it so first,
            // then the call must succeed.
            if self.model.mode == model::Mode::Mixed {
                self.open_everywhere(gfn)?;
            }
            let _ = probe::write(gfn * PAGE, 0);
            self.expect(
                call::ALTP2M_VCPU_ENABLE_NOTIFY,
                [gfn, 0, 0, 0],
                Expect::Exact(0),
            )?;
            self.model.notify = Some(gfn);
            // The handler must know first: the write that re-arms may be
            // a #VE itself (a log-dirty page, docs/limits.md).
            sync(&self.model);
            rearm(gfn);
        } else if matches!(
            kind,
            Kind::Released | Kind::Hole | Kind::OutOfRange | Kind::Mmio
        ) {
            self.expect(
                call::ALTP2M_VCPU_ENABLE_NOTIFY,
                [gfn, 0, 0, 0],
                Expect::Exact(error::EINVAL),
            )?;
        }
        sync(&self.model);
        Ok(())
    }

    /// Gives `gfn` rwx in view 0 and every view.
    fn open_everywhere(&mut self, gfn: u64) -> Outcome {
        let views = self.model.live_views();
        for v in core::iter::once(0).chain(views.iter().copied()) {
            self.expect(
                call::ALTP2M_SET_MEM_ACCESS,
                [u64::from(v), gfn, access::RWX, 0],
                Expect::Exact(0),
            )?;
        }
        Ok(())
    }

    /// A restricted arena page with #VE allowed, touched in the current
    /// view: with notification in force and the semaphore clear, a #VE.
    fn provoke_ve(&mut self) -> Outcome {
        if !self.model.enabled {
            return self.enable_notify();
        }
        let view = self.model.current;
        let gfn = self.tagged_page();
        if self.model.kind(&self.layout, gfn) != Kind::Live
            || self.model.notify == Some(gfn)
            || self.model.remap_of(view, gfn).is_some()
        {
            return Ok(());
        }
        let restriction = self
            .rng
            .pick(&[access::R, access::RX, access::N, access::X]);
        let v = u64::from(view);
        if view != 0 {
            // A violation without #VE is stepped in view 0: it must allow it.
            self.expect(
                call::ALTP2M_SET_MEM_ACCESS,
                [0, gfn, access::RWX, 0],
                Expect::Exact(0),
            )?;
        }
        self.expect(
            call::ALTP2M_SET_SUPPRESS_VE,
            [v, gfn, 0, 0],
            Expect::Exact(0),
        )?;
        self.expect(
            call::ALTP2M_SET_MEM_ACCESS,
            [v, gfn, restriction, 0],
            Expect::Exact(0),
        )?;
        let armed = match self.model.notify {
            Some(page) if self.model.ve_active() => rearm(page),
            _ => false,
        };
        let before = count();
        // A write of what is there, away from the tag and the code:
        // content unchanged.
        let at = self.untagged_offset(gfn);
        let result = probe::read(at).and_then(|value| probe::write(at, value));
        let ves = count() - before;
        self.ensure(
            result.is_ok() || (view == 0 && result == Err(13)),
            "a restricted page's access failed in a view",
            format_args!("gfn {gfn:#x} access {restriction} view {view}: {result:?}"),
        )?;
        if armed {
            self.ensure(
                ves >= 1,
                "a violation with #VE allowed and notification on raised no #VE",
                format_args!("gfn {gfn:#x} access {restriction} view {view}"),
            )?;
        } else if !self.model.ve_active() {
            self.ensure(
                ves == 0,
                "a #VE arrived while notification was off",
                format_args!("gfn {gfn:#x} view {view}"),
            )?;
        }
        Ok(())
    }
}
