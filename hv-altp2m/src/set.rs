//! The view set of one guest: enabling altp2m, creating, destroying and
//! resetting views, their visibility, the EPTP lists, and which view each
//! vCPU runs on (by the hypervisor, or by the guest with VMFUNC, learnt
//! afterwards with `sync_vcpu_view`). Every switch path honours visibility.

use alloc::vec::Vec;

use hv_ept::{EptCaps, EptMemory, Gfn, Mfn, P2m, P2mAccess};

use crate::lists::EptpLists;
use crate::occupancy::Occupancy;
use crate::pml::Harvest;
use crate::remap::Remaps;
use crate::viewset::{MAX_VIEWS, ViewSet};
use crate::{DropLog, Error};

/// EPTP bit 6: EPT accessed/dirty flags. Views follow the host's setting,
/// and its log mode (PML needs A/D).
const EPTP_AD: u64 = 1 << 6;

/// One alternate view: its own EPT tree over the host p2m.
pub(crate) struct View {
    pub(crate) p2m: P2m,
    /// The access a lazy copy installs (Xen's `default_access`).
    pub(crate) default_access: P2mAccess,
    pub(crate) visible: bool,
    pub(crate) remaps: Remaps,
}

/// The altp2m state of one guest, kept next to its host p2m, dirty bitmap
/// and `EptMemory`, which every call borrows. View 0 is the host p2m itself
/// (see the crate doc); views 1..=511 are separate trees.
pub struct Altp2m {
    pub(crate) enabled: bool,
    pub(crate) caps: EptCaps,
    /// One slot per view index; slot 0 stays `None` (view 0 is the host).
    pub(crate) views: Vec<Option<View>>,
    /// Active views, 0 included while enabled.
    pub(crate) active: ViewSet,
    view0_visible: bool,
    /// The view each vCPU runs on.
    vcpus: Vec<u16>,
    lists: EptpLists,
    pub(crate) occupancy: Occupancy,
    /// Views with at least one remap.
    pub(crate) remapping: ViewSet,
    /// A view was destroyed: its EPTP must be flushed, and only an
    /// all-context INVEPT can name it now.
    pub(crate) flush_all: bool,
    /// Calls of `take_flush` so far: a clean's fetch waits for the next one.
    pub(crate) flushes: u64,
    pub(crate) drops: DropLog,
    /// Under PML: sources of aliases dropped with their dirty flag set.
    pub(crate) harvest: Harvest,
}

impl Altp2m {
    /// The altp2m state for a guest of `vcpus` vCPUs, disabled. Allocates the
    /// two EPTP list frames (kept until [`Altp2m::destroy`], so the frame the
    /// VMCS points at is never recycled under a running vCPU) and room for
    /// `drop_log` entries of the drop log.
    pub fn new<M: EptMemory + ?Sized>(
        mem: &mut M,
        vcpus: usize,
        drop_log: usize,
    ) -> Result<Altp2m, Error> {
        if vcpus == 0 || vcpus > u16::MAX as usize {
            return Err(Error::BadVcpu);
        }
        let mut views = Vec::new();
        views
            .try_reserve_exact(MAX_VIEWS)
            .map_err(|_| Error::NoMemory)?;
        views.resize_with(MAX_VIEWS, || None);
        let mut vcpu_views = Vec::new();
        vcpu_views
            .try_reserve_exact(vcpus)
            .map_err(|_| Error::NoMemory)?;
        vcpu_views.resize(vcpus, 0);
        let drops = DropLog::new(drop_log)?;
        let lists = EptpLists::new(mem)?;
        Ok(Altp2m {
            enabled: false,
            caps: EptCaps::ALL,
            views,
            active: ViewSet::EMPTY,
            view0_visible: true,
            vcpus: vcpu_views,
            lists,
            occupancy: Occupancy::default(),
            remapping: ViewSet::EMPTY,
            flush_all: false,
            flushes: 0,
            drops,
            harvest: Harvest::default(),
        })
    }

    /// Frees everything, the list frames included. The caller has stopped
    /// every vCPU from using them (VMFUNC off, EPTP = host's) and will flush
    /// before the frames are reused.
    pub fn destroy<M: EptMemory + ?Sized>(mut self, mem: &mut M) {
        if self.enabled {
            let _ = self.disable(mem);
        }
        self.lists.free(mem);
    }

