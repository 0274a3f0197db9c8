//! What the boot loader told us, copied out of its Multiboot 1 or 2 structure
//! into fixed-size storage: the memory map, the command line, the modules and
//! where ACPI's root table is. Copying lets the frame allocator reuse the
//! loader's memory; the fixed sizes let this run before there is a heap.

use core::fmt;

use heapless::{String, Vec};

pub const MAX_REGIONS: usize = 128;
pub const MAX_MODULES: usize = 16;
pub const CMDLINE_MAX: usize = 1024;
pub const MODULE_CMDLINE_MAX: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loader {
    Multiboot1,
    Multiboot2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionKind {
    Available,
    Reserved,
    AcpiReclaimable,
    AcpiNvs,
    Defective,
}

/// `start..end` in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRegion {
    pub start: u64,
    pub end: u64,
    pub kind: RegionKind,
}

impl MemoryRegion {
    fn from_raw(start: u64, length: u64, raw_type: u32) -> Self {
        let kind = match raw_type {
            1 => RegionKind::Available,
            3 => RegionKind::AcpiReclaimable,
            4 => RegionKind::AcpiNvs,
            5 => RegionKind::Defective,
            _ => RegionKind::Reserved,
        };
        Self {
            start,
            end: start.saturating_add(length),
            kind,
        }
    }
}

/// A boot module (`start..end` in bytes) and its own command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Module {
    pub start: u64,
    pub end: u64,
    pub cmdline: String<MODULE_CMDLINE_MAX>,
}

/// Where ACPI's root system description table is: RSDT for revision 0,
/// XSDT for revision 2 and later.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcpiRoot {
    pub revision: u8,
    pub address: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootInfo {
    pub loader: Loader,
    pub regions: Vec<MemoryRegion, MAX_REGIONS>,
    pub cmdline: String<CMDLINE_MAX>,
    pub modules: Vec<Module, MAX_MODULES>,
    /// From the Multiboot 2 RSDP tags; Multiboot 1 does not pass it.
    pub acpi_root: Option<AcpiRoot>,
    /// Something did not fit in the fixed storage and was dropped.
    pub truncated: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootInfoError {
    /// EAX at entry held neither Multiboot magic.
    UnknownMagic(u32),
    /// The structure the loader passed does not parse.
    Malformed(Loader),
    /// No memory map: without it no frame can be trusted to be RAM.
    NoMemoryMap,
    /// A module whose end lies before its start.
    BadModule { start: u64, end: u64 },
}

impl fmt::Display for BootInfoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownMagic(m) => write!(f, "not loaded by a Multiboot loader (magic {m:#x})"),
            Self::Malformed(l) => write!(f, "{l:?} boot information does not parse"),
            Self::NoMemoryMap => f.write_str("the boot loader passed no memory map"),
            Self::BadModule { start, end } => {
                write!(f, "boot module with end {end:#x} before start {start:#x}")
            }
        }
    }
}

impl BootInfo {
    fn new(loader: Loader) -> Self {
        Self {
            loader,
            regions: Vec::new(),
            cmdline: String::new(),
            modules: Vec::new(),
            acpi_root: None,
            truncated: false,
        }
    }

    fn push_region(&mut self, region: MemoryRegion) {
        if region.end > region.start && self.regions.push(region).is_err() {
            self.truncated = true;
        }
    }

    fn push_module(&mut self, start: u64, end: u64, cmdline: &str) -> Result<(), BootInfoError> {
        if end < start {
            return Err(BootInfoError::BadModule { start, end });
        }
        let module = Module {
            start,
            end,
            cmdline: copy_truncated(cmdline, &mut self.truncated),
        };
        if self.modules.push(module).is_err() {
            self.truncated = true;
        }
        Ok(())
    }

    /// Parses the boot information at `address` according to the entry `magic`.
    ///
    /// # Safety
    ///
    /// `address` must be the boot information pointer the loader passed, and all
    /// memory it refers to must be readable at its physical address.
    pub unsafe fn parse(magic: u32, address: u64) -> Result<Self, BootInfoError> {
        match magic {
            // SAFETY: forwarded from the caller.
            multiboot2::MAGIC => unsafe { Self::from_multiboot2(address) },
            // SAFETY: forwarded from the caller.
            multiboot::information::SIGNATURE_EAX => unsafe { Self::from_multiboot1(address) },
            other => Err(BootInfoError::UnknownMagic(other)),
        }
    }

