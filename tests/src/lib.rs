//! hv-tests: the host-side harness. It builds the hypervisor kernel, makes a
//! GRUB ISO for each boot configuration, boots it in Bochs or QEMU with a
//! timeout, captures the serial log and reads the run's exit status from the
//! kernel's last line (`hv: exit N`). When the emulator itself fails, the
//! [`Run`] says how (exit code or signal) and keeps its stderr and log, and a
//! failure of the harness (emulator missing, configuration refused, a crash
//! before the first serial byte) is told apart from a result about the
//! hypervisor. `scripts/run` uses it through `hv-run`, the integration tests
//! in `tests/tests/` through [`Boot::run`].

use std::fmt;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use hv_boot::exit;

pub mod control;
mod engine;
mod outcome;

pub use engine::{Engine, kvm_runs_vmx_guests, kvm_vmx_support};
pub use outcome::{EmulatorEnd, Outcome, signal_name};

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

/// The hypervisor kernel and the test guest, built once per process.
pub struct Images {
    pub kernel: PathBuf,
    pub guest: PathBuf,
}

/// Builds both bare-metal images once per process (cargo shows its progress
/// on stderr), or says why it could not.
///
/// A target directory of its own keeps this build from waiting on the lock of
/// the `cargo test` that runs the harness.
pub fn build_images() -> Result<&'static Images, String> {
    static IMAGES: OnceLock<Result<Images, String>> = OnceLock::new();
    IMAGES
        .get_or_init(|| {
            let root = workspace_root();
            let target_dir = root.join("target/emu");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(&cargo)
                .current_dir(&root)
                .args(["build", "--release", "--target", "x86_64-unknown-none"])
                .args(["-p", "hv-boot", "-p", "hv-test-guest", "--bins"])
                .arg("--target-dir")
                .arg(&target_dir)
                .status()
                .map_err(|e| format!("`{cargo}` could not be started: {e}"))?;
            if !status.success() {
                return Err(format!(
                    "building the hypervisor kernel and the test guest failed ({status}; \
                     cargo's messages are above)"
                ));
            }
            let out = target_dir.join("x86_64-unknown-none/release");
            Ok(Images {
                kernel: out.join("hv"),
                guest: out.join("hv-test-guest"),
            })
        })
        .as_ref()
        .map_err(Clone::clone)
}

fn images() -> &'static Images {
    build_images().unwrap_or_else(|why| panic!("{why}"))
}

/// The hypervisor kernel image.
pub fn kernel_image() -> &'static Path {
    &images().kernel
}

/// The test guest image (`tests/guest`).
pub fn test_guest_image() -> &'static Path {
    &images().guest
}

/// Where `program` is: itself if it names a path, else the first match on `PATH`.
fn find_program(program: &str) -> Result<PathBuf, String> {
    let found = if program.contains('/') {
        Some(PathBuf::from(program)).filter(|p| p.is_file())
    } else {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(program))
                .find(|p| p.is_file())
        })
    };
    found.ok_or_else(|| {
        format!("`{program}` is not installed (not found): run scripts/setup, which installs it")
    })
}

/// The serial ports a run captures, each to a file of the run directory, and
/// what it carries, in port order (COM1 first). COM1 is the guest's own
/// console; COM2 the hypervisor's log, from which the harness reads the exit
/// line. Both are streamed and reported, the guest's lines labelled `guest: `.
pub const SERIAL_PORTS: &[SerialPort] = &[
    SerialPort {
        name: "COM1",
        file: "guest.txt",
        carries: "the guest's console",
    },
    SerialPort {
        name: "COM2",
        file: "serial.txt",
        carries: "the hypervisor's log",
    },
];
/// Index in [`SERIAL_PORTS`] of the guest's console and of the hypervisor's log.
const GUEST_CONSOLE: usize = 0;
const HV_LOG: usize = 1;
/// The label of the guest's console lines in the run's log.
pub const GUEST_PREFIX: &str = "guest: ";

/// One captured serial port.
#[derive(Clone, Copy, Debug)]
pub struct SerialPort {
    pub name: &'static str,
    pub file: &'static str,
    pub carries: &'static str,
}

/// The kernel command line every Linux guest gets first: its console is its
/// COM1, and its layout stays fixed so that System.map addresses hold.
pub const LINUX_CONSOLE: &str = "console=ttyS0,115200 nokaslr";

