//! The small state changes exit handlers make to a vCPU: advance RIP past
//! an instruction, inject an exception, deliver again an event an exit cut
//! short, and read the privilege level and mode; and the events a vCPU owes
//! its guest ([`Pending`]: NMIs, interrupts cut short) with the window exits
//! that deliver them as soon as the guest can take them, in order.

use x86::vmx::vmcs::{control, guest, ro};

use crate::vmx::vmcs::Vmcs;

/// Interruption types for VM-entry event injection (SDM Vol. 3C
/// "VM-Entry Controls for Event Injection").
pub const TYPE_EXTERNAL_INTERRUPT: u64 = 0;
pub const TYPE_NMI: u64 = 2;
const TYPE_HARDWARE_EXCEPTION: u64 = 3;
pub const TYPE_SOFTWARE_INTERRUPT: u64 = 4;
pub const TYPE_PRIVILEGED_SOFTWARE_EXCEPTION: u64 = 5;
pub const TYPE_SOFTWARE_EXCEPTION: u64 = 6;
const DELIVER_ERROR_CODE: u64 = 1 << 11;
pub const VALID: u64 = 1 << 31;

/// Interruptibility: blocking by STI (bit 0) and by MOV SS (bit 1).
pub const BLOCKING_STI_MOVSS: u64 = 0b11;
/// Interruptibility: blocking by SMI (bit 2).
const BLOCKING_SMI: u64 = 1 << 2;
/// Interruptibility: (virtual-)NMI blocking (bit 3).
pub const BLOCKING_NMI: u64 = 1 << 3;
const RFLAGS_IF: u64 = 1 << 9;
/// Primary processor-based controls: interrupt- and NMI-window exiting.
const PRIMARY_INTERRUPT_WINDOW: u64 = 1 << 2;
const PRIMARY_NMI_WINDOW: u64 = 1 << 22;
/// Pending debug exceptions: single step (BS).
pub const PENDING_BS: u64 = 1 << 14;
const RFLAGS_TF: u64 = 1 << 8;
const CR0_PE: u64 = 1;
/// CS access rights: the L bit (64-bit code).
const CS_LONG: u64 = 1 << 13;

/// The VPID of guest vCPUs (the hypervisor runs with VPID 0).
pub const GUEST_VPID: u16 = 1;

/// Whether the guest executes 64-bit code (IA-32e mode and CS.L).
pub fn in_64bit_mode(vmcs: &impl Vmcs) -> bool {
    vmcs.read(control::VMENTRY_CONTROLS) & crate::vcpu::cr::ENTRY_IA32E_MODE != 0
        && vmcs.read(guest::CS_ACCESS_RIGHTS) & CS_LONG != 0
}

/// Moves the guest past the instruction that caused the exit, as the CPU
/// would have: EIP wraps at 4 GiB outside 64-bit mode, an STI or MOV SS
/// shadow ends, and a guest single-stepping with TF gets its #DB.
pub fn advance_rip(vmcs: &mut impl Vmcs) {
    let len = vmcs.read(ro::VMEXIT_INSTRUCTION_LEN);
    advance_rip_by(vmcs, len);
}

/// [`advance_rip`] past an instruction of `len` bytes (an instruction
/// completed after its exit's fields may have been overwritten).
pub fn advance_rip_by(vmcs: &mut impl Vmcs, len: u64) {
    let rip = vmcs.read(guest::RIP);
    let mut next = rip.wrapping_add(len);
    if next > 0xffff_ffff && !in_64bit_mode(vmcs) {
        next &= 0xffff_ffff;
    }
    vmcs.write(guest::RIP, next);
    let state = vmcs.read(guest::INTERRUPTIBILITY_STATE);
    if state & BLOCKING_STI_MOVSS != 0 {
        vmcs.write(guest::INTERRUPTIBILITY_STATE, state & !BLOCKING_STI_MOVSS);
    }
    if vmcs.read(guest::RFLAGS) & RFLAGS_TF != 0 {
        let pending = vmcs.read(guest::PENDING_DBG_EXCEPTIONS);
        vmcs.write(guest::PENDING_DBG_EXCEPTIONS, pending | PENDING_BS);
    }
}

