//! The harness's own tests: exit lines, engine names, the Bochs configuration,
//! and how a failing emulator is reported. Fake emulators (shell scripts) play
//! the failures, so these run in milliseconds and need no emulator installed.

use std::os::unix::fs::PermissionsExt;

use super::*;

#[test]
fn exit_status_is_read_from_the_last_exit_line() {
    assert_eq!(parse_exit_status("hv: exit 3\nhv: exit 0\n"), Some(0));
    assert_eq!(parse_exit_status("INFO x\nhv: exit 42"), Some(42));
    assert_eq!(parse_exit_status("hv: ready\n"), None);
    assert_eq!(parse_exit_status("hv: exit banana\n"), None);
}

#[test]
fn engine_names_round_trip() {
    for engine in [Engine::Bochs, Engine::QemuKvm, Engine::QemuTcg] {
        assert_eq!(Engine::parse(&engine.to_string()), Some(engine));
    }
    assert_eq!(Engine::parse("vmware"), None);
}

#[test]
fn the_bochs_configuration_keeps_off_host_sound_joystick_and_clock() {
    let config = Boot::new(Engine::Bochs).bochs_config(Path::new("/x/hv.iso"));
    let lines: Vec<&str> = config.lines().collect();
    // Issue 9: the speaker plugin loads ALSA, which aborts Bochs without a sound card.
    for line in [
        "plugin_ctrl: speaker=0, gameport=0, parallel=0",
        "sound: driver=dummy",
        "clock: sync=none, time0=946684800",
        "com1: enabled=1, mode=file, dev=guest.txt",
        "com2: enabled=1, mode=file, dev=serial.txt",
    ] {
        assert!(lines.contains(&line), "{line:?} missing from\n{config}");
    }
    // No NIC: nothing may use the host's network or /dev/net/tun.
    for nic in ["ne2k", "e1000", "pnic"] {
        assert!(!config.contains(nic), "{nic} in\n{config}");
    }
}

#[test]
fn tail_keeps_the_last_lines() {
    assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
    assert_eq!(tail("a\nb", 5), "a\nb");
    assert_eq!(tail("", 3), "");
}

/// Runs `script` as the emulator of `engine` (its working directory is the
/// run directory, as for the real one), with no real kernel or ISO.
fn fake_run(engine: Engine, script: &str, timeout: Duration) -> Run {
    let dir = new_run_dir(engine);
    let program = dir.join("fake-emulator");
    fs::write(&program, format!("#!/bin/sh\n{script}\n")).unwrap();
    fs::set_permissions(&program, fs::Permissions::from_mode(0o755)).unwrap();
    let mut boot = Boot::new(engine);
    boot.emulator = Some(program.display().to_string());
    boot.timeout = timeout;
    let medium = Medium {
        kernel: dir.join("no-kernel"),
        iso: Some(dir.join("no.iso")),
    };
    boot.boot(dir, &medium)
}

const SECOND: Duration = Duration::from_secs(1);

#[test]
fn an_emulator_killed_by_a_signal_is_a_harness_failure_named_by_its_signal() {
    // What Debian's Bochs did on a machine without a sound card (issue 9).
    let run = fake_run(
        Engine::Bochs,
        "echo 'ALSA lib pcm.c:2666:(snd_pcm_open_noupdate) Unknown PCM default' >&2\n\
         echo '*** buffer overflow detected ***: terminated' >&2\n\
         echo '00000000000i[PLUGIN] loaded plugin libbx_soundalsa.so' > bochs.log\n\
         kill -ABRT $$",
        10 * SECOND,
    );
    assert_eq!(run.emulator, EmulatorEnd::Killed(6));
    assert_eq!(
        run.outcome,
        Outcome::HarnessFailure("Bochs was killed by SIGABRT before the first serial byte".into())
    );
    let report = run.report();
    for text in [
        "HARNESS FAILURE",
        "Bochs was killed by SIGABRT",
        "*** buffer overflow detected ***: terminated",
        "loaded plugin libbx_soundalsa.so",
    ] {
        assert!(report.contains(text), "{text:?} missing from\n{report}");
    }
    let failed = std::panic::catch_unwind(|| {
        run.expect_exit(exit::OK);
    });
    let message = failed.expect_err("expect_exit must fail");
    let message = message.downcast_ref::<String>().unwrap();
    assert!(
        message.contains("HARNESS FAILURE, the hypervisor never ran: Bochs was killed by SIGABRT"),
        "{message}"
    );
    run.clean_up();
}

