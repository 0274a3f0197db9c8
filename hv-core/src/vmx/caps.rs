//! What the CPU's VMX implementation supports, decoded from CPUID and the VMX
//! capability MSRs (Intel SDM Vol. 3D, appendix A), and the boot report.

use core::fmt;

use bitflags::bitflags;
use x86::msr;
use x86::vmx::vmcs::control::{PinbasedControls, PrimaryControls, SecondaryControls};

bitflags! {
    /// IA32_VMX_EPT_VPID_CAP (MSR 0x48C), SDM Vol. 3D A.10.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct EptVpidCap: u64 {
        const EXECUTE_ONLY = 1 << 0;
        const PAGE_WALK_4 = 1 << 6;
        const PAGE_WALK_5 = 1 << 7;
        const MEMTYPE_UC = 1 << 8;
        const MEMTYPE_WB = 1 << 14;
        const PAGE_2M = 1 << 16;
        const PAGE_1G = 1 << 17;
        const INVEPT = 1 << 20;
        const ACCESSED_DIRTY = 1 << 21;
        const ADVANCED_EXIT_INFO = 1 << 22;
        const INVEPT_SINGLE_CONTEXT = 1 << 25;
        const INVEPT_ALL_CONTEXT = 1 << 26;
        const INVVPID = 1 << 32;
        const INVVPID_ADDRESS = 1 << 40;
        const INVVPID_SINGLE_CONTEXT = 1 << 41;
        const INVVPID_ALL_CONTEXT = 1 << 42;
        const INVVPID_SINGLE_CONTEXT_RETAIN_GLOBALS = 1 << 43;
    }
}

bitflags! {
    /// IA32_FEATURE_CONTROL (MSR 0x3A), the bits VMX cares about.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct FeatureControl: u64 {
        const LOCKED = 1 << 0;
        const VMXON_INSIDE_SMX = 1 << 1;
        const VMXON_OUTSIDE_SMX = 1 << 2;
    }
}

/// IA32_VMX_BASIC bit 55: the TRUE_*_CTLS MSRs exist.
const BASIC_TRUE_CONTROLS: u64 = 1 << 55;
/// IA32_VMX_PROCBASED_CTLS2 exists when this primary control may be 1.
const VMFUNC_EPTP_SWITCHING: u64 = 1 << 0;

bitflags! {
    /// VMX features the hypervisor behaves as if the CPU lacked
    /// (`vmx.mask=`), so that each fallback runs on a CPU that has them.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Masked: u8 {
        const VMFUNC = 1 << 0;
        const VE = 1 << 1;
        const PML = 1 << 2;
        const EPT_1G = 1 << 3;
        const EPT_AD = 1 << 4;
    }
}

impl Masked {
    /// The names `vmx.mask=` takes, in report order.
    pub const NAMES: [(&'static str, Masked); 5] = [
        ("vmfunc", Masked::VMFUNC),
        ("ve", Masked::VE),
        ("pml", Masked::PML),
        ("ept1g", Masked::EPT_1G),
        ("eptad", Masked::EPT_AD),
    ];

    pub fn parse(name: &str) -> Option<Self> {
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|&(_, bit)| bit)
    }

    /// What the named features take with them: PML logs through the EPT
    /// dirty flags, so no A/D means no PML. (No #VE leaves VMFUNC: the
    /// hypervisor then reads the view a VMFUNC went to from the EPTP.)
    pub fn with_implied(self) -> Self {
        if self.contains(Masked::EPT_AD) {
            self | Masked::PML
        } else {
            self
        }
    }

    /// The boot report's line: what was asked for and what it implied.
    pub fn report(self) -> MaskReport {
        MaskReport(self)
    }
}

/// Display adapter for [`Masked::report`].
pub struct MaskReport(Masked);

impl fmt::Display for MaskReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let asked = self.0;
        let implied = asked.with_implied() & !asked;
        f.write_str("vmx: masked (vmx.mask=, as if the CPU lacked them):")?;
        for (name, bit) in Masked::NAMES {
            if asked.contains(bit) {
                write!(f, " {name}")?;
            }
        }
        if implied.contains(Masked::PML) {
            f.write_str("; pml too (it needs EPT A/D)")?;
        }
        Ok(())
    }
}

