//! A virtual machine: what its vCPUs share. Its RAM (hypervisor frames
//! mapped gfn -> mfn through the host p2m, with the legacy PC layout) and the
//! checked access to it (`memory`), its views (altp2m), its image loaded per
//! Multiboot, the devices the hypervisor emulates for it, its display model,
//! its exit counters, and the VMX controls and bitmaps every vCPU runs with.

pub mod apic;
pub mod display;
pub mod layout;
pub mod memory;

use alloc::vec::Vec;
use core::fmt;

use hv_abi::Altp2mMode;
pub use hv_abi::BootViews;
use hv_altp2m::Altp2m;
use hv_ept::{DirtyBitmap, EptCaps, Gfn, LogMode, Mfn, Order, P2m, P2mAccess, P2mType};

use x86::vmx::vmcs::control::PrimaryControls;

use crate::control::Control;
use crate::devices::acpi::{self, HostPlatform};
use crate::devices::ports::{self, Devices};
use crate::exits::GuestEnd;
use crate::exits::{PASS_READ_ONLY, PASS_WRITE};
use crate::loader::{self, BootOptions, BootPlan, EntryState, ImageError, MemoryRegion, Module};
use crate::platform::Platform;
use crate::smp::Coherence;
use crate::vcpu::cr::Fixed;
use crate::vmx::caps::{EptVpidCap, VmxCaps};
use crate::vmx::exit::NUM_REASONS;
use crate::vmx::vmcs::{self, Controls, MissingFeature, Wants};
use crate::vmx::{Cpu, VmxError};
use display::Display;
use layout::{HOLE_START, Layout};

pub use memory::NotGuestRam;

pub const PAGE: u64 = 4096;
pub use layout::{HIGH_RAM_START, LOW_RAM_END};

#[derive(Clone, Debug)]
pub struct GuestConfig<'a> {
    /// RAM size in MiB (at least 2).
    pub memory_mib: u64,
    /// The guest image: a Multiboot 1/2 kernel or a Linux bzImage.
    pub image: &'a [u8],
    /// The guest's own command line.
    pub cmdline: &'a str,
    /// Boot modules after the image: Multiboot modules, or the initrd.
    pub modules: &'a [Module<'a>],
    /// Which Multiboot protocol or Linux entry point to prefer.
    pub boot: BootOptions,
    /// What the guest may call of the altp2m interface.
    pub altp2m_mode: Altp2mMode,
    /// The views the guest boots on.
    pub boot_views: BootViews,
    /// Track all guest RAM log-dirty from the start, fetched on every tick.
    pub logdirty_all: bool,
    /// The machine's interrupt hardware, which the guest gets.
    pub host: &'a HostPlatform,
    /// The APIC ids of the physical CPUs the vCPUs run on, BSP first: one
    /// vCPU each.
    pub apic_ids: &'a [u32],
    /// The cross-CPU invalidation state the vCPUs share (`smp`), for as
    /// many vCPUs.
    pub coherence: &'static Coherence,
}

/// What `guest.logdirty=all` found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogdirtyTotals {
    pub fetches: u64,
    /// Dirty pages over all fetches.
    pub pages: u64,
}

/// What the CPU lets the hypervisor offer this guest beyond the base set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Features {
    /// VMFUNC EPTP switching. The view a vCPU switched to is read back from
    /// the EPTP-index field where the CPU has #VE (the field comes with
    /// it), else from the EPTP field (`views::where_hardware_is`).
    pub vmfunc: bool,
    /// EPT-violation #VE.
    pub ve: bool,
    /// The monitor trap flag: single steps without touching RFLAGS.TF.
    pub mtf: bool,
    /// Guest translations are tagged with `vcpu::GUEST_VPID`.
    pub vpid: bool,
    /// The wait-for-SIPI activity state (IA32_VMX_MISC bit 8), for INIT.
    pub wait_for_sipi: bool,
    /// Page-modification logging with EPT A/D flags: writes to log-dirty
    /// pages are logged by the CPU, without a write fault (`vcpu::pml`).
    /// Without it (or with `vmx.mask=pml`), write protection.
    pub pml: bool,
}

impl Features {
    /// These features as the guest learns them (CPUID leaf 0x40000001 EBX).
    pub fn abi_bits(&self) -> u32 {
        use hv_abi::feature;
        [
            (self.vmfunc, feature::VMFUNC),
            (self.ve, feature::VE),
            (self.mtf, feature::MTF),
            (self.pml, feature::PML),
        ]
        .into_iter()
        .filter(|(on, _)| *on)
        .fold(0, |bits, (_, bit)| bits | bit)
    }
}

