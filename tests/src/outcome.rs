//! How a run ended: how the emulator process ended, and what that says about
//! the run (a status from the kernel, a harness failure, a run that stopped
//! without a status).

use std::fmt;
use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::Signal;

/// How the emulator process ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EmulatorEnd {
    /// It was never started: why (program missing, boot medium not made, ...).
    NotStarted(String),
    /// It exited by itself with this code.
    Exited(i32),
    /// This signal ended it.
    Killed(i32),
    /// It was still running at the timeout, and the harness stopped it.
    StoppedAtTimeout(Duration),
}

impl EmulatorEnd {
    pub fn from_status(status: ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(code), _) => Self::Exited(code),
            (None, Some(signal)) => Self::Killed(signal),
            // Neither exited nor signalled: only stopped processes are, and
            // `wait` does not report those.
            (None, None) => Self::Exited(status.into_raw()),
        }
    }

    /// Says how `emulator` ended: "Bochs was killed by SIGABRT".
    pub fn describe(&self, emulator: &str) -> String {
        match self {
            Self::NotStarted(why) => format!("{emulator} was not started: {why}"),
            Self::Exited(code) => format!("{emulator} exited with code {code}"),
            Self::Killed(signal) => format!("{emulator} was killed by {}", signal_name(*signal)),
            Self::StoppedAtTimeout(after) => format!(
                "{emulator} was still running after {} s; the harness killed it",
                after.as_secs_f64()
            ),
        }
    }
}

/// "SIGABRT" for 6, "signal 99" for what is no signal of this system.
pub fn signal_name(signal: i32) -> String {
    Signal::try_from(signal).map_or_else(|_| format!("signal {signal}"), |s| s.as_str().into())
}

/// What a run came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The kernel's last line was `hv: exit N`: the run ended with status N.
    Exit(u8),
    /// The hypervisor did not get to run, or not to print anything: the
    /// emulator could not be started, or it failed (an exit code other than
    /// 0, or a signal) before the first serial byte. Says what happened. This
    /// is a harness or host problem (missing program, configuration refused,
    /// an emulator crash), not a result about the hypervisor.
    HarnessFailure(String),
    /// The emulator ended without an exit line: it crashed after the kernel
    /// started printing, or the machine stopped (reset, emulator panic)
    /// without the kernel saying so. A hypervisor, guest or emulator failure.
    NoExitLine,
    /// The timeout passed before the run ended.
    TimedOut,
}

impl Outcome {
    /// The outcome of a run whose emulator ended as `end` after writing
    /// `serial_bytes` bytes of serial output, the last exit line saying
    /// `exit_status` (if any).
    pub fn classify(
        end: &EmulatorEnd,
        serial_bytes: usize,
        exit_status: Option<u8>,
        emulator: &str,
    ) -> Self {
        match (end, exit_status) {
            (EmulatorEnd::NotStarted(_), _) => Self::HarnessFailure(end.describe(emulator)),
            (EmulatorEnd::StoppedAtTimeout(_), _) => Self::TimedOut,
            (_, Some(status)) => Self::Exit(status),
            (_, None) if serial_bytes == 0 && *end != EmulatorEnd::Exited(0) => {
                Self::HarnessFailure(format!(
                    "{} before the first serial byte",
                    end.describe(emulator)
                ))
            }
            _ => Self::NoExitLine,
        }
    }

    pub fn is_harness_failure(&self) -> bool {
        matches!(self, Self::HarnessFailure(_))
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exit(status) => write!(f, "the run ended with status {status}"),
            Self::HarnessFailure(why) => {
                write!(f, "HARNESS FAILURE, the hypervisor never ran: {why}")
            }
            Self::NoExitLine => f.write_str("the run ended without an exit line"),
            Self::TimedOut => f.write_str("the run timed out"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOCHS: &str = "Bochs";

    #[test]
    fn signals_are_named() {
        assert_eq!(signal_name(6), "SIGABRT");
        assert_eq!(signal_name(11), "SIGSEGV");
        assert_eq!(signal_name(9), "SIGKILL");
        assert_eq!(signal_name(99), "signal 99");
        assert_eq!(
            EmulatorEnd::Killed(6).describe(BOCHS),
            "Bochs was killed by SIGABRT"
        );
        assert_eq!(
            EmulatorEnd::Exited(1).describe("QEMU"),
            "QEMU exited with code 1"
        );
    }

    #[test]
    fn an_exit_line_decides_whatever_the_emulator_did() {
        // Bochs leaves through its shutdown port with code 1.
        for end in [EmulatorEnd::Exited(1), EmulatorEnd::Killed(6)] {
            assert_eq!(
                Outcome::classify(&end, 100, Some(3), BOCHS),
                Outcome::Exit(3)
            );
        }
        // ... except a timeout: an exit line must also end the emulator.
        let late = EmulatorEnd::StoppedAtTimeout(Duration::from_secs(1));
        assert_eq!(
            Outcome::classify(&late, 100, Some(0), BOCHS),
            Outcome::TimedOut
        );
    }

    #[test]
    fn a_failure_before_the_first_serial_byte_is_the_harness_s() {
        let aborted = Outcome::classify(&EmulatorEnd::Killed(6), 0, None, BOCHS);
        assert_eq!(
            aborted,
            Outcome::HarnessFailure(
                "Bochs was killed by SIGABRT before the first serial byte".into()
            )
        );
        assert!(Outcome::classify(&EmulatorEnd::Exited(1), 0, None, BOCHS).is_harness_failure());
        let missing = EmulatorEnd::NotStarted("no such program".into());
        assert!(Outcome::classify(&missing, 0, None, BOCHS).is_harness_failure());
    }

    #[test]
    fn a_machine_that_printed_or_stopped_cleanly_is_not_the_harness_s() {
        // Killed mid-run: the hypervisor ran, so this is about the run.
        assert_eq!(
            Outcome::classify(&EmulatorEnd::Killed(11), 10, None, BOCHS),
            Outcome::NoExitLine
        );
        // QEMU with -no-reboot exits 0 when the machine resets before any output.
        assert_eq!(
            Outcome::classify(&EmulatorEnd::Exited(0), 0, None, "QEMU"),
            Outcome::NoExitLine
        );
        let late = EmulatorEnd::StoppedAtTimeout(Duration::from_secs(1));
        assert_eq!(Outcome::classify(&late, 0, None, BOCHS), Outcome::TimedOut);
    }
}
