//! Scenarios for altp2m in the running hypervisor: the hypercalls, VMFUNC
//! view switching, #VE, the hidden-breakpoint pattern, a page ballooned out
//! under two aliases, and the frozen-display scenario. Each returns `Ok` or
//! the first thing that went wrong. Pages used (the guest's RAM is
//! identity-mapped, so these addresses are both virtual and physical):

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use hv_abi::{access, call, error, feature, ve_info};

use crate::scenarios::{Outcome, check, counts, exits_since, hypercall, offers, reason};
use crate::{println, probe, rdtsc};

/// Hidden-breakpoint code page and its shadow.
/// A guest-physical page that is not the guest's: in the MMIO hole, between
/// the I/O APIC and the local APIC (both passed through), mapped to nothing.
pub const NOT_RAM: u64 = 0xfed0_0000;

const CODE: u64 = 0x60_0000;
const SHADOW: u64 = 0x60_1000;
/// The #VE information page.
pub(crate) const VE_PAGE: u64 = 0x70_0000;
/// Balloon test pages: P (ballooned out), aliases' own pages G1, G2, a
/// restricted page G3, a remapped page G4 and its source G5.
const P: u64 = 0x50_0000;
const G1: u64 = 0x50_1000;
const G2: u64 = 0x50_2000;
const G3: u64 = 0x50_3000;
const G4: u64 = 0x50_4000;
const G5: u64 = 0x50_5000;
/// The framebuffer: 16 pages at 8 MiB.
pub const FB: u64 = 0x80_0000;
pub const FB_PAGES: u64 = 16;
/// Memory touched by the lazy-copy figure: 8 MiB from 16 MiB.
pub(crate) const LAZY: u64 = 0x100_0000;
pub(crate) const LAZY_MIB: u64 = 8;

const GP: u8 = 13;
/// How long the display scenario waits for a tick, in spin-loop rounds
/// (several tick periods of guest time).
const TICK_WAIT: u64 = 100_000_000;
const UD: u8 = 6;

pub(crate) fn gfn(address: u64) -> u64 {
    address >> 12
}

pub(crate) fn ok(result: i64, what: &'static str) -> Result<i64, &'static str> {
    if result >= 0 { Ok(result) } else { Err(what) }
}

fn expect(result: i64, want: i64, what: &'static str) -> Outcome {
    check(result == want, what)
}

pub(crate) fn read_u8(address: u64) -> u8 {
    // SAFETY: an identity-mapped guest RAM address the scenario owns.
    unsafe { core::ptr::read_volatile(address as *const u8) }
}

pub(crate) fn write_u8(address: u64, value: u8) {
    // SAFETY: as for `read_u8`.
    unsafe { core::ptr::write_volatile(address as *mut u8, value) }
}

pub(crate) fn fill(page: u64, value: u8) {
    for i in 0..4096 {
        write_u8(page + i, value);
    }
}

pub(crate) fn enable() -> Outcome {
    let state = hypercall(call::ALTP2M_GET_STATE, &[]);
    if state == 0 {
        ok(
            hypercall(call::ALTP2M_SET_STATE, &[1]),
            "altp2m could not be enabled",
        )?;
    }
    Ok(())
}

pub(crate) fn create(default_access: u64) -> Result<u64, &'static str> {
    ok(
        hypercall(call::ALTP2M_CREATE_VIEW, &[default_access]),
        "CREATE_VIEW failed",
    )
    .map(|v| v as u64)
}

pub(crate) fn switch(view: u64) -> Outcome {
    ok(
        hypercall(call::ALTP2M_SWITCH_VIEW, &[view]),
        "SWITCH_VIEW failed",
    )
    .map(|_| ())
}

pub(crate) fn disable() -> Outcome {
    switch(0)?;
    ok(
        hypercall(call::ALTP2M_SET_STATE, &[0]),
        "altp2m could not be disabled",
    )
    .map(|_| ())
}

