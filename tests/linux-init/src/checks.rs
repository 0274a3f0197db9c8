//! The verdicts: what each check makes of what it read. `main.rs` gathers
//! the readings (CPUID on each CPU, `/proc` files before and after a wait).

use crate::Outcome;
use crate::params::Expect;
use crate::procfs::{IrqLine, is_timer};

/// What CPUID showed on one CPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuidSeen {
    pub cpu: usize,
    /// CPUID.1:ECX bit 31.
    pub hypervisor_bit: bool,
    /// EAX of leaf 0x40000000: the hypervisor's highest leaf.
    pub max_leaf: u32,
    /// EBX, ECX, EDX of leaf 0x40000000.
    pub signature: [u8; 12],
    /// EAX of leaf 0x40000001: the interface version.
    pub version: u32,
}

impl CpuidSeen {
    /// Our hypervisor's signature is in leaf 0x40000000. (Without a
    /// hypervisor, CPUs answer leaves above their range with some other
    /// leaf's data, so only the signature tells.)
    pub fn ours(&self) -> bool {
        self.signature == hv_abi::CPUID_SIGNATURE
    }

    /// Why this CPU does not show what `expect` says, if it does not.
    fn problem(&self, expect: Expect) -> Option<String> {
        let cpu = self.cpu;
        let signature = String::from_utf8_lossy(&self.signature)
            .escape_debug()
            .to_string();
        match expect {
            Expect::Hypervisor if !self.hypervisor_bit => Some(format!(
                "cpu {cpu}: CPUID.1:ECX[31] (hypervisor present) is clear"
            )),
            Expect::Hypervisor if !self.ours() => Some(format!(
                "cpu {cpu}: leaf 0x40000000 signature \"{signature}\", not \"RustAltp2mHV\""
            )),
            Expect::Hypervisor if self.max_leaf < hv_abi::CPUID_FEATURES => Some(format!(
                "cpu {cpu}: leaf 0x40000000 max leaf {:#x} < {:#x}",
                self.max_leaf,
                hv_abi::CPUID_FEATURES
            )),
            Expect::Hypervisor if u64::from(self.version) != hv_abi::VERSION => Some(format!(
                "cpu {cpu}: leaf 0x40000001 interface version {}, expected {}",
                self.version,
                hv_abi::VERSION
            )),
            Expect::Bare if self.hypervisor_bit => Some(format!(
                "cpu {cpu}: CPUID.1:ECX[31] is set (signature \"{signature}\") on bare hardware"
            )),
            Expect::Bare if self.ours() => Some(format!(
                "cpu {cpu}: our signature in leaf 0x40000000 on bare hardware"
            )),
            _ => None,
        }
    }
}

/// CPUID on every CPU, and Linux's `hypervisor` flag in `/proc/cpuinfo`
/// (what the kernel made of the same bit) on every processor.
pub fn cpuid(expect: Expect, seen: &[CpuidSeen], linux_flags: &[bool]) -> Outcome {
    const NAME: &str = "cpuid";
    if seen.is_empty() {
        return Outcome::fail(NAME, "CPUID ran on no CPU");
    }
    let problems: Vec<String> = seen.iter().filter_map(|s| s.problem(expect)).collect();
    if !problems.is_empty() {
        return Outcome::fail(NAME, problems.join("; "));
    }
    let want_flag = expect == Expect::Hypervisor;
    let flagged = linux_flags.iter().filter(|&&f| f).count();
    if linux_flags.len() != seen.len() || linux_flags.iter().any(|&f| f != want_flag) {
        return Outcome::fail(
            NAME,
            format!(
                "/proc/cpuinfo has the hypervisor flag on {flagged} of {} processors, CPUID ran on {} CPUs",
                linux_flags.len(),
                seen.len()
            ),
        );
    }
    let cpus = seen.len();
    Outcome::pass(
        NAME,
        match expect {
            Expect::Hypervisor => format!(
                "{cpus} CPUs: hypervisor bit set, leaf 0x40000000 \"RustAltp2mHV\" max {:#x}, \
                 interface version {}; Linux flags hypervisor on {flagged}",
                seen[0].max_leaf, seen[0].version
            ),
            Expect::Bare => format!(
                "{cpus} CPUs: no hypervisor bit, no hypervisor signature (as expected on bare hardware)"
            ),
        },
    )
}

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// The legacy hole 0xA0000..0x100000 (VGA memory and ROMs): never RAM.
pub const LEGACY_HOLE: u64 = 384 * KIB;
/// What firmware may keep of the RAM besides the legacy hole: an EBDA
/// below 640 KiB and ACPI/SMBIOS tables at the top of RAM. Bochs's BIOS
/// keeps 4 KiB + 64 KiB; our hypervisor's map keeps 4 KiB (0x9F000..0xA0000).
pub const FIRMWARE_SLACK: u64 = 640 * KIB;
/// What the kernel may trim from the firmware's RAM ranges before listing
/// them in /proc/iomem: it reserves the first page, and rounds ranges to pages.
pub const KERNEL_TRIM: u64 = 64 * KIB;
/// What the kernel reserves out of its RAM for good (MemTotal excludes it)
/// besides the page array: its image and early allocations. Debian's 6.1
/// kernel image is about 33 MiB; the rest is slack for early allocations
/// (page tables, per-CPU areas, the log buffer).
pub const KERNEL_RESERVE: u64 = 64 * MIB;

