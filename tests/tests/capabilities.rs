//! The altp2m suite on CPUs with fewer VMX features (issue 16): Bochs's
//! Skylake-X with the nested-KVM-like mask (VMFUNC but no #VE, no PML:
//! `vmx.mask=ve,pml`) and Bochs's Ivy Bridge (no VMFUNC, #VE, PML, 1 GiB pages or EPT A/D
//! flags). The test guest learns what is offered (CPUID leaf 0x40000001)
//! and takes the path that exists; the hypervisor's fallbacks are checked
//! by what the guest sees and by the boot report. (Everything unmasked:
//! `altp2m.rs`, one scenario per test.)

use hv_tests::{Boot, Engine, Run};

/// The altp2m suite, the seed's display scenario, the hidden breakpoint
/// and the balloon under aliases included, and the two figures.
const SUITE: [&str; 10] = [
    "altp2m",
    "memory-calls",
    "vmfunc",
    "ve",
    "hidden-breakpoint",
    "balloon",
    "display",
    "display-late",
    "vmfunc-bench",
    "display-bench",
];

fn run(cpu_model: &str, hv_cmdline: &str, scenarios: &str) -> Run {
    let mut boot = Boot::new(Engine::Bochs);
    boot.cpu_model = cpu_model.into();
    boot.cmdline(hv_cmdline).guest(scenarios).run()
}

/// The suite, and `ve-and-timer`, which needs #VE: it must say so (SKIP)
/// rather than pass or fail. With or without VMFUNC.
fn suite_without_ve(cpu_model: &str, hv_cmdline: &str, vmfunc: bool) -> Run {
    let run = run(
        cpu_model,
        hv_cmdline,
        &format!("{} ve-and-timer", SUITE.join(" ")),
    );
    run.expect_scenarios_passed(&SUITE)
        .expect_line(&format!(
            "guest: result: {} passed, 0 failed, 1 skipped",
            SUITE.len()
        ))
        .expect_line("guest: SKIP ve-and-timer: #VE is not offered")
        .expect_line("#VE off (denied accesses exit)");
    if vmfunc {
        // Without #VE the hypervisor reads the view a VMFUNC went to from
        // the EPTP: the scenario checks GET_VCPU_VIEW after VMFUNCs.
        run.expect_line("guest: features offered: 0x1 (vmfunc)")
            .expect_line("log-dirty by write protection, view switches by VMFUNC and hypercall")
            .expect_line("vmfunc: 101 switches cost 1 VM exits")
            .expect_line("vmfunc-bench: per switch: VMFUNC 0 exits");
    } else {
        // VMFUNC raises #UD, every hypercall switch is one exit.
        run.expect_line("guest: features offered: 0x0 (none)")
            .expect_line("log-dirty by write protection, view switches by hypercall (VMFUNC raises #UD)")
            .expect_line("vmfunc: not offered: VMFUNC raises #UD; 101 switches by hypercall cost 101 VMCALL exits")
            .expect_line("vmfunc-bench: per switch: VMFUNC not offered; hypercall 1 exits");
    }
    // The notify calls refuse, a denied write exits and is stepped.
    run.expect_line("ve: not offered: the notify calls answer EOPNOTSUPP; 2 denied writes took 2 EPT-violation exits and happened, 0 #VEs")
        .expect_line("monitor: access view=1 gfn=0x405 access=w entry=rx")
        // The seed scenario still works, through hypercall switches.
        .expect_line("guest: display: the periodic tick refreshed the display")
        .expect_line("hidden-breakpoint: read 0xb8 through the execute view, the call returned 42 and 42")
        .expect_line("balloon: after release: a sees G1 0x51, b sees G2 0x52 and G4 0x55")
        .expect_no_line("frozen display");
    // Write protection: a fault per dirty page, plus the refresh call and
    // the re-arm.
    let frames: Vec<(u64, u64)> = run
        .lines()
        .filter_map(|l| {
            let rest = l.split_once("display-bench: frame with ")?.1;
            let (pages, rest) = rest.split_once(" dirty pages: ")?;
            let exits = rest.split_once(" VM exits")?.0;
            Some((pages.parse().ok()?, exits.parse().ok()?))
        })
        .collect();
    assert_eq!(frames.len(), 4, "{}", run.report());
    for (pages, exits) in frames {
        assert!(
            exits > pages,
            "{pages} dirty pages cost {exits} exits\n{}",
            run.report()
        );
    }
    run
}

#[test]
fn on_skylake_x_without_ve_and_pml_like_nested_kvm_the_suite_takes_the_fallbacks() {
    let run = suite_without_ve("corei7_skylake_x", "vmx.mask=ve,pml", true);
    run.expect_line("vmx: masked (vmx.mask=, as if the CPU lacked them): ve pml")
        .expect_line("vmfunc=1 eptp-switching=1 ve=0 pml=0")
        // What was not masked stays.
        .expect_line("ept-1g=1 ept-ad=1");
    run.clean_up();
    // In `limited` mode the notify calls are the guest's, and refused
    // without #VE.
    let limited = run_limited("corei7_skylake_x", "vmx.mask=ve,pml altp2m=limited");
    limited.expect_line("guest: features offered: 0x1 (vmfunc)");
    limited.clean_up();
}

#[test]
fn on_ivy_bridge_without_vmfunc_ve_pml_1g_or_ad_the_suite_takes_the_fallbacks() {
    let run = suite_without_ve("corei7_ivy_bridge_3770k", "", false);
    run.expect_line("ept=1 ept-2m=1 ept-1g=0 ept-ad=0")
        .expect_line("vmfunc=0 eptp-switching=0 ve=0 pml=0")
        .expect_no_line("vmx: masked");
    run.clean_up();
    let limited = run_limited("corei7_ivy_bridge_3770k", "altp2m=limited");
    limited.expect_line("guest: features offered: 0x0 (none)");
    limited.clean_up();
}

#[test]
fn on_skylake_x_with_everything_the_suite_uses_vmfunc_ve_and_pml() {
    let all: Vec<&str> = SUITE.iter().copied().chain(["ve-and-timer"]).collect();
    let run = run("corei7_skylake_x", "", &all.join(" "));
    run.expect_scenarios_passed(&all)
        .expect_line("guest: features offered: 0xb (vmfunc ve pml)")
        .expect_line("log-dirty by PML, view switches by VMFUNC and hypercall, #VE on")
        .expect_line("vmfunc: 101 switches cost 1 VM exits")
        .expect_line("vmfunc-bench: per switch: VMFUNC 0 exits")
        .expect_line("ve: 2 #VEs; last: gpa 0x405010, qualification 0x1aa, view 1")
        .expect_no_line("SKIP")
        .expect_no_line("frozen display");
    run.clean_up();
}

fn run_limited(cpu_model: &str, hv_cmdline: &str) -> Run {
    let run = run(cpu_model, hv_cmdline, "mode-limited");
    run.expect_scenarios_passed(&["mode-limited"])
        .expect_line("refused: altp2m mode Limited");
    run
}