/// A VMX control MSR: which bits must be 1 (low half) and which may be 1 (high half).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowedBits {
    pub must_be_one: u32,
    pub may_be_one: u32,
}

impl AllowedBits {
    pub const fn from_msr(value: u64) -> Self {
        Self {
            must_be_one: value as u32,
            may_be_one: (value >> 32) as u32,
        }
    }

    /// Adjusts `wanted` to what the CPU allows: required bits set, unsupported bits
    /// cleared. Returns the value and the wanted bits that could not be set.
    pub const fn adjust(&self, wanted: u32) -> (u32, u32) {
        let value = (wanted | self.must_be_one) & self.may_be_one;
        (value, wanted & !value)
    }

    pub const fn allows(&self, bits: u32) -> bool {
        self.may_be_one & bits == bits
    }
}

/// The raw capability MSRs, read once at boot. Each MSR is read only when the
/// SDM says it exists (reading a missing one raises #GP).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmxMsrs {
    pub feature_control: u64,
    pub basic: u64,
    pub pinbased: u64,
    pub procbased: u64,
    pub exit: u64,
    pub entry: u64,
    pub misc: u64,
    pub cr0_fixed0: u64,
    pub cr0_fixed1: u64,
    pub cr4_fixed0: u64,
    pub cr4_fixed1: u64,
    pub procbased2: u64,
    pub ept_vpid_cap: u64,
    pub vmfunc: u64,
}

impl VmxMsrs {
    /// Reads the MSRs through `rdmsr`, in dependency order.
    pub fn read(mut rdmsr: impl FnMut(u32) -> u64) -> Self {
        let basic = rdmsr(msr::IA32_VMX_BASIC);
        let true_ctls = basic & BASIC_TRUE_CONTROLS != 0;
        let pick = |normal, true_msr| if true_ctls { true_msr } else { normal };
        let mut msrs = Self {
            feature_control: rdmsr(msr::IA32_FEATURE_CONTROL),
            basic,
            pinbased: rdmsr(pick(
                msr::IA32_VMX_PINBASED_CTLS,
                msr::IA32_VMX_TRUE_PINBASED_CTLS,
            )),
            procbased: rdmsr(pick(
                msr::IA32_VMX_PROCBASED_CTLS,
                msr::IA32_VMX_TRUE_PROCBASED_CTLS,
            )),
            exit: rdmsr(pick(msr::IA32_VMX_EXIT_CTLS, msr::IA32_VMX_TRUE_EXIT_CTLS)),
            entry: rdmsr(pick(
                msr::IA32_VMX_ENTRY_CTLS,
                msr::IA32_VMX_TRUE_ENTRY_CTLS,
            )),
            misc: rdmsr(msr::IA32_VMX_MISC),
            cr0_fixed0: rdmsr(msr::IA32_VMX_CR0_FIXED0),
            cr0_fixed1: rdmsr(msr::IA32_VMX_CR0_FIXED1),
            cr4_fixed0: rdmsr(msr::IA32_VMX_CR4_FIXED0),
            cr4_fixed1: rdmsr(msr::IA32_VMX_CR4_FIXED1),
            ..Self::default()
        };
        let primary = AllowedBits::from_msr(msrs.procbased);
        if primary.allows(PrimaryControls::SECONDARY_CONTROLS.bits()) {
            msrs.procbased2 = rdmsr(msr::IA32_VMX_PROCBASED_CTLS2);
            let secondary = AllowedBits::from_msr(msrs.procbased2);
            if secondary.allows(SecondaryControls::ENABLE_EPT.bits())
                || secondary.allows(SecondaryControls::ENABLE_VPID.bits())
            {
                msrs.ept_vpid_cap = rdmsr(msr::IA32_VMX_EPT_VPID_CAP);
            }
            if secondary.allows(SecondaryControls::ENABLE_VM_FUNCTIONS.bits()) {
                msrs.vmfunc = rdmsr(msr::IA32_VMX_VMFUNC);
            }
        }
        msrs
    }
}

/// Decoded VMX capabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmxCaps {
    pub msrs: VmxMsrs,
    /// The physical-address width (CPUID 0x80000008 EAX[7:0]).
    pub paddr_bits: u8,
}

impl VmxCaps {
    pub fn new(msrs: VmxMsrs, paddr_bits: u8) -> Self {
        Self { msrs, paddr_bits }
    }

