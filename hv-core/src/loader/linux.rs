//! Linux bzImage guests, started per the Linux x86 boot protocol
//! (Documentation/arch/x86/boot.rst, "32-bit Boot Protocol" and "64-bit
//! Boot Protocol"): the real-mode setup code never runs; the hypervisor
//! fills the zero page itself and enters the protected-mode kernel.
//!
//! Decisions:
//! - Protocol 2.10 at least (kernel 2.6.31, 2009): it brings `init_size` and
//!   `pref_address`, without which the kernel's footprint is unknown and it
//!   could not be kept clear of the initrd and the boot data. The 64-bit
//!   entry needs 2.12 (`xloadflags`, kernel 3.8). Only bzImages
//!   (`LOADED_HIGH`) are loaded.
//! - The kernel goes at `pref_address` when that is free RAM; a relocatable
//!   kernel that does not fit there goes at the lowest free address from
//!   1 MiB aligned to `kernel_alignment`, then to each smaller power of two
//!   down to `1 << min_alignment` (boot.rst "min_alignment"), and
//!   `kernel_alignment` in the zero page says which. `init_size` bytes from
//!   there (or the file's protected-mode part if larger) are kept for it. A
//!   non-relocatable kernel loads at 1 MiB and moves itself to
//!   `pref_address`: both ranges are kept.
//! - The zero page, the GDT, the identity page tables (64-bit entry) and the
//!   command line go, first fit in that order, in the lowest free RAM from
//!   4 KiB (the first page, with the real-mode IVT and BIOS data area the
//!   kernel reads, is left alone): with the usual map, 0x1000, 0x2000,
//!   0x3000..0x9000, and the command line right after the GDT (0x2020).
//!   They stay RAM in the E820 map: the kernel copies the zero page and the
//!   command line early, drops the GDT and tables for its own (the
//!   decompressor loads its own GDT and CR3 before it decompresses, inside
//!   its `init_size` span, which never covers the first megabyte), and
//!   keeps the first megabyte out of its allocator anyway.
//! - The page tables map the first 4 GiB with 2 MiB pages (PML4, PDPT, four
//!   page directories: 24 KiB), so everything placed here is mapped: it all
//!   lies below 4 GiB, as do the kernel, initrd and command line, which
//!   keeps the 32-bit fields enough (the `ext_*` high halves are written
//!   anyway, as zero).
//! - The initrd (the modules, concatenated at 4-byte boundaries as GRUB
//!   does for several initrds) goes page-aligned at the highest free RAM
//!   that ends at or below `initrd_addr_max + 1` and 4 GiB, and not below
//!   1 MiB (the kernel takes the first megabyte for itself).
//! - `type_of_loader` is 0xFF (no assigned id). The E820 table is the
//!   caller's map as it is; more than 128 entries (the zero page's table)
//!   are refused rather than passed through `setup_data`.

use alloc::borrow::Cow;
use alloc::vec::Vec;
use core::fmt;
use core::ops::Range;

use super::bootparams::{self as bp, ZeroPage};
use super::layout::{LIMIT_32, Layout};
use super::{
    BootOptions, BootPlan, Content, EntryState, Gdtr, ImageError, LinuxEntry, MemoryRegion, Module,
    PAGE, Placement,
};
use crate::vcpu::state::{AR_CODE32, AR_CODE64, AR_DATA32};

/// Protocol 2.10: `init_size`, `pref_address`, `min_alignment`.
pub const MIN_VERSION: u16 = 0x020a;
/// Protocol 2.12: `xloadflags`, hence the 64-bit entry.
const XLOADFLAGS_VERSION: u16 = 0x020c;
/// Where a bzImage's protected-mode code loads unless relocated.
const LOAD_HIGH: u64 = 0x10_0000;
/// The 64-bit entry point is this far into the protected-mode code.
const ENTRY_64: u64 = 0x200;
/// The boot data go at or above this (page 0 is the real-mode IVT and BDA).
const LOW_DATA: u64 = PAGE;
/// PML4, PDPT and four page directories of 2 MiB pages: the first 4 GiB.
const TABLE_PAGES: u64 = 6;
/// Null, null, __BOOT_CS (0x10), __BOOT_DS (0x18).
const GDT_ENTRIES: usize = 4;
pub const BOOT_CS: u16 = 0x10;
pub const BOOT_DS: u16 = 0x18;

/// Why a bzImage is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinuxError {
    /// A boot sector but no "HdrS" at 0x202: not a kernel, or one older
    /// than protocol 2.00.
    NoSetupHeader,
    /// The header's protocol version, below [`MIN_VERSION`].
    ProtocolTooOld(u16),
    /// `LOADED_HIGH` is clear: a zImage, which needs the real-mode loader.
    NotBzImage,
    BadSetupHeader(&'static str),
    /// The header or the protected-mode code (`setup_sects`, `syssize`)
    /// reaches past the end of the file.
    Truncated {
        needed: u64,
        file: u64,
    },
    /// The 64-bit entry was asked for, and `XLF_KERNEL_64` is clear.
    No64BitEntry,
    /// No free RAM range below 4 GiB holds the kernel's `size` bytes (its
    /// `init_size`), at `at` for a kernel that cannot be relocated.
    KernelDoesNotFit {
        size: u64,
        at: Option<u64>,
    },
    /// No free RAM range from 1 MiB ending at or below `limit` holds the initrd.
    InitrdDoesNotFit {
        size: u64,
        limit: u64,
    },
    /// The command line is longer than the kernel's `cmdline_size`.
    CommandLineTooLong {
        len: usize,
        max: u64,
    },
    /// More memory map entries than the zero page's E820 table holds.
    TooManyMapEntries(usize),
}

