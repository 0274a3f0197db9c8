//! `hvctl` itself, against `FakeHypervisor` (a test double speaking the
//! protocol, see tests/fake/mod.rs) on a unix socket, as a person would
//! use it with `scripts/run --control`.

mod fake;

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::mpsc::channel;
use std::time::Duration;

use fake::FakeHypervisor;
use hv_control::{Context, Event, EventKind, access_bits};

/// A socket path, and the fake that will serve the first connection to it.
fn listen(name: &str) -> (PathBuf, std::sync::mpsc::Receiver<FakeHypervisor>) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let path = dir.join(format!("hvctl-{name}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        tx.send(FakeHypervisor::serve(stream)).unwrap();
    });
    (path, rx)
}

fn hvctl(socket: &PathBuf, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hvctl"))
        .arg("--connect")
        .arg(socket)
        .args(["--timeout", "10"])
        .args(args)
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    assert!(
        out.status.success(),
        "hvctl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn info_and_read_print_what_the_hypervisor_says() {
    let (socket, _fake) = listen("info");
    let text = stdout(&hvctl(&socket, &["info"]));
    assert!(text.contains("vcpus 2, max views 511"), "{text}");
    assert!(text.contains("features: vmfunc ve shadow-pages"), "{text}");
    assert!(text.contains("altp2m mode external"), "{text}");
    let (socket, _fake) = listen("read");
    let text = stdout(&hvctl(&socket, &["read", "0x100000", "20"]));
    let first: Vec<String> = (0x10_0000u64..0x10_0010)
        .map(|a| format!("{:02x}", FakeHypervisor::initial_byte(a)))
        .collect();
    assert!(
        text.starts_with(&format!("0x0000100000  {}", first.join(" "))),
        "{text}"
    );
    assert_eq!(text.lines().count(), 2);
}

#[test]
fn errors_are_reported_with_the_hypervisors_code() {
    let (socket, _fake) = listen("error");
    let out = hvctl(&socket, &["destroy-view", "0"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refused: EINVAL (-22)"), "{stderr}");
}

#[test]
fn watch_prints_events_as_json_lines_and_continues_them() {
    let (socket, fake) = listen("watch");
    let emitter = std::thread::spawn(move || {
        let fake = fake.recv().unwrap();
        // After hvctl turned events on.
        while fake.with(|s| s.classes) == 0 {
            std::thread::sleep(Duration::from_millis(10));
        }
        let context = Context {
            vcpu: 1,
            view: 3,
            rip: 0xffff_ffff_8100_0000,
            cr3: 0x1aa000,
        };
        fake.emit(Event {
            context,
            kind: EventKind::MemAccess {
                gpa: 0x10_1008,
                gla: Some(0xffff_8880_0010_1008),
                access: access_bits::WRITE,
                entry: 5,
            },
        });
        fake.emit(Event {
            context,
            kind: EventKind::Cr3Write {
                old: 0x1aa000,
                new: 0x1bb000,
            },
        });
        // Wait for both answers before the fake goes.
        while fake.with(|s| s.answers.len()) < 2 {
            std::thread::sleep(Duration::from_millis(10));
        }
        fake
    });
    let out = hvctl(
        &socket,
        &[
            "watch",
            "--events",
            "mem,cr3",
            "--auto-continue",
            "--count",
            "2",
        ],
    );
    let text = stdout(&out);
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(lines[0]["event"], "mem-access");
    assert_eq!(lines[0]["gpa"], "0x101008");
    assert_eq!(lines[0]["access"], "w");
    assert_eq!(lines[0]["entry"], "rx");
    assert_eq!(lines[0]["vcpu"], 1);
    assert_eq!(lines[0]["view"], 3);
    assert_eq!(lines[1]["event"], "cr3-write");
    assert_eq!(lines[1]["new"], "0x1bb000");
    let fake = emitter.join().unwrap();
    assert!(fake.with(|s| s.answers.iter().all(|(_, a)| *a == Default::default())));
}

#[test]
fn dump_writes_raw_and_lime_files() {
    let (socket, _fake) = listen("dump");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let raw = dir.join(format!("dump-{}.raw", std::process::id()));
    let lime = dir.join(format!("dump-{}.lime", std::process::id()));
    let out = hvctl(
        &socket,
        &[
            "dump",
            "--raw",
            raw.to_str().unwrap(),
            "--lime",
            lime.to_str().unwrap(),
            "--range",
            "0x9e000:0x64000",
        ],
    );
    stdout(&out);
    let raw_bytes = std::fs::read(&raw).unwrap();
    let lime_bytes = std::fs::read(&lime).unwrap();
    assert_eq!(raw_bytes.len(), 0x10_2000);
    let ranges = hv_ctl::dump::parse_lime(&lime_bytes).unwrap();
    assert_eq!(ranges.len(), 2);
    assert_eq!(lime_bytes.len(), 2 * 32 + 0x1000 + 0x2000);
    assert_eq!(
        raw_bytes[0x10_1234],
        FakeHypervisor::initial_byte(0x10_1234)
    );
    let _ = std::fs::remove_file(raw);
    let _ = std::fs::remove_file(lime);
}
