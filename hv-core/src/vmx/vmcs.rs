//! VMCS field access and the VM-execution, exit and entry controls this
//! hypervisor runs its guests with.
//!
//! Exit handlers reach the VMCS through [`Vmcs`], so they run on the host in
//! tests against a map of fields; [`ThisCpu`](super::ThisCpu) is the real one.

use core::fmt;

use x86::vmx::vmcs::control::{
    EntryControls, ExitControls, PinbasedControls, PrimaryControls, SecondaryControls,
};
use x86::vmx::vmcs::{guest, ro};

use super::caps::{AllowedBits, EptVpidCap, VmxCaps};

/// Reads and writes fields of the current VMCS.
pub trait Vmcs {
    fn read(&self, field: u32) -> u64;
    fn write(&mut self, field: u32, value: u64);
}

/// A VMX feature this hypervisor cannot run without.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MissingFeature(pub &'static str);

impl fmt::Display for MissingFeature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "this CPU's VMX lacks {}, which the hypervisor needs",
            self.0
        )
    }
}

/// The control values for a guest's VMCS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Controls {
    pub pin: u32,
    pub primary: u32,
    pub secondary: u32,
    pub exit: u32,
    pub entry: u32,
    /// VPID in use (the CPU supports it).
    pub vpid: bool,
}

/// Optional features a guest may ask for on top of the base set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Wants {
    /// VMFUNC EPTP switching (altp2m).
    pub vm_functions: bool,
    /// EPT-violation #VE (altp2m).
    pub virtualization_exceptions: bool,
    /// Page-modification logging (log-dirty without write faults).
    pub pml: bool,
}

fn need(allowed: AllowedBits, bits: u32, feature: &'static str) -> Result<(), MissingFeature> {
    if allowed.allows(bits) {
        Ok(())
    } else {
        Err(MissingFeature(feature))
    }
}

