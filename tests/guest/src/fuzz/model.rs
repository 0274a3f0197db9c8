//! What the fuzzer knows of the hypervisor's state for this guest: its
//! arena of scratch pages (tagged, so a foreign frame shows), the pages
//! it gave back, the views with their visibility and whether the guest can
//! run on them, the remaps, #VE notification and the display. The model
//! predicts exact results where the interface defines them.

use hv_abi::access;
use hv_boot::bootinfo::{BootInfo, RegionKind};

/// The arena: the last 8 MiB of RAM below 4 GiB, four 2 MiB superpages.
pub const ARENA_PAGES: u64 = 2048;
/// The arena's last pages take the hypervisor's writes (hypercall buffers)
/// and carry no tag; the last of them is the last page of RAM.
pub const BUFFER_PAGES: u64 = 16;
/// Where in a page its tag (or a released page's marker) is read.
pub const TAG_OFFSET: u64 = 0x800;
/// Where in a tagged page its code is: `mov eax, gfn; ret`, so a call
/// there returns the gfn of the frame the view shows. One page in sixteen
/// starts it with INT3 instead: a breakpoint page, a shadow for hidden
/// breakpoints.
pub const CODE_OFFSET: u64 = 0x100;
/// The bytes from CODE_OFFSET on that nothing but the stamp writes.
pub const CODE_BYTES: u64 = 8;
/// The largest gfn the interface takes (48-bit guest-physical addresses).
pub const GFN_MAX: u64 = (1 << 36) - 1;
pub const PAGE: u64 = 4096;
/// Views the fuzzer keeps at once (bulk creation goes beyond, briefly).
pub const MAX_LIVE_VIEWS: usize = 12;

const TAG: u64 = 0x5441_4721 << 32;
const MARK: u64 = 0x4d41_524b << 32;
const HIGH: u64 = 0xffff_ffff << 32;

/// A tagged page's word at [`TAG_OFFSET`]: its own gfn.
pub fn tag(gfn: u64) -> u64 {
    TAG | gfn
}

/// What a released page was filled with before it went.
pub fn marker(gfn: u64) -> u64 {
    MARK | gfn
}

/// A tagged page's code, as a little-endian word: `mov eax, gfn; ret;
/// nop; nop`, or with INT3 in place of the `mov` opcode.
pub fn code(gfn: u64, breakpoint: bool) -> u64 {
    let opcode = if breakpoint { 0xcc } else { 0xb8 };
    opcode | (gfn & 0xffff_ffff) << 8 | 0x0090_90c3 << 40
}

pub fn tag_of(word: u64) -> Option<u64> {
    (word & HIGH == TAG).then_some(word & !HIGH)
}

pub fn marker_of(word: u64) -> Option<u64> {
    (word & HIGH == MARK).then_some(word & !HIGH)
}

/// The altp2m mode the hypervisor runs the guest in, as the guest finds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Mixed,
    Limited,
    External,
}

/// What a gfn is, for the hypervisor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// An arena page the guest still has.
    Live,
    /// An arena page the guest gave back.
    Released,
    /// Guest RAM outside the arena: the guest's own code and data, or
    /// unused; the fuzzer only reads it or names it where nothing changes.
    Spare,
    /// A device page the hypervisor maps (I/O APIC, local APIC).
    Mmio,
    /// Nothing: a hole, or beyond RAM.
    Hole,
    /// Beyond 48-bit guest-physical addresses.
    OutOfRange,
}

impl Kind {
    /// Mapped by the host p2m (so a view can show it).
    pub fn mapped(self) -> Option<bool> {
        match self {
            Self::Live | Self::Spare | Self::Mmio => Some(true),
            Self::Released | Self::Hole => Some(false),
            Self::OutOfRange => None,
        }
    }
}

/// The guest-physical layout the fuzzer works in.
pub struct Layout {
    /// First arena gfn.
    pub first: u64,
    /// Guest-physical ranges backed by guest pages (RAM and the legacy area).
    pub backed: heapless::Vec<(u64, u64), 16>,
    /// Device pages in the MMIO hole (reserved 4 KiB regions).
    pub mmio: heapless::Vec<u64, 8>,
    /// The CPU's physical-address width.
    pub maxphy: u32,
    /// The guest image's gfns, `[start, end)`.
    pub image: (u64, u64),
}

unsafe extern "C" {
    static __image_start: u8;
    static __image_end: u8;
}

