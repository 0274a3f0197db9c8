//! The guest's platform (docs/platform.md), driven by the test guest in
//! Bochs: its own timers and interrupts with no VM exit, NMIs forwarded,
//! no interrupt lost to an exit, #VE and interrupts in the SDM's order,
//! IA32_APIC_BASE virtualized, ACPI tables that describe it, modules
//! intact, resets and ACPI S5 ending the run, and the isolation sweep with
//! interrupts on. The last test boots the guest without the hypervisor, the
//! cross-check that tells hypervisor bugs from guest bugs (ignored by
//! default: run it with `--ignored`).

use hv_tests::{Boot, Engine, Run, exit};

fn run(hv_cmdline: &str, scenarios: &str) -> Run {
    Boot::new(Engine::Bochs)
        .cmdline(hv_cmdline)
        .guest(scenarios)
        .run()
}

/// The hypervisor's per-reason exit summary line.
fn exit_summary(run: &Run) -> String {
    run.line("INFO  exits: ")
        .unwrap_or_else(|| panic!("no exit summary\n{}", run.report()))
}

const TIMERS: [&str; 7] = [
    "madt",
    "lapic-timer",
    "pit",
    "hlt-wakes",
    "self-ipi",
    "nmi",
    "cr0",
];

#[test]
fn the_guest_owns_its_timers_interrupts_and_halts_and_its_tables_describe_it() {
    let run = run("", &TIMERS.join(" "));
    run.expect_scenarios_passed(&TIMERS);
    // The hypervisor's tables: one processor, its PM1a block, S5 = 5.
    run.expect_line("madt: tables through the BIOS-area scan")
        .expect_line("processors [Cpu { apic_id: 0, enabled: true }]")
        .expect_line("madt: PM1a_CNT port Some(604), \\_S5 SLP_TYPa Some(5)")
        .expect_line("guest: hlt-wakes: 20 HLTs, 0 not woken by exactly one tick")
        .expect_line("HLT exits 0")
        .expect_line("guest: nmi: NMI IPI to APIC id 0: 1 NMI(s) at vector 2; NMI exits 1")
        .expect_line("guest: cr0: at start 0x80010011;");
    // Timer interrupts, HLT and the PIC never exit; the NMI does, once.
    let summary = exit_summary(&run);
    for absent in ["external interrupt", "HLT", "interrupt window"] {
        assert!(!summary.contains(absent), "{summary}\n{}", run.report());
    }
    assert!(summary.contains("exception or NMI 1"), "{summary}");
    run.clean_up();
}

#[test]
fn no_interrupt_is_lost_during_exits_and_ve_goes_before_a_pending_interrupt_as_the_sdm_says() {
    let run = run("", "irq-during-exit ve-and-timer");
    run.expect_scenarios_passed(&["irq-during-exit", "ve-and-timer"]);
    run.expect_line("guest: irq-during-exit: 50 rounds")
        .expect_line("50 ticks over 50 periods")
        .expect_line("pending interrupt, then a write raising #VE: [64, 20]; the write in the STI shadow: [20, 64]")
        .expect_line("(1 EPT-violation exits): [20, 64]");
    run.clean_up();
}

#[test]
fn apic_base_disable_enable_and_relocation_leave_the_hypervisors_tick_and_console_working() {
    let run = run("", "apic-base");
    run.expect_scenarios_passed(&["apic-base"]);
    run.expect_line("guest: local APIC disabled (the physical APIC stays where it is)")
        .expect_line("guest: local APIC enabled (the physical APIC stays where it is)")
        .expect_line("apic-base: disabled: the page read 0xffffffff, 0 ticks in 10 periods")
        .expect_line("apic-base: relocated to 0x1c00000: version 0x50014, id 0; the old page: Err(d); ticks there: true")
        .expect_line("EPT violation: read of 0xfee00030")
        .expect_line("apic-base: the hypervisor's tick afterwards: 3 VMX-preemption-timer exits")
        // The hypervisor's console still prints after it all.
        .expect_line("vmm: guest exited with status 0");
    run.clean_up();
}

