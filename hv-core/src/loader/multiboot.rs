//! Multiboot 1 and 2 guests: checks an image and plans where its bytes go
//! in guest-physical memory, places the boot modules after it, and builds
//! the Multiboot information the guest finds at entry.

use alloc::borrow::Cow;
use alloc::vec::Vec;
use core::ops::Range;

use elf::ElfBytes;
use elf::endian::AnyEndian;

use super::layout::Layout;
use super::{
    BootPlan, Content, EntryState, ImageError, MemoryKind, MemoryRegion, Module, PAGE, Placement,
};

/// Which Multiboot protocol the guest is started with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Multiboot1,
    Multiboot2,
}

impl Protocol {
    /// The value in EAX at the guest's entry.
    pub const fn magic(self) -> u32 {
        match self {
            Self::Multiboot1 => 0x2bad_b002,
            Self::Multiboot2 => 0x36d7_6289,
        }
    }
}

/// One piece of the image: `file` bytes copied to `gpa`, then `zero` bytes of zeroes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    pub gpa: u64,
    pub file: Range<usize>,
    pub zero: u64,
}

impl Piece {
    pub fn end(&self) -> u64 {
        self.gpa + self.file.len() as u64 + self.zero
    }
}

/// Where the image goes and where it starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadPlan {
    pub protocol: Protocol,
    pub entry: u32,
    pub pieces: Vec<Piece>,
}

impl LoadPlan {
    /// First byte after everything loaded.
    pub fn end(&self) -> u64 {
        self.pieces.iter().map(Piece::end).max().unwrap_or(0)
    }
}

const MB2_MAGIC: u32 = 0xe852_50d6;
const MB1_MAGIC: u32 = 0x1bad_b002;
/// Multiboot 1 flag bits a loader must understand (0..16) that we do:
/// page-aligned modules (every module is) and memory information.
const MB1_SUPPORTED_REQUIREMENTS: u32 = 0b11;
const MB1_ADDRESS_FIELDS: u32 = 1 << 16;

fn u32_at(image: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(image.get(at..at + 4)?.try_into().ok()?))
}

/// Offset of a valid Multiboot 2 header (first 32 KiB, 8-byte aligned).
fn find_mb2(image: &[u8]) -> Option<usize> {
    (0..image.len().min(32768)).step_by(8).find(|&at| {
        let field = |offset| u32_at(image, at + offset);
        match (field(0), field(4), field(8), field(12)) {
            (Some(MB2_MAGIC), Some(0), Some(len), Some(sum)) => {
                len >= 16 && MB2_MAGIC.wrapping_add(len).wrapping_add(sum) == 0
            }
            _ => false,
        }
    })
}

/// Offset of a valid Multiboot 1 header (first 8 KiB, 4-byte aligned).
fn find_mb1(image: &[u8]) -> Option<usize> {
    (0..image.len().min(8192)).step_by(4).find(|&at| {
        match (
            u32_at(image, at),
            u32_at(image, at + 4),
            u32_at(image, at + 8),
        ) {
            (Some(MB1_MAGIC), Some(flags), Some(sum)) => {
                MB1_MAGIC.wrapping_add(flags).wrapping_add(sum) == 0
            }
            _ => false,
        }
    })
}

/// Checks `image` and plans its loading into guest RAM (`ram`: byte ranges).
/// With `force_mb1` an image that has both headers is started as Multiboot 1.
pub fn plan(image: &[u8], ram: &[(u64, u64)], force_mb1: bool) -> Result<LoadPlan, ImageError> {
    let mb2 = find_mb2(image).filter(|_| !force_mb1);
    let mb1 = find_mb1(image);
    let (protocol, pieces, entry) = match (mb2, mb1) {
        (Some(_), _) => {
            let (pieces, entry) = elf_pieces(image)?;
            (Protocol::Multiboot2, pieces, entry)
        }
        (None, Some(at)) => {
            let flags = u32_at(image, at + 4).unwrap_or(0);
            let required = flags & 0xffff & !MB1_SUPPORTED_REQUIREMENTS;
            if required != 0 {
                return Err(ImageError::UnsupportedMultibootFlags(flags));
            }
            let (pieces, entry) = if flags & MB1_ADDRESS_FIELDS != 0 {
                kludge_pieces(image, at)?
            } else {
                elf_pieces(image)?
            };
            (Protocol::Multiboot1, pieces, entry)
        }
        (None, None) => return Err(ImageError::NoMultibootHeader),
    };
    if pieces.is_empty() {
        return Err(ImageError::NothingToLoad);
    }
    for (i, p) in pieces.iter().enumerate() {
        if !ram
            .iter()
            .any(|&(start, end)| start <= p.gpa && p.end() <= end)
        {
            return Err(ImageError::OutsideRam {
                start: p.gpa,
                end: p.end(),
            });
        }
        if let Some(q) = pieces[..i]
            .iter()
            .find(|q| q.gpa < p.end() && p.gpa < q.end())
        {
            return Err(ImageError::Overlap {
                first: (q.gpa, q.end()),
                second: (p.gpa, p.end()),
            });
        }
    }
    let entry_ok = entry < 1 << 32 && pieces.iter().any(|p| p.gpa <= entry && entry < p.end());
    if !entry_ok {
        return Err(ImageError::BadEntry(entry));
    }
    Ok(LoadPlan {
        protocol,
        entry: entry as u32,
        pieces,
    })
}