/// Every altp2m call with good and bad arguments (mode `mixed`).
pub fn calls() -> Outcome {
    use error::*;
    expect(
        hypercall(call::ALTP2M_CREATE_VIEW, &[access::RWX]),
        EINVAL,
        "CREATE_VIEW before enable",
    )?;
    enable()?;
    expect(
        hypercall(call::ALTP2M_SET_STATE, &[7]),
        EINVAL,
        "SET_STATE 7",
    )?;
    let v = create(access::RWX)?;
    check((1..512).contains(&v), "view index out of range")?;
    expect(
        hypercall(call::ALTP2M_CREATE_VIEW, &[access::W]),
        EINVAL,
        "default access w (not expressible)",
    )?;
    expect(
        hypercall(call::ALTP2M_CREATE_VIEW, &[99]),
        EINVAL,
        "default access 99",
    )?;
    expect(
        hypercall(call::ALTP2M_SWITCH_VIEW, &[600]),
        EINVAL,
        "switch to view 600",
    )?;
    expect(
        hypercall(call::ALTP2M_SWITCH_VIEW, &[400]),
        EINVAL,
        "switch to a view that does not exist",
    )?;
    expect(
        hypercall(call::ALTP2M_SWITCH_VCPU_VIEW, &[5, v]),
        EINVAL,
        "switch of vCPU 5",
    )?;
    ok(
        hypercall(call::ALTP2M_SWITCH_VCPU_VIEW, &[0, v]),
        "SWITCH_VCPU_VIEW failed",
    )?;
    expect(
        hypercall(call::ALTP2M_GET_VCPU_VIEW, &[0]),
        v as i64,
        "GET_VCPU_VIEW",
    )?;
    expect(
        hypercall(call::ALTP2M_DESTROY_VIEW, &[v]),
        EBUSY,
        "destroying the view in use",
    )?;
    expect(
        hypercall(call::ALTP2M_DESTROY_VIEW, &[0]),
        EINVAL,
        "destroying view 0",
    )?;
    let page = gfn(0x40_0000);
    ok(
        hypercall(call::ALTP2M_SET_MEM_ACCESS, &[v, page, access::RX]),
        "SET_MEM_ACCESS",
    )?;
    expect(
        hypercall(call::ALTP2M_GET_MEM_ACCESS, &[v, page]),
        access::RX as i64,
        "GET_MEM_ACCESS",
    )?;
    expect(
        hypercall(call::ALTP2M_SET_MEM_ACCESS, &[v, page, 12]),
        EINVAL,
        "access 12",
    )?;
    expect(
        hypercall(call::ALTP2M_SET_MEM_ACCESS, &[v, 1 << 40, access::R]),
        EINVAL,
        "gfn beyond 48 bits",
    )?;
    expect(
        hypercall(
            call::ALTP2M_SET_MEM_ACCESS,
            &[v, gfn(0x1_0000_0000), access::R],
        ),
        ENOENT,
        "gfn that is not RAM",
    )?;
    static GFNS: [u64; 3] = [0x400, 0x401, 0x402];
    static ACCESS: [u8; 3] = [access::R as u8, access::RW as u8, access::RX as u8];
    let gfns = GFNS.as_ptr() as u64;
    let accesses = ACCESS.as_ptr() as u64;
    expect(
        hypercall(call::ALTP2M_SET_MEM_ACCESS_MULTI, &[v, gfns, accesses, 3]),
        3,
        "SET_MEM_ACCESS_MULTI",
    )?;
    expect(
        hypercall(call::ALTP2M_GET_MEM_ACCESS, &[v, 0x401]),
        access::RW as i64,
        "multi applied",
    )?;
    expect(
        hypercall(
            call::ALTP2M_SET_MEM_ACCESS_MULTI,
            &[v, NOT_RAM, accesses, 3],
        ),
        EFAULT,
        "multi: bad array",
    )?;
    expect(
        hypercall(
            call::ALTP2M_SET_MEM_ACCESS_MULTI,
            &[v, gfns, accesses, 100_000],
        ),
        EINVAL,
        "multi: count",
    )?;
    ok(
        hypercall(call::ALTP2M_SET_SUPPRESS_VE, &[v, page, 0]),
        "SET_SUPPRESS_VE",
    )?;
    expect(
        hypercall(call::ALTP2M_GET_SUPPRESS_VE, &[v, page]),
        0,
        "GET_SUPPRESS_VE",
    )?;
    ok(
        hypercall(call::ALTP2M_SET_SUPPRESS_VE_MULTI, &[v, 0x400, 0x40f, 1]),
        "SET_SUPPRESS_VE_MULTI",
    )?;
    expect(
        hypercall(call::ALTP2M_GET_SUPPRESS_VE, &[v, 0x40a]),
        1,
        "multi suppress applied",
    )?;
    expect(
        hypercall(call::ALTP2M_SET_SUPPRESS_VE_MULTI, &[v, 0x40f, 0x400, 1]),
        EINVAL,
        "reversed range",
    )?;
    ok(
        hypercall(call::ALTP2M_CHANGE_GFN, &[v, 0x410, 0x411]),
        "CHANGE_GFN",
    )?;
    ok(
        hypercall(call::ALTP2M_CHANGE_GFN, &[v, 0x410, hv_abi::INVALID_GFN]),
        "CHANGE_GFN revert",
    )?;
    let hole = hypercall(call::ALTP2M_CHANGE_GFN, &[v, 0x410, gfn(NOT_RAM)]);
    expect(hole, ENOENT, "remap to a gfn the host does not map")?;
    expect(
        hypercall(call::ALTP2M_CHANGE_GFN, &[0, 0x410, 0x411]),
        EINVAL,
        "remap in view 0",
    )?;
    ok(
        hypercall(call::ALTP2M_SET_VISIBILITY, &[v, 0]),
        "SET_VISIBILITY",
    )?;
    expect(
        hypercall(call::ALTP2M_SET_VISIBILITY, &[v, 2]),
        EINVAL,
        "visibility 2",
    )?;
    // Without #VE every notify call answers EOPNOTSUPP, whatever its page.
    let bad_page = if offers(feature::VE) {
        EINVAL
    } else {
        error::EOPNOTSUPP
    };
    expect(
        hypercall(call::ALTP2M_VCPU_ENABLE_NOTIFY, &[gfn(NOT_RAM)]),
        bad_page,
        "#VE page in the MMIO hole",
    )?;
    expect(
        hypercall(call::ALTP2M_VCPU_ENABLE_NOTIFY, &[1 << 40]),
        bad_page,
        "#VE page beyond RAM",
    )?;
    switch(0)?;
    ok(hypercall(call::ALTP2M_DESTROY_VIEW, &[v]), "DESTROY_VIEW")?;
    expect(
        hypercall(call::ALTP2M_DESTROY_VIEW, &[v]),
        EINVAL,
        "destroying it twice",
    )?;
    expect(
        hypercall(call::ALTP2M_GET_MEM_ACCESS, &[v, page]),
        EINVAL,
        "a destroyed view",
    )?;
    disable()?;
    expect(hypercall(call::ALTP2M_GET_STATE, &[]), 0, "altp2m still on")
}

/// In `external` mode no altp2m call is the guest's; in `limited` mode only
/// #VE notification is.
pub fn refused(notify_allowed: bool) -> Outcome {
    expect(
        hypercall(call::ALTP2M_SET_STATE, &[1]),
        error::EPERM,
        "SET_STATE allowed",
    )?;
    expect(
        hypercall(call::ALTP2M_CREATE_VIEW, &[access::RWX]),
        error::EPERM,
        "CREATE_VIEW allowed",
    )?;
    let notify = hypercall(call::ALTP2M_VCPU_ENABLE_NOTIFY, &[gfn(VE_PAGE)]);
    if notify_allowed && !offers(feature::VE) {
        expect(notify, error::EOPNOTSUPP, "ENABLE_NOTIFY without #VE")?;
        expect(
            hypercall(call::ALTP2M_VCPU_DISABLE_NOTIFY, &[]),
            error::EOPNOTSUPP,
            "DISABLE_NOTIFY without #VE",
        )
    } else if notify_allowed {
        ok(notify, "ENABLE_NOTIFY refused")?;
        ok(
            hypercall(call::ALTP2M_VCPU_DISABLE_NOTIFY, &[]),
            "DISABLE_NOTIFY refused",
        )
        .map(|_| ())
    } else {
        expect(notify, error::EPERM, "ENABLE_NOTIFY allowed")
    }
}

