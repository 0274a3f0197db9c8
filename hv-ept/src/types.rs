//! p2m types and access, and the one place that turns them into EPT rights and
//! memory type.

use bitflags::bitflags;

use crate::caps::EptCaps;
use crate::entry::{EMT_UC, EMT_WB};

bitflags! {
    /// EPT R/W/X, in the positions of bits 2:0 of an entry.
    #[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
    pub struct Rights: u8 {
        const R = 1 << 0;
        const W = 1 << 1;
        const X = 1 << 2;
    }
}

/// How a p2m notices writes to `ram_logdirty` pages.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Hash)]
pub enum LogMode {
    /// The page is write-protected: its first write faults (an EPT
    /// violation), and the handler logs it and makes the page writable.
    #[default]
    WriteProtect,
    /// Page-modification logging: a 4K `ram_logdirty` page is writable with
    /// its EPT dirty flag clear; the CPU sets the flag on the first write
    /// and logs the page's address in the vCPU's PML buffer, without an
    /// exit. A `ram_logdirty` superpage stays write-protected: its first
    /// write faults and splits it, so that every 4K page logs its own
    /// writes. Needs EPT accessed/dirty flags.
    Pml,
}

/// What a gfn is. Stored in software bits 52-54 of a leaf.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
#[repr(u8)]
pub enum P2mType {
    /// Not present. 0 so that an empty slot decodes as `Invalid`.
    Invalid = 0,
    RamRw = 1,
    RamRo = 2,
    /// RAM whose writes are tracked: W is cleared so the first write faults.
    RamLogdirty = 3,
    MmioDirect = 4,
}

/// What a monitor allows on a gfn; it can only take rights away from the type.
/// Stored in software bits 55, 56, 59, 62 of a leaf.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
#[repr(u8)]
pub enum P2mAccess {
    N = 0,
    R = 1,
    W = 2,
    X = 3,
    Rx = 4,
    Wx = 5,
    Rw = 6,
    Rwx = 7,
    /// Read/execute; the monitor layer turns it into `Rw` on the first write.
    Rx2rw = 8,
    /// Nothing; the monitor layer turns it into `Rwx` on the first access.
    N2rwx = 9,
}

impl P2mType {
    pub(crate) fn from_bits(v: u8) -> P2mType {
        match v {
            1 => P2mType::RamRw,
            2 => P2mType::RamRo,
            3 => P2mType::RamLogdirty,
            4 => P2mType::MmioDirect,
            _ => P2mType::Invalid,
        }
    }

    pub const fn is_present(self) -> bool {
        !matches!(self, P2mType::Invalid)
    }

    /// The types a log-dirty recalculation moves between; the others keep
    /// their type through a recalculation.
    pub const fn is_changeable(self) -> bool {
        matches!(self, P2mType::RamRw | P2mType::RamLogdirty)
    }

    /// The rights of a leaf of this type under `access`: the single definition
    /// of leaf R/W/X. `access` only removes rights.
    pub fn rights(self, access: P2mAccess) -> Rights {
        let by_type = match self {
            P2mType::Invalid => Rights::empty(),
            P2mType::RamRw | P2mType::MmioDirect => Rights::all(),
            P2mType::RamRo | P2mType::RamLogdirty => Rights::R | Rights::X,
        };
        by_type & access.allowed()
    }

    /// The rights of a leaf of this type under `access` in a p2m whose
    /// log-dirty pages are noticed by `mode` (`superpage`: a 2M/1G leaf).
    /// Only a 4K `ram_logdirty` leaf under PML differs from
    /// [`P2mType::rights`]: it is writable like `ram_rw`.
    pub fn rights_in(self, access: P2mAccess, mode: LogMode, superpage: bool) -> Rights {
        if self == P2mType::RamLogdirty && mode == LogMode::Pml && !superpage {
            P2mType::RamRw.rights(access)
        } else {
            self.rights(access)
        }
    }

    /// EPT memory type and iPAT. WB for RAM, UC for direct MMIO; iPAT stays
    /// clear so the guest's PAT still refines the type (e.g. a WC framebuffer).
    pub const fn memory_type(self) -> (u8, bool) {
        match self {
            P2mType::MmioDirect => (EMT_UC, false),
            _ => (EMT_WB, false),
        }
    }
}

impl P2mAccess {
    pub(crate) fn from_bits(v: u8) -> P2mAccess {
        match v {
            1 => P2mAccess::R,
            2 => P2mAccess::W,
            3 => P2mAccess::X,
            4 => P2mAccess::Rx,
            5 => P2mAccess::Wx,
            6 => P2mAccess::Rw,
            7 => P2mAccess::Rwx,
            8 => P2mAccess::Rx2rw,
            9 => P2mAccess::N2rwx,
            _ => P2mAccess::N,
        }
    }

