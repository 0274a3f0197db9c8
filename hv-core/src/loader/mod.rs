//! Guest images: Multiboot 1 and 2 kernels and Linux bzImages, given as
//! boot modules with more modules after them (Multiboot modules, or the
//! Linux initrd). [`plan_guest`] checks everything and plans where each byte
//! goes in guest-physical memory and the register state at entry, before the
//! caller takes any memory. Nothing from an image is trusted: every offset
//! and size is checked before use.
//!
//! - `multiboot`: ELF and a.out-kludge images, Multiboot 1/2 information.
//! - `linux`: the Linux x86 boot protocol (32- and 64-bit entry).
//! - `bootparams`: the Linux zero page as byte-offset fields.
//! - `layout`: where free guest RAM is.

use alloc::borrow::Cow;
use alloc::vec::Vec;
use core::fmt;

pub mod bootparams;
mod layout;
mod linux;
mod multiboot;

pub use linux::{BOOT_CS, BOOT_DS, LinuxError, LinuxHeader, linux_header};
pub use multiboot::{
    LoadPlan, MapEntry, Piece, Protocol, multiboot1_info, multiboot1_info_len, multiboot2_info,
    plan,
};

/// Guest pages are 4 KiB.
const PAGE: u64 = 4096;

/// Why an image (or the plan around it) is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageError {
    /// Neither a Multiboot header nor a Linux boot sector.
    UnknownFormat,
    NoMultibootHeader,
    /// Multiboot 1 flags in bits 0..16 that this loader does not provide.
    UnsupportedMultibootFlags(u32),
    NotElf,
    /// ELF magic, but the headers do not parse (a cut-off or corrupt file).
    MalformedElf,
    /// Not a 32- or 64-bit x86 executable.
    UnsupportedElf(&'static str),
    /// A segment's bytes lie beyond the end of the file.
    Truncated {
        offset: u64,
        size: u64,
        file: u64,
    },
    /// A segment (or the a.out-kludge load range) is not inside guest RAM.
    OutsideRam {
        start: u64,
        end: u64,
    },
    /// Two loaded ranges overlap.
    Overlap {
        first: (u64, u64),
        second: (u64, u64),
    },
    /// The entry point is not inside a loaded range or not below 4 GiB.
    BadEntry(u64),
    /// The Multiboot 1 address fields are inconsistent.
    BadAddressFields,
    NothingToLoad,
    /// The caller's memory map has an empty or inverted region.
    BadMemoryMap {
        start: u64,
        end: u64,
    },
    /// No free guest RAM (below 4 GiB) is left for this.
    NoRoom {
        what: Content,
        size: u64,
    },
    /// A Linux bzImage refused.
    Linux(LinuxError),
}

impl From<LinuxError> for ImageError {
    fn from(e: LinuxError) -> Self {
        Self::Linux(e)
    }
}

impl fmt::Display for ImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownFormat => f.write_str("neither a Multiboot 1/2 image nor a Linux bzImage"),
            Self::NoMultibootHeader => f.write_str("no Multiboot 1 or 2 header in the image"),
            Self::UnsupportedMultibootFlags(flags) => {
                write!(
                    f,
                    "the Multiboot 1 header requires features this loader lacks (flags {flags:#x})"
                )
            }
            Self::NotElf => f.write_str("not an ELF file"),
            Self::MalformedElf => f.write_str("truncated or corrupt ELF headers"),
            Self::UnsupportedElf(why) => write!(f, "unsupported ELF image: {why}"),
            Self::Truncated { offset, size, file } => {
                write!(
                    f,
                    "truncated: a segment needs bytes {offset:#x}+{size:#x} of a {file:#x}-byte file"
                )
            }
            Self::OutsideRam { start, end } => {
                write!(
                    f,
                    "segment {start:#x}..{end:#x} lies outside the guest's RAM"
                )
            }
            Self::Overlap { first, second } => write!(
                f,
                "segments {:#x}..{:#x} and {:#x}..{:#x} overlap",
                first.0, first.1, second.0, second.1
            ),
            Self::BadEntry(entry) => write!(
                f,
                "entry point {entry:#x} is not in a loaded segment below 4 GiB"
            ),
            Self::BadAddressFields => f.write_str("inconsistent Multiboot 1 address fields"),
            Self::NothingToLoad => f.write_str("the image has no loadable segment"),
            Self::BadMemoryMap { start, end } => {
                write!(f, "bad memory map region {start:#x}..{end:#x}")
            }
            Self::NoRoom { what, size } => write!(
                f,
                "no room in guest RAM below 4 GiB for {what} ({size:#x} bytes)"
            ),
            Self::Linux(e) => write!(f, "Linux bzImage: {e}"),
        }
    }
}