/// VMFUNC switches views without a VM exit; an invalid or hidden slot gives #UD.
/// Where the hypervisor does not offer VMFUNC: it raises #UD for every
/// slot and views switch by hypercall ([`vmfunc_not_offered`]).
pub fn vmfunc() -> Outcome {
    if !offers(feature::VMFUNC) {
        return vmfunc_not_offered();
    }
    enable()?;
    let (a, b) = (create(access::RWX)?, create(access::RWX)?);
    // Fresh views copy the pages the loop touches on first use (lazy-copy
    // exits); warm them up so only the switches are measured.
    for _ in 0..2 {
        probe::vmfunc(a as u32).map_err(|_| "VMFUNC to a visible view faulted")?;
        probe::vmfunc(b as u32).map_err(|_| "VMFUNC to a visible view faulted")?;
        counts();
    }
    probe::vmfunc(0).map_err(|_| "VMFUNC back to view 0 faulted")?;
    let before = counts();
    for _ in 0..50 {
        probe::vmfunc(a as u32).map_err(|_| "VMFUNC to a visible view faulted")?;
        probe::vmfunc(b as u32).map_err(|_| "VMFUNC to a visible view faulted")?;
    }
    probe::vmfunc(0).map_err(|_| "VMFUNC back to view 0 faulted")?;
    let after = counts();
    let exits: u64 = after.iter().zip(before.iter()).map(|(x, y)| x - y).sum();
    println!("vmfunc: 101 switches cost {exits} VM exits (the EXIT_COUNTS call itself is 1)");
    check(exits == 1, "VMFUNC switches caused VM exits")?;
    expect(
        hypercall(call::ALTP2M_GET_VCPU_VIEW, &[0]),
        0,
        "the hypervisor did not see the switch back",
    )?;
    probe::vmfunc(b as u32).map_err(|_| "VMFUNC to b faulted")?;
    expect(
        hypercall(call::ALTP2M_GET_VCPU_VIEW, &[0]),
        b as i64,
        "the hypervisor did not see the switch to b",
    )?;
    check(
        probe::vmfunc(300) == Err(UD),
        "VMFUNC to an empty slot did not raise #UD",
    )?;
    ok(hypercall(call::ALTP2M_SET_VISIBILITY, &[a, 0]), "hiding a")?;
    check(
        probe::vmfunc(a as u32) == Err(UD),
        "VMFUNC to a hidden view did not raise #UD",
    )?;
    expect(
        hypercall(call::ALTP2M_GET_VCPU_VIEW, &[0]),
        b as i64,
        "a refused VMFUNC moved the vCPU",
    )?;
    expect(
        hypercall(call::ALTP2M_SWITCH_VIEW, &[a]),
        error::EINVAL,
        "hypercall switch to a hidden view",
    )?;
    ok(hypercall(call::ALTP2M_SET_VISIBILITY, &[a, 1]), "showing a")?;
    disable()
}

/// The `vmfunc` scenario without VMFUNC: the instruction raises #UD and
/// moves nothing, and the path that exists, the switch hypercall, does
/// what VMFUNC would have done (one exit per switch), hidden views included.
fn vmfunc_not_offered() -> Outcome {
    enable()?;
    let (a, b) = (create(access::RWX)?, create(access::RWX)?);
    for slot in [a, b, 0, 300] {
        check(
            probe::vmfunc(slot as u32) == Err(UD),
            "VMFUNC did not raise #UD although the hypervisor does not offer it",
        )?;
    }
    expect(
        hypercall(call::ALTP2M_GET_VCPU_VIEW, &[0]),
        0,
        "a refused VMFUNC moved the vCPU",
    )?;
    for _ in 0..2 {
        switch(a)?;
        switch(b)?;
    }
    switch(0)?;
    let before = counts();
    for _ in 0..50 {
        switch(a)?;
        switch(b)?;
    }
    switch(0)?;
    let calls = exits_since(&before)[reason::VMCALL];
    println!(
        "vmfunc: not offered: VMFUNC raises #UD; 101 switches by hypercall cost {calls} VMCALL exits"
    );
    check(calls == 101, "not one exit per hypercall switch")?;
    switch(b)?;
    expect(
        hypercall(call::ALTP2M_GET_VCPU_VIEW, &[0]),
        b as i64,
        "the hypercall switch to b did not move the vCPU",
    )?;
    ok(hypercall(call::ALTP2M_SET_VISIBILITY, &[a, 0]), "hiding a")?;
    expect(
        hypercall(call::ALTP2M_SWITCH_VIEW, &[a]),
        error::EINVAL,
        "hypercall switch to a hidden view",
    )?;
    ok(hypercall(call::ALTP2M_SET_VISIBILITY, &[a, 1]), "showing a")?;
    disable()
}

/// What the #VE handler saw, for the scenario to check.
static VE_COUNT: AtomicU32 = AtomicU32::new(0);
static VE_GPA: AtomicU64 = AtomicU64::new(0);
static VE_QUALIFICATION: AtomicU64 = AtomicU64::new(0);
static VE_VIEW: AtomicU32 = AtomicU32::new(u32::MAX);
/// Whether the handler clears the semaphore (re-arms) before returning.
static VE_REARM: AtomicU32 = AtomicU32::new(1);
/// The view the handler grants write access in.
static VE_FIX_VIEW: AtomicU64 = AtomicU64::new(0);

fn info_u64(offset: usize) -> u64 {
    // SAFETY: the #VE information page is guest RAM the guest registered.
    unsafe { core::ptr::read_volatile((VE_PAGE + offset as u64) as *const u64) }
}

/// The guest's #VE (vector 20) handler: records what the CPU reported, lets
/// the access through (write access in the view), re-arms if asked.
pub fn on_ve() {
    VE_COUNT.fetch_add(1, Ordering::Relaxed);
    VE_GPA.store(info_u64(ve_info::GUEST_PHYSICAL_ADDRESS), Ordering::Relaxed);
    VE_QUALIFICATION.store(info_u64(ve_info::QUALIFICATION), Ordering::Relaxed);
    VE_VIEW.store(
        info_u64(ve_info::EPTP_INDEX) as u32 & 0xffff,
        Ordering::Relaxed,
    );
    let gfn = info_u64(ve_info::GUEST_PHYSICAL_ADDRESS) >> 12;
    hypercall(
        call::ALTP2M_SET_MEM_ACCESS,
        &[VE_FIX_VIEW.load(Ordering::Relaxed), gfn, access::RWX],
    );
    if VE_REARM.load(Ordering::Relaxed) != 0 {
        // SAFETY: the semaphore dword of the registered #VE page.
        unsafe { core::ptr::write_volatile((VE_PAGE + ve_info::SEMAPHORE as u64) as *mut u32, 0) };
    }
}

/// Makes the #VE handler grant write access in `view` and re-arm.
pub(crate) fn fix_ve_in(view: u64) {
    VE_FIX_VIEW.store(view, Ordering::Relaxed);
    VE_REARM.store(1, Ordering::Relaxed);
}

/// The #VEs delivered so far.
pub(crate) fn ve_count() -> u32 {
    VE_COUNT.load(Ordering::Relaxed)
}

