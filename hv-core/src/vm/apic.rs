//! Where the guest's local APIC answers: the page each vCPU's
//! IA32_APIC_BASE names maps to the physical local APIC (every CPU's own,
//! at one physical address), so a guest that relocates its APIC moves only
//! that mapping, never the physical APIC. A page no enabled APIC names any
//! more gets back what was under it (RAM, or nothing); while only disabled
//! APICs name it, it reads as all ones, as an address nothing decodes.

use hv_altp2m::{Error, Mapping};
use hv_ept::{Gfn, Mfn, Order, P2mAccess, P2mType};

use super::{PAGE, Vm};
use crate::platform::Platform;

/// A guest page some vCPU's IA32_APIC_BASE names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApicPage {
    pub gfn: Gfn,
    /// vCPUs with their APIC enabled at this page, and disabled.
    pub enabled: u32,
    pub disabled: u32,
    /// What the host p2m mapped there before (RAM), restored when no
    /// vCPU names the page any more.
    under: Option<(Mfn, P2mType)>,
}

impl ApicPage {
    /// The page every vCPU's APIC starts at.
    pub fn reset(gfn: Gfn, vcpus: u32) -> Self {
        Self {
            gfn,
            enabled: vcpus,
            disabled: 0,
            under: None,
        }
    }
}

impl Vm {
    /// A vCPU's IA32_APIC_BASE went from `old` to `new` (page, enabled):
    /// the mappings of both pages follow.
    pub fn apic_page_moved(
        &mut self,
        platform: &mut impl Platform,
        old: (Gfn, bool),
        new: (Gfn, bool),
    ) -> Result<(), Error> {
        if old == new {
            return Ok(());
        }
        if !self.apic_pages.iter().any(|p| p.gfn == new.0) {
            self.apic_pages
                .try_reserve(1)
                .map_err(|_| Error::NoMemory)?;
            let under = self
                .p2m
                .get_entry(platform, new.0)
                .ok()
                .and_then(|e| e.mfn.map(|mfn| (mfn, e.ty)));
            self.apic_pages.push(ApicPage {
                gfn: new.0,
                enabled: 0,
                disabled: 0,
                under,
            });
        }
        fn count(page: &mut ApicPage, enabled: bool) -> &mut u32 {
            if enabled {
                &mut page.enabled
            } else {
                &mut page.disabled
            }
        }
        for page in &mut self.apic_pages {
            if page.gfn == old.0 {
                let c = count(page, old.1);
                *c = c.saturating_sub(1);
            }
            if page.gfn == new.0 {
                *count(page, new.1) += 1;
            }
        }
        self.map_apic_page(platform, old.0)?;
        self.map_apic_page(platform, new.0)
    }

    /// Maps `gfn` as its APIC page counts say.
    fn map_apic_page(&mut self, platform: &mut impl Platform, gfn: Gfn) -> Result<(), Error> {
        let Some(at) = self.apic_pages.iter().position(|p| p.gfn == gfn) else {
            return Ok(());
        };
        let page = self.apic_pages[at];
        let mapping = if page.enabled > 0 {
            Some((self.lapic, P2mType::MmioDirect))
        } else if page.disabled > 0 {
            Some((self.all_ones_page(platform)?, P2mType::RamRo))
        } else {
            self.apic_pages.swap_remove(at);
            page.under
        };
        let host = &mut self.p2m;
        match mapping {
            Some((mfn, ty)) => self.altp2m.host_set_entry(
                platform,
                host,
                gfn,
                Order::PAGE_4K,
                Mapping {
                    mfn,
                    ty,
                    access: P2mAccess::Rwx,
                },
            ),
            None => self.altp2m.host_remove(platform, host, gfn, Order::PAGE_4K),
        }
    }

    /// A frame of the VM's that reads as all ones (mapped read-only).
    fn all_ones_page(&mut self, platform: &mut impl Platform) -> Result<Mfn, Error> {
        if let Some(mfn) = self.all_ones {
            return Ok(mfn);
        }
        let mfn = platform.alloc_frames(1, 1).ok_or(Error::NoMemory)?;
        let ones = [0xffu8; 512];
        for chunk in 0..PAGE / 512 {
            platform.write_phys(mfn.hpa() + chunk * 512, &ones);
        }
        self.all_ones = Some(mfn);
        Ok(mfn)
    }
}
