//! Parsers for the kernel's text interfaces the checks read: `/proc/meminfo`,
//! `/proc/iomem`, `/sys/firmware/memmap`, `/proc/interrupts`,
//! `/proc/uptime`, `/proc/cpuinfo`, CPU lists and the kernel log.

/// A physical address range of a memory map; `end` is inclusive, as the
/// kernel prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub start: u64,
    pub end: u64,
    pub kind: String,
}

impl Range {
    pub fn bytes(&self) -> u64 {
        (self.end - self.start).saturating_add(1)
    }
}

/// Bytes in the ranges of `kind`.
pub fn total(ranges: &[Range], kind: &str) -> u64 {
    ranges
        .iter()
        .filter(|r| r.kind == kind)
        .map(Range::bytes)
        .sum()
}

/// One past the last byte of the highest range of `kind`.
pub fn top(ranges: &[Range], kind: &str) -> Option<u64> {
    ranges
        .iter()
        .filter(|r| r.kind == kind)
        .map(|r| r.end.saturating_add(1))
        .max()
}

/// The top-level ranges of `/proc/iomem` (the firmware's memory map as the
/// kernel keeps it; nested lines are the kernel's own claims inside them).
pub fn iomem(text: &str) -> Vec<Range> {
    text.lines()
        .filter(|line| !line.starts_with(' '))
        .filter_map(|line| {
            let (span, kind) = line.split_once(" : ")?;
            let (start, end) = span.split_once('-')?;
            let start = u64::from_str_radix(start.trim(), 16).ok()?;
            let end = u64::from_str_radix(end.trim(), 16).ok()?;
            (start <= end).then(|| Range {
                start,
                end,
                kind: kind.trim().to_string(),
            })
        })
        .collect()
}

/// One entry of `/sys/firmware/memmap/N/`: the `start`, `end` (inclusive,
/// `0x` hex) and `type` files' contents.
pub fn memmap_entry(start: &str, end: &str, kind: &str) -> Option<Range> {
    let hex = |s: &str| u64::from_str_radix(s.trim().strip_prefix("0x")?, 16).ok();
    let (start, end) = (hex(start)?, hex(end)?);
    (start <= end).then(|| Range {
        start,
        end,
        kind: kind.trim().to_string(),
    })
}

/// A `/proc/meminfo` value in KiB.
pub fn meminfo_kib(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        rest.trim().strip_suffix("kB")?.trim().parse().ok()
    })
}

/// One line of `/proc/interrupts`: its label (`0`, `LOC`, ...), the count
/// summed over CPUs, and the rest of the line (controller and name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IrqLine {
    pub label: String,
    pub count: u64,
    pub description: String,
}

pub fn interrupts(text: &str) -> Vec<IrqLine> {
    let mut lines = text.lines();
    let cpus = lines
        .next()
        .map_or(0, |header| header.split_whitespace().count());
    lines
        .filter_map(|line| {
            let (label, rest) = line.split_once(':')?;
            let mut words = rest.split_whitespace().peekable();
            let mut count = 0u64;
            for _ in 0..cpus {
                match words.peek().and_then(|w| w.parse::<u64>().ok()) {
                    Some(n) => {
                        count = count.saturating_add(n);
                        words.next();
                    }
                    None => break,
                }
            }
            Some(IrqLine {
                label: label.trim().to_string(),
                count,
                description: words.collect::<Vec<_>>().join(" "),
            })
        })
        .collect()
}

/// The interrupt lines that count timer ticks: the local APIC timers
/// (`LOC`), the legacy timer on line 0 (PIT or HPET), and any other line
/// named a timer.
pub fn is_timer(line: &IrqLine) -> bool {
    line.label == "LOC" || line.label == "0" || line.description.contains("timer")
}

/// Seconds since boot, the first field of `/proc/uptime`.
pub fn uptime(text: &str) -> Option<f64> {
    text.split_whitespace().next()?.parse().ok()
}

/// A kernel CPU list such as `0-3,6` (`/sys/devices/system/cpu/online`).
pub fn cpu_list(text: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',') {
        match part.split_once('-') {
            Some((first, last)) => {
                let (first, last): (usize, usize) = (first.parse().ok()?, last.parse().ok()?);
                if first > last {
                    return None;
                }
                cpus.extend(first..=last);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    Some(cpus)
}

/// For each processor in `/proc/cpuinfo`, whether its `flags` has `flag`.
pub fn cpuinfo_flag(text: &str, flag: &str) -> Vec<bool> {
    text.lines()
        .filter_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key.trim() == "flags").then(|| value.split_whitespace().any(|f| f == flag))
        })
        .collect()
}

/// The kernel's memory accounting at boot, from its log line
/// `Memory: 474540K/523896K available (... 49096K reserved, ...)`, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelMemory {
    /// Free after the kernel set itself up.
    pub available: u64,
    /// Every page of RAM the kernel manages.
    pub managed: u64,
    /// Taken by the kernel at boot (image, page array, early allocations).
    pub reserved: u64,
}