impl fmt::Display for LinuxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::NoSetupHeader => {
                f.write_str("no \"HdrS\" setup header (not a kernel, or older than protocol 2.00)")
            }
            Self::ProtocolTooOld(v) => write!(
                f,
                "boot protocol {}.{:02} is too old (2.{:02} needed)",
                v >> 8,
                v & 0xff,
                MIN_VERSION & 0xff
            ),
            Self::NotBzImage => f.write_str("a zImage (loaded low), not a bzImage"),
            Self::BadSetupHeader(why) => write!(f, "bad setup header: {why}"),
            Self::Truncated { needed, file } => write!(
                f,
                "truncated: the header says {needed:#x} bytes, the file has {file:#x}"
            ),
            Self::No64BitEntry => {
                f.write_str("the 64-bit entry was asked for; the kernel has none")
            }
            Self::KernelDoesNotFit { size, at: None } => write!(
                f,
                "the kernel needs {size:#x} bytes of contiguous free RAM below 4 GiB (init_size); \
                 the guest has no such range"
            ),
            Self::KernelDoesNotFit { size, at: Some(at) } => write!(
                f,
                "the kernel cannot be relocated and needs RAM at {at:#x}..{:#x}",
                at.saturating_add(size)
            ),
            Self::InitrdDoesNotFit { size, limit } => write!(
                f,
                "no free RAM for the {size:#x}-byte initrd below {limit:#x}"
            ),
            Self::CommandLineTooLong { len, max } => write!(
                f,
                "the command line has {len} bytes, the kernel takes at most {max}"
            ),
            Self::TooManyMapEntries(n) => write!(
                f,
                "{n} memory map entries; the zero page holds {}",
                bp::E820_MAX_ENTRIES_ZEROPAGE
            ),
        }
    }
}

/// What the loader uses of a bzImage's setup header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinuxHeader {
    pub version: u16,
    pub loadflags: u8,
    /// Zero before protocol 2.12.
    pub xloadflags: u16,
    pub relocatable: bool,
    pub kernel_alignment: u64,
    /// `1 << min_alignment`, or `kernel_alignment` when that field is 0.
    pub min_alignment: u64,
    pub initrd_addr_max: u64,
    pub cmdline_size: u64,
    pub pref_address: u64,
    pub init_size: u64,
    /// File offset where the setup header ends (0x202 + the jump's offset).
    pub header_end: usize,
    /// The protected-mode code's bytes in the file.
    pub kernel: Range<usize>,
}

impl LinuxHeader {
    pub fn has_64bit_entry(&self) -> bool {
        u64::from(self.xloadflags) & bp::XLF_KERNEL_64 != 0
    }
}

/// Whether `image` is meant as a Linux kernel: a "HdrS" setup header, or at
/// least the boot sector signature (then refused as too old).
pub(super) fn is_linux(image: &[u8]) -> bool {
    bp::HEADER.read(image) == Some(bp::HDRS)
        || bp::BOOT_FLAG.read(image) == Some(bp::BOOT_FLAG_MAGIC)
}

/// Reads and checks a bzImage's setup header.
pub fn linux_header(image: &[u8]) -> Result<LinuxHeader, LinuxError> {
    let file = image.len() as u64;
    let read = |f: bp::Field| {
        f.read(image).ok_or(LinuxError::Truncated {
            needed: (f.offset + f.size) as u64,
            file,
        })
    };
    if bp::HEADER.read(image) != Some(bp::HDRS) {
        return Err(LinuxError::NoSetupHeader);
    }
    let version = read(bp::VERSION)? as u16;
    if version < MIN_VERSION {
        return Err(LinuxError::ProtocolTooOld(version));
    }
    let loadflags = read(bp::LOADFLAGS)? as u8;
    if u64::from(loadflags) & bp::LOADED_HIGH == 0 {
        return Err(LinuxError::NotBzImage);
    }
    let jump = read(bp::JUMP)?;
    if jump & 0xff != 0xeb {
        return Err(LinuxError::BadSetupHeader("no short jump at 0x200"));
    }
    let header_end = bp::HEADER.offset + (jump >> 8) as usize;
    if header_end > bp::SETUP_HEADER_END_MAX {
        return Err(LinuxError::BadSetupHeader(
            "longer than the zero page has room for",
        ));
    }
    if header_end < bp::INIT_SIZE.offset + bp::INIT_SIZE.size {
        return Err(LinuxError::BadSetupHeader(
            "shorter than protocol 2.10's header",
        ));
    }
    if header_end > image.len() {
        return Err(LinuxError::Truncated {
            needed: header_end as u64,
            file,
        });
    }
    let setup_sects = match read(bp::SETUP_SECTS)? {
        0 => 4,
        n => n,
    };
    let start = (setup_sects + 1) * 512;
    let len = read(bp::SYSSIZE)? * 16;
    if len == 0 {
        return Err(LinuxError::BadSetupHeader("syssize is 0"));
    }
    if start + len > file {
        return Err(LinuxError::Truncated {
            needed: start + len,
            file,
        });
    }
    let relocatable = read(bp::RELOCATABLE_KERNEL)? != 0;
    let kernel_alignment = read(bp::KERNEL_ALIGNMENT)?;
    if relocatable && !kernel_alignment.is_power_of_two() {
        return Err(LinuxError::BadSetupHeader(
            "kernel_alignment is not a power of two",
        ));
    }
    let min_alignment = match read(bp::MIN_ALIGNMENT)? {
        0 => kernel_alignment,
        shift => (1u64 << shift.min(63)).min(kernel_alignment),
    };
    let xloadflags = if version >= XLOADFLAGS_VERSION {
        read(bp::XLOADFLAGS)? as u16
    } else {
        0
    };
    Ok(LinuxHeader {
        version,
        loadflags,
        xloadflags,
        relocatable,
        kernel_alignment,
        min_alignment,
        initrd_addr_max: read(bp::INITRD_ADDR_MAX)?,
        cmdline_size: read(bp::CMDLINE_SIZE)?,
        pref_address: read(bp::PREF_ADDRESS)?,
        init_size: read(bp::INIT_SIZE)?,
        header_end,
        kernel: start as usize..(start + len) as usize,
    })
}

/// Where the kernel goes: its load address, the range kept for it, and the
/// alignment it was placed at.
struct KernelPlace {
    load: u64,
    kept: (u64, u64),
    alignment: u64,
}

