//! Guest register state the hypervisor sets: the Multiboot and Linux entry
//! states, and the INIT/SIPI states of a processor.

use x86::vmx::vmcs::{control, guest};

use crate::loader::{EntryState, Gdtr};
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
pub const HLT: u64 = 1;
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

/// After INIT: the processor waits for a start-up IPI, with nothing of
/// its past blocking or pending (an interrupt shadow, a debug exception;
/// "blocking by SMI", which VM entry refuses outside SMM, and which Bochs
/// reports at the INIT exit of a vCPU that left wait-for-SIPI).
pub fn wait_for_sipi(vmcs: &mut impl Vmcs) {
    vmcs.write(guest::ACTIVITY_STATE, WAIT_FOR_SIPI);
    vmcs.write(guest::INTERRUPTIBILITY_STATE, 0);
    vmcs.write(guest::PENDING_DBG_EXCEPTIONS, 0);
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

/// The Linux 32-bit boot protocol's entry state (boot.rst "32-bit Boot
/// Protocol"): protected mode, paging off, interrupts off, the boot GDT
/// loaded, CS = __BOOT_CS and DS/ES/SS (and FS/GS) = __BOOT_DS, flat; ESI =
/// the zero page, EBP/EDI/EBX = 0.
pub fn linux32_entry(
    vmcs: &mut impl Vmcs,
    regs: &mut GuestRegisters,
    fixed: &cr::Fixed,
    eip: u32,
    zero_page: u32,
    gdt: Gdtr,
) {
    common(vmcs, fixed);
    cr::write_cr0(vmcs, fixed, cr::CR0_PE | cr::CR0_ET);
    linux_segments(vmcs, AR_CODE32, gdt);
    vmcs.write(guest::RIP, u64::from(eip));
    *regs = GuestRegisters {
        rsi: u64::from(zero_page),
        ..GuestRegisters::default()
    };
}

/// The Linux 64-bit boot protocol's entry state (boot.rst "64-bit Boot
/// Protocol"): IA-32e mode on the identity tables at `cr3` (CR0.PE|PG,
/// CR4.PAE, EFER.LME|LMA and the "IA-32e mode guest" entry control, which
/// SDM Vol. 3C 26.3.1 requires to agree), CS a 64-bit code segment
/// (__BOOT_CS), __BOOT_DS data, RSI = the zero page.
pub fn linux64_entry(
    vmcs: &mut impl Vmcs,
    regs: &mut GuestRegisters,
    fixed: &cr::Fixed,
    rip: u64,
    zero_page: u64,
    cr3: u64,
    gdt: Gdtr,
) {
    common(vmcs, fixed);
    cr::write_cr4(vmcs, fixed, cr::CR4_PAE);
    cr::write_cr0(vmcs, fixed, cr::CR0_PE | cr::CR0_ET | cr::CR0_PG);
    vmcs.write(guest::IA32_EFER_FULL, cr::EFER_LME | cr::EFER_LMA);
    let entry = vmcs.read(control::VMENTRY_CONTROLS) | cr::ENTRY_IA32E_MODE;
    vmcs.write(control::VMENTRY_CONTROLS, entry);
    vmcs.write(guest::CR3, cr3);
    linux_segments(vmcs, AR_CODE64, gdt);
    vmcs.write(guest::RIP, rip);
    *regs = GuestRegisters {
        rsi: zero_page,
        ..GuestRegisters::default()
    };
}

/// The boot GDT and the segments both Linux entries load from it.
fn linux_segments(vmcs: &mut impl Vmcs, code_rights: u32, gdt: Gdtr) {
    use crate::loader::{BOOT_CS, BOOT_DS};
    vmcs.write(guest::GDTR_BASE, gdt.base);
    vmcs.write(guest::GDTR_LIMIT, u64::from(gdt.limit));
    Segment::Cs.set(vmcs, BOOT_CS, 0, 0xffff_ffff, code_rights);
    for seg in DATA_SEGMENTS {
        seg.set(vmcs, BOOT_DS, 0, 0xffff_ffff, AR_DATA32);
    }
    vmcs.write(guest::RSP, 0);
}

/// Sets the entry state a boot plan asks for.
pub fn boot_entry(
    vmcs: &mut impl Vmcs,
    regs: &mut GuestRegisters,
    fixed: &cr::Fixed,
    entry: &EntryState,
) {
    match *entry {
        EntryState::Multiboot { eip, eax, ebx } => {
            multiboot_entry(vmcs, regs, fixed, eip, eax, ebx)
        }
        EntryState::Linux32 { eip, esi, gdt } => linux32_entry(vmcs, regs, fixed, eip, esi, gdt),
        EntryState::Linux64 { rip, rsi, cr3, gdt } => {
            linux64_entry(vmcs, regs, fixed, rip, rsi, cr3, gdt)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vcpu::cr::tests::BOCHS;
    use crate::vmx::vmcs::tests::FakeVmcs;

    const TYPE: u64 = 0xf;
    const S: u64 = 1 << 4;
    const PRESENT: u64 = 1 << 7;
    const LONG: u64 = 1 << 13;
    const DB: u64 = 1 << 14;
    const GRANULAR: u64 = 1 << 15;

    /// The checks of SDM Vol. 3C 26.3.1 ("Checks on the Guest State Area")
    /// that the entry states can get wrong, for a VMCS whose controls load
    /// EFER, with unrestricted guest. Returns the first rule broken.
    fn entry_checks(vmcs: &FakeVmcs, fixed: &cr::Fixed) -> Result<(), &'static str> {
        let cr0 = vmcs.read(guest::CR0);
        let cr4 = vmcs.read(guest::CR4);
        let efer = vmcs.read(guest::IA32_EFER_FULL);
        let ia32e = vmcs.read(control::VMENTRY_CONTROLS) & cr::ENTRY_IA32E_MODE != 0;
        // 26.3.1.1 control registers and MSRs.
        let ones = fixed.cr0_fixed0 & !(cr::CR0_PE | cr::CR0_PG);
        if cr0 & ones != ones || cr0 & !fixed.cr0_fixed1 & 0xffff_ffff != 0 {
            return Err("CR0 fixed bits");
        }
        if cr4 & fixed.cr4_fixed0 != fixed.cr4_fixed0 || cr4 & !fixed.cr4_fixed1 != 0 {
            return Err("CR4 fixed bits");
        }
        if cr0 & cr::CR0_PG != 0 && cr0 & cr::CR0_PE == 0 {
            return Err("CR0.PG without CR0.PE");
        }
        if ia32e && (cr0 & cr::CR0_PG == 0 || cr4 & cr::CR4_PAE == 0) {
            return Err("IA-32e mode guest without CR0.PG and CR4.PAE");
        }
        if (efer & cr::EFER_LMA != 0) != ia32e {
            return Err("EFER.LMA differs from the IA-32e mode guest control");
        }
        if cr0 & cr::CR0_PG != 0 && (efer & cr::EFER_LME != 0) != (efer & cr::EFER_LMA != 0) {
            return Err("EFER.LME differs from EFER.LMA with paging on");
        }
        if vmcs.read(guest::CR3) >> 46 != 0 {
            return Err("CR3 beyond the physical-address width");
        }
        // 26.3.1.2 segment registers.
        let ar = |f| vmcs.read(f);
        let cs = ar(guest::CS_ACCESS_RIGHTS);
        if !matches!(cs & TYPE, 9 | 11 | 13 | 15) || cs & (S | PRESENT) != S | PRESENT {
            return Err("CS: not a present, accessed code segment");
        }
        if ia32e && cs & LONG != 0 && cs & DB != 0 {
            return Err("CS with both L and D/B");
        }
        if vmcs.read(guest::SS_SELECTOR) & 3 != vmcs.read(guest::CS_SELECTOR) & 3 {
            return Err("SS.RPL differs from CS.RPL");
        }
        for seg in DATA_SEGMENTS.into_iter().chain([Segment::Cs]) {
            let [_, _, limit, rights] = seg.fields();
            let (limit, rights) = (vmcs.read(limit), vmcs.read(rights));
            if rights & u64::from(AR_UNUSABLE) != 0 {
                continue;
            }
            if rights & 1 == 0 || rights & (S | PRESENT) != S | PRESENT {
                return Err("a usable segment not present and accessed");
            }
            if seg == Segment::Ss && !matches!(rights & TYPE, 3 | 7) {
                return Err("SS: not a writable data segment");
            }
            let granular = rights & GRANULAR != 0;
            if (limit & 0xfff != 0xfff && granular) || (limit >> 20 != 0 && !granular) {
                return Err("a segment limit that its granularity cannot express");
            }
        }
        let tr = ar(guest::TR_ACCESS_RIGHTS);
        let tr_ok = if ia32e {
            tr & TYPE == 11
        } else {
            matches!(tr & TYPE, 3 | 11)
        };
        if !tr_ok || tr & u64::from(AR_UNUSABLE) != 0 || tr & PRESENT == 0 {
            return Err("TR: not a present busy TSS of the right width");
        }
        // 26.3.1.3 descriptor tables and 26.3.1.4 RIP and RFLAGS.
        if vmcs.read(guest::GDTR_LIMIT) > 0xffff || vmcs.read(guest::IDTR_LIMIT) > 0xffff {
            return Err("GDTR or IDTR limit beyond 16 bits");
        }
        if !(ia32e && cs & LONG != 0) && vmcs.read(guest::RIP) >> 32 != 0 {
            return Err("RIP above 4 GiB outside 64-bit mode");
        }
        if vmcs.read(guest::RFLAGS) & 0x2 == 0 {
            return Err("RFLAGS bit 1 clear");
        }
        Ok(())
    }

    const GDT: Gdtr = Gdtr {
        base: 0x2000,
        limit: 31,
    };

    fn linux64(vmcs: &mut FakeVmcs, regs: &mut GuestRegisters) {
        linux64_entry(vmcs, regs, &BOCHS, 0x100_0200, 0x1000, 0x3000, GDT);
    }

    #[test]
    fn the_64bit_linux_entry_is_long_mode_on_the_given_tables() {
        let (mut vmcs, mut regs) = (FakeVmcs::default(), GuestRegisters::default());
        regs.rbx = 5;
        linux64(&mut vmcs, &mut regs);
        assert_eq!(entry_checks(&vmcs, &BOCHS), Ok(()));
        assert_eq!(cr::guest_cr0(&vmcs), cr::CR0_PE | cr::CR0_ET | cr::CR0_PG);
        assert_eq!(cr::guest_cr4(&vmcs), cr::CR4_PAE);
        assert_eq!(
            vmcs.read(guest::IA32_EFER_FULL),
            cr::EFER_LME | cr::EFER_LMA
        );
        assert!(crate::vcpu::events::in_64bit_mode(&vmcs));
        assert_eq!(vmcs.read(guest::CR3), 0x3000);
        assert_eq!(vmcs.read(guest::RIP), 0x100_0200);
        assert_eq!(
            (vmcs.read(guest::GDTR_BASE), vmcs.read(guest::GDTR_LIMIT)),
            (0x2000, 31)
        );
        assert_eq!(vmcs.read(guest::CS_SELECTOR), 0x10);
        assert_eq!(vmcs.read(guest::CS_ACCESS_RIGHTS), u64::from(AR_CODE64));
        for seg in [guest::DS_SELECTOR, guest::ES_SELECTOR, guest::SS_SELECTOR] {
            assert_eq!(vmcs.read(seg), 0x18);
        }
        assert_eq!(vmcs.read(guest::RFLAGS) & 1 << 9, 0, "interrupts off");
        assert_eq!(
            regs,
            GuestRegisters {
                rsi: 0x1000,
                ..GuestRegisters::default()
            }
        );
    }

    #[test]
    fn the_32bit_linux_entry_is_flat_protected_mode() {
        let (mut vmcs, mut regs) = (FakeVmcs::default(), GuestRegisters::default());
        // After a 64-bit entry, so that nothing of long mode may survive.
        linux64(&mut vmcs, &mut regs);
        regs.rdi = 1;
        linux32_entry(&mut vmcs, &mut regs, &BOCHS, 0x100_0000, 0x1000, GDT);
        assert_eq!(entry_checks(&vmcs, &BOCHS), Ok(()));
        assert_eq!(cr::guest_cr0(&vmcs), cr::CR0_PE | cr::CR0_ET);
        assert_eq!(cr::guest_cr4(&vmcs), 0);
        assert_eq!(vmcs.read(guest::IA32_EFER_FULL), 0);
        assert_eq!(
            vmcs.read(control::VMENTRY_CONTROLS) & cr::ENTRY_IA32E_MODE,
            0
        );
        assert_eq!(vmcs.read(guest::CS_SELECTOR), 0x10);
        assert_eq!(vmcs.read(guest::CS_ACCESS_RIGHTS), u64::from(AR_CODE32));
        assert_eq!(vmcs.read(guest::SS_SELECTOR), 0x18);
        assert_eq!(vmcs.read(guest::RIP), 0x100_0000);
        assert_eq!(vmcs.read(guest::GDTR_BASE), 0x2000);
        assert_eq!(
            regs,
            GuestRegisters {
                rsi: 0x1000,
                ..GuestRegisters::default()
            },
            "ESI = boot_params, EBP/EDI/EBX zero"
        );
    }

    #[test]
    fn every_entry_state_passes_the_entry_checks() {
        let (mut vmcs, mut regs) = (FakeVmcs::default(), GuestRegisters::default());
        let entries = [
            EntryState::Linux64 {
                rip: 0x20_0200,
                rsi: 0x1000,
                cr3: 0x3000,
                gdt: GDT,
            },
            EntryState::Multiboot {
                eip: 0x20_0040,
                eax: 0x2bad_b002,
                ebx: 0x20_5000,
            },
            EntryState::Linux32 {
                eip: 0x20_0000,
                esi: 0x1000,
                gdt: GDT,
            },
        ];
        for entry in &entries {
            boot_entry(&mut vmcs, &mut regs, &BOCHS, entry);
            assert_eq!(entry_checks(&vmcs, &BOCHS), Ok(()), "{entry:?}");
        }
        assert_eq!(regs.rsi, 0x1000);
        boot_entry(&mut vmcs, &mut regs, &BOCHS, &entries[1]);
        assert_eq!((regs.rax, regs.rbx, regs.rsi), (0x2bad_b002, 0x20_5000, 0));
        sipi_start(&mut vmcs, &mut regs, &BOCHS, 0x9f);
        assert_eq!(entry_checks(&vmcs, &BOCHS), Ok(()));
    }

    #[test]
    fn the_entry_checks_catch_broken_states() {
        let (mut vmcs, mut regs) = (FakeVmcs::default(), GuestRegisters::default());
        linux64(&mut vmcs, &mut regs);
        vmcs.write(guest::IA32_EFER_FULL, cr::EFER_LME);
        assert_eq!(
            entry_checks(&vmcs, &BOCHS),
            Err("EFER.LMA differs from the IA-32e mode guest control")
        );
        linux64(&mut vmcs, &mut regs);
        vmcs.write(guest::CS_ACCESS_RIGHTS, u64::from(AR_CODE64) | DB);
        assert_eq!(entry_checks(&vmcs, &BOCHS), Err("CS with both L and D/B"));
        linux64(&mut vmcs, &mut regs);
        cr::write_cr4(&mut vmcs, &BOCHS, 0);
        assert_eq!(
            entry_checks(&vmcs, &BOCHS),
            Err("IA-32e mode guest without CR0.PG and CR4.PAE")
        );
        linux32_entry(&mut vmcs, &mut regs, &BOCHS, 0, 0x1000, GDT);
        vmcs.write(guest::RIP, 1 << 32);
        assert_eq!(
            entry_checks(&vmcs, &BOCHS),
            Err("RIP above 4 GiB outside 64-bit mode")
        );
    }
}