/// The PT_LOAD segments of an x86 ELF executable, by physical address.
fn elf_pieces(image: &[u8]) -> Result<(Vec<Piece>, u64), ImageError> {
    let file = ElfBytes::<AnyEndian>::minimal_parse(image).map_err(|_| {
        if image.starts_with(b"\x7fELF") {
            ImageError::MalformedElf
        } else {
            ImageError::NotElf
        }
    })?;
    let header = &file.ehdr;
    if !matches!(header.e_machine, elf::abi::EM_X86_64 | elf::abi::EM_386) {
        return Err(ImageError::UnsupportedElf("not an x86 image"));
    }
    if header.e_type != elf::abi::ET_EXEC {
        return Err(ImageError::UnsupportedElf("not an executable (ET_EXEC)"));
    }
    let segments = file
        .segments()
        .ok_or(ImageError::UnsupportedElf("no program headers"))?;
    let mut pieces = Vec::new();
    for ph in segments
        .iter()
        .filter(|ph| ph.p_type == elf::abi::PT_LOAD && ph.p_memsz > 0)
    {
        if ph.p_filesz > ph.p_memsz {
            return Err(ImageError::UnsupportedElf(
                "a segment's file size exceeds its memory size",
            ));
        }
        let truncated = ImageError::Truncated {
            offset: ph.p_offset,
            size: ph.p_filesz,
            file: image.len() as u64,
        };
        let file_end = ph
            .p_offset
            .checked_add(ph.p_filesz)
            .ok_or(truncated.clone())?;
        if file_end > image.len() as u64 {
            return Err(truncated);
        }
        ph.p_paddr
            .checked_add(ph.p_memsz)
            .ok_or(ImageError::OutsideRam {
                start: ph.p_paddr,
                end: u64::MAX,
            })?;
        pieces
            .try_reserve(1)
            .map_err(|_| ImageError::UnsupportedElf("too many segments"))?;
        pieces.push(Piece {
            gpa: ph.p_paddr,
            file: ph.p_offset as usize..file_end as usize,
            zero: ph.p_memsz - ph.p_filesz,
        });
    }
    Ok((pieces, header.e_entry))
}

/// Multiboot 1 "a.out kludge": the header's address fields say where the
/// file goes (Multiboot spec 3.1.3).
fn kludge_pieces(image: &[u8], at: usize) -> Result<(Vec<Piece>, u64), ImageError> {
    let field = |i: usize| {
        u32_at(image, at + 12 + 4 * i)
            .map(u64::from)
            .ok_or(ImageError::BadAddressFields)
    };
    let (header_addr, load_addr, load_end, bss_end, entry) =
        (field(0)?, field(1)?, field(2)?, field(3)?, field(4)?);
    // The file byte at offset `at` is loaded at `header_addr`.
    let skip = header_addr
        .checked_sub(load_addr)
        .ok_or(ImageError::BadAddressFields)?;
    let file_start = (at as u64)
        .checked_sub(skip)
        .ok_or(ImageError::BadAddressFields)?;
    let file_len = if load_end == 0 {
        image.len() as u64 - file_start
    } else {
        load_end
            .checked_sub(load_addr)
            .ok_or(ImageError::BadAddressFields)?
    };
    let file_end = file_start + file_len;
    if file_end > image.len() as u64 {
        return Err(ImageError::Truncated {
            offset: file_start,
            size: file_len,
            file: image.len() as u64,
        });
    }
    let zero = if bss_end == 0 {
        0
    } else {
        bss_end
            .checked_sub(load_addr + file_len)
            .ok_or(ImageError::BadAddressFields)?
    };
    let piece = Piece {
        gpa: load_addr,
        file: file_start as usize..file_end as usize,
        zero,
    };
    Ok((alloc::vec![piece], entry))
}

