//! EPT exits in the view a vCPU runs on: violations (lazy copy, log-dirty
//! writes, rx2rw/n2rwx conversion, real access violations) and
//! misconfigurations (pending lazy type changes, resolved in that view).
//! The kernel calls [`Altp2m::sync_vcpu_view`] first when the guest may have
//! switched views with VMFUNC.

use hv_ept::walk::AccessKind;
use hv_ept::{
    DirtyBitmap, EntryInfo, EptMemory, Gfn, LogMode, Order, P2m, P2mAccess, P2mType, Rights,
    WriteFault,
};

use crate::{Altp2m, Error};

/// What an EPT violation was, and what was done about it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Outcome {
    /// The view held nothing at the gfn: the host's mapping was copied in at
    /// `order` from `gfn` (the block's first gfn). Resume the guest.
    LazyCopied { view: u16, gfn: Gfn, order: Order },
    /// A write to a `ram_logdirty` page: `owner` (the gfn that owns the
    /// frame: the remap source for an alias, else the gfn itself) was marked
    /// dirty and made `ram_rw` in the host and every view; or, under PML
    /// (`fault` = `Split`), the superpage holding `gfn` in `view` was split
    /// so that the page is writable and the CPU logs its writes. Resume.
    LogDirty {
        view: u16,
        gfn: Gfn,
        owner: Gfn,
        fault: WriteFault,
    },
    /// `rx2rw` became `rw` (on a write) or `n2rwx` became `rwx` (on any
    /// access) at this gfn of the view. Resume; for `n2rwx` a monitor
    /// expects an event (as with Xen).
    Converted {
        view: u16,
        gfn: Gfn,
        from: P2mAccess,
        to: P2mAccess,
    },
    /// Nothing left to do: the entry allows the access now (another vCPU
    /// changed it), or a pending lazy type change on its path was resolved.
    /// Resume.
    Retry,
    /// The view's entry denies the access: deliver a #VE (if the vCPU has it
    /// on and `suppress_ve` is clear) or report to the monitor.
    Violation(AccessViolation),
    /// Neither the view nor the host maps the gfn: a stray access.
    NotMapped { view: u16, gfn: Gfn },
}

/// A real access violation in a view.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct AccessViolation {
    pub view: u16,
    pub gfn: Gfn,
    pub kind: AccessKind,
    /// The effective type (for an alias: its source's type in the host).
    pub ty: P2mType,
    /// The entry's access.
    pub access: P2mAccess,
    pub suppress_ve: bool,
    /// The source gfn when `gfn` is a remap in this view.
    pub remap_source: Option<Gfn>,
}

pub(crate) fn needed(kind: AccessKind) -> Rights {
    match kind {
        AccessKind::Read => Rights::R,
        AccessKind::Write => Rights::W,
        AccessKind::Fetch => Rights::X,
    }
}

/// The gfn of a guest-physical address, checked.
pub(crate) fn gfn_of(gpa: u64) -> Result<Gfn, Error> {
    Ok(Gfn(gpa >> 12).check()?)
}

enum Decision {
    Retry,
    /// A lazy type change is pending on the path. The CPU reports a marked
    /// entry without rights (access `n`) as not present, so it never takes
    /// the misconfiguration there: resolve it here, then retry.
    Resolve,
    /// The access allows the write; the type (`ram_ro`, `ram_logdirty`,
    /// or an alias's stand-in) denies it.
    TypeDeniesWrite,
    Convert(P2mAccess),
    Deny,
}

/// What to do about a violation on entry `e` of `p2m` (whose log mode
/// decides the rights of a log-dirty page).
fn decide(p2m: &P2m, e: &EntryInfo, kind: AccessKind) -> Decision {
    if e.recalc {
        return Decision::Resolve;
    }
    if p2m.rights(e.ty, e.access, e.order).contains(needed(kind)) {
        return Decision::Retry;
    }
    if kind == AccessKind::Write && e.access.allowed().contains(Rights::W) {
        return Decision::TypeDeniesWrite;
    }
    match (e.access, kind) {
        (P2mAccess::Rx2rw, AccessKind::Write) => Decision::Convert(P2mAccess::Rw),
        (P2mAccess::N2rwx, _) => Decision::Convert(P2mAccess::Rwx),
        _ => Decision::Deny,
    }
}