fn place_kernel(hdr: &LinuxHeader, layout: &Layout) -> Result<KernelPlace, LinuxError> {
    let size = hdr.init_size.max(hdr.kernel.len() as u64);
    let span = |start: u64| {
        start
            .checked_add(size)
            .filter(|&end| end <= LIMIT_32)
            .map(|end| (start, end))
    };
    if !hdr.relocatable {
        let run = if hdr.pref_address != 0 {
            hdr.pref_address
        } else {
            LOAD_HIGH
        };
        let kept = span(run)
            .map(|(start, end)| {
                let load_end = LOAD_HIGH + hdr.kernel.len() as u64;
                (start.min(LOAD_HIGH), end.max(load_end))
            })
            .filter(|&(start, end)| end <= LIMIT_32 && layout.is_free(start, end))
            .ok_or(LinuxError::KernelDoesNotFit {
                size,
                at: Some(run),
            })?;
        return Ok(KernelPlace {
            load: LOAD_HIGH,
            kept,
            alignment: hdr.kernel_alignment,
        });
    }
    let pref = hdr.pref_address;
    let pref_fits = |(start, end): (u64, u64)| {
        start >= LOAD_HIGH
            && start.is_multiple_of(hdr.kernel_alignment)
            && layout.is_free(start, end)
    };
    if let Some(kept) = span(pref).filter(|&range| pref_fits(range)) {
        return Ok(KernelPlace {
            load: pref,
            kept,
            alignment: hdr.kernel_alignment,
        });
    }
    let mut alignment = hdr.kernel_alignment;
    while alignment >= hdr.min_alignment {
        if let Some(load) = layout.lowest(LOAD_HIGH, size, alignment, LIMIT_32) {
            return Ok(KernelPlace {
                load,
                kept: (load, load + size),
                alignment,
            });
        }
        alignment /= 2;
    }
    Err(LinuxError::KernelDoesNotFit { size, at: None })
}

/// Plans a bzImage guest (see the module documentation for the layout).
pub(super) fn plan<'a>(
    image: &'a [u8],
    modules: &[Module<'a>],
    map: &[MemoryRegion],
    mut layout: Layout,
    cmdline: &str,
    options: &BootOptions,
) -> Result<BootPlan<'a>, ImageError> {
    let hdr = linux_header(image)?;
    let long_mode = match options.linux_entry {
        LinuxEntry::Auto => hdr.has_64bit_entry(),
        LinuxEntry::Force32 => false,
        LinuxEntry::Force64 if hdr.has_64bit_entry() => true,
        LinuxEntry::Force64 => return Err(LinuxError::No64BitEntry.into()),
    };
    if cmdline.len() as u64 > hdr.cmdline_size {
        return Err(LinuxError::CommandLineTooLong {
            len: cmdline.len(),
            max: hdr.cmdline_size,
        }
        .into());
    }
    if map.len() > bp::E820_MAX_ENTRIES_ZEROPAGE {
        return Err(LinuxError::TooManyMapEntries(map.len()).into());
    }

    let kernel = place_kernel(&hdr, &layout)?;
    layout.take(kernel.kept.0, kernel.kept.1);
    let mut low = |what, size, align| layout.place(what, LOW_DATA, size, align);
    let zero_page_at = low(Content::BootParams, bp::SIZE as u64, PAGE)?;
    let gdt_at = low(Content::Gdt, (GDT_ENTRIES * 8) as u64, 16)?;
    let tables_at = if long_mode {
        Some(low(Content::PageTables, TABLE_PAGES * PAGE, PAGE)?)
    } else {
        None
    };
    let mut cmdline_bytes = Vec::from(cmdline.as_bytes());
    cmdline_bytes.push(0);
    let cmdline_at = low(Content::CommandLine, cmdline_bytes.len() as u64, 16)?;

    let mut writes = alloc::vec![Placement {
        gpa: kernel.load,
        bytes: Cow::Borrowed(&image[hdr.kernel.clone()]),
        zeroed: 0,
        content: Content::Kernel,
    }];
    let (initrd_at, initrd_size) = place_initrd(&hdr, modules, &mut layout, &mut writes)?;

    let mut zp = ZeroPage::default();
    zp.copy_setup_header(image, hdr.header_end);
    zp.set(bp::TYPE_OF_LOADER, bp::LOADER_UNDEFINED);
    zp.set(bp::EXT_LOADER_VER, 0);
    zp.set(bp::EXT_LOADER_TYPE, 0);
    zp.set(bp::CODE32_START, kernel.load);
    zp.set(bp::KERNEL_ALIGNMENT, kernel.alignment);
    zp.set(bp::CMD_LINE_PTR, cmdline_at & 0xffff_ffff);
    zp.set(bp::EXT_CMD_LINE_PTR, cmdline_at >> 32);
    zp.set(bp::RAMDISK_IMAGE, initrd_at & 0xffff_ffff);
    zp.set(bp::EXT_RAMDISK_IMAGE, initrd_at >> 32);
    zp.set(bp::RAMDISK_SIZE, initrd_size & 0xffff_ffff);
    zp.set(bp::EXT_RAMDISK_SIZE, initrd_size >> 32);
    // Loader-written fields the image has no business presetting.
    zp.set(bp::SETUP_DATA, 0);
    zp.set(bp::HARDWARE_SUBARCH, 0);
    zp.set(bp::HARDWARE_SUBARCH_DATA, 0);
    zp.set(bp::ACPI_RSDP_ADDR, options.acpi_rsdp.unwrap_or(0));
    zp.set_e820(
        map.iter()
            .map(|r| (r.start, r.end - r.start, r.kind.e820_type())),
    );

    let gdt = Gdtr {
        base: gdt_at,
        limit: (GDT_ENTRIES * 8 - 1) as u16,
    };
    let generated = |gpa: u64, bytes: Vec<u8>, content: Content| Placement {
        gpa,
        bytes: Cow::Owned(bytes),
        zeroed: 0,
        content,
    };
    writes.push(generated(
        zero_page_at,
        Vec::from(zp.bytes()),
        Content::BootParams,
    ));
    writes.push(generated(gdt_at, gdt_bytes(long_mode), Content::Gdt));
    writes.push(generated(cmdline_at, cmdline_bytes, Content::CommandLine));
    // Everything is below LIMIT_32: the 32-bit registers hold the addresses.
    let entry = match tables_at {
        Some(tables) => {
            writes.push(generated(
                tables,
                identity_tables(tables),
                Content::PageTables,
            ));
            EntryState::Linux64 {
                rip: kernel.load + ENTRY_64,
                rsi: zero_page_at,
                cr3: tables,
                gdt,
            }
        }
        None => EntryState::Linux32 {
            eip: kernel.load as u32,
            esi: zero_page_at as u32,
            gdt,
        },
    };
    Ok(BootPlan { writes, entry })
}