impl Layout {
    pub fn new(boot: &BootInfo) -> Result<Self, &'static str> {
        let mut backed = heapless::Vec::new();
        let mut mmio = heapless::Vec::new();
        let mut top = 0;
        for r in &boot.regions {
            match r.kind {
                RegionKind::Available => {
                    let _ = backed.push((r.start, r.end));
                    if r.start <= 0x10_0000 && r.end > 0x10_0000 {
                        top = r.end;
                    }
                }
                _ if r.end - r.start == PAGE && r.start >= 0xc000_0000 && r.end <= 1 << 32 => {
                    let _ = mmio.push(r.start / PAGE);
                }
                _ => {}
            }
        }
        // The legacy area is backed by guest pages, reserved in the map.
        let _ = backed.push((0x9_f000, 0x10_0000));
        if top < 0x40_0000 + ARENA_PAGES * PAGE {
            return Err("too little RAM for the fuzzer's arena (needs 12 MiB)");
        }
        let maxphy = core::arch::x86_64::__cpuid(0x8000_0008).eax & 0xff;
        // Linker symbols: only their addresses are used.
        let image = (
            &raw const __image_start as u64 / PAGE,
            (&raw const __image_end as u64).div_ceil(PAGE),
        );
        Ok(Self {
            first: top / PAGE - ARENA_PAGES,
            backed,
            mmio,
            maxphy,
            image,
        })
    }

    pub fn end(&self) -> u64 {
        self.first + ARENA_PAGES
    }

    pub fn in_arena(&self, gfn: u64) -> bool {
        (self.first..self.end()).contains(&gfn)
    }

    /// Arena pages that take the hypervisor's writes; untagged.
    pub fn is_buffer(&self, gfn: u64) -> bool {
        (self.end() - BUFFER_PAGES..self.end()).contains(&gfn)
    }

    pub fn is_backed(&self, gpa: u64) -> bool {
        self.backed.iter().any(|&(s, e)| (s..e).contains(&gpa))
    }

    /// One tagged page in sixteen has INT3 for its first code byte.
    pub fn is_breakpoint(&self, gfn: u64) -> bool {
        self.in_arena(gfn) && !self.is_buffer(gfn) && (gfn - self.first) % 16 == 5
    }

    /// The gpa just past the arena: the end of RAM below 4 GiB.
    pub fn ram_top(&self) -> u64 {
        self.end() * PAGE
    }
}

#[derive(Clone, Copy, Debug)]
pub struct ViewInfo {
    pub visible: bool,
    /// The guest can run on it: default access rwx, or its own pages
    /// opened rwx. A view the guest cannot run on is always hidden.
    pub runnable: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Remap {
    pub view: u16,
    pub old: u64,
    pub new: u64,
}

pub struct Model {
    pub mode: Mode,
    pub enabled: bool,
    pub view0_visible: bool,
    pub views: [Option<ViewInfo>; 512],
    /// The view the vCPU runs on.
    pub current: u16,
    /// The #VE information page the hypervisor holds (gfn).
    pub notify: Option<u64>,
    pub display: Option<(u64, u64)>,
    /// Arena pages given back, one bit each.
    released: [u64; (ARENA_PAGES / 64) as usize],
    pub remaps: heapless::Vec<Remap, 256>,
    /// Log-dirty tracking switched on (true) or off over gfn ranges, in
    /// order; `None` once there were too many to keep.
    logdirty: Option<heapless::Vec<(u64, u64, bool), 128>>,
}

impl Model {
    pub fn new(mode: Mode) -> Self {
        Self {
            mode,
            enabled: false,
            view0_visible: true,
            views: [None; 512],
            current: 0,
            notify: None,
            display: None,
            released: [0; (ARENA_PAGES / 64) as usize],
            remaps: heapless::Vec::new(),
            logdirty: Some(heapless::Vec::new()),
        }
    }

    /// A new seed: altp2m off, nothing tracked; the arena pages given back
    /// stay given back.
    pub fn reset(&mut self) {
        self.altp2m_off();
        self.display = None;
    }

    /// altp2m off: every view and remap gone, notification off.
    pub fn altp2m_off(&mut self) {
        self.enabled = false;
        self.view0_visible = true;
        self.views = [None; 512];
        self.current = 0;
        self.notify = None;
        self.remaps.clear();
    }

    pub fn altp2m_on(&mut self) {
        self.enabled = true;
        self.view0_visible = true;
        self.current = 0;
    }

    pub fn is_released(&self, layout: &Layout, gfn: u64) -> bool {
        layout.in_arena(gfn) && {
            let i = gfn - layout.first;
            self.released[(i / 64) as usize] & (1 << (i % 64)) != 0
        }
    }

    pub fn release(&mut self, layout: &Layout, gfn: u64) {
        let i = gfn - layout.first;
        self.released[(i / 64) as usize] |= 1 << (i % 64);
        // Aliases of the page are dropped; remaps at it stay.
        self.remaps.retain(|r| r.new != gfn);
        if self.notify == Some(gfn) {
            self.notify = None;
        }
    }

