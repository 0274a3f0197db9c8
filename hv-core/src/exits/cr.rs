//! Control-register accesses: guest MOV to CR0/CR4 (and LMSW/CLTS) that touch
//! bits the hypervisor owns, MOV to CR3 while a tool wants CR3-write events,
//! and MOV to/from CR8 on a CPU that cannot run them natively (the TPR is
//! the guest's: its local APIC is passed through). Qualification layout:
//! SDM Vol. 3C table "Exit Qualification for Control-Register Accesses".

use x86::vmx::vmcs::guest;

use super::{ExitCtx, Flow, StopReason};
use crate::platform::Platform;
use crate::vcpu::cr::{self, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME, Refused};
use crate::vcpu::events::{GUEST_VPID, advance_rip};
use crate::vm::Vm;
use crate::vmx::Cpu;

const MOV_TO_CR: u64 = 0;
const MOV_FROM_CR: u64 = 1;
const CLTS: u64 = 2;
const LMSW: u64 = 3;
const CR0_TS: u64 = 1 << 3;
const CR0_WP: u64 = 1 << 16;
const CR4_PCIDE: u64 = 1 << 17;
/// Changing any of these flushes the guest's cached linear translations.
const CR0_PAGING_BITS: u64 = CR0_PE | CR0_PG | CR0_WP;
/// The PDPTE fields, in order (SDM Vol. 3C "Guest Non-Register State").
const PDPTE_FIELDS: [u32; 4] = [
    guest::PDPTE0_FULL,
    guest::PDPTE1_FULL,
    guest::PDPTE2_FULL,
    guest::PDPTE3_FULL,
];

pub fn handle<C: Cpu, P: Platform>(ctx: &mut ExitCtx<'_, C, P>) -> Flow {
    let q = ctx.qualification();
    let (number, access, register) = (q & 0xf, (q >> 4) & 3, ((q >> 8) & 0xf) as u8);
    let fixed = ctx.vm.cr_fixed;
    let old_cr0 = cr::guest_cr0(&*ctx.cpu);
    let new_cr0 = match (access, number) {
        (MOV_TO_CR, 0) => Some(ctx.vcpu.regs.get(register, &*ctx.cpu)),
        (CLTS, _) => Some(old_cr0 & !CR0_TS),
        // LMSW loads CR0[3:0] but can set PE, never clear it.
        (LMSW, _) => Some(old_cr0 & !0xe | (q >> 16) & 0xf | old_cr0 & CR0_PE),
        _ => None,
    };
    let result = match (access, number, new_cr0) {
        (_, _, Some(value)) => write_cr0(ctx, value),
        (MOV_TO_CR, 3, _) => {
            // Exits only while a tool wants CR3-write events (or right after
            // it turned them off, before every vCPU followed).
            let value = ctx.vcpu.regs.get(register, &*ctx.cpu);
            if ctx.vm.control.wants(hv_control::class::CR3_WRITE) {
                let len = ctx.cpu.read(x86::vmx::vmcs::ro::VMEXIT_INSTRUCTION_LEN);
                crate::control::raise_cr3_write(ctx.vm, ctx.cpu, ctx.vcpu, value, len);
                return Flow::Resume;
            }
            return match mov_to_cr3(ctx.cpu, ctx.vm, ctx.platform, value) {
                Ok(()) => {
                    advance_rip(ctx.cpu);
                    Flow::Resume
                }
                Err(_) => ctx.general_protection(),
            };
        }
        (MOV_TO_CR, 4, _) => {
            cr::mov_to_cr4(ctx.cpu, &fixed, ctx.vcpu.regs.get(register, &*ctx.cpu))
        }
        (MOV_TO_CR, 8, _) => {
            let value = ctx.vcpu.regs.get(register, &*ctx.cpu);
            if value > 0xf {
                Err(Refused::ReservedBits)
            } else {
                ctx.cpu.write_cr8(value);
                Ok(())
            }
        }
        (MOV_FROM_CR, 8, _) => {
            let value = ctx.cpu.read_cr8();
            ctx.vcpu.regs.set(register, value, ctx.cpu);
            Ok(())
        }
        _ => {
            return ctx.stop(StopReason::Unsupported(
                "a control-register access the hypervisor does not intercept",
            ));
        }
    };
    match result {
        Ok(()) => {
            advance_rip(ctx.cpu);
            Flow::Resume
        }
        Err(Refused::Vmx) => {
            log::debug!("guest: CR4.VMXE refused (no nested VMX)");
            ctx.general_protection()
        }
        Err(_) => ctx.general_protection(),
    }
}