/// Switches views the way an in-guest agent does, with VMFUNC where the
/// hypervisor offers it, else by hypercall. (The #VE scenario uses it:
/// Bochs 2.7 reports in the #VE information the EPTP index of the last
/// VMFUNC, not the one the hypervisor writes to the VMCS.)
pub(crate) fn vmfunc_to(view: u64) -> Outcome {
    if !offers(feature::VMFUNC) {
        return switch(view);
    }
    probe::vmfunc(view as u32).map_err(|_| "VMFUNC to a visible view faulted")
}

pub fn ve() -> Outcome {
    if !offers(feature::VE) {
        return ve_not_offered();
    }
    enable()?;
    ok(
        hypercall(call::ALTP2M_VCPU_ENABLE_NOTIFY, &[gfn(VE_PAGE)]),
        "ENABLE_NOTIFY",
    )?;
    let v = create(access::RWX)?;
    let target = 0x40_5000;
    let page = gfn(target);
    VE_FIX_VIEW.store(v, Ordering::Relaxed);
    for round in 1..=2u32 {
        read_only_with_ve(v, page)?;
        vmfunc_to(v)?;
        write_u8(target + 0x10, round as u8);
        vmfunc_to(0)?;
        check(
            VE_COUNT.load(Ordering::Relaxed) == round,
            "no #VE for the write (or one too many)",
        )?;
    }
    let (gpa, q, view) = (
        VE_GPA.load(Ordering::Relaxed),
        VE_QUALIFICATION.load(Ordering::Relaxed),
        VE_VIEW.load(Ordering::Relaxed),
    );
    println!(
        "ve: {} #VEs; last: gpa {gpa:#x}, qualification {q:#x}, view {view}",
        VE_COUNT.load(Ordering::Relaxed)
    );
    check(gpa == target + 0x10, "#VE reported the wrong address")?;
    check(q & 0b111 == 0b010, "#VE qualification is not a write")?;
    check(
        q & (1 << 3) != 0 && q & (1 << 4) == 0,
        "#VE qualification: wrong entry rights (expected r-x)",
    )?;
    if view as u64 != v && !offers(feature::VMFUNC) {
        // Switched by hypercall: Bochs 2.7 reports the last VMFUNC's index
        // (none: 0), real CPUs the VMCS field.
        println!(
            "ve: #VE reported view {view} after hypercall switches to {v}: not checked (Bochs)"
        );
    } else if view as u64 != v {
        println!("ve: #VE reported view {view}, the write ran in view {v}");
        return Err("#VE reported the wrong view");
    }
    // Not re-armed: the next violation exits to the hypervisor instead.
    VE_REARM.store(0, Ordering::Relaxed);
    ok(
        hypercall(call::ALTP2M_SET_MEM_ACCESS, &[v, page, access::RX]),
        "read-only again",
    )?;
    vmfunc_to(v)?;
    write_u8(target + 0x20, 3);
    vmfunc_to(0)?;
    check(
        VE_COUNT.load(Ordering::Relaxed) == 3,
        "the first violation after a re-arm gave no #VE",
    )?;
    ok(
        hypercall(call::ALTP2M_SET_MEM_ACCESS, &[v, page, access::RX]),
        "read-only once more",
    )?;
    vmfunc_to(v)?;
    write_u8(target + 0x30, 4);
    vmfunc_to(0)?;
    check(
        VE_COUNT.load(Ordering::Relaxed) == 3,
        "a #VE was delivered while the semaphore was set",
    )?;
    check(
        read_u8(target + 0x30) == 4,
        "the write the hypervisor handled did not happen",
    )?;
    VE_REARM.store(1, Ordering::Relaxed);
    // Re-armed for whoever registers the page next (`ve-and-timer`).
    // SAFETY: the semaphore dword of the registered #VE page.
    unsafe { core::ptr::write_volatile((VE_PAGE + ve_info::SEMAPHORE as u64) as *mut u32, 0) };
    ok(
        hypercall(call::ALTP2M_VCPU_DISABLE_NOTIFY, &[]),
        "DISABLE_NOTIFY",
    )?;
    disable()
}

/// The `ve` scenario without #VE: both notify calls answer EOPNOTSUPP, and
/// a write a view denies (suppress-#VE cleared, as for a #VE) exits to the
/// hypervisor, which steps it in view 0: the write happens, the page stays
/// read-only in the view, no #VE arrives.
fn ve_not_offered() -> Outcome {
    enable()?;
    expect(
        hypercall(call::ALTP2M_VCPU_ENABLE_NOTIFY, &[gfn(VE_PAGE)]),
        error::EOPNOTSUPP,
        "ENABLE_NOTIFY without #VE",
    )?;
    expect(
        hypercall(call::ALTP2M_VCPU_DISABLE_NOTIFY, &[]),
        error::EOPNOTSUPP,
        "DISABLE_NOTIFY without #VE",
    )?;
    let v = create(access::RWX)?;
    let target = 0x40_5000;
    let page = gfn(target);
    let ves = ve_count();
    let mut violations = 0;
    for round in 1..=2u8 {
        read_only_with_ve(v, page)?;
        switch(v)?;
        let before = counts();
        write_u8(target + 0x10 * u64::from(round), round);
        violations += exits_since(&before)[reason::EPT_VIOLATION];
        switch(0)?;
        check(
            read_u8(target + 0x10 * u64::from(round)) == round,
            "the denied write did not happen",
        )?;
    }
    expect(
        hypercall(call::ALTP2M_GET_MEM_ACCESS, &[v, page]),
        access::RX as i64,
        "the view lost its restriction",
    )?;
    println!(
        "ve: not offered: the notify calls answer EOPNOTSUPP; 2 denied writes took {violations} EPT-violation exits and happened, {} #VEs",
        ve_count() - ves
    );
    check(violations >= 2, "a denied write did not exit")?;
    check(ve_count() == ves, "a #VE without #VE")?;
    disable()
}

