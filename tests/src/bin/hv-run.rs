//! `hv-run`: builds the hypervisor, boots it in the chosen (or best) engine,
//! streams its serial log and exits with the run's status. `scripts/run` calls it.

use std::process::ExitCode;
use std::time::Duration;

use hv_tests::{Boot, Engine};

const USAGE: &str =
    "usage: hv-run [--engine bochs|qemu-kvm|qemu-tcg] [--timeout SECONDS] [--memory MIB] \
[--cpus N] [--cpu-model BOCHS_MODEL] [--direct-kernel] [--guest-args 'SCENARIOS...'] [--no-guest] [KERNEL COMMAND LINE...]

Boots the hypervisor with the test guest (tests/guest) as its guest, running the guest's
default scenarios unless --guest-args names others; --no-guest boots the hypervisor alone.";

fn main() -> ExitCode {
    let mut engine = None;
    let mut boot = Boot::new(Engine::Bochs);
    boot.stream = true;
    boot.timeout = Duration::from_secs(600);
    let mut cmdline = Vec::new();
    let mut guest_args = Some(String::new());
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
            "--timeout" => boot.timeout = Duration::from_secs(number(&value("--timeout"))),
            "--memory" => boot.memory_mib = number(&value("--memory")) as u32,
            "--cpus" => boot.cpus = number(&value("--cpus")) as u32,
            "--cpu-model" => boot.cpu_model = value("--cpu-model"),
            "--direct-kernel" => boot.qemu_direct_kernel = true,
            "--guest-args" => guest_args = Some(value("--guest-args")),
            "--no-guest" => guest_args = None,
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other if other.starts_with("--") => fail(&format!("unknown option '{other}'")),
            word => cmdline.push(word.to_string()),
        }
    }
    boot.engine = engine.unwrap_or_else(Engine::best_available);
    boot.cmdline = cmdline.join(" ");
    if let Some(args) = guest_args {
        boot = boot.guest(&args);
    }
    eprintln!(
        "hv-run: booting in {} (memory {} MiB, {} CPU(s))",
        boot.engine, boot.memory_mib, boot.cpus
    );
    let run = boot.run();
    if run.timed_out {
        eprintln!(
            "hv-run: timed out after {} s; files in {}",
            boot.timeout.as_secs(),
            run.dir.display()
        );
        return ExitCode::from(124);
    }
    match run.exit_status {
        Some(status) => {
            if let Some(ready) = run.ready_after {
                eprintln!(
                    "hv-run: ready after {:.2} s (wall, from starting {})",
                    ready.as_secs_f64(),
                    run.engine
                );
            }
            eprintln!(
                "hv-run: exit status {status} after {:.2} s",
                run.wall.as_secs_f64()
            );
            run.clean_up();
            ExitCode::from(status)
        }
        None => {
            eprintln!(
                "hv-run: the run ended without an exit line\n{}",
                run.report()
            );
            ExitCode::from(125)
        }
    }
}

fn number(text: &str) -> u64 {
    text.parse()
        .unwrap_or_else(|_| fail(&format!("'{text}' is not a number")))
}

fn fail(message: &str) -> ! {
    eprintln!("hv-run: {message}\n{USAGE}");
    std::process::exit(2)
}
