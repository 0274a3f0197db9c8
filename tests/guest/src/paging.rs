//! The guest's own page tables (built by the shared entry code,
//! `hv-boot/src/multiboot_entry.s`): the low 4 GiB identity-mapped with
//! 2 MiB pages, write-back. Scenarios map device pages uncached and reach
//! past 4 GiB.

unsafe extern "C" {
    static mut boot_pdpt: [u64; 512];
}

/// Page-level write-through and cache disable: with the default PAT, UC.
const PWT_PCD: u64 = 1 << 3 | 1 << 4;
const ADDRESS: u64 = 0x000f_ffff_ffff_f000;

/// Maps the 2 MiB page holding `address` (below 4 GiB) uncached, as device
/// memory must be (the local APIC, the I/O APIC).
pub fn map_uncached(address: u64) {
    assert!(
        address < 1 << 32,
        "the guest maps only the low 4 GiB with 2 MiB pages"
    );
    // SAFETY: the entry code's PDPT; its first four entries point to the
    // four page directories of the low 4 GiB, identity-mapped themselves.
    // Only cacheability bits change, then the stale translation is dropped.
    unsafe {
        let pdpt = &raw const boot_pdpt;
        let pd = ((*pdpt)[(address >> 30) as usize] & ADDRESS) as *mut u64;
        let entry = pd.add(((address >> 21) & 511) as usize);
        entry.write_volatile(entry.read_volatile() | PWT_PCD);
        x86_64::instructions::tlb::flush(x86_64::VirtAddr::new(address));
    }
}

/// Maps 4..16 GiB with 1 GiB pages, so the isolation sweep can reach past 4 GiB.
pub fn map_up_to_16_gib() {
    // SAFETY: entries 4..16 of the entry code's PDPT are unused; the TLB is
    // flushed right after.
    unsafe {
        let pdpt = &raw mut boot_pdpt;
        for gib in 4..16u64 {
            (*pdpt)[gib as usize] = gib << 30 | 0x83;
        }
        x86_64::instructions::tlb::flush_all();
    }
}

/// A page-directory-pointer table of its own, for 512 GiB..1 TiB.
#[repr(C, align(4096))]
struct Table([u64; 512]);

static mut FAR_PDPT: Table = Table([0; 512]);

unsafe extern "C" {
    static mut boot_pml4: [u64; 512];
}

/// Maps 4 GiB..1 TiB with 1 GiB pages (the fuzzer's stray accesses reach
/// that far). Entries beyond the CPU's physical-address width set reserved
/// bits: an access through them is a #PF, not a guest-physical access.
pub fn map_up_to_1_tib() {
    // SAFETY: entries 4..512 of the entry code's PDPT and entry 1 of its
    // PML4 are unused (or hold these same 1 GiB mappings); the new table is
    // this module's own, identity-mapped; the TLB is flushed right after.
    unsafe {
        let pdpt = &raw mut boot_pdpt;
        for gib in 4..512u64 {
            (*pdpt)[gib as usize] = gib << 30 | 0x83;
        }
        let far = &raw mut FAR_PDPT;
        for (i, entry) in (*far).0.iter_mut().enumerate() {
            *entry = (512 + i as u64) << 30 | 0x83;
        }
        let pml4 = &raw mut boot_pml4;
        (*pml4)[1] = far as u64 | 0x3;
        x86_64::instructions::tlb::flush_all();
    }
}
