//! The engines an image can run in, and which one this machine does best.

use std::fmt;
use std::fs;
use std::io::{ErrorKind, Write};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Where an image runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// Bochs 2.7 emulating a CPU model with VMX (the default model has EPT,
    /// VPID, unrestricted guest, VMFUNC, #VE and PML).
    Bochs,
    /// QEMU with the KVM accelerator and the host CPU (needs nested VMX).
    QemuKvm,
    /// QEMU's software emulation: no VMX, boot paths only.
    QemuTcg,
}

impl Engine {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "bochs" => Some(Self::Bochs),
            "qemu-kvm" => Some(Self::QemuKvm),
            "qemu-tcg" => Some(Self::QemuTcg),
            _ => None,
        }
    }

    /// The best engine this machine has, and why: QEMU + KVM when KVM can
    /// run VMX guests (nested VMX on an Intel CPU), otherwise Bochs.
    pub fn best_available() -> (Self, String) {
        match kvm_vmx_support() {
            Ok(()) => (Self::QemuKvm, "KVM can run VMX guests".into()),
            Err(why) => (Self::Bochs, why),
        }
    }

    /// The emulator's name, for messages ("Bochs was killed by SIGABRT").
    pub fn emulator_name(self) -> &'static str {
        match self {
            Self::Bochs => "Bochs",
            Self::QemuKvm | Self::QemuTcg => "QEMU",
        }
    }

    /// The emulator program, unless `HV_BOCHS` / `HV_QEMU` names another.
    pub fn emulator_program(self) -> String {
        let (var, default) = match self {
            Self::Bochs => ("HV_BOCHS", "bochs"),
            Self::QemuKvm | Self::QemuTcg => ("HV_QEMU", "qemu-system-x86_64"),
        };
        std::env::var(var).unwrap_or_else(|_| default.into())
    }

    /// The stem of the emulator's files in a run directory (`bochs.log`, `bochs.err`).
    pub fn file_stem(self) -> &'static str {
        match self {
            Self::Bochs => "bochs",
            Self::QemuKvm | Self::QemuTcg => "qemu",
        }
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Bochs => "bochs",
            Self::QemuKvm => "qemu-kvm",
            Self::QemuTcg => "qemu-tcg",
        })
    }
}

/// Whether KVM can run VMX guests (nested VMX on an Intel CPU).
pub fn kvm_runs_vmx_guests() -> bool {
    kvm_vmx_support().is_ok()
}

/// `Ok` when KVM can run this hypervisor, else why not. `/dev/kvm` alone
/// proves little: it may be closed to this user, or belong to a paravirtual
/// KVM without nested VMX (QEMU then aborts on the first VMX MSR), so the
/// last check asks QEMU itself for a KVM CPU with VMX. Checked once.
pub fn kvm_vmx_support() -> Result<(), String> {
    static SUPPORT: OnceLock<Result<(), String>> = OnceLock::new();
    SUPPORT.get_or_init(probe_kvm).clone()
}

fn probe_kvm() -> Result<(), String> {
    match fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => return Err("no /dev/kvm".into()),
        Err(e) => {
            return Err(format!(
                "/dev/kvm present but not usable by this user ({e}; the kvm group opens it)"
            ));
        }
    }
    let vmx = fs::read_to_string("/proc/cpuinfo").is_ok_and(|s| {
        s.lines()
            .any(|l| l.starts_with("flags") && l.split_whitespace().any(|w| w == "vmx"))
    });
    if !vmx {
        return Err(
            "/dev/kvm present, but the CPU shows no vmx flag (not an Intel CPU \
                    with VMX, or a virtual machine without nested VMX)"
                .into(),
        );
    }
    let nested = fs::read_to_string("/sys/module/kvm_intel/parameters/nested")
        .is_ok_and(|s| matches!(s.trim(), "Y" | "y" | "1"));
    if !nested {
        return Err("/dev/kvm present, but kvm_intel's nested parameter is not Y".into());
    }
    let program = Engine::QemuKvm.emulator_program();
    ask_qemu_for_vmx(&program, Duration::from_secs(20))
        .map_err(|why| format!("/dev/kvm present, but {why}"))
}

/// Whether `qemu` starts a KVM CPU with VMX within `limit`: `enforce` makes
/// QEMU refuse, rather than silently drop, a VMX it cannot give; the monitor's
/// `quit` ends a machine that did start.
fn ask_qemu_for_vmx(qemu: &str, limit: Duration) -> Result<(), String> {
    let mut child = Command::new(qemu)
        .args([
            "-accel",
            "kvm",
            "-cpu",
            "host,+vmx,enforce",
            "-machine",
            "pc",
        ])
        .args(["-S", "-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-monitor", "stdio", "-m", "16"])
        .env("LC_ALL", "C")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("`{qemu}` could not be started to check it: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(b"quit\n");
    }
    let started = Instant::now();
    while child.try_wait().map_err(|e| e.to_string())?.is_none() {
        if started.elapsed() >= limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "`{qemu}` did not start a KVM CPU within {} s",
                limit.as_secs_f64()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(format!(
        "QEMU cannot start a KVM CPU with VMX ({}): {}",
        out.status,
        stderr.lines().last().unwrap_or("no message")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// `script` as a fake QEMU in a fresh file.
    fn fake_qemu(name: &str, script: &str) -> String {
        let dir = crate::workspace_root().join("target/runs");
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("fake-qemu-{name}-{}", std::process::id()));
        fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path.display().to_string()
    }

    #[test]
    fn qemu_answers_whether_kvm_gives_vmx() {
        let starts = fake_qemu("starts", "read command; [ \"$command\" = quit ]");
        assert_eq!(ask_qemu_for_vmx(&starts, Duration::from_secs(10)), Ok(()));
        let refuses = fake_qemu(
            "refuses",
            "echo \"qemu-system-x86_64: Host doesn't support requested features\" >&2; exit 1",
        );
        let why = ask_qemu_for_vmx(&refuses, Duration::from_secs(10)).unwrap_err();
        assert!(
            why.ends_with("Host doesn't support requested features"),
            "{why}"
        );
        let hangs = fake_qemu("hangs", "exec sleep 30");
        let why = ask_qemu_for_vmx(&hangs, Duration::from_millis(200)).unwrap_err();
        assert!(
            why.contains("did not start a KVM CPU within 0.2 s"),
            "{why}"
        );
        let missing = ask_qemu_for_vmx("/nonexistent/qemu", Duration::from_secs(1));
        assert!(missing.unwrap_err().contains("could not be started"));
        for path in [starts, refuses, hangs] {
            let _ = fs::remove_file(path);
        }
    }
}