/// An execute view shows a shadow copy of a code page with an INT3, a
/// read of the page shows the original; the call still runs the original
/// instruction and returns its value.
pub fn hidden_breakpoint() -> Outcome {
    const CODE_BYTES: [u8; 6] = [0xb8, 0x2a, 0x00, 0x00, 0x00, 0xc3]; // mov eax, 42; ret
    for (i, b) in CODE_BYTES.iter().enumerate() {
        write_u8(CODE + i as u64, *b);
        write_u8(SHADOW + i as u64, *b);
    }
    write_u8(SHADOW, 0xcc);
    enable()?;
    let exec = create(access::RWX)?;
    ok(
        hypercall(call::ALTP2M_CHANGE_GFN, &[exec, gfn(CODE), gfn(SHADOW)]),
        "remapping the code page",
    )?;
    ok(
        hypercall(call::ALTP2M_SET_MEM_ACCESS, &[exec, gfn(CODE), access::X]),
        "making it execute-only",
    )?;
    switch(exec)?;
    let first = read_u8(CODE);
    // SAFETY: CODE holds `mov eax, 42; ret` (the shadow: INT3 in place of the
    // first byte, which the hypervisor steps over in the original).
    let f: extern "C" fn() -> u32 = unsafe { core::mem::transmute(CODE as usize) };
    let value = f();
    let again = f();
    switch(0)?;
    println!(
        "hidden-breakpoint: read {first:#04x} through the execute view, the call returned {value} and {again}"
    );
    check(
        first == 0xb8,
        "a read through the execute view saw the shadow",
    )?;
    check(
        value == 42 && again == 42,
        "the call did not run the original instruction",
    )?;
    check(read_u8(SHADOW) == 0xcc, "the shadow lost its breakpoint")?;
    disable()
}

/// A page is ballooned out while two views alias it: no view reaches its
/// frame afterwards, and the views keep their other restrictions and remaps.
pub fn balloon() -> Outcome {
    for (page, value) in [
        (P, 0x50),
        (G1, 0x51),
        (G2, 0x52),
        (G3, 0x53),
        (G4, 0x54),
        (G5, 0x55),
    ] {
        fill(page, value);
    }
    enable()?;
    let (a, b) = (create(access::RWX)?, create(access::RWX)?);
    ok(
        hypercall(call::ALTP2M_CHANGE_GFN, &[a, gfn(G1), gfn(P)]),
        "alias in a",
    )?;
    ok(
        hypercall(call::ALTP2M_CHANGE_GFN, &[b, gfn(G2), gfn(P)]),
        "alias in b",
    )?;
    ok(
        hypercall(call::ALTP2M_SET_MEM_ACCESS, &[a, gfn(G3), access::RX]),
        "restriction in a",
    )?;
    ok(
        hypercall(call::ALTP2M_CHANGE_GFN, &[b, gfn(G4), gfn(G5)]),
        "other remap in b",
    )?;
    switch(a)?;
    let through_a = read_u8(G1);
    switch(b)?;
    let (through_b, remapped) = (read_u8(G2), read_u8(G4));
    switch(0)?;
    check(
        through_a == 0x50 && through_b == 0x50 && remapped == 0x55,
        "the aliases do not show P",
    )?;
    ok(
        hypercall(call::BALLOON_RELEASE, &[gfn(P)]),
        "BALLOON_RELEASE",
    )?;
    expect(
        hypercall(call::BALLOON_RELEASE, &[gfn(P)]),
        error::ENOENT,
        "releasing it twice",
    )?;
    check(probe::read(P) == Err(GP), "P is still reachable in view 0")?;
    switch(a)?;
    let (g1, p_in_a) = (read_u8(G1), probe::read(P));
    switch(b)?;
    let (g2, g4, p_in_b) = (read_u8(G2), read_u8(G4), probe::read(P));
    switch(0)?;
    println!("balloon: after release: a sees G1 {g1:#x}, b sees G2 {g2:#x} and G4 {g4:#x}");
    check(
        p_in_a == Err(GP) && p_in_b == Err(GP),
        "P is reachable through a view",
    )?;
    check(
        g1 == 0x51 && g2 == 0x52,
        "an alias still reaches the released frame",
    )?;
    check(g4 == 0x55, "b lost its other remap")?;
    expect(
        hypercall(call::ALTP2M_GET_MEM_ACCESS, &[a, gfn(G3)]),
        access::RX as i64,
        "a lost its restriction",
    )?;
    disable()
}

fn fb_checksum() -> u64 {
    // SAFETY: the framebuffer is guest RAM the scenario owns.
    let bytes =
        (0..FB_PAGES * 4096).map(|i| unsafe { core::ptr::read_volatile((FB + i) as *const u8) });
    hv_abi::display_checksum(bytes)
}

fn draw(frame: u64, pages: impl Iterator<Item = u64>) {
    for page in pages {
        for i in (0..4096).step_by(64) {
            write_u8(
                FB + page * 4096 + i,
                (frame as u8)
                    .wrapping_mul(31)
                    .wrapping_add(page as u8 + i as u8),
            );
        }
    }
}

fn refresh_and_compare(frame: u64) -> Outcome {
    let copied = ok(hypercall(call::DISPLAY_REFRESH, &[]), "DISPLAY_REFRESH")?;
    let (ours, theirs) = (fb_checksum(), hypercall(call::DISPLAY_CHECKSUM, &[]) as u64);
    println!(
        "display: frame {frame}: {copied} pages copied, checksum {ours:#x} / display {theirs:#x}"
    );
    check(
        ours == theirs,
        "the display copy differs from the framebuffer (frozen display)",
    )
}

/// The seed scenario: a view created and switched to early copies the
/// framebuffer writable; tracking starts later; every write through the
/// view (and through VMFUNC-switched views) must still reach the display.
/// With `late`, the view is created after tracking started.
pub fn display(late: bool) -> Outcome {
    enable()?;
    let early = if late {
        None
    } else {
        Some(create(access::RWX)?)
    };
    if let Some(v) = early {
        switch(v)?;
        draw(0, 0..FB_PAGES);
    }
    ok(
        hypercall(call::DISPLAY_SET, &[gfn(FB), FB_PAGES]),
        "DISPLAY_SET",
    )?;
    let v = match early {
        Some(v) => v,
        None => {
            let v = create(access::RWX)?;
            switch(v)?;
            v
        }
    };
    refresh_and_compare(0)?;
    for frame in 1..4 {
        draw(frame, (frame..FB_PAGES).step_by(3));
        refresh_and_compare(frame)?;
    }
    let other = create(access::RWX)?;
    // As an agent in the guest switches: VMFUNC where offered.
    vmfunc_to(other)?;
    draw(4, 0..4);
    vmfunc_to(v)?;
    draw(5, 2..6);
    refresh_and_compare(5)?;
    switch(0)?;
    // Without asking: the hypervisor's periodic tick refreshes the copy.
    // The VMX-preemption timer counts only while the guest runs, so spin in
    // the guest between looks.
    draw(6, 0..FB_PAGES);
    let want = fb_checksum();
    let mut spun = 0u64;
    while hypercall(call::DISPLAY_CHECKSUM, &[]) as u64 != want {
        check(
            spun < TICK_WAIT,
            "the periodic tick never refreshed the display",
        )?;
        for _ in 0..1_000_000 {
            core::hint::spin_loop();
        }
        spun += 1_000_000;
    }
    println!("display: the periodic tick refreshed the display after {spun} spins");
    ok(
        hypercall(call::DISPLAY_SET, &[0, 0]),
        "stopping the display",
    )?;
    disable()
}

