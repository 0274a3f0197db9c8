//! Physical memory: the frame allocator seeded from the boot memory map, and
//! the direct map (physical address == virtual address) of all RAM.

use hv_boot::PAGE_SIZE;
use hv_boot::bootinfo::{BootInfo, RegionKind};
use hv_boot::frames::{FrameAllocator, bitmap_words, find_free_run};
use log::{info, warn};
use spin::Mutex;
use x86_64::structures::paging::{PageTable, PageTableFlags};

pub use hv_boot::frames::Frame;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// The boot trampoline maps this much; `extend_direct_map` maps the rest.
const BOOT_MAPPED: u64 = 4 * GIB;
/// One PDPT (the boot one, under PML4 entry 0) covers 512 GiB.
const DIRECT_MAP_LIMIT: u64 = 512 * GIB;
/// The BIOS area and real-mode structures stay untouched.
const LOW_MEMORY_END: u64 = MIB;

unsafe extern "C" {
    static __image_start: u8;
    static __rodata_end: u8;
    static __image_end: u8;
    static boot_pml4: u8;
    static boot_pdpt: u8;
}

/// The boot page tables: PML4, PDPT and four page directories, contiguous.
const BOOT_TABLES_SIZE: usize = 6 * 4096;

pub static FRAMES: Mutex<Option<FrameAllocator<'static>>> = Mutex::new(None);

/// The hypervisor image's physical range (identity-placed by the linker script).
pub fn image_range() -> (u64, u64) {
    (
        &raw const __image_start as u64,
        &raw const __image_end as u64,
    )
}

/// A checksum (FNV-1a) of what no guest may ever change: the hypervisor's
/// code and read-only data, and its page tables (without the accessed and
/// dirty bits, which the CPU sets as the hypervisor runs).
pub fn isolation_checksum() -> u64 {
    const ACCESSED_DIRTY: u64 = 0b11 << 5;
    let code_start = &raw const __image_start;
    let code_len = &raw const __rodata_end as usize - code_start as usize;
    // SAFETY: both ranges are parts of the loaded image, mapped and readable;
    // they are only read (the tables as aligned 64-bit entries).
    let (code, tables) = unsafe {
        (
            core::slice::from_raw_parts(code_start, code_len),
            core::slice::from_raw_parts((&raw const boot_pml4).cast::<u64>(), BOOT_TABLES_SIZE / 8),
        )
    };
    let entries = tables
        .iter()
        .flat_map(|e| (e & !ACCESSED_DIRTY).to_le_bytes());
    code.iter()
        .copied()
        .chain(entries)
        .fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        })
}

/// Seeds the frame allocator from the memory map, keeping the low megabyte,
/// the hypervisor image, the boot modules and the allocator's bitmap out of it,
/// then maps any RAM above 4 GiB into the direct map.
pub fn init(boot: &BootInfo) -> Result<(), &'static str> {
    let ram_end = boot.ram_end().min(DIRECT_MAP_LIMIT);
    if boot.ram_end() > DIRECT_MAP_LIMIT {
        warn!(
            "memory: RAM above {} GiB is not used",
            DIRECT_MAP_LIMIT / GIB
        );
    }
    let frames = ram_end / PAGE_SIZE;
    let bitmap_bytes = bitmap_words(frames) as u64 * 8;

    let mut reserved: heapless::Vec<(u64, u64), { hv_boot::bootinfo::MAX_MODULES + 1 }> =
        heapless::Vec::new();
    let _ = reserved.push(image_range());
    for module in &boot.modules {
        let _ = reserved.push((module.start, module.end));
    }
    let mut available: heapless::Vec<(u64, u64), { hv_boot::bootinfo::MAX_REGIONS }> =
        heapless::Vec::new();
    for region in boot
        .regions
        .iter()
        .filter(|r| r.kind == RegionKind::Available)
    {
        let _ = available.push((region.start, region.end));
    }
    let bitmap_at = find_free_run(
        &available,
        &reserved,
        bitmap_bytes,
        LOW_MEMORY_END,
        BOOT_MAPPED,
    )
    .ok_or("no room below 4 GiB for the frame bitmap")?;
    // SAFETY: `bitmap_at..+bitmap_bytes` is available RAM, identity-mapped by the
    // boot page tables (below 4 GiB), outside the image and the modules, and it
    // is reserved in the allocator below so nothing else ever gets it.
    let bitmap =
        unsafe { core::slice::from_raw_parts_mut(bitmap_at as *mut u64, bitmap_words(frames)) };
    let mut allocator = FrameAllocator::new(bitmap, frames);
    let page_in = |a: u64| a.div_ceil(PAGE_SIZE);
    let page_out = |a: u64| a / PAGE_SIZE;
    for &(start, end) in &available {
        allocator.add_free(page_in(start), page_out(end));
    }
    // Anything the map also lists as non-RAM wins over an overlapping RAM entry.
    for region in boot
        .regions
        .iter()
        .filter(|r| r.kind != RegionKind::Available)
    {
        allocator.reserve(page_out(region.start), page_in(region.end));
    }
    allocator.reserve(0, page_in(LOW_MEMORY_END));
    for &(start, end) in reserved
        .iter()
        .chain([(bitmap_at, bitmap_at + bitmap_bytes)].iter())
    {
        allocator.reserve(page_out(start), page_in(end));
    }
    info!(
        "memory: {} MiB of RAM below {:#x}, {} frames free; bitmap at {:#x} ({} KiB)",
        available.iter().map(|(s, e)| e - s).sum::<u64>() / MIB,
        ram_end,
        allocator.free_frames(),
        bitmap_at,
        bitmap_bytes.div_ceil(1024),
    );
    *FRAMES.lock() = Some(allocator);
    extend_direct_map(ram_end)
}

