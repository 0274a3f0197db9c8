//! The hypervisor's command line: `key=value` words separated by spaces.
//!
//! Unknown keys and bad values are reported to the caller, never ignored silently.

use core::fmt;

use hv_abi::{Altp2mMode, BootViews, LinuxEntry};
use log::LevelFilter;

/// A way to end the run on purpose, so tests can check the failure paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelfTest {
    /// `panic!` after boot.
    Panic,
    /// A page fault (read of an unmapped address) after boot.
    PageFault,
    /// An invalid opcode (`ud2`) after boot.
    InvalidOpcode,
    /// Allocate every free frame, check none belongs to the kernel, modules or
    /// allocator, free them all and check the count comes back.
    Frames,
}

/// Everything the command line can set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    pub log_level: LevelFilter,
    pub selftest: Option<SelfTest>,
    /// RAM of the guest in MiB (`guest.mem=`).
    pub guest_memory_mib: u64,
    /// Start a guest that has both Multiboot headers as Multiboot 1 (`guest.multiboot=1`).
    pub guest_multiboot1: bool,
    /// What the guest may call of the altp2m interface (`altp2m=`).
    pub altp2m_mode: Altp2mMode,
    /// The views the guest boots on (`guest.views=`).
    pub boot_views: BootViews,
    /// The Linux entry point (`guest.linux-entry=`).
    pub linux_entry: LinuxEntry,
    /// All guest RAM under log-dirty tracking, fetched on every tick
    /// (`guest.logdirty=all`).
    pub logdirty_all: bool,
    /// VMX features the hypervisor behaves as if the CPU lacked
    /// (`vmx.mask=`, a comma-separated list of `vmfunc ve pml ept1g eptad`),
    /// to test the fallbacks: bit `i` for [`VMX_MASK_NAMES`]`[i]`, the
    /// bits of `hv_core::vmx::caps::Masked` (this library is the test
    /// guest's too, which has no heap for hv-core; a test holds them equal).
    pub vmx_mask: u8,
    /// The guest's vCPUs at most, one per CPU (`guest.cpus=`; default: all).
    pub guest_cpus: usize,
    /// Serve the control channel on COM3 if the machine has one
    /// (`control=com3`, the default; `control=off`).
    pub control: bool,
    /// Frames the guest may hold beyond its RAM (`guest.frames=`).
    pub guest_frames: u64,
    /// KiB of the hypervisor's heap the guest may hold (`guest.heap=`).
    pub guest_heap_kib: u64,
}

/// The guest's frames beyond its RAM, by default: 64 MiB (views' tables,
/// shadow pages, the display copy).
pub const DEFAULT_GUEST_FRAMES: u64 = 16384;
/// The guest's share of the heap, by default: half of it.
pub const DEFAULT_GUEST_HEAP_KIB: u64 = 4096;

/// Guest RAM when the command line does not say.
pub const DEFAULT_GUEST_MIB: u64 = 32;

impl Default for Options {
    fn default() -> Self {
        Self {
            log_level: LevelFilter::Info,
            selftest: None,
            guest_memory_mib: DEFAULT_GUEST_MIB,
            guest_multiboot1: false,
            altp2m_mode: Altp2mMode::Mixed,
            boot_views: BootViews::Host,
            linux_entry: LinuxEntry::Auto,
            logdirty_all: false,
            vmx_mask: 0,
            guest_cpus: usize::MAX,
            control: true,
            guest_frames: DEFAULT_GUEST_FRAMES,
            guest_heap_kib: DEFAULT_GUEST_HEAP_KIB,
        }
    }
}

/// Something wrong with one word of the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem<'a> {
    UnknownOption(&'a str),
    BadValue {
        key: &'a str,
        value: &'a str,
        expected: &'static str,
    },
}

impl fmt::Display for Problem<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::UnknownOption(word) => write!(f, "unknown option '{word}' (ignored)"),
            Problem::BadValue {
                key,
                value,
                expected,
            } => {
                write!(
                    f,
                    "bad value '{value}' for {key} (expected {expected}; ignored)"
                )
            }
        }
    }
}

const LOG_LEVELS: &str = "off|error|warn|info|debug|trace";
const SELFTESTS: &str = "panic|pagefault|ud|frames";
const GUEST_MEM: &str = "a size in MiB, 2 to 1048576";
const MULTIBOOT: &str = "1|2";
const ALTP2M_MODES: &str = "external|mixed|limited";
const BOOT_VIEWS: &str = "host|fresh|switch";
const LINUX_ENTRIES: &str = "auto|32|64";
const CONTROL: &str = "com3|off";
const GUEST_FRAMES: &str = "frames beyond guest RAM, 0 to 268435456";
const GUEST_HEAP: &str = "KiB of heap, 0 to 1048576";
const LOGDIRTY: &str = "all|off";
const VMX_MASK: &str = "a comma-separated list of: vmfunc ve pml ept1g eptad";
/// The features `vmx.mask=` names, in the order of their bits.
pub const VMX_MASK_NAMES: [&str; 5] = ["vmfunc", "ve", "pml", "ept1g", "eptad"];
const GUEST_CPUS: &str = "a number of vCPUs, 1 to 64";