/// Places the modules as one initrd, each at a 4-byte boundary after the
/// last; returns its address and size (0, 0 without modules).
fn place_initrd<'a>(
    hdr: &LinuxHeader,
    modules: &[Module<'a>],
    layout: &mut Layout,
    writes: &mut Vec<Placement<'a>>,
) -> Result<(u64, u64), LinuxError> {
    if modules.is_empty() {
        return Ok((0, 0));
    }
    let mut offsets = Vec::with_capacity(modules.len());
    let mut size = 0u64;
    for m in modules {
        let at = size.next_multiple_of(4);
        offsets.push(at);
        size = at.saturating_add(m.bytes.len() as u64);
    }
    let limit = (hdr.initrd_addr_max + 1).min(LIMIT_32);
    let at = layout
        .highest(LOAD_HIGH, size, PAGE, limit)
        .ok_or(LinuxError::InitrdDoesNotFit { size, limit })?;
    layout.take(at, at + size);
    for (i, (m, offset)) in modules.iter().zip(offsets).enumerate() {
        writes.push(Placement {
            gpa: at + offset,
            bytes: Cow::Borrowed(m.bytes),
            zeroed: 0,
            content: Content::Module(i),
        });
    }
    Ok((at, size))
}

/// A flat 4 GiB descriptor with VMX access rights `ar` (the descriptor's
/// bits 40..56 less the limit's top nibble, SDM Vol. 3C 24.4.1).
fn flat_descriptor(ar: u32) -> u64 {
    0x000f_0000_0000_ffff | u64::from(ar & 0xf0ff) << 40
}

/// The boot GDT: __BOOT_CS a 64-bit code segment for the 64-bit entry, a
/// 32-bit one otherwise; __BOOT_DS flat data. The state at entry uses the
/// same access rights.
fn gdt_bytes(long_mode: bool) -> Vec<u8> {
    let code = if long_mode { AR_CODE64 } else { AR_CODE32 };
    [0, 0, flat_descriptor(code), flat_descriptor(AR_DATA32)]
        .iter()
        .flat_map(|d| d.to_le_bytes())
        .collect()
}

/// Identity page tables for the first 4 GiB at `base`: the PML4, one PDPT,
/// then four page directories of 2 MiB pages, writable, write-back.
fn identity_tables(base: u64) -> Vec<u8> {
    const PRESENT_WRITABLE: u64 = 0b11;
    const LARGE: u64 = 1 << 7;
    let mut tables = alloc::vec![0u8; (TABLE_PAGES * PAGE) as usize];
    let mut put = |page: u64, index: u64, entry: u64| {
        let at = (page * PAGE + index * 8) as usize;
        tables[at..at + 8].copy_from_slice(&entry.to_le_bytes());
    };
    put(0, 0, (base + PAGE) | PRESENT_WRITABLE);
    for gib in 0..4 {
        let directory = 2 + gib;
        put(1, gib, (base + directory * PAGE) | PRESENT_WRITABLE);
        for i in 0..512 {
            put(
                directory,
                i,
                (gib << 30 | i << 21) | PRESENT_WRITABLE | LARGE,
            );
        }
    }
    tables
}

#[cfg(test)]
pub(crate) mod tests {
    extern crate std;
    use std::vec;
    use std::vec::Vec;

    use super::*;
    use crate::loader::tests::{assert_sound, map, read};
    use crate::loader::{MemoryKind, plan_guest};

    /// The setup header fields a synthetic bzImage is built from.
    #[derive(Clone, Debug)]
    pub(crate) struct Header {
        pub version: u16,
        pub setup_sects: u8,
        pub kernel_len: usize,
        pub loadflags: u8,
        pub xloadflags: u16,
        pub relocatable: bool,
        pub pref_address: u64,
        pub init_size: u32,
        pub kernel_alignment: u32,
        pub min_alignment: u8,
        pub initrd_addr_max: u32,
        pub cmdline_size: u32,
        /// The jump's offset at 0x201: the header ends at 0x202 + this.
        pub header_len: u8,
    }

    impl Default for Header {
        /// Shaped like Debian 12's kernel, smaller.
        fn default() -> Self {
            Self {
                version: 0x020f,
                setup_sects: 7,
                kernel_len: 0x1_0000,
                loadflags: 0x01,
                xloadflags: 0x7f,
                relocatable: true,
                pref_address: 0x100_0000,
                init_size: 0x80_0000,
                kernel_alignment: 0x20_0000,
                min_alignment: 21,
                initrd_addr_max: 0x7fff_ffff,
                cmdline_size: 0x7ff,
                header_len: 0x6a,
            }
        }
    }

    /// A bzImage: boot sector and setup sectors with the header, then the
    /// protected-mode code (a byte pattern, to check the copy).
    pub(crate) fn bzimage(h: &Header) -> Vec<u8> {
        let setup = (usize::from(h.setup_sects) + 1) * 512;
        let mut f = vec![0u8; setup + h.kernel_len];
        let mut put = |at: usize, bytes: &[u8]| f[at..at + bytes.len()].copy_from_slice(bytes);
        put(0x1f1, &[h.setup_sects]);
        put(0x1f2, &1u16.to_le_bytes()); // root_flags
        put(0x1f4, &((h.kernel_len / 16) as u32).to_le_bytes());
        put(0x1fa, &0xffffu16.to_le_bytes()); // vid_mode "normal"
        put(0x1fe, &0xaa55u16.to_le_bytes());
        put(0x200, &[0xeb, h.header_len]);
        put(0x202, b"HdrS");
        put(0x206, &h.version.to_le_bytes());
        put(0x20e, &0x3a40u16.to_le_bytes()); // kernel_version
        put(0x211, &[h.loadflags]);
        put(0x214, &0x10_0000u32.to_le_bytes()); // code32_start
        put(0x22c, &h.initrd_addr_max.to_le_bytes());
        put(0x230, &h.kernel_alignment.to_le_bytes());
        put(0x234, &[u8::from(h.relocatable), h.min_alignment]);
        put(0x236, &h.xloadflags.to_le_bytes());
        put(0x238, &h.cmdline_size.to_le_bytes());
        put(0x248, &0x2ccu32.to_le_bytes()); // payload_offset
        put(0x258, &h.pref_address.to_le_bytes());
        put(0x260, &h.init_size.to_le_bytes());
        put(0x264, &0x1234u32.to_le_bytes()); // handover_offset
        for (i, b) in f[setup..].iter_mut().enumerate() {
            *b = (i * 7 + i / 251) as u8;
        }
        f
    }