/// Figure: VM exits and TSC ticks per view switch by VMFUNC and by
/// hypercall (by hypercall only where VMFUNC is not offered).
pub fn vmfunc_bench() -> Outcome {
    const N: u64 = 1000;
    let vmfunc = offers(feature::VMFUNC);
    enable()?;
    let (a, b) = (create(access::RWX)?, create(access::RWX)?);
    // Warm up: the first visits copy the loop's pages into the fresh views.
    for _ in 0..2 {
        if vmfunc {
            let _ = probe::vmfunc(a as u32);
            let _ = probe::vmfunc(b as u32);
        }
        hypercall(call::ALTP2M_SWITCH_VIEW, &[a]);
        hypercall(call::ALTP2M_SWITCH_VIEW, &[b]);
    }
    let before = counts();
    let start = rdtsc();
    for _ in 0..N / 2 {
        if !vmfunc {
            break;
        }
        let _ = probe::vmfunc(a as u32);
        let _ = probe::vmfunc(b as u32);
    }
    let by_vmfunc = rdtsc() - start;
    let mid = counts();
    let start = rdtsc();
    for _ in 0..N / 2 {
        hypercall(call::ALTP2M_SWITCH_VIEW, &[a]);
        hypercall(call::ALTP2M_SWITCH_VIEW, &[b]);
    }
    let by_call = rdtsc() - start;
    let after = counts();
    let sum =
        |x: &[u64; 80], y: &[u64; 80]| x.iter().zip(y.iter()).map(|(a, b)| a - b).sum::<u64>();
    let (e1, e2) = (sum(&mid, &before) - 1, sum(&after, &mid) - 1);
    if !vmfunc {
        println!(
            "vmfunc-bench: per switch: VMFUNC not offered; hypercall {} exits, {} TSC ticks",
            e2 as f64 / N as f64,
            by_call / N
        );
        return disable();
    }
    println!(
        "vmfunc-bench: per switch: VMFUNC {} exits, {} TSC ticks; hypercall {} exits, {} TSC ticks",
        e1 as f64 / N as f64,
        by_vmfunc / N,
        e2 as f64 / N as f64,
        by_call / N
    );
    disable()
}

/// Figure: lazy-copy exits per MiB the guest touches in a fresh view.
pub fn lazy_copy_bench() -> Outcome {
    enable()?;
    let v = create(access::RWX)?;
    switch(v)?;
    let before = counts();
    for page in 0..LAZY_MIB * 256 {
        read_u8(LAZY + page * 4096);
    }
    let after = counts();
    switch(0)?;
    let violations = after[48] - before[48];
    println!(
        "lazy-copy-bench: {LAZY_MIB} MiB touched in a fresh view: {violations} EPT-violation exits, {} per MiB",
        violations as f64 / LAZY_MIB as f64
    );
    disable()
}

/// The exits taken between two `counts()`, the periodic tick (the
/// VMX-preemption timer, which the guest does not cause) and the second
/// `EXIT_COUNTS` call left out; and the ticks.
fn exits_between(before: &[u64; 80], after: &[u64; 80]) -> (u64, u64) {
    const TICK: usize = 52;
    let all: u64 = after.iter().zip(before.iter()).map(|(x, y)| x - y).sum();
    let ticks = after[TICK] - before[TICK];
    (all - ticks - 1, ticks)
}

/// Pages of the framebuffer the display figure draws into (the most a
/// display takes).
const BENCH_PAGES: u64 = 64;

/// Figure: VM exits per display frame with N dirty pages, written through a
/// view, after a first frame that wrote every page (it pays for tracking's
/// own start: recomputations, superpage splits). With PML the guest's
/// writes cost no exit, only the refresh call; with write protection
/// (`vmx.mask=pml`) a fault per page and the re-arm's misconfigurations.
pub fn display_bench() -> Outcome {
    enable()?;
    ok(
        hypercall(call::DISPLAY_SET, &[gfn(FB), BENCH_PAGES]),
        "DISPLAY_SET",
    )?;
    let v = create(access::RWX)?;
    switch(v)?;
    hypercall(call::DISPLAY_REFRESH, &[]);
    let frame = |n: u64| {
        let before = counts();
        draw(n, 0..n);
        let copied = hypercall(call::DISPLAY_REFRESH, &[]);
        let (exits, ticks) = exits_between(&before, &counts());
        (exits, ticks, copied)
    };
    let (exits, _, copied) = frame(BENCH_PAGES);
    println!(
        "display-bench: first frame, {copied} of {BENCH_PAGES} pages copied: {exits} VM exits"
    );
    for n in [1, 4, 16, 64] {
        let (exits, ticks, copied) = frame(n);
        println!(
            "display-bench: frame with {n} dirty pages: {exits} VM exits (the guest's writes and the refresh call; {ticks} ticks not counted), {copied} pages copied"
        );
        check(
            copied == n as i64,
            "a frame's dirty pages were not all copied",
        )?;
    }
    switch(0)?;
    ok(
        hypercall(call::DISPLAY_SET, &[0, 0]),
        "stopping the display",
    )?;
    disable()
}