    /// Turns altp2m on: view 0 (the host p2m) becomes the only active view,
    /// visible, and every vCPU runs on it. Set the host's A/D mode first:
    /// views take it from the host's EPTP.
    pub fn enable<M: EptMemory + ?Sized>(&mut self, mem: &mut M, host: &P2m) -> Result<(), Error> {
        if self.enabled {
            return Err(Error::AlreadyEnabled);
        }
        self.caps = *host.caps();
        self.lists.clear(mem);
        self.lists.set(mem, 0, host.eptp(), true);
        self.view0_visible = true;
        self.active = ViewSet::EMPTY;
        self.active.insert(0);
        self.vcpus.fill(0);
        self.enabled = true;
        Ok(())
    }

    /// Turns altp2m off: every vCPU returns to view 0 and every other view is
    /// destroyed (its tables freed, remaps, restrictions and drop-log entries
    /// gone); the lists
    /// hold only invalid EPTPs. Call with the vCPUs out of guest mode; before
    /// resuming them the kernel loads the host EPTP into each VMCS, turns
    /// VMFUNC and #VE off, and does the INVEPT that [`Altp2m::take_flush`]
    /// asks for (all contexts) before the freed frames can be reused.
    pub fn disable<M: EptMemory + ?Sized>(&mut self, mem: &mut M) -> Result<(), Error> {
        if !self.enabled {
            return Err(Error::NotEnabled);
        }
        for slot in self.views.iter_mut() {
            if let Some(v) = slot.take() {
                self.harvest.view(mem, &v);
                v.p2m.destroy(mem);
                self.flush_all = true;
            }
        }
        self.lists.clear(mem);
        self.active = ViewSet::EMPTY;
        self.remapping = ViewSet::EMPTY;
        self.occupancy.clear();
        self.drops.forget_all();
        self.vcpus.fill(0);
        self.enabled = false;
        Ok(())
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Creates a view in the lowest free slot (1..=511): an empty tree (one
    /// root table, `max_mapped_pfn` 0) with the host's log-dirty state, that
    /// fills lazily with `default_access`. Visible.
    pub fn create_view<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        host: &P2m,
        default_access: P2mAccess,
    ) -> Result<u16, Error> {
        self.check_enabled()?;
        let free = (1..MAX_VIEWS)
            .find(|&i| self.views[i].is_none())
            .ok_or(Error::NoFreeView)?;
        self.create_view_at(mem, host, free as u16, default_access)?;
        Ok(free as u16)
    }

    /// Creates the view at index `view` (Xen's `p2m_init_altp2m_by_id`).
    pub fn create_view_at<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        host: &P2m,
        view: u16,
        default_access: P2mAccess,
    ) -> Result<(), Error> {
        self.check_enabled()?;
        let i = view as usize;
        if i == 0 {
            return Err(Error::DefaultView);
        }
        if i >= MAX_VIEWS {
            return Err(Error::BadView);
        }
        if self.views[i].is_some() {
            return Err(Error::ViewExists);
        }
        if !default_access.is_representable(host.caps()) {
            return Err(Error::UnsupportedAccess);
        }
        let mut p2m = P2m::new(mem, *host.caps())?;
        if host.eptp() & EPTP_AD != 0 {
            // The host has A/D on, so the CPU supports it, and the tree is
            // empty: neither can fail.
            let _ = p2m.set_ad_enabled(true);
            let _ = p2m.set_log_mode(mem, host.log_mode());
        }
        if let Err(e) = p2m.copy_logdirty_from(mem, host) {
            p2m.destroy(mem);
            return Err(e.into());
        }
        self.lists.set(mem, i, p2m.eptp(), true);
        self.views[i] = Some(View {
            p2m,
            default_access,
            visible: true,
            remaps: Remaps::default(),
        });
        self.active.insert(i);
        Ok(())
    }