/// Guest RAM of a Linux guest unless told otherwise: the kernel, the
/// initramfs and the init's memory test (256 MiB) with room to spare.
pub const LINUX_GUEST_MIB: u32 = 512;
/// The machine's memory beyond a Linux guest's: the hypervisor's own.
pub const HYPERVISOR_MIB: u32 = 256;
/// The first line of our Linux `/init` (`tests/linux-init`), with its TSC:
/// under Bochs, the instructions from power-on to user space.
pub const LINUX_INIT_LINE: &str = "hv-linux-init: started";

/// Debian's kernel and the initramfs with our checks, as `scripts/linux-assets`
/// leaves them in `target/linux/`.
#[derive(Clone, Debug)]
pub struct LinuxAssets {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// The kernel's symbols (for breakpoints on kernel functions).
    pub system_map: PathBuf,
}

/// The Linux guest's parts, or why they are missing.
pub fn linux_assets() -> Result<LinuxAssets, String> {
    let dir = workspace_root().join("target/linux");
    let assets = LinuxAssets {
        kernel: dir.join("vmlinuz"),
        initramfs: dir.join("initramfs.cpio.gz"),
        system_map: dir.join("System.map"),
    };
    for path in [&assets.kernel, &assets.initramfs, &assets.system_map] {
        if !path.is_file() {
            return Err(format!(
                "{} is missing: run scripts/setup (it calls scripts/linux-assets)",
                path.display()
            ));
        }
    }
    Ok(assets)
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
    /// The emulator program (a name on `PATH` or a path); by default
    /// [`Engine::emulator_program`]: `bochs` or `qemu-system-x86_64`, or what
    /// `HV_BOCHS` / `HV_QEMU` say.
    pub emulator: Option<String>,
    /// The kernel to boot; by default the hypervisor ([`Boot::bare_guest`]
    /// boots the test guest itself).
    pub kernel: Option<PathBuf>,
    /// Give the machine a COM3 connected to a pty whose other side the test
    /// takes from [`Running::control`]: the hypervisor's control channel
    /// (docs/control.md).
    pub control: bool,
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
            emulator: None,
            kernel: None,
            control: false,
        }
    }

    /// With or without the control channel (see [`Boot::control`]).
    pub fn control(mut self, on: bool) -> Self {
        self.control = on;
        self
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

    /// Boots Linux as the guest: Debian's kernel (`scripts/linux-assets`)
    /// with the console on COM1 and `kernel_cmdline` after it, and our
    /// initramfs as its initrd (its `/init` runs the checks of
    /// `tests/linux-init`). Panics, naming the fix, if the parts are missing.
    pub fn linux(mut self, kernel_cmdline: &str) -> Self {
        let assets = linux_assets().unwrap_or_else(|why| panic!("{why}"));
        self.modules.insert(
            0,
            (assets.kernel, format!("{LINUX_CONSOLE} {kernel_cmdline}")),
        );
        self.modules.insert(1, (assets.initramfs, String::new()));
        self
    }

    /// [`Boot::linux`] on `guest_mib` of guest RAM: the hypervisor gives
    /// the guest that much (`guest.mem=`, put before the command line so
    /// far), the init expects it (`hvtest.mem=`), and the machine has
    /// [`HYPERVISOR_MIB`] more.
    pub fn linux_ram(mut self, guest_mib: u32, kernel_cmdline: &str) -> Self {
        self.cmdline = format!("guest.mem={guest_mib} {}", self.cmdline)
            .trim_end()
            .into();
        self.memory_mib = guest_mib + HYPERVISOR_MIB;
        self.linux(&format!("hvtest.mem={guest_mib} {kernel_cmdline}"))
    }

    /// Boots the test guest directly, without the hypervisor, with
    /// `cmdline` (its scenarios): a cross-check that tells the hypervisor's
    /// bugs from the guest's. Its console is COM1 ([`Run::guest`]); there
    /// is no `hv: exit` line, so the run's outcome is not a status.
    pub fn bare_guest(mut self, cmdline: &str) -> Self {
        self.kernel = Some(test_guest_image().to_path_buf());
        self.cmdline = cmdline.into();
        self
    }

    /// Builds what is needed, boots, waits for the end or the timeout.
    pub fn run(&self) -> Run {
        self.start().wait()
    }

    /// [`Boot::run`] with its files in `dir` (from [`new_run_dir`]).
    pub fn run_in(&self, dir: PathBuf) -> Run {
        self.start_in(dir).wait()
    }

    /// Builds what is needed and starts the emulator; the run goes on while
    /// the caller talks to it (see [`Running`]).
    pub fn start(&self) -> Running {
        self.start_in(new_run_dir(self.engine))
    }

    /// [`Boot::start`] with its files in `dir` (from [`new_run_dir`]).
    pub fn start_in(&self, dir: PathBuf) -> Running {
        match self.boot_medium(&dir) {
            Ok(medium) => self.boot(dir, &medium),
            Err(why) => self.not_started(dir, why),
        }
    }

    /// The kernel to boot and, unless QEMU loads it directly, its GRUB ISO.
    fn boot_medium(&self, dir: &Path) -> Result<Medium, String> {
        let kernel = match &self.kernel {
            Some(kernel) => kernel.clone(),
            None => build_images()?.kernel.clone(),
        };
        let iso = if self.engine == Engine::Bochs || !self.qemu_direct_kernel {
            Some(self.grub_iso(&kernel, dir)?)
        } else {
            None
        };
        Ok(Medium { kernel, iso })
    }

    /// Starts the emulator on `medium` (with the control channel's pty
    /// first, if asked for).
    fn boot(&self, dir: PathBuf, medium: &Medium) -> Running {
        let control = if self.control {
            match control::Channel::open() {
                Ok(channel) => Some(channel),
                Err(why) => return self.not_started(dir, why),
            }
        } else {
            None
        };
        let port = control.as_ref().map(|c| c.path.as_path());
        let child = match (self.engine, &medium.iso) {
            (Engine::Bochs, Some(iso)) => self.start_bochs(iso, &dir, port),
            (_, iso) => self.start_qemu(&medium.kernel, iso.as_deref(), &dir, port),
        };
        match child {
            Ok(child) => Running {
                boot: self.clone(),
                dir,
                started: Instant::now(),
                child: Ok(child),
                control,
            },
            Err(why) => self.not_started(dir, why),
        }
    }

    fn not_started(&self, dir: PathBuf, why: String) -> Running {
        Running {
            boot: self.clone(),
            dir,
            started: Instant::now(),
            child: Err(why),
            control: None,
        }
    }

    fn emulator_program(&self) -> Result<PathBuf, String> {
        let name = self
            .emulator
            .clone()
            .unwrap_or_else(|| self.engine.emulator_program());
        find_program(&name)
    }

    fn grub_iso(&self, kernel: &Path, dir: &Path) -> Result<PathBuf, String> {
        let grub_mkrescue = find_program("grub-mkrescue")?;
        find_program("xorriso")?;
        let io = |e: std::io::Error| format!("making the boot ISO in {}: {e}", dir.display());
        let tree = dir.join("iso");
        fs::create_dir_all(tree.join("boot/grub")).map_err(io)?;
        fs::copy(kernel, tree.join("boot/hv")).map_err(io)?;
        let mut cfg = String::from("set timeout=0\nset default=0\nmenuentry \"hv\" {\n");
        cfg += &format!("  multiboot2 /boot/hv {}\n", self.cmdline);
        for (i, (module, cmdline)) in self.modules.iter().enumerate() {
            let name = format!("module{i}");
            fs::copy(module, tree.join("boot").join(&name)).map_err(io)?;
            cfg += &format!("  module2 /boot/{name} {cmdline}\n");
        }
        cfg += "  boot\n}\n";
        fs::write(tree.join("boot/grub/grub.cfg"), cfg).map_err(io)?;
        let iso = dir.join("hv.iso");
        // Its temporary files go to the run directory, whatever TMPDIR says.
        let out = host_independent(&mut Command::new(grub_mkrescue))
            .env("TMPDIR", dir)
            .arg("-o")
            .arg(&iso)
            .arg(&tree)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("grub-mkrescue could not be started: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "grub-mkrescue failed ({}):\n{}",
                out.status,
                tail(&String::from_utf8_lossy(&out.stderr), TAIL_LINES)
            ));
        }
        Ok(iso)
    }

    /// The Bochs configuration: every device that could reach the host is
    /// absent or pinned, so a run is the same on any machine. No sound (the
    /// speaker plugin would load ALSA, and Debian's Bochs aborts where ALSA
    /// finds no card), no joystick (the gameport opens /dev/input/js0), no
    /// parallel port, no NIC, a fixed RTC start instead of the host's local
    /// time, and the display on Bochs's VNC server (rfb, the one display
    /// library in the `bochs` package) without waiting for a viewer.
    fn bochs_config(&self, iso: &Path, control: Option<&Path>) -> String {
        let mut config = format!(
            "megs: {megs}\n\
             cpu: model={model}, count={cpus}, ips=200000000\n\
             romimage: file=/usr/share/bochs/BIOS-bochs-latest\n\
             vgaromimage: file=/usr/share/bochs/VGABIOS-lgpl-latest\n\
             ata0-master: type=cdrom, path={iso}, status=inserted\n\
             boot: cdrom\n\
             plugin_ctrl: speaker=0, gameport=0, parallel=0\n\
             sound: driver=dummy\n\
             clock: sync=none, time0=946684800\n\
             display_library: rfb, options=\"timeout=0\"\n\
             port_e9_hack: enabled=1\n\
             log: bochs.log\n\
             panic: action=fatal\n\
             error: action=report\n\
             info: action=report\n",
            megs = self.memory_mib,
            model = self.cpu_model,
            cpus = self.cpus,
            iso = iso.display(),
        );
        for (i, port) in SERIAL_PORTS.iter().enumerate() {
            config += &format!("com{}: enabled=1, mode=file, dev={}\n", i + 1, port.file);
        }
        // `term` mode reads and writes a tty: the control channel's pty.
        if let Some(pty) = control {
            config += &format!(
                "com{}: enabled=1, mode=term, dev={}\n",
                control::COM_INDEX + 1,
                pty.display()
            );
        }
        config
    }

    fn start_bochs(&self, iso: &Path, dir: &Path, control: Option<&Path>) -> Result<Child, String> {
        let bochs = self.emulator_program()?;
        let io = |e: std::io::Error| format!("writing the Bochs configuration: {e}");
        fs::write(dir.join("hv.bxrc"), self.bochs_config(iso, control)).map_err(io)?;
        // Debian's Bochs has its debugger built in: `c` starts the simulation.
        fs::write(dir.join("cont.rc"), "c\n").map_err(io)?;
        // Bochs's display server listens on the first free port from 5900 and
        // gives up after 50; in a network namespace of its own it always gets one.
        let mut cmd = match network_isolation() {
            Isolation::Namespace(prefix) => {
                let mut cmd = Command::new(prefix[0]);
                cmd.args(&prefix[1..]).arg(&bochs);
                cmd
            }
            Isolation::None => Command::new(&bochs),
        };
        // -f: Bochs reads this configuration and no other (no ~/.bochsrc).
        cmd.args(["-q", "-f", "hv.bxrc", "-rc", "cont.rc"]);
        self.spawn(cmd, dir, &bochs)
    }

    /// Boots `iso` through GRUB, or `kernel` through QEMU's Multiboot 1 loader when there is no ISO.
    fn start_qemu(
        &self,
        kernel: &Path,
        iso: Option<&Path>,
        dir: &Path,
        control: Option<&Path>,
    ) -> Result<Child, String> {
        let qemu = self.emulator_program()?;
        let mut cmd = Command::new(&qemu);
        // No NIC (the default one would use the host's network), no
        // configuration files of the host.
        cmd.args([
            "-display",
            "none",
            "-no-reboot",
            "-no-user-config",
            "-nic",
            "none",
        ])
        .args(["-D", "qemu.log"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .args([
            "-m",
            &self.memory_mib.to_string(),
            "-smp",
            &self.cpus.to_string(),
        ]);
        for port in SERIAL_PORTS {
            cmd.args(["-serial", &format!("file:{}", port.file)]);
        }
        // The third -serial is COM3 (0x3E8); a device path is QEMU's tty backend.
        if let Some(pty) = control {
            cmd.arg("-serial").arg(pty);
        }
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
        self.spawn(cmd, dir, &qemu)
    }

    /// Starts `cmd` in `dir`, its stdout and stderr going to files there.
    fn spawn(&self, mut cmd: Command, dir: &Path, program: &Path) -> Result<Child, String> {
        let file = |name: String| {
            fs::File::create(dir.join(&name)).map_err(|e| format!("creating {name}: {e}"))
        };
        let stem = self.engine.file_stem();
        host_independent(&mut cmd)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(file(format!("{stem}.out"))?)
            .stderr(file(format!("{stem}.err"))?)
            .spawn()
            .map_err(|e| format!("`{}` could not be started: {e}", program.display()))
    }
}

/// A run under way: the emulator runs while the caller talks to it through
/// the control channel ([`Running::control`]); [`Running::wait`] waits for
/// its end (or the boot's timeout, counted from the start) and reads the
/// [`Run`].
pub struct Running {
    boot: Boot,
    dir: PathBuf,
    started: Instant,
    /// The emulator, or why it did not start.
    child: Result<Child, String>,
    control: Option<control::Channel>,
}

impl Running {
    /// The host side of the control channel (once: the caller owns it).
    pub fn control(&mut self) -> Option<hv_ctl::Serial> {
        self.control.as_mut().and_then(|c| c.host.take())
    }

    /// The pty the emulator's COM3 uses.
    pub fn control_path(&self) -> Option<&Path> {
        self.control.as_ref().map(|c| c.path.as_path())
    }

    /// Serves the control channel on a unix socket at `socket` (one client
    /// at a time, as `hvctl --connect SOCKET`) instead of handing it to the
    /// caller.
    pub fn serve_control(&mut self, socket: &Path) -> Result<(), String> {
        let host = self.control().ok_or("no control channel (Boot::control)")?;
        control::bridge(host, socket)
    }

    /// The run's files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A tool's session on the control channel ([`Boot::control`]): its
    /// HELLO is sent again until `timeout` passes (the hypervisor sets its
    /// line up while the machine boots), then a reply may take 60 s.
    /// Panics with the run's log so far if no session opens.
    pub fn connect_tool(&mut self, timeout: Duration) -> hv_ctl::Client<hv_ctl::Serial> {
        let serial = self
            .control()
            .expect("no control channel (Boot::control), or taken already");
        match hv_ctl::Client::connect_with(serial, 0, timeout) {
            Ok(mut client) => {
                client.timeout = Duration::from_secs(60);
                client
            }
            Err(e) => {
                let log: String = SERIAL_PORTS
                    .iter()
                    .map(|port| fs::read_to_string(self.dir.join(port.file)).unwrap_or_default())
                    .collect();
                panic!("no control session: {e}\n{log}")
            }
        }
    }

    /// Waits until a line of the run's log so far (the hypervisor's or the
    /// guest's console) contains `text`, and returns it; `None` if `timeout`
    /// passes or the emulator ends first.
    pub fn wait_for_line(&mut self, text: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            for port in SERIAL_PORTS {
                let log = fs::read_to_string(self.dir.join(port.file)).unwrap_or_default();
                if let Some(line) = log.lines().find(|l| l.contains(text)) {
                    return Some(line.to_owned());
                }
            }
            if Instant::now() >= deadline || !self.is_running() {
                return None;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Whether the emulator is still running.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Ok(child) => matches!(child.try_wait(), Ok(None)),
            Err(_) => false,
        }
    }

    /// Waits for the end of the run.
    pub fn wait(mut self) -> Run {
        let engine = self.boot.engine;
        let end = match &mut self.child {
            Ok(child) => wait(
                child,
                self.started,
                self.boot.timeout,
                &self.dir,
                self.boot.stream,
            ),
            Err(why) => Waited {
                end: EmulatorEnd::NotStarted(why.clone()),
                ready_after: None,
                init_after: None,
                init_cpu: None,
            },
        };
        Run::read(engine, self.dir, end, self.started)
    }

    /// Ends the emulator now (a test that is done with a guest that would
    /// run on) and reads the run.
    pub fn stop(mut self) -> Run {
        if let Ok(child) = &mut self.child {
            let _ = child.kill();
        }
        self.wait()
    }
}

/// What a run boots.
struct Medium {
    kernel: PathBuf,
    iso: Option<PathBuf>,
}

/// The same environment for a helper program on every host: the C locale
/// (whatever locale the caller names, even one that does not exist), UTC, and
/// glibc's fatal messages (`*** buffer overflow detected ***`) on stderr,
/// where the harness keeps them, rather than on the terminal.
fn host_independent(cmd: &mut Command) -> &mut Command {
    cmd.env("LC_ALL", "C")
        .env("TZ", "UTC")
        .env("LIBC_FATAL_STDERR_", "1")
}

/// How Bochs is kept off the host's network ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isolation {
    /// A network namespace of its own, made by this command prefix.
    Namespace(&'static [&'static str]),
    /// None could be made: Bochs's display server takes a free port from 5900
    /// on the host (it looks at 50, so 50 runs at once is the limit).
    None,
}

