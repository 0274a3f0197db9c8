//! `hv-run` itself, with fake emulators (shell scripts) in place of Bochs: what
//! it says and which code it exits with when the emulator fails, so a dying
//! emulator can never again pass as a run without a status (issue 9).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output};

/// Runs `hv-run --engine bochs --no-guest` with `script` as Bochs.
fn hv_run_with_fake_bochs(name: &str, script: &str) -> Output {
    let dir = hv_tests::workspace_root().join("target/runs");
    fs::create_dir_all(&dir).unwrap();
    let program: PathBuf = dir.join(format!("fake-bochs-{name}-{}", std::process::id()));
    fs::write(&program, format!("#!/bin/sh\n{script}\n")).unwrap();
    fs::set_permissions(&program, fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hv-run"))
        .args(["--engine", "bochs", "--no-guest", "--timeout", "60"])
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
