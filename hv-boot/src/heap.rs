//! The hypervisor's heap: a linked-list allocator over contiguous frames.

use linked_list_allocator::LockedHeap;

use crate::memory;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

/// Heap size: enough for the VMX and altp2m bookkeeping of a few guests.
pub const HEAP_FRAMES: u64 = 2048;

pub fn init() -> Result<(), &'static str> {
    let first = memory::alloc_frames(HEAP_FRAMES, 1).ok_or("no room for the heap")?;
    let start = first * hv_boot::PAGE_SIZE;
    // SAFETY: the frames are ours alone from now on (taken from the allocator and
    // never returned), identity-mapped and writable.
    unsafe {
        HEAP.lock().init(
            start as *mut u8,
            (HEAP_FRAMES * hv_boot::PAGE_SIZE) as usize,
        )
    };
    log::info!("heap: {} KiB at {:#x}", HEAP_FRAMES * 4, start);
    Ok(())
}