/// A guest write to CR0. Entering PAE paging outside long mode loads the
/// PDPTEs from the guest's CR3, as the CPU would (with EPT, VM entry takes
/// them from the VMCS: SDM Vol. 3C 26.3.2.4); a paging-mode change drops
/// the guest's cached translations (SDM Vol. 3A 4.10.4.1).
fn write_cr0<C: Cpu, P: Platform>(ctx: &mut ExitCtx<'_, C, P>, value: u64) -> Result<(), Refused> {
    let old = cr::guest_cr0(&*ctx.cpu);
    let pae = cr::guest_cr4(&*ctx.cpu) & CR4_PAE != 0;
    let long = ctx.cpu.read(guest::IA32_EFER_FULL) & EFER_LME != 0;
    let pdptes = if value & CR0_PG != 0 && old & CR0_PG == 0 && pae && !long {
        let cr3 = ctx.cpu.read(guest::CR3);
        Some(read_pdptes(ctx.vm, ctx.platform, cr3).ok_or(Refused::ReservedBits)?)
    } else {
        None
    };
    cr::mov_to_cr0(ctx.cpu, &ctx.vm.cr_fixed, value)?;
    if let Some(pdptes) = pdptes {
        for (field, pdpte) in PDPTE_FIELDS.into_iter().zip(pdptes) {
            ctx.cpu.write(field, pdpte);
        }
    }
    if (old ^ value) & CR0_PAGING_BITS != 0 && ctx.vm.features.vpid {
        ctx.cpu.invvpid(GUEST_VPID);
    }
    Ok(())
}

/// A MOV to CR3 the hypervisor carries out (CR3-load exiting is on for a
/// tool): in PAE paging the PDPTEs load with it (with EPT they come from
/// the VMCS), and the guest's cached translations go (all of them: more
/// than the CPU would drop, never less). With CR4.PCIDE, bit 63 (keep
/// the PCID's translations) is not part of the value.
pub fn mov_to_cr3(
    cpu: &mut impl Cpu,
    vm: &Vm,
    platform: &impl Platform,
    value: u64,
) -> Result<(), Refused> {
    let value = if cr::guest_cr4(&*cpu) & CR4_PCIDE != 0 {
        value & !(1 << 63)
    } else {
        value
    };
    if value >> vm.p2m.caps().paddr_bits != 0 {
        return Err(Refused::ReservedBits);
    }
    pdptes_for(cpu, vm, platform, value)?;
    cpu.write(guest::CR3, value);
    if vm.features.vpid {
        cpu.invvpid(GUEST_VPID);
    }
    Ok(())
}

/// After the guest's CR3 or paging changed outside a guest MOV (a tool
/// wrote its registers): in PAE paging, the PDPTEs of its CR3.
pub fn load_pdptes(cpu: &mut impl Cpu, vm: &Vm, platform: &impl Platform) -> Result<(), Refused> {
    let cr3 = cpu.read(guest::CR3);
    pdptes_for(cpu, vm, platform, cr3)
}

/// In PAE paging outside long mode, loads the PDPTE fields from the table
/// at `cr3`; in other modes there is nothing to load.
fn pdptes_for(
    cpu: &mut impl Cpu,
    vm: &Vm,
    platform: &impl Platform,
    cr3: u64,
) -> Result<(), Refused> {
    let pae_paging = cr::guest_cr0(&*cpu) & CR0_PG != 0
        && cr::guest_cr4(&*cpu) & CR4_PAE != 0
        && cpu.read(guest::IA32_EFER_FULL) & EFER_LMA == 0;
    if pae_paging {
        let pdptes = read_pdptes(vm, platform, cr3).ok_or(Refused::ReservedBits)?;
        for (field, pdpte) in PDPTE_FIELDS.into_iter().zip(pdptes) {
            cpu.write(field, pdpte);
        }
    }
    Ok(())
}

/// The four PAE PDPTEs at `cr3`, or `None` if they are not in guest RAM
/// or a present one sets reserved bits (then the MOV faults).
fn read_pdptes(vm: &Vm, platform: &impl Platform, cr3: u64) -> Option<[u64; 4]> {
    let table = cr3 & 0xffff_ffe0;
    let mut bytes = [0u8; 32];
    vm.read(platform, table, &mut bytes).ok()?;
    let paddr_bits = vm.p2m.caps().paddr_bits;
    let reserved = 0b1_1110_0110 | !((1u64 << paddr_bits) - 1);
    let pdptes: [u64; 4] = core::array::from_fn(|i| {
        u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap_or_default())
    });
    pdptes
        .iter()
        .all(|e| e & 1 == 0 || e & reserved == 0)
        .then_some(pdptes)
}