    fn le(bytes: &[u8], at: usize, size: usize) -> u64 {
        bytes[at..at + size]
            .iter()
            .rev()
            .fold(0, |v, &b| v << 8 | u64::from(b))
    }

    fn options(linux_entry: LinuxEntry) -> BootOptions {
        BootOptions {
            linux_entry,
            ..BootOptions::default()
        }
    }

    /// A planned Linux guest: its zero page, entry state and memory.
    struct Planned {
        zp: Vec<u8>,
        entry: EntryState,
        memory: Vec<u8>,
    }

    /// Short, so that a test expecting a refusal does not print a guest's RAM.
    impl core::fmt::Debug for Planned {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            write!(f, "planned: {}", self.entry)
        }
    }

    /// Plans the bzImage of `h` in a guest of `ram_end` bytes and checks what
    /// every plan must hold.
    fn linux(
        h: &Header,
        modules: &[Module<'_>],
        ram_end: u64,
        cmdline: &str,
        entry: LinuxEntry,
    ) -> Result<Planned, ImageError> {
        let image = bzimage(h);
        let map = map(ram_end);
        let plan = plan_guest(&image, modules, &map, cmdline, &options(entry))?;
        assert_sound(&plan, &map);
        let zero_page = match plan.entry {
            EntryState::Linux64 { rsi, .. } => rsi,
            EntryState::Linux32 { esi, .. } => u64::from(esi),
            EntryState::Multiboot { .. } => panic!("a bzImage started as Multiboot"),
        };
        let zp = read(&plan, zero_page, 4096);
        let kernel = plan
            .writes
            .iter()
            .find(|w| w.content == Content::Kernel)
            .unwrap();
        let setup = (usize::from(h.setup_sects) + 1) * 512;
        assert!(
            kernel.bytes[..] == image[setup..],
            "the protected-mode code"
        );
        assert_eq!(
            kernel.gpa,
            le(&zp, 0x214, 4),
            "code32_start is the load address"
        );
        Ok(Planned {
            zp,
            entry: plan.entry,
            memory: read(&plan, 0, ram_end as usize),
        })
    }

    fn cstr(memory: &[u8], at: u64) -> &str {
        let tail = &memory[at as usize..];
        let len = tail.iter().position(|&b| b == 0).unwrap();
        core::str::from_utf8(&tail[..len]).unwrap()
    }

    /// Walks 4-level paging in `memory` from `cr3`; `None` if not present.
    fn translate(memory: &[u8], cr3: u64, linear: u64) -> Option<u64> {
        let mut table = cr3;
        for level in (2..=4u32).rev() {
            let index = (linear >> (12 + 9 * (level - 1))) & 0x1ff;
            let entry = le(memory, (table + index * 8) as usize, 8);
            if entry & 1 == 0 {
                return None;
            }
            if level == 2 {
                assert_ne!(entry & 1 << 7, 0, "2 MiB pages");
                return Some(entry & 0x000f_ffff_ffe0_0000 | linear & 0x1f_ffff);
            }
            table = entry & 0x000f_ffff_ffff_f000;
        }
        None
    }

    /// Zero-page bytes the loader writes (the rest must be zero or the copied header).
    const WRITTEN: &[(usize, usize)] = &[
        (0x070, 8),  // acpi_rsdp_addr
        (0x0c0, 12), // ext_ramdisk_image, ext_ramdisk_size, ext_cmd_line_ptr
        (0x1e8, 1),  // e820_entries
    ];

    #[test]
    fn a_64bit_kernel_gets_boot_params_at_the_documented_offsets() {
        let h = Header::default();
        let image = bzimage(&h);
        let initrd: Vec<u8> = (0..0x10_0000u32).map(|i| (i % 253) as u8).collect();
        let cmdline = "console=ttyS0 rdinit=/init";
        let modules = [Module {
            bytes: &initrd,
            cmdline: "ignored",
        }];
        let Planned { zp, entry, memory } =
            linux(&h, &modules, 64 << 20, cmdline, LinuxEntry::Auto).unwrap();
        let EntryState::Linux64 { rip, rsi, cr3, gdt } = entry else {
            panic!("{entry:?}")
        };
        // The documented layout with the usual map.
        assert_eq!(
            (rsi, gdt.base, gdt.limit, cr3),
            (0x1000, 0x2000, 31, 0x3000)
        );
        assert_eq!(rip, 0x100_0200, "pref_address + 0x200");

        // The setup header is the image's from 0x1f1 to 0x202 + jump
        // offset, but for the fields the loader writes.
        let loader_fields = [
            (0x210, 1),  // type_of_loader
            (0x214, 4),  // code32_start
            (0x218, 8),  // ramdisk_image, ramdisk_size
            (0x226, 6),  // ext_loader_ver/type, cmd_line_ptr
            (0x230, 4),  // kernel_alignment
            (0x23c, 12), // hardware_subarch(_data)
            (0x250, 8),  // setup_data
        ];
        let header_end = 0x202 + usize::from(h.header_len);
        for at in 0x1f1..header_end {
            if !loader_fields.iter().any(|&(o, n)| (o..o + n).contains(&at)) {
                assert_eq!(zp[at], image[at], "setup header byte {at:#x}");
            }
        }
        for (at, &b) in zp.iter().enumerate() {
            let written = WRITTEN.iter().any(|&(o, n)| (o..o + n).contains(&at));
            let header = (0x1f1..header_end).contains(&at);
            let e820 = (0x2d0..0x2d0 + 3 * 20).contains(&at);
            if !(written || header || e820) {
                assert_eq!(b, 0, "zero page byte {at:#x} must be zero");
            }
        }
        assert_eq!(le(&zp, 0x1ef, 1), 0, "sentinel");
        assert_eq!(le(&zp, 0x202, 4), 0x5372_6448, "HdrS");
        assert_eq!(le(&zp, 0x206, 2), 0x020f);
        assert_eq!(le(&zp, 0x210, 1), 0xff, "type_of_loader: no assigned id");
        assert_eq!(le(&zp, 0x211, 1), 0x01, "loadflags as the kernel has them");
        assert_eq!(le(&zp, 0x230, 4), 0x20_0000, "kernel_alignment kept");
        assert_eq!(le(&zp, 0x236, 2), 0x7f, "xloadflags");
        assert_eq!(le(&zp, 0x258, 8), 0x100_0000, "pref_address");
        assert_eq!(le(&zp, 0x260, 4), 0x80_0000, "init_size");

        let cmd_line_ptr = le(&zp, 0x228, 4) | le(&zp, 0xc8, 4) << 32;
        assert_eq!(cstr(&memory, cmd_line_ptr), cmdline);
        assert_eq!(cmd_line_ptr, 0x2020, "the command line after the GDT");

        // The initrd: at the top of RAM, below initrd_addr_max.
        let ramdisk = le(&zp, 0x218, 4) | le(&zp, 0xc0, 4) << 32;
        let ramdisk_size = le(&zp, 0x21c, 4) | le(&zp, 0xc4, 4) << 32;
        assert_eq!((ramdisk, ramdisk_size), (0x3f0_0000, 0x10_0000));
        assert_eq!(&memory[0x3f0_0000..0x400_0000], &initrd[..]);
        assert_eq!(le(&zp, 0xc0, 12), 0, "everything is below 4 GiB");

        // The E820 table: the map as given.
        assert_eq!(le(&zp, 0x1e8, 1), 3);
        let expected = [
            (0, 0x9_f000, 1),
            (0x9_f000, 0x6_1000, 2),
            (0x10_0000, 0x3f0_0000, 1),
        ];
        for (i, (addr, size, kind)) in expected.into_iter().enumerate() {
            let at = 0x2d0 + 20 * i;
            assert_eq!(
                (le(&zp, at, 8), le(&zp, at + 8, 8), le(&zp, at + 16, 4)),
                (addr, size, kind),
                "e820 entry {i}"
            );
        }

        // The GDT: __BOOT_CS 64-bit code, __BOOT_DS flat data.
        let descriptor = |i: u64| le(&memory, (gdt.base + 8 * i) as usize, 8);
        assert_eq!(
            [0, 1, 2, 3].map(descriptor),
            [0, 0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff]
        );
        assert_eq!((descriptor(2) >> 40) as u32 & 0xf0ff, AR_CODE64);

        // Identity-mapped: the kernel's init_size span, the zero page, the
        // command line, the top of the first 4 GiB; nothing above.
        for linear in [
            0,
            rsi,
            cmd_line_ptr,
            rip,
            0x100_0000 + 0x80_0000 - 1,
            0xfee0_0000,
            0xffff_ffff,
        ] {
            assert_eq!(translate(&memory, cr3, linear), Some(linear), "{linear:#x}");
        }
        assert_eq!(translate(&memory, cr3, 1 << 32), None);
    }

    #[test]
    fn a_32bit_entry_has_no_page_tables_and_a_32bit_code_segment() {
        let h = Header::default();
        let image = bzimage(&h);
        let plan = plan_guest(
            &image,
            &[],
            &map(64 << 20),
            "",
            &options(LinuxEntry::Force32),
        )
        .unwrap();
        let EntryState::Linux32 { eip, esi, gdt } = plan.entry else {
            panic!("{:?}", plan.entry)
        };
        assert_eq!(
            (eip, esi),
            (0x100_0000, 0x1000),
            "32-bit entry: the load address"
        );
        assert!(plan.writes.iter().all(|w| w.content != Content::PageTables));
        let memory = read(&plan, 0, 0x10_0000);
        let zp = &memory[0x1000..0x2000];
        assert_eq!((le(zp, 0x218, 4), le(zp, 0x21c, 4)), (0, 0), "no initrd");
        assert_eq!(cstr(&memory, le(zp, 0x228, 4)), "", "an empty command line");
        assert_eq!(
            le(&memory, gdt.base as usize + 16, 8),
            0x00cf_9b00_0000_ffff,
            "__BOOT_CS: 32-bit code"
        );
        assert_eq!(
            (le(&memory, gdt.base as usize + 16, 8) >> 40) as u32 & 0xf0ff,
            AR_CODE32
        );
    }

    #[test]
    fn without_xloadflags_the_32bit_entry_is_used() {
        let h = Header {
            version: 0x020a,
            // Before 2.12 these bytes are not xloadflags: ignored.
            xloadflags: 1,
            ..Header::default()
        };
        let Planned { entry, .. } = linux(&h, &[], 64 << 20, "", LinuxEntry::Auto).unwrap();
        assert!(matches!(entry, EntryState::Linux32 { .. }), "{entry:?}");
        assert_eq!(
            linux(&h, &[], 64 << 20, "", LinuxEntry::Force64).unwrap_err(),
            ImageError::Linux(LinuxError::No64BitEntry)
        );
        let h = Header {
            xloadflags: 0x7e,
            ..Header::default()
        };
        assert_eq!(
            linux(&h, &[], 64 << 20, "", LinuxEntry::Force64).unwrap_err(),
            ImageError::Linux(LinuxError::No64BitEntry),
            "XLF_KERNEL_64 clear"
        );
    }

    #[test]
    fn a_relocatable_kernel_moves_down_when_pref_address_does_not_fit() {
        // 16 MiB + 8 MiB does not fit in 12 MiB: the lowest 2 MiB boundary from 1 MiB.
        let h = Header::default();
        let Planned { zp, entry, .. } = linux(&h, &[], 12 << 20, "", LinuxEntry::Auto).unwrap();
        assert_eq!(le(&zp, 0x214, 4), 0x20_0000);
        assert_eq!(le(&zp, 0x230, 4), 0x20_0000, "alignment unchanged");
        assert!(matches!(entry, EntryState::Linux64 { rip: 0x20_0200, .. }));

        // A 16 MiB preferred alignment does not fit in 20 MiB; 8 MiB does,
        // and the zero page says so.
        let h = Header {
            kernel_alignment: 0x100_0000,
            ..Header::default()
        };
        let Planned { zp, .. } = linux(&h, &[], 20 << 20, "", LinuxEntry::Auto).unwrap();
        assert_eq!(le(&zp, 0x214, 4), 0x80_0000);
        assert_eq!(le(&zp, 0x230, 4), 0x80_0000, "kernel_alignment lowered");

        // Not below min_alignment: 1 << 24 is the minimum here.
        let h = Header {
            kernel_alignment: 0x100_0000,
            min_alignment: 24,
            ..Header::default()
        };
        assert_eq!(
            linux(&h, &[], 20 << 20, "", LinuxEntry::Auto).unwrap_err(),
            ImageError::Linux(LinuxError::KernelDoesNotFit {
                size: 0x80_0000,
                at: None
            })
        );
    }

    #[test]
    fn a_fixed_kernel_loads_at_1mib_and_keeps_its_runtime_range() {
        let h = Header {
            relocatable: false,
            ..Header::default()
        };
        let initrd = vec![0x5a; 0x1000];
        let modules = [Module {
            bytes: &initrd,
            cmdline: "",
        }];
        let Planned { zp, entry, .. } =
            linux(&h, &modules, 64 << 20, "", LinuxEntry::Auto).unwrap();
        assert_eq!(le(&zp, 0x214, 4), 0x10_0000);
        assert!(matches!(entry, EntryState::Linux64 { rip: 0x10_0200, .. }));
        assert_eq!(le(&zp, 0x218, 4), 0x3ff_f000, "the initrd at the top");

        // 1 MiB .. pref_address + init_size must all be free RAM: the
        // initrd may not go in between even where it would fit.
        let h = Header {
            relocatable: false,
            initrd_addr_max: 0xff_ffff,
            ..h
        };
        assert_eq!(
            linux(&h, &modules, 64 << 20, "", LinuxEntry::Auto).unwrap_err(),
            ImageError::Linux(LinuxError::InitrdDoesNotFit {
                size: 0x1000,
                limit: 0x100_0000
            })
        );
        assert_eq!(
            linux(&h, &modules, 20 << 20, "", LinuxEntry::Auto).unwrap_err(),
            ImageError::Linux(LinuxError::KernelDoesNotFit {
                size: 0x80_0000,
                at: Some(0x100_0000)
            })
        );
    }

    #[test]
    fn the_initrd_respects_initrd_addr_max_and_avoids_the_kernel() {
        // Highest byte allowed: 24 MiB - 1. The kernel holds 16..24 MiB.
        let h = Header {
            initrd_addr_max: 0x17f_ffff,
            ..Header::default()
        };
        let (a, b) = (vec![1u8; 0x1001], vec![2u8; 0x800]);
        let modules = [
            Module {
                bytes: &a,
                cmdline: "",
            },
            Module {
                bytes: &b,
                cmdline: "",
            },
        ];
        let Planned { zp, memory, .. } =
            linux(&h, &modules, 64 << 20, "", LinuxEntry::Auto).unwrap();
        // Two modules, the second at the next 4-byte boundary: 0x1804 bytes.
        let (at, size) = (le(&zp, 0x218, 4), le(&zp, 0x21c, 4));
        assert_eq!(size, 0x1804);
        assert_eq!(at, 0xff_e000, "highest page-aligned fit below the kernel");
        assert_eq!(&memory[at as usize..at as usize + 0x1001], &a[..]);
        assert_eq!(&memory[at as usize + 0x1001..at as usize + 0x1004], [0; 3]);
        assert_eq!(&memory[at as usize + 0x1004..at as usize + 0x1804], &b[..]);
    }

    #[test]
    fn bad_bzimages_are_refused_with_the_reason() {
        let refused = |h: &Header, edit: &dyn Fn(&mut Vec<u8>)| {
            let mut image = bzimage(h);
            edit(&mut image);
            plan_guest(&image, &[], &map(64 << 20), "", &BootOptions::default()).unwrap_err()
        };
        let default = Header::default();
        let linux = ImageError::Linux;
        assert_eq!(
            refused(&default, &|f| f[0x202] = b'X'),
            linux(LinuxError::NoSetupHeader),
            "bad magic"
        );
        let mut no_boot_flag = bzimage(&default);
        no_boot_flag[0x1fe] = 0;
        let plan = plan_guest(
            &no_boot_flag,
            &[],
            &map(64 << 20),
            "",
            &BootOptions::default(),
        );
        assert!(
            matches!(plan.unwrap().entry, EntryState::Linux64 { .. }),
            "HdrS is enough to be taken for Linux"
        );
        let old = Header {
            version: 0x0209,
            ..Header::default()
        };
        assert_eq!(
            refused(&old, &|_| {}),
            linux(LinuxError::ProtocolTooOld(0x0209))
        );
        let zimage = Header {
            loadflags: 0,
            ..Header::default()
        };
        assert_eq!(refused(&zimage, &|_| {}), linux(LinuxError::NotBzImage));
        let file = bzimage(&default).len() as u64;
        assert_eq!(
            refused(&default, &|f| f.truncate(f.len() - 16)),
            linux(LinuxError::Truncated {
                needed: file,
                file: file - 16
            }),
            "syssize beyond the file"
        );
        assert_eq!(
            refused(&default, &|f| f[0x1f1] = 200),
            linux(LinuxError::Truncated {
                needed: 201 * 512 + 0x1_0000,
                file
            }),
            "setup_sects beyond the file"
        );
        assert_eq!(
            refused(&default, &|f| f.truncate(0x250)),
            linux(LinuxError::Truncated {
                needed: 0x26c,
                file: 0x250
            }),
            "a cut header"
        );
        assert_eq!(
            refused(&default, &|f| f[0x201] = 0xff),
            linux(LinuxError::BadSetupHeader(
                "longer than the zero page has room for"
            ))
        );
        assert_eq!(
            refused(&default, &|f| f[0x201] = 0x40),
            linux(LinuxError::BadSetupHeader(
                "shorter than protocol 2.10's header"
            ))
        );
        assert_eq!(
            refused(&default, &|f| f[0x200] = 0x90),
            linux(LinuxError::BadSetupHeader("no short jump at 0x200"))
        );
        assert_eq!(
            refused(&default, &|f| f[0x1f4..0x1f8].fill(0)),
            linux(LinuxError::BadSetupHeader("syssize is 0"))
        );
        let odd = Header {
            kernel_alignment: 0x30_0000,
            ..Header::default()
        };
        assert_eq!(
            refused(&odd, &|_| {}),
            linux(LinuxError::BadSetupHeader(
                "kernel_alignment is not a power of two"
            ))
        );
    }

    #[test]
    fn a_kernel_bigger_than_ram_is_refused() {
        let h = Header {
            init_size: 0x400_0000,
            ..Header::default()
        };
        let e = linux(&h, &[], 32 << 20, "", LinuxEntry::Auto).unwrap_err();
        assert_eq!(
            e,
            ImageError::Linux(LinuxError::KernelDoesNotFit {
                size: 0x400_0000,
                at: None
            })
        );
        assert!(std::format!("{e}").contains("0x4000000 bytes"), "{e}");
    }

    #[test]
    fn an_initrd_that_does_not_fit_is_refused() {
        // 64 MiB guest, kernel at 16..24 MiB: 40 MiB free above it, 15 MiB below.
        let h = Header::default();
        let fits = vec![0u8; 40 << 20];
        let too_big = vec![0u8; (40 << 20) + 1];
        let module = |bytes| [Module { bytes, cmdline: "" }];
        let Planned { zp, .. } = linux(&h, &module(&fits), 64 << 20, "", LinuxEntry::Auto).unwrap();
        assert_eq!(le(&zp, 0x218, 4), 0x180_0000);
        assert_eq!(
            linux(&h, &module(&too_big), 64 << 20, "", LinuxEntry::Auto).unwrap_err(),
            ImageError::Linux(LinuxError::InitrdDoesNotFit {
                size: (40 << 20) + 1,
                limit: 0x8000_0000
            })
        );
    }

    #[test]
    fn the_command_line_is_limited_by_cmdline_size() {
        let h = Header {
            cmdline_size: 16,
            ..Header::default()
        };
        let Planned { zp, memory, .. } =
            linux(&h, &[], 64 << 20, "0123456789abcdef", LinuxEntry::Auto).unwrap();
        assert_eq!(cstr(&memory, le(&zp, 0x228, 4)), "0123456789abcdef");
        assert_eq!(
            linux(&h, &[], 64 << 20, "0123456789abcdefg", LinuxEntry::Auto).unwrap_err(),
            ImageError::Linux(LinuxError::CommandLineTooLong { len: 17, max: 16 })
        );
    }

    #[test]
    fn at_most_128_map_entries_are_accepted() {
        let image = bzimage(&Header::default());
        let mut big = map(64 << 20);
        big.pop();
        // 1 MiB .. 64 MiB in 126 RAM pieces of 0x80000 bytes: 128 entries.
        big.extend((0..126u64).map(|i| MemoryRegion {
            start: 0x10_0000 + i * 0x8_0000,
            end: if i == 125 {
                64 << 20
            } else {
                0x18_0000 + i * 0x8_0000
            },
            kind: MemoryKind::Ram,
        }));
        let plan = plan_guest(&image, &[], &big, "", &BootOptions::default()).unwrap();
        assert_sound(&plan, &big);
        let zp = read(&plan, 0x1000, 4096);
        assert_eq!(le(&zp, 0x1e8, 1), 128);
        let last = 0x2d0 + 127 * 20;
        assert_eq!(
            (
                le(&zp, last, 8),
                le(&zp, last + 8, 8),
                le(&zp, last + 16, 4)
            ),
            (
                0x10_0000 + 125 * 0x8_0000,
                (64 << 20) - (0x10_0000 + 125 * 0x8_0000),
                1
            )
        );
        big.push(MemoryRegion {
            start: 64 << 20,
            end: 65 << 20,
            kind: MemoryKind::AcpiNvs,
        });
        assert_eq!(
            plan_guest(&image, &[], &big, "", &BootOptions::default()).unwrap_err(),
            ImageError::Linux(LinuxError::TooManyMapEntries(129))
        );
    }

    #[test]
    fn map_kinds_and_the_rsdp_reach_the_zero_page() {
        let image = bzimage(&Header::default());
        let mut acpi = map(64 << 20);
        acpi[1] = MemoryRegion {
            start: 0x9_f000,
            end: 0xe_0000,
            kind: MemoryKind::Reserved,
        };
        acpi.insert(
            2,
            MemoryRegion {
                start: 0xe_0000,
                end: 0x10_0000,
                kind: MemoryKind::AcpiReclaimable,
            },
        );
        let options = BootOptions {
            acpi_rsdp: Some(0xe_0000),
            ..BootOptions::default()
        };
        let plan = plan_guest(&image, &[], &acpi, "", &options).unwrap();
        let zp = read(&plan, 0x1000, 4096);
        assert_eq!(le(&zp, 0x70, 8), 0xe_0000, "acpi_rsdp_addr");
        assert_eq!(le(&zp, 0x1e8, 1), 4);
        assert_eq!(le(&zp, 0x2d0 + 2 * 20 + 16, 4), 3, "ACPI reclaimable");
    }

    #[test]
    fn multiboot_images_are_not_taken_for_linux() {
        let image = crate::loader::tests::elf(0x20_0000, 0x1000, 0x1000, 0x20_0000, None, true);
        let plan = plan_guest(&image, &[], &map(64 << 20), "", &BootOptions::default()).unwrap();
        assert!(matches!(plan.entry, EntryState::Multiboot { .. }));
    }
}
