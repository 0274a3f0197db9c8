//! Guest linear -> guest-physical translation by walking the guest's own
//! page tables (4-level IA-32e paging), for exits that report only a linear
//! address (a breakpoint's RIP). Paging off is the identity; legacy 32-bit
//! and PAE paging are not walked (`None`).

use x86::vmx::vmcs::guest;

use crate::platform::Platform;
use crate::vcpu::cr::{self, CR0_PG, EFER_LMA};
use crate::vm::Vm;
use crate::vmx::vmcs::Vmcs;

const PRESENT: u64 = 1;
const PAGE_SIZE_BIT: u64 = 1 << 7;
const ADDRESS: u64 = 0x000f_ffff_ffff_f000;

/// The guest-physical address of `linear` under the vCPU's current paging.
pub fn translate(vmcs: &impl Vmcs, vm: &Vm, platform: &impl Platform, linear: u64) -> Option<u64> {
    if cr::guest_cr0(vmcs) & CR0_PG == 0 {
        return Some(linear);
    }
    if vmcs.read(guest::IA32_EFER_FULL) & EFER_LMA == 0 {
        return None;
    }
    let mut table = vmcs.read(guest::CR3) & ADDRESS;
    for level in (1..=4u32).rev() {
        let index = (linear >> (12 + 9 * (level - 1))) & 0x1ff;
        let mut entry = [0u8; 8];
        vm.read(platform, table + index * 8, &mut entry).ok()?;
        let entry = u64::from_le_bytes(entry);
        if entry & PRESENT == 0 {
            return None;
        }
        let page_bits = 12 + 9 * (level - 1);
        if level == 1 || (level <= 3 && entry & PAGE_SIZE_BIT != 0) {
            let base = entry & ADDRESS & !((1u64 << page_bits) - 1);
            return Some(base | linear & ((1u64 << page_bits) - 1));
        }
        table = entry & ADDRESS;
    }
    None
}