/// What a guest-physical range is, as the guest's memory map says. The
/// numbers are the E820 types, which Multiboot 1 and 2 use too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryKind {
    Ram,
    Reserved,
    /// ACPI tables; RAM once the OS has read them.
    AcpiReclaimable,
    AcpiNvs,
    Unusable,
}

impl MemoryKind {
    pub const fn e820_type(self) -> u32 {
        match self {
            Self::Ram => 1,
            Self::Reserved => 2,
            Self::AcpiReclaimable => 3,
            Self::AcpiNvs => 4,
            Self::Unusable => 5,
        }
    }
}

/// One region of the guest's memory map: `start..end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRegion {
    pub start: u64,
    pub end: u64,
    pub kind: MemoryKind,
}

impl From<MapEntry> for MemoryRegion {
    fn from(e: MapEntry) -> Self {
        Self {
            start: e.start,
            end: e.end,
            kind: if e.available {
                MemoryKind::Ram
            } else {
                MemoryKind::Reserved
            },
        }
    }
}

/// A boot module after the guest image: its bytes and its command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Module<'a> {
    pub bytes: &'a [u8],
    pub cmdline: &'a str,
}

pub use hv_abi::LinuxEntry;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootOptions {
    /// Start an image that has both Multiboot headers as Multiboot 1.
    pub force_multiboot1: bool,
    pub linux_entry: LinuxEntry,
    /// The ACPI RSDP's address for a Linux guest (`acpi_rsdp_addr`), which
    /// spares the kernel its search of the BIOS areas.
    pub acpi_rsdp: Option<u64>,
}

/// What a placed range holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Content {
    /// A piece of a Multiboot image.
    Image,
    /// The Multiboot information.
    BootInformation,
    /// Module `n` (0 = the first after the image); a Linux initrd part.
    Module(usize),
    /// The protected-mode part of a bzImage.
    Kernel,
    /// The Linux zero page.
    BootParams,
    CommandLine,
    Gdt,
    PageTables,
}

impl fmt::Display for Content {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Image => f.write_str("the image"),
            Self::BootInformation => f.write_str("the Multiboot information"),
            Self::Module(n) => write!(f, "module {n}"),
            Self::Kernel => f.write_str("the kernel"),
            Self::BootParams => f.write_str("boot_params"),
            Self::CommandLine => f.write_str("the command line"),
            Self::Gdt => f.write_str("the GDT"),
            Self::PageTables => f.write_str("the page tables"),
        }
    }
}

/// Bytes to write at `gpa`, then `zeroed` zero bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Placement<'a> {
    pub gpa: u64,
    /// Borrowed from the image or a module, or generated.
    pub bytes: Cow<'a, [u8]>,
    /// Zero bytes after `bytes` (an ELF segment's bss). Guest RAM starts
    /// zeroed, so a caller that zeroes all RAM first can skip them.
    pub zeroed: u64,
    pub content: Content,
}

impl Placement<'_> {
    pub fn end(&self) -> u64 {
        self.gpa + self.bytes.len() as u64 + self.zeroed
    }
}

/// Where and how much, not the bytes (a kernel is megabytes).
impl fmt::Debug for Placement<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} at {:#x}..{:#x} ({:#x} bytes",
            self.content,
            self.gpa,
            self.end(),
            self.bytes.len()
        )?;
        if self.zeroed != 0 {
            write!(f, " + {:#x} zeroed", self.zeroed)?;
        }
        f.write_str(")")
    }
}

/// A descriptor-table register value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gdtr {
    pub base: u64,
    pub limit: u16,
}

/// The guest's register state at entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryState {
    /// 32-bit protected mode, flat segments, paging off (Multiboot 1 spec
    /// 3.2, Multiboot 2 spec 3.3).
    Multiboot { eip: u32, eax: u32, ebx: u32 },
    /// boot.rst "32-bit Boot Protocol": protected mode, paging off, CS
    /// 0x10 and DS/ES/SS 0x18 flat in `gdt`, ESI = boot_params.
    Linux32 { eip: u32, esi: u32, gdt: Gdtr },
    /// boot.rst "64-bit Boot Protocol": long mode on the identity tables
    /// at `cr3`, same selectors, RSI = boot_params.
    Linux64 {
        rip: u64,
        rsi: u64,
        cr3: u64,
        gdt: Gdtr,
    },
}