/// Figure: what one `LOGDIRTY_FETCH` costs in TSC ticks (Bochs counts
/// emulated instructions) with many one-page tracked ranges: 16384 of them
/// (every other page) fill a 32768-page window, the most one call fetches;
/// then a one-page window with all of them outside it; then written RAM
/// (2048 ranges, every other page of 16 MiB..32 MiB). Leaves the ranges
/// tracked (there is no call to stop): run it last.
pub fn logdirty_bench() -> Outcome {
    const WINDOW: u64 = 32768;
    /// Far beyond RAM (64 GiB): ranges there mark nothing in the tables.
    const FAR: u64 = 1 << 24;
    static BITMAP: [AtomicU64; 512] = [const { AtomicU64::new(0) }; 512];
    let bitmap = BITMAP.as_ptr() as u64;
    let timed = |f: &mut dyn FnMut() -> i64| {
        let start = rdtsc();
        let r = f();
        (rdtsc() - start, r)
    };
    let track = |first: u64| hypercall(call::LOGDIRTY_TRACK, &[first, 1]);
    let (first_track, r) = timed(&mut || track(FAR));
    ok(r, "LOGDIRTY_TRACK")?;
    for k in 1..WINDOW / 2 - 1 {
        ok(track(FAR + 2 * k), "LOGDIRTY_TRACK")?;
    }
    let (last_track, r) = timed(&mut || track(FAR + WINDOW - 2));
    ok(r, "LOGDIRTY_TRACK")?;
    let fetch = |first: u64, pages: u64| hypercall(call::LOGDIRTY_FETCH, &[first, pages, bitmap]);
    let (window, r) = timed(&mut || fetch(FAR, WINDOW));
    expect(r, 0, "nothing written there")?;
    let (outside, r) = timed(&mut || fetch(FAR + 4 * WINDOW, 1));
    expect(r, 0, "nothing there")?;
    println!(
        "logdirty-bench: {} one-page ranges: LOGDIRTY_TRACK of the first {first_track} TSC ticks, of the last {last_track}",
        WINDOW / 2
    );
    println!(
        "logdirty-bench: LOGDIRTY_FETCH of {WINDOW} pages holding {} ranges: {window} TSC ticks; of 1 page with all of them outside: {outside}",
        WINDOW / 2
    );
    // In RAM, written: the re-arm has pages to re-arm.
    const RAM: u64 = 0x100_0000;
    const RAM_PAGES: u64 = 4096;
    for k in 0..RAM_PAGES / 2 {
        ok(track(gfn(RAM) + 2 * k), "LOGDIRTY_TRACK")?;
    }
    for round in 0..2 {
        for k in 0..RAM_PAGES / 2 {
            write_u8(RAM + 2 * k * 4096, round as u8);
        }
        let before = counts();
        let (ram, r) = timed(&mut || fetch(gfn(RAM), RAM_PAGES));
        let (exits, _) = exits_between(&before, &counts());
        expect(r, RAM_PAGES as i64 / 2, "every other page written")?;
        if round == 1 {
            println!(
                "logdirty-bench: LOGDIRTY_FETCH of {RAM_PAGES} pages of RAM holding {} written ranges: {ram} TSC ticks, {exits} VM exits",
                RAM_PAGES / 2
            );
        }
    }
    Ok(())
}

/// Tracks one-page ranges (every other page, far beyond RAM) until the
/// hypervisor runs out of heap for them: the number of ranges is bounded by
/// its memory (`ENOMEM`, never a failure of the hypervisor), and fetching
/// still works after. Uses up the hypervisor's heap: run it last.
pub fn logdirty_limit() -> Outcome {
    const FAR: u64 = 1 << 26;
    static BITMAP: [AtomicU64; 512] = [const { AtomicU64::new(0) }; 512];
    let mut n = 0u64;
    loop {
        let r = hypercall(call::LOGDIRTY_TRACK, &[FAR + 2 * n, 1]);
        if r == error::ENOMEM {
            break;
        }
        ok(r, "LOGDIRTY_TRACK")?;
        n += 1;
        check(n < 1 << 24, "no limit on the number of ranges")?;
    }
    println!("logdirty-limit: {n} one-page ranges tracked, then ENOMEM");
    let bitmap = BITMAP.as_ptr() as u64;
    expect(
        hypercall(call::LOGDIRTY_FETCH, &[FAR, 32768, bitmap]),
        0,
        "a fetch once the ranges filled the heap",
    )
    .map(|_| ())
}

/// Log-dirty, balloon and display calls with good and bad arguments.
pub fn memory_calls() -> Outcome {
    use error::*;
    const PAGES: u64 = 0x40_8000;
    static BITMAP: AtomicU64 = AtomicU64::new(0);
    let bitmap = &BITMAP as *const AtomicU64 as u64;
    let first = gfn(PAGES);
    let fetch = || hypercall(call::LOGDIRTY_FETCH, &[first, 4, bitmap]);
    ok(
        hypercall(call::LOGDIRTY_TRACK, &[first, 4]),
        "LOGDIRTY_TRACK",
    )?;
    fetch();
    write_u8(PAGES, 1);
    write_u8(PAGES + 0x2000, 1);
    expect(fetch(), 2, "two pages written, two dirty")?;
    check(
        BITMAP.load(Ordering::Relaxed) == 0b0101,
        "the bitmap does not name pages 0 and 2",
    )?;
    expect(fetch(), 0, "a fetch clears")?;
    write_u8(PAGES + 0x1000, 2);
    expect(fetch(), 1, "tracking re-armed after the fetch")?;
    check(
        BITMAP.load(Ordering::Relaxed) == 0b0010,
        "the bitmap does not name page 1",
    )?;
    expect(
        hypercall(call::LOGDIRTY_TRACK, &[first, 0]),
        EINVAL,
        "tracking 0 pages",
    )?;
    expect(
        hypercall(call::LOGDIRTY_TRACK, &[first, 1 << 30]),
        EINVAL,
        "tracking 2^30 pages",
    )?;
    expect(
        hypercall(call::LOGDIRTY_TRACK, &[u64::MAX, 2]),
        EINVAL,
        "a range past the end",
    )?;
    expect(
        hypercall(call::LOGDIRTY_FETCH, &[first, 4, NOT_RAM]),
        EFAULT,
        "a bitmap in the MMIO hole",
    )?;
    expect(
        hypercall(call::LOGDIRTY_FETCH, &[first, 40_000, bitmap]),
        EINVAL,
        "fetching 40000 pages",
    )?;
    expect(
        hypercall(call::BALLOON_RELEASE, &[gfn(NOT_RAM)]),
        ENOENT,
        "ballooning the MMIO hole",
    )?;
    expect(
        hypercall(call::BALLOON_RELEASE, &[gfn(1 << 36)]),
        ENOENT,
        "ballooning beyond RAM",
    )?;
    expect(
        hypercall(call::BALLOON_RELEASE, &[1 << 40]),
        EINVAL,
        "ballooning beyond 48 bits",
    )?;
    expect(
        hypercall(call::DISPLAY_REFRESH, &[]),
        ENOENT,
        "refresh without a display",
    )?;
    expect(
        hypercall(call::DISPLAY_CHECKSUM, &[]),
        ENOENT,
        "checksum without a display",
    )?;
    expect(
        hypercall(call::DISPLAY_SET, &[0, 0]),
        ENOENT,
        "stopping a display that is not there",
    )?;
    expect(
        hypercall(call::DISPLAY_SET, &[gfn(FB), 65]),
        EINVAL,
        "65 pages",
    )?;
    expect(
        hypercall(call::DISPLAY_SET, &[gfn(NOT_RAM - 0x2000), 4]),
        EFAULT,
        "a framebuffer over the MMIO hole",
    )?;
    ok(hypercall(call::DISPLAY_SET, &[gfn(FB), 4]), "DISPLAY_SET")?;
    expect(
        hypercall(call::DISPLAY_SET, &[gfn(FB), 4]),
        EBUSY,
        "a second display",
    )?;
    expect(
        hypercall(call::BALLOON_RELEASE, &[gfn(FB) + 1]),
        EBUSY,
        "ballooning the framebuffer",
    )?;
    ok(
        hypercall(call::DISPLAY_SET, &[0, 0]),
        "stopping the display",
    )
    .map(|_| ())
}