/// Exception vectors the hypervisor injects or intercepts.
pub mod vector {
    pub const DB: u8 = 1;
    pub const NMI: u8 = 2;
    pub const BP: u8 = 3;
    pub const UD: u8 = 6;
    pub const DF: u8 = 8;
    pub const GP: u8 = 13;
    pub const PF: u8 = 14;
    pub const MC: u8 = 18;
    pub const VE: u8 = 20;
}

/// Makes the next VM entry deliver hardware exception `vector` to the guest.
/// In real mode no error code is pushed (SDM Vol. 3C 26.2.1.3: with
/// unrestricted guest and CR0.PE = 0, "deliver error code" must be 0).
pub fn inject_exception(vmcs: &mut impl Vmcs, vector: u8, error_code: Option<u32>) {
    let mut info = u64::from(vector) | TYPE_HARDWARE_EXCEPTION << 8 | VALID;
    if let Some(code) = error_code.filter(|_| vmcs.read(guest::CR0) & CR0_PE != 0) {
        info |= DELIVER_ERROR_CODE;
        vmcs.write(control::VMENTRY_EXCEPTION_ERR_CODE, u64::from(code));
    }
    vmcs.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, info);
}

/// Makes the next VM entry deliver software exception `vector` (INT3,
/// INTO) of an instruction `len` bytes long.
pub fn inject_software_exception(vmcs: &mut impl Vmcs, vector: u8, len: u64) {
    vmcs.write(control::VMENTRY_INSTRUCTION_LEN, len);
    let info = u64::from(vector) | TYPE_SOFTWARE_EXCEPTION << 8 | VALID;
    vmcs.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, info);
}

/// Whether the next VM entry injects an event.
pub fn injecting(vmcs: &impl Vmcs) -> bool {
    vmcs.read(control::VMENTRY_INTERRUPTION_INFO_FIELD) & VALID != 0
}

/// Events the vCPU owes the guest that it could not deliver yet. Nothing
/// here is ever dropped: [`Pending::deliver`] injects them, one per VM
/// entry, as soon as the guest's state allows, and asks for an interrupt-
/// or NMI-window exit otherwise.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pending {
    /// An NMI for the guest (one: NMIs do not queue on hardware either).
    pub nmi: bool,
    /// An external interrupt whose delivery a VM exit cut short while
    /// another event was being injected (its vector: it is already
    /// acknowledged at the local APIC, so only injection can deliver it).
    pub interrupt: Option<u8>,
}

impl Pending {
    /// Right before VM entry: injects the oldest owed event the guest can
    /// take now (NMI before interrupt, as the CPU orders them), unless the
    /// entry already injects one; asks for the window exits still needed.
    pub fn deliver(&mut self, vmcs: &mut impl Vmcs) {
        let state = vmcs.read(guest::INTERRUPTIBILITY_STATE);
        if state & BLOCKING_SMI != 0 {
            // VM entry refuses it outside SMM, where guests never run; Bochs
            // 2.7 reports it at every exit of a vCPU a SIPI exit started.
            vmcs.write(guest::INTERRUPTIBILITY_STATE, state & !BLOCKING_SMI);
        }
        let busy = injecting(vmcs);
        // Some CPUs refuse NMI injection under STI blocking (SDM Vol. 3C
        // 26.3.1.5): wait for all three to clear.
        if self.nmi && !busy && state & (BLOCKING_STI_MOVSS | BLOCKING_NMI) == 0 {
            vmcs.write(
                control::VMENTRY_INTERRUPTION_INFO_FIELD,
                u64::from(vector::NMI) | TYPE_NMI << 8 | VALID,
            );
            self.nmi = false;
        }
        let busy = injecting(vmcs);
        let open = vmcs.read(guest::RFLAGS) & RFLAGS_IF != 0 && state & BLOCKING_STI_MOVSS == 0;
        if let Some(vector) = self.interrupt
            && !busy
            && open
        {
            vmcs.write(
                control::VMENTRY_INTERRUPTION_INFO_FIELD,
                u64::from(vector) | TYPE_EXTERNAL_INTERRUPT << 8 | VALID,
            );
            self.interrupt = None;
        }
        let primary = vmcs.read(control::PRIMARY_PROCBASED_EXEC_CONTROLS)
            & !(PRIMARY_INTERRUPT_WINDOW | PRIMARY_NMI_WINDOW);
        let wants = if self.nmi { PRIMARY_NMI_WINDOW } else { 0 }
            | if self.interrupt.is_some() {
                PRIMARY_INTERRUPT_WINDOW
            } else {
                0
            };
        vmcs.write(control::PRIMARY_PROCBASED_EXEC_CONTROLS, primary | wants);
    }
}

