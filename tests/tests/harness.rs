//! `hv-run` itself, with fake emulators (shell scripts) in place of Bochs: what
//! it says and which code it exits with when the emulator fails, so a dying
//! emulator can never again pass as a run without a status (issue 9).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output};

/// Runs `hv-run --engine bochs --no-guest` with `script` as Bochs.
fn hv_run_with_fake_bochs(name: &str, script: &str) -> Output {
    hv_run_with_fake_bochs_and(name, script, &["--no-guest", "--timeout", "60"])
}

/// Runs `hv-run --engine bochs ARGS` with `script` as Bochs (in the run's
/// directory, as the real one).
fn hv_run_with_fake_bochs_and(name: &str, script: &str, args: &[&str]) -> Output {
    let dir = hv_tests::workspace_root().join("target/runs");
    fs::create_dir_all(&dir).unwrap();
    let program: PathBuf = dir.join(format!("fake-bochs-{name}-{}", std::process::id()));
    fs::write(&program, format!("#!/bin/sh\n{script}\n")).unwrap();
    fs::set_permissions(&program, fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hv-run"))
        .args(["--engine", "bochs"])
        .args(args)
        .env("HV_BOCHS", &program)
        .output()
        .expect("hv-run starts");
    let _ = fs::remove_file(&program);
    // hv-run keeps a failed run's files: these are of no interest.
    let stderr = String::from_utf8_lossy(&out.stderr);
    if let Some(files) = stderr
        .lines()
        .find_map(|l| l.strip_prefix("hv-run: run files in "))
    {
        let _ = fs::remove_dir_all(files.split(" (").next().unwrap());
    }
    out
}

#[test]
fn hv_run_names_the_signal_that_killed_the_emulator_and_exits_126() {
    let out = hv_run_with_fake_bochs(
        "abort",
        "echo '*** buffer overflow detected ***: terminated' >&2\nkill -ABRT $$",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(126), "{stderr}");
    assert!(
        stderr.contains("HARNESS FAILURE, the hypervisor never ran: Bochs was killed by SIGABRT"),
        "{stderr}"
    );
    assert!(
        stderr.contains("*** buffer overflow detected ***: terminated"),
        "{stderr}"
    );
}

#[test]
fn hv_run_exits_with_the_status_of_the_exit_line() {
    let out = hv_run_with_fake_bochs(
        "exit",
        "printf 'hv: ready\\nhv: exit 3\\n' > serial.txt\nexit 1",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("hv-run: exit status 3"), "{stderr}");
    // The serial log is streamed to stdout.
    assert!(String::from_utf8_lossy(&out.stdout).contains("hv: exit 3"));
}

#[test]
fn hv_run_tells_a_run_without_exit_line_from_a_harness_failure() {
    let out = hv_run_with_fake_bochs("mid-run", "echo 'hv: starting' > serial.txt\nkill -SEGV $$");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(
        stderr.contains("the run ended without an exit line; Bochs was killed by SIGSEGV"),
        "{stderr}"
    );
    assert!(!stderr.contains("HARNESS FAILURE"), "{stderr}");
}

#[test]
fn hv_run_refuses_bad_usage_with_its_own_code() {
    let out = Command::new(env!("CARGO_BIN_EXE_hv-run"))
        .arg("--frobnicate")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown option '--frobnicate'"));
}

/// `hv-run --linux ARGS` with `script` as Bochs, which must end the run
/// with status 0 after it printed `lines` (each a whole line but for the
/// spaces around it) to hv-run's stdout, the logs it streams. Returns its stderr.
fn hv_run_linux_shows(name: &str, script: &str, args: &[&str], lines: &[&str]) -> String {
    let out = hv_run_with_fake_bochs_and(name, script, &[&["--linux"], args].concat());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    for line in lines {
        assert!(
            stdout.lines().any(|l| l.trim() == *line),
            "{line:?} not in\n{stdout}"
        );
    }
    stderr
}

#[test]
fn hv_run_linux_boots_debians_kernel_and_our_initramfs_with_the_options_given() {
    // The fake Bochs shows what it was given: GRUB's configuration and its
    // own, then Linux's init starts and the run ends.
    let script = "cat iso/boot/grub/grub.cfg hv.bxrc > serial.txt\n\
                  cmp -s iso/boot/module1 ../../linux/initramfs.cpio.gz && echo 'initramfs ok' >> serial.txt\n\
                  sleep 1\n\
                  echo 'hv-linux-init: started (tsc 6000000000, uptime 1.00)' > guest.txt\n\
                  echo 'hv: exit 0' >> serial.txt";
    let lines = [
        // The guest's RAM by default, before the other hypervisor options.
        "multiboot2 /boot/hv guest.mem=512 guest.views=fresh",
        // The kernel, its console on COM1, the init told its RAM, our words.
        "module2 /boot/module0 console=ttyS0,115200 nokaslr hvtest.mem=512 quiet hvtest.memtest=0",
        "module2 /boot/module1",
        "initramfs ok",
        // The hypervisor's 256 MiB on top.
        "megs: 768",
        // The guest's console, labelled.
        "guest: hv-linux-init: started (tsc 6000000000, uptime 1.00)",
    ];
    let args = [
        "--guest-args",
        "quiet hvtest.memtest=0",
        "guest.views=fresh",
    ];
    let stderr = hv_run_linux_shows("linux", script, &args, &lines);
    assert!(stderr.contains("timeout 1200 s"), "{stderr}");
    assert!(
        stderr.contains("hv-run: Linux's init started after "),
        "{stderr}"
    );
}

#[test]
fn hv_run_linux_takes_the_guests_ram_and_the_machines_memory_from_the_options() {
    let stderr = hv_run_linux_shows(
        "linux-mem",
        "grep -h -e multiboot2 -e module0 -e megs iso/boot/grub/grub.cfg hv.bxrc > serial.txt\n\
         echo 'hv: exit 0' >> serial.txt",
        &[
            "--memory",
            "1024",
            "--timeout",
            "60",
            "guest.mem=300",
            "loglevel=debug",
        ],
        &[
            "multiboot2 /boot/hv guest.mem=300 loglevel=debug",
            "module2 /boot/module0 console=ttyS0,115200 nokaslr hvtest.mem=300",
            "megs: 1024",
        ],
    );
    assert!(stderr.contains("timeout 60 s"), "{stderr}");
}

#[test]
fn hv_run_refuses_linux_without_a_guest_or_without_grub() {
    for other in ["--no-guest", "--direct-kernel"] {
        let out = Command::new(env!("CARGO_BIN_EXE_hv-run"))
            .args(["--linux", other])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64));
        assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("not with {other}")));
    }
}
