//! Guest register state the hypervisor sets: the Multiboot entry state, and
//! the INIT/SIPI states of a processor.

use x86::vmx::vmcs::{control, guest};

use crate::vcpu::GuestRegisters;
use crate::vcpu::cr;
use crate::vmx::vmcs::Vmcs;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Segment {
    Es,
    Cs,
    Ss,
    Ds,
    Fs,
    Gs,
    Ldtr,
    Tr,
}

impl Segment {
    /// The VMCS fields of a segment: selector, base, limit, access rights.
    const fn fields(self) -> [u32; 4] {
        use guest::*;
        match self {
            Self::Es => [ES_SELECTOR, ES_BASE, ES_LIMIT, ES_ACCESS_RIGHTS],
            Self::Cs => [CS_SELECTOR, CS_BASE, CS_LIMIT, CS_ACCESS_RIGHTS],
            Self::Ss => [SS_SELECTOR, SS_BASE, SS_LIMIT, SS_ACCESS_RIGHTS],
            Self::Ds => [DS_SELECTOR, DS_BASE, DS_LIMIT, DS_ACCESS_RIGHTS],
            Self::Fs => [FS_SELECTOR, FS_BASE, FS_LIMIT, FS_ACCESS_RIGHTS],
            Self::Gs => [GS_SELECTOR, GS_BASE, GS_LIMIT, GS_ACCESS_RIGHTS],
            Self::Ldtr => [LDTR_SELECTOR, LDTR_BASE, LDTR_LIMIT, LDTR_ACCESS_RIGHTS],
            Self::Tr => [TR_SELECTOR, TR_BASE, TR_LIMIT, TR_ACCESS_RIGHTS],
        }
    }

    pub fn set(
        self,
        vmcs: &mut impl Vmcs,
        selector: u16,
        base: u64,
        limit: u32,
        access_rights: u32,
    ) {
        let [sel, b, l, ar] = self.fields();
        vmcs.write(sel, u64::from(selector));
        vmcs.write(b, base);
        vmcs.write(l, u64::from(limit));
        vmcs.write(ar, u64::from(access_rights));
    }
}

/// The segments the entry states load as data segments.
const DATA_SEGMENTS: [Segment; 5] = [
    Segment::Ds,
    Segment::Es,
    Segment::Fs,
    Segment::Gs,
    Segment::Ss,
];

/// Access rights (SDM Vol. 3C "Guest Register State"): type, S, DPL, P, D/B, G.
pub const AR_CODE32: u32 = 0xc09b;
/// 64-bit code: L set, D/B clear (SDM Vol. 3C 26.3.1.2: with L, D must be 0).
pub const AR_CODE64: u32 = 0xa09b;
pub const AR_DATA32: u32 = 0xc093;
pub const AR_CODE16: u32 = 0x9b;
pub const AR_DATA16: u32 = 0x93;
/// A busy 32-bit TSS: VM entry needs a usable TR even for real mode.
pub const AR_TSS_BUSY: u32 = 0x8b;
/// Bit 16: the segment is unusable.
pub const AR_UNUSABLE: u32 = 1 << 16;
/// Activity states.
pub const ACTIVE: u64 = 0;
pub const WAIT_FOR_SIPI: u64 = 3;
/// PAT at reset.
const PAT_RESET: u64 = 0x0007_0406_0007_0406;

/// State common to reset and Multiboot entry: no pending events, no long
/// mode, DR7 and PAT at their reset values, no VMCS link.
fn common(vmcs: &mut impl Vmcs, fixed: &cr::Fixed) {
    vmcs.write(guest::RFLAGS, 0x2);
    vmcs.write(guest::DR7, 0x400);
    vmcs.write(guest::IA32_EFER_FULL, 0);
    vmcs.write(guest::IA32_PAT_FULL, PAT_RESET);
    vmcs.write(guest::LINK_PTR_FULL, u64::MAX);
    vmcs.write(guest::ACTIVITY_STATE, ACTIVE);
    vmcs.write(guest::INTERRUPTIBILITY_STATE, 0);
    vmcs.write(guest::PENDING_DBG_EXCEPTIONS, 0);
    vmcs.write(guest::IA32_SYSENTER_CS, 0);
    vmcs.write(guest::IA32_SYSENTER_ESP, 0);
    vmcs.write(guest::IA32_SYSENTER_EIP, 0);
    vmcs.write(guest::CR3, 0);
    vmcs.write(guest::GDTR_BASE, 0);
    vmcs.write(guest::GDTR_LIMIT, 0xffff);
    vmcs.write(guest::IDTR_BASE, 0);
    vmcs.write(guest::IDTR_LIMIT, 0xffff);
    Segment::Ldtr.set(vmcs, 0, 0, 0xffff, AR_UNUSABLE);
    Segment::Tr.set(vmcs, 0, 0, 0xffff, AR_TSS_BUSY);
    cr::write_cr4(vmcs, fixed, 0);
    let entry = vmcs.read(control::VMENTRY_CONTROLS) & !cr::ENTRY_IA32E_MODE;
    vmcs.write(control::VMENTRY_CONTROLS, entry);
    vmcs.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0);
}

/// The machine state Multiboot promises at entry (Multiboot 1 spec 3.2,
/// Multiboot 2 spec 3.3): 32-bit protected mode, flat 4 GiB segments, paging
/// off, interrupts off, EAX = magic, EBX = boot information address.
pub fn multiboot_entry(
    vmcs: &mut impl Vmcs,
    regs: &mut GuestRegisters,
    fixed: &cr::Fixed,
    entry: u32,
    magic: u32,
    info: u32,
) {
    common(vmcs, fixed);
    cr::write_cr0(vmcs, fixed, cr::CR0_PE | cr::CR0_ET);
    Segment::Cs.set(vmcs, 0x08, 0, 0xffff_ffff, AR_CODE32);
    for seg in DATA_SEGMENTS {
        seg.set(vmcs, 0x10, 0, 0xffff_ffff, AR_DATA32);
    }
    vmcs.write(guest::RIP, u64::from(entry));
    vmcs.write(guest::RSP, 0);
    *regs = GuestRegisters {
        rax: u64::from(magic),
        rbx: u64::from(info),
        ..GuestRegisters::default()
    };
}

/// After INIT: the processor waits for a start-up IPI.
pub fn wait_for_sipi(vmcs: &mut impl Vmcs) {
    vmcs.write(guest::ACTIVITY_STATE, WAIT_FOR_SIPI);
}

/// A start-up IPI with `vector`: real mode at `vector << 12` (SDM Vol. 3A
/// "MP Initialization Protocol"; reset values from "Processor State After Reset").
pub fn sipi_start(vmcs: &mut impl Vmcs, regs: &mut GuestRegisters, fixed: &cr::Fixed, vector: u8) {
    common(vmcs, fixed);
    cr::write_cr0(vmcs, fixed, cr::CR0_ET | cr::CR0_CD | cr::CR0_NW);
    let base = u64::from(vector) << 12;
    Segment::Cs.set(vmcs, u16::from(vector) << 8, base, 0xffff, AR_CODE16);
    for seg in DATA_SEGMENTS {
        seg.set(vmcs, 0, 0, 0xffff, AR_DATA16);
    }
    vmcs.write(guest::RIP, 0);
    vmcs.write(guest::RSP, 0);
    *regs = GuestRegisters::default();
}