impl fmt::Display for Isolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Namespace(prefix) => write!(
                f,
                "Bochs's display server (VNC) runs in a private network namespace ({})",
                prefix.join(" ")
            ),
            Self::None => f.write_str(
                "no private network namespace could be made (`unshare --net` refused): \
                 Bochs's display server (VNC) takes a free port from 5900 on this machine",
            ),
        }
    }
}

/// The best [`Isolation`] this process can have, found once: root (or
/// CAP_SYS_ADMIN) makes a network namespace directly, a normal user inside a
/// user namespace of its own where the system allows those.
pub fn network_isolation() -> Isolation {
    const CHOICES: [&[&str]; 2] = [
        &["unshare", "--net"],
        &["unshare", "--user", "--map-root-user", "--net"],
    ];
    static ISOLATION: OnceLock<Isolation> = OnceLock::new();
    *ISOLATION.get_or_init(|| {
        CHOICES
            .into_iter()
            .find(|prefix| {
                Command::new(prefix[0])
                    .args(&prefix[1..])
                    .arg("true")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
            .map_or(Isolation::None, Isolation::Namespace)
    })
}

/// Writes `bytes` to a file of its own under `target/runs` (a boot module,
/// say) and returns its path.
pub fn scratch_file(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = workspace_root().join("target/runs");
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot make {}: {e}", dir.display()));
    let path = dir.join(format!("{name}-{}.bin", std::process::id()));
    fs::write(&path, bytes).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    path
}

/// A fresh directory for one run's files, so runs in parallel never share one.
pub fn new_run_dir(engine: Engine) -> PathBuf {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = workspace_root()
        .join("target/runs")
        .join(format!("{engine}-{}-{n}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot make the run directory {}: {e}", dir.display()));
    dir
}

/// What [`wait`] saw.
struct Waited {
    end: EmulatorEnd,
    /// When the serial log first showed `hv: ready`, counted from `started`.
    ready_after: Option<Duration>,
    /// When the guest's console first showed [`LINUX_INIT_LINE`].
    init_after: Option<Duration>,
    /// The emulator's CPU time by then.
    init_cpu: Option<Duration>,
}

/// A serial file followed as it grows, whole lines at a time.
struct Tail {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    /// Put before each line when streamed.
    prefix: &'static str,
}

impl Tail {
    fn new(dir: &Path, port: usize, prefix: &'static str) -> Self {
        Self {
            path: dir.join(SERIAL_PORTS[port].file),
            offset: 0,
            partial: Vec::new(),
            prefix,
        }
    }

    /// The complete lines that arrived since the last call (all of what is
    /// left at the end).
    fn lines(&mut self, at_end: bool) -> Vec<String> {
        let new = read_from(&self.path, self.offset);
        self.offset += new.len() as u64;
        self.partial.extend_from_slice(&new);
        let mut lines = Vec::new();
        while let Some(at) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=at).collect();
            lines.push(String::from_utf8_lossy(&line).trim_end().to_string());
        }
        if at_end && !self.partial.is_empty() {
            lines.push(
                String::from_utf8_lossy(&self.partial)
                    .trim_end()
                    .to_string(),
            );
            self.partial.clear();
        }
        lines
    }
}