    pub const ALL: [P2mAccess; 10] = [
        P2mAccess::N,
        P2mAccess::R,
        P2mAccess::W,
        P2mAccess::X,
        P2mAccess::Rx,
        P2mAccess::Wx,
        P2mAccess::Rw,
        P2mAccess::Rwx,
        P2mAccess::Rx2rw,
        P2mAccess::N2rwx,
    ];

    /// The rights this access leaves.
    pub const fn allowed(self) -> Rights {
        match self {
            P2mAccess::N | P2mAccess::N2rwx => Rights::empty(),
            P2mAccess::R => Rights::R,
            P2mAccess::W => Rights::W,
            P2mAccess::X => Rights::X,
            P2mAccess::Rx | P2mAccess::Rx2rw => Rights::R.union(Rights::X),
            P2mAccess::Wx => Rights::W.union(Rights::X),
            P2mAccess::Rw => Rights::R.union(Rights::W),
            P2mAccess::Rwx => Rights::all(),
        }
    }

    /// Whether EPT can express this access on this CPU. Write without read is
    /// always an EPT misconfiguration (SDM "EPT Misconfigurations"), so `w` and
    /// `wx` are refused rather than degraded; execute-only needs bit 0 of
    /// IA32_VMX_EPT_VPID_CAP.
    pub const fn is_representable(self, caps: &EptCaps) -> bool {
        match self {
            P2mAccess::W | P2mAccess::Wx => false,
            P2mAccess::X => caps.exec_only,
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TYPES: [P2mType; 5] = [
        P2mType::Invalid,
        P2mType::RamRw,
        P2mType::RamRo,
        P2mType::RamLogdirty,
        P2mType::MmioDirect,
    ];

    #[test]
    fn representable_combinations_never_misconfigure() {
        let no_xo = EptCaps {
            exec_only: false,
            ..EptCaps::ALL
        };
        for caps in [EptCaps::ALL, no_xo] {
            for ty in TYPES {
                for a in P2mAccess::ALL
                    .into_iter()
                    .filter(|a| a.is_representable(&caps))
                {
                    let r = ty.rights(a);
                    assert!(
                        !r.contains(Rights::W) || r.contains(Rights::R),
                        "{ty:?} {a:?}"
                    );
                    assert!(caps.exec_only || r != Rights::X, "{ty:?} {a:?}");
                }
            }
        }
    }

    #[test]
    fn logdirty_and_ro_never_writable() {
        for a in P2mAccess::ALL {
            assert!(!P2mType::RamLogdirty.rights(a).contains(Rights::W));
            assert!(!P2mType::RamRo.rights(a).contains(Rights::W));
            assert!(P2mType::Invalid.rights(a).is_empty());
        }
        assert_eq!(P2mType::RamRw.rights(P2mAccess::Rwx), Rights::all());
        assert_eq!(
            P2mType::RamRw.rights(P2mAccess::Rx2rw),
            Rights::R | Rights::X
        );
        assert!(P2mType::RamRw.rights(P2mAccess::N2rwx).is_empty());
    }

    #[test]
    fn only_a_4k_logdirty_page_under_pml_is_writable_by_type() {
        for a in P2mAccess::ALL {
            for ty in TYPES {
                for superpage in [false, true] {
                    let got = ty.rights_in(a, LogMode::Pml, superpage);
                    let want = if ty == P2mType::RamLogdirty && !superpage {
                        P2mType::RamRw.rights(a)
                    } else {
                        ty.rights(a)
                    };
                    assert_eq!(got, want, "{ty:?} {a:?} superpage {superpage}");
                    assert_eq!(
                        ty.rights_in(a, LogMode::WriteProtect, superpage),
                        ty.rights(a)
                    );
                }
            }
        }
        assert!(
            P2mType::RamLogdirty
                .rights_in(P2mAccess::Rwx, LogMode::Pml, false)
                .contains(Rights::W)
        );
        assert!(
            !P2mType::RamLogdirty
                .rights_in(P2mAccess::Rx, LogMode::Pml, false)
                .contains(Rights::W),
            "access still takes rights away"
        );
    }

    #[test]
    fn encodings_round_trip() {
        for ty in TYPES {
            assert_eq!(P2mType::from_bits(ty as u8), ty);
        }
        for a in P2mAccess::ALL {
            assert_eq!(P2mAccess::from_bits(a as u8), a);
        }
    }
}