impl Controls {
    /// Computes the controls from what the CPU allows (true controls when it
    /// has them, so the default-1 bits we do not want can be 0).
    pub fn compute(caps: &VmxCaps, wants: Wants) -> Result<Self, MissingFeature> {
        use PrimaryControls as P;
        use SecondaryControls as S;

        let (pin_allowed, primary_allowed, secondary_allowed) =
            (caps.pinbased(), caps.procbased(), caps.procbased2());
        need(
            primary_allowed,
            P::SECONDARY_CONTROLS.bits(),
            "secondary processor-based controls",
        )?;
        need(secondary_allowed, S::ENABLE_EPT.bits(), "EPT")?;
        need(
            secondary_allowed,
            S::UNRESTRICTED_GUEST.bits(),
            "unrestricted guest",
        )?;
        need(primary_allowed, P::USE_MSR_BITMAPS.bits(), "MSR bitmaps")?;
        need(primary_allowed, P::USE_IO_BITMAPS.bits(), "I/O bitmaps")?;
        if !caps.ept_cap(EptVpidCap::PAGE_WALK_4) || !caps.ept_cap(EptVpidCap::MEMTYPE_WB) {
            return Err(MissingFeature("4-level write-back EPT"));
        }
        // Single-context after changes to one p2m; all-context once a view
        // is gone and its EPTP can no longer be named.
        if !caps.ept_cap(EptVpidCap::INVEPT_SINGLE_CONTEXT)
            || !caps.ept_cap(EptVpidCap::INVEPT_ALL_CONTEXT)
        {
            return Err(MissingFeature("single- and all-context INVEPT"));
        }

        // External interrupts go straight to the guest through its own IDT
        // (no exit): the local APIC, I/O APIC and legacy timers are the
        // guest's. NMIs exit: the hypervisor needs them to reach a CPU that
        // runs a guest (cross-CPU invalidations), and forwards the guest's
        // own, tracking NMI blocking itself (virtual NMIs, NMI-window exits).
        // The VMX-preemption timer is the hypervisor's only tick (watchdog,
        // display refresh, control channel): it is required.
        let pin = PinbasedControls::NMI_EXITING
            | PinbasedControls::VIRTUAL_NMIS
            | PinbasedControls::VMX_PREEMPTION_TIMER;
        need(
            pin_allowed,
            PinbasedControls::VIRTUAL_NMIS.bits(),
            "virtual NMIs",
        )?;
        need(
            pin_allowed,
            PinbasedControls::VMX_PREEMPTION_TIMER.bits(),
            "the VMX-preemption timer",
        )?;
        need(
            primary_allowed,
            (P::INTERRUPT_WINDOW_EXITING | P::NMI_WINDOW_EXITING).bits(),
            "interrupt- and NMI-window exiting",
        )?;
        // HLT runs natively (an idle guest costs no exits: its own timer
        // wakes it); the watchdog tick catches a guest halted for good.
        // CR8 is the guest's own TPR in its own local APIC.
        let mut primary = P::MWAIT_EXITING
            | P::MONITOR_EXITING
            | P::USE_IO_BITMAPS
            | P::USE_MSR_BITMAPS
            | P::SECONDARY_CONTROLS;
        // Guest writes to IA32_TIME_STAMP_COUNTER become an offset.
        if primary_allowed.allows(P::USE_TSC_OFFSETTING.bits()) {
            primary |= P::USE_TSC_OFFSETTING;
        }

        let mut secondary = S::ENABLE_EPT | S::UNRESTRICTED_GUEST;
        // Guest instructions that fault (#UD) unless enabled, when the CPU has
        // them. XSAVES stays off: IA32_XSS is not emulated, and CPUID hides
        // XSAVES (guests use XSAVE/XSAVEOPT).
        for optional in [S::ENABLE_RDTSCP, S::ENABLE_INVPCID] {
            if secondary_allowed.allows(optional.bits()) {
                secondary |= optional;
            }
        }
        let vpid = secondary_allowed.allows(S::ENABLE_VPID.bits())
            && caps.ept_vpid().contains(EptVpidCap::INVVPID_SINGLE_CONTEXT);
        if vpid {
            secondary |= S::ENABLE_VPID;
        }
        if wants.vm_functions {
            if !caps.eptp_switching() {
                return Err(MissingFeature("VMFUNC EPTP switching"));
            }
            secondary |= S::ENABLE_VM_FUNCTIONS;
        }
        if wants.virtualization_exceptions {
            need(
                secondary_allowed,
                S::EPT_VIOLATION_VE.bits(),
                "EPT-violation #VE",
            )?;
            secondary |= S::EPT_VIOLATION_VE;
        }
        if wants.pml {
            need(secondary_allowed, S::ENABLE_PML.bits(), "PML")?;
            if !caps.ept_cap(EptVpidCap::ACCESSED_DIRTY) {
                return Err(MissingFeature("EPT accessed and dirty flags"));
            }
            secondary |= S::ENABLE_PML;
        }

        // The timer value is saved on exit, or every VM entry would restart
        // the countdown.
        let exit = ExitControls::HOST_ADDRESS_SPACE_SIZE
            | ExitControls::SAVE_IA32_EFER
            | ExitControls::LOAD_IA32_EFER
            | ExitControls::SAVE_IA32_PAT
            | ExitControls::LOAD_IA32_PAT
            | ExitControls::SAVE_VMX_PREEMPTION_TIMER;
        need(
            caps.exit(),
            exit.bits(),
            "64-bit host with EFER/PAT switching and a saved preemption timer on VM exit",
        )?;
        let entry = EntryControls::LOAD_IA32_EFER | EntryControls::LOAD_IA32_PAT;
        need(caps.entry(), entry.bits(), "EFER/PAT loading on VM entry")?;

        let adjust = |allowed: AllowedBits, wanted: u32, what: &'static str| {
            let (value, refused) = allowed.adjust(wanted);
            if refused != 0 {
                Err(MissingFeature(what))
            } else {
                Ok(value)
            }
        };
        Ok(Self {
            pin: adjust(pin_allowed, pin.bits(), "pin-based controls")?,
            primary: adjust(primary_allowed, primary.bits(), "processor-based controls")?,
            secondary: adjust(secondary_allowed, secondary.bits(), "secondary controls")?,
            exit: adjust(caps.exit(), exit.bits(), "VM-exit controls")?,
            entry: adjust(caps.entry(), entry.bits(), "VM-entry controls")?,
            vpid,
        })
    }
}