impl Options {
    /// Parses `cmdline`, reporting each problem to `report`. A first word that
    /// looks like a path (boot loaders often pass the image name) is skipped.
    pub fn parse<'a>(cmdline: &'a str, mut report: impl FnMut(Problem<'a>)) -> Self {
        let mut options = Self::default();
        let mut words = cmdline.split_ascii_whitespace().peekable();
        if words
            .peek()
            .is_some_and(|w| w.contains('/') && !w.contains('='))
        {
            words.next();
        }
        for word in words {
            let (key, value) = word.split_once('=').unwrap_or((word, ""));
            match key {
                "loglevel" => match parse_level(value) {
                    Some(level) => options.log_level = level,
                    None => report(Problem::BadValue {
                        key,
                        value,
                        expected: LOG_LEVELS,
                    }),
                },
                "selftest" => match value {
                    "panic" => options.selftest = Some(SelfTest::Panic),
                    "pagefault" => options.selftest = Some(SelfTest::PageFault),
                    "ud" => options.selftest = Some(SelfTest::InvalidOpcode),
                    "frames" => options.selftest = Some(SelfTest::Frames),
                    _ => report(Problem::BadValue {
                        key,
                        value,
                        expected: SELFTESTS,
                    }),
                },
                "guest.mem" => match value.parse::<u64>() {
                    Ok(mib @ 2..=1_048_576) => options.guest_memory_mib = mib,
                    _ => report(Problem::BadValue {
                        key,
                        value,
                        expected: GUEST_MEM,
                    }),
                },
                "guest.multiboot" => match value {
                    "1" => options.guest_multiboot1 = true,
                    "2" => options.guest_multiboot1 = false,
                    _ => report(Problem::BadValue {
                        key,
                        value,
                        expected: MULTIBOOT,
                    }),
                },
                "altp2m" => match Altp2mMode::parse(value) {
                    Some(mode) => options.altp2m_mode = mode,
                    None => report(Problem::BadValue {
                        key,
                        value,
                        expected: ALTP2M_MODES,
                    }),
                },
                "guest.views" => match BootViews::parse(value) {
                    Some(views) => options.boot_views = views,
                    None => report(Problem::BadValue {
                        key,
                        value,
                        expected: BOOT_VIEWS,
                    }),
                },
                "guest.cpus" => match value.parse::<usize>() {
                    Ok(n @ 1..=64) => options.guest_cpus = n,
                    _ => report(Problem::BadValue {
                        key,
                        value,
                        expected: GUEST_CPUS,
                    }),
                },
                "control" => match value {
                    "com3" => options.control = true,
                    "off" => options.control = false,
                    _ => report(Problem::BadValue {
                        key,
                        value,
                        expected: CONTROL,
                    }),
                },
                "guest.frames" => match value.parse::<u64>() {
                    Ok(n @ 0..=268_435_456) => options.guest_frames = n,
                    _ => report(Problem::BadValue {
                        key,
                        value,
                        expected: GUEST_FRAMES,
                    }),
                },
                "guest.heap" => match value.parse::<u64>() {
                    Ok(kib @ 0..=1_048_576) => options.guest_heap_kib = kib,
                    _ => report(Problem::BadValue {
                        key,
                        value,
                        expected: GUEST_HEAP,
                    }),
                },
                "guest.logdirty" => match value {
                    "all" => options.logdirty_all = true,
                    "off" => options.logdirty_all = false,
                    _ => report(Problem::BadValue {
                        key,
                        value,
                        expected: LOGDIRTY,
                    }),
                },
                "vmx.mask" => {
                    for feature in value.split(',') {
                        match VMX_MASK_NAMES.iter().position(|&n| n == feature) {
                            Some(i) => options.vmx_mask |= 1 << i,
                            None => report(Problem::BadValue {
                                key,
                                value: feature,
                                expected: VMX_MASK,
                            }),
                        }
                    }
                }
                "guest.linux-entry" => match LinuxEntry::parse(value) {
                    Some(entry) => options.linux_entry = entry,
                    None => report(Problem::BadValue {
                        key,
                        value,
                        expected: LINUX_ENTRIES,
                    }),
                },
                _ => report(Problem::UnknownOption(word)),
            }
        }
        options
    }
}

