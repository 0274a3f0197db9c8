//! The fallbacks, each on Bochs's Skylake-X with features masked
//! (`vmx.mask=`) as a CPU without them would report them: the VM takes
//! what exists, tells the guest (CPUID) and the tool (`CAPABILITIES`), and
//! the paths without the feature work.

use x86::vmx::vmcs::control::SecondaryControls as S;

use super::*;
use crate::abi::feature;
use crate::vmx::caps::{EptVpidCap, Masked};
use crate::vmx::vmcs::MissingFeature;

fn masked(mask: Masked) -> Machine {
    Machine::on(&caps().mask(mask), |_| {})
}

/// Leaf 0x40000001 EBX as the guest reads it.
fn cpuid_features(m: &mut Machine) -> u32 {
    m.vcpu.regs = GuestRegisters {
        rax: u64::from(crate::abi::CPUID_FEATURES),
        ..Default::default()
    };
    assert!(stopped(m.exit(ExitReason::Cpuid)).is_none());
    m.vcpu.regs.rbx as u32
}

fn secondary(m: &Machine) -> S {
    S::from_bits_truncate(m.vm.controls.secondary)
}

#[test]
fn the_guest_learns_what_each_mask_leaves_it() {
    // Bochs's Skylake-X has no monitor trap flag.
    let all = feature::VMFUNC | feature::VE | feature::PML;
    let cases = [
        (Masked::empty(), all),
        (Masked::VMFUNC, feature::VE | feature::PML),
        // Without #VE the view a VMFUNC went to is read from the EPTP.
        (Masked::VE, feature::VMFUNC | feature::PML),
        (Masked::PML, feature::VMFUNC | feature::VE),
        (Masked::EPT_1G, all),
        (Masked::EPT_AD, feature::VMFUNC | feature::VE),
        (Masked::VE | Masked::PML, feature::VMFUNC),
        (Masked::VMFUNC | Masked::VE | Masked::PML, 0),
    ];
    for (mask, want) in cases {
        let mut m = masked(mask);
        assert_eq!(cpuid_features(&mut m), want, "{mask:?}");
        assert_eq!(m.vm.features.abi_bits(), want, "{mask:?}");
        let s = secondary(&m);
        assert_eq!(
            s.contains(S::ENABLE_VM_FUNCTIONS),
            want & feature::VMFUNC != 0,
            "{mask:?}"
        );
        assert_eq!(
            s.contains(S::ENABLE_PML),
            want & feature::PML != 0,
            "{mask:?}"
        );
        assert_eq!(
            s.contains(S::EPT_VIOLATION_VE),
            want & feature::VE != 0,
            "{mask:?}"
        );
    }
}

#[test]
fn without_vmfunc_views_switch_by_hypercall_and_the_eptp_list_is_not_used() {
    let mut m = masked(Masked::VMFUNC);
    assert_eq!(m.call(call::ALTP2M_SET_STATE, &[1]), 0);
    let v = m.call(call::ALTP2M_CREATE_VIEW, &[access::RWX]) as u64;
    assert_eq!(m.call(call::ALTP2M_SWITCH_VIEW, &[v]), 0);
    assert_eq!(
        m.vmcs.read(control::EPTP_FULL),
        m.vm.altp2m.eptp(&m.vm.p2m, v as u16).unwrap()
    );
    assert_eq!(
        m.vmcs.read(control::EPTP_INDEX),
        v,
        "#VE still has the index"
    );
    assert_eq!(
        (
            m.vmcs.read(control::EPTP_LIST_ADDR_FULL),
            m.vmcs.read(control::VM_FUNCTION_CONTROLS_FULL)
        ),
        (0, 0),
        "no EPTP list, no VM function"
    );
    // With VM functions off the CPU raises #UD itself; the exit (a CPU
    // that exits anyway) gives the same.
    assert!(stopped(m.exit(ExitReason::Vmfunc)).is_none());
    assert_eq!(m.injected() & 0x8000_07ff, 0x8000_0306, "#UD");
    // The hypervisor does not read the EPTP index back: a stale one
    // cannot move the vCPU.
    crate::views::sync(&mut m.vm, &m.vcpu, 0).unwrap();
    assert_eq!(m.vm.altp2m.vcpu_view(0), Ok(v as u16));
    // Hiding a view needs no list: the hypercall switch still refuses it.
    assert_eq!(m.call(call::ALTP2M_SWITCH_VIEW, &[0]), 0);
    assert_eq!(m.call(call::ALTP2M_SET_VISIBILITY, &[v, 0]), 0);
    assert_eq!(m.call(call::ALTP2M_SWITCH_VIEW, &[v]), error::EINVAL);
    assert_eq!(m.call(call::ALTP2M_SET_STATE, &[0]), 0);
    assert_eq!(m.destroy().outstanding(), 0);
}