    /// # Safety
    ///
    /// As [`BootInfo::parse`].
    pub unsafe fn from_multiboot2(address: u64) -> Result<Self, BootInfoError> {
        let header = address as usize as *const multiboot2::BootInformationHeader;
        // SAFETY: the caller vouches for the pointer; `load` checks alignment,
        // size and the end tag before anything is read through it.
        let mbi = unsafe { multiboot2::BootInformation::load(header) }
            .map_err(|_| BootInfoError::Malformed(Loader::Multiboot2))?;
        let mut info = Self::new(Loader::Multiboot2);
        let mmap = mbi.memory_map_tag().ok_or(BootInfoError::NoMemoryMap)?;
        for area in mmap.memory_areas() {
            info.push_region(MemoryRegion::from_raw(
                area.start_address(),
                area.size(),
                u32::from(area.typ()),
            ));
        }
        if let Some(cmdline) = mbi.command_line_tag().and_then(|t| t.cmdline().ok()) {
            info.cmdline = copy_truncated(cmdline, &mut info.truncated);
        }
        for module in mbi.module_tags() {
            let cmdline = module.cmdline().unwrap_or("");
            info.push_module(
                u64::from(module.start_address()),
                u64::from(module.end_address()),
                cmdline,
            )?;
        }
        info.acpi_root = match (mbi.rsdp_v2_tag(), mbi.rsdp_v1_tag()) {
            (Some(v2), _) if v2.checksum_is_valid() && v2.xsdt_address() != 0 => Some(AcpiRoot {
                revision: v2.revision(),
                address: v2.xsdt_address() as u64,
            }),
            (_, Some(v1)) if v1.checksum_is_valid() => Some(AcpiRoot {
                revision: 0,
                address: v1.rsdt_address() as u64,
            }),
            _ => None,
        };
        Ok(info)
    }

    /// # Safety
    ///
    /// As [`BootInfo::parse`]; physical addresses must be identity-mapped.
    pub unsafe fn from_multiboot1(address: u64) -> Result<Self, BootInfoError> {
        let mut identity = IdentityMapped;
        // SAFETY: the caller vouches for the pointer; every pointer inside the
        // structure is translated by `IdentityMapped`, which the caller vouches for.
        let mbi = unsafe { multiboot::information::Multiboot::from_ptr(address, &mut identity) }
            .ok_or(BootInfoError::Malformed(Loader::Multiboot1))?;
        let mut info = Self::new(Loader::Multiboot1);
        let regions = mbi.memory_regions().ok_or(BootInfoError::NoMemoryMap)?;
        for r in regions {
            info.push_region(MemoryRegion::from_raw(
                r.base_address(),
                r.length(),
                r.memory_type() as u32,
            ));
        }
        if let Some(cmdline) = mbi.command_line() {
            info.cmdline = copy_truncated(cmdline, &mut info.truncated);
        }
        for module in mbi.modules().into_iter().flatten() {
            info.push_module(module.start, module.end, module.string.unwrap_or(""))?;
        }
        Ok(info)
    }

    /// Highest end address of available RAM.
    pub fn ram_end(&self) -> u64 {
        self.regions
            .iter()
            .filter(|r| r.kind == RegionKind::Available)
            .map(|r| r.end)
            .max()
            .unwrap_or(0)
    }
}

/// Copies `s` into a fixed string, cutting at a character boundary if it is too long.
fn copy_truncated<const N: usize>(s: &str, truncated: &mut bool) -> String<N> {
    let mut out = String::new();
    for c in s.chars() {
        if out.push(c).is_err() {
            *truncated = true;
            break;
        }
    }
    out
}

/// Multiboot 1 pointers are physical; the kernel identity-maps physical memory.
struct IdentityMapped;