fn parse_level(value: &str) -> Option<LevelFilter> {
    Some(match value {
        "off" => LevelFilter::Off,
        "error" => LevelFilter::Error,
        "warn" => LevelFilter::Warn,
        "info" => LevelFilter::Info,
        "debug" => LevelFilter::Debug,
        "trace" => LevelFilter::Trace,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec::Vec;

    use super::*;

    fn parse(cmdline: &str) -> (Options, Vec<Problem<'_>>) {
        let mut problems = Vec::new();
        let options = Options::parse(cmdline, |p| problems.push(p));
        (options, problems)
    }

    #[test]
    fn empty_gives_defaults() {
        assert_eq!(parse(""), (Options::default(), Vec::new()));
    }

    #[test]
    fn log_level_and_selftest() {
        let (options, problems) = parse("loglevel=debug selftest=ud");
        assert!(problems.is_empty());
        assert_eq!(options.log_level, LevelFilter::Debug);
        assert_eq!(options.selftest, Some(SelfTest::InvalidOpcode));
    }

    #[test]
    fn guest_options() {
        let (options, problems) = parse("guest.mem=64 guest.multiboot=1");
        assert!(problems.is_empty());
        assert_eq!(
            (options.guest_memory_mib, options.guest_multiboot1),
            (64, true)
        );
        let (options, problems) = parse("guest.mem=1 guest.mem=lots guest.multiboot=3 altp2m=on");
        assert_eq!(options.guest_memory_mib, DEFAULT_GUEST_MIB);
        assert_eq!(options.altp2m_mode, Altp2mMode::Mixed);
        assert_eq!(problems.len(), 4);
        let (options, problems) =
            parse("guest.views=switch guest.linux-entry=32 guest.logdirty=all");
        assert!(problems.is_empty());
        assert!(options.logdirty_all);
        assert_eq!(options.boot_views, BootViews::Switching);
        assert_eq!(options.linux_entry, LinuxEntry::Force32);
        let (options, problems) = parse("guest.views=many guest.linux-entry=16");
        assert_eq!(options.boot_views, BootViews::Host);
        assert_eq!(problems.len(), 2);
        assert!(parse("").0.control, "the control line is on by default");
        assert!(!parse("control=off").0.control);
        let (options, problems) = parse("control=com9");
        assert!(options.control && problems.len() == 1);
        let (options, problems) = parse("guest.frames=100 guest.heap=64");
        assert!(problems.is_empty());
        assert_eq!((options.guest_frames, options.guest_heap_kib), (100, 64));
        assert_eq!(parse("guest.heap=lots").1.len(), 1);
    }

    #[test]
    fn vmx_features_can_be_masked() {
        use hv_core::vmx::caps::Masked;
        let (options, problems) = parse("vmx.mask=pml");
        assert!(problems.is_empty());
        assert_eq!(Masked::from_bits(options.vmx_mask), Some(Masked::PML));
        let (options, problems) = parse("vmx.mask=vmfunc,ve,pml,ept1g,eptad");
        assert!(problems.is_empty());
        assert_eq!(Masked::from_bits(options.vmx_mask), Some(Masked::all()));
        // The kernel hands the bits to hv-core as they are.
        for (i, name) in VMX_MASK_NAMES.iter().enumerate() {
            assert_eq!(Masked::parse(name), Masked::from_bits(1 << i), "{name}");
        }
        let (options, problems) = parse("vmx.mask=pml,vpid");
        assert_eq!(Masked::from_bits(options.vmx_mask), Some(Masked::PML));
        assert_eq!(
            problems,
            [Problem::BadValue {
                key: "vmx.mask",
                value: "vpid",
                expected: VMX_MASK
            }]
        );
        assert_eq!(parse("vmx.mask=").0.vmx_mask, 0);
    }

    #[test]
    fn leading_image_path_is_skipped() {
        let (options, problems) = parse("/boot/hv loglevel=warn");
        assert!(problems.is_empty());
        assert_eq!(options.log_level, LevelFilter::Warn);
    }

    #[test]
    fn unknown_words_and_bad_values_are_reported() {
        let (options, problems) = parse("loglevel=loud frobnicate quiet=1");
        assert_eq!(options, Options::default());
        assert_eq!(
            problems,
            [
                Problem::BadValue {
                    key: "loglevel",
                    value: "loud",
                    expected: LOG_LEVELS
                },
                Problem::UnknownOption("frobnicate"),
                Problem::UnknownOption("quiet=1"),
            ]
        );
    }
}
