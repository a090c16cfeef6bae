//! What the engine tells the world besides its logs (the status boards,
//! systemd's notifications) and what it is told (the maintenance switch and
//! file). Every piece is optional and off by default; [`Hooks::default`]
//! does nothing, so a sidekick without `--status-addr`, `NOTIFY_SOCKET` or
//! `--maintenance-file` pays a few branches and nothing else.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Operability;
use crate::notify::{Notice, Notifier, Systemd};
use crate::status::{Board, Boards, Pulse, View};

/// The optional parts of a sidekick, `run` or agent alike.
#[derive(Default, Clone)]
pub struct Hooks {
    /// The boards `--status-addr` serves; each service adds its own.
    pub boards: Option<Boards>,
    /// The etcd endpoint shown on new boards.
    pub endpoint: String,
    /// How the etcd endpoints were chosen and how to choose others, logged
    /// the first time etcd does not answer (empty: nothing).
    pub etcd_hint: String,
    /// systemd, when `NOTIFY_SOCKET` is set.
    pub notifier: Option<Arc<dyn Notifier>>,
    /// How often to send `WATCHDOG=1`.
    pub watchdog: Option<Duration>,
    /// `--maintenance-file`: while it exists, every service is in maintenance.
    pub maintenance_file: Option<PathBuf>,
    /// SIGUSR1 (true) and SIGUSR2 (false): maintenance by signal.
    pub maintenance_switch: Option<watch::Receiver<bool>>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("boards", &self.boards.is_some())
            .field("notifier", &self.notifier.is_some())
            .field("watchdog", &self.watchdog)
            .field("maintenance_file", &self.maintenance_file)
            .finish_non_exhaustive()
    }
}

impl Hooks {
    /// The hooks the flags and environment ask for: binds and serves
    /// `--status-addr` until `shutdown` (`/status` shows one service's
    /// object with `one`, else a list), talks to systemd when it set
    /// `NOTIFY_SOCKET`, and takes the maintenance switch and file.
    pub async fn new(
        ops: &Operability,
        endpoint: &str,
        one: bool,
        maintenance_switch: Option<watch::Receiver<bool>>,
        shutdown: CancellationToken,
    ) -> std::io::Result<Hooks> {
        let boards = match &ops.status_addr {
            None => None,
            Some(addr) => {
                let boards: Boards = Arc::new(Mutex::new(Vec::new()));
                let view = if one {
                    View::One(boards.clone())
                } else {
                    View::Many(boards.clone())
                };
                crate::status::bind_and_serve(addr, view, shutdown).await?;
                Some(boards)
            }
        };
        let notifier = Systemd::from_env();
        Ok(Hooks {
            boards,
            endpoint: endpoint.to_string(),
            etcd_hint: String::new(),
            watchdog: notifier.as_ref().and_then(|_| Systemd::watchdog_period()),
            notifier: notifier.map(|n| Arc::new(n) as Arc<dyn Notifier>),
            maintenance_file: ops.maintenance_file.clone(),
            maintenance_switch,
        })
    }

    pub(crate) fn notify(&self, notice: Notice<'_>) {
        if let Some(n) = &self.notifier {
            n.send(notice);
        }
    }

    /// A board for a service starting, when boards are served.
    pub(crate) fn add_board(&self, name: &str, keys: Vec<String>, pulse: Arc<Pulse>) -> Option<Arc<Board>> {
        let list = self.boards.as_ref()?;
        let b = Arc::new(Board::new(name, keys, &self.endpoint, pulse));
        list.lock().expect("boards lock").push(b.clone());
        Some(b)
    }

    /// Takes a stopped service's board off the list.
    pub(crate) fn remove_board(&self, board: &Arc<Board>) {
        if let Some(list) = &self.boards {
            list.lock().expect("boards lock").retain(|o| !Arc::ptr_eq(o, board));
        }
    }
}