impl fmt::Display for EntryState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Multiboot { eip, eax, ebx } => {
                let version = if eax == Protocol::Multiboot1.magic() {
                    1
                } else {
                    2
                };
                write!(
                    f,
                    "Multiboot {version} entry {eip:#x}, information at {ebx:#x}"
                )
            }
            Self::Linux32 { eip, esi, .. } => {
                write!(f, "Linux 32-bit entry {eip:#x}, boot_params at {esi:#x}")
            }
            Self::Linux64 { rip, rsi, cr3, .. } => write!(
                f,
                "Linux 64-bit entry {rip:#x}, boot_params at {rsi:#x}, page tables at {cr3:#x}"
            ),
        }
    }
}

/// What to write where, and how the guest starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootPlan<'a> {
    /// Non-overlapping, each inside one RAM region of the memory map.
    pub writes: Vec<Placement<'a>>,
    pub entry: EntryState,
}

/// Plans a guest: `image` (a Multiboot 1/2 ELF or a.out-kludge image, or a
/// Linux bzImage) with its command line, the `modules` after it (Multiboot
/// modules, or the Linux initrd: several are concatenated, as GRUB does), and
/// the `memory_map` the guest will be told about (its RAM regions are where
/// things may go). Checks everything before the caller takes any memory.
pub fn plan_guest<'a>(
    image: &'a [u8],
    modules: &[Module<'a>],
    memory_map: &[MemoryRegion],
    cmdline: &str,
    options: &BootOptions,
) -> Result<BootPlan<'a>, ImageError> {
    let layout = layout::Layout::new(memory_map)?;
    if multiboot::has_header(image) {
        multiboot::plan_boot(
            image,
            modules,
            memory_map,
            layout,
            cmdline,
            options.force_multiboot1,
        )
    } else if linux::is_linux(image) {
        linux::plan(image, modules, memory_map, layout, cmdline, options)
    } else {
        Err(ImageError::UnknownFormat)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    extern crate std;

    pub(crate) use super::multiboot::tests::elf;
    use super::*;

    /// The map every loader test uses: 64 MiB with the legacy hole reserved.
    pub(crate) fn map(ram_end: u64) -> std::vec::Vec<MemoryRegion> {
        let region = |start, end, kind| MemoryRegion { start, end, kind };
        std::vec![
            region(0, 0x9_f000, MemoryKind::Ram),
            region(0x9_f000, 0x10_0000, MemoryKind::Reserved),
            region(0x10_0000, ram_end, MemoryKind::Ram),
        ]
    }

    /// Checks what every plan must satisfy: each write inside one RAM region
    /// of `map`, and no two writes overlapping.
    pub(crate) fn assert_sound(plan: &BootPlan<'_>, map: &[MemoryRegion]) {
        for (i, w) in plan.writes.iter().enumerate() {
            assert!(
                map.iter()
                    .any(|r| r.kind == MemoryKind::Ram && r.start <= w.gpa && w.end() <= r.end),
                "{:?} at {:#x}..{:#x} is not inside RAM",
                w.content,
                w.gpa,
                w.end()
            );
            for v in &plan.writes[..i] {
                assert!(
                    v.end() <= w.gpa || w.end() <= v.gpa,
                    "{:?} and {:?} overlap",
                    v.content,
                    w.content
                );
            }
        }
    }

    /// The bytes the plan puts at `gpa..gpa + len` (zero where nothing is written).
    pub(crate) fn read(plan: &BootPlan<'_>, gpa: u64, len: usize) -> std::vec::Vec<u8> {
        let mut out = std::vec![0u8; len];
        let end = gpa + len as u64;
        for w in &plan.writes {
            let (from, to) = (w.gpa.max(gpa), (w.gpa + w.bytes.len() as u64).min(end));
            if from < to {
                out[(from - gpa) as usize..(to - gpa) as usize]
                    .copy_from_slice(&w.bytes[(from - w.gpa) as usize..(to - w.gpa) as usize]);
            }
        }
        out
    }

    #[test]
    fn unknown_images_are_refused() {
        let options = BootOptions::default();
        assert_eq!(
            plan_guest(&[0u8; 0x1000], &[], &map(64 << 20), "", &options),
            Err(ImageError::UnknownFormat)
        );
        assert_eq!(
            plan_guest(b"short", &[], &map(64 << 20), "", &options),
            Err(ImageError::UnknownFormat)
        );
    }

    #[test]
    fn inverted_map_regions_are_refused() {
        let image = elf(0x20_0000, 0x1000, 0x1000, 0x20_0000, None, true);
        let mut bad = map(64 << 20);
        bad[1].end = bad[1].start;
        assert_eq!(
            plan_guest(&image, &[], &bad, "", &BootOptions::default()),
            Err(ImageError::BadMemoryMap {
                start: 0x9_f000,
                end: 0x9_f000
            })
        );
    }
}
