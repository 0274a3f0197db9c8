//! Boots the hypervisor kernel in Bochs and QEMU and checks what its serial log says.

use std::thread;

use hv_tests::{Boot, Engine, Run, exit};

fn boot(engine: Engine, cmdline: &str) -> Run {
    Boot::new(engine).cmdline(cmdline).run()
}

#[test]
fn bochs_boot_reports_memory_map_cpus_and_vmx_features() {
    let mut config = Boot::new(Engine::Bochs).cmdline("loglevel=info");
    config.cpus = 2;
    let run = config.run();
    run.expect_exit(exit::OK)
        .expect_line("INFO  boot: Multiboot2, command line 'loglevel=info'")
        .expect_line("memory map: 0x000000100000..")
        .expect_line("acpi: 2 CPUs, APIC ids [0, 1]")
        .expect_line(
            "vmx: features ept=1 ept-2m=1 ept-1g=1 ept-ad=1 ept-xo=1 vpid=1 unrestricted=1 \
             vmfunc=1 eptp-switching=1 ve=1 pml=1",
        )
        .expect_line("hv: ready");
    run.clean_up();
}

#[test]
fn qemu_tcg_boot_reports_vmx_absent_and_exits_cleanly() {
    let run = boot(Engine::QemuTcg, "loglevel=info");
    run.expect_exit(exit::OK)
        .expect_line("boot: Multiboot2")
        .expect_line("acpi: 1 CPUs")
        .expect_line("vmx: absent (CPUID.1:ECX.VMX = 0)")
        .expect_line("hv: ready");
    run.clean_up();
}

#[test]
fn qemu_direct_kernel_boots_through_multiboot1() {
    let mut config = Boot::new(Engine::QemuTcg).cmdline("loglevel=info");
    config.qemu_direct_kernel = true;
    let run = config.run();
    run.expect_exit(exit::OK)
        .expect_line("boot: Multiboot1")
        .expect_line("memory map:")
        .expect_line("hv: ready");
    run.clean_up();
}

#[test]
fn a_panic_ends_the_run_with_its_message_and_a_failure_status() {
    let run = boot(Engine::QemuTcg, "selftest=panic");
    run.expect_exit(exit::PANIC)
        .expect_line("hv: panic at hv-boot/src/main.rs:")
        .expect_line("selftest: deliberate panic")
        .expect_no_line("hv: ready");
    run.clean_up();
}

#[test]
fn a_page_fault_in_bochs_ends_the_run_with_a_register_report() {
    let run = boot(Engine::Bochs, "selftest=pagefault");
    run.expect_exit(exit::CPU_EXCEPTION)
        .expect_line("hv: CPU exception #PF page fault (vector 14) error code 0x0")
        .expect_line("cr2 0x0000004000000000 (faulting address)")
        .expect_line("rip 0x")
        .expect_line("rax 0x")
        .expect_no_line("hv: ready");
    run.clean_up();
}

#[test]
fn an_invalid_opcode_ends_the_run_with_a_failure_status() {
    let run = boot(Engine::QemuTcg, "selftest=ud");
    run.expect_exit(exit::CPU_EXCEPTION)
        .expect_line("hv: CPU exception #UD invalid opcode (vector 6)");
    run.clean_up();
}

#[test]
fn unknown_command_line_options_and_bad_values_are_reported() {
    let run = boot(Engine::QemuTcg, "frobnicate=1 loglevel=loud");
    run.expect_exit(exit::OK)
        .expect_line("WARN  cmdline: unknown option 'frobnicate=1' (ignored)")
        .expect_line("WARN  cmdline: bad value 'loud' for loglevel");
    run.clean_up();
}

#[test]
fn frame_allocator_never_hands_out_kernel_or_module_frames() {
    // A module of 1 MiB plus a page: the allocator must keep all of it.
    let dir = hv_tests::workspace_root().join("target/runs");
    std::fs::create_dir_all(&dir).unwrap();
    let module = dir.join(format!("module-{}.bin", std::process::id()));
    std::fs::write(&module, vec![0xa5u8; (1 << 20) + 4096]).unwrap();
    let mut config = Boot::new(Engine::Bochs).cmdline("selftest=frames");
    config.modules.push((module.clone(), "payload".into()));
    let run = config.run();
    let _ = std::fs::remove_file(&module);
    run.expect_exit(exit::OK)
        .expect_line("boot: module 0x")
        .expect_line(", 0 forbidden,");
    let line = run.line("selftest: frames: took").expect("selftest line");
    // "took N of M free frames, 0 forbidden, K free after": N == M == K.
    let numbers: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    assert!(
        numbers.len() >= 4 && numbers[0] == numbers[1] && numbers[1] == numbers[3],
        "{line}"
    );
    assert!(
        numbers[0] > 60_000,
        "a 256 MiB machine should have most frames free: {line}"
    );
    run.clean_up();
}

#[test]
fn two_emulators_at_once_do_not_collide() {
    let runs: Vec<Run> = ["first", "second"]
        .map(|name| thread::spawn(move || boot(Engine::Bochs, &format!("loglevel=info {name}"))))
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    for (run, name) in runs.iter().zip(["first", "second"]) {
        run.expect_exit(exit::OK)
            .expect_line(&format!("unknown option '{name}'"));
    }
    assert_ne!(runs[0].dir, runs[1].dir);
    runs.iter().for_each(Run::clean_up);
}

/// The control channel (docs/control.md): both emulators take the pty as
/// COM3, and a tool writing to it while the hypervisor runs (it has no
/// control server yet, so nothing answers) changes nothing of the run.
#[test]
fn both_emulators_take_the_control_channel_as_com3() {
    for engine in [Engine::Bochs, Engine::QemuTcg] {
        let mut running = Boot::new(engine)
            .cmdline("loglevel=info")
            .control(true)
            .start();
        let pty = running.control_path().expect("a control pty").to_path_buf();
        let mut host = running.control().expect("the host side");
        let mut hello = [0u8; hv_ctl::protocol::MAX_FRAME];
        let n = hv_ctl::protocol::Message::Command {
            seq: 1,
            command: hv_ctl::protocol::Command::Hello {
                version: 1,
                liveness_ms: 0,
            },
        }
        .encode(&mut hello)
        .unwrap();
        hv_ctl::Transport::send(&mut host, &hello[..n]).unwrap();
        let run = running.wait();
        run.expect_exit(exit::OK).expect_line("hv: ready");
        if engine == Engine::Bochs {
            assert!(
                run.emulator_log
                    .contains("com3 at 0x03e8 irq 4 (mode: term)"),
                "{}",
                run.report()
            );
        }
        assert!(pty.starts_with("/dev/pts/"));
        run.clean_up();
    }
}
