//! A stopped vCPU's registers for the tool: read from its VMCS and the
//! registers the hypervisor saved, checked, written back. Control
//! registers are the guest's view of them (read shadows); writing them
//! goes through the same helpers as the guest's own MOVs, so the bits the
//! hypervisor pins stay pinned.

use hv_control::{Registers, Segment};
use x86::vmx::vmcs::{control, guest};

use crate::vcpu::GuestRegisters;
use crate::vcpu::cr::{self, CR0_PE, CR0_PG, CR4_PAE, CR4_VMXE, EFER_LMA, EFER_LME, Fixed};
use crate::vcpu::events::GUEST_VPID;
use crate::vmx::Cpu;

/// ES, CS, SS, DS, FS, GS: selector, base, limit, access-rights fields.
const SEGMENTS: [[u32; 4]; 6] = [
    [
        guest::ES_SELECTOR,
        guest::ES_BASE,
        guest::ES_LIMIT,
        guest::ES_ACCESS_RIGHTS,
    ],
    [
        guest::CS_SELECTOR,
        guest::CS_BASE,
        guest::CS_LIMIT,
        guest::CS_ACCESS_RIGHTS,
    ],
    [
        guest::SS_SELECTOR,
        guest::SS_BASE,
        guest::SS_LIMIT,
        guest::SS_ACCESS_RIGHTS,
    ],
    [
        guest::DS_SELECTOR,
        guest::DS_BASE,
        guest::DS_LIMIT,
        guest::DS_ACCESS_RIGHTS,
    ],
    [
        guest::FS_SELECTOR,
        guest::FS_BASE,
        guest::FS_LIMIT,
        guest::FS_ACCESS_RIGHTS,
    ],
    [
        guest::GS_SELECTOR,
        guest::GS_BASE,
        guest::GS_LIMIT,
        guest::GS_ACCESS_RIGHTS,
    ],
];
/// Access rights: reserved bits 11:8 and 31:17 (bit 16 is "unusable").
const AR_RESERVED: u32 = 0xfffe_0f00;
const AR_LONG: u32 = 1 << 13;
const AR_DB: u32 = 1 << 14;
const CS: usize = 1;
/// RFLAGS: bit 1 is always 1; these are always 0.
const RFLAGS_FIXED1: u64 = 1 << 1;
const RFLAGS_RESERVED: u64 = !0x003f_7fd7;
const RFLAGS_VM: u64 = 1 << 17;
/// EFER bits a guest may have: SCE, LME, LMA, NXE.
const EFER_KNOWN: u64 = 1 | EFER_LME | EFER_LMA | 1 << 11;
const CR0_CD: u64 = 1 << 30;
const CR0_NW: u64 = 1 << 29;

/// The vCPU's registers as the guest sees them.
pub fn read(cpu: &impl Cpu, gprs: &GuestRegisters) -> Registers {
    let g = gprs;
    let segments = SEGMENTS.map(|[sel, base, limit, ar]| Segment {
        selector: cpu.read(sel) as u16,
        base: cpu.read(base),
        limit: cpu.read(limit) as u32,
        access: cpu.read(ar) as u32,
    });
    Registers {
        gprs: [
            g.rax,
            g.rcx,
            g.rdx,
            g.rbx,
            cpu.read(guest::RSP),
            g.rbp,
            g.rsi,
            g.rdi,
            g.r8,
            g.r9,
            g.r10,
            g.r11,
            g.r12,
            g.r13,
            g.r14,
            g.r15,
        ],
        rip: cpu.read(guest::RIP),
        rflags: cpu.read(guest::RFLAGS),
        cr0: cr::guest_cr0(cpu),
        cr2: cpu.read_cr2(),
        cr3: cpu.read(guest::CR3),
        cr4: cr::guest_cr4(cpu),
        dr7: cpu.read(guest::DR7),
        efer: cpu.read(guest::IA32_EFER_FULL),
        kernel_gs_base: cpu.kernel_gs_base(),
        gdtr_base: cpu.read(guest::GDTR_BASE),
        gdtr_limit: cpu.read(guest::GDTR_LIMIT) as u16,
        idtr_base: cpu.read(guest::IDTR_BASE),
        idtr_limit: cpu.read(guest::IDTR_LIMIT) as u16,
        segments,
    }
}

/// Why a register set is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused(pub &'static str);

fn canonical(address: u64) -> bool {
    let top = (address as i64) >> 47;
    top == 0 || top == -1
}