/// A module of `size` bytes that no run of zeros or repetition could fake.
fn module_bytes(size: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn a_module_reaches_the_guest_intact_through_multiboot_2_and_1() {
    let bytes = module_bytes(300_001);
    let checksum = hv_abi::display_checksum(bytes.iter().copied());
    let path = hv_tests::scratch_file("guest-module", &bytes);
    for (hv_cmdline, loader) in [("", "Multiboot2"), ("guest.multiboot=1", "Multiboot1")] {
        let mut boot = Boot::new(Engine::Bochs).cmdline(hv_cmdline).guest(&format!(
            "modules module={}:{checksum:x}:payload",
            bytes.len()
        ));
        boot.modules
            .push((path.clone(), "payload second-word".into()));
        let run = boot.run();
        run.expect_scenarios_passed(&["modules"]);
        run.expect_line(&format!("guest: modules: 1 module(s) ({loader})"))
            .expect_line(&format!("300001 bytes, checksum {checksum:#x}"))
            .expect_line("command line 'payload second-word'");
        run.clean_up();
    }
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_module_that_differs_fails_the_check() {
    let bytes = module_bytes(4096);
    let checksum = hv_abi::display_checksum(bytes.iter().copied());
    let mut changed = bytes.clone();
    changed[4000] ^= 1;
    let path = hv_tests::scratch_file("changed-module", &changed);
    let mut boot = Boot::new(Engine::Bochs).guest(&format!("modules module=4096:{checksum:x}"));
    boot.modules.push((path.clone(), String::new()));
    let run = boot.run();
    let _ = std::fs::remove_file(&path);
    run.expect_exit(1)
        .expect_line("guest: FAIL modules: the module's contents differ");
    run.clean_up();
}

#[test]
fn every_reset_path_ends_the_run_with_the_reset_status() {
    for (scenario, path) in [
        ("reset-i8042", "the i8042 keyboard controller"),
        ("reset-cf9", "the reset control register (0xCF9)"),
        ("reset-92", "port 0x92"),
    ] {
        let run = run("", scenario);
        run.expect_exit(exit::GUEST_RESET)
            .expect_line(&format!("vmm: guest reset the machine through {path}"))
            .expect_no_line("still running");
        run.expect_torn_down_cleanly();
        run.clean_up();
    }
}

#[test]
fn acpi_s5_through_the_fadts_port_powers_off() {
    let run = run("", "acpi-s5");
    run.expect_exit(exit::GUEST_POWERED_OFF)
        .expect_line("acpi-s5: PM1a_CNT port 0x604 reads 0x1; writing 0x3401 (SLP_TYP 5, SLP_EN)")
        .expect_line("vmm: guest powered off (ACPI S5)")
        .expect_no_line("still running");
    run.expect_torn_down_cleanly();
    run.clean_up();
}

#[test]
fn isolation_holds_with_interrupts_on_pci_config_space_and_isa_dma_included() {
    let run = run("", "ticking isolation");
    run.expect_scenarios_passed(&["ticking", "isolation"]);
    run.expect_line("isolation: 128 probes outside RAM (end 0x2000000), 128 refused with #GP")
        .expect_line("function 0 of 256 x 32 bus/device pairs: 0 answered; CONFIG_ADDRESS reads 0xffffffff")
        .expect_line("ISA DMA to 0xe00000 through channels 1 and 5: 0 bytes changed; 0 of 10 controller registers answered");
    run.clean_up();
}

#[test]
fn an_idle_guest_costs_only_the_hypervisors_tick() {
    let run = run("", "idle-bench");
    run.expect_scenarios_passed(&["idle-bench"]);
    let exits = run
        .line("guest: idle-bench: exit reason ")
        .unwrap_or_else(|| panic!("{}", run.report()));
    // The guest's timer and HLT never exit: what is left is the tick.
    assert!(exits.contains("(preemption timer)"), "{}", run.report());
    assert_eq!(
        run.lines()
            .filter(|l| l.contains("guest: idle-bench: exit reason "))
            .count(),
        1,
        "{}",
        run.report()
    );
    run.clean_up();
}

/// The scenarios that need no hypervisor, on bare Bochs (GRUB boots the
/// test guest itself): they pass there too, against the firmware's own
/// tables. A failure here is the guest's or the emulator's, not the
/// hypervisor's.
#[test]
#[ignore = "a cross-check of the test guest itself; run with --ignored"]
fn without_the_hypervisor_the_platform_scenarios_pass_on_bare_bochs() {
    let run = Boot::new(Engine::Bochs).bare_guest(&TIMERS.join(" ")).run();
    println!("{}", run.report());
    for s in TIMERS {
        run.expect_line(&format!("guest: PASS {s}"));
    }
    run.expect_line("guest: madt: tables through the loader's RSDP tag")
        .expect_line(&format!("guest: result: {} passed, 0 failed", TIMERS.len()))
        .expect_line("guest: test guest: exit 0 (no hypervisor");
    run.clean_up();
}

/// On bare Bochs each reset path resets the machine (Bochs logs a reset
/// after the one at power-on).
#[test]
#[ignore = "a cross-check of the test guest itself; run with --ignored"]
fn without_the_hypervisor_each_reset_path_resets_bare_bochs() {
    for scenario in ["reset-i8042", "reset-cf9", "reset-92"] {
        let mut boot = Boot::new(Engine::Bochs).bare_guest(scenario);
        boot.timeout = std::time::Duration::from_secs(60);
        let run = boot.run();
        println!("{}", run.report());
        let resets = run
            .emulator_log
            .lines()
            .filter(|l| l.contains("bx_pc_system_c::Reset("))
            .count();
        assert!(resets >= 2, "{scenario}: no reset\n{}", run.report());
        run.expect_line(&format!("guest: {scenario}: "))
            .expect_no_line("still running");
        run.clean_up();
    }
}

/// On bare Bochs, S5 through the firmware's FADT and DSDT powers off.
#[test]
#[ignore = "a cross-check of the test guest itself; run with --ignored"]
fn without_the_hypervisor_acpi_s5_powers_bare_bochs_off() {
    let run = Boot::new(Engine::Bochs).bare_guest("acpi-s5").run();
    println!("{}", run.report());
    run.expect_line("acpi-s5: PM1a_CNT port 0xb004 reads 0x0; writing 0x2000 (SLP_TYP 0, SLP_EN)")
        .expect_no_line("still running");
    assert!(
        run.emulator_log.contains("ACPI control: soft power off"),
        "{}",
        run.report()
    );
    run.clean_up();
}

/// On bare Bochs, GRUB's own Multiboot 2 module reaches the guest intact.
#[test]
#[ignore = "a cross-check of the test guest itself; run with --ignored"]
fn without_the_hypervisor_a_module_from_grub_arrives_intact() {
    let bytes = module_bytes(300_001);
    let checksum = hv_abi::display_checksum(bytes.iter().copied());
    let path = hv_tests::scratch_file("bare-module", &bytes);
    let mut boot = Boot::new(Engine::Bochs).bare_guest(&format!(
        "modules module={}:{checksum:x}:payload",
        bytes.len()
    ));
    boot.modules
        .push((path.clone(), "payload second-word".into()));
    let run = boot.run();
    let _ = std::fs::remove_file(&path);
    println!("{}", run.report());
    run.expect_line("guest: PASS modules")
        .expect_line("guest: result: 1 passed, 0 failed");
    run.clean_up();
}