/// If the exit interrupted the delivery of an event (IDT-vectoring
/// information valid), delivers it again on the next entry (SDM Vol. 3C
/// 27.2.4, "Information for VM Exits During Event Delivery"). Returns
/// whether there was one. If the next entry already injects an event, an
/// interrupted NMI or external interrupt is kept in `pending` instead, to
/// follow it.
pub fn reinject_vectoring(vmcs: &mut impl Vmcs, pending: &mut Pending) -> bool {
    let info = vmcs.read(ro::IDT_VECTORING_INFO);
    if info & VALID == 0 {
        return false;
    }
    if injecting(vmcs) {
        match (info >> 8) & 7 {
            TYPE_NMI => pending.nmi = true,
            TYPE_EXTERNAL_INTERRUPT => pending.interrupt = Some(info as u8),
            // An exception or software interrupt is raised again when the
            // instruction runs again.
            _ => {}
        }
        return false;
    }
    if info & DELIVER_ERROR_CODE != 0 {
        vmcs.write(
            control::VMENTRY_EXCEPTION_ERR_CODE,
            vmcs.read(ro::IDT_VECTORING_ERR_CODE),
        );
    }
    let kind = (info >> 8) & 7;
    if matches!(
        kind,
        TYPE_SOFTWARE_INTERRUPT | TYPE_PRIVILEGED_SOFTWARE_EXCEPTION | TYPE_SOFTWARE_EXCEPTION
    ) {
        vmcs.write(
            control::VMENTRY_INSTRUCTION_LEN,
            vmcs.read(ro::VMEXIT_INSTRUCTION_LEN),
        );
    }
    // Bit 12 is undefined in the vectoring information; reserved at entry.
    vmcs.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, info & !(1 << 12));
    true
}

/// What reflecting an exception to the guest came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reflected {
    /// Injected (or the double fault it made).
    Injected,
    /// A fault while delivering a double fault: the guest shuts down.
    TripleFault,
}

/// Exception classes for double faults (SDM Vol. 3A table 6-4).
fn contributory(vector: u8) -> bool {
    matches!(vector, 0 | 10..=13)
}

/// Gives the guest hardware exception `vector` that a VM exit intercepted,
/// keeping any event whose delivery the exception cut short (IDT-vectoring
/// information): an external interrupt or NMI is kept in `pending` and
/// follows; an exception combines with the new one as the CPU would (SDM
/// Vol. 3A table 6-5): a double fault, a triple fault, or the new one alone
/// (the first comes back when the instruction runs again, as a software
/// interrupt does).
pub fn reflect_exception(
    vmcs: &mut impl Vmcs,
    pending: &mut Pending,
    vector: u8,
    error_code: Option<u32>,
) -> Reflected {
    let info = vmcs.read(ro::IDT_VECTORING_INFO);
    if info & VALID != 0 {
        let first = info as u8;
        match (info >> 8) & 7 {
            TYPE_EXTERNAL_INTERRUPT => pending.interrupt = Some(first),
            TYPE_NMI => pending.nmi = true,
            TYPE_HARDWARE_EXCEPTION if first == vector::DF => return Reflected::TripleFault,
            TYPE_HARDWARE_EXCEPTION
                if (contributory(first) || first == vector::PF)
                    && (contributory(vector) || vector == vector::PF)
                    && !(contributory(first) && vector == vector::PF) =>
            {
                inject_exception(vmcs, vector::DF, Some(0));
                return Reflected::Injected;
            }
            _ => {}
        }
    }
    inject_exception(vmcs, vector, error_code);
    Reflected::Injected
}