    /// Destroys a view: its tables are freed and nothing of it survives, its
    /// drop-log entries included (a view later created at the same index
    /// starts empty and is told of no loss). Refused with
    /// `Busy` while a vCPU runs on it. Its EPTP may still be cached: the next
    /// [`Altp2m::take_flush`] asks for an all-context INVEPT, which must
    /// happen before the freed frames are reused.
    pub fn destroy_view<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        view: u16,
    ) -> Result<(), Error> {
        let i = self.altp2m_index(view)?;
        if self.vcpus.contains(&view) {
            return Err(Error::Busy);
        }
        if let Some(v) = self.views[i].take() {
            self.harvest.view(mem, &v);
            v.p2m.destroy(mem);
        }
        self.lists.unset(mem, i);
        self.active.remove(i);
        self.remapping.remove(i);
        self.occupancy.forget(i);
        self.drops.forget(view);
        self.flush_all = true;
        Ok(())
    }

    /// Empties a view (Xen's `p2m_reset_altp2m`): entries, restrictions and
    /// remaps are gone, `max_mapped_pfn` is 0 again; default access and
    /// visibility stay. vCPUs may keep running on it: it refills lazily.
    pub fn reset_view<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        host: &P2m,
        view: u16,
    ) -> Result<(), Error> {
        let i = self.altp2m_index(view)?;
        let Altp2m { views, harvest, .. } = self;
        let v = views[i].as_mut().ok_or(Error::BadView)?;
        // The view already has the host's log-dirty state (every change is
        // applied to both); this only fails, before any change, if not.
        v.p2m.copy_logdirty_from(mem, host)?;
        harvest.view(mem, v);
        v.p2m.reset(mem);
        v.remaps.clear();
        self.remapping.remove(i);
        self.occupancy.forget(i);
        Ok(())
    }

    /// Shows or hides a view in the CPU's EPTP list (VMFUNC can only switch
    /// to visible views; the hypervisor's switches check it too). vCPUs that
    /// run on a view that is hidden stay on it.
    pub fn set_visibility<M: EptMemory + ?Sized>(
        &mut self,
        mem: &mut M,
        host: &P2m,
        view: u16,
        visible: bool,
    ) -> Result<(), Error> {
        let i = self.active_index(view)?;
        let eptp = if i == 0 {
            self.view0_visible = visible;
            host.eptp()
        } else {
            let v = self.view_mut(i)?;
            v.visible = visible;
            v.p2m.eptp()
        };
        self.lists.set(mem, i, eptp, visible);
        Ok(())
    }

    pub fn is_visible(&self, view: u16) -> Result<bool, Error> {
        let i = self.active_index(view)?;
        Ok(if i == 0 {
            self.view0_visible
        } else {
            self.view_ref(i)?.visible
        })
    }

    pub fn is_active(&self, view: u16) -> bool {
        self.enabled && self.active.contains(view as usize)
    }

    /// The active views (0 included while enabled).
    pub fn active_views(&self) -> ViewSet {
        self.active
    }

    pub fn vcpus(&self) -> usize {
        self.vcpus.len()
    }

    /// The view `vcpu` runs on (0 while altp2m is disabled).
    pub fn vcpu_view(&self, vcpu: usize) -> Result<u16, Error> {
        self.vcpus.get(vcpu).copied().ok_or(Error::BadVcpu)
    }

    /// Puts `vcpu` on `view` (Xen's `p2m_switch_vcpu_altp2m_by_id`). The
    /// kernel then loads [`Altp2m::eptp`] of the view and its index into the
    /// vCPU's VMCS.
    pub fn switch_vcpu(&mut self, vcpu: usize, view: u16) -> Result<(), Error> {
        self.switchable(view)?;
        let slot = self.vcpus.get_mut(vcpu).ok_or(Error::BadVcpu)?;
        *slot = view;
        Ok(())
    }

    /// Puts every vCPU on `view` (Xen's `p2m_switch_domain_altp2m_by_id`).
    pub fn switch_all(&mut self, view: u16) -> Result<(), Error> {
        self.switchable(view)?;
        self.vcpus.fill(view);
        Ok(())
    }

    /// After a VMFUNC the guest may run on another view than the hypervisor
    /// last set: `index` is the EPTP index read from the VMCS. It must be the
    /// view the vCPU was on, or an active visible one (the CPU's list holds
    /// no other); anything else is an error the kernel treats as corrupt
    /// guest state.
    pub fn sync_vcpu_view(&mut self, vcpu: usize, index: u64) -> Result<(), Error> {
        let current = self.vcpu_view(vcpu)?;
        if index == current as u64 {
            return Ok(());
        }
        let view = u16::try_from(index).map_err(|_| Error::BadView)?;
        self.switchable(view)?;
        self.vcpus[vcpu] = view;
        Ok(())
    }

    /// The EPTP of a view (view 0: the host p2m's).
    pub fn eptp(&self, host: &P2m, view: u16) -> Result<u64, Error> {
        match self.active_index(view)? {
            0 => Ok(host.eptp()),
            i => Ok(self.view_ref(i)?.p2m.eptp()),
        }
    }

    /// The EPTP `vcpu` must run on.
    pub fn vcpu_eptp(&self, host: &P2m, vcpu: usize) -> Result<u64, Error> {
        let view = self.vcpu_view(vcpu)?;
        if !self.enabled {
            return Ok(host.eptp());
        }
        self.eptp(host, view)
    }

    /// The list of every active view's EPTP (invalid elsewhere).
    pub fn valid_list(&self) -> Mfn {
        self.lists.valid()
    }

    /// The list the CPU reads for VMFUNC: visible views only. The kernel
    /// points the VMCS EPTP-list address at this frame.
    pub fn visible_list(&self) -> Mfn {
        self.lists.visible()
    }

    pub fn default_access(&self, view: u16) -> Result<P2mAccess, Error> {
        let i = self.altp2m_index(view)?;
        Ok(self.view_ref(i)?.default_access)
    }

    /// The access later lazy copies install. Entries already copied keep
    /// theirs (as in Xen); a reset applies the new default everywhere.
    pub fn set_default_access(&mut self, view: u16, access: P2mAccess) -> Result<(), Error> {
        let i = self.altp2m_index(view)?;
        if !access.is_representable(&self.caps) {
            return Err(Error::UnsupportedAccess);
        }
        self.view_mut(i)?.default_access = access;
        Ok(())
    }

    /// The view's bound: no present entry above it (view 0: the host's).
    pub fn max_mapped_pfn(&self, host: &P2m, view: u16) -> Result<Gfn, Error> {
        match self.active_index(view)? {
            0 => Ok(host.max_mapped_pfn()),
            i => Ok(self.view_ref(i)?.p2m.max_mapped_pfn()),
        }
    }

    /// `(min_remapped_gfn, max_remapped_gfn)`: the lowest and highest remap
    /// source of the view, exact; `None` without remaps.
    pub fn remapped_gfns(&self, view: u16) -> Result<Option<(Gfn, Gfn)>, Error> {
        let i = self.altp2m_index(view)?;
        Ok(self
            .view_ref(i)?
            .remaps
            .min_max_remapped_gfn()
            .map(|(a, b)| (Gfn(a), Gfn(b))))
    }

    /// The source of the remap at `gfn`, if `gfn` is an alias in `view`.
    pub fn remap_source(&self, view: u16, gfn: Gfn) -> Result<Option<Gfn>, Error> {
        let i = self.altp2m_index(view)?;
        Ok(self.view_ref(i)?.remaps.source_of(gfn.check()?.0).map(Gfn))
    }

    /// Every remap of a view as (alias, source), by alias.
    pub fn remaps(&self, view: u16) -> Result<impl Iterator<Item = (Gfn, Gfn)> + '_, Error> {
        let i = self.altp2m_index(view)?;
        Ok(self.view_ref(i)?.remaps.iter())
    }

    /// A view's own tree, for inspection (not view 0: that is the host p2m).
    /// Change it only through this crate.
    pub fn view_p2m(&self, view: u16) -> Option<&P2m> {
        let i = self.altp2m_index(view).ok()?;
        self.views[i].as_ref().map(|v| &v.p2m)
    }

    /// The views besides view 0 and the frames of their tables now (the
    /// two EPTP list frames, held from [`Altp2m::new`] on, not counted):
    /// what lazily copied views cost the hypervisor, for a run's report.
    pub fn view_tables<M: EptMemory + ?Sized>(&self, mem: &M) -> (usize, u64) {
        self.views
            .iter()
            .flatten()
            .fold((0, 0), |(views, frames), view| {
                (views + 1, frames + view.p2m.table_frames(mem))
            })
    }

    pub(crate) fn check_enabled(&self) -> Result<(), Error> {
        if self.enabled {
            Ok(())
        } else {
            Err(Error::NotEnabled)
        }
    }

    /// An active view, 0 included. View 0 is usable while altp2m is off too
    /// (it is the host p2m).
    pub(crate) fn active_index(&self, view: u16) -> Result<usize, Error> {
        let i = view as usize;
        if i == 0 {
            return Ok(0);
        }
        self.altp2m_index(view)
    }

    /// An active view other than 0: one with a tree of its own.
    pub(crate) fn altp2m_index(&self, view: u16) -> Result<usize, Error> {
        let i = view as usize;
        if i == 0 {
            return Err(Error::DefaultView);
        }
        self.check_enabled()?;
        if i >= MAX_VIEWS || !self.active.contains(i) {
            return Err(Error::BadView);
        }
        Ok(i)
    }

    fn switchable(&self, view: u16) -> Result<(), Error> {
        self.check_enabled()?;
        if !self.is_visible(view)? {
            return Err(Error::Invisible);
        }
        Ok(())
    }

    pub(crate) fn view_ref(&self, i: usize) -> Result<&View, Error> {
        self.views
            .get(i)
            .and_then(Option::as_ref)
            .ok_or(Error::BadView)
    }

    pub(crate) fn view_mut(&mut self, i: usize) -> Result<&mut View, Error> {
        self.views
            .get_mut(i)
            .and_then(Option::as_mut)
            .ok_or(Error::BadView)
    }
}
