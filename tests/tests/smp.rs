//! The test guest on two vCPUs in Bochs (`cpu: count=2`): it starts its AP
//! through INIT-SIPI-SIPI and runs the SMP scenarios (`tests/guest/src/
//! smp_scenarios.rs`) on both vCPUs at once.

use std::time::Duration;

use hv_tests::{Boot, Engine, Run};

fn run_on_two_cpus(scenarios: &str) -> Run {
    let mut boot = Boot::new(Engine::Bochs).cmdline("").guest(scenarios);
    boot.cpus = 2;
    // Two emulated CPUs run at half the speed of one, on a shared machine.
    boot.timeout = Duration::from_secs(600);
    boot.run()
}

/// The AP comes up through INIT-SIPI-SIPI; each vCPU on a view of its own,
/// switched by itself and by the other vCPU (a remote switch stands, and
/// once the call returned the target reads through its new view); VMFUNC
/// on both at once; a page dropped on one vCPU while the other reads it in
/// a loop, in view 0 and in a view switched to by VMFUNC: the reader
/// faults and never reads the old frame once the drop returned.
#[test]
fn the_test_guest_runs_views_vmfunc_and_a_drop_on_two_vcpus() {
    let scenarios = ["smp-bench", "smp", "smp-views", "smp-vmfunc", "smp-balloon"];
    // SIPI, SIPI without the INIT: Bochs 2.7 keeps an INIT pending after
    // the INIT VM exit (fixed in Bochs 2.8), so a vCPU that got one exits
    // with INIT again at every entry and never runs; its vCPU 1 waits for
    // SIPI from the start, as an AP after reset does.
    let run = run_on_two_cpus(&format!("ap-start=sipi {}", scenarios.join(" ")));
    run.expect_scenarios_passed(&scenarios)
        .expect_line("smp: vCPU 1 runs as APIC id 1, vCPU 0 as 0")
        .expect_line("smp-bench: per invalidation");
    println!("{}; {:.0?}", run.summary(), run.wall);
    for line in run
        .lines()
        .filter(|l| l.contains("smp-bench:") || l.contains("smp-balloon:"))
    {
        println!("{line}");
    }
    run.clean_up();
}
