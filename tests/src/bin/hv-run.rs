//! `hv-run`: builds the hypervisor, boots it in the chosen (or best) engine,
//! streams its serial log and exits with the run's status. `scripts/run` calls it.

use std::process::ExitCode;
use std::time::Duration;

use hv_tests::{Boot, Engine, LINUX_GUEST_MIB, Outcome, SERIAL_PORTS};

const USAGE: &str =
    "usage: hv-run [--engine bochs|qemu-kvm|qemu-tcg] [--timeout SECONDS] [--memory MIB] \
[--cpus N] [--cpu-model BOCHS_MODEL] [--direct-kernel] [--guest-args 'WORDS...'] [--no-guest] \
[--linux] [--keep] [--control] [KERNEL COMMAND LINE...]

Boots the hypervisor with the test guest (tests/guest) as its guest, running the guest's
default scenarios unless --guest-args names others; --no-guest boots the hypervisor alone.
The words after the options are the hypervisor's command line (README, \"Kernel command line\").
--linux boots Debian's kernel instead (target/linux, made by scripts/setup) with our
initramfs, whose /init checks what Linux sees and ends the run with its status; the
guest's console (its ttyS0) is streamed with the label `guest: `. Its kernel command line
is `console=ttyS0,115200 nokaslr hvtest.mem=MIB` and the words of --guest-args. Unless
the hypervisor's command line says guest.mem=, the guest has 512 MiB; the machine has
256 MiB more unless --memory, and the timeout is 1200 s unless --timeout. For example
  hv-run --linux --guest-args 'quiet hvtest.memtest=0' guest.views=fresh