/// The MSR bitmap (SDM Vol. 3C "MSR-Bitmap Address"): every MSR exits except
/// those in `pass_read`/`pass_write`. Four 1 KiB parts: reads of
/// 0..0x1FFF, reads of 0xC0000000..0xC0001FFF, then the same for writes.
pub fn msr_bitmap<'a>(
    pass_read: impl IntoIterator<Item = &'a u32>,
    pass_write: &[u32],
) -> [u8; 4096] {
    let mut bitmap = [0xffu8; 4096];
    let mut clear = |msr: u32, write: bool| {
        let base = match msr {
            0..=0x1fff => 0,
            0xc000_0000..=0xc000_1fff => 1024,
            _ => return,
        } + if write { 2048 } else { 0 };
        let bit = (msr & 0x1fff) as usize;
        bitmap[base + bit / 8] &= !(1 << (bit % 8));
    };
    pass_read.into_iter().for_each(|&m| clear(m, false));
    pass_write.iter().for_each(|&m| clear(m, true));
    bitmap
}

/// Guest-state fields named by the VM-entry checks (SDM Vol. 3C "Checks on
/// the Guest State Area"), printed when an entry fails.
pub const GUEST_STATE_FIELDS: &[(&str, u32)] = &[
    ("CR0", guest::CR0),
    ("CR3", guest::CR3),
    ("CR4", guest::CR4),
    ("DR7", guest::DR7),
    ("RSP", guest::RSP),
    ("RIP", guest::RIP),
    ("RFLAGS", guest::RFLAGS),
    ("EFER", guest::IA32_EFER_FULL),
    ("PAT", guest::IA32_PAT_FULL),
    ("CS selector", guest::CS_SELECTOR),
    ("CS base", guest::CS_BASE),
    ("CS limit", guest::CS_LIMIT),
    ("CS access rights", guest::CS_ACCESS_RIGHTS),
    ("SS selector", guest::SS_SELECTOR),
    ("SS access rights", guest::SS_ACCESS_RIGHTS),
    ("DS selector", guest::DS_SELECTOR),
    ("DS access rights", guest::DS_ACCESS_RIGHTS),
    ("ES access rights", guest::ES_ACCESS_RIGHTS),
    ("FS access rights", guest::FS_ACCESS_RIGHTS),
    ("GS access rights", guest::GS_ACCESS_RIGHTS),
    ("TR selector", guest::TR_SELECTOR),
    ("TR base", guest::TR_BASE),
    ("TR limit", guest::TR_LIMIT),
    ("TR access rights", guest::TR_ACCESS_RIGHTS),
    ("LDTR access rights", guest::LDTR_ACCESS_RIGHTS),
    ("GDTR base", guest::GDTR_BASE),
    ("GDTR limit", guest::GDTR_LIMIT),
    ("IDTR base", guest::IDTR_BASE),
    ("IDTR limit", guest::IDTR_LIMIT),
    ("activity state", guest::ACTIVITY_STATE),
    ("interruptibility state", guest::INTERRUPTIBILITY_STATE),
    ("pending debug exceptions", guest::PENDING_DBG_EXCEPTIONS),
    ("VMCS link pointer", guest::LINK_PTR_FULL),
    (
        "VM-entry interruption info",
        x86::vmx::vmcs::control::VMENTRY_INTERRUPTION_INFO_FIELD,
    ),
    ("exit qualification", ro::EXIT_QUALIFICATION),
];