    pub fn revision_id(&self) -> u32 {
        self.msrs.basic as u32 & 0x7fff_ffff
    }

    /// Bytes the CPU wants for a VMXON region or VMCS (at most 4096).
    pub fn region_size(&self) -> u32 {
        ((self.msrs.basic >> 32) & 0x1fff) as u32
    }

    pub fn true_controls(&self) -> bool {
        self.msrs.basic & BASIC_TRUE_CONTROLS != 0
    }

    pub fn feature_control(&self) -> FeatureControl {
        FeatureControl::from_bits_truncate(self.msrs.feature_control)
    }

    pub fn pinbased(&self) -> AllowedBits {
        AllowedBits::from_msr(self.msrs.pinbased)
    }

    pub fn procbased(&self) -> AllowedBits {
        AllowedBits::from_msr(self.msrs.procbased)
    }

    pub fn procbased2(&self) -> AllowedBits {
        AllowedBits::from_msr(self.msrs.procbased2)
    }

    pub fn exit(&self) -> AllowedBits {
        AllowedBits::from_msr(self.msrs.exit)
    }

    pub fn entry(&self) -> AllowedBits {
        AllowedBits::from_msr(self.msrs.entry)
    }

    fn secondary(&self, control: SecondaryControls) -> bool {
        self.procbased2().allows(control.bits())
    }

    pub fn ept_vpid(&self) -> EptVpidCap {
        EptVpidCap::from_bits_truncate(self.msrs.ept_vpid_cap)
    }

    pub fn ept(&self) -> bool {
        self.secondary(SecondaryControls::ENABLE_EPT)
    }

    pub fn ept_cap(&self, cap: EptVpidCap) -> bool {
        self.ept() && self.ept_vpid().contains(cap)
    }

    pub fn vpid(&self) -> bool {
        self.secondary(SecondaryControls::ENABLE_VPID)
    }

    pub fn unrestricted_guest(&self) -> bool {
        self.secondary(SecondaryControls::UNRESTRICTED_GUEST)
    }

    pub fn vmfunc(&self) -> bool {
        self.secondary(SecondaryControls::ENABLE_VM_FUNCTIONS)
    }

    pub fn eptp_switching(&self) -> bool {
        self.vmfunc() && self.msrs.vmfunc & VMFUNC_EPTP_SWITCHING != 0
    }

    pub fn ept_violation_ve(&self) -> bool {
        self.secondary(SecondaryControls::EPT_VIOLATION_VE)
    }

    pub fn pml(&self) -> bool {
        self.secondary(SecondaryControls::ENABLE_PML)
    }

    /// These capabilities as a CPU without the `masked` features would
    /// report them (`vmx.mask=`, to test every fallback on a CPU that has
    /// it all): their allowed-1 control bits and capability bits cleared, so
    /// every consumer sees the same smaller CPU. What the features imply
    /// goes too ([`Masked::with_implied`]).
    pub fn mask(mut self, masked: Masked) -> Self {
        let masked = masked.with_implied();
        let secondary = |control: SecondaryControls| u64::from(control.bits()) << 32;
        if masked.contains(Masked::VMFUNC) {
            self.msrs.procbased2 &= !secondary(SecondaryControls::ENABLE_VM_FUNCTIONS);
            self.msrs.vmfunc = 0;
        }
        if masked.contains(Masked::VE) {
            self.msrs.procbased2 &= !secondary(SecondaryControls::EPT_VIOLATION_VE);
        }
        if masked.contains(Masked::PML) {
            self.msrs.procbased2 &= !secondary(SecondaryControls::ENABLE_PML);
        }
        if masked.contains(Masked::EPT_1G) {
            self.msrs.ept_vpid_cap &= !EptVpidCap::PAGE_1G.bits();
        }
        if masked.contains(Masked::EPT_AD) {
            self.msrs.ept_vpid_cap &= !EptVpidCap::ACCESSED_DIRTY.bits();
        }
        self
    }

    pub fn preemption_timer(&self) -> bool {
        self.pinbased()
            .allows(PinbasedControls::VMX_PREEMPTION_TIMER.bits())
    }

    /// The preemption timer counts down once every 2^rate TSC ticks.
    pub fn preemption_timer_rate(&self) -> u32 {
        (self.msrs.misc & 0x1f) as u32
    }