/// The guest's current privilege level (DPL of SS, SDM Vol. 3A 5.5).
pub fn guest_cpl(vmcs: &impl Vmcs) -> u8 {
    ((vmcs.read(guest::SS_ACCESS_RIGHTS) >> 5) & 3) as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmx::vmcs::tests::FakeVmcs;

    #[test]
    fn advance_rip_skips_the_instruction_and_ends_an_sti_shadow() {
        let mut vmcs = FakeVmcs::default();
        vmcs.write(guest::RIP, 0x1000);
        vmcs.write(ro::VMEXIT_INSTRUCTION_LEN, 3);
        vmcs.write(guest::INTERRUPTIBILITY_STATE, 0b1001);
        advance_rip(&mut vmcs);
        assert_eq!(vmcs.read(guest::RIP), 0x1003);
        assert_eq!(vmcs.read(guest::INTERRUPTIBILITY_STATE), 0b1000);
    }

    #[test]
    fn gp_injection_carries_its_error_code() {
        let mut vmcs = FakeVmcs::default();
        vmcs.write(guest::CR0, CR0_PE);
        inject_exception(&mut vmcs, vector::GP, Some(0));
        assert_eq!(
            vmcs.read(control::VMENTRY_INTERRUPTION_INFO_FIELD),
            0x8000_0b0d
        );
        inject_exception(&mut vmcs, vector::UD, None);
        assert_eq!(
            vmcs.read(control::VMENTRY_INTERRUPTION_INFO_FIELD),
            0x8000_0306
        );
    }

    #[test]
    fn real_mode_injection_has_no_error_code() {
        let mut vmcs = FakeVmcs::default();
        inject_exception(&mut vmcs, vector::GP, Some(0));
        assert_eq!(
            vmcs.read(control::VMENTRY_INTERRUPTION_INFO_FIELD),
            0x8000_030d
        );
    }

    #[test]
    fn outside_64_bit_mode_eip_wraps_and_tf_gets_its_debug_trap() {
        let mut vmcs = FakeVmcs::default();
        vmcs.write(guest::RIP, 0xffff_fffe);
        vmcs.write(ro::VMEXIT_INSTRUCTION_LEN, 3);
        vmcs.write(guest::RFLAGS, 0x2 | RFLAGS_TF);
        advance_rip(&mut vmcs);
        assert_eq!(vmcs.read(guest::RIP), 1);
        assert_eq!(vmcs.read(guest::PENDING_DBG_EXCEPTIONS), PENDING_BS);
    }

    #[test]
    fn an_event_cut_short_by_an_exit_is_delivered_again() {
        let mut vmcs = FakeVmcs::default();
        vmcs.write(
            ro::IDT_VECTORING_INFO,
            VALID | 3 << 8 | DELIVER_ERROR_CODE | 14,
        );
        vmcs.write(ro::IDT_VECTORING_ERR_CODE, 2);
        let mut pending = Pending::default();
        assert!(reinject_vectoring(&mut vmcs, &mut pending));
        assert_eq!(
            vmcs.read(control::VMENTRY_INTERRUPTION_INFO_FIELD),
            VALID | 3 << 8 | DELIVER_ERROR_CODE | 14
        );
        assert_eq!(vmcs.read(control::VMENTRY_EXCEPTION_ERR_CODE), 2);
        assert!(
            !reinject_vectoring(&mut vmcs, &mut pending),
            "an injection is already set up"
        );
        assert_eq!(
            pending,
            Pending::default(),
            "an exception comes back by itself"
        );
    }

    #[test]
    fn reflected_exceptions_combine_as_the_cpu_combines_them() {
        let reflect = |first: Option<u64>, vector: u8| {
            let mut vmcs = FakeVmcs::default();
            vmcs.write(guest::CR0, CR0_PE);
            if let Some(info) = first {
                vmcs.write(ro::IDT_VECTORING_INFO, VALID | info);
            }
            let mut pending = Pending::default();
            let r = reflect_exception(&mut vmcs, &mut pending, vector, Some(0));
            let injected = vmcs.read(control::VMENTRY_INTERRUPTION_INFO_FIELD) as u8;
            (r, injected, pending)
        };
        let exception = |v: u64| TYPE_HARDWARE_EXCEPTION << 8 | v;
        assert_eq!(reflect(None, 14).1, 14);
        // #PF while delivering #PF, or #GP: double fault.
        assert_eq!(reflect(Some(exception(14)), 14).1, 8);
        assert_eq!(reflect(Some(exception(13)), 13).1, 8);
        // #GP then #PF: serially (the #PF).
        assert_eq!(reflect(Some(exception(13)), 14).1, 14);
        // A benign first exception: the second alone.
        assert_eq!(reflect(Some(exception(3)), 14).1, 14);
        // Anything while delivering #DF: shutdown.
        assert_eq!(reflect(Some(exception(8)), 14).0, Reflected::TripleFault);
        // An interrupt or NMI cut short is kept, to follow.
        let (_, injected, pending) = reflect(Some(0x41), 14);
        assert_eq!((injected, pending.interrupt), (14, Some(0x41)));
        let (_, _, pending) = reflect(Some(TYPE_NMI << 8 | 2), 13);
        assert!(pending.nmi);
    }

    #[test]
    fn an_interrupt_cut_short_behind_an_injection_waits_for_its_window() {
        let mut vmcs = FakeVmcs::default();
        let mut pending = Pending::default();
        inject_exception(&mut vmcs, vector::GP, None);
        vmcs.write(ro::IDT_VECTORING_INFO, VALID | 0x31);
        assert!(!reinject_vectoring(&mut vmcs, &mut pending));
        assert_eq!(pending.interrupt, Some(0x31));
        // The #GP goes first; the interrupt waits for an interrupt window.
        pending.deliver(&mut vmcs);
        assert_eq!(
            vmcs.read(control::VMENTRY_INTERRUPTION_INFO_FIELD) & 0xff,
            13
        );
        assert_ne!(
            vmcs.read(control::PRIMARY_PROCBASED_EXEC_CONTROLS) & PRIMARY_INTERRUPT_WINDOW,
            0
        );
        // The window exit: nothing injected, IF set, no shadow.
        vmcs.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0);
        vmcs.write(guest::RFLAGS, 0x2 | RFLAGS_IF);
        pending.deliver(&mut vmcs);
        assert_eq!(
            vmcs.read(control::VMENTRY_INTERRUPTION_INFO_FIELD),
            VALID | 0x31,
            "an external interrupt, vector 0x31"
        );
        assert_eq!(pending, Pending::default());
        assert_eq!(
            vmcs.read(control::PRIMARY_PROCBASED_EXEC_CONTROLS) & PRIMARY_INTERRUPT_WINDOW,
            0
        );
    }

    #[test]
    fn an_nmi_waits_while_the_guest_blocks_nmis_and_goes_before_interrupts() {
        let mut vmcs = FakeVmcs::default();
        let mut pending = Pending {
            nmi: true,
            interrupt: Some(0x40),
        };
        vmcs.write(guest::RFLAGS, 0x2 | RFLAGS_IF);
        vmcs.write(guest::INTERRUPTIBILITY_STATE, BLOCKING_NMI);
        pending.deliver(&mut vmcs);
        assert_eq!(
            vmcs.read(control::VMENTRY_INTERRUPTION_INFO_FIELD),
            VALID | 0x40,
            "the interrupt may go while the NMI waits"
        );
        assert_ne!(
            vmcs.read(control::PRIMARY_PROCBASED_EXEC_CONTROLS) & PRIMARY_NMI_WINDOW,
            0
        );
        vmcs.write(control::VMENTRY_INTERRUPTION_INFO_FIELD, 0);
        vmcs.write(guest::INTERRUPTIBILITY_STATE, 0);
        pending.deliver(&mut vmcs);
        assert_eq!(
            vmcs.read(control::VMENTRY_INTERRUPTION_INFO_FIELD),
            VALID | TYPE_NMI << 8 | 2
        );
        assert!(!pending.nmi);
    }
}