#[test]
fn without_ve_the_notify_calls_are_refused_and_denied_accesses_exit() {
    let mut m = masked(Masked::VE);
    assert!(!m.vm.features.ve && m.vm.features.vmfunc);
    m.call(call::ALTP2M_SET_STATE, &[1]);
    assert_eq!(
        m.call(call::ALTP2M_VCPU_ENABLE_NOTIFY, &[0x300]),
        error::EOPNOTSUPP
    );
    assert_eq!(
        m.call(call::ALTP2M_VCPU_DISABLE_NOTIFY, &[]),
        error::EOPNOTSUPP
    );
    assert_eq!(m.vcpu.ve_page, None);
    let v = m.call(call::ALTP2M_CREATE_VIEW, &[access::RWX]) as u64;
    m.call(call::ALTP2M_SET_MEM_ACCESS, &[v, 0x300, access::RX]);
    // Suppress-#VE bits are kept (a later CPU may use them), but mean nothing.
    assert_eq!(m.call(call::ALTP2M_SET_SUPPRESS_VE, &[v, 0x300, 0]), 0);
    m.call(call::ALTP2M_SWITCH_VIEW, &[v]);
    assert!(!secondary(&m).contains(S::EPT_VIOLATION_VE));
    assert_eq!(
        m.vmcs.read(control::SECONDARY_PROCBASED_EXEC_CONTROLS)
            & u64::from(S::EPT_VIOLATION_VE.bits()),
        0
    );
    m.vmcs.write(g::RFLAGS, 0x2);
    assert!(stopped(m.touch(0x30_0008, true)).is_none());
    assert!(
        m.platform.events[0].contains("action=step-in-view-0"),
        "{:?}",
        m.platform.events
    );
    assert_eq!(m.injected(), 0, "no #VE");
    assert_eq!(m.vmcs.read(control::EPTP_FULL), m.vm.p2m.eptp());
}

#[test]
fn without_ept_ad_nothing_that_needs_the_flags_is_on() {
    let m = masked(Masked::EPT_AD);
    assert!(!m.vm.features.pml);
    assert!(!m.vm.p2m.caps().ad_flags);
    assert_eq!(m.vm.p2m.eptp() & 1 << 6, 0, "A/D off in the EPTP");
    assert_eq!(m.vcpu.pml.frame(), None, "no PML buffer");
    assert!(!secondary(&m).contains(S::ENABLE_PML));
}

#[test]
fn without_large_ept_pages_guest_ram_uses_the_largest_the_cpu_has() {
    let m = masked(Masked::EPT_1G);
    assert!(!m.vm.p2m.caps().pages_1g);
    let ram = m.vm.p2m.get_entry(&m.platform, Gfn(0x200)).unwrap();
    assert_eq!(ram.order, hv_ept::Order::PAGE_2M, "2 MiB pages stay");
    // A CPU with 4 KiB EPT pages only.
    let mut msrs = bochs_skylake_x();
    msrs.ept_vpid_cap &= !(EptVpidCap::PAGE_2M | EptVpidCap::PAGE_1G).bits();
    let mut m = Machine::on(&VmxCaps::new(msrs, 46), |_| {});
    let ram = m.vm.p2m.get_entry(&m.platform, Gfn(0x200)).unwrap();
    assert_eq!(ram.order, hv_ept::Order::PAGE_4K);
    // Views copy what the host has.
    m.call(call::ALTP2M_SET_STATE, &[1]);
    let v = m.call(call::ALTP2M_CREATE_VIEW, &[access::RWX]) as u16;
    m.call(call::ALTP2M_SWITCH_VIEW, &[u64::from(v)]);
    assert_eq!(m.write_guest(0x20_0000), 1, "one lazy copy");
    let copied = m.vm.altp2m.view_p2m(v).unwrap();
    assert_eq!(
        copied.get_entry(&m.platform, Gfn(0x200)).unwrap().order,
        hv_ept::Order::PAGE_4K
    );
}