pub fn kernel_memory_line(log: &str) -> Option<KernelMemory> {
    log.lines().find_map(|line| {
        let rest = &line[line.find("Memory: ")? + "Memory: ".len()..];
        let (available, rest) = rest.split_once("K/")?;
        let (managed, rest) = rest.split_once("K available")?;
        let reserved = rest
            .split([',', '('])
            .find_map(|part| part.trim().strip_suffix("K reserved"))?;
        Some(KernelMemory {
            available: available.parse().ok()?,
            managed: managed.parse().ok()?,
            reserved: reserved.parse().ok()?,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const IOMEM: &str = "\
00000000-00000fff : Reserved
00001000-0009efff : System RAM
0009f000-0009ffff : Reserved
000a0000-000bffff : PCI Bus 0000:00
000e8000-000fffff : Reserved
  000f0000-000fffff : System ROM
00100000-1ffeffff : System RAM
  01000000-01e00fff : Kernel code
1fff0000-1fffffff : ACPI Tables
fec00000-fec003ff : IOAPIC 0
";

    #[test]
    fn iomem_keeps_top_level_ranges() {
        let ranges = iomem(IOMEM);
        assert_eq!(ranges.len(), 8);
        assert_eq!(total(&ranges, "System RAM"), 0x9e000 + 0x1fef_0000);
        assert_eq!(top(&ranges, "System RAM"), Some(0x1fff_0000));
        assert_eq!(total(&ranges, "Kernel code"), 0);
        assert_eq!(top(&ranges, "Unusable"), None);
    }

    #[test]
    fn memmap_entries_are_inclusive_hex() {
        let range = memmap_entry("0x100000\n", "0x1ffeffff\n", "System RAM\n").unwrap();
        assert_eq!(range.bytes(), 0x1fef_0000);
        assert_eq!(range.kind, "System RAM");
        assert_eq!(memmap_entry("100000", "0x1", "System RAM"), None);
        assert_eq!(memmap_entry("0x2", "0x1", "System RAM"), None);
    }

    #[test]
    fn meminfo_values() {
        let text = "MemTotal:         474540 kB\nMemFree:          440000 kB\nMemAvailable:     430000 kB\n";
        assert_eq!(meminfo_kib(text, "MemTotal"), Some(474_540));
        assert_eq!(meminfo_kib(text, "MemAvailable"), Some(430_000));
        assert_eq!(meminfo_kib(text, "Mem"), None);
        assert_eq!(meminfo_kib(text, "SwapTotal"), None);
    }

    #[test]
    fn interrupts_sum_over_cpus() {
        let text = "           CPU0       CPU1       \n\
                    \x20 0:         51          0   IO-APIC   2-edge      timer\n\
                    \x20 4:        120          3   IO-APIC   4-edge      ttyS0\n\
                    NMI:          0          0   Non-maskable interrupts\n\
                    LOC:       1234        987   Local timer interrupts\n\
                    ERR:          0\n";
        let lines = interrupts(text);
        let find = |label: &str| lines.iter().find(|l| l.label == label).unwrap();
        assert_eq!(find("0").count, 51);
        assert_eq!(find("0").description, "IO-APIC 2-edge timer");
        assert_eq!(find("4").count, 123);
        assert_eq!(find("LOC").count, 2221);
        assert_eq!(find("ERR").count, 0);
        let timers: Vec<_> = lines
            .iter()
            .filter(|l| is_timer(l))
            .map(|l| &l.label)
            .collect();
        assert_eq!(timers, ["0", "LOC"]);
    }

    #[test]
    fn uptime_and_cpu_lists() {
        assert_eq!(uptime("12.34 20.00\n"), Some(12.34));
        assert_eq!(uptime(""), None);
        assert_eq!(cpu_list("0\n"), Some(vec![0]));
        assert_eq!(cpu_list("0-2,5"), Some(vec![0, 1, 2, 5]));
        assert_eq!(cpu_list("2-1"), None);
        assert_eq!(cpu_list("x"), None);
    }

    #[test]
    fn cpuinfo_flags_per_processor() {
        let text = "processor\t: 0\nflags\t\t: fpu vme hypervisor lahf_lm\n\n\
                    processor\t: 1\nflags\t\t: fpu vme lahf_lm\nvmx flags\t: ept\n";
        assert_eq!(cpuinfo_flag(text, "hypervisor"), [true, false]);
    }

    #[test]
    fn kernel_memory_accounting_line() {
        let log = "<6>[    0.000000] Zone ranges:\n\
                   <6>[    0.512000] Memory: 207548K/523832K available (14343K kernel code, \
                   2338K rwdata, 9132K rodata, 2824K init, 17344K bss, 64968K reserved, 0K cma-reserved)\n";
        assert_eq!(
            kernel_memory_line(log),
            Some(KernelMemory {
                available: 207_548,
                managed: 523_832,
                reserved: 64_968
            })
        );
        assert_eq!(kernel_memory_line("Memory: lots"), None);
        assert_eq!(
            kernel_memory_line("Memory: 1K/2K available (3K kernel code)"),
            None
        );
    }
}