    pub fn released_count(&self) -> u64 {
        self.released
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    pub fn kind(&self, layout: &Layout, gfn: u64) -> Kind {
        if gfn > GFN_MAX {
            Kind::OutOfRange
        } else if layout.in_arena(gfn) {
            if self.is_released(layout, gfn) {
                Kind::Released
            } else {
                Kind::Live
            }
        } else if layout.mmio.contains(&gfn) {
            Kind::Mmio
        } else if layout.is_backed(gfn * PAGE) {
            Kind::Spare
        } else {
            Kind::Hole
        }
    }

    /// Whether every byte of `[gpa, gpa + len)` is RAM the hypervisor may
    /// write (its checked guest-memory access).
    pub fn writable(&self, layout: &Layout, gpa: u64, len: u64) -> bool {
        if len == 0 {
            return true;
        }
        let Some(end) = gpa.checked_add(len) else {
            return false;
        };
        (gpa / PAGE..=(end - 1) / PAGE).all(|g| {
            matches!(self.kind(layout, g), Kind::Live | Kind::Spare) && layout.is_backed(g * PAGE)
        })
    }

    /// A view index the hypervisor takes for view-0-or-altp2m calls.
    pub fn active(&self, view: u64) -> bool {
        view == 0 || self.altp2m_view(view)
    }

    /// An existing view other than 0.
    pub fn altp2m_view(&self, view: u64) -> bool {
        self.enabled && (1..512).contains(&view) && self.views[view as usize].is_some()
    }

    pub fn visible(&self, view: u64) -> bool {
        match view {
            0 => self.view0_visible,
            v if self.altp2m_view(v) => self.views[v as usize].is_some_and(|i| i.visible),
            _ => false,
        }
    }

    /// A switch (hypercall or VMFUNC) to `view` succeeds.
    pub fn switchable(&self, view: u64) -> bool {
        self.enabled && self.active(view) && self.visible(view)
    }

    /// The guest can run on `view`.
    pub fn runnable(&self, view: u64) -> bool {
        view == 0
            || (self.altp2m_view(view) && self.views[view as usize].is_some_and(|i| i.runnable))
    }

    pub fn live_views(&self) -> heapless::Vec<u16, 512> {
        (1..512u16)
            .filter(|&v| self.altp2m_view(u64::from(v)))
            .collect()
    }

    pub fn remap_of(&self, view: u16, old: u64) -> Option<u64> {
        self.remaps
            .iter()
            .find(|r| r.view == view && r.old == old)
            .map(|r| r.new)
    }

    /// Records a remap; false if the model has no room (the caller then
    /// makes none).
    pub fn set_remap(&mut self, view: u16, old: u64, new: u64) {
        match self
            .remaps
            .iter_mut()
            .find(|r| r.view == view && r.old == old)
        {
            Some(r) => r.new = new,
            None => {
                let _ = self.remaps.push(Remap { view, old, new });
            }
        }
    }

    pub fn drop_remap(&mut self, view: u16, old: u64) {
        self.remaps.retain(|r| !(r.view == view && r.old == old));
    }

    pub fn destroy_view(&mut self, view: u16) {
        self.views[view as usize] = None;
        self.remaps.retain(|r| r.view != view);
    }

    /// The host's mapping at `gfn` changed frame (the APIC moved there):
    /// aliases of it are dropped.
    pub fn host_frame_changed(&mut self, gfn: u64) {
        self.remaps.retain(|r| r.new != gfn);
    }

    /// Log-dirty tracking of `[first, last]` went on or off.
    pub fn logdirty(&mut self, first: u64, last: u64, on: bool) {
        if let Some(events) = self.logdirty.as_mut()
            && events.push((first, last, on)).is_err()
        {
            self.logdirty = None;
        }
    }

    /// Whether `gfn` may be tracked log-dirty (true when the model lost count).
    pub fn tracked(&self, gfn: u64) -> bool {
        match &self.logdirty {
            None => true,
            Some(events) => events
                .iter()
                .rev()
                .find(|&&(first, last, _)| (first..=last).contains(&gfn))
                .is_some_and(|&(_, _, on)| on),
        }
    }

    /// Whether the notification page is in force.
    pub fn ve_active(&self) -> bool {
        self.enabled && self.notify.is_some()
    }
}

/// Accesses the hypervisor takes (0..=9), and whether EPT can express them.
pub fn access_valid(value: u64) -> bool {
    value <= access::N2RWX && value != access::W && value != access::WX
}