/// The pages of the machine's interrupt hardware a guest gets: its I/O
/// APICs and the local APIC. Only pages in the MMIO hole below 4 GiB: the
/// firmware's tables are trusted for where the hardware is, never to hand a
/// guest RAM or anything above the hole.
fn mmio_pages(host: &HostPlatform) -> Vec<u64> {
    let mut pages: Vec<u64> = host
        .io_apics
        .iter()
        .map(|io| u64::from(io.address))
        .chain([host.local_apic])
        .map(|address| address & !(PAGE - 1))
        .filter(|page| (HOLE_START..layout::FOUR_GIB).contains(page))
        .collect();
    pages.sort_unstable();
    pages.dedup();
    pages
}

/// The watchdog tick, in TSC cycles: about a second of Bochs's emulated
/// time (it counts instructions at ~200 M/s), a tenth on a 3 GHz CPU.
pub const WATCHDOG_TICK_TSC: u64 = 1 << 28;
/// The display refresh tick, in TSC cycles: a few per second in Bochs.
pub const DISPLAY_TICK_TSC: u64 = 20_000_000;

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

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmError {
    Missing(MissingFeature),
    Guest(GuestError),
    Vmx(VmxError),
}

impl fmt::Display for VmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing(m) => write!(f, "{m}"),
            Self::Guest(e) => write!(f, "{e}"),
            Self::Vmx(e) => write!(f, "{e}"),
        }
    }
}

impl From<GuestError> for VmError {
    fn from(e: GuestError) -> Self {
        Self::Guest(e)
    }
}

