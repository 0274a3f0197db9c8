//! volatility3 reads `hvctl dump`'s images: both formats, dumped from
//! `FakeHypervisor` (the protocol test double, tests/fake/mod.rs) after a
//! Linux kernel banner was written into its guest memory, must show that
//! banner in volatility3's `banners.Banners`. The same check against a real
//! Linux guest needs the hypervisor's control server (docs/control.md).
//!
//! Ignored by default: it installs volatility3 from PyPI into
//! target/volatility (about 10 s, once). Run it with
//! `cargo test -p hv-ctl --test volatility -- --ignored`; `HV_VOLATILITY`
//! names an installed `vol` instead.

mod fake;

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use fake::FakeHypervisor;
use hv_ctl::Client;
use hv_ctl::dump::{self, Sinks};

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
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let raw_path = dir.join(format!("volatility-{}.raw", std::process::id()));
    let lime_path = dir.join(format!("volatility-{}.lime", std::process::id()));
    std::fs::write(&raw_path, raw.into_inner()).unwrap();
    std::fs::write(&lime_path, lime).unwrap();
    let want = BANNER.trim_end();
    for image in [&raw_path, &lime_path] {
        let text = banners(&vol, image);
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
