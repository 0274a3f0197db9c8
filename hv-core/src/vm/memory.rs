//! The guest's memory as the hypervisor reaches it (hypercall buffers, the
//! structures it keeps pointing at): one checked interface that names the
//! guest frame and refuses, reading or writing nothing, any byte that is not
//! the guest's RAM.

use hv_ept::{Gfn, Mfn, P2mType};

use super::{PAGE, Vm};
use crate::platform::Platform;

/// Why a guest access to its memory through the hypervisor was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotGuestRam(pub u64);

impl Vm {
    /// The frame behind `gfn` if it is writable guest RAM, for structures the
    /// hypervisor keeps pointing at (the #VE page) or gives away (balloon).
    pub fn ram_page(&self, platform: &impl Platform, gfn: Gfn) -> Option<Mfn> {
        self.ram_frame(platform, gfn.0.checked_mul(PAGE)?, true)
            .ok()
            .map(|(mfn, _)| mfn)
    }

    /// The frame behind `gpa` if it is guest RAM the hypervisor may access
    /// that way, and whether it is log-dirty.
    fn ram_frame(
        &self,
        platform: &impl Platform,
        gpa: u64,
        write: bool,
    ) -> Result<(Mfn, bool), NotGuestRam> {
        let info = self
            .p2m
            .get_entry(platform, Gfn(gpa / PAGE))
            .map_err(|_| NotGuestRam(gpa))?;
        match (info.mfn, info.ty, write) {
            (Some(mfn), P2mType::RamRw, _) | (Some(mfn), P2mType::RamRo, false) => Ok((mfn, false)),
            (Some(mfn), P2mType::RamLogdirty, _) => Ok((mfn, true)),
            _ => Err(NotGuestRam(gpa)),
        }
    }

    /// Reads guest RAM at `gpa`; refuses (reading nothing) if any byte is not RAM.
    pub fn read(
        &self,
        platform: &impl Platform,
        gpa: u64,
        buf: &mut [u8],
    ) -> Result<(), NotGuestRam> {
        for_each_page(gpa, buf.len(), |at, _| {
            self.ram_frame(platform, at, false).map(|_| ())
        })?;
        for_each_page(gpa, buf.len(), |at, range| {
            let (mfn, _) = self.ram_frame(platform, at, false)?;
            platform.read_phys(mfn.hpa() + at % PAGE, &mut buf[range]);
            Ok(())
        })
    }

    /// Writes guest RAM at `gpa`, marking log-dirty pages dirty; checks every
    /// page first, so a refused write writes nothing.
    pub fn write(
        &mut self,
        platform: &mut impl Platform,
        gpa: u64,
        data: &[u8],
    ) -> Result<(), NotGuestRam> {
        let mut logdirty = false;
        for_each_page(gpa, data.len(), |at, _| {
            logdirty |= self.ram_frame(platform, at, true)?.1;
            Ok(())
        })?;
        if logdirty {
            let last = (gpa + data.len() as u64).saturating_sub(1) / PAGE;
            self.dirty
                .reserve(Gfn(gpa / PAGE), Gfn(last))
                .map_err(|_| NotGuestRam(gpa))?;
        }
        for_each_page(gpa, data.len(), |at, range| {
            let (mfn, logdirty) = self.ram_frame(platform, at, true)?;
            if logdirty {
                self.dirty
                    .mark(Gfn(at / PAGE))
                    .map_err(|_| NotGuestRam(at))?;
            }
            platform.write_phys(mfn.hpa() + at % PAGE, &data[range]);
            Ok(())
        })
    }
}

/// Calls `f(gpa of the piece, range in the buffer)` for each page-bounded
/// piece of `gpa..gpa + len`, stopping at the first error.
fn for_each_page(
    gpa: u64,
    len: usize,
    mut f: impl FnMut(u64, core::ops::Range<usize>) -> Result<(), NotGuestRam>,
) -> Result<(), NotGuestRam> {
    gpa.checked_add(len as u64).ok_or(NotGuestRam(gpa))?;
    let mut done = 0;
    while done < len {
        let at = gpa + done as u64;
        let n = ((PAGE - at % PAGE) as usize).min(len - done);
        f(at, done..done + n)?;
        done += n;
    }
    Ok(())
}
