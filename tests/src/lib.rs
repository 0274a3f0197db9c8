//! hv-tests: the host-side harness. It builds the hypervisor kernel, makes a
//! GRUB ISO for each boot configuration, boots it in Bochs or QEMU with a
//! timeout, captures the serial log and reads the run's exit status from the
//! kernel's last line (`hv: exit N`). `scripts/run` uses it through `hv-run`,
//! the integration tests in `tests/tests/` through [`Boot::run`].

use std::fmt;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use hv_boot::exit;

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

    /// The best engine this machine has: QEMU + KVM when KVM can run VMX
    /// guests (nested VMX on an Intel CPU), otherwise Bochs.
    pub fn best_available() -> Self {
        if kvm_runs_vmx_guests() {
            Self::QemuKvm
        } else {
            Self::Bochs
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

/// `/dev/kvm` is usable, the host CPU has VMX, and kvm_intel allows nesting.
pub fn kvm_runs_vmx_guests() -> bool {
    let nested = fs::read_to_string("/sys/module/kvm_intel/parameters/nested")
        .is_ok_and(|s| matches!(s.trim(), "Y" | "y" | "1"));
    let vmx = fs::read_to_string("/proc/cpuinfo").is_ok_and(|s| {
        s.lines()
            .any(|l| l.starts_with("flags") && l.split_whitespace().any(|w| w == "vmx"))
    });
    let dev = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    nested && vmx && dev
}

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

/// The hypervisor kernel and the test guest, built once per process.
struct Images {
    kernel: PathBuf,
    guest: PathBuf,
}

/// Builds both bare-metal images (once per process).
///
/// A target directory of its own keeps this build from waiting on the lock of
/// the `cargo test` that runs the harness.
fn images() -> &'static Images {
    static IMAGES: OnceLock<Images> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let root = workspace_root();
        let target_dir = root.join("target/emu");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .current_dir(&root)
            .args(["build", "--release", "--target", "x86_64-unknown-none"])
            .args(["-p", "hv-boot", "-p", "hv-test-guest", "--bins"])
            .arg("--target-dir")
            .arg(&target_dir)
            .status()
            .expect("cargo runs");
        assert!(
            status.success(),
            "building the hypervisor kernel and the test guest failed"
        );
        let out = target_dir.join("x86_64-unknown-none/release");
        Images {
            kernel: out.join("hv"),
            guest: out.join("hv-test-guest"),
        }
    })
}

/// The hypervisor kernel image.
pub fn kernel_image() -> &'static Path {
    &images().kernel
}

/// The test guest image (`tests/guest`).
pub fn test_guest_image() -> &'static Path {
    &images().guest
}

/// A program the harness needs; panics with the fix if it is missing.
fn require(program: &str) {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()));
    assert!(
        found,
        "`{program}` is not installed: run scripts/setup (scripts/test and scripts/run do)"
    );
}

/// One boot of the hypervisor: engine, command line, modules and limits.
#[derive(Clone, Debug)]
pub struct Boot {
    pub engine: Engine,
    pub cmdline: String,
    /// Extra boot modules: file and its command line.
    pub modules: Vec<(PathBuf, String)>,
    pub memory_mib: u32,
    pub cpus: u32,
    /// Bochs CPU model.
    pub cpu_model: String,
    /// Boot QEMU through its own Multiboot 1 loader (`-kernel`) instead of GRUB.
    pub qemu_direct_kernel: bool,
    pub timeout: Duration,
    /// Copy the serial log to stdout as it arrives.
    pub stream: bool,
}

impl Boot {
    pub fn new(engine: Engine) -> Self {
        Self {
            engine,
            cmdline: String::new(),
            modules: Vec::new(),
            memory_mib: 256,
            cpus: 1,
            cpu_model: "corei7_skylake_x".into(),
            qemu_direct_kernel: false,
            timeout: Duration::from_secs(120),
            stream: false,
        }
    }

    pub fn cmdline(mut self, cmdline: &str) -> Self {
        self.cmdline = cmdline.into();
        self
    }

    /// Adds the test guest as the first module, with its own command line
    /// (its scenarios).
    pub fn guest(mut self, guest_cmdline: &str) -> Self {
        self.modules
            .insert(0, (test_guest_image().to_path_buf(), guest_cmdline.into()));
        self
    }