boots it on a fresh altp2m view (README, \"Linux under the hypervisor\", lists the cases).
The engine is QEMU + KVM when KVM can run VMX guests, else Bochs. The run's files (ISO,
serial log, the emulator's log and stderr) go to target/runs/ and are removed after a run
that ended with an exit line, unless --keep. HV_BOCHS / HV_QEMU name other emulator programs.
--control gives the machine the hypervisor's control channel (COM3, docs/control.md) and
serves it on the unix socket control.sock of the run's directory, for
`hvctl --connect SOCKET` (target/debug/hvctl, built by scripts/run --control).

Exit status:
  N    the run ended with `hv: exit N` (0 success, 1 boot failure, 2 panic,
       3 CPU exception, 4 guest refused or stopped, or the guest's own status)
  64   bad usage
  124  the run timed out
  125  the run ended without an exit line (the emulator died or the machine
       stopped after the kernel started printing): a hypervisor, guest or
       emulator failure
  126  harness failure, the hypervisor never ran: the build failed, the emulator
       is missing or could not start, or it failed before the first serial byte
       (configuration refused, crash); its stderr and log are shown";

/// Exit codes of hv-run besides the run's own status (see [`USAGE`]).
const BAD_USAGE: u8 = 64;
const TIMED_OUT: u8 = 124;
const NO_EXIT_LINE: u8 = 125;
const HARNESS_FAILURE: u8 = 126;

fn main() -> ExitCode {
    let mut engine = None;
    let mut boot = Boot::new(Engine::Bochs);
    boot.stream = true;
    boot.timeout = Duration::from_secs(600);
    let mut cmdline = Vec::new();
    let mut guest_args = Some(String::new());
    let mut keep = false;
    let mut control = false;
    let mut linux = false;
    let (mut timeout, mut memory) = (None, None);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .unwrap_or_else(|| fail(&format!("{name} needs a value")))
        };
        match arg.as_str() {
            "--engine" => {
                let name = value("--engine");
                engine = Some(
                    Engine::parse(&name)
                        .unwrap_or_else(|| fail(&format!("unknown engine '{name}'"))),
                );
            }
            "--timeout" => timeout = Some(Duration::from_secs(number(&value("--timeout")))),
            "--memory" => memory = Some(number(&value("--memory")) as u32),
            "--cpus" => boot.cpus = number(&value("--cpus")) as u32,
            "--cpu-model" => boot.cpu_model = value("--cpu-model"),
            "--direct-kernel" => boot.qemu_direct_kernel = true,
            "--guest-args" => guest_args = Some(value("--guest-args")),
            "--no-guest" => guest_args = None,
            "--keep" => keep = true,
            "--control" => control = true,
            "--linux" => linux = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other if other.starts_with("--") => fail(&format!("unknown option '{other}'")),
            word => cmdline.push(word.to_string()),
        }
    }

    if linux && guest_args.is_none() {
        fail("--linux boots Linux as the guest: not with --no-guest");
    }
    // QEMU's loader splits its module list at commas, and Linux's console
    // option has one.
    if linux && boot.qemu_direct_kernel {
        fail("--linux boots through GRUB: not with --direct-kernel");
    }
    // Linux boots in minutes where the test guest takes seconds.
    boot.timeout = timeout.unwrap_or(Duration::from_secs(if linux { 1200 } else { 600 }));
    // The guest's RAM goes to the init's command line too.
    let linux_mib = linux.then(|| take_guest_mem(&mut cmdline).unwrap_or(LINUX_GUEST_MIB));
    if linux && let Err(why) = hv_tests::linux_assets() {
        eprintln!("hv-run: harness failure: {why}");
        return ExitCode::from(HARNESS_FAILURE);
    }

    eprintln!("hv-run: building the hypervisor kernel and the test guest (target/emu)");
    if let Err(why) = hv_tests::build_images() {
        eprintln!("hv-run: harness failure: {why}");
        return ExitCode::from(HARNESS_FAILURE);
    }
    let why = match engine {
        Some(engine) => {
            boot.engine = engine;
            "chosen with --engine".to_string()
        }
        None => {
            let (engine, why) = Engine::best_available();
            boot.engine = engine;
            why
        }
    };
    boot.cmdline = cmdline.join(" ");
    boot = match (linux_mib, guest_args) {
        (Some(mib), Some(args)) => boot.linux_ram(mib, &args),
        (None, Some(args)) => boot.guest(&args),
        (_, None) => boot,
    };
    boot.memory_mib = memory.unwrap_or(boot.memory_mib);
    eprintln!("hv-run: engine {}: {why}", boot.engine);
    eprintln!(
        "hv-run: memory {} MiB, {} CPU(s), timeout {} s",
        boot.memory_mib,
        boot.cpus,
        boot.timeout.as_secs()
    );
    if boot.engine == Engine::Bochs {
        eprintln!("hv-run: {}", hv_tests::network_isolation());
    }
    let dir = hv_tests::new_run_dir(boot.engine);
    let stem = boot.engine.file_stem();
    eprintln!(
        "hv-run: run files in {} (serial log {}, {stem}.log, {stem}.err; removed after a run \
         that ends with an exit line, unless --keep); the serial log follows",
        dir.display(),
        SERIAL_PORTS[0].file
    );
    let mut running = boot.control(control).start_in(dir.clone());
    if control {
        let socket = dir.join("control.sock");
        match running.serve_control(&socket) {
            Ok(()) => eprintln!(
                "hv-run: control channel (COM3 on {}): hvctl --connect {}",
                running
                    .control_path()
                    .map_or("?".into(), |p| p.display().to_string()),
                socket.display()
            ),
            Err(why) => eprintln!("hv-run: no control channel: {why}"),
        }
    }
    let run = running.wait();
    if let Some(ready) = run.ready_after {
        eprintln!(
            "hv-run: ready after {:.2} s (wall, from starting {})",
            ready.as_secs_f64(),
            run.engine
        );
    }
    if let Some(init) = run.init_after {
        let cpu = run
            .init_cpu
            .map_or("?".into(), |cpu| format!("{:.2}", cpu.as_secs_f64()));
        eprintln!(
            "hv-run: Linux's init started after {:.2} s (wall, from starting {}), {cpu} s of its CPU time",
            init.as_secs_f64(),
            run.engine
        );
    }
    let code = match run.outcome {
        Outcome::Exit(status) => {
            eprintln!(
                "hv-run: exit status {status} after {:.2} s",
                run.wall.as_secs_f64()
            );
            if !keep {
                run.clean_up();
            }
            return ExitCode::from(status);
        }
        Outcome::HarnessFailure(_) => HARNESS_FAILURE,
        Outcome::NoExitLine => NO_EXIT_LINE,
        Outcome::TimedOut => TIMED_OUT,
    };
    // The serial log was streamed already: the emulator's side matters here.
    eprintln!("\nhv-run: {}\n{}", run.summary(), run.emulator_report());
    eprintln!("hv-run: {}; exit code {code}", run.summary());
    ExitCode::from(code)
}

/// Takes `guest.mem=MIB` out of the hypervisor's command line words: the
/// Linux guest's RAM, which [`Boot::linux_ram`] puts back.
fn take_guest_mem(words: &mut Vec<String>) -> Option<u32> {
    let at = words.iter().position(|w| w.starts_with("guest.mem="))?;
    let word = words.remove(at);
    let mib = number(&word["guest.mem=".len()..]);
    Some(u32::try_from(mib).unwrap_or_else(|_| fail(&format!("{word}: too large"))))
}

fn number(text: &str) -> u64 {
    text.parse()
        .unwrap_or_else(|_| fail(&format!("'{text}' is not a number")))
}

fn fail(message: &str) -> ! {
    eprintln!("hv-run: {message}\n{USAGE}");
    std::process::exit(BAD_USAGE.into())
}
