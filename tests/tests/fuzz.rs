//! The hostile-guest fuzzer (tests/guest/src/fuzz) in Bochs: the test
//! guest makes seeded random operations of every kind at the hypervisor
//! (every hypercall with edge and random arguments, views, VMFUNC, #VE,
//! the balloon with markers, log-dirty, the display, the local APIC moved
//! onto RAM, control registers, MSRs, ports of every size, stray accesses
//! up to 1 TiB) and checks each result. The run must end with the fuzzer's
//! PASS, every frame back and the hypervisor's checksum unchanged.
//! Two fixed seeds run in the default suite; many seeds, other memory
//! sizes and altp2m modes, and the run-ending operations in the long one.

use std::time::Duration;

use hv_tests::{Boot, Engine, Run, exit};

/// Operations per seed in the default suite: about a minute of Bochs each
/// on the project's machine.
const CALLS: u64 = 4000;

fn fuzz(hv_cmdline: &str, guest: &str, timeout: Duration) -> Run {
    let mut boot = Boot::new(Engine::Bochs).cmdline(hv_cmdline).guest(guest);
    boot.timeout = timeout;
    boot.run()
}

/// The run passed the fuzzer for `seeds`, nothing panicked, the guest was
/// torn down cleanly; the per-seed summaries are returned for the log.
fn expect_clean(run: &Run, seeds: impl IntoIterator<Item = u64>) -> Vec<String> {
    run.expect_exit(exit::OK)
        .expect_line("guest: PASS fuzz")
        .expect_line("guest: result: 1 passed, 0 failed")
        .expect_no_line("hv: panic")
        .expect_no_line("FAIL")
        .expect_no_line("guest stopped");
    run.expect_torn_down_cleanly();
    seeds
        .into_iter()
        .map(|seed| {
            let prefix = format!("guest: fuzz: seed {seed}: ");
            let line = run
                .lines()
                .find(|l| l.starts_with(&prefix) && l.ends_with("result clean"))
                .map(|l| l.into_owned())
                .unwrap_or_else(|| panic!("no clean summary for seed {seed}\n{}", run.report()));
            assert!(line.contains(" calls (by class "), "{line}");
            line
        })
        .collect()
}

#[test]
fn fuzz_seed_1_leaves_the_hypervisor_intact() {
    let run = fuzz(
        "",
        &format!("fuzz seed=1 calls={CALLS}"),
        Duration::from_secs(300),
    );
    for line in expect_clean(&run, [1]) {
        eprintln!("{line}");
    }
    run.clean_up();
}

/// The second seed with 64 MiB of guest RAM: the arena (and the end of RAM
/// the buffers cross) elsewhere, more superpages.
#[test]
fn fuzz_seed_2_with_64_mib_leaves_the_hypervisor_intact() {
    let run = fuzz(
        "guest.mem=64",
        &format!("fuzz seed=2 calls={CALLS}"),
        Duration::from_secs(300),
    );
    run.expect_line("guest: fuzz: arena 0x3800000..0x4000000");
    for line in expect_clean(&run, [2]) {
        eprintln!("{line}");
    }
    run.clean_up();
}

/// Twenty seeds in four boots: 32 and 64 MiB of RAM in mode `mixed`, and
/// the modes `limited` and `external` (where the altp2m calls are refused).
#[test]
#[ignore = "long suite: scripts/test --long"]
fn fuzz_many_seeds_in_every_mode() {
    for (hv_cmdline, first, seeds) in [
        ("", 100, 8),
        ("guest.mem=64", 108, 6),
        ("altp2m=limited", 114, 3),
        ("altp2m=external", 117, 3),
    ] {
        let run = fuzz(
            hv_cmdline,
            &format!("fuzz seed={first} seeds={seeds} calls=3000"),
            Duration::from_secs(1200),
        );
        expect_clean(&run, first..first + seeds);
        run.expect_line(&format!(
            "guest: fuzz: {seeds} seeds from {first}: {} calls in all",
            seeds * 3000
        ));
        run.clean_up();
    }
}

/// After a seed's operations, with whatever state they left, the guest
/// ends the run one of the ways it may (the seed modulo 6 chooses): the
/// run ends that way, and every frame still comes back.
#[test]
#[ignore = "long suite: scripts/test --long"]
fn fuzz_then_every_way_a_guest_ends_the_run() {
    let mut seen = std::collections::BTreeSet::new();
    for seed in 1..=6 {
        let run = fuzz(
            "",
            &format!("fuzz-end seed={seed} calls=400"),
            Duration::from_secs(300),
        );
        let line = run
            .line("guest: fuzz-end: seed")
            .unwrap_or_else(|| panic!("the fuzzer did not reach its end\n{}", run.report()));
        let (status, hypervisor) = if line.contains("the exit port") {
            (42, "vmm: guest exited with status 42")
        } else if line.contains("i8042") {
            (
                exit::GUEST_RESET,
                "vmm: guest reset the machine through the i8042 keyboard controller",
            )
        } else if line.contains("port 0x92") {
            (
                exit::GUEST_RESET,
                "vmm: guest reset the machine through port 0x92",
            )
        } else if line.contains("port 0xcf9") {
            (
                exit::GUEST_RESET,
                "vmm: guest reset the machine through the reset control register (0xCF9)",
            )
        } else {
            (exit::GUEST_POWERED_OFF, "vmm: guest powered off (ACPI S5)")
        };
        run.expect_exit(status)
            .expect_line(hypervisor)
            .expect_no_line("still running")
            .expect_no_line("hv: panic");
        run.expect_torn_down_cleanly();
        seen.insert(hypervisor);
        run.clean_up();
    }
    assert_eq!(seen.len(), 5, "every way is covered: {seen:?}");
}