/// What the kernel reports of its memory, in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryView {
    /// "System RAM" in the map the firmware or boot loader handed over
    /// (`/sys/firmware/memmap`), if the kernel exposes it.
    pub firmware_ram: Option<u64>,
    /// Top-level "System RAM" in `/proc/iomem`.
    pub iomem_ram: u64,
    /// MemTotal of `/proc/meminfo`.
    pub mem_total: u64,
}

/// Struct page array: 64 bytes per 4 KiB page.
fn page_array(ram: u64) -> u64 {
    ram / 64
}

/// The memory check. With `expected_mib` (`hvtest.mem`) = M MiB of guest RAM:
/// - firmware RAM F: `M - 384 KiB - 640 KiB <= F <= M - 384 KiB` (the legacy
///   hole is never RAM; [`FIRMWARE_SLACK`] for what firmware keeps);
/// - /proc/iomem RAM I: `F - 64 KiB <= I <= F` ([`KERNEL_TRIM`]);
/// - MemTotal T: `I - I/64 - 64 MiB <= T <= I` (the page array and
///   [`KERNEL_RESERVE`]).
///
/// Without it only the last two, which still catch a kernel that ignores or
/// invents RAM.
pub fn memory(expected_mib: Option<u64>, view: &MemoryView) -> Outcome {
    const NAME: &str = "memory";
    let kib = |bytes: u64| bytes / KIB;
    let firmware = view.firmware_ram.unwrap_or(view.iomem_ram);
    let figures = format!(
        "firmware RAM {} KiB{}, iomem RAM {} KiB, MemTotal {} KiB",
        kib(firmware),
        if view.firmware_ram.is_some() {
            ""
        } else {
            " (no /sys/firmware/memmap: iomem's)"
        },
        kib(view.iomem_ram),
        kib(view.mem_total)
    );
    let mut problems = Vec::new();
    if let Some(mib) = expected_mib {
        let expected = mib * MIB;
        let high = expected.saturating_sub(LEGACY_HOLE);
        let low = high.saturating_sub(FIRMWARE_SLACK);
        if !(low..=high).contains(&firmware) {
            problems.push(format!(
                "firmware RAM {} KiB outside {}..={} KiB for hvtest.mem={mib}",
                kib(firmware),
                kib(low),
                kib(high)
            ));
        }
    }
    let trimmed = firmware.saturating_sub(KERNEL_TRIM);
    if !(trimmed..=firmware).contains(&view.iomem_ram) {
        problems.push(format!(
            "iomem RAM {} KiB outside {}..={} KiB (firmware RAM less what the kernel trims)",
            kib(view.iomem_ram),
            kib(trimmed),
            kib(firmware)
        ));
    }
    let reserved = page_array(view.iomem_ram) + KERNEL_RESERVE;
    let floor = view.iomem_ram.saturating_sub(reserved);
    if !(floor..=view.iomem_ram).contains(&view.mem_total) {
        problems.push(format!(
            "MemTotal {} KiB outside {}..={} KiB (iomem RAM less page array and kernel)",
            kib(view.mem_total),
            kib(floor),
            kib(view.iomem_ram)
        ));
    }
    let reserved_by_kernel = kib(view.iomem_ram.saturating_sub(view.mem_total));
    match (problems.is_empty(), expected_mib) {
        (true, Some(mib)) => Outcome::pass(
            NAME,
            format!("hvtest.mem={mib} MiB: {figures} (kernel keeps {reserved_by_kernel} KiB)"),
        ),
        (true, None) => Outcome::pass(
            NAME,
            format!(
                "{figures} (kernel keeps {reserved_by_kernel} KiB; no hvtest.mem, size not compared)"
            ),
        ),
        (false, _) => Outcome::fail(NAME, format!("{}; {figures}", problems.join("; "))),
    }
}

