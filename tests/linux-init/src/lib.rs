//! hv-linux-init: the program that runs as PID 1 (`/init`) in the Linux
//! guest's initramfs. It checks what Debian's stock kernel sees of the
//! platform it boots on (our hypervisor's CPUID leaves, the memory size,
//! timer interrupts, a write/read pass over a few hundred MiB) and then ends
//! the run through a chosen path (I/O port 0xF4, ACPI power-off, reset).
//! The same initramfs serves bare Bochs and the hypervisor: `hvtest.*`
//! kernel parameters tell each check what to expect.
//!
//! This library holds what does not touch the machine (parameters, `/proc`
//! parsers, the verdicts, the memory pattern), so it is tested on the host;
//! `main.rs` makes the system calls and runs the instructions.

pub mod checks;
pub mod kallsyms;
pub mod params;
pub mod pattern;
pub mod probe;
pub mod procfs;

/// One check's result: printed as `PASS name: detail` or `FAIL name: detail`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub name: &'static str,
    pub passed: bool,
    pub detail: String,
}

impl Outcome {
    pub fn pass(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            passed: true,
            detail: detail.into(),
        }
    }

    pub fn fail(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            passed: false,
            detail: detail.into(),
        }
    }

    /// The console line.
    pub fn line(&self) -> String {
        let verdict = if self.passed { "PASS" } else { "FAIL" };
        format!("{verdict} {}: {}", self.name, self.detail)
    }
}

/// The run's status: 0 when every check passed, 1 otherwise (also when no
/// check ran at all).
pub fn status(outcomes: &[Outcome]) -> u8 {
    u8::from(outcomes.is_empty() || outcomes.iter().any(|o| !o.passed))
}

/// `result: N passed, M failed`.
pub fn summary(outcomes: &[Outcome]) -> String {
    let passed = outcomes.iter().filter(|o| o.passed).count();
    format!(
        "result: {passed} passed, {} failed",
        outcomes.len() - passed
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_summary_count_failures() {
        let ok = Outcome::pass("a", "fine");
        let bad = Outcome::fail("b", "broken");
        assert_eq!(ok.line(), "PASS a: fine");
        assert_eq!(bad.line(), "FAIL b: broken");
        assert_eq!(status(&[ok.clone(), ok.clone()]), 0);
        assert_eq!(status(&[ok.clone(), bad.clone()]), 1);
        assert_eq!(status(&[]), 1);
        assert_eq!(
            summary(&[ok, bad.clone(), bad]),
            "result: 1 passed, 2 failed"
        );
    }
}