impl multiboot::information::MemoryManagement for IdentityMapped {
    unsafe fn paddr_to_slice(&self, addr: u64, length: usize) -> Option<&'static [u8]> {
        if addr == 0 {
            return None;
        }
        // SAFETY: `BootInfo::from_multiboot1`'s caller guarantees identity-mapped,
        // readable physical memory for everything the structure points to.
        Some(unsafe { core::slice::from_raw_parts(addr as usize as *const u8, length) })
    }

    unsafe fn allocate(&mut self, _length: usize) -> Option<(u64, &mut [u8])> {
        None
    }

    unsafe fn deallocate(&mut self, _addr: u64) {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use multiboot2::{
        Builder, CommandLineTag, MemoryArea, MemoryAreaType, MemoryMapTag, ModuleTag,
    };

    use super::*;

    /// The builder's bytes in 8-byte aligned storage, so tests can patch them.
    fn mb2_words(builder: Builder) -> std::vec::Vec<u64> {
        let mbi = builder.build();
        let size = mbi.header().total_size() as usize;
        let mut words = std::vec![0u64; size.div_ceil(8)];
        // SAFETY: both ranges are `size` bytes long and do not overlap.
        unsafe {
            core::ptr::copy_nonoverlapping(
                core::ptr::from_ref(&*mbi).cast::<u8>(),
                words.as_mut_ptr().cast::<u8>(),
                size,
            )
        };
        words
    }

    fn parse_words(words: &[u64]) -> Result<BootInfo, BootInfoError> {
        // SAFETY: the structure is a live allocation owned by the caller.
        unsafe { BootInfo::parse(multiboot2::MAGIC, words.as_ptr() as u64) }
    }

    fn parse_mb2(builder: Builder) -> Result<BootInfo, BootInfoError> {
        parse_words(&mb2_words(builder))
    }

    #[test]
    fn multiboot2_map_cmdline_and_modules() {
        let builder = Builder::new()
            .cmdline(CommandLineTag::new("loglevel=debug"))
            .mmap(MemoryMapTag::new(&[
                MemoryArea::new(0, 0x9f000, MemoryAreaType::Available),
                MemoryArea::new(0xf0000, 0x10000, MemoryAreaType::Reserved),
                MemoryArea::new(0x100000, 0x7ef0000, MemoryAreaType::Available),
            ]))
            .add_module(ModuleTag::new(0x400000, 0x401000, "guest one"));
        let info = parse_mb2(builder).unwrap();
        assert_eq!(info.loader, Loader::Multiboot2);
        assert_eq!(info.cmdline.as_str(), "loglevel=debug");
        assert_eq!(info.regions.len(), 3);
        assert_eq!(
            info.regions[1],
            MemoryRegion {
                start: 0xf0000,
                end: 0x100000,
                kind: RegionKind::Reserved
            }
        );
        assert_eq!(info.ram_end(), 0x7ff0000);
        assert_eq!(info.modules[0].start, 0x400000);
        assert_eq!(info.modules[0].cmdline.as_str(), "guest one");
        assert!(!info.truncated);
    }

    #[test]
    fn missing_memory_map_is_an_error() {
        let builder = Builder::new().cmdline(CommandLineTag::new("x"));
        assert_eq!(parse_mb2(builder), Err(BootInfoError::NoMemoryMap));
    }

    #[test]
    fn module_ending_before_its_start_is_refused() {
        let builder = Builder::new()
            .mmap(MemoryMapTag::new(&[MemoryArea::new(
                0,
                0x100000,
                MemoryAreaType::Available,
            )]))
            .add_module(ModuleTag::new(0x4000, 0x5000, ""));
        let mut words = mb2_words(builder);
        // Tags follow the 8-byte header at 8-byte alignment; the
        // builder refuses bad modules, so patch mod_end of the module tag (type 3).
        let mut at = 1;
        while words[at] as u32 != 3 {
            at += ((words[at] >> 32) as usize).div_ceil(8);
        }
        words[at + 1] = 0x3000 << 32 | 0x4000;
        assert_eq!(
            parse_words(&words),
            Err(BootInfoError::BadModule {
                start: 0x4000,
                end: 0x3000
            })
        );
    }

    #[test]
    fn unknown_magic_is_refused() {
        // SAFETY: the address is never read for an unknown magic.
        let result = unsafe { BootInfo::parse(0x1234, 0) };
        assert_eq!(result, Err(BootInfoError::UnknownMagic(0x1234)));
    }

    #[test]
    fn an_overlong_command_line_is_cut_and_flagged() {
        let long = "a".repeat(CMDLINE_MAX + 10);
        let builder = Builder::new()
            .cmdline(CommandLineTag::new(&long))
            .mmap(MemoryMapTag::new(&[MemoryArea::new(
                0,
                0x100000,
                MemoryAreaType::Available,
            )]));
        let info = parse_mb2(builder).unwrap();
        assert_eq!(info.cmdline.len(), CMDLINE_MAX);
        assert!(info.truncated);
    }
}
