//! A guest: its RAM (hypervisor frames mapped gfn -> mfn through the host
//! p2m, with the legacy PC layout), its image loaded per Multiboot, the
//! devices the hypervisor emulates for it (a console UART, the exit port, a
//! virtual APIC base), its exit counters, and access to its memory for the
//! hypervisor (hypercall buffers) that never strays outside its RAM.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use hv_abi::Altp2mMode;
use hv_altp2m::Altp2m;
use hv_ept::{DirtyBitmap, EptCaps, Gfn, Mfn, Order, P2m, P2mAccess, P2mType};

use crate::display::Display;

use crate::exit_reason::NUM_REASONS;
use crate::loader::{self, ImageError, MapEntry, Protocol};
use crate::platform::Platform;

pub const PAGE: u64 = 4096;
/// Guest RAM below the legacy hole (the EBDA page at 0x9F000 is left out).
pub const LOW_RAM_END: u64 = 0x9_f000;
/// The legacy hole (VGA, option ROMs, BIOS) ends at 1 MiB.
pub const HIGH_RAM_START: u64 = 0x10_0000;

#[derive(Clone, Debug)]
pub struct GuestConfig<'a> {
    /// RAM size in MiB (at least 2).
    pub memory_mib: u64,
    /// The Multiboot image.
    pub image: &'a [u8],
    /// The guest's own command line.
    pub cmdline: &'a str,
    /// Start an image that has both headers as Multiboot 1.
    pub force_multiboot1: bool,
    /// What the guest may call of the altp2m interface.
    pub altp2m_mode: Altp2mMode,
}

/// What the CPU lets the hypervisor offer this guest beyond the base set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Features {
    /// VMFUNC EPTP switching. Only with `ve` too: the view a vCPU switched
    /// to is read back from the EPTP-index field, which comes with #VE.
    pub vmfunc: bool,
    /// EPT-violation #VE.
    pub ve: bool,
    /// The VMX-preemption timer (the display refresh tick).
    pub tick: bool,
    /// The monitor trap flag: single steps without touching RFLAGS.TF.
    pub mtf: bool,
    /// Guest translations are tagged with `vcpu::GUEST_VPID`.
    pub vpid: bool,
    /// The wait-for-SIPI activity state (IA32_VMX_MISC bit 8), for INIT.
    pub wait_for_sipi: bool,
}

/// A single step in view 0 the hypervisor takes for the guest: an access a
/// view denied (or a hidden breakpoint) runs once in the host p2m, then the
/// vCPU returns to `view`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    pub view: u16,
    /// Stepped with the monitor trap flag; otherwise with RFLAGS.TF, and
    /// `trap_flag` is the guest's own TF, restored after the step.
    pub mtf: bool,
    pub trap_flag: bool,
}

/// Drop-log entries kept between two drains.
const DROP_LOG: usize = 256;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestError {
    Image(ImageError),
    /// Not enough free frames for the guest's RAM or tables.
    NoMemory,
    BadConfig(&'static str),
    Ept(hv_ept::Error),
}

impl fmt::Display for GuestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Image(e) => write!(f, "bad guest image: {e}"),
            Self::NoMemory => f.write_str("not enough free memory for the guest"),
            Self::BadConfig(why) => write!(f, "bad guest configuration: {why}"),
            Self::Ept(e) => write!(f, "EPT error: {e:?}"),
        }
    }
}

impl From<hv_ept::Error> for GuestError {
    fn from(e: hv_ept::Error) -> Self {
        match e {
            hv_ept::Error::NoMemory => Self::NoMemory,
            other => Self::Ept(other),
        }
    }
}

/// Why a guest access to its memory through the hypervisor was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotGuestRam(pub u64);

/// A run of guest RAM frames: `frames` frames from `mfn`.
#[derive(Clone, Copy, Debug)]
struct RamChunk {
    mfn: Mfn,
    frames: u64,
}

/// The guest's serial console: bytes become lines for the run's log.
#[derive(Default)]
pub struct Console {
    line: String,
}

/// Longest console line kept; longer ones are cut in pieces.
const CONSOLE_LINE_MAX: usize = 200;

impl Console {
    pub fn put(&mut self, byte: u8, platform: &mut impl Platform) {
        match byte {
            b'\n' => self.flush(platform),
            b'\r' => {}
            _ => {
                let c = if byte.is_ascii_graphic() || byte == b' ' {
                    byte as char
                } else {
                    '.'
                };
                self.line.push(c);
                if self.line.len() >= CONSOLE_LINE_MAX {
                    self.flush(platform);
                }
            }
        }
    }

    pub fn flush(&mut self, platform: &mut impl Platform) {
        if !self.line.is_empty() {
            platform.guest_console_line(&self.line);
            self.line.clear();
        }
    }
}

/// The guest's emulated 16550 at COM1: enough for a polling driver.
#[derive(Default)]
pub struct Uart {
    /// Line control register (bit 7: divisor latch access).
    pub lcr: u8,
    pub ier: u8,
    pub mcr: u8,
    pub scratch: u8,
}

