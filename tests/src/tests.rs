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
    let config = Boot::new(Engine::Bochs).bochs_config(Path::new("/x/hv.iso"), None);
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
    fake_start(engine, script, timeout, false).wait()
}

/// Starts `script` as the emulator of `engine`, with or without the
/// control channel.
fn fake_start(engine: Engine, script: &str, timeout: Duration, control: bool) -> Running {
    let dir = new_run_dir(engine);
    let program = dir.join("fake-emulator");
    fs::write(&program, format!("#!/bin/sh\n{script}\n")).unwrap();
    fs::set_permissions(&program, fs::Permissions::from_mode(0o755)).unwrap();
    let mut boot = Boot::new(engine).control(control);
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
    let run = boot.boot(dir, &medium).wait();
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
fn the_time_to_linux_init_is_when_its_first_line_reached_the_guest_console() {
    // The hypervisor is ready at once; init starts about a second later,
    // and the emulator runs on, as Linux does after init's first line.
    let run = fake_run(
        Engine::Bochs,
        "echo 'hv: ready' > serial.txt\nsleep 1\n\
         echo 'hv-linux-init: started (tsc 6000, uptime 2.00)' > guest.txt\nsleep 1\n\
         echo 'hv: exit 0' >> serial.txt",
        10 * SECOND,
    );
    run.expect_exit(0);
    let (ready, init) = (run.ready_after.unwrap(), run.init_after.unwrap());
    assert!(ready < init, "{ready:?}, {init:?}");
    assert!(
        init >= SECOND && init <= run.wall,
        "{init:?} of {:?}",
        run.wall
    );
    // The fake emulator slept: it used far less CPU than wall time.
    let cpu = run.init_cpu.expect("the emulator's CPU time from /proc");
    assert!(cpu < init / 2, "{cpu:?} of CPU in {init:?}");
    run.clean_up();
    // Only the guest's console counts: the line in the hypervisor's log is not init.
    let run = fake_run(
        Engine::Bochs,
        "printf 'hv-linux-init: started\\nhv: exit 0\\n' > serial.txt",
        10 * SECOND,
    );
    assert_eq!(run.init_after, None);
    run.clean_up();
}

#[test]
fn cpu_time_is_utime_plus_stime_whatever_the_command_name() {
    // Fields 14 and 15 after a name with spaces and a parenthesis.
    let stat = "4242 (bochs (x) bin) R 1 2 3 4 5 6 7 8 9 10 1234 66 0 0 20 0 1 0";
    assert_eq!(parse_cpu_time(stat), Some(Duration::from_millis(13_000)));
    assert_eq!(parse_cpu_time("4242 (short) R 1 2"), None);
    assert_eq!(parse_cpu_time("garbage"), None);
    // This process's own line parses.
    let own = fs::read_to_string("/proc/self/stat").unwrap();
    assert!(parse_cpu_time(&own).is_some(), "{own}");
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

/// Echoes the control channel's bytes back (`cat` on the pty the emulator
/// was given), then ends the run, as an emulator whose guest echoes COM3.
fn echo_through(engine: Engine, find_pty: &str) {
    let script = format!(
        "pty=$({find_pty})\n\
         [ -c \"$pty\" ] || {{ echo \"no pty: $pty\" >&2; exit 9; }}\n\
         head -c 5 < \"$pty\" > \"$pty\"\n\
         printf 'hv: exit 0\\n' > serial.txt"
    );
    let mut running = fake_start(engine, &script, 20 * SECOND, true);
    let pty = running.control_path().unwrap().to_path_buf();
    let mut host = running.control().expect("the host side, once");
    assert!(running.control().is_none());
    host.send(b"hello").unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 16];
    while got.len() < 5 {
        let n = hv_ctl::Transport::recv(&mut host, &mut buf, 10 * SECOND).unwrap();
        assert!(n > 0, "no echo within 10 s");
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got, b"hello");
    let run = running.wait();
    run.expect_exit(0);
    assert!(pty.starts_with("/dev/pts/"), "{}", pty.display());
    run.clean_up();
}

use hv_ctl::Transport as _;

#[test]
fn bochs_gets_the_control_pty_as_com3_in_term_mode() {
    let config = Boot::new(Engine::Bochs)
        .bochs_config(Path::new("/x/hv.iso"), Some(Path::new("/dev/pts/7")));
    assert!(
        config
            .lines()
            .any(|l| l == "com3: enabled=1, mode=term, dev=/dev/pts/7"),
        "{config}"
    );
    echo_through(
        Engine::Bochs,
        "sed -n 's/^com3: enabled=1, mode=term, dev=//p' hv.bxrc",
    );
}

#[test]
fn qemu_gets_the_control_pty_as_its_third_serial_port() {
    // The arguments after the second `-serial file:...` one.
    echo_through(
        Engine::QemuTcg,
        "n=0; for a in \"$@\"; do if [ \"$prev\" = -serial ]; then n=$((n+1)); [ $n = 3 ] && echo \"$a\"; fi; prev=$a; done",
    );
}

#[test]
fn without_control_there_is_no_com3() {
    let config = Boot::new(Engine::Bochs).bochs_config(Path::new("/x/hv.iso"), None);
    assert!(!config.contains("com3"), "{config}");
}

#[test]
fn the_bridge_serves_the_channel_to_one_client_after_another() {
    let mut channel = control::Channel::open().unwrap();
    let socket = new_run_dir(Engine::Bochs).join("control.sock");
    control::bridge(channel.host.take().unwrap(), &socket).unwrap();
    // The emulator's side of the pty.
    let mut emulator = hv_ctl::Serial::open(&channel.path).unwrap();
    for round in 0..2u8 {
        let mut client = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        client.send(&[b'a' + round; 3]).unwrap();
        let mut buf = [0u8; 8];
        let mut got = Vec::new();
        while got.len() < 3 {
            let n = emulator.recv(&mut buf, 10 * SECOND).unwrap();
            assert!(n > 0, "nothing reached the emulator");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, [b'a' + round; 3]);
        emulator.send(b"xyz").unwrap();
        got.clear();
        while got.len() < 3 {
            let n = client.recv(&mut buf, 10 * SECOND).unwrap();
            assert!(n > 0, "nothing reached the client");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, b"xyz");
        drop(client);
    }
}