/// Allocates one frame.
pub fn alloc_frame() -> Option<Frame> {
    FRAMES.lock().as_mut()?.alloc()
}

/// Allocates `count` contiguous frames aligned to `align` frames.
pub fn alloc_frames(count: u64, align: u64) -> Option<Frame> {
    FRAMES.lock().as_mut()?.alloc_contiguous(count, align)
}

/// Returns one frame; a double free is reported, never applied.
pub fn free_frame(frame: Frame) {
    if let Some(Err(e)) = FRAMES.lock().as_mut().map(|a| a.free(frame)) {
        log::error!("memory: refused free of frame {frame:#x}: {e:?}");
    }
}

/// Returns `count` frames from `first`; a double free is reported, never applied.
pub fn free_frames_run(first: Frame, count: u64) {
    if let Some(Err(e)) = FRAMES
        .lock()
        .as_mut()
        .map(|a| a.free_contiguous(first, count))
    {
        log::error!("memory: refused free of frames {first:#x}+{count}: {e:?}");
    }
}

pub fn free_frames() -> u64 {
    FRAMES.lock().as_ref().map_or(0, |a| a.free_frames())
}

/// Maps `BOOT_MAPPED..ram_end` into the direct map: 1 GiB pages when the CPU
/// has them, else 2 MiB pages in newly allocated page directories.
fn extend_direct_map(ram_end: u64) -> Result<(), &'static str> {
    if ram_end <= BOOT_MAPPED {
        return Ok(());
    }
    let huge = raw_cpuid::CpuId::new()
        .get_extended_processor_and_feature_identifiers()
        .is_some_and(|f| f.has_1gib_pages());
    // SAFETY: `boot_pdpt` is the PDPT the trampoline built under PML4 entry 0;
    // nothing else holds a reference to it once Rust runs on this one CPU.
    let pdpt = unsafe { &mut *(&raw const boot_pdpt as *mut PageTable) };
    let flags = PageTableFlags::PRESENT | PageTableFlags::WRITABLE;
    for gib in BOOT_MAPPED / GIB..ram_end.div_ceil(GIB) {
        let base = gib * GIB;
        if huge {
            pdpt[gib as usize].set_addr(
                x86_64::PhysAddr::new(base),
                flags | PageTableFlags::HUGE_PAGE,
            );
            continue;
        }
        let pd_frame = alloc_frame().ok_or("out of frames while extending the direct map")?;
        // Frames above 4 GiB are not mapped yet; the allocator hands out low frames first.
        if pd_frame * PAGE_SIZE >= BOOT_MAPPED {
            return Err("page directory frame above the boot map");
        }
        // SAFETY: a fresh frame, exclusively ours, identity-mapped (checked above).
        let pd = unsafe { &mut *((pd_frame * PAGE_SIZE) as *mut PageTable) };
        for (i, entry) in pd.iter_mut().enumerate() {
            let addr = x86_64::PhysAddr::new(base + i as u64 * 2 * MIB);
            entry.set_addr(addr, flags | PageTableFlags::HUGE_PAGE);
        }
        pdpt[gib as usize].set_addr(x86_64::PhysAddr::new(pd_frame * PAGE_SIZE), flags);
    }
    x86_64::instructions::tlb::flush_all();
    info!(
        "memory: direct map extended to {:#x} with {} pages",
        ram_end,
        if huge { "1 GiB" } else { "2 MiB" }
    );
    Ok(())
}
