//! The verdicts: what each check makes of what it read. `main.rs` gathers
//! the readings (CPUID on each CPU, `/proc` files before and after a wait).

use crate::Outcome;
use crate::params::Expect;
use crate::procfs::{IrqLine, KernelMemory, is_timer};

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
/// The kernel counts RAM in whole pages: a range that does not start or
/// end on a page boundary loses the partial pages (two ranges, two ends).
pub const PARTIAL_PAGES: u64 = 16 * KIB;
/// Only when the kernel's own accounting line is not in its log: what it
/// may keep out of MemTotal besides the page array (its image, about 33 MiB
/// for Debian's 6.1, and early allocations such as the log buffer).
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
    /// The kernel's accounting at boot (its `Memory:` log line), in KiB.
    pub kernel: Option<KernelMemory>,
}

/// Struct page array: 64 bytes per 4 KiB page.
fn page_array(ram: u64) -> u64 {
    ram / 64
}

/// The memory check. With `expected_mib` (`hvtest.mem`) = M MiB of guest RAM:
/// - firmware RAM F: `M - 384 KiB - 640 KiB <= F <= M - 384 KiB` (the legacy
///   hole is never RAM; [`FIRMWARE_SLACK`] for what firmware keeps);
/// - /proc/iomem RAM I: `F - 64 KiB <= I <= F` ([`KERNEL_TRIM`]);
/// - the pages the kernel manages P (its `Memory: A/P available` line):
///   `I - 16 KiB <= P <= I` ([`PARTIAL_PAGES`]), and MemTotal T:
///   `P - R <= T <= P` with R its reserved memory at boot (T is larger
///   than P - R by what it freed since, such as its init code);
/// - without that line: `I - I/64 - 64 MiB <= T <= I` (the page array and
///   [`KERNEL_RESERVE`]).
///
/// Without `expected_mib` all but the first, which still catch a kernel
/// that ignores or invents RAM.
pub fn memory(expected_mib: Option<u64>, view: &MemoryView) -> Outcome {
    const NAME: &str = "memory";
    let kib = |bytes: u64| bytes / KIB;
    let firmware = view.firmware_ram.unwrap_or(view.iomem_ram);
    let mut figures = format!(
        "firmware RAM {} KiB{}, iomem RAM {} KiB",
        kib(firmware),
        if view.firmware_ram.is_some() {
            ""
        } else {
            " (no /sys/firmware/memmap: iomem's)"
        },
        kib(view.iomem_ram),
    );
    if let Some(kernel) = view.kernel {
        figures += &format!(
            ", kernel manages {} KiB (reserved {} KiB at boot)",
            kernel.managed, kernel.reserved
        );
    }
    figures += &format!(", MemTotal {} KiB", kib(view.mem_total));
    let mut problems = Vec::new();
    let mut within = |what: &str, value: u64, low: u64, high: u64| {
        if !(low..=high).contains(&value) {
            problems.push(format!(
                "{what} {} KiB outside {}..={} KiB",
                kib(value),
                kib(low),
                kib(high)
            ));
        }
    };
    if let Some(mib) = expected_mib {
        let high = (mib * MIB).saturating_sub(LEGACY_HOLE);
        within(
            "firmware RAM",
            firmware,
            high.saturating_sub(FIRMWARE_SLACK),
            high,
        );
    }
    within(
        "iomem RAM",
        view.iomem_ram,
        firmware.saturating_sub(KERNEL_TRIM),
        firmware,
    );
    match view.kernel {
        Some(kernel) => {
            let managed = kernel.managed * KIB;
            within(
                "kernel-managed RAM",
                managed,
                view.iomem_ram.saturating_sub(PARTIAL_PAGES),
                view.iomem_ram,
            );
            within(
                "MemTotal",
                view.mem_total,
                managed.saturating_sub(kernel.reserved * KIB),
                managed,
            );
        }
        None => {
            let reserved = page_array(view.iomem_ram) + KERNEL_RESERVE;
            within(
                "MemTotal",
                view.mem_total,
                view.iomem_ram.saturating_sub(reserved),
                view.iomem_ram,
            );
        }
    }
    match (problems.is_empty(), expected_mib) {
        (true, Some(mib)) => Outcome::pass(NAME, format!("hvtest.mem={mib} MiB: {figures}")),
        (true, None) => Outcome::pass(
            NAME,
            format!("{figures} (no hvtest.mem: size not compared)"),
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
/// seconds (measured with CLOCK_MONOTONIC). The rate is reported, not
/// judged: far above CONFIG_HZ (250) per CPU it shows a timer whose
/// frequency the kernel got wrong.
pub fn timer(before: &TimerReading, after: &TimerReading, waited: f64) -> Outcome {
    const NAME: &str = "timer";
    let advanced: Vec<String> = after
        .interrupts
        .iter()
        .filter(|line| is_timer(line))
        .filter_map(|line| {
            let old = before.interrupts.iter().find(|b| b.label == line.label)?;
            let delta = line.count.checked_sub(old.count).filter(|&d| d > 0)?;
            let rate = delta as f64 / waited.max(1e-9);
            Some(format!("{} +{delta} ({rate:.0}/s)", line.label))
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
            kernel: None,
        }
    }

    #[test]
    fn memory_with_the_kernels_accounting() {
        // Figures from Debian's 6.1 kernel on bare Bochs with 512 MiB.
        let kernel = |managed, reserved| {
            Some(KernelMemory {
                available: 207_548,
                managed,
                reserved,
            })
        };
        let bochs = MemoryView {
            kernel: kernel(523_832, 64_968),
            ..view(523_836, 523_832, 468_480)
        };
        let outcome = memory(Some(512), &bochs);
        assert!(outcome.passed, "{}", outcome.detail);
        assert!(
            outcome.detail.contains("kernel manages 523832 KiB"),
            "{}",
            outcome.detail
        );
        // A larger log buffer reserves more; the kernel's own figure follows.
        let big_log = MemoryView {
            kernel: kernel(523_832, 83_400),
            ..view(523_836, 523_832, 450_048)
        };
        assert!(memory(Some(512), &big_log).passed);
        // Fewer pages managed than iomem lists, MemTotal below what was reserved.
        let lost = MemoryView {
            kernel: kernel(523_832 - 20, 64_968),
            ..bochs.clone()
        };
        assert!(!memory(Some(512), &lost).passed);
        let low = MemoryView {
            kernel: kernel(523_832, 64_968),
            ..view(523_836, 523_832, 523_832 - 64_968 - 4)
        };
        let outcome = memory(Some(512), &low);
        assert!(!outcome.passed);
        assert!(
            outcome
                .detail
                .starts_with("MemTotal 458860 KiB outside 458864..=523832 KiB"),
            "{}",
            outcome.detail
        );
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
            "over 100 ms: timer interrupts LOC +25 (250/s), uptime +0.10 s"
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