#[test]
fn without_ept_unrestricted_guest_or_the_preemption_timer_no_guest_runs() {
    let cases = [
        (S::ENABLE_EPT.bits(), "EPT"),
        (S::UNRESTRICTED_GUEST.bits(), "unrestricted guest"),
    ];
    for (bit, name) in cases {
        let mut msrs = bochs_skylake_x();
        msrs.procbased2 &= !(u64::from(bit) << 32);
        let mut platform = crate::testing::SimPlatform::new();
        let image = image();
        let refused = Vm::create(&VmxCaps::new(msrs, 46), &config(&image), &mut platform);
        assert_eq!(refused.err(), Some(VmError::Missing(MissingFeature(name))));
        assert_eq!(platform.outstanding(), 0, "nothing taken");
    }
    let mut msrs = bochs_skylake_x();
    let timer = x86::vmx::vmcs::control::PinbasedControls::VMX_PREEMPTION_TIMER.bits();
    msrs.pinbased &= !(u64::from(timer) << 32);
    let mut platform = crate::testing::SimPlatform::new();
    let image = image();
    let refused = Vm::create(&VmxCaps::new(msrs, 46), &config(&image), &mut platform);
    let why = refused.err().map(|e| std::format!("{e}"));
    assert_eq!(
        why.as_deref(),
        Some("this CPU's VMX lacks the VMX-preemption timer, which the hypervisor needs")
    );
}

#[test]
fn without_ve_a_vmfunc_switch_is_read_from_the_eptp_and_the_eptp_list_is_used() {
    let mut m = masked(Masked::VE);
    assert!(m.vm.features.vmfunc && !m.vm.features.ve);
    assert_eq!(m.call(call::ALTP2M_SET_STATE, &[1]), 0);
    let v = m.call(call::ALTP2M_CREATE_VIEW, &[access::RWX]) as u64;
    assert_eq!(m.vmcs.read(control::VM_FUNCTION_CONTROLS_FULL), 1);
    assert_eq!(
        m.vmcs.read(control::EPTP_LIST_ADDR_FULL),
        m.vm.altp2m.visible_list().hpa()
    );
    let features = m.vm.features;
    let sync = |m: &mut Machine| {
        let hardware = crate::views::where_hardware_is(&features, &m.vmcs);
        crate::views::sync(&mut m.vm, &m.vcpu, hardware)
    };
    // No VMFUNC since the entry: the EPTP the hypervisor wrote.
    assert_eq!(
        crate::views::where_hardware_is(&features, &m.vmcs),
        m.vm.p2m.eptp()
    );
    sync(&mut m).unwrap();
    assert_eq!(m.vm.altp2m.vcpu_view(0), Ok(0));
    // A VMFUNC to the view loads its EPTP.
    let there = m.vm.altp2m.eptp(&m.vm.p2m, v as u16).unwrap();
    m.vmcs.write(control::EPTP_FULL, there);
    sync(&mut m).unwrap();
    assert_eq!(m.vm.altp2m.vcpu_view(0), Ok(v as u16));
    m.vmcs.write(control::EPTP_FULL, m.vm.p2m.eptp());
    sync(&mut m).unwrap();
    assert_eq!(m.vm.altp2m.vcpu_view(0), Ok(0), "and back to view 0");
    // An EPTP no view has: corrupt state.
    m.vmcs.write(control::EPTP_FULL, there ^ 0x1000);
    assert!(sync(&mut m).is_err());
}

#[test]
fn without_ve_a_view_another_vcpu_vmfunced_to_cannot_be_destroyed() {
    let mut m = Machine::on(&caps().mask(Masked::VE), |c| c.apic_ids = &[0, 1]);
    m.call(call::ALTP2M_SET_STATE, &[1]);
    let v = m.call(call::ALTP2M_CREATE_VIEW, &[access::RWX]) as u64;
    let there = m.vm.altp2m.eptp(&m.vm.p2m, v as u16).unwrap();
    let coherence = m.vm.coherence;
    assert_eq!(coherence.enter(1), None);
    // vCPU 1's exit publishes the EPTP its VMFUNC loaded.
    m.platform.kicked_exit = Some((coherence, there));
    assert_eq!(m.call(call::ALTP2M_DESTROY_VIEW, &[v]), error::EBUSY);
    assert_eq!(m.vm.altp2m.is_visible(v as u16), Ok(true));
    if let Some(epoch) = coherence.enter(1) {
        coherence.flushed(1, epoch);
    }
    m.platform.kicked_exit = Some((coherence, m.vm.p2m.eptp()));
    assert_eq!(m.call(call::ALTP2M_DESTROY_VIEW, &[v]), 0);
}
