//! Per-gfn access and suppress-#VE of a view (Xen's `set_mem_access`,
//! `set_suppress_ve` and their multi forms), and what a view shows at a gfn.
//! On view 0 they act on the host p2m's entries (access only: the other
//! views do not follow host access). On another view, a gfn the view does not
//! hold yet is first copied from the host at 4K. A `ram_logdirty` page takes
//! the new access and stays log-dirty (Xen skips it silently).

use hv_ept::{EptMemory, Gfn, Mfn, Order, P2m, P2mAccess, P2mType};

use crate::{Altp2m, Error};

/// What a view shows at a gfn.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Effective {
    pub mfn: Mfn,
    /// The effective type (for an alias: its source's type in the host).
    pub ty: P2mType,
    pub access: P2mAccess,
    pub suppress_ve: bool,
    /// The view has its own entry (else this is the host's mapping with the
    /// view's default access, which a lazy copy would install).
    pub held: bool,
    pub remap_source: Option<Gfn>,
}

/// A multi-form call stopped at element `done` (those before it took effect).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct MultiError {
    pub done: usize,
    pub error: Error,
}

/// The multi forms: `f` for each item in order, stopping at the first error.
fn each<T: Copy>(
    items: &[(Gfn, T)],
    mut f: impl FnMut(Gfn, T) -> Result<(), Error>,
) -> Result<(), MultiError> {
    for (done, &(gfn, value)) in items.iter().enumerate() {
        f(gfn, value).map_err(|error| MultiError { done, error })?;
    }
    Ok(())
}

impl Altp2m {
    /// The view's effective entry at `gfn`; `None` where neither the view
    /// nor the host maps it.
    pub fn get_entry<M: EptMemory + ?Sized>(
        &self,
        mem: &M,
        host: &P2m,
        view: u16,
        gfn: Gfn,
    ) -> Result<Option<Effective>, Error> {
        let i = self.active_index(view)?;
        if i > 0 {
            let v = self.view_ref(i)?;
            let e = v.p2m.get_entry(mem, gfn)?;
            if let Some(mfn) = e.mfn {
                let source = v.remaps.source_of(gfn.0).map(Gfn);
                let ty = match source {
                    Some(s) => host.get_entry(mem, s)?.ty,
                    None => e.ty,
                };
                return Ok(Some(Effective {
                    mfn,
                    ty,
                    access: e.access,
                    suppress_ve: e.sve,
                    held: true,
                    remap_source: source,
                }));
            }
        }
        let h = host.get_entry(mem, gfn)?;
        Ok(h.mfn.map(|mfn| Effective {
            mfn,
            ty: h.ty,
            access: if i == 0 {
                h.access
            } else {
                self.views[i]
                    .as_ref()
                    .map_or(h.access, |v| v.default_access)
            },
            suppress_ve: if i == 0 { h.sve } else { true },
            held: i == 0,
            remap_source: None,
        }))
    }

    pub fn set_mem_access<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        host: &mut P2m,
        view: u16,
        gfn: Gfn,
        access: P2mAccess,
    ) -> Result<(), Error> {
        if !access.is_representable(host.caps()) {
            return Err(Error::UnsupportedAccess);
        }
        self.modify_4k(mem, host, view, gfn, Some(access), None)
    }

    /// [`Altp2m::set_mem_access`] for each `(gfn, access)` in order.
    pub fn set_mem_access_multi<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        host: &mut P2m,
        view: u16,
        items: &[(Gfn, P2mAccess)],
    ) -> Result<(), MultiError> {
        each(items, |gfn, access| {
            self.set_mem_access(mem, host, view, gfn, access)
        })
    }

    /// The access at `gfn`: the view's entry's, or the default access where
    /// the view would copy from the host.
    pub fn get_mem_access<M: EptMemory + ?Sized>(
        &self,
        mem: &M,
        host: &P2m,
        view: u16,
        gfn: Gfn,
    ) -> Result<P2mAccess, Error> {
        let e = self.get_entry(mem, host, view, gfn)?;
        e.map(|e| e.access).ok_or(Error::NotMapped)
    }

    pub fn set_suppress_ve<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        host: &mut P2m,
        view: u16,
        gfn: Gfn,
        suppress_ve: bool,
    ) -> Result<(), Error> {
        self.modify_4k(mem, host, view, gfn, None, Some(suppress_ve))
    }

    /// [`Altp2m::set_suppress_ve`] for each `(gfn, suppress_ve)` in order.
    pub fn set_suppress_ve_multi<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        host: &mut P2m,
        view: u16,
        items: &[(Gfn, bool)],
    ) -> Result<(), MultiError> {
        each(items, |gfn, sve| {
            self.set_suppress_ve(mem, host, view, gfn, sve)
        })
    }

    pub fn get_suppress_ve<M: EptMemory + ?Sized>(
        &self,
        mem: &M,
        host: &P2m,
        view: u16,
        gfn: Gfn,
    ) -> Result<bool, Error> {
        let e = self.get_entry(mem, host, view, gfn)?;
        e.map(|e| e.suppress_ve).ok_or(Error::NotMapped)
    }

    /// Rewrites the 4K entry of `gfn` with a new access and/or suppress-#VE
    /// bit, keeping frame and type: the view's own entry (split out of a
    /// superpage), or a 4K copy of the host's mapping if the view has none.
    fn modify_4k<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        host: &mut P2m,
        view: u16,
        gfn: Gfn,
        access: Option<P2mAccess>,
        sve: Option<bool>,
    ) -> Result<(), Error> {
        let i = self.active_index(view)?;
        let gfn = gfn.check()?;
        if i == 0 {
            let e = host.get_entry(mem, gfn)?;
            let mfn = e.mfn.ok_or(Error::NotMapped)?;
            let access = access.unwrap_or(e.access);
            host.set_entry_sve(mem, gfn, mfn, Order::PAGE_4K, e.ty, access, sve)?;
            return Ok(());
        }
        let v = self.view_mut(i)?;
        let e = v.p2m.get_entry(mem, gfn)?;
        let (mfn, ty, current) = match e.mfn {
            Some(mfn) => (mfn, e.ty, e.access),
            None => {
                let h = host.get_entry(mem, gfn)?;
                (h.mfn.ok_or(Error::NotMapped)?, h.ty, v.default_access)
            }
        };
        let access = access.unwrap_or(current);
        v.p2m
            .set_entry_sve(mem, gfn, mfn, Order::PAGE_4K, ty, access, sve)?;
        self.occupancy.note(i, gfn.0, gfn.0);
        Ok(())
    }
}
