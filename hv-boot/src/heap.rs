//! The hypervisor's heap: a linked-list allocator over contiguous frames,
//! with the guest's share bounded. While a guest runs, every allocation is
//! made for it (exit handling, its views, the control channel it is
//! inspected through), so the guest may hold at most its quota of heap
//! (`guest.heap=`) beyond what was in use when it started: an allocation
//! past it fails like an exhausted heap (hv-core's guest-reachable paths
//! are fallible and answer ENOMEM), and the rest of the heap stays the
//! hypervisor's, for the stop report and the teardown.

use core::alloc::{GlobalAlloc, Layout};
use core::sync::atomic::{AtomicUsize, Ordering};

use linked_list_allocator::LockedHeap;

use crate::memory;

/// The heap, with the bytes in use counted.
struct Accounted {
    heap: LockedHeap,
    in_use: AtomicUsize,
    /// `in_use` may not grow past this (usize::MAX: no guest runs).
    limit: AtomicUsize,
    peak: AtomicUsize,
}

#[global_allocator]
static HEAP: Accounted = Accounted {
    heap: LockedHeap::empty(),
    in_use: AtomicUsize::new(0),
    limit: AtomicUsize::new(usize::MAX),
    peak: AtomicUsize::new(0),
};

// SAFETY: allocation and deallocation are the linked-list heap's; the
// counters only decide whether to ask it, and are kept exact.
unsafe impl GlobalAlloc for Accounted {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let size = layout.size();
        let before = self.in_use.fetch_add(size, Ordering::Relaxed);
        if before.saturating_add(size) > self.limit.load(Ordering::Relaxed) {
            self.in_use.fetch_sub(size, Ordering::Relaxed);
            return core::ptr::null_mut();
        }
        // SAFETY: forwarded from the caller.
        let ptr = unsafe { self.heap.alloc(layout) };
        if ptr.is_null() {
            self.in_use.fetch_sub(size, Ordering::Relaxed);
        } else {
            self.peak.fetch_max(before + size, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded from the caller.
        unsafe { self.heap.dealloc(ptr, layout) };
        self.in_use.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

/// Heap size: the hypervisor's bookkeeping and a guest's share.
pub const HEAP_FRAMES: u64 = 2048;

pub fn init() -> Result<(), &'static str> {
    let first = memory::alloc_frames(HEAP_FRAMES, 1).ok_or("no room for the heap")?;
    let start = first * hv_boot::PAGE_SIZE;
    // SAFETY: the frames are ours alone from now on (taken from the allocator and
    // never returned), identity-mapped and writable.
    unsafe {
        HEAP.heap.lock().init(
            start as *mut u8,
            (HEAP_FRAMES * hv_boot::PAGE_SIZE) as usize,
        )
    };
    log::info!("heap: {} KiB at {:#x}", HEAP_FRAMES * 4, start);
    Ok(())
}

/// From now on the heap in use may grow by at most `quota` bytes (a guest
/// starts); returns the bytes in use now.
pub fn limit_guest(quota: usize) -> usize {
    let now = HEAP.in_use.load(Ordering::Relaxed);
    HEAP.peak.store(now, Ordering::Relaxed);
    HEAP.limit
        .store(now.saturating_add(quota), Ordering::Relaxed);
    now
}

/// The guest is gone: no limit; returns the most in use meanwhile.
pub fn unlimit() -> usize {
    HEAP.limit.store(usize::MAX, Ordering::Relaxed);
    HEAP.peak.load(Ordering::Relaxed)
}