/// Timer readings at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct TimerReading {
    pub interrupts: Vec<IrqLine>,
    pub uptime: f64,
}

/// Timer interrupts and uptime both advance across a wait of `waited`
/// seconds (measured with CLOCK_MONOTONIC).
pub fn timer(before: &TimerReading, after: &TimerReading, waited: f64) -> Outcome {
    const NAME: &str = "timer";
    let advanced: Vec<String> = after
        .interrupts
        .iter()
        .filter(|line| is_timer(line))
        .filter_map(|line| {
            let old = before.interrupts.iter().find(|b| b.label == line.label)?;
            let delta = line.count.checked_sub(old.count).filter(|&d| d > 0)?;
            Some(format!("{} +{delta}", line.label))
        })
        .collect();
    let uptime = after.uptime - before.uptime;
    let detail = format!(
        "over {:.0} ms: timer interrupts {}, uptime +{:.2} s",
        waited * 1000.0,
        if advanced.is_empty() {
            "none".to_string()
        } else {
            advanced.join(", ")
        },
        uptime
    );
    if advanced.is_empty() || uptime <= 0.0 {
        Outcome::fail(NAME, format!("no progress: {detail}"))
    } else {
        Outcome::pass(NAME, detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(cpu: usize, bit: bool, signature: &[u8; 12], max: u32, version: u32) -> CpuidSeen {
        CpuidSeen {
            cpu,
            hypervisor_bit: bit,
            max_leaf: max,
            signature: *signature,
            version,
        }
    }

    const OURS: &[u8; 12] = b"RustAltp2mHV";
    const FOREIGN: &[u8; 12] = b"KVMKVMKVM\0\0\0";
    const JUNK: &[u8; 12] = b"\0\0\0\0\0\0\0\0\0\0\0\0";

    #[test]
    fn cpuid_under_the_hypervisor() {
        let good = [
            seen(0, true, OURS, 0x4000_0001, 1),
            seen(1, true, OURS, 0x4000_0001, 1),
        ];
        assert!(cpuid(Expect::Hypervisor, &good, &[true, true]).passed);
        // Linux must see the bit too, on every processor.
        assert!(!cpuid(Expect::Hypervisor, &good, &[true, false]).passed);
        assert!(!cpuid(Expect::Hypervisor, &good, &[true]).passed);
        assert!(!cpuid(Expect::Bare, &good, &[true, true]).passed);

        let one_cpu_bare = [
            seen(0, true, OURS, 0x4000_0001, 1),
            seen(1, false, JUNK, 0, 0),
        ];
        let outcome = cpuid(Expect::Hypervisor, &one_cpu_bare, &[true, false]);
        assert!(!outcome.passed);
        assert!(
            outcome.detail.contains("cpu 1: CPUID.1:ECX[31]"),
            "{}",
            outcome.detail
        );

        for bad in [
            seen(0, true, FOREIGN, 0x4000_0001, 1),
            seen(0, true, OURS, 0x4000_0000, 1),
            seen(0, true, OURS, 0x4000_0001, 2),
        ] {
            assert!(!cpuid(Expect::Hypervisor, &[bad], &[true]).passed);
        }
        assert!(!cpuid(Expect::Hypervisor, &[], &[]).passed);
    }

    #[test]
    fn cpuid_on_bare_hardware() {
        let bare = [seen(0, false, JUNK, 0x16, 0)];
        assert!(cpuid(Expect::Bare, &bare, &[false]).passed);
        assert!(!cpuid(Expect::Hypervisor, &bare, &[false]).passed);
        assert!(!cpuid(Expect::Bare, &bare, &[true]).passed);
        assert!(
            !cpuid(
                Expect::Bare,
                &[seen(0, true, FOREIGN, 0x4000_0001, 0)],
                &[true]
            )
            .passed
        );
    }

    fn view(firmware_kib: u64, iomem_kib: u64, total_kib: u64) -> MemoryView {
        MemoryView {
            firmware_ram: Some(firmware_kib * KIB),
            iomem_ram: iomem_kib * KIB,
            mem_total: total_kib * KIB,
        }
    }

    #[test]
    fn memory_bounds() {
        // The hypervisor's map for 512 MiB: 0..0x9F000 and 1 MiB..512 MiB.
        let hv = 512 * 1024 - 388;
        assert!(memory(Some(512), &view(hv, hv - 4, hv - 45_000)).passed);
        // Bochs's: the same less 64 KiB of ACPI tables at the top.
        assert!(memory(Some(512), &view(hv - 64, hv - 68, hv - 45_000)).passed);
        // The bounds are inclusive at both ends.
        let top = 512 * 1024 - 384;
        assert!(memory(Some(512), &view(top, top, top)).passed);
        let low = top - 704;
        assert!(memory(Some(512), &view(top - 640, low, low - low / 64 - 65_536)).passed);
        // Outside them.
        assert!(!memory(Some(512), &view(top + 4, top, top - 40_000)).passed);
        assert!(!memory(Some(512), &view(top - 644, top - 700, top - 40_000)).passed);
        assert!(!memory(Some(256), &view(hv, hv - 4, hv - 45_000)).passed);
        assert!(!memory(Some(512), &view(hv, hv - 68, hv - 45_000)).passed);
        assert!(!memory(Some(512), &view(hv, hv + 4, hv - 45_000)).passed);
        assert!(!memory(Some(512), &view(hv, hv - 4, hv)).passed);
        assert!(!memory(Some(512), &view(hv, hv - 4, hv - 80 * 1024)).passed);
        // Without hvtest.mem the size is not compared, the rest is.
        assert!(memory(None, &view(hv / 2, hv / 2 - 4, hv / 2 - 40_000)).passed);
        assert!(!memory(None, &view(hv, hv - 4, hv + 4)).passed);
        // Without /sys/firmware/memmap, iomem stands for the firmware map.
        let no_memmap = MemoryView {
            firmware_ram: None,
            ..view(0, hv - 4, hv - 45_000)
        };
        let outcome = memory(Some(512), &no_memmap);
        assert!(outcome.passed, "{}", outcome.detail);
    }

    fn reading(timer: u64, local: u64, uptime: f64) -> TimerReading {
        let line = |label: &str, count, description: &str| IrqLine {
            label: label.into(),
            count,
            description: description.into(),
        };
        TimerReading {
            interrupts: vec![
                line("0", timer, "IO-APIC 2-edge timer"),
                line("4", 100, "IO-APIC 4-edge ttyS0"),
                line("LOC", local, "Local timer interrupts"),
            ],
            uptime,
        }
    }

    #[test]
    fn timer_needs_ticks_and_uptime() {
        let before = reading(50, 1000, 3.0);
        let outcome = timer(&before, &reading(50, 1025, 3.1), 0.1);
        assert!(outcome.passed);
        assert_eq!(
            outcome.detail,
            "over 100 ms: timer interrupts LOC +25, uptime +0.10 s"
        );
        assert!(timer(&before, &reading(60, 1000, 3.1), 0.1).passed);
        assert!(!timer(&before, &reading(50, 1000, 3.1), 0.1).passed);
        assert!(!timer(&before, &reading(50, 1025, 3.0), 0.1).passed);
        // A line that only other interrupts advance does not count.
        let mut serial_only = reading(50, 1000, 3.1);
        serial_only.interrupts[1].count += 10;
        assert!(!timer(&before, &serial_only, 0.1).passed);
    }
}