/// Whether the image has a Multiboot 1 or 2 header.
pub(super) fn has_header(image: &[u8]) -> bool {
    find_mb2(image).is_some() || find_mb1(image).is_some()
}

/// Plans a Multiboot guest: the image's pieces, then the boot information
/// and the modules, page-aligned, in the first free RAM after the image and
/// below 4 GiB (the info's address and module fields are 32-bit).
pub(super) fn plan_boot<'a>(
    image: &'a [u8],
    modules: &[Module<'a>],
    map: &[MemoryRegion],
    mut layout: Layout,
    cmdline: &str,
    force_mb1: bool,
) -> Result<BootPlan<'a>, ImageError> {
    let load = plan(image, layout.ram(), force_mb1)?;
    let mut writes = Vec::new();
    for piece in &load.pieces {
        layout.take(piece.gpa, piece.end());
        writes.push(Placement {
            gpa: piece.gpa,
            bytes: Cow::Borrowed(&image[piece.file.clone()]),
            zeroed: piece.zero,
            content: Content::Image,
        });
    }
    let after = load
        .end()
        .checked_next_multiple_of(PAGE)
        .unwrap_or(u64::MAX);
    // The information's size does not depend on the addresses in it.
    let mut records: Vec<ModuleRecord<'_>> = modules
        .iter()
        .map(|m| ModuleRecord {
            start: 0,
            end: 0,
            cmdline: m.cmdline,
        })
        .collect();
    let info_len = info(load.protocol, 0, cmdline, map, &records).len();
    let info_at = layout.place(Content::BootInformation, after, info_len as u64, PAGE)?;
    for (i, (module, record)) in modules.iter().zip(&mut records).enumerate() {
        let size = module.bytes.len() as u64;
        let at = layout.place(Content::Module(i), after, size, PAGE)?;
        // Below LIMIT_32, so both fit in 32 bits.
        (record.start, record.end) = (at as u32, (at + size) as u32);
        writes.push(Placement {
            gpa: at,
            bytes: Cow::Borrowed(module.bytes),
            zeroed: 0,
            content: Content::Module(i),
        });
    }
    let info_at = info_at as u32;
    writes.push(Placement {
        gpa: u64::from(info_at),
        bytes: Cow::Owned(info(load.protocol, info_at, cmdline, map, &records)),
        zeroed: 0,
        content: Content::BootInformation,
    });
    Ok(BootPlan {
        writes,
        entry: EntryState::Multiboot {
            eip: load.entry,
            eax: load.protocol.magic(),
            ebx: info_at,
        },
    })
}

/// A module as the Multiboot information lists it.
#[derive(Clone, Copy, Debug)]
struct ModuleRecord<'a> {
    start: u32,
    /// Exclusive, as GRUB gives it.
    end: u32,
    cmdline: &'a str,
}

fn info(
    protocol: Protocol,
    base: u32,
    cmdline: &str,
    map: &[MemoryRegion],
    modules: &[ModuleRecord<'_>],
) -> Vec<u8> {
    match protocol {
        Protocol::Multiboot1 => mb1_info(base, cmdline, map, modules),
        Protocol::Multiboot2 => mb2_info(cmdline, map, modules),
    }
}

/// A region of the guest's memory map, as Multiboot types it (1 = RAM, 2 =
/// reserved). Kept for `guest.rs`; [`MemoryRegion`] has every kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub end: u64,
    pub available: bool,
}

fn regions(map: &[MapEntry]) -> Vec<MemoryRegion> {
    map.iter().map(|&e| e.into()).collect()
}

/// `mem_lower`/`mem_upper` in KiB: RAM below 640 KiB and contiguous RAM from 1 MiB.
fn basic_memory(map: &[MemoryRegion]) -> (u32, u32) {
    let ram_from = |at: u64| {
        map.iter()
            .find(|e| e.kind == MemoryKind::Ram && e.start <= at && at < e.end)
            .map(|e| e.end - at)
    };
    let lower = ram_from(0).unwrap_or(0).min(640 << 10) >> 10;
    let upper = ram_from(1 << 20).unwrap_or(0) >> 10;
    (lower as u32, upper.min(u64::from(u32::MAX)) as u32)
}

/// Multiboot 2 boot information without modules (see [`mb2_info`]).
pub fn multiboot2_info(cmdline: &str, map: &[MapEntry]) -> Vec<u8> {
    mb2_info(cmdline, &regions(map), &[])
}