/// Makes `page` read-only in view `v` with suppress-#VE clear: a write
/// there is a #VE where the CPU has it.
fn read_only_with_ve(v: u64, page: u64) -> Outcome {
    ok(
        hypercall(call::ALTP2M_SET_MEM_ACCESS, &[v, page, access::RX]),
        "making the page read-only",
    )?;
    ok(
        hypercall(call::ALTP2M_SET_SUPPRESS_VE, &[v, page, 0]),
        "clearing suppress-#VE",
    )
    .map(|_| ())
}

/// Runs the hypervisor out of what it may spend on this guest (run with a
/// small `guest.heap=` and `guest.frames=`): remaps of gfns in ever new
/// 1 GiB regions (each costs the views' bookkeeping heap) and views (each
/// costs EPT tables) until the hypervisor answers ENOMEM;
/// then the guest still runs, gives it all back, and can spend it again.
pub fn exhaust() -> Outcome {
    const GIB_PAGES: u64 = 1 << 18;
    enable()?;
    let view = create(access::RWX)?;
    let mut remaps = 0u64;
    let refused = loop {
        // Old gfns far above RAM (up to 2^36 pages: 256 TiB), one per GiB.
        let old = (remaps + 1) * GIB_PAGES;
        let result = hypercall(call::ALTP2M_CHANGE_GFN, &[view, old, gfn(CODE)]);
        if result < 0 {
            break result;
        }
        remaps += 1;
        if remaps == 1 << 18 {
            return Err("no ENOMEM after 262144 remaps in new regions");
        }
    };
    println!("exhaust: {remaps} remaps in new 1 GiB regions, then {refused}");
    check(refused == error::ENOMEM, "the refusal is not ENOMEM")?;
    check(
        hypercall(call::ALTP2M_GET_STATE, &[]) == 1,
        "the hypervisor stopped answering",
    )?;
    ok(
        hypercall(call::ALTP2M_DESTROY_VIEW, &[view]),
        "the view could not be destroyed",
    )?;
    // Views until the frames or the heap run out. (A view the guest runs
    // on and that cannot grow for want of frames stops the guest, as Xen
    // crashes a domain whose p2m cannot be allocated: not tried here.)
    let mut views = [0u64; 511];
    let mut made = 0;
    let refused = loop {
        let result = hypercall(call::ALTP2M_CREATE_VIEW, &[access::RWX]);
        if result < 0 {
            break result;
        }
        views[made] = result as u64;
        made += 1;
        if made == views.len() {
            break 0;
        }
    };
    println!("exhaust: {made} views made, then {refused}");
    check(
        refused == error::ENOMEM || made == views.len(),
        "views failed with another error",
    )?;
    for &v in &views[..made] {
        ok(
            hypercall(call::ALTP2M_DESTROY_VIEW, &[v]),
            "a view could not be destroyed",
        )?;
    }
    // All given back: the same work succeeds again.
    let again = create(access::RWX)?;
    ok(
        hypercall(call::ALTP2M_CHANGE_GFN, &[again, GIB_PAGES, gfn(CODE)]),
        "a remap after the views were destroyed",
    )?;
    ok(
        hypercall(call::ALTP2M_DESTROY_VIEW, &[again]),
        "the last view",
    )?;
    disable()
}

/// The display and the guest's own log-dirty calls share one dirty log: a
/// guest LOGDIRTY_FETCH over the framebuffer takes the updates the display
/// has not copied yet (its copy then stays stale), and a display refresh
/// takes the dirty bits the guest has not fetched yet, unless each keeps
/// what the other took for it (docs/limits.md). Both directions.
pub fn display_vs_logdirty() -> Outcome {
    const PAGES: u64 = 4;
    static BITMAP: AtomicU64 = AtomicU64::new(0);
    let bitmap = &BITMAP as *const AtomicU64 as u64;
    let checksum = || {
        // SAFETY: the framebuffer is guest RAM the scenario owns.
        let bytes =
            (0..PAGES * 4096).map(|i| unsafe { core::ptr::read_volatile((FB + i) as *const u8) });
        hv_abi::display_checksum(bytes)
    };
    ok(
        hypercall(call::DISPLAY_SET, &[gfn(FB), PAGES]),
        "DISPLAY_SET",
    )?;
    write_u8(FB + 0x10, read_u8(FB + 0x10).wrapping_add(1));
    let taken = hypercall(call::LOGDIRTY_FETCH, &[gfn(FB), PAGES, bitmap]);
    let copied = hypercall(call::DISPLAY_REFRESH, &[]);
    let (ours, theirs) = (checksum(), hypercall(call::DISPLAY_CHECKSUM, &[]) as u64);
    write_u8(FB + 0x1010, read_u8(FB + 0x1010).wrapping_add(1));
    let refreshed = hypercall(call::DISPLAY_REFRESH, &[]);
    let seen = hypercall(call::LOGDIRTY_FETCH, &[gfn(FB), PAGES, bitmap]);
    ok(
        hypercall(call::DISPLAY_SET, &[0, 0]),
        "stopping the display",
    )?;
    println!(
        "display-vs-logdirty: a write, the guest's fetch ({taken} dirty), a refresh ({copied} copied): checksum {ours:#x} / display {theirs:#x}; a write, a refresh ({refreshed} copied), the guest's fetch: {seen} dirty"
    );
    check(
        ours == theirs,
        "the guest's LOGDIRTY_FETCH of the framebuffer left the display stale",
    )?;
    check(
        seen == 1,
        "the display's refresh took the guest's dirty bit",
    )
}