pub struct Guest {
    pub p2m: P2m,
    ram: Vec<RamChunk>,
    /// The guest-physical memory map the guest is told about.
    pub memory_map: Vec<MapEntry>,
    pub console: Console,
    pub uart: Uart,
    /// VM exits by basic reason.
    pub counters: [u64; NUM_REASONS],
    /// The guest's view of IA32_APIC_BASE (the physical one is never touched).
    pub apic_base: u64,
    /// EPT violations outside the guest's memory so far.
    pub stray_accesses: u64,
    pub dirty: DirtyBitmap,
    /// The CPU's VMX fixed bits for CR0/CR4, which guest CR writes must keep.
    pub cr_fixed: crate::cr::Fixed,
    /// Period of the hypervisor's tick (VMX-preemption timer units), if any.
    pub tick_period: Option<u32>,
    pub protocol: Protocol,
    /// Guest-physical address of the Multiboot information.
    pub boot_info: u64,
    pub entry: u32,
    /// The guest's views. Every host p2m change goes through it.
    pub altp2m: Altp2m,
    pub altp2m_mode: Altp2mMode,
    pub features: Features,
    /// The #VE information page of the (one) vCPU and its frame, when
    /// notification is on.
    pub ve_page: Option<(Gfn, Mfn)>,
    pub step: Option<Step>,
    pub display: Option<Display>,
    /// Frames the guest gave back (balloon), sorted: not freed again at teardown.
    released: Vec<u64>,
    /// Hypercalls refused by the altp2m mode that were already logged.
    pub refusals_logged: u128,
    /// The guest's task-priority register as MOV CR8 sees it (the physical
    /// APIC's TPR is never touched).
    pub tpr: u8,
}

/// IA32_APIC_BASE at reset: the xAPIC at 0xFEE00000, enabled, boot processor.
pub const APIC_BASE_RESET: u64 = 0xfee0_0000 | 1 << 11 | 1 << 8;

impl Guest {
    /// Builds the guest: RAM, p2m, image and boot information. On failure
    /// every frame taken so far is given back.
    pub fn create(
        config: &GuestConfig<'_>,
        caps: EptCaps,
        cr_fixed: crate::cr::Fixed,
        features: Features,
        platform: &mut impl Platform,
    ) -> Result<Self, GuestError> {
        if config.memory_mib < 2 || config.memory_mib > 1 << 20 {
            return Err(GuestError::BadConfig(
                "guest memory must be between 2 MiB and 1 TiB",
            ));
        }
        let ram_end = config.memory_mib << 20;
        let ram_ranges = [(0, LOW_RAM_END), (HIGH_RAM_START, ram_end)];
        // Check the image before taking any memory.
        let plan = loader::plan(config.image, &ram_ranges, config.force_multiboot1)
            .map_err(GuestError::Image)?;
        let p2m = P2m::new(platform, caps)?;
        let altp2m = match Altp2m::new(platform, 1, DROP_LOG) {
            Ok(altp2m) => altp2m,
            Err(_) => {
                p2m.destroy(platform);
                return Err(GuestError::NoMemory);
            }
        };
        let mut guest = Guest {
            p2m,
            ram: Vec::new(),
            memory_map: alloc::vec![
                MapEntry {
                    start: 0,
                    end: LOW_RAM_END,
                    available: true
                },
                MapEntry {
                    start: LOW_RAM_END,
                    end: HIGH_RAM_START,
                    available: false
                },
                MapEntry {
                    start: HIGH_RAM_START,
                    end: ram_end,
                    available: true
                },
            ],
            console: Console::default(),
            uart: Uart::default(),
            counters: [0; NUM_REASONS],
            apic_base: APIC_BASE_RESET,
            stray_accesses: 0,
            dirty: DirtyBitmap::new(),
            cr_fixed,
            tick_period: None,
            protocol: plan.protocol,
            boot_info: 0,
            entry: plan.entry,
            altp2m,
            altp2m_mode: config.altp2m_mode,
            features,
            ve_page: None,
            step: None,
            display: None,
            released: Vec::new(),
            refusals_logged: 0,
            tpr: 0,
        };
        let built = guest
            .populate(&ram_ranges, platform)
            .and_then(|()| guest.load(config, &plan, platform));
        match built {
            Ok(()) => Ok(guest),
            Err(e) => {
                guest.destroy(platform);
                Err(e)
            }
        }
    }