/// Waits for `child` up to `timeout`, watching the hypervisor's log and the
/// guest's console as they grow (and copying them to stdout, the guest's
/// lines labelled, if `stream`).
fn wait(
    child: &mut Child,
    started: Instant,
    timeout: Duration,
    dir: &Path,
    stream: bool,
) -> Waited {
    let mut tails = [
        Tail::new(dir, HV_LOG, ""),
        Tail::new(dir, GUEST_CONSOLE, GUEST_PREFIX),
    ];
    let (mut ready_after, mut init_after, mut init_cpu) = (None, None, None);
    let pid = child.id();
    let mut watch = |at_end: bool| {
        for (i, tail) in tails.iter_mut().enumerate() {
            let lines = tail.lines(at_end);
            let (seen, text) = match i {
                0 => (&mut ready_after, READY_LINE),
                _ => (&mut init_after, LINUX_INIT_LINE),
            };
            if seen.is_none() && lines.iter().any(|l| l.contains(text)) {
                *seen = Some(started.elapsed());
                // Its CPU time, unlike the wall time, hardly depends on
                // what else the machine runs.
                if i == 1 {
                    init_cpu = cpu_time(pid);
                }
            }
            if stream && !lines.is_empty() {
                let mut out = std::io::stdout().lock();
                for line in &lines {
                    let _ = writeln!(out, "{}{line}", tail.prefix);
                }
                let _ = out.flush();
            }
        }
    };
    loop {
        watch(false);
        match child.try_wait().expect("emulator can be waited for") {
            Some(status) => {
                watch(true);
                return Waited {
                    end: EmulatorEnd::from_status(status),
                    ready_after,
                    init_after,
                    init_cpu,
                };
            }
            None if started.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                watch(true);
                return Waited {
                    end: EmulatorEnd::StoppedAtTimeout(timeout),
                    ready_after,
                    init_after,
                    init_cpu,
                };
            }
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// The CPU time (user and system) process `pid` has used so far, from
/// /proc: the emulator's own, as Bochs and QEMU run under `unshare` and
/// Debian's `bochs` wrapper by `exec`.
fn cpu_time(pid: u32) -> Option<Duration> {
    parse_cpu_time(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// utime + stime of a /proc/PID/stat line, in clock ticks of 1/100 s (the
/// USER_HZ of Linux's ABI). The command name may hold spaces and
/// parentheses: the fields are counted from the last `)`.
fn parse_cpu_time(stat: &str) -> Option<Duration> {
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    // After the name: state (field 3), ..., utime (14), stime (15).
    let ticks = |field: usize| fields.get(field - 3)?.parse::<u64>().ok();
    Some(Duration::from_millis((ticks(14)? + ticks(15)?) * 10))
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

/// A text file of a run, lossily decoded, without carriage returns (empty if absent).
fn read_text(path: &Path) -> String {
    String::from_utf8_lossy(&read_from(path, 0)).replace('\r', "")
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

/// Lines of an emulator's stderr and log a report shows, from their end.
pub const TAIL_LINES: usize = 30;

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A titled part of a report.
fn section(title: &str, text: &str) -> String {
    let text = if text.trim().is_empty() {
        "(empty)"
    } else {
        text.trim_end()
    };
    format!("---- {title} ----\n{text}\n")
}

/// What one boot produced.
pub struct Run {
    pub engine: Engine,
    /// What the run came to.
    pub outcome: Outcome,
    /// How the emulator process ended.
    pub emulator: EmulatorEnd,
    /// The hypervisor's log (COM2).
    pub serial: String,
    /// The guest's console (COM1), as it wrote it.
    pub guest: String,
    /// The emulator's own log (`bochs.log`, `qemu.log`).
    pub emulator_log: String,
    /// What the emulator wrote to stderr (`bochs.err`, `qemu.err`).
    pub emulator_stderr: String,
    /// Wall time from starting the emulator to the `hv: ready` line.
    pub ready_after: Option<Duration>,
    /// Wall time from starting the emulator to Linux's `/init`
    /// ([`LINUX_INIT_LINE`]).
    pub init_after: Option<Duration>,
    /// The emulator's CPU time by then (none where /proc does not say).
    pub init_cpu: Option<Duration>,
    pub wall: Duration,
    pub dir: PathBuf,
}

impl Run {
    /// Reads back what a run left in `dir`.
    fn read(engine: Engine, dir: PathBuf, waited: Waited, started: Instant) -> Self {
        let emulator = waited.end;
        let stem = engine.file_stem();
        let serial = read_text(&dir.join(SERIAL_PORTS[HV_LOG].file));
        let guest = read_text(&dir.join(SERIAL_PORTS[GUEST_CONSOLE].file));
        let outcome = Outcome::classify(
            &emulator,
            serial.len() + guest.len(),
            parse_exit_status(&serial),
            engine.emulator_name(),
        );
        Run {
            engine,
            outcome,
            emulator,
            emulator_log: read_text(&dir.join(format!("{stem}.log"))),
            emulator_stderr: read_text(&dir.join(format!("{stem}.err"))),
            serial,
            guest,
            ready_after: waited.ready_after,
            init_after: waited.init_after,
            init_cpu: waited.init_cpu,
            wall: started.elapsed(),
            dir,
        }
    }

    /// The status of the kernel's exit line, if the run ended with one.
    pub fn exit_status(&self) -> Option<u8> {
        match self.outcome {
            Outcome::Exit(status) => Some(status),
            _ => None,
        }
    }

    /// What the run came to and how the emulator ended, in one line.
    pub fn summary(&self) -> String {
        match self.outcome {
            // Says how the emulator ended already.
            Outcome::HarnessFailure(_) => self.outcome.to_string(),
            _ => format!(
                "{}; {}",
                self.outcome,
                self.emulator.describe(self.engine.emulator_name())
            ),
        }
    }

    /// For a failure message: how the run and the emulator ended, the serial
    /// log, and the last lines of the emulator's stderr and log.
    pub fn report(&self) -> String {
        let port = |i: usize| {
            let p = &SERIAL_PORTS[i];
            format!("{} ({}, {})", p.carries, p.name, p.file)
        };
        format!(
            "{}\nengine {}, {:.1} s, files in {}\n{}{}{}---- end: {} ----\n",
            self.summary(),
            self.engine,
            self.wall.as_secs_f64(),
            self.dir.display(),
            section(&port(HV_LOG), &self.serial),
            section(&port(GUEST_CONSOLE), &self.guest),
            self.emulator_report(),
            self.summary(),
        )
    }

    /// The run's log: the hypervisor's lines, then the guest's console lines
    /// labelled `guest: ` (the label the hypervisor gives the guest's debug
    /// console lines too).
    pub fn lines(&self) -> impl Iterator<Item = std::borrow::Cow<'_, str>> {
        self.serial.lines().map(std::borrow::Cow::Borrowed).chain(
            self.guest
                .lines()
                .map(|l| std::borrow::Cow::Owned(format!("{GUEST_PREFIX}{l}"))),
        )
    }

    /// The last lines of the emulator's stderr and of its log.
    pub fn emulator_report(&self) -> String {
        let name = self.engine.emulator_name();
        let stem = self.engine.file_stem();
        section(
            &format!("{name}'s stderr ({stem}.err), last {TAIL_LINES} lines"),
            &tail(&self.emulator_stderr, TAIL_LINES),
        ) + &section(
            &format!("{name}'s log ({stem}.log), last {TAIL_LINES} lines"),
            &tail(&self.emulator_log, TAIL_LINES),
        )
    }

    /// Panics with the report unless the run ended by itself with `status`.
    pub fn expect_exit(&self, status: u8) -> &Self {
        assert!(
            self.exit_status() == Some(status),
            "expected the run to end with status {status}, but {}\n{}",
            self.summary(),
            self.report()
        );
        self
    }

    /// Panics with the report unless some line of the run's log contains `text`.
    pub fn expect_line(&self, text: &str) -> &Self {
        assert!(
            self.lines().any(|l| l.contains(text)),
            "no line contains {text:?}\n{}",
            self.report()
        );
        self
    }

    /// Panics with the report if some line of the run's log contains `text`.
    pub fn expect_no_line(&self, text: &str) -> &Self {
        assert!(
            !self.lines().any(|l| l.contains(text)),
            "a line contains {text:?}\n{}",
            self.report()
        );
        self
    }

    /// Panics with the report unless the hypervisor tore its guest down
    /// cleanly: every frame back, its own code and page tables unchanged.
    pub fn expect_torn_down_cleanly(&self) -> &Self {
        self.expect_line("vmm: guest torn down, all frames returned")
            .expect_line("isolation: hypervisor image and page tables unchanged")
            .expect_no_line("frame leak")
    }

    /// Panics with the report unless the run ended with status 0, the test
    /// guest passed exactly `scenarios`, and the guest was torn down cleanly.
    pub fn expect_scenarios_passed(&self, scenarios: &[&str]) -> &Self {
        self.expect_exit(exit::OK).expect_line(&format!(
            "{GUEST_PREFIX}result: {} passed, 0 failed",
            scenarios.len()
        ));
        for s in scenarios {
            self.expect_line(&format!("{GUEST_PREFIX}PASS {s}"));
        }
        self.expect_torn_down_cleanly()
    }

    /// The first line of the run's log containing `text`.
    pub fn line(&self, text: &str) -> Option<String> {
        self.lines()
            .find(|l| l.contains(text))
            .map(|l| l.into_owned())
    }

    /// Removes the run's files (kept when a test fails, for a look).
    pub fn clean_up(&self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests;