    /// The boot report: human lines, then one `vmx: features` line for scripts.
    pub fn report(&self) -> Report<'_> {
        Report(self)
    }
}

/// Display adapter for [`VmxCaps::report`].
pub struct Report<'a>(&'a VmxCaps);

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.0;
        let fc = c.feature_control();
        let ept = |cap| yes(c.ept_cap(cap));
        writeln!(
            f,
            "vmx: present: VMCS revision {:#x}, region {} bytes, true controls {}, \
             IA32_FEATURE_CONTROL locked {} vmxon-outside-smx {}",
            c.revision_id(),
            c.region_size(),
            yes(c.true_controls()),
            yes(fc.contains(FeatureControl::LOCKED)),
            yes(fc.contains(FeatureControl::VMXON_OUTSIDE_SMX)),
        )?;
        writeln!(
            f,
            "vmx: ept {}: 4-level walk {}, WB {}, UC {}, 2M pages {}, 1G pages {}, \
             execute-only {}, A/D bits {}, INVEPT single {} all {}",
            yes(c.ept()),
            ept(EptVpidCap::PAGE_WALK_4),
            ept(EptVpidCap::MEMTYPE_WB),
            ept(EptVpidCap::MEMTYPE_UC),
            ept(EptVpidCap::PAGE_2M),
            ept(EptVpidCap::PAGE_1G),
            ept(EptVpidCap::EXECUTE_ONLY),
            ept(EptVpidCap::ACCESSED_DIRTY),
            ept(EptVpidCap::INVEPT_SINGLE_CONTEXT),
            ept(EptVpidCap::INVEPT_ALL_CONTEXT),
        )?;
        let vpid = |cap| yes(c.vpid() && c.ept_vpid().contains(cap));
        writeln!(
            f,
            "vmx: vpid {}: INVVPID {}, single {}, all {}, address {}",
            yes(c.vpid()),
            vpid(EptVpidCap::INVVPID),
            vpid(EptVpidCap::INVVPID_SINGLE_CONTEXT),
            vpid(EptVpidCap::INVVPID_ALL_CONTEXT),
            vpid(EptVpidCap::INVVPID_ADDRESS),
        )?;
        writeln!(
            f,
            "vmx: unrestricted guest {}, VM functions {} (EPTP switching {}), EPT-violation #VE {}, \
             PML {}, preemption timer {} (rate 2^{})",
            yes(c.unrestricted_guest()),
            yes(c.vmfunc()),
            yes(c.eptp_switching()),
            yes(c.ept_violation_ve()),
            yes(c.pml()),
            yes(c.preemption_timer()),
            c.preemption_timer_rate(),
        )?;
        let flag = |b: bool| u8::from(b);
        write!(
            f,
            "vmx: features ept={} ept-2m={} ept-1g={} ept-ad={} ept-xo={} vpid={} unrestricted={} \
             vmfunc={} eptp-switching={} ve={} pml={} preemption-timer={}",
            flag(c.ept()),
            flag(c.ept_cap(EptVpidCap::PAGE_2M)),
            flag(c.ept_cap(EptVpidCap::PAGE_1G)),
            flag(c.ept_cap(EptVpidCap::ACCESSED_DIRTY)),
            flag(c.ept_cap(EptVpidCap::EXECUTE_ONLY)),
            flag(c.vpid()),
            flag(c.unrestricted_guest()),
            flag(c.vmfunc()),
            flag(c.eptp_switching()),
            flag(c.ept_violation_ve()),
            flag(c.pml()),
            flag(c.preemption_timer()),
        )
    }
}

/// Why VMX cannot be used on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmxAbsent {
    /// CPUID.1:ECX.VMX[bit 5] is clear (for example QEMU without KVM).
    NoCpuidBit,
    /// Firmware locked IA32_FEATURE_CONTROL with VMXON outside SMX disabled.
    DisabledByFirmware,
}

impl fmt::Display for VmxAbsent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VmxAbsent::NoCpuidBit => "vmx: absent (CPUID.1:ECX.VMX = 0)",
            VmxAbsent::DisabledByFirmware => {
                "vmx: absent (disabled by firmware: IA32_FEATURE_CONTROL locked without VMXON outside SMX)"
            }
        })
    }
}