    /// Builds what is needed, boots, waits for the end or the timeout.
    pub fn run(&self) -> Run {
        let kernel = kernel_image();
        let dir = run_dir(self.engine);
        let serial = dir.join("serial.txt");
        let iso = (self.engine == Engine::Bochs || !self.qemu_direct_kernel)
            .then(|| self.grub_iso(kernel, &dir));
        let started = Instant::now();
        let mut child = match (self.engine, iso) {
            (Engine::Bochs, Some(iso)) => self.start_bochs(&iso, &dir),
            (_, iso) => self.start_qemu(kernel, iso.as_deref(), &dir),
        };
        let waited = wait(&mut child, started, self.timeout, &serial, self.stream);
        let serial_log = fs::read_to_string(&serial)
            .unwrap_or_default()
            .replace('\r', "");
        let emulator_log =
            fs::read_to_string(dir.join(self.emulator_log_name())).unwrap_or_default();
        Run {
            engine: self.engine,
            exit_status: parse_exit_status(&serial_log),
            serial: serial_log,
            emulator_log,
            emulator_exit: waited.emulator_exit,
            timed_out: waited.timed_out,
            ready_after: waited.ready_after,
            wall: started.elapsed(),
            dir,
        }
    }

    fn emulator_log_name(&self) -> &'static str {
        match self.engine {
            Engine::Bochs => "bochs.log",
            _ => "qemu.log",
        }
    }

    fn grub_iso(&self, kernel: &Path, dir: &Path) -> PathBuf {
        require("grub-mkrescue");
        require("xorriso");
        let tree = dir.join("iso");
        fs::create_dir_all(tree.join("boot/grub")).unwrap();
        fs::copy(kernel, tree.join("boot/hv")).unwrap();
        let mut cfg = String::from("set timeout=0\nset default=0\nmenuentry \"hv\" {\n");
        cfg += &format!("  multiboot2 /boot/hv {}\n", self.cmdline);
        for (i, (module, cmdline)) in self.modules.iter().enumerate() {
            let name = format!("module{i}");
            fs::copy(module, tree.join("boot").join(&name)).unwrap();
            cfg += &format!("  module2 /boot/{name} {cmdline}\n");
        }
        cfg += "  boot\n}\n";
        fs::write(tree.join("boot/grub/grub.cfg"), cfg).unwrap();
        let iso = dir.join("hv.iso");
        let out = Command::new("grub-mkrescue")
            .arg("-o")
            .arg(&iso)
            .arg(&tree)
            .output()
            .expect("grub-mkrescue runs");
        assert!(
            out.status.success(),
            "grub-mkrescue failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        iso
    }

    fn start_bochs(&self, iso: &Path, dir: &Path) -> Child {
        require("bochs");
        let config = format!(
            "megs: {megs}\n\
             cpu: model={model}, count={cpus}, ips=200000000\n\
             romimage: file=/usr/share/bochs/BIOS-bochs-latest\n\
             vgaromimage: file=/usr/share/bochs/VGABIOS-lgpl-latest\n\
             ata0-master: type=cdrom, path={iso}, status=inserted\n\
             boot: cdrom\n\
             display_library: rfb, options=\"timeout=0\"\n\
             com1: enabled=1, mode=file, dev=serial.txt\n\
             port_e9_hack: enabled=1\n\
             speaker: enabled=0\n\
             sound: driver=dummy\n\
             log: bochs.log\n\
             panic: action=fatal\n\
             error: action=report\n\
             info: action=report\n",
            megs = self.memory_mib,
            model = self.cpu_model,
            cpus = self.cpus,
            iso = iso.display(),
        );
        fs::write(dir.join("hv.bxrc"), config).unwrap();
        // Debian's Bochs has its debugger built in: `c` starts the simulation.
        fs::write(dir.join("cont.rc"), "c\n").unwrap();
        // Bochs's display server listens on the first free port from 5900 and
        // gives up after 50; in a network namespace of its own it always gets one.
        let mut cmd = if private_network() {
            let mut cmd = Command::new("unshare");
            cmd.args(["--net", "bochs"]);
            cmd
        } else {
            Command::new("bochs")
        };
        cmd.current_dir(dir)
            .args(["-q", "-f", "hv.bxrc", "-rc", "cont.rc"])
            .stdin(Stdio::null())
            .stdout(fs::File::create(dir.join("bochs.out")).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("bochs starts")
    }

    /// Boots `iso` through GRUB, or `kernel` through QEMU's Multiboot 1 loader when there is no ISO.
    fn start_qemu(&self, kernel: &Path, iso: Option<&Path>, dir: &Path) -> Child {
        require("qemu-system-x86_64");
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.current_dir(dir)
            .args([
                "-display",
                "none",
                "-no-reboot",
                "-serial",
                "file:serial.txt",
                "-D",
                "qemu.log",
            ])
            .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
            .args([
                "-m",
                &self.memory_mib.to_string(),
                "-smp",
                &self.cpus.to_string(),
            ]);
        match self.engine {
            Engine::QemuKvm => cmd.args(["-accel", "kvm", "-cpu", "host"]),
            _ => cmd.args(["-accel", "tcg"]),
        };
        if let Some(iso) = iso {
            cmd.arg("-cdrom").arg(iso);
        } else {
            cmd.arg("-kernel")
                .arg(kernel)
                .args(["-append", &self.cmdline]);
            if !self.modules.is_empty() {
                let initrd: Vec<String> = self
                    .modules
                    .iter()
                    .map(|(path, args)| format!("{} {args}", path.display()))
                    .collect();
                cmd.args(["-initrd", &initrd.join(",")]);
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(fs::File::create(dir.join("qemu.out")).unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("qemu starts")
    }
}

/// Whether programs can be started in a network namespace of their own.
fn private_network() -> bool {
    static WORKS: OnceLock<bool> = OnceLock::new();
    *WORKS.get_or_init(|| {
        Command::new("unshare")
            .args(["--net", "true"])
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// A fresh directory for one run's files, so runs in parallel never share one.
fn run_dir(engine: Engine) -> PathBuf {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = workspace_root()
        .join("target/runs")
        .join(format!("{engine}-{}-{n}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// What [`wait`] saw.
struct Waited {
    emulator_exit: Option<i32>,
    timed_out: bool,
    /// When the serial log first showed `hv: ready`, counted from `started`.
    ready_after: Option<Duration>,
}

/// Waits for `child` up to `timeout`, watching the serial log as it grows
/// (and copying it to stdout if `stream`).
fn wait(
    child: &mut Child,
    started: Instant,
    timeout: Duration,
    serial: &Path,
    stream: bool,
) -> Waited {
    let mut seen = Vec::new();
    let mut ready_after = None;
    let mut watch = |seen: &mut Vec<u8>| {
        let new = read_from(serial, seen.len() as u64);
        if stream {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&new);
            let _ = out.flush();
        }
        seen.extend_from_slice(&new);
        if ready_after.is_none() && String::from_utf8_lossy(seen).contains(READY_LINE) {
            ready_after = Some(started.elapsed());
        }
    };
    loop {
        watch(&mut seen);
        match child.try_wait().expect("emulator can be waited for") {
            Some(status) => {
                watch(&mut seen);
                return Waited {
                    emulator_exit: status.code(),
                    timed_out: false,
                    ready_after,
                };
            }
            None if started.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Waited {
                    emulator_exit: None,
                    timed_out: true,
                    ready_after,
                };
            }
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// The bytes of `path` from offset `from` on (none if it does not exist yet).
fn read_from(path: &Path, from: u64) -> Vec<u8> {
    let mut buf = Vec::new();
    if let Ok(mut file) = fs::File::open(path)
        && std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(from)).is_ok()
    {
        let _ = file.read_to_end(&mut buf);
    }
    buf
}

/// The line the kernel prints once the machine is up.
pub const READY_LINE: &str = "hv: ready";

/// The status of the last `hv: exit N` line.
pub fn parse_exit_status(log: &str) -> Option<u8> {
    log.lines().rev().find_map(|l| {
        l.trim()
            .strip_prefix(exit::LINE_PREFIX)?
            .trim()
            .parse()
            .ok()
    })
}

/// What one boot produced.
pub struct Run {
    pub engine: Engine,
    pub serial: String,
    pub exit_status: Option<u8>,
    pub emulator_log: String,
    pub emulator_exit: Option<i32>,
    pub timed_out: bool,
    /// Wall time from starting the emulator to the `hv: ready` line.
    pub ready_after: Option<Duration>,
    pub wall: Duration,
    pub dir: PathBuf,
}

impl Run {
    /// The serial log and the last lines of the emulator's log, for a failure message.
    pub fn report(&self) -> String {
        let tail: Vec<&str> = self.emulator_log.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "engine {}, exit status {:?}, emulator exit {:?}, timed out {}, {:.1} s, files in {}\n\
             ---- serial log ----\n{}\n---- end of emulator log ----\n{}\n",
            self.engine,
            self.exit_status,
            self.emulator_exit,
            self.timed_out,
            self.wall.as_secs_f64(),
            self.dir.display(),
            self.serial,
            tail.join("\n"),
        )
    }

    /// Panics with the report unless the run ended by itself with `status`.
    pub fn expect_exit(&self, status: u8) -> &Self {
        assert!(!self.timed_out, "the run timed out\n{}", self.report());
        assert_eq!(
            self.exit_status,
            Some(status),
            "unexpected exit status\n{}",
            self.report()
        );
        self
    }

    /// Panics with the report unless some line of the serial log contains `text`.
    pub fn expect_line(&self, text: &str) -> &Self {
        assert!(
            self.serial.lines().any(|l| l.contains(text)),
            "no line contains {text:?}\n{}",
            self.report()
        );
        self
    }

    /// Panics with the report if some line of the serial log contains `text`.
    pub fn expect_no_line(&self, text: &str) -> &Self {
        assert!(
            !self.serial.lines().any(|l| l.contains(text)),
            "a line contains {text:?}\n{}",
            self.report()
        );
        self
    }

    /// The first line containing `text`.
    pub fn line(&self, text: &str) -> Option<&str> {
        self.serial.lines().find(|l| l.contains(text))
    }

    /// Removes the run's files (kept when a test fails, for a look).
    pub fn clean_up(&self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
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
}