#[test]
fn an_emulator_that_exits_before_the_first_serial_byte_is_a_harness_failure() {
    // What Bochs does with a configuration it refuses.
    let run = fake_run(
        Engine::Bochs,
        "echo \"[      ] hv.bxrc:7: display library 'nogui' not available\" >&2\nexit 1",
        10 * SECOND,
    );
    assert_eq!(run.emulator, EmulatorEnd::Exited(1));
    assert!(run.outcome.is_harness_failure(), "{}", run.report());
    let report = run.report();
    assert!(
        report.contains("Bochs exited with code 1 before the first serial byte"),
        "{report}"
    );
    assert!(
        report.contains("display library 'nogui' not available"),
        "{report}"
    );
    run.clean_up();
}

#[test]
fn a_missing_emulator_is_a_harness_failure_that_says_what_is_missing() {
    let dir = new_run_dir(Engine::QemuTcg);
    let mut boot = Boot::new(Engine::QemuTcg);
    boot.emulator = Some("/nonexistent/qemu-system-x86_64".into());
    let medium = Medium {
        kernel: dir.join("no-kernel"),
        iso: None,
    };
    let run = boot.boot(dir, &medium);
    assert!(
        matches!(&run.emulator, EmulatorEnd::NotStarted(why) if why.contains("/nonexistent/qemu-system-x86_64")),
        "{:?}",
        run.emulator
    );
    assert!(run.outcome.is_harness_failure());
    assert!(run.report().contains("scripts/setup"), "{}", run.report());
    run.clean_up();
}

#[test]
fn an_emulator_dying_mid_run_is_reported_as_a_run_failure() {
    let run = fake_run(
        Engine::QemuTcg,
        "echo 'hv: starting' > serial.txt\necho 'qemu: fatal: oops' >&2\nkill -SEGV $$",
        10 * SECOND,
    );
    assert_eq!(run.outcome, Outcome::NoExitLine, "{}", run.report());
    let report = run.report();
    assert!(report.contains("QEMU was killed by SIGSEGV"), "{report}");
    assert!(report.contains("qemu: fatal: oops"), "{report}");
    assert!(report.contains("hv: starting"), "{report}");
    run.clean_up();
}

#[test]
fn the_exit_line_gives_the_status_whatever_the_emulator_exit_code() {
    let run = fake_run(
        Engine::Bochs,
        "printf 'hv: ready\\r\\nhv: exit 3\\r\\n' > serial.txt\nexit 1",
        10 * SECOND,
    );
    assert_eq!(run.outcome, Outcome::Exit(3), "{}", run.report());
    assert!(run.ready_after.is_some());
    run.expect_exit(3);
    run.clean_up();
}

#[test]
fn an_emulator_still_running_at_the_timeout_is_stopped_and_reported() {
    let run = fake_run(
        Engine::Bochs,
        "echo 'hv: starting' > serial.txt\nexec sleep 30",
        Duration::from_millis(300),
    );
    assert_eq!(run.outcome, Outcome::TimedOut);
    assert!(run.wall < 10 * SECOND, "the harness waited {:?}", run.wall);
    assert!(
        run.report().contains("Bochs was still running after 0.3 s"),
        "{}",
        run.report()
    );
    run.clean_up();
}