/// Decides from CPUID and the MSRs whether VMX is usable. `read_msrs` is only
/// called when CPUID says the VMX MSRs exist.
pub fn probe(
    cpuid_vmx: bool,
    paddr_bits: u8,
    read_msrs: impl FnOnce() -> VmxMsrs,
) -> Result<VmxCaps, VmxAbsent> {
    if !cpuid_vmx {
        return Err(VmxAbsent::NoCpuidBit);
    }
    let caps = VmxCaps::new(read_msrs(), paddr_bits);
    let fc = caps.feature_control();
    if fc.contains(FeatureControl::LOCKED) && !fc.contains(FeatureControl::VMXON_OUTSIDE_SMX) {
        return Err(VmxAbsent::DisabledByFirmware);
    }
    Ok(caps)
}

/// Probes the CPU this code runs on.
pub fn probe_this_cpu() -> Result<VmxCaps, VmxAbsent> {
    let cpuid = raw_cpuid::CpuId::new();
    let vmx = cpuid.get_feature_info().is_some_and(|f| f.has_vmx());
    let paddr_bits = cpuid
        .get_processor_capacity_feature_info()
        .map_or(36, |c| c.physical_address_bits());
    probe(vmx, paddr_bits, || {
        VmxMsrs::read(|index| {
            // SAFETY: `VmxMsrs::read` only asks for MSRs whose existence the CPUID
            // VMX bit and the earlier capability MSRs establish (SDM Vol. 3D A.1).
            unsafe { super::instructions::rdmsr(index) }
        })
    })
}

#[cfg(test)]
pub(crate) mod tests {
    extern crate std;
    use std::string::ToString;

    use super::*;

    /// The capability MSRs Bochs 2.7 reports for `corei7_skylake_x`, read
    /// by the kernel at `loglevel=debug` (BIOS locked feature control).
    pub(crate) fn bochs_skylake_x() -> VmxMsrs {
        VmxMsrs {
            feature_control: 0x5,
            basic: 0x00d8_1000_0000_002b,
            pinbased: 0x0000_007f_0000_0016,
            procbased: 0xf7f9_fffe_0400_6172,
            exit: 0x007f_ffff_0003_6dfb,
            entry: 0x0000_ffff_0000_11fb,
            misc: 0x6004_01e0,
            cr0_fixed0: 0x8000_0021,
            cr0_fixed1: 0xffff_ffff,
            cr4_fixed0: 0x2000,
            cr4_fixed1: 0x0037_27ff,
            procbased2: 0x0217_7fff_0000_0000,
            ept_vpid_cap: 0x0000_0f01_0633_4141,
            vmfunc: 0x1,
        }
    }

    #[test]
    fn bochs_skylake_x_has_everything_the_altp2m_work_needs() {
        let caps = probe(true, 39, bochs_skylake_x).unwrap();
        assert!(caps.ept() && caps.vpid() && caps.unrestricted_guest());
        assert!(caps.ept_cap(EptVpidCap::PAGE_2M) && caps.ept_cap(EptVpidCap::PAGE_1G));
        assert!(caps.vmfunc() && caps.eptp_switching() && caps.ept_violation_ve() && caps.pml());
        let report = caps.report().to_string();
        assert!(report.contains(
            "vmx: features ept=1 ept-2m=1 ept-1g=1 ept-ad=1 ept-xo=1 vpid=1 unrestricted=1 \
             vmfunc=1 eptp-switching=1 ve=1 pml=1 preemption-timer=1"
        ));
    }

    #[test]
    fn haswell_model_lacks_pml() {
        let mut msrs = bochs_skylake_x();
        msrs.procbased2 = 0x0004_7fff_0000_0000;
        let caps = VmxCaps::new(msrs, 39);
        assert!(!caps.pml());
        assert!(caps.ept_violation_ve());
        assert!(caps.report().to_string().contains("pml=0"));
    }

    /// The `vmx: features` line of the report, without its prefix.
    fn features(caps: &VmxCaps) -> std::string::String {
        let report = caps.report().to_string();
        let line = report.lines().last().unwrap_or_default();
        line.trim_start_matches("vmx: features ").into()
    }