impl GuestError {
    fn from_altp2m(e: hv_altp2m::Error) -> Self {
        match e {
            hv_altp2m::Error::NoMemory => Self::NoMemory,
            _ => Self::BadConfig("the boot views could not be made"),
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

/// A run of guest RAM frames: `frames` frames from `mfn`.
#[derive(Clone, Copy, Debug)]
struct RamChunk {
    mfn: Mfn,
    frames: u64,
}

pub struct Vm {
    pub p2m: P2m,
    ram: Vec<RamChunk>,
    /// The guest-physical memory map the guest is told about.
    pub memory_map: Vec<MemoryRegion>,
    /// What the hypervisor emulates or filters for the guest.
    pub devices: Devices,
    /// VM exits by basic reason, all vCPUs together.
    pub counters: [u64; NUM_REASONS],
    /// EPT violations outside the guest's memory so far.
    pub stray_accesses: u64,
    pub dirty: DirtyBitmap,
    /// The CPU's VMX fixed bits for CR0/CR4, which guest CR writes must keep.
    pub cr_fixed: Fixed,
    /// The VMX-preemption timer counts TSC cycles >> this (IA32_VMX_MISC[4:0]).
    pub timer_shift: u8,
    /// How the boot vCPU starts (the boot protocol's entry state).
    pub entry: EntryState,
    /// The guest's views. Every host p2m change goes through it.
    pub altp2m: Altp2m,
    pub altp2m_mode: Altp2mMode,
    pub features: Features,
    pub display: Option<Display>,
    /// Frames the guest gave back (balloon), sorted: not freed again at teardown.
    released: Vec<u64>,
    /// Hypercalls refused by the altp2m mode that were already logged.
    pub refusals_logged: u128,
    /// The views the guest booted on.
    pub boot_views: BootViews,
    /// Log-dirty tracking of all guest RAM, fetched on every tick
    /// (`guest.logdirty=all`): pages found dirty so far, and fetches.
    pub logdirty_all: Option<LogdirtyTotals>,
    /// Cross-CPU invalidations: shared with the vCPUs without the VM lock.
    pub coherence: &'static Coherence,
    /// How the guest ended, once one vCPU saw it end: the others stop at
    /// their next exit.
    pub end: Option<GuestEnd>,
    /// vCPUs the watchdog found halted for good (interrupts off, nothing
    /// owed), one bit each: the guest is stopped when all are.
    pub halted: u32,
    /// The VM-execution, exit and entry controls every vCPU's VMCS gets.
    pub controls: Controls,
    /// The VMCS revision identifier (IA32_VMX_BASIC).
    pub vmcs_revision: u32,
    /// The MSR bitmap and I/O bitmaps A and B, shared by the vCPUs.
    msr_bitmap: Mfn,
    io_bitmaps: Mfn,
    /// The physical local APIC's frame, and the guest pages that map it.
    lapic: Mfn,
    apic_pages: Vec<apic::ApicPage>,
    /// The frame a disabled APIC's page reads from, once needed.
    all_ones: Option<Mfn>,
    /// The control channel: a tool's session, held and paused vCPUs,
    /// shadow pages.
    pub control: Control,
}

impl Vm {
    /// Builds the VM from what the CPU offers: the controls and features its
    /// vCPUs run with, RAM, p2m, image and boot information, the bitmaps.
    /// Nothing here touches the hardware. On failure every frame taken so
    /// far is given back.
    pub fn create(
        caps: &VmxCaps,
        config: &GuestConfig<'_>,
        platform: &mut impl Platform,
    ) -> Result<Self, VmError> {
        let features = Features {
            vmfunc: caps.eptp_switching(),
            ve: caps.ept_violation_ve(),
            mtf: caps
                .procbased()
                .allows(PrimaryControls::MONITOR_TRAP_FLAG.bits()),
            vpid: false,
            wait_for_sipi: caps.msrs.misc & 1 << 8 != 0,
            pml: caps.pml() && caps.ept_cap(EptVpidCap::ACCESSED_DIRTY),
        };
        let wants = Wants {
            vm_functions: features.vmfunc,
            virtualization_exceptions: features.ve,
            pml: features.pml,
        };
        let controls = Controls::compute(caps, wants).map_err(VmError::Missing)?;
        let features = Features {
            vpid: controls.vpid,
            ..features
        };
        let m = &caps.msrs;
        let cr_fixed = Fixed {
            cr0_fixed0: m.cr0_fixed0,
            cr0_fixed1: m.cr0_fixed1,
            cr4_fixed0: m.cr4_fixed0,
            cr4_fixed1: m.cr4_fixed1,
        };
        let ept_caps = EptCaps::from_msr(caps.msrs.ept_vpid_cap, caps.paddr_bits);
        if config.memory_mib < 2 || config.memory_mib > 1 << 20 {
            return Err(
                GuestError::BadConfig("guest memory must be between 2 MiB and 1 TiB").into(),
            );
        }
        let mmio = mmio_pages(config.host);
        let layout = Layout::new(config.memory_mib, &mmio);
        // Check the image before taking any memory.
        let options = BootOptions {
            acpi_rsdp: Some(acpi::TABLES_AT),
            ..config.boot
        };
        let plan = loader::plan_guest(
            config.image,
            config.modules,
            &layout.map,
            config.cmdline,
            &options,
        )
        .map_err(GuestError::Image)?;
        let vcpus = config.apic_ids.len();
        if vcpus == 0 || vcpus > config.coherence.vcpus() {
            return Err(GuestError::BadConfig("the number of vCPUs").into());
        }
        let ram_end = layout.map.iter().map(|r| r.end).max().unwrap_or(0);
        let control = Control::new(platform, vcpus, ram_end).map_err(|_| GuestError::NoMemory)?;
        let mut p2m = P2m::new(platform, ept_caps).map_err(GuestError::from)?;
        if features.pml {
            // EPT A/D is in the capabilities (checked above), the p2m empty.
            let pml = p2m
                .set_ad_enabled(true)
                .and_then(|()| p2m.set_log_mode(platform, LogMode::Pml));
            if let Err(e) = pml {
                p2m.destroy(platform);
                return Err(GuestError::from(e).into());
            }
        }
        let altp2m = match Altp2m::new(platform, vcpus, DROP_LOG) {
            Ok(altp2m) => altp2m,
            Err(_) => {
                p2m.destroy(platform);
                return Err(GuestError::NoMemory.into());
            }
        };
        let bitmaps = (platform.alloc_frames(1, 1), platform.alloc_frames(2, 1));
        let (Some(msr_bitmap), Some(io_bitmaps)) = bitmaps else {
            if let Some(f) = bitmaps.0 {
                platform.free_frames(f, 1);
            }
            if let Some(f) = bitmaps.1 {
                platform.free_frames(f, 2);
            }
            altp2m.destroy(platform);
            p2m.destroy(platform);
            return Err(GuestError::NoMemory.into());
        };
        platform.write_phys(
            msr_bitmap.hpa(),
            &vmcs::msr_bitmap(PASS_WRITE.iter().chain(PASS_READ_ONLY), PASS_WRITE),
        );
        let io = ports::io_bitmaps();
        platform.write_phys(io_bitmaps.hpa(), &io[..4096]);
        platform.write_phys(io_bitmaps.hpa() + 4096, &io[4096..]);
        let mut vm = Vm {
            p2m,
            ram: Vec::new(),
            memory_map: layout.map.clone(),
            devices: Devices::default(),
            counters: [0; NUM_REASONS],
            stray_accesses: 0,
            dirty: DirtyBitmap::new(),
            cr_fixed,
            timer_shift: (caps.msrs.misc & 0x1f) as u8,
            entry: plan.entry,
            altp2m,
            altp2m_mode: config.altp2m_mode,
            features,
            display: None,
            released: Vec::new(),
            refusals_logged: 0,
            boot_views: BootViews::Host,
            logdirty_all: None,
            coherence: config.coherence,
            end: None,
            halted: 0,
            controls,
            vmcs_revision: caps.revision_id(),
            msr_bitmap,
            io_bitmaps,
            lapic: Mfn(config.host.local_apic / PAGE),
            apic_pages: Vec::new(),
            all_ones: None,
            control,
        };
        let built = vm
            .apic_pages
            .try_reserve(1)
            .map_err(|_| GuestError::NoMemory)
            .map(|()| {
                let gfn = Gfn(crate::vcpu::APIC_BASE_RESET / PAGE);
                vm.apic_pages.push(apic::ApicPage::reset(gfn, vcpus as u32));
            })
            .and_then(|()| vm.populate(&layout.backed(), platform))
            .and_then(|()| vm.map_mmio(&mmio, platform))
            .and_then(|()| vm.write_acpi_tables(config, platform))
            .and_then(|()| vm.load(&plan, platform))
            .and_then(|()| {
                vm.start_views(config.boot_views, platform)
                    .and_then(|()| vm.start_logdirty(config.logdirty_all, platform))
                    .map_err(GuestError::from_altp2m)
            });
        match built {
            Ok(()) => Ok(vm),
            Err(e) => {
                vm.destroy(platform);
                Err(e.into())
            }
        }
    }

    /// The period of the hypervisor's tick, in VMX-preemption timer units:
    /// the display refresh rate while there is a display, otherwise the
    /// watchdog's, slow enough to cost an idle guest next to nothing; with a
    /// control line, often enough that a tool's command waits little.
    pub fn tick_period(&self) -> u32 {
        let tsc = if self.display.is_some() {
            DISPLAY_TICK_TSC
        } else {
            WATCHDOG_TICK_TSC
        };
        // A machine with a control line looks at it on every tick.
        let tsc = if self.control.has_line() {
            tsc.min(crate::control::CONTROL_TICK_TSC)
        } else {
            tsc
        };
        u32::try_from(tsc >> self.timer_shift).unwrap_or(u32::MAX)
    }

    /// The number of vCPUs.
    pub fn vcpus(&self) -> usize {
        self.altp2m.vcpus()
    }

    /// The MSR bitmap's and I/O bitmaps' addresses, for each vCPU's VMCS.
    pub fn bitmaps(&self) -> (u64, u64) {
        (self.msr_bitmap.hpa(), self.io_bitmaps.hpa())
    }

    /// Puts every vCPU on the views the guest boots on.
    fn start_views(
        &mut self,
        views: BootViews,
        platform: &mut impl Platform,
    ) -> Result<(), hv_altp2m::Error> {
        self.boot_views = views;
        let count = match views {
            BootViews::Host => return Ok(()),
            BootViews::Fresh => 1,
            BootViews::Switching => 2,
        };
        self.altp2m.enable(platform, &self.p2m)?;
        for _ in 0..count {
            self.altp2m
                .create_view(platform, &self.p2m, P2mAccess::Rwx)?;
        }
        self.altp2m.switch_all(1)
    }

    /// Puts all guest RAM under log-dirty tracking (host and views).
    fn start_logdirty(
        &mut self,
        all: bool,
        platform: &mut impl Platform,
    ) -> Result<(), hv_altp2m::Error> {
        if !all {
            return Ok(());
        }
        for &(start, end) in &self.ram_ranges() {
            self.altp2m.host_change_type_range(
                platform,
                &mut self.p2m,
                Gfn(start / PAGE),
                Gfn(end / PAGE - 1),
                P2mType::RamRw,
                P2mType::RamLogdirty,
            )?;
        }
        self.logdirty_all = Some(LogdirtyTotals::default());
        Ok(())
    }

    /// With `guest.logdirty=all`, on each tick: fetches and clears the
    /// dirty pages of all guest RAM, as a migration or a monitor would.
    pub fn logdirty_tick(
        &mut self,
        cpu: &mut impl Cpu,
        platform: &mut impl Platform,
        vcpu: usize,
    ) -> Result<(), hv_altp2m::Error> {
        if self.logdirty_all.is_none() {
            return Ok(());
        }
        let mut dirty = 0u64;
        for &(start, end) in &self.ram_ranges() {
            let (first, last) = (Gfn(start / PAGE), Gfn(end / PAGE - 1));
            let armed =
                self.altp2m
                    .arm_dirty(platform, &mut self.p2m, &mut self.dirty, first, last)?;
            crate::views::flush(self, cpu, platform, vcpu);
            // The display's copy still needs what this takes of it.
            let display = &mut self.display;
            self.altp2m.fetch_dirty(&mut self.dirty, &armed, |gfn| {
                dirty += 1;
                if let Some(display) = display.as_mut() {
                    display.guest_took(gfn);
                }
            })?;
        }
        if let Some(totals) = self.logdirty_all.as_mut() {
            totals.fetches += 1;
            totals.pages += dirty;
        }
        Ok(())
    }

    /// The RAM ranges the guest is told about (from its memory map).
    fn ram_ranges(&self) -> heapless::Vec<(u64, u64), 8> {
        self.memory_map
            .iter()
            .filter(|r| r.kind == loader::MemoryKind::Ram)
            .map(|r| (r.start, r.end))
            .take(8)
            .collect()
    }

    /// On each of a vCPU's ticks with [`BootViews::Switching`]: the vCPU
    /// goes to the other of views 1 and 2.
    pub fn switch_boot_view(&mut self, vcpu: usize) {
        if self.boot_views != BootViews::Switching {
            return;
        }
        let next = match self.altp2m.vcpu_view(vcpu) {
            Ok(1) => 2,
            _ => 1,
        };
        // Views 1 and 2 exist until the guest destroys them; then it
        // decides where it runs.
        let _ = self.altp2m.switch_vcpu(vcpu, next);
    }

    /// Maps the interrupt hardware's pages (I/O APICs, the local APIC at
    /// its reset base) guest-physical = host-physical, uncached: the guest
    /// programs them itself.
    fn map_mmio(&mut self, pages: &[u64], platform: &mut impl Platform) -> Result<(), GuestError> {
        for &page in pages {
            self.p2m.set_entry(
                platform,
                Gfn(page / PAGE),
                Mfn(page / PAGE),
                Order::PAGE_4K,
                P2mType::MmioDirect,
                P2mAccess::Rwx,
            )?;
        }
        Ok(())
    }

    /// Writes the guest's ACPI tables into the legacy area.
    fn write_acpi_tables(
        &mut self,
        config: &GuestConfig<'_>,
        platform: &mut impl Platform,
    ) -> Result<(), GuestError> {
        let tables = acpi::tables(config.host, config.apic_ids);
        self.write(platform, acpi::TABLES_AT, &tables)
            .map_err(|_| GuestError::BadConfig("no room for the ACPI tables"))
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

    /// Writes what the boot plan places: image or kernel, modules, boot
    /// information. RAM starts zeroed, so the zero-filled tails are done.
    fn load(
        &mut self,
        plan: &BootPlan<'_>,
        platform: &mut impl Platform,
    ) -> Result<(), GuestError> {
        for placement in &plan.writes {
            self.write(platform, placement.gpa, &placement.bytes)
                .map_err(|_| GuestError::BadConfig("a boot plan write outside RAM"))?;
        }
        Ok(())
    }

    /// Gives every frame back: the display copy, the views, RAM, EPT tables
    /// and bitmaps. Every vCPU is gone and the EPT translations of this VM
    /// flushed on every CPU (all-context INVEPT) before.
    pub fn destroy(mut self, platform: &mut impl Platform) {
        self.control.destroy(platform);
        if let Some(frame) = self.all_ones {
            platform.free_frames(frame, 1);
        }
        platform.free_frames(self.msr_bitmap, 1);
        platform.free_frames(self.io_bitmaps, 2);
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

    /// Takes a page from the guest (balloon): it leaves the host p2m and every
    /// view, cached translations are flushed, and its frame goes back to the
    /// hypervisor.
    pub fn release_page(
        &mut self,
        platform: &mut impl Platform,
        cpu: &mut impl Cpu,
        vcpu: usize,
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
        // No CPU may still translate to the frame when it is reused.
        crate::views::flush(self, cpu, platform, vcpu);
        platform.free_frames(mfn, 1);
        let at = self.released.binary_search(&mfn.0).unwrap_or_else(|at| at);
        self.released.insert(at, mfn.0);
        Ok(())
    }

    /// Frames of guest RAM.
    pub fn ram_frames(&self) -> u64 {
        self.ram.iter().map(|c| c.frames).sum()
    }
}
