//! `hvtest.*` parameters from the kernel command line (`/proc/cmdline`).
//!
//! | parameter | values | default |
//! |---|---|---|
//! | `hvtest.expect=` | `hv` (our hypervisor is there) or `bare` (no hypervisor) | `hv` |
//! | `hvtest.mem=` | guest RAM in MiB, as the hypervisor's `guest.mem=` or Bochs's `megs` | not compared |
//! | `hvtest.memtest=` | MiB for the write/read pass, 0 to skip it | 256 |
//! | `hvtest.seed=` | seed of the memory pattern (decimal or 0x hex) | from the TSC |
//! | `hvtest.exit=` | `auto`, `port`, `poweroff`, `reset`, `reboot` | `auto` |
//! | `hvtest.dmesg=` | `1`: print the kernel log before the result | `0` |
//! | `hvtest.probe=` | calls of the `probe` check (a tool's breakpoint target), 0 to skip it | 0 |
//!
//! Unknown `hvtest.*` names and bad values are reported, not ignored.

/// Whether our hypervisor is expected under the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Hypervisor,
    Bare,
}

/// How the run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitPath {
    /// Port 0xF4 when our hypervisor's CPUID leaves are there, else power-off.
    Auto,
    /// Status byte to I/O port 0xF4 (the hypervisor ends the run with it).
    Port,
    /// `reboot(RB_POWER_OFF)`: the kernel's ACPI S5 path.
    PowerOff,
    /// Pulse the reset line through the i8042 (0xFE to port 0x64).
    Reset,
    /// `reboot(RB_AUTOBOOT)`: the kernel picks the reset method (`reboot=`).
    Reboot,
}

impl ExitPath {
    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Port => "port",
            Self::PowerOff => "poweroff",
            Self::Reset => "reset",
            Self::Reboot => "reboot",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    pub expect: Expect,
    /// Guest RAM in MiB.
    pub mem_mib: Option<u64>,
    pub memtest_mib: u64,
    pub seed: Option<u64>,
    pub exit: ExitPath,
    pub dmesg: bool,
    /// Calls the `probe` check makes (0: no probe check).
    pub probe_calls: u64,
    /// Problems with the parameters, one line each.
    pub warnings: Vec<String>,
}

pub const DEFAULT_MEMTEST_MIB: u64 = 256;

impl Default for Params {
    fn default() -> Self {
        Self {
            expect: Expect::Hypervisor,
            mem_mib: None,
            memtest_mib: DEFAULT_MEMTEST_MIB,
            seed: None,
            exit: ExitPath::Auto,
            dmesg: false,
            probe_calls: 0,
            warnings: Vec::new(),
        }
    }
}

impl Params {
    /// Reads the `hvtest.*` words of a kernel command line; other words
    /// belong to the kernel and are skipped.
    pub fn parse(cmdline: &str) -> Self {
        let mut params = Self::default();
        for word in cmdline.split_whitespace() {
            let Some(option) = word.strip_prefix("hvtest.") else {
                continue;
            };
            let (name, value) = option.split_once('=').unwrap_or((option, ""));
            if let Err(why) = params.set(name, value) {
                params.warnings.push(format!("{word}: {why}"));
            }
        }
        params
    }

    fn set(&mut self, name: &str, value: &str) -> Result<(), String> {
        match name {
            "expect" => {
                self.expect = match value {
                    "hv" => Expect::Hypervisor,
                    "bare" => Expect::Bare,
                    _ => return Err("expected hv or bare".into()),
                }
            }
            "mem" => {
                self.mem_mib = Some(number(value).filter(|&m| m > 0).ok_or("expected MiB > 0")?)
            }
            "memtest" => self.memtest_mib = number(value).ok_or("expected MiB")?,
            "seed" => self.seed = Some(number(value).ok_or("expected a number")?),
            "exit" => {
                self.exit = match value {
                    "auto" => ExitPath::Auto,
                    "port" => ExitPath::Port,
                    "poweroff" => ExitPath::PowerOff,
                    "reset" => ExitPath::Reset,
                    "reboot" => ExitPath::Reboot,
                    _ => return Err("expected auto, port, poweroff, reset or reboot".into()),
                }
            }
            "dmesg" => {
                self.dmesg = match value {
                    "1" => true,
                    "0" => false,
                    _ => return Err("expected 0 or 1".into()),
                }
            }
            "probe" => self.probe_calls = number(value).ok_or("expected a number of calls")?,
            _ => return Err("unknown parameter".into()),
        }
        Ok(())
    }
}

/// Decimal, or hexadecimal with `0x`.
pub fn number(text: &str) -> Option<u64> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_without_hvtest_words() {
        let params = Params::parse("BOOT_IMAGE=/boot/vmlinuz console=ttyS0,115200 quiet\n");
        assert_eq!(params, Params::default());
    }

    #[test]
    fn reads_every_parameter() {
        let params = Params::parse(
            "console=ttyS0 hvtest.expect=bare hvtest.mem=512 hvtest.memtest=0 \
             hvtest.seed=0x10 hvtest.exit=reset hvtest.dmesg=1",
        );
        assert_eq!(params.expect, Expect::Bare);
        assert_eq!(params.mem_mib, Some(512));
        assert_eq!(params.memtest_mib, 0);
        assert_eq!(params.seed, Some(16));
        assert_eq!(params.exit, ExitPath::Reset);
        assert!(params.dmesg);
        assert!(params.warnings.is_empty());
    }

    #[test]
    fn reports_bad_values_and_unknown_names_and_keeps_defaults() {
        let params =
            Params::parse("hvtest.expect=kvm hvtest.mem=0 hvtest.memtest=lots hvtest.colour=red");
        assert_eq!(params.expect, Expect::Hypervisor);
        assert_eq!(params.mem_mib, None);
        assert_eq!(params.memtest_mib, DEFAULT_MEMTEST_MIB);
        assert_eq!(
            params.warnings,
            [
                "hvtest.expect=kvm: expected hv or bare",
                "hvtest.mem=0: expected MiB > 0",
                "hvtest.memtest=lots: expected MiB",
                "hvtest.colour=red: unknown parameter",
            ]
        );
    }
}
