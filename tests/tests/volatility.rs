//! volatility3 reads `hvctl dump`'s images: both formats, dumped from
//! `FakeHypervisor` (hv-ctl's protocol test double) after a Linux kernel
//! banner was written into its guest memory, and dumped from Debian's
//! kernel running under the hypervisor in Bochs (the pages of its
//! `linux_banner`, found through System.map and the guest's own page
//! tables: a whole dump over Bochs's serial line would take hours), must
//! show the banner in volatility3's `banners.Banners`, at its
//! guest-physical address.
//!
//! Ignored by default: they install volatility3 from PyPI into
//! target/volatility (about 10 s, once), and the second boots Linux (long
//! suite). Run them with `cargo test -p hv-tests --test volatility --
//! --ignored`; `HV_VOLATILITY` names an installed `vol` instead.

#[path = "../../hv-ctl/tests/fake/mod.rs"]
mod fake;

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fake::FakeHypervisor;
use hv_ctl::Client;
use hv_ctl::dump::{self, Sinks};
use hv_ctl::protocol::{ALL_VCPUS, Range};
use hv_tests::{Boot, Engine, exit, linux_assets};

const VOLATILITY: &str = "volatility3==2.28.2";
const BANNER: &str = "Linux version 6.1.0-28-amd64 (debian-kernel@lists.debian.org) \
(gcc-12 (Debian 12.2.0-14) 12.2.0, GNU ld (GNU Binutils for Debian) 2.40) \
#1 SMP PREEMPT_DYNAMIC Debian 6.1.119-1 (2024-11-22)\n";

/// `vol`, installed into a virtual environment under target/ if need be.
fn volatility() -> PathBuf {
    if let Some(vol) = std::env::var_os("HV_VOLATILITY") {
        return vol.into();
    }
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("../volatility");
    let vol = venv.join("bin/vol");
    if !vol.exists() {
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success())
            && Command::new(venv.join("bin/pip"))
                .args(["install", "-q", VOLATILITY])
                .status()
                .is_ok_and(|s| s.success());
        assert!(ok, "installing {VOLATILITY} into {} failed", venv.display());
    }
    vol
}

fn banners(vol: &Path, image: &Path) -> String {
    let out = Command::new(vol)
        .arg("-q")
        .arg("-f")
        .arg(image)
        .arg("banners.Banners")
        .output()
        .expect("vol runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "vol failed on {}: {}\n{text}",
        image.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
#[ignore = "installs volatility3 from PyPI"]
fn volatility_finds_the_kernel_banner_in_raw_and_lime_dumps() {
    let vol = volatility();
    let (fake, end) = FakeHypervisor::start();
    let mut client = Client::connect_with(end, 0, Duration::from_secs(10)).unwrap();
    // Where a kernel's banner would be: in high memory, across a page boundary.
    let at = 0x23_0fc0;
    // NUL-terminated, as the kernel's `linux_banner` (volatility wants the NUL).
    client
        .write_memory(at, format!("{BANNER}\0").as_bytes())
        .unwrap();
    let mut raw = Cursor::new(Vec::new());
    let mut lime = Vec::new();
    dump::dump(
        &mut client,
        None,
        Sinks {
            raw: Some(&mut raw),
            lime: Some(&mut lime),
        },
        |_, _| {},
    )
    .unwrap();
    drop(fake);
    expect_banner(&vol, "fake", raw.into_inner(), lime, at, BANNER.trim_end());
}

/// volatility finds `want` at guest-physical `at` in both images.
fn expect_banner(vol: &Path, name: &str, raw: Vec<u8>, lime: Vec<u8>, at: u64, want: &str) {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let raw_path = dir.join(format!("volatility-{name}-{}.raw", std::process::id()));
    let lime_path = dir.join(format!("volatility-{name}-{}.lime", std::process::id()));
    std::fs::write(&raw_path, raw).unwrap();
    std::fs::write(&lime_path, lime).unwrap();
    for image in [&raw_path, &lime_path] {
        let text = banners(vol, image);
        let line = text
            .lines()
            .find(|l| l.contains(want))
            .unwrap_or_else(|| panic!("no banner from {}:\n{text}", image.display()));
        // Offsets: the raw image's is the guest-physical address; LiME's
        // layer maps its ranges back to the same addresses.
        assert!(line.starts_with(&format!("{at:#x}")), "{line}");
    }
    let _ = std::fs::remove_file(raw_path);
    let _ = std::fs::remove_file(lime_path);
}

#[test]
#[ignore = "long suite: boots Linux, installs volatility3 from PyPI"]
fn volatility_finds_debians_kernel_in_a_dump_of_the_running_guest() {
    let vol = volatility();
    let assets = linux_assets().unwrap_or_else(|why| panic!("{why}"));
    let map = std::fs::read_to_string(&assets.system_map).unwrap();
    let banner_va = map
        .lines()
        .find_map(|l| {
            let mut w = l.split_whitespace();
            let address = u64::from_str_radix(w.next()?, 16).ok()?;
            (w.nth(1)? == "linux_banner").then_some(address)
        })
        .expect("linux_banner in System.map");
    let mut boot = Boot::new(Engine::Bochs)
        .linux_ram(256, "hvtest.expect=hv hvtest.memtest=0 hvtest.probe=1")
        .control(true);
    boot.timeout = Duration::from_secs(1500);
    let mut running = boot.start();
    let mut client = running.connect_tool(Duration::from_secs(300));
    // Once init runs, the kernel is up and its banner in place; init's probe
    // check waits for the tool meanwhile (tests/linux-init/src/probe.rs).
    let Some(line) = running.wait_for_line("probe: mailbox=", Duration::from_secs(1200)) else {
        panic!("init never started\n{}", running.stop().report())
    };
    let mailbox = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("mailbox=0x"))
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .expect("the mailbox's address");
    client.pause(ALL_VCPUS).unwrap();
    let gpa = client.translate(0, 0, banner_va).unwrap().gpa;
    client.resume(ALL_VCPUS).unwrap();
    let text = client.read_memory(gpa, 256).unwrap();
    let len = text.iter().position(|&b| b == 0).unwrap_or(text.len());
    let banner = String::from_utf8_lossy(&text[..len]).trim_end().to_owned();
    assert!(banner.starts_with("Linux version 6."), "{banner}");
    let mut raw = Cursor::new(Vec::new());
    let mut lime = Vec::new();
    dump::dump(
        &mut client,
        Some(Range {
            start: gpa & !0xfff,
            len: 0x2000,
        }),
        Sinks {
            raw: Some(&mut raw),
            lime: Some(&mut lime),
        },
        |_, _| {},
    )
    .unwrap();
    // Let init go on: its probe (without a breakpoint), then the end.
    client
        .write_memory(mailbox + 8, &1u64.to_le_bytes())
        .unwrap();
    while client.read_memory(mailbox + 32, 1).unwrap()[0] != 2 {
        std::thread::sleep(Duration::from_millis(500));
    }
    client
        .write_memory(mailbox + 8, &2u64.to_le_bytes())
        .unwrap();
    let run = running.wait();
    run.expect_exit(exit::OK)
        .expect_line("guest: PASS probe")
        .expect_torn_down_cleanly();
    expect_banner(&vol, "linux", raw.into_inner(), lime, gpa, &banner);
    run.clean_up();
}
