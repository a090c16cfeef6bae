//! systemd's notification protocol for `Type=notify` units: `READY=1` once
//! the state is settled, `STATUS=` on each transition, `WATCHDOG=1` from the
//! probe loop, `STOPPING=1` on shutdown. Used only when `NOTIFY_SOCKET` is
//! set (the `sd-notify` crate does the socket work).

use std::time::Duration;

/// One notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice<'a> {
    /// Start-up is complete.
    Ready,
    /// A one-line description of what the sidekick is doing.
    Status(&'a str),
    /// The probe loop is alive.
    Watchdog,
    /// Shutting down.
    Stopping,
}

/// Where notifications go: systemd, or a recorder in tests.
pub trait Notifier: Send + Sync {
    /// Sends one notification; failures are not the loop's concern.
    fn send(&self, notice: Notice<'_>);
}

/// systemd, through `NOTIFY_SOCKET`.
#[derive(Debug)]
pub struct Systemd;

impl Systemd {
    /// The notifier when systemd asked for one (`NOTIFY_SOCKET` is set).
    pub fn from_env() -> Option<Systemd> {
        std::env::var_os("NOTIFY_SOCKET").map(|_| Systemd)
    }

    /// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, when systemd
    /// set it for this process.
    pub fn watchdog_period() -> Option<Duration> {
        sd_notify::watchdog_enabled().map(|d| d / 2)
    }
}

impl Notifier for Systemd {
    fn send(&self, notice: Notice<'_>) {
        use sd_notify::NotifyState;
        let state = match notice {
            Notice::Ready => NotifyState::Ready,
            Notice::Status(line) => NotifyState::Status(line),
            Notice::Watchdog => NotifyState::Watchdog,
            Notice::Stopping => NotifyState::Stopping,
        };
        if let Err(e) = sd_notify::notify(&[state]) {
            tracing::debug!(error = %e, "could not notify systemd");
        }
    }
}