/// Hands the fields of [`GUEST_STATE_FIELDS`] to `line`, one line each
/// (without the heap: a report must work when a guest exhausted it).
pub fn dump_guest_state(vmcs: &impl Vmcs, mut line: impl FnMut(fmt::Arguments<'_>)) {
    for (name, field) in GUEST_STATE_FIELDS {
        line(format_args!("  {name:<28} {:#x}", vmcs.read(*field)));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    extern crate std;
    use std::collections::BTreeMap;

    use super::*;
    use crate::vmx::caps::{VmxCaps, tests::bochs_skylake_x};

    /// A CPU for exit-handler tests: its VMCS as a map of fields, a canned
    /// CPUID, and a record of the instructions the handlers executed.
    #[derive(Default, Debug)]
    pub struct FakeVmcs {
        pub fields: BTreeMap<u32, u64>,
        pub xcr0: Option<u64>,
        /// INVEPTs done: `Some(eptp)` single-context, `None` all contexts.
        pub inveptions: std::vec::Vec<Option<u64>>,
        pub invvpids: std::vec::Vec<u16>,
        pub current: Option<hv_ept::Mfn>,
        pub cr8: u64,
        pub cr2: u64,
        pub tsc: u64,
        /// Each RDTSC moves the counter on by this much (time passes).
        pub tsc_step: u64,
        pub tsc_elapsed: core::cell::Cell<u64>,
        pub kernel_gs_base: u64,
        pub lapic_disabled: bool,
        /// Bytes written to hardware ports, in order.
        pub port_writes: std::vec::Vec<(u16, u8)>,
        pub cleared: std::vec::Vec<hv_ept::Mfn>,
        /// IRETs done to unblock NMIs.
        pub nmis_unblocked: usize,
    }

    impl Vmcs for FakeVmcs {
        fn read(&self, field: u32) -> u64 {
            self.fields.get(&field).copied().unwrap_or(0)
        }
        fn write(&mut self, field: u32, value: u64) {
            self.fields.insert(field, value);
        }
    }

    impl crate::devices::ports::PortIo for FakeVmcs {
        fn inb(&mut self, port: u16) -> u8 {
            port as u8
        }

        fn outb(&mut self, port: u16, value: u8) {
            self.port_writes.push((port, value));
        }
    }

    impl crate::vmx::Cpu for FakeVmcs {
        fn cpuid(&self, leaf: u32, _subleaf: u32) -> [u32; 4] {
            match leaf {
                // x87, SSE, AVX.
                0xd => [0b111, 0, 0, 0],
                _ => [leaf, 0, 0, 0],
            }
        }

        fn invept(&mut self, eptp: Option<u64>) {
            self.inveptions.push(eptp);
        }

        fn invvpid(&mut self, vpid: u16) {
            self.invvpids.push(vpid);
        }

        fn xsetbv(&mut self, _index: u32, value: u64) {
            self.xcr0 = Some(value);
        }

        fn rdtsc(&self) -> u64 {
            let elapsed = self.tsc_elapsed.get();
            self.tsc_elapsed.set(elapsed + self.tsc_step);
            self.tsc + elapsed
        }

        fn lapic_software_disable(&mut self) {
            self.lapic_disabled = true;
        }

        fn write_cr2(&mut self, value: u64) {
            self.cr2 = value;
        }

        fn read_cr2(&self) -> u64 {
            self.cr2
        }

        fn kernel_gs_base(&self) -> u64 {
            self.kernel_gs_base
        }

        fn set_kernel_gs_base(&mut self, value: u64) {
            self.kernel_gs_base = value;
        }

        fn read_cr8(&self) -> u64 {
            self.cr8
        }

        fn write_cr8(&mut self, value: u64) {
            self.cr8 = value;
        }

        fn load_vmcs(&mut self, region: hv_ept::Mfn) -> Result<(), crate::vmx::VmxError> {
            self.current = Some(region);
            Ok(())
        }

        fn clear_vmcs(&mut self, region: hv_ept::Mfn) {
            self.cleared.push(region);
        }

        fn unblock_nmis(&mut self) {
            self.nmis_unblocked += 1;
        }
    }

    #[test]
    fn bochs_controls_have_ept_vpid_and_unrestricted_guest() {
        let caps = VmxCaps::new(bochs_skylake_x(), 39);
        let wants = Wants {
            vm_functions: true,
            virtualization_exceptions: true,
            pml: true,
        };
        let c = Controls::compute(&caps, wants).unwrap();
        let secondary = SecondaryControls::from_bits_truncate(c.secondary);
        assert!(secondary.contains(
            SecondaryControls::ENABLE_EPT
                | SecondaryControls::UNRESTRICTED_GUEST
                | SecondaryControls::ENABLE_VPID
                | SecondaryControls::ENABLE_VM_FUNCTIONS
                | SecondaryControls::EPT_VIOLATION_VE
                | SecondaryControls::ENABLE_PML
        ));
        let without = Controls::compute(&caps, Wants::default()).unwrap();
        assert_eq!(
            without.secondary & SecondaryControls::ENABLE_PML.bits(),
            0,
            "PML only when wanted"
        );
        let masked = VmxCaps::new(bochs_skylake_x(), 39).mask(crate::vmx::caps::Masked::PML);
        assert_eq!(
            Controls::compute(&masked, wants),
            Err(MissingFeature("PML"))
        );
        assert!(c.vpid);
        let pin = PinbasedControls::from_bits_truncate(c.pin);
        assert!(pin.contains(
            PinbasedControls::VMX_PREEMPTION_TIMER
                | PinbasedControls::NMI_EXITING
                | PinbasedControls::VIRTUAL_NMIS
        ));
        assert!(
            !pin.contains(PinbasedControls::EXTERNAL_INTERRUPT_EXITING),
            "external interrupts go to the guest without exits"
        );
        let primary = PrimaryControls::from_bits_truncate(c.primary);
        assert!(primary.contains(PrimaryControls::USE_MSR_BITMAPS));
        assert!(
            !primary.intersects(
                PrimaryControls::HLT_EXITING
                    | PrimaryControls::CR8_LOAD_EXITING
                    | PrimaryControls::CR8_STORE_EXITING
            ),
            "HLT and CR8 run natively"
        );
        // True controls let CR3 loads and stores run without exits.
        assert!(!primary.contains(PrimaryControls::CR3_LOAD_EXITING));
    }

    #[test]
    fn missing_unrestricted_guest_is_named() {
        let mut msrs = bochs_skylake_x();
        msrs.procbased2 &= !((SecondaryControls::UNRESTRICTED_GUEST.bits() as u64) << 32);
        let err = Controls::compute(&VmxCaps::new(msrs, 39), Wants::default()).unwrap_err();
        assert_eq!(err, MissingFeature("unrestricted guest"));
        assert!(std::format!("{err}").contains("lacks unrestricted guest"));
    }

    #[test]
    fn msr_bitmap_passes_exactly_the_listed_msrs() {
        let bitmap = msr_bitmap(&[0x10, 0xc000_0100], &[0xc000_0100]);
        let exits = |msr: u32, write: bool| {
            let base = if msr >= 0xc000_0000 { 1024 } else { 0 } + if write { 2048 } else { 0 };
            let bit = (msr & 0x1fff) as usize;
            bitmap[base + bit / 8] & (1 << (bit % 8)) != 0
        };
        assert!(!exits(0x10, false) && exits(0x10, true));
        assert!(!exits(0xc000_0100, false) && !exits(0xc000_0100, true));
        assert!(exits(0x1b, false) && exits(0x1b, true));
        assert!(exits(0xc000_0101, false));
    }
}
