//! What the loop tells the world besides its logs (the status board,
//! systemd's notifications) and what it is told (the maintenance switch and
//! file). Every piece is optional and off by default; [`Hooks::default`]
//! does nothing, so `run` without `--status-addr`, `NOTIFY_SOCKET` or
//! `--maintenance-file` pays a few branches and nothing else.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::RunConfig;
use crate::health::State;
use crate::notify::{Notice, Notifier, Systemd};
use crate::probe::Outcome;
use crate::registry::LeaseId;
use crate::status::Board;

/// The optional parts of a run.
#[derive(Default)]
pub struct Hooks {
    /// The board `--status-addr` serves.
    pub board: Option<Arc<Board>>,
    /// systemd, when `NOTIFY_SOCKET` is set.
    pub notifier: Option<Box<dyn Notifier>>,
    /// How often the probe loop sends `WATCHDOG=1`.
    pub watchdog: Option<Duration>,
    /// `--maintenance-file`: while it exists, the instance is in maintenance.
    pub maintenance_file: Option<PathBuf>,
    /// SIGUSR1 (true) and SIGUSR2 (false): maintenance by signal.
    pub maintenance_switch: Option<watch::Receiver<bool>>,
    /// How long after the start the first probe comes (the agent spreads
    /// its services' probes over their intervals).
    pub phase: Duration,
    /// Probes in flight at once, across the services sharing it.
    pub probe_permits: Option<Arc<tokio::sync::Semaphore>>,
    ready: AtomicBool,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("board", &self.board.is_some())
            .field("notifier", &self.notifier.is_some())
            .field("watchdog", &self.watchdog)
            .field("maintenance_file", &self.maintenance_file)
            .finish_non_exhaustive()
    }
}

impl Hooks {
    /// The hooks `run` asked for: binds and serves `--status-addr` (until
    /// `shutdown`), talks to systemd when it set `NOTIFY_SOCKET`, and takes
    /// the maintenance switch and file.
    pub async fn for_run(
        cfg: &RunConfig,
        maintenance_switch: Option<watch::Receiver<bool>>,
        shutdown: CancellationToken,
    ) -> std::io::Result<Hooks> {
        let board = match &cfg.ops.status_addr {
            None => None,
            Some(addr) => {
                let timeout = cfg.probe.as_ref().map_or(Duration::ZERO, |p| p.timeout);
                let stall = 2 * cfg.timing.interval + timeout + Duration::from_secs(1);
                let keys = cfg.keys.iter().map(|(k, _)| k.clone()).collect();
                let endpoint = cfg.etcd.discovery.endpoints.first().cloned().unwrap_or_default();
                let board = Arc::new(Board::new(&cfg.keys[0].0, keys, &endpoint, stall));
                crate::status::bind_and_serve(addr, crate::status::View::One(board.clone()), shutdown).await?;
                Some(board)
            }
        };
        let notifier = Systemd::from_env();
        Ok(Hooks {
            board,
            watchdog: notifier.as_ref().and_then(|_| Systemd::watchdog_period()),
            notifier: notifier.map(|n| Box::new(n) as Box<dyn Notifier>),
            maintenance_file: cfg.ops.maintenance_file.clone(),
            maintenance_switch,
            phase: Duration::ZERO,
            probe_permits: None,
            ready: AtomicBool::new(false),
        })
    }

    fn notify(&self, notice: Notice<'_>) {
        if let Some(n) = &self.notifier {
            n.send(notice);
        }
    }

    /// The state is settled (registered, deliberately down, or etcd known
    /// to be unreachable): `READY=1`, once.
    pub(crate) fn ready(&self) {
        if self.notifier.is_some() && !self.ready.swap(true, Ordering::Relaxed) {
            self.notify(Notice::Ready);
        }
    }

    /// Whether maintenance is asked for: by signal, or by the file (one
    /// `stat`, only when a file is configured).
    pub(crate) fn in_maintenance(&self) -> bool {
        self.maintenance_switch.as_ref().is_some_and(|s| *s.borrow())
            || self.maintenance_file.as_ref().is_some_and(|f| f.exists())
    }

    /// The probe loop turned and probed.
    pub(crate) fn probed(&self, outcome: &Outcome, failing: u32) {
        if let Some(b) = &self.board {
            b.tick();
            b.probe(outcome, failing);
        }
    }

    /// The probe loop is alive.
    pub(crate) fn watchdog(&self) {
        if let Some(b) = &self.board {
            b.tick();
        }
        self.notify(Notice::Watchdog);
    }

    /// A new state, with the line systemd shows for it.
    pub(crate) fn state(&self, state: State, line: &str) {
        if let Some(b) = &self.board {
            b.state(state.as_str());
        }
        self.notify(Notice::Status(line));
        if state == State::Down || state == State::Maintenance {
            self.ready();
        }
    }

    /// The keys are in etcd.
    pub(crate) fn registered(&self, lease: LeaseId, ttl: Duration, endpoint: &str, keys: &str) {
        if let Some(b) = &self.board {
            b.registered(lease, ttl, endpoint);
        }
        if self.notifier.is_some() {
            self.notify(Notice::Status(&format!("registered {keys}, lease {lease}")));
            self.ready();
        }
    }

    /// The lease was refreshed.
    pub(crate) fn kept_alive(&self) {
        if let Some(b) = &self.board {
            b.kept_alive();
        }
    }

    /// The keys left etcd: `why` says how.
    pub(crate) fn withdrawn(&self, why: &str) {
        if let Some(b) = &self.board {
            b.withdrawn();
        }
        self.notify(Notice::Status(why));
    }

    /// An etcd call failed; `first` when it is a new cause in this outage.
    pub(crate) fn etcd_failed(&self, keep_alive: bool, endpoint: &str, text: &str, first: bool) {
        if let Some(b) = &self.board {
            b.etcd_error(keep_alive, endpoint, text.to_string());
        }
        if first && self.notifier.is_some() {
            self.notify(Notice::Status(&format!("etcd unreachable, retrying: {text}")));
            self.ready();
        }
    }

    /// Shutting down.
    pub(crate) fn stopping(&self) {
        self.notify(Notice::Stopping);
    }
}