    /// Backs the RAM ranges with zeroed frames: 2 MiB pages where a 2 MiB
    /// block of guest RAM and an aligned run of frames allow, 4 KiB otherwise.
    fn populate(
        &mut self,
        ranges: &[(u64, u64)],
        platform: &mut impl Platform,
    ) -> Result<(), GuestError> {
        const BIG: u64 = 512;
        for &(start, end) in ranges {
            let (mut gfn, end) = (start / PAGE, end / PAGE);
            while gfn < end {
                // Room to record the chunk first: a frame is never held unrecorded.
                self.ram.try_reserve(1).map_err(|_| GuestError::NoMemory)?;
                let big = gfn % BIG == 0 && gfn + BIG <= end && self.p2m.caps().pages_2m;
                let chunk = if big {
                    platform.alloc_frames(BIG, BIG).map(|mfn| (mfn, BIG))
                } else {
                    None
                };
                let (mfn, frames) = match chunk {
                    Some(chunk) => chunk,
                    None => (platform.alloc_frames(1, 1).ok_or(GuestError::NoMemory)?, 1),
                };
                self.ram.push(RamChunk { mfn, frames });
                for i in 0..frames {
                    platform.zero_frame(Mfn(mfn.0 + i));
                }
                let order = if frames == BIG {
                    Order::PAGE_2M
                } else {
                    Order::PAGE_4K
                };
                self.p2m.set_entry(
                    platform,
                    Gfn(gfn),
                    mfn,
                    order,
                    P2mType::RamRw,
                    P2mAccess::Rwx,
                )?;
                gfn += frames;
            }
        }
        Ok(())
    }

    /// Copies the image's pieces and writes the boot information after them.
    fn load(
        &mut self,
        config: &GuestConfig<'_>,
        plan: &loader::LoadPlan,
        platform: &mut impl Platform,
    ) -> Result<(), GuestError> {
        for piece in &plan.pieces {
            let bytes = &config.image[piece.file.clone()];
            self.write(platform, piece.gpa, bytes)
                .map_err(|_| GuestError::BadConfig("image outside RAM"))?;
            // RAM starts zeroed, so the rest of the piece (bss) already is.
        }
        let info_at = plan.end().next_multiple_of(PAGE);
        // EBX holds the address, and Multiboot 1 pointers are 32-bit: the
        // whole structure must lie below 4 GiB.
        let too_high = GuestError::BadConfig("the boot information would lie above 4 GiB");
        let limit = |len: usize| {
            info_at
                .checked_add(len as u64)
                .filter(|&end| end <= 1 << 32)
        };
        let info = match plan.protocol {
            Protocol::Multiboot2 => loader::multiboot2_info(config.cmdline, &self.memory_map),
            Protocol::Multiboot1 => {
                let len = loader::multiboot1_info_len(config.cmdline, &self.memory_map);
                limit(len).ok_or(too_high.clone())?;
                loader::multiboot1_info(info_at as u32, config.cmdline, &self.memory_map)
            }
        };
        limit(info.len()).ok_or(too_high)?;
        self.write(platform, info_at, &info).map_err(|_| {
            GuestError::BadConfig("no room for the boot information after the image")
        })?;
        self.boot_info = info_at;
        Ok(())
    }

    /// Gives every frame back: the display copy, the views, RAM and EPT tables.
    pub fn destroy(self, platform: &mut impl Platform) {
        if let Some(display) = self.display {
            display.destroy(platform);
        }
        self.altp2m.destroy(platform);
        for chunk in &self.ram {
            for mfn in chunk.mfn.0..chunk.mfn.0 + chunk.frames {
                if self.released.binary_search(&mfn).is_err() {
                    platform.free_frames(Mfn(mfn), 1);
                }
            }
        }
        self.p2m.destroy(platform);
    }

    /// The frame behind `gfn` if it is writable guest RAM, for structures the
    /// hypervisor keeps pointing at (the #VE page) or gives away (balloon).
    pub fn ram_page(&self, platform: &impl Platform, gfn: Gfn) -> Option<Mfn> {
        self.ram_frame(platform, gfn.0.checked_mul(PAGE)?, true)
            .ok()
            .map(|(mfn, _)| mfn)
    }

    /// Takes a page from the guest (balloon): it leaves the host p2m and every
    /// view, cached translations are flushed, and its frame goes back to the
    /// hypervisor.
    pub fn release_page(
        &mut self,
        platform: &mut impl Platform,
        gfn: Gfn,
    ) -> Result<(), hv_altp2m::Error> {
        gfn.check().map_err(|_| hv_altp2m::Error::GfnOutOfRange)?;
        let mfn = self
            .ram_page(platform, gfn)
            .ok_or(hv_altp2m::Error::NotMapped)?;
        if !self
            .ram
            .iter()
            .any(|c| (c.mfn.0..c.mfn.0 + c.frames).contains(&mfn.0))
        {
            return Err(hv_altp2m::Error::NotMapped);
        }
        self.released
            .try_reserve(1)
            .map_err(|_| hv_altp2m::Error::NoMemory)?;
        self.altp2m
            .host_remove(platform, &mut self.p2m, gfn, Order::PAGE_4K)?;
        crate::views::flush(self, platform);
        platform.free_frames(mfn, 1);
        let at = self.released.binary_search(&mfn.0).unwrap_or_else(|at| at);
        self.released.insert(at, mfn.0);
        Ok(())
    }

    /// Frames of guest RAM.
    pub fn ram_frames(&self) -> u64 {
        self.ram.iter().map(|c| c.frames).sum()
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