impl Altp2m {
    /// Handles an EPT violation of `vcpu` at `gpa` for an access of `kind`,
    /// in the view the vCPU runs on (view 0: the host p2m).
    pub fn handle_violation<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        host: &mut P2m,
        dirty: &mut DirtyBitmap,
        vcpu: usize,
        gpa: u64,
        kind: AccessKind,
    ) -> Result<Outcome, Error> {
        let view = self.vcpu_view(vcpu)?;
        self.handle_violation_in(mem, host, dirty, view, gpa, kind)
    }

    /// [`Altp2m::handle_violation`] in `view`, for a vCPU whose hardware
    /// runs on another view than its own for a moment (a single step the
    /// hypervisor takes for it in view 0).
    pub fn handle_violation_in<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        host: &mut P2m,
        dirty: &mut DirtyBitmap,
        view: u16,
        gpa: u64,
        kind: AccessKind,
    ) -> Result<Outcome, Error> {
        let gfn = gfn_of(gpa)?;
        if view == 0 || !self.enabled {
            return self.host_violation(mem, host, dirty, gfn, kind);
        }
        let i = view as usize;
        let v = self.view_ref(i)?;
        let e = v.p2m.get_entry(mem, gfn)?;
        let Some(mfn) = e.mfn else {
            return self.lazy_copy(mem, host, i, gfn);
        };
        let source = v.remaps.source_of(gfn.0).map(Gfn);
        let owner = source.unwrap_or(gfn);
        // The host decides what a type-denied write is: the view's type is a
        // copy (for an alias, a stand-in for the source's).
        let host_ty = host.get_entry(mem, owner)?.ty;
        let ty = if source.is_some() { host_ty } else { e.ty };
        match decide(&v.p2m, &e, kind) {
            Decision::Retry => Ok(Outcome::Retry),
            Decision::Resolve => {
                self.view_mut(i)?.p2m.resolve_misconfig(mem, gfn)?;
                Ok(Outcome::Retry)
            }
            Decision::TypeDeniesWrite
                if host_ty == P2mType::RamLogdirty
                    && host.log_mode() == LogMode::Pml
                    && e.ty == P2mType::RamLogdirty
                    && e.order != Order::PAGE_4K =>
            {
                // The view's own superpage: split here so the page logs
                // through PML; out of frames, the write-protect way.
                let v = self.view_mut(i)?;
                match v
                    .p2m
                    .set_entry(mem, gfn, mfn, Order::PAGE_4K, e.ty, e.access)
                {
                    Ok(()) => Ok(Outcome::LogDirty {
                        view,
                        gfn,
                        owner,
                        fault: WriteFault::Split,
                    }),
                    Err(hv_ept::Error::NoMemory) => {
                        self.logdirty_fault(mem, host, dirty, view, gfn, owner)
                    }
                    Err(e) => Err(e.into()),
                }
            }
            Decision::TypeDeniesWrite if host_ty == P2mType::RamLogdirty => {
                self.logdirty_fault(mem, host, dirty, view, gfn, owner)
            }
            Decision::TypeDeniesWrite if host_ty.rights(P2mAccess::Rwx).contains(Rights::W) => {
                // The view is behind the host: only possible if the host
                // changed without this crate. Bring it up to date, retry.
                self.propagate(mem, host, owner.0, owner.0);
                Ok(Outcome::Retry)
            }
            Decision::Convert(to) => {
                let v = self.view_mut(i)?;
                v.p2m.set_entry(mem, gfn, mfn, Order::PAGE_4K, e.ty, to)?;
                Ok(Outcome::Converted {
                    view,
                    gfn,
                    from: e.access,
                    to,
                })
            }
            Decision::TypeDeniesWrite | Decision::Deny => Ok(Outcome::Violation(AccessViolation {
                view,
                gfn,
                kind,
                ty,
                access: e.access,
                suppress_ve: e.sve,
                remap_source: source,
            })),
        }
    }

    /// Handles an EPT misconfiguration of `vcpu` at `gpa`: resolves pending
    /// lazy type changes on the gfn's path in the view the vCPU runs on.
    /// `Ok(false)`: nothing was pending there (another vCPU resolved it, or
    /// the misconfiguration is not ours).
    pub fn resolve_misconfig<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        host: &mut P2m,
        vcpu: usize,
        gpa: u64,
    ) -> Result<bool, Error> {
        let view = self.vcpu_view(vcpu)?;
        self.resolve_misconfig_in(mem, host, view, gpa)
    }

    /// [`Altp2m::resolve_misconfig`] in `view` (see [`Altp2m::handle_violation_in`]).
    pub fn resolve_misconfig_in<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        host: &mut P2m,
        view: u16,
        gpa: u64,
    ) -> Result<bool, Error> {
        let gfn = gfn_of(gpa)?;
        if view == 0 || !self.enabled {
            return Ok(host.resolve_misconfig(mem, gfn)?);
        }
        let v = self.view_mut(view as usize)?;
        Ok(v.p2m.resolve_misconfig(mem, gfn)?)
    }

    /// A violation on view 0, the host p2m.
    fn host_violation<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        host: &mut P2m,
        dirty: &mut DirtyBitmap,
        gfn: Gfn,
        kind: AccessKind,
    ) -> Result<Outcome, Error> {
        let e = host.get_entry(mem, gfn)?;
        let Some(mfn) = e.mfn else {
            return Ok(Outcome::NotMapped { view: 0, gfn });
        };
        match decide(host, &e, kind) {
            Decision::Retry => Ok(Outcome::Retry),
            Decision::Resolve => {
                host.resolve_misconfig(mem, gfn)?;
                Ok(Outcome::Retry)
            }
            Decision::TypeDeniesWrite if e.ty == P2mType::RamLogdirty => {
                self.logdirty_fault(mem, host, dirty, 0, gfn, gfn)
            }
            Decision::Convert(to) => {
                // Access only: the views do not follow host access.
                host.set_entry(mem, gfn, mfn, Order::PAGE_4K, e.ty, to)?;
                Ok(Outcome::Converted {
                    view: 0,
                    gfn,
                    from: e.access,
                    to,
                })
            }
            Decision::TypeDeniesWrite | Decision::Deny => Ok(Outcome::Violation(AccessViolation {
                view: 0,
                gfn,
                kind,
                ty: e.ty,
                access: e.access,
                suppress_ve: e.sve,
                remap_source: None,
            })),
        }
    }

    /// Xen's `p2m_altp2m_lazy_copy`: installs the host's mapping of `gfn` in
    /// view `i` (the host's effective type, the view's default access) at the
    /// largest order that fits both the host mapping and the view's hole.
    fn lazy_copy<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        host: &P2m,
        i: usize,
        gfn: Gfn,
    ) -> Result<Outcome, Error> {
        let h = host.get_entry(mem, gfn)?;
        let Some(hmfn) = h.mfn else {
            return Ok(Outcome::NotMapped {
                view: i as u16,
                gfn,
            });
        };
        let v = self.view_mut(i)?;
        let hole = v.p2m.get_entry(mem, gfn)?;
        let mut order = h.order.min(hole.order);
        // Above the bound get_entry sizes the hole conservatively (a bound of
        // 0 cannot tell "gfn 0 mapped" from "empty"): look for a larger one.
        for o in [Order::PAGE_1G, Order::PAGE_2M] {
            let first = gfn.0 & !(o.pages() - 1);
            if o > order
                && o <= h.order
                && !v
                    .p2m
                    .any_present(mem, Gfn(first), Gfn(first + o.pages() - 1))?
            {
                order = o;
                break;
            }
        }
        let off = gfn.0 & (order.pages() - 1);
        let base = Gfn(gfn.0 - off);
        let mfn = hv_ept::Mfn(hmfn.0 - off);
        v.p2m
            .set_entry(mem, base, mfn, order, h.ty, v.default_access)?;
        self.occupancy.note(i, base.0, base.0 + order.pages() - 1);
        Ok(Outcome::LazyCopied {
            view: i as u16,
            gfn: base,
            order,
        })
    }

    /// A logged write to `owner`, seen through `gfn` of `view`: mark it
    /// dirty, make it `ram_rw` in the host, and propagate.
    fn logdirty_fault<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        host: &mut P2m,
        dirty: &mut DirtyBitmap,
        view: u16,
        gfn: Gfn,
        owner: Gfn,
    ) -> Result<Outcome, Error> {
        let fault = host.logdirty_write_fault(mem, dirty, owner)?;
        let (s, e) = match fault {
            WriteFault::Coarse { gfn, order } => (gfn.0, gfn.0 + order.pages() - 1),
            WriteFault::Precise | WriteFault::NotLogdirty => (owner.0, owner.0),
            // Mapping and type as they were: nothing for the views.
            WriteFault::Split => (1, 0),
        };
        if s <= e {
            self.propagate(mem, host, s, e);
        }
        Ok(Outcome::LogDirty {
            view,
            gfn,
            owner,
            fault,
        })
    }
}