/// Multiboot 2 boot information (Multiboot 2 spec 3.6): command line,
/// loader name, modules, basic memory information and memory map. Position
/// independent (place it 8-byte aligned). Written by hand like the Multiboot
/// 1 record: the `multiboot2` crate builds it only with an allocator feature
/// that would force one on every kernel linking the crate (the test guest).
fn mb2_info(cmdline: &str, map: &[MemoryRegion], modules: &[ModuleRecord<'_>]) -> Vec<u8> {
    const CMDLINE: u32 = 1;
    const LOADER_NAME: u32 = 2;
    const MODULE: u32 = 3;
    const BASIC_MEMINFO: u32 = 4;
    const MMAP: u32 = 6;
    const END: u32 = 0;
    let mut out = alloc::vec![0u8; 8];
    let tag = |out: &mut Vec<u8>, typ: u32, body: &[u8]| {
        out.extend_from_slice(&typ.to_le_bytes());
        out.extend_from_slice(&(8 + body.len() as u32).to_le_bytes());
        out.extend_from_slice(body);
        out.resize(out.len().next_multiple_of(8), 0);
    };
    let string = |s: &str| {
        let mut v = Vec::from(s.as_bytes());
        v.push(0);
        v
    };
    tag(&mut out, CMDLINE, &string(cmdline));
    tag(&mut out, LOADER_NAME, &string("hv"));
    for m in modules {
        let mut body = Vec::from(m.start.to_le_bytes());
        body.extend_from_slice(&m.end.to_le_bytes());
        body.extend_from_slice(&string(m.cmdline));
        tag(&mut out, MODULE, &body);
    }
    let (lower, upper) = basic_memory(map);
    let mut meminfo = Vec::from(lower.to_le_bytes());
    meminfo.extend_from_slice(&upper.to_le_bytes());
    tag(&mut out, BASIC_MEMINFO, &meminfo);
    // entry_size 24, entry_version 0, then (base, length, type, reserved) entries.
    let mut mmap = Vec::from(24u32.to_le_bytes());
    mmap.extend_from_slice(&0u32.to_le_bytes());
    for e in map {
        mmap.extend_from_slice(&e.start.to_le_bytes());
        mmap.extend_from_slice(&(e.end - e.start).to_le_bytes());
        mmap.extend_from_slice(&e.kind.e820_type().to_le_bytes());
        mmap.extend_from_slice(&0u32.to_le_bytes());
    }
    tag(&mut out, MMAP, &mmap);
    tag(&mut out, END, &[]);
    let total = out.len() as u32;
    out[..4].copy_from_slice(&total.to_le_bytes());
    out
}

/// Bytes [`multiboot1_info`] produces for this command line and map.
pub fn multiboot1_info_len(cmdline: &str, map: &[MapEntry]) -> usize {
    multiboot1_info(0, cmdline, map).len()
}

/// Multiboot 1 boot information without modules (see [`mb1_info`]).
pub fn multiboot1_info(base: u32, cmdline: &str, map: &[MapEntry]) -> Vec<u8> {
    mb1_info(base, cmdline, &regions(map), &[])
}

/// Multiboot 1 boot information placed at guest-physical `base`, which the
/// caller keeps low enough that the whole record fits in 32 bits: the info
/// structure, then the memory map, the module list, the command line, the
/// loader name and the module command lines (all pointers absolute).
/// Written by hand: it is a fixed 88-byte record, and the `multiboot` crate
/// can only build it through an allocator of its own.
fn mb1_info(
    base: u32,
    cmdline: &str,
    map: &[MemoryRegion],
    modules: &[ModuleRecord<'_>],
) -> Vec<u8> {
    const INFO_SIZE: usize = 88;
    const MODULE_SIZE: usize = 16;
    const FLAG_MEMORY: u32 = 1 << 0;
    const FLAG_CMDLINE: u32 = 1 << 2;
    const FLAG_MODS: u32 = 1 << 3;
    const FLAG_MMAP: u32 = 1 << 6;
    const FLAG_LOADER_NAME: u32 = 1 << 9;
    let mut out = alloc::vec![0u8; INFO_SIZE];
    let mmap_at = INFO_SIZE;
    for e in map {
        out.extend_from_slice(&20u32.to_le_bytes());
        out.extend_from_slice(&e.start.to_le_bytes());
        out.extend_from_slice(&(e.end - e.start).to_le_bytes());
        out.extend_from_slice(&e.kind.e820_type().to_le_bytes());
    }
    let mmap_len = out.len() - mmap_at;
    let mods_at = out.len();
    out.resize(mods_at + MODULE_SIZE * modules.len(), 0);
    let put = |out: &mut Vec<u8>, offset: usize, value: u32| {
        out[offset..offset + 4].copy_from_slice(&value.to_le_bytes())
    };
    let string = |out: &mut Vec<u8>, s: &str| {
        let at = base + out.len() as u32;
        out.extend_from_slice(s.as_bytes());
        out.push(0);
        at
    };
    let cmdline_ptr = string(&mut out, cmdline);
    let name_ptr = string(&mut out, "hv");
    for (i, m) in modules.iter().enumerate() {
        let entry = mods_at + i * MODULE_SIZE;
        let string_ptr = string(&mut out, m.cmdline);
        put(&mut out, entry, m.start);
        put(&mut out, entry + 4, m.end);
        put(&mut out, entry + 8, string_ptr);
    }
    let (lower, upper) = basic_memory(map);
    let mut flags = FLAG_MEMORY | FLAG_CMDLINE | FLAG_MMAP | FLAG_LOADER_NAME;
    if !modules.is_empty() {
        flags |= FLAG_MODS;
        put(&mut out, 20, modules.len() as u32);
        put(&mut out, 24, base + mods_at as u32);
    }
    put(&mut out, 0, flags);
    put(&mut out, 4, lower);
    put(&mut out, 8, upper);
    put(&mut out, 16, cmdline_ptr);
    put(&mut out, 44, mmap_len as u32);
    put(&mut out, 48, base + mmap_at as u32);
    put(&mut out, 64, name_ptr);
    out
}

#[cfg(test)]
pub(crate) mod tests {
    extern crate std;
    use std::vec;

    use super::*;

    const RAM: &[(u64, u64)] = &[(0, 0x9f000), (0x10_0000, 0x400_0000)];

    /// A minimal ELF64 executable with one PT_LOAD segment and a Multiboot
    /// header (v1 and/or v2) in its first bytes.
    pub(crate) fn elf(
        paddr: u64,
        filesz: u64,
        memsz: u64,
        entry: u64,
        mb1: Option<u32>,
        mb2: bool,
    ) -> std::vec::Vec<u8> {
        let mut f = vec![0u8; 0x1000];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // 64-bit
        f[5] = 1; // little endian
        f[6] = 1;
        f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&entry.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        f[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
        f[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
        f[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
        let ph = 64;
        f[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        f[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes()); // R+X
        f[ph + 8..ph + 16].copy_from_slice(&0x1000u64.to_le_bytes()); // offset
        f[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes());
        f[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
        f[ph + 32..ph + 40].copy_from_slice(&filesz.to_le_bytes());
        f[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
        let mut body = vec![0u8; filesz as usize];
        if mb2 {
            let words = [MB2_MAGIC, 0, 16, 0u32.wrapping_sub(MB2_MAGIC + 16)];
            for (i, w) in words.iter().enumerate() {
                body[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
            }
        }
        if let Some(flags) = mb1 {
            let words = [
                MB1_MAGIC,
                flags,
                0u32.wrapping_sub(MB1_MAGIC.wrapping_add(flags)),
            ];
            for (i, w) in words.iter().enumerate() {
                body[16 + i * 4..16 + i * 4 + 4].copy_from_slice(&w.to_le_bytes());
            }
        }
        f.extend_from_slice(&body);
        f
    }

    #[test]
    fn multiboot2_elf_is_planned_by_segments() {
        let image = elf(0x20_0000, 0x2000, 0x5000, 0x20_0040, Some(0), true);
        let plan = plan(&image, RAM, false).unwrap();
        assert_eq!(plan.protocol, Protocol::Multiboot2);
        assert_eq!(plan.entry, 0x20_0040);
        assert_eq!(
            plan.pieces,
            [Piece {
                gpa: 0x20_0000,
                file: 0x1000..0x3000,
                zero: 0x3000
            }]
        );
        assert_eq!(plan.end(), 0x20_5000);
        // Forced to Multiboot 1, the same image uses its v1 header.
        assert_eq!(
            super::plan(&image, RAM, true).unwrap().protocol,
            Protocol::Multiboot1
        );
    }

    #[test]
    fn bad_images_are_refused_with_the_reason() {
        let no_header = elf(0x20_0000, 0x1000, 0x1000, 0x20_0000, None, false);
        assert_eq!(
            plan(&no_header, RAM, false),
            Err(ImageError::NoMultibootHeader)
        );
        assert_eq!(
            plan(b"not an elf file at all", RAM, false),
            Err(ImageError::NoMultibootHeader)
        );
        let mut not_elf = elf(0x20_0000, 0x1000, 0x1000, 0x20_0000, None, true);
        not_elf[0] = b'X';
        assert_eq!(plan(&not_elf, RAM, false), Err(ImageError::NotElf));
        let mut cut_headers = elf(0x20_0000, 0x1000, 0x1000, 0x20_0000, None, true);
        cut_headers[56..58].copy_from_slice(&0x100u16.to_le_bytes()); // 256 headers: past the end of the file
        assert_eq!(
            plan(&cut_headers, RAM, false),
            Err(ImageError::MalformedElf)
        );
        let outside = elf(0x3ff_f000, 0x1000, 0x2000, 0x3ff_f000, None, true);
        assert_eq!(
            plan(&outside, RAM, false),
            Err(ImageError::OutsideRam {
                start: 0x3ff_f000,
                end: 0x400_1000
            })
        );
        let in_hole = elf(0xa_0000, 0x1000, 0x1000, 0xa_0000, None, true);
        assert!(matches!(
            plan(&in_hole, RAM, false),
            Err(ImageError::OutsideRam { .. })
        ));
        let bad_entry = elf(0x20_0000, 0x1000, 0x1000, 0x90_0000, None, true);
        assert_eq!(
            plan(&bad_entry, RAM, false),
            Err(ImageError::BadEntry(0x90_0000))
        );
        let mut truncated = elf(0x20_0000, 0x2000, 0x2000, 0x20_0000, None, true);
        truncated.truncate(0x2800);
        assert!(matches!(
            plan(&truncated, RAM, false),
            Err(ImageError::Truncated { .. })
        ));
        let video = elf(0x20_0000, 0x1000, 0x1000, 0x20_0000, Some(0b100), false);
        assert_eq!(
            plan(&video, RAM, false),
            Err(ImageError::UnsupportedMultibootFlags(0b100))
        );
    }

    #[test]
    fn overlapping_segments_are_refused() {
        let mut image = elf(0x20_0000, 0x2000, 0x2000, 0x20_0000, None, true);
        // Duplicate the program header as a second, overlapping segment.
        image[56..58].copy_from_slice(&2u16.to_le_bytes());
        let ph: std::vec::Vec<u8> = image[64..120].to_vec();
        image[120..176].copy_from_slice(&ph);
        image[120 + 16..120 + 24].copy_from_slice(&0x20_1000u64.to_le_bytes());
        assert!(matches!(
            plan(&image, RAM, false),
            Err(ImageError::Overlap { .. })
        ));
    }

    #[test]
    fn multiboot1_address_fields_place_the_file() {
        // Header at file offset 0x1010, says the header is at 0x20_0010 and the
        // image loads from 0x20_0000: file offset 0x1000 goes to 0x20_0000.
        let mut image = elf(0x20_0000, 0x100, 0x100, 0x20_0000, None, false);
        let flags = MB1_ADDRESS_FIELDS | 0b10;
        let fields = [
            MB1_MAGIC,
            flags,
            0u32.wrapping_sub(MB1_MAGIC.wrapping_add(flags)),
            0x20_0010,
            0x20_0000,
            0x20_0100,
            0x20_3000,
            0x20_0020,
        ];
        for (i, w) in fields.iter().enumerate() {
            image[0x1010 + i * 4..0x1014 + i * 4].copy_from_slice(&w.to_le_bytes());
        }
        let plan = plan(&image, RAM, false).unwrap();
        assert_eq!(plan.protocol, Protocol::Multiboot1);
        assert_eq!(plan.entry, 0x20_0020);
        assert_eq!(
            plan.pieces,
            [Piece {
                gpa: 0x20_0000,
                file: 0x1000..0x1100,
                zero: 0x2f00
            }]
        );
    }

    fn map() -> [MapEntry; 3] {
        [
            MapEntry {
                start: 0,
                end: 0x9f000,
                available: true,
            },
            MapEntry {
                start: 0x9f000,
                end: 0x10_0000,
                available: false,
            },
            MapEntry {
                start: 0x10_0000,
                end: 0x400_0000,
                available: true,
            },
        ]
    }

    #[test]
    fn multiboot2_info_parses_back() {
        let bytes = multiboot2_info("scenario=basic", &map());
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        for (i, b) in bytes.iter().enumerate() {
            words[i / 8] |= u64::from(*b) << (8 * (i % 8));
        }
        // SAFETY: an aligned, live copy of the structure.
        let info = unsafe { multiboot2::BootInformation::load(words.as_ptr().cast()) }.unwrap();
        assert_eq!(
            info.command_line_tag().unwrap().cmdline(),
            Ok("scenario=basic")
        );
        let areas = info.memory_map_tag().unwrap().memory_areas();
        assert_eq!(areas.len(), 3);
        assert_eq!(areas[2].start_address(), 0x10_0000);
        assert_eq!(
            info.basic_memory_info_tag().unwrap().memory_upper(),
            (0x400_0000 - 0x10_0000) / 1024
        );
    }

    /// Guest memory for the `multiboot` crate's parser: `bytes` at `base`.
    struct Guest<'a>(u64, &'a [u8]);

    impl multiboot::information::MemoryManagement for Guest<'_> {
        unsafe fn paddr_to_slice(&self, addr: u64, len: usize) -> Option<&'static [u8]> {
            let at = usize::try_from(addr.checked_sub(self.0)?).ok()?;
            let slice = self.1.get(at..at + len)?;
            // SAFETY: the test's buffer outlives every use of the parsed info.
            Some(unsafe { core::slice::from_raw_parts(slice.as_ptr(), len) })
        }
        unsafe fn allocate(&mut self, _: usize) -> Option<(u64, &mut [u8])> {
            None
        }
        unsafe fn deallocate(&mut self, _: u64) {}
    }

    /// Parses Multiboot 2 information from an 8-byte aligned copy.
    fn with_mb2_info(bytes: &[u8], check: impl FnOnce(&multiboot2::BootInformation<'_>)) {
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        for (i, b) in bytes.iter().enumerate() {
            words[i / 8] |= u64::from(*b) << (8 * (i % 8));
        }
        // SAFETY: an aligned, live copy of the structure.
        let info = unsafe { multiboot2::BootInformation::load(words.as_ptr().cast()) }.unwrap();
        check(&info);
    }

    #[test]
    fn multiboot1_info_parses_back() {
        let base = 0x30_0000;
        let bytes = multiboot1_info(base, "scenario=msr", &map());
        let mut guest = Guest(u64::from(base), &bytes);
        // SAFETY: the translation only hands out slices of `bytes`.
        let info =
            unsafe { multiboot::information::Multiboot::from_ptr(u64::from(base), &mut guest) }
                .unwrap();
        assert_eq!(info.command_line(), Some("scenario=msr"));
        assert_eq!(info.boot_loader_name(), Some("hv"));
        assert_eq!(info.lower_memory_bound(), Some(0x9f000 / 1024));
        assert!(!info.has_modules(), "no modules, no flag");
        let regions: std::vec::Vec<_> = info.memory_regions().unwrap().collect();
        assert_eq!(regions.len(), 3);
        assert_eq!(regions[2].base_address(), 0x10_0000);
        assert_eq!(regions[2].length(), 0x3f0_0000);
    }

    use crate::loader::tests::{assert_sound, map as regions_of, read};
    use crate::loader::{BootOptions, plan_guest};

    fn two_modules<'a>(a: &'a [u8], b: &'a [u8]) -> [Module<'a>; 2] {
        [
            Module {
                bytes: a,
                cmdline: "initrd.img",
            },
            Module {
                bytes: b,
                cmdline: "config debug=1",
            },
        ]
    }

    /// Plans `image` with modules `a` and `b` in a 64 MiB guest: the
    /// Multiboot entry state and the guest's first 3 MiB.
    fn with_two_modules(image: &[u8], a: &[u8], b: &[u8]) -> (u32, u32, u32, std::vec::Vec<u8>) {
        let map = regions_of(64 << 20);
        let modules = two_modules(a, b);
        let options = BootOptions::default();
        let plan = plan_guest(image, &modules, &map, "scenario=modules", &options).unwrap();
        assert_sound(&plan, &map);
        let EntryState::Multiboot { eip, eax, ebx } = plan.entry else {
            panic!("{:?}", plan.entry)
        };
        (eip, eax, ebx, read(&plan, 0, 0x30_0000))
    }

    #[test]
    fn multiboot1_guests_get_their_modules() {
        let image = elf(0x20_0000, 0x2000, 0x5000, 0x20_0040, Some(0), false);
        let (a, b) = (vec![0xa5u8; 0x1800], b"x=1".to_vec());
        let (eip, eax, ebx, memory) = with_two_modules(&image, &a, &b);
        assert_eq!((eip, eax), (0x20_0040, 0x2bad_b002));
        assert_eq!(ebx, 0x20_5000, "the information right after the image");
        let mut guest = Guest(0, &memory);
        // SAFETY: the translation only hands out slices of `memory`.
        let info =
            unsafe { multiboot::information::Multiboot::from_ptr(u64::from(ebx), &mut guest) }
                .unwrap();
        assert_eq!(info.command_line(), Some("scenario=modules"));
        let modules: std::vec::Vec<_> = info.modules().unwrap().collect();
        assert_eq!(modules.len(), 2);
        // Page-aligned, after the information, in order.
        assert_eq!((modules[0].start, modules[0].end), (0x20_6000, 0x20_7800));
        assert_eq!((modules[1].start, modules[1].end), (0x20_8000, 0x20_8003));
        assert_eq!(modules[0].string, Some("initrd.img"));
        assert_eq!(modules[1].string, Some("config debug=1"));
        assert_eq!(&memory[0x20_6000..0x20_7800], &a[..]);
        assert_eq!(&memory[0x20_8000..0x20_8003], b"x=1");
        assert_eq!(info.memory_regions().unwrap().count(), 3);
    }

    #[test]
    fn multiboot2_guests_get_their_modules() {
        let image = elf(0x20_0000, 0x2000, 0x5000, 0x20_0040, None, true);
        let (a, b) = (vec![0x5au8; 0x2000], vec![7u8; 1]);
        let (_, eax, ebx, memory) = with_two_modules(&image, &a, &b);
        assert_eq!((eax, ebx), (0x36d7_6289, 0x20_5000));
        let total = u32_at(&memory, ebx as usize).unwrap() as usize;
        with_mb2_info(&memory[ebx as usize..ebx as usize + total], |info| {
            let modules: std::vec::Vec<_> = info.module_tags().collect();
            assert_eq!(modules.len(), 2);
            let range = |m: &multiboot2::ModuleTag| (m.start_address(), m.end_address());
            assert_eq!(range(modules[0]), (0x20_6000, 0x20_8000));
            assert_eq!(range(modules[1]), (0x20_8000, 0x20_8001));
            assert_eq!(modules[0].cmdline(), Ok("initrd.img"));
            assert_eq!(modules[1].cmdline(), Ok("config debug=1"));
            assert_eq!(
                info.command_line_tag().unwrap().cmdline(),
                Ok("scenario=modules")
            );
            assert_eq!(info.memory_map_tag().unwrap().memory_areas().len(), 3);
        });
        assert_eq!(&memory[0x20_6000..0x20_8000], &a[..]);
        assert_eq!(memory[0x20_8000], 7);
    }

    #[test]
    fn without_modules_the_plan_matches_the_old_layout() {
        // What guest.rs writes today: the information at the first page after the image.
        let image = elf(0x20_0000, 0x2000, 0x5000, 0x20_0040, Some(0), true);
        let old_map = map();
        let new_map: std::vec::Vec<MemoryRegion> = old_map.iter().map(|&e| e.into()).collect();
        for (force_mb1, expected) in [
            (false, multiboot2_info("a b", &old_map)),
            (true, multiboot1_info(0x20_5000, "a b", &old_map)),
        ] {
            let options = BootOptions {
                force_multiboot1: force_mb1,
                ..BootOptions::default()
            };
            let plan = plan_guest(&image, &[], &new_map, "a b", &options).unwrap();
            let info = plan
                .writes
                .iter()
                .find(|w| w.content == Content::BootInformation)
                .unwrap();
            assert_eq!(info.gpa, 0x20_5000);
            assert_eq!(info.bytes[..], expected[..]);
            assert_eq!(multiboot1_info_len("a b", &old_map), 88 + 24 * 3 + 4 + 3);
        }
    }

    #[test]
    fn modules_that_do_not_fit_are_refused() {
        let image = elf(0x20_0000, 0x2000, 0x5000, 0x20_0040, None, true);
        let big = vec![0u8; 0x20_0000];
        let module = [Module {
            bytes: &big,
            cmdline: "",
        }];
        // A 4 MiB guest: 0x20_6000..0x40_0000 is free, less than 2 MiB.
        assert_eq!(
            plan_guest(
                &image,
                &module,
                &regions_of(4 << 20),
                "",
                &BootOptions::default()
            )
            .unwrap_err(),
            ImageError::NoRoom {
                what: Content::Module(0),
                size: 0x20_0000
            }
        );
        // RAM above 4 GiB does not help: the module fields are 32-bit.
        let mut high = regions_of(0x20_6000);
        high.push(MemoryRegion {
            start: 1 << 32,
            end: 2 << 32,
            kind: MemoryKind::Ram,
        });
        let small = [Module {
            bytes: &big[..0x1000],
            cmdline: "",
        }];
        assert_eq!(
            plan_guest(&image, &small, &high, "", &BootOptions::default()).unwrap_err(),
            ImageError::NoRoom {
                what: Content::Module(0),
                size: 0x1000
            }
        );
        // Even the information needs room.
        assert_eq!(
            plan_guest(
                &image,
                &[],
                &regions_of(0x20_5000),
                "",
                &BootOptions::default()
            )
            .unwrap_err(),
            ImageError::NoRoom {
                what: Content::BootInformation,
                size: multiboot2_info("", &map()).len() as u64
            }
        );
    }
}