    #[test]
    fn each_mask_takes_away_exactly_its_feature_and_what_needs_it() {
        let all = VmxCaps::new(bochs_skylake_x(), 39);
        let cases = [
            (
                Masked::VMFUNC,
                "vmfunc=0 eptp-switching=0 ve=1 pml=1",
                "ept-1g=1 ept-ad=1",
            ),
            (
                Masked::VE,
                "vmfunc=1 eptp-switching=1 ve=0 pml=1",
                "ept-1g=1 ept-ad=1",
            ),
            (
                Masked::PML,
                "vmfunc=1 eptp-switching=1 ve=1 pml=0",
                "ept-1g=1 ept-ad=1",
            ),
            (
                Masked::EPT_1G,
                "vmfunc=1 eptp-switching=1 ve=1 pml=1",
                "ept-1g=0 ept-ad=1",
            ),
            (
                Masked::EPT_AD,
                "vmfunc=1 eptp-switching=1 ve=1 pml=0",
                "ept-1g=1 ept-ad=0",
            ),
        ];
        for (masked, vmx, ept) in cases {
            let features = features(&all.mask(masked));
            assert!(features.contains(vmx), "{masked:?}: {features}");
            assert!(features.contains(ept), "{masked:?}: {features}");
            // What no mask touches stays.
            assert!(features.contains("ept=1 ept-2m=1"), "{features}");
            assert!(features.contains("vpid=1 unrestricted=1"), "{features}");
            assert!(features.ends_with("preemption-timer=1"), "{features}");
        }
        assert_eq!(
            all.mask(Masked::empty()),
            all,
            "an empty mask changes nothing"
        );
        let ivy = all.mask(Masked::all());
        assert!(!ivy.vmfunc() && !ivy.ept_violation_ve() && !ivy.pml());
        assert!(!ivy.ept_cap(EptVpidCap::PAGE_1G) && !ivy.ept_cap(EptVpidCap::ACCESSED_DIRTY));
        assert!(ivy.ept_cap(EptVpidCap::PAGE_2M));
    }

    #[test]
    fn the_mask_report_names_what_was_asked_and_what_it_implied() {
        let line = (Masked::VE | Masked::PML).report().to_string();
        assert!(
            line.ends_with("as if the CPU lacked them): ve pml"),
            "{line}"
        );
        assert!(!line.contains("too"), "{line}");
        let line = Masked::EPT_AD.report().to_string();
        assert!(
            line.ends_with("): eptad; pml too (it needs EPT A/D)"),
            "{line}"
        );
        assert_eq!(Masked::parse("ept1g"), Some(Masked::EPT_1G));
        assert_eq!(Masked::parse("vpid"), None);
    }

    #[test]
    fn no_cpuid_bit_means_absent_and_no_msr_read() {
        let result = probe(false, 39, || {
            panic!("MSRs must not be read without CPUID.VMX")
        });
        assert_eq!(result, Err(VmxAbsent::NoCpuidBit));
    }

    #[test]
    fn firmware_lock_without_vmx_is_absent() {
        let mut msrs = bochs_skylake_x();
        msrs.feature_control = FeatureControl::LOCKED.bits();
        assert_eq!(probe(true, 39, || msrs), Err(VmxAbsent::DisabledByFirmware));
        // Unlocked: we may still set and lock it ourselves.
        msrs.feature_control = 0;
        assert!(probe(true, 39, || msrs).is_ok());
    }

    #[test]
    fn msrs_are_read_only_when_they_exist() {
        // No secondary controls: PROCBASED_CTLS2, EPT_VPID_CAP and VMFUNC stay unread.
        let mut read = std::vec::Vec::new();
        let msrs = VmxMsrs::read(|index| {
            read.push(index);
            match index {
                msr::IA32_VMX_BASIC => 0,
                _ => 0x0000_0000_ffff_ffff,
            }
        });
        assert_eq!(msrs.procbased2, 0);
        assert!(!read.contains(&msr::IA32_VMX_PROCBASED_CTLS2));
        assert!(!read.contains(&msr::IA32_VMX_EPT_VPID_CAP));
        assert!(
            read.contains(&msr::IA32_VMX_PROCBASED_CTLS),
            "no true controls: plain MSR"
        );
    }

    #[test]
    fn adjust_sets_required_and_drops_unsupported_bits() {
        let allowed = AllowedBits {
            must_be_one: 0b0001,
            may_be_one: 0b0111,
        };
        assert_eq!(allowed.adjust(0b1010), (0b0011, 0b1000));
    }
}
