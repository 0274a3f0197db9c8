//! Plans a real Linux bzImage, when there is one: the kernel named by
//! `HV_LINUX_BZIMAGE` (then it must exist), else `target/linux/vmlinuz`
//! (from `scripts/linux-assets`), with `HV_LINUX_INITRD` or
//! `target/linux/initramfs.cpio.gz` as its initrd if present. Without a
//! kernel the test says so on stderr and checks nothing.

use std::io::Write;
use std::path::PathBuf;

use hv_core::loader::{
    BootOptions, Content, EntryState, ImageError, LinuxEntry, LinuxError, MemoryKind, MemoryRegion,
    Module, bootparams as bp, linux_header, plan_guest,
};

/// Not captured by the test harness, unlike `eprintln!`.
fn say(what: &str) {
    let _ = writeln!(std::io::stderr(), "linux_bzimage: {what}");
}

fn asset(var: &str, default: &str) -> Option<PathBuf> {
    match std::env::var_os(var) {
        Some(path) => Some(PathBuf::from(path)),
        None => {
            let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/linux")
                .join(default);
            path.exists().then_some(path)
        }
    }
}

fn guest_map(ram_end: u64) -> Vec<MemoryRegion> {
    let region = |start, end, kind| MemoryRegion { start, end, kind };
    vec![
        region(0, 0x9_f000, MemoryKind::Ram),
        region(0x9_f000, 0x10_0000, MemoryKind::Reserved),
        region(0x10_0000, ram_end, MemoryKind::Ram),
    ]
}

#[test]
fn a_real_kernel_is_planned() {
    let Some(kernel_path) = asset("HV_LINUX_BZIMAGE", "vmlinuz") else {
        say("SKIPPED: no kernel (set HV_LINUX_BZIMAGE or run scripts/linux-assets)");
        return;
    };
    let image =
        std::fs::read(&kernel_path).unwrap_or_else(|e| panic!("{}: {e}", kernel_path.display()));
    let initrd = asset("HV_LINUX_INITRD", "initramfs.cpio.gz")
        .map(|p| std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap_or_default();

    let hdr = linux_header(&image).expect("a bzImage the loader accepts");
    say(&format!(
        "{}: protocol {}.{:02}, loadflags {:#x}, xloadflags {:#x}, relocatable {}, \
         pref_address {:#x}, init_size {:#x}, kernel_alignment {:#x}, min_alignment {:#x}, \
         initrd_addr_max {:#x}, cmdline_size {:#x}, protected-mode code {:#x} bytes at file offset {:#x}",
        kernel_path.display(),
        hdr.version >> 8,
        hdr.version & 0xff,
        hdr.loadflags,
        hdr.xloadflags,
        hdr.relocatable,
        hdr.pref_address,
        hdr.init_size,
        hdr.kernel_alignment,
        hdr.min_alignment,
        hdr.initrd_addr_max,
        hdr.cmdline_size,
        hdr.kernel.len(),
        hdr.kernel.start
    ));
    assert!(hdr.has_64bit_entry(), "a 64-bit kernel");

    // Room for the kernel at pref_address and the initrd above it.
    let ram_end = (hdr.pref_address + hdr.init_size + initrd.len() as u64 + (16 << 20))
        .next_multiple_of(1 << 20);
    let map = guest_map(ram_end);
    let modules = [Module {
        bytes: &initrd,
        cmdline: "",
    }];
    let modules = if initrd.is_empty() {
        &[][..]
    } else {
        &modules[..]
    };
    let cmdline = "console=ttyS0 earlyprintk=serial panic=-1";
    let plan = plan_guest(&image, modules, &map, cmdline, &BootOptions::default()).unwrap();
    say(&format!("{} MiB guest: {}", ram_end >> 20, plan.entry));
    for w in &plan.writes {
        say(&format!("  {w:?}"));
    }
    let EntryState::Linux64 { rip, rsi, .. } = plan.entry else {
        panic!("{}", plan.entry)
    };
    assert_eq!(rip, hdr.pref_address + 0x200, "at pref_address");
    let zero_page = &plan.writes.iter().find(|w| w.gpa == rsi).unwrap().bytes;
    assert_eq!(bp::HEADER.read(zero_page), Some(bp::HDRS));
    assert_eq!(bp::TYPE_OF_LOADER.read(zero_page), Some(0xff));
    assert_eq!(bp::E820_ENTRIES.read(zero_page), Some(3));
    let kernel = plan
        .writes
        .iter()
        .find(|w| w.content == Content::Kernel)
        .unwrap();
    assert_eq!(kernel.bytes.len(), hdr.kernel.len());
    if !initrd.is_empty() {
        let ramdisk = bp::RAMDISK_IMAGE.read(zero_page).unwrap();
        assert_eq!(bp::RAMDISK_SIZE.read(zero_page), Some(initrd.len() as u64));
        assert!(
            ramdisk >= hdr.pref_address + hdr.init_size,
            "above the kernel"
        );
        assert!(ramdisk + initrd.len() as u64 <= hdr.initrd_addr_max + 1);
    }

    // The 32-bit entry is there too.
    let options = BootOptions {
        linux_entry: LinuxEntry::Force32,
        ..BootOptions::default()
    };
    let plan = plan_guest(&image, modules, &map, cmdline, &options).unwrap();
    assert!(
        matches!(plan.entry, EntryState::Linux32 { eip, .. } if u64::from(eip) == hdr.pref_address)
    );

    // The smallest guest: the kernel relocated to its first aligned address
    // from 1 MiB, init_size bytes from there. One MiB less is refused.
    let smallest = (hdr.kernel_alignment.max(1 << 20) + hdr.init_size).next_multiple_of(1 << 20);
    let plan = plan_guest(
        &image,
        &[],
        &guest_map(smallest),
        cmdline,
        &BootOptions::default(),
    )
    .unwrap();
    let EntryState::Linux64 { rip, .. } = plan.entry else {
        panic!("{}", plan.entry)
    };
    assert_eq!(
        rip,
        hdr.kernel_alignment.max(1 << 20) + 0x200,
        "relocated down"
    );
    let refused = plan_guest(
        &image,
        &[],
        &guest_map(smallest - (1 << 20)),
        cmdline,
        &BootOptions::default(),
    );
    let Err(ImageError::Linux(LinuxError::KernelDoesNotFit { .. })) = refused else {
        panic!(
            "a guest below {smallest:#x} bytes is too small for init_size {:#x}",
            hdr.init_size
        )
    };
    say(&format!(
        "smallest guest without initrd: {} MiB (kernel relocated to {rip:#x} - 0x200)",
        smallest >> 20
    ));
}
