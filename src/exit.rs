//! Process exit codes, defined in one place.

/// How the process ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    /// Done, or stopped by a signal.
    Success = 0,
    /// A runtime failure: etcd unreachable for a one-shot command, an
    /// unhealthy `check`, a wait that timed out.
    Failure = 1,
    /// A usage error: bad flags or a bad flag combination.
    Usage = 2,
}

impl ExitCode {
    /// The numeric code handed to the operating system.
    pub fn code(self) -> i32 {
        self as i32
    }
}