/// Checks what VM entry (or the guest's next instruction) would refuse:
/// reserved and fixed bits of the control registers, EFER and RFLAGS,
/// long mode's consistency, segment access rights, canonical bases.
/// Nothing is written when this fails.
pub fn check(regs: &Registers, fixed: &Fixed, paddr_bits: u8) -> Result<(), Refused> {
    let long = regs.efer & EFER_LMA != 0;
    let rule = |ok: bool, why: &'static str| if ok { Ok(()) } else { Err(Refused(why)) };
    rule(regs.cr0 >> 32 == 0, "CR0 bits 63:32")?;
    rule(
        regs.cr0 & CR0_PG == 0 || regs.cr0 & CR0_PE != 0,
        "CR0.PG without CR0.PE",
    )?;
    rule(
        regs.cr0 & CR0_NW == 0 || regs.cr0 & CR0_CD != 0,
        "CR0.NW without CR0.CD",
    )?;
    rule(regs.cr4 & CR4_VMXE == 0, "CR4.VMXE")?;
    rule(
        regs.cr4 & !(fixed.cr4_fixed1 | fixed.cr4_fixed0) == 0,
        "CR4 bits this CPU does not have",
    )?;
    rule(
        regs.cr3 >> paddr_bits.min(63) == 0,
        "CR3 beyond physical addresses",
    )?;
    rule(regs.efer & !EFER_KNOWN == 0, "EFER reserved bits")?;
    rule(
        long == (regs.efer & EFER_LME != 0 && regs.cr0 & CR0_PG != 0),
        "EFER.LMA must be EFER.LME with paging",
    )?;
    rule(
        !long || regs.cr4 & CR4_PAE != 0,
        "long mode without CR4.PAE",
    )?;
    rule(
        regs.rflags & RFLAGS_FIXED1 != 0 && regs.rflags & RFLAGS_RESERVED == 0,
        "RFLAGS reserved bits",
    )?;
    rule(
        !long || regs.rflags & RFLAGS_VM == 0,
        "RFLAGS.VM in long mode",
    )?;
    rule(regs.dr7 >> 32 == 0, "DR7 bits 63:32")?;
    for s in &regs.segments {
        rule(
            s.access & AR_RESERVED == 0,
            "segment access-rights reserved bits",
        )?;
        rule(canonical(s.base), "a non-canonical segment base")?;
    }
    let cs = regs.segments[CS].access;
    rule(
        cs & AR_LONG == 0 || cs & AR_DB == 0,
        "CS with both L and D/B",
    )?;
    let code64 = long && cs & AR_LONG != 0;
    rule(
        if code64 {
            canonical(regs.rip)
        } else {
            regs.rip >> 32 == 0
        },
        "RIP outside its mode's addresses",
    )?;
    rule(
        canonical(regs.gdtr_base) && canonical(regs.idtr_base),
        "a non-canonical descriptor-table base",
    )?;
    rule(
        canonical(regs.kernel_gs_base),
        "a non-canonical KERNEL_GS_BASE",
    )?;
    Ok(())
}

/// Writes checked registers ([`check`]) into the vCPU; its cached linear
/// translations are dropped (paging may have changed).
pub fn write(cpu: &mut impl Cpu, gprs: &mut GuestRegisters, fixed: &Fixed, regs: &Registers) {
    let r = &regs.gprs;
    *gprs = GuestRegisters {
        rax: r[0],
        rcx: r[1],
        rdx: r[2],
        rbx: r[3],
        rbp: r[5],
        rsi: r[6],
        rdi: r[7],
        r8: r[8],
        r9: r[9],
        r10: r[10],
        r11: r[11],
        r12: r[12],
        r13: r[13],
        r14: r[14],
        r15: r[15],
    };
    cpu.write(guest::RSP, r[4]);
    cpu.write(guest::RIP, regs.rip);
    cpu.write(guest::RFLAGS, regs.rflags);
    cr::write_cr0(cpu, fixed, regs.cr0);
    cr::write_cr4(cpu, fixed, regs.cr4);
    cpu.write_cr2(regs.cr2);
    cpu.write(guest::CR3, regs.cr3);
    cpu.write(guest::DR7, regs.dr7);
    cpu.write(guest::IA32_EFER_FULL, regs.efer);
    let entry = cpu.read(control::VMENTRY_CONTROLS) & !cr::ENTRY_IA32E_MODE;
    let ia32e = if regs.efer & EFER_LMA != 0 {
        cr::ENTRY_IA32E_MODE
    } else {
        0
    };
    cpu.write(control::VMENTRY_CONTROLS, entry | ia32e);
    cpu.set_kernel_gs_base(regs.kernel_gs_base);
    cpu.write(guest::GDTR_BASE, regs.gdtr_base);
    cpu.write(guest::GDTR_LIMIT, u64::from(regs.gdtr_limit));
    cpu.write(guest::IDTR_BASE, regs.idtr_base);
    cpu.write(guest::IDTR_LIMIT, u64::from(regs.idtr_limit));
    for ([sel, base, limit, ar], s) in SEGMENTS.into_iter().zip(&regs.segments) {
        cpu.write(sel, u64::from(s.selector));
        cpu.write(base, s.base);
        cpu.write(limit, u64::from(s.limit));
        cpu.write(ar, u64::from(s.access));
    }
    cpu.invvpid(GUEST_VPID);
}
