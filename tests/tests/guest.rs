//! The hypervisor running the test guest (tests/guest) in Bochs: what the
//! guest sees, what it may not touch, and how its run ends.

use hv_tests::{Boot, Engine, Run, exit};

/// Status of a run whose guest the hypervisor stopped (hv-boot `vmm::GUEST_STOPPED`).
const GUEST_STOPPED: u8 = 4;

fn run(hv_cmdline: &str, scenarios: &str) -> Run {
    Boot::new(Engine::Bochs)
        .cmdline(hv_cmdline)
        .guest(scenarios)
        .run()
}

#[test]
fn guest_sees_its_memory_map_cpuid_leaf_msrs_io_and_hypercalls() {
    let run = run("", "");
    run.expect_exit(exit::OK)
        .expect_line("guest: boot: Multiboot2")
        .expect_line("guest: memmap: 0x100000..0x2000000 Available")
        .expect_line(
            "guest: cpuid: leaf 0x40000000: max 0x40000001, signature Ok(\"RustAltp2mHV\")",
        )
        .expect_line("guest: msr: APIC base 0xfee00900 disabled and re-enabled")
        .expect_line("guest: local APIC disabled (the physical APIC stays where it is)")
        .expect_line("guest: hypercall: exits so far:")
        .expect_line("guest: result: 5 passed, 0 failed")
        .expect_line("vmm: guest exited with status 0")
        .expect_line("exits: ");
    for scenario in ["memmap", "cpuid", "msr", "io", "hypercall"] {
        run.expect_line(&format!("guest: PASS {scenario}"));
    }
    run.expect_torn_down_cleanly();
    run.clean_up();
}

#[test]
fn the_guest_status_becomes_the_run_status() {
    let run = run("guest.mem=16", "memmap exit=7");
    run.expect_exit(7)
        .expect_line("guest: PASS memmap")
        .expect_line("guest: memmap: 0x100000..0x1000000 Available");
    run.expect_torn_down_cleanly();
    run.clean_up();
}

#[test]
fn a_multiboot1_start_gives_the_guest_a_multiboot1_map() {
    let run = run("guest.multiboot=1", "memmap");
    run.expect_exit(exit::OK)
        .expect_line("Multiboot 1 entry")
        .expect_line("guest: boot: Multiboot1")
        .expect_line("guest: PASS memmap");
    run.clean_up();
}

#[test]
fn the_guest_cannot_reach_memory_outside_its_ram() {
    let run = run("", "isolation");
    run.expect_exit(exit::OK)
        .expect_line("EPT violation: read of 0xfed00000")
        .expect_line("EPT violation: write of 0x3b0000000")
        .expect_line("not guest memory (#GP injected)")
        .expect_line("guest: PASS isolation");
    let probes = run.line("guest: isolation:").expect("summary line");
    assert!(
        probes.contains("128 probes outside RAM") && probes.contains("128 refused with #GP"),
        "{probes}"
    );
    run.expect_torn_down_cleanly();
    run.clean_up();
}

#[test]
fn a_guest_triple_fault_stops_it_with_a_report() {
    let run = run("", "triple-fault");
    run.expect_exit(GUEST_STOPPED)
        .expect_line("ERROR guest stopped: triple fault")
        .expect_line("RIP ")
        .expect_line("IDTR limit                   0x0")
        .expect_no_line("PASS");
    run.expect_torn_down_cleanly();
    run.clean_up();
}

#[test]
fn an_instruction_the_hypervisor_does_not_handle_stops_the_guest() {
    let run = run("", "unhandled");
    run.expect_exit(GUEST_STOPPED)
        .expect_line("guest stopped: unhandled VM exit INVD (reason 13)");
    run.expect_torn_down_cleanly();
    run.clean_up();
}

#[test]
fn bad_guest_images_are_refused_with_the_reason() {
    let guest = std::fs::read(hv_tests::test_guest_image()).unwrap();
    let cases: [(&str, Vec<u8>, &str); 2] = [
        (
            "garbage",
            b"this is not a kernel".repeat(100),
            "bad guest image: neither a Multiboot 1/2 image nor a Linux bzImage",
        ),
        (
            "truncated",
            guest[..0x3000].to_vec(),
            "bad guest image: truncated or corrupt ELF headers",
        ),
    ];
    for (name, bytes, message) in cases {
        let path = hv_tests::scratch_file(name, &bytes);
        let mut boot = Boot::new(Engine::Bochs);
        boot.modules.push((path.clone(), String::new()));
        let run = boot.run();
        let _ = std::fs::remove_file(&path);
        run.expect_exit(GUEST_STOPPED)
            .expect_line(message)
            .expect_no_line("vmx: launching");
        run.clean_up();
    }
}

#[test]
fn without_vmx_a_guest_is_refused_cleanly() {
    let run = Boot::new(Engine::QemuTcg).guest("").run();
    run.expect_exit(GUEST_STOPPED)
        .expect_line("vmx: absent")
        .expect_line("this CPU cannot run it without VMX");
    run.clean_up();
}

#[test]
fn a_cpu_without_a_needed_vmx_feature_is_named() {
    let mut boot = Boot::new(Engine::Bochs).guest("");
    boot.cpu_model = "core2_penryn_t9600".into();
    let run = boot.run();
    run.expect_exit(GUEST_STOPPED)
        .expect_line("vmx: features ept=0")
        .expect_line("vmm: guest refused: this CPU's VMX lacks EPT, which the hypervisor needs")
        .expect_no_line("vmx: launching");
    run.clean_up();
}
