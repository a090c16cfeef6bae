//! `sidekick agent`: many services in one process, under one lease.
//!
//! Design. One etcd connection and one lease for the process, kept alive
//! every TTL/3 however many services there are. Each service has the probe
//! loop `run` uses, started at a random phase within its interval, with the
//! probes in flight across services bounded; it publishes its state and
//! wakes the registrar. One registrar follows every state:
//!
//! - a service that is up gets its keys put under the process lease (its
//!   first registration takes them over, later ones put only where absent,
//!   as `run` does);
//! - a service that goes down, or is removed by a reload, has its keys
//!   deleted by one transaction that compares each key's lease with ours,
//!   so no other writer's key is ever deleted (the lease stays: other
//!   services live on it);
//! - shared keys are held by the process lease: put where absent when a
//!   declaring service registers, watched and put again when deleted, and
//!   withdrawn only when no registered service declares them any more;
//! - a lost lease is replaced and every service that is up registers again;
//!   SIGHUP reloads the configuration and applies only the difference.
//!
//! `run` keeps its own small registrar: it withdraws by revoking its lease,
//! as the contract says, which is this design's one-service case without the
//! per-key transactions; both share the probe loop, the health machine, the
//! registry, backoff and the logging of etcd trouble.

pub mod config;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

pub use config::{ConfigError, Service};

use crate::health::State;
use crate::hooks::Hooks;
use crate::notify::{Notice, Notifier};
use crate::probe::Probe;
use crate::registry::{LeaseId, Registry, RegistryError};
use crate::sidekick::{probe_loop, wait_for, Backoff, Publish, Trouble};
use crate::status::Board;

/// Probes in flight at once across all services.
const PROBES_AT_ONCE: usize = 64;

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The file or directory of `*.toml` that SIGHUP reads again.
    pub config: PathBuf,
    /// The process lease's TTL.
    pub ttl: Duration,
    /// Bound on the final revoke (the dial timeout).
    pub stop_timeout: Duration,
}

/// Everything `sidekick agent` needs, checked before anything is written.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Lease, reload and stop settings.
    pub settings: Settings,
    /// The services, checked.
    pub services: Vec<Service>,
    /// Where etcd is and how to reach it.
    pub etcd: crate::config::EtcdSettings,
    /// `--status-addr` and `--maintenance-file`.
    pub ops: crate::config::Operability,
}

impl AgentConfig {
    /// The bound on each etcd call: the dial timeout, at most a third of
    /// the TTL (as `run`).
    pub fn call_bound(&self) -> Duration {
        crate::config::etcd_call_bound(self.settings.ttl, self.etcd.dial_timeout)
    }
}

/// Checks `sidekick agent`'s flags and loads its configuration: any error
/// (exit 2) names the flag, or the file, service and field.
pub fn agent_config(
    args: &crate::cli::AgentArgs,
    env: &dyn crate::discover::Environment,
) -> Result<AgentConfig, crate::parse::UsageError> {
    use crate::parse::UsageError;
    let ttl = crate::config::lease_ttl(&args.ttl, Duration::from_secs(15))?;
    let etcd = crate::config::etcd_settings(&args.etcd, env)?;
    let ops = crate::config::operability(&args.ops)?;
    let path = PathBuf::from(&args.config);
    let services = config::load(&path, ttl).map_err(|e| UsageError::new(e.0))?;
    Ok(AgentConfig {
        settings: Settings {
            config: path,
            ttl,
            stop_timeout: etcd.dial_timeout,
        },
        services,
        etcd,
        ops,
    })
}

/// The optional parts of an agent: its status boards, systemd, maintenance.
#[derive(Default)]
pub struct AgentHooks {
    /// The boards `--status-addr` serves; each service adds its own.
    pub boards: Option<Arc<Mutex<Vec<Arc<Board>>>>>,
    /// The etcd endpoint shown on new boards.
    pub endpoint: String,
    /// systemd, when `NOTIFY_SOCKET` is set.
    pub notifier: Option<Box<dyn Notifier>>,
    /// How often to send `WATCHDOG=1`.
    pub watchdog: Option<Duration>,
    /// `--maintenance-file`, for every service.
    pub maintenance_file: Option<PathBuf>,
    /// SIGUSR1/SIGUSR2, for every service.
    pub maintenance_switch: Option<watch::Receiver<bool>>,
}

impl AgentHooks {
    /// The hooks the agent's flags and environment ask for: binds and serves
    /// `--status-addr` until `shutdown`, talks to systemd when it set
    /// `NOTIFY_SOCKET`, and takes the maintenance switch and file.
    pub async fn for_agent(
        cfg: &AgentConfig,
        maintenance_switch: Option<watch::Receiver<bool>>,
        shutdown: CancellationToken,
    ) -> std::io::Result<AgentHooks> {
        let boards = match &cfg.ops.status_addr {
            None => None,
            Some(addr) => {
                let boards = Arc::new(Mutex::new(Vec::new()));
                crate::status::bind_and_serve(addr, crate::status::View::Many(boards.clone()), shutdown).await?;
                Some(boards)
            }
        };
        let notifier = crate::notify::Systemd::from_env();
        Ok(AgentHooks {
            boards,
            endpoint: cfg.etcd.discovery.endpoints.first().cloned().unwrap_or_default(),
            watchdog: notifier
                .as_ref()
                .and_then(|_| crate::notify::Systemd::watchdog_period()),
            notifier: notifier.map(|n| Box::new(n) as Box<dyn Notifier>),
            maintenance_file: cfg.ops.maintenance_file.clone(),
            maintenance_switch,
        })
    }

    fn notify(&self, notice: Notice<'_>) {
        if let Some(n) = &self.notifier {
            n.send(notice);
        }
    }
}

/// A probe loop's state goes to its watch and wakes the registrar.
struct Wake {
    tx: watch::Sender<State>,
    notify: Arc<Notify>,
}

impl Publish for Wake {
    fn publish(&self, state: State) {
        if self.tx.send_if_modified(|s| std::mem::replace(s, state) != state) {
            self.notify.notify_one();
        }
    }
}

/// One configured service while the agent runs it.
struct Running {
    spec: Service,
    state: watch::Receiver<State>,
    /// Stops its probe loop.
    stop: CancellationToken,
    board: Option<Arc<Board>>,
    /// Its keys are all in etcd under the process lease.
    registered: bool,
    /// Some of its keys are under the lease (a put found others held
    /// elsewhere, or is half done).
    partly: bool,
    /// When keys held elsewhere are tried again.
    put_at: Instant,
    /// The first registration takes its keys over.
    takeover: bool,
    /// Keys held elsewhere, warned about once.
    held: Vec<String>,
}

impl Running {
    fn wants_up(&self) -> bool {
        *self.state.borrow() == State::Up
    }

    fn keys(&self) -> Vec<String> {
        self.spec.keys.iter().map(|(k, _)| k.clone()).collect()
    }
}

/// What the registrar does next.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    Grant,
    KeepAlive,
    Shared,
    Put(String),
    Withdraw(String),
    /// Keys of services removed or changed by a reload.
    Retire,
}

/// The agent's registrar and its services.
struct Agent<'a, R: Registry> {
    settings: &'a Settings,
    hooks: &'a AgentHooks,
    reg: R,
    lease: Option<(LeaseId, Instant)>,
    services: BTreeMap<String, Running>,
    /// Keys of removed or changed services still to withdraw.
    retired: Vec<String>,
    /// Shared keys and values we hold or keep ensured.
    shared: BTreeMap<String, String>,
    shared_due: bool,
    watching: Vec<String>,
    /// Shared values found different, warned about once.
    warned: Vec<(String, String)>,
    wake: Arc<Notify>,
    permits: Arc<Semaphore>,
    shutdown: CancellationToken,
    ready: bool,
}

/// Runs `services` until `shutdown`: registers each while it is healthy,
/// applies the configuration again on every `reload` tick, and revokes the
/// lease at the end.
pub async fn run<R: Registry>(
    settings: &Settings,
    services: Vec<Service>,
    registry: R,
    shutdown: CancellationToken,
    mut reload: watch::Receiver<u64>,
    hooks: &AgentHooks,
) {
    let mut agent = Agent {
        settings,
        hooks,
        reg: registry,
        lease: None,
        services: BTreeMap::new(),
        retired: Vec::new(),
        shared: BTreeMap::new(),
        shared_due: false,
        watching: Vec::new(),
        warned: Vec::new(),
        wake: Arc::new(Notify::new()),
        permits: Arc::new(Semaphore::new(PROBES_AT_ONCE)),
        shutdown: shutdown.clone(),
        ready: false,
    };
    info!(
        services = services.len(),
        ttl = settings.ttl.as_secs(),
        "agent starting"
    );
    for s in services {
        agent.start(s, true);
    }
    agent.registrar(&mut reload).await;
    for s in agent.services.values() {
        s.stop.cancel();
    }
    hooks.notify(Notice::Stopping);
    if let Some((id, _)) = agent.lease {
        crate::sidekick::stop_revoke(&mut agent.reg, id, settings.stop_timeout).await;
    }
}

impl<R: Registry> Agent<'_, R> {
    /// Starts a service's probe loop: at a random phase of its interval
    /// when the agent starts (so many services spread out), at once when a
    /// reload adds it.
    fn start(&mut self, spec: Service, spread: bool) {
        let initial = if spec.probe.is_some() {
            State::Starting
        } else {
            State::Up
        };
        let (tx, rx) = watch::channel(initial);
        let stop = self.shutdown.child_token();
        let board = self.hooks.boards.as_ref().map(|list| {
            let timeout = spec.probe.as_ref().map_or(Duration::ZERO, |p| p.timeout);
            let stall = 2 * spec.timing.interval + timeout + Duration::from_secs(1);
            let keys = spec.keys.iter().map(|(k, _)| k.clone()).collect();
            let b = Arc::new(Board::new(&spec.name, keys, &self.hooks.endpoint, stall));
            list.lock().expect("boards lock").push(b.clone());
            b
        });
        if let Some(p) = &spec.probe {
            match Probe::new(p) {
                Ok(probe) => {
                    let mut hooks = Hooks::default();
                    hooks.board = board.clone();
                    hooks.maintenance_file = self.hooks.maintenance_file.clone();
                    hooks.maintenance_switch = self.hooks.maintenance_switch.clone();
                    if spread {
                        hooks.phase = spec.timing.interval.mul_f64(fastrand::f64());
                    }
                    hooks.probe_permits = Some(self.permits.clone());
                    let wake = Wake {
                        tx,
                        notify: self.wake.clone(),
                    };
                    let (timing, stop) = (spec.timing.clone(), stop.clone());
                    tokio::spawn(async move { probe_loop(&probe, &timing, &wake, &hooks, &stop).await });
                }
                Err(e) => error!(service = %spec.name, "{e}; the service stays unregistered"),
            }
        }
        debug!(service = %spec.name, "service started");
        self.services.insert(
            spec.name.clone(),
            Running {
                spec,
                state: rx,
                stop,
                board,
                registered: false,
                partly: false,
                put_at: Instant::now(),
                takeover: true,
                held: Vec::new(),
            },
        );
        self.wake.notify_one();
    }

    /// Stops a service; its keys, if registered, are withdrawn next.
    fn retire(&mut self, name: &str) {
        if let Some(s) = self.services.remove(name) {
            s.stop.cancel();
            if s.registered || s.partly {
                self.retired.extend(s.keys());
            }
            if let (Some(list), Some(b)) = (&self.hooks.boards, &s.board) {
                list.lock().expect("boards lock").retain(|o| !Arc::ptr_eq(o, b));
            }
            self.shared_due = true;
        }
    }

    /// Applies a new configuration: only the difference is written.
    fn apply(&mut self, new: Vec<Service>) {
        let names: Vec<String> = self.services.keys().cloned().collect();
        let (mut added, mut removed, mut changed) = (0, 0, 0);
        for name in &names {
            if !new.iter().any(|s| &s.name == name) {
                info!(service = %name, "reload: service removed; withdrawing it");
                self.retire(name);
                removed += 1;
            }
        }
        for spec in new {
            match self.services.get(&spec.name) {
                Some(old) if old.spec == spec => {}
                Some(_) => {
                    info!(service = %spec.name, "reload: service changed; registering it anew");
                    self.retire(&spec.name);
                    self.start(spec, false);
                    changed += 1;
                }
                None => {
                    info!(service = %spec.name, "reload: service added");
                    self.start(spec, false);
                    added += 1;
                }
            }
        }
        info!(added, removed, changed, "configuration reloaded");
    }

    /// The shared keys the registered services declare.
    fn declared(&self) -> BTreeMap<String, String> {
        self.services
            .values()
            .filter(|s| s.registered || s.partly)
            .flat_map(|s| s.spec.shared.iter().cloned())
            .collect()
    }

    fn next_action(&self, not_before: Instant) -> Option<(Action, Instant)> {
        let wanted = self.services.values().any(|s| s.wants_up());
        let Some((_, refresh_at)) = self.lease else {
            return wanted.then_some((Action::Grant, not_before));
        };
        let due = |at: Instant| at.max(not_before);
        if refresh_at <= not_before {
            return Some((Action::KeepAlive, not_before));
        }
        if !self.retired.is_empty() {
            return Some((Action::Retire, not_before));
        }
        if self.shared_due {
            return Some((Action::Shared, not_before));
        }
        for (name, s) in &self.services {
            if (s.registered || s.partly) && !s.wants_up() {
                return Some((Action::Withdraw(name.clone()), not_before));
            }
        }
        let mut next = (Action::KeepAlive, refresh_at);
        for (name, s) in &self.services {
            if s.wants_up() && !s.registered && due(s.put_at) < next.1 {
                next = (Action::Put(name.clone()), due(s.put_at));
            }
        }
        Some(next)
    }

    async fn registrar(&mut self, reload: &mut watch::Receiver<u64>) {
        let mut backoff = Backoff::new(Duration::from_secs(1));
        let mut trouble = Trouble::default();
        let mut not_before = Instant::now();
        let mut ping = self.hooks.watchdog.map(|every| Instant::now() + every);
        let mut reloads = true;
        loop {
            self.settle();
            let next = self.next_action(not_before);
            let watching = !self.watching.is_empty();
            let action = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = self.wake.notified() => continue,
                changed = reload.changed(), if reloads => {
                    match changed {
                        Ok(()) => match config::load(&self.settings.config, self.settings.ttl) {
                            Ok(new) => self.apply(new),
                            Err(e) => error!("reload refused, the running configuration stays: {e}"),
                        },
                        Err(_) => reloads = false,
                    }
                    continue;
                }
                _ = sleep_until(ping.unwrap_or(not_before)), if ping.is_some() => {
                    self.hooks.notify(Notice::Watchdog);
                    ping = self.hooks.watchdog.map(|every| Instant::now() + every);
                    continue;
                }
                gone = self.reg.deleted(), if watching => {
                    match gone {
                        Ok(keys) => info!(keys = %keys.join(","), "shared key deleted; putting it again"),
                        Err(e) => {
                            self.watching.clear();
                            trouble.note(&e);
                        }
                    }
                    self.shared_due = true;
                    continue;
                }
                action = wait_for(next) => action,
            };
            // A signal cancels the call in flight, as in `run`.
            let shutdown = self.shutdown.clone();
            let result = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                r = self.act(&action) => r,
            };
            match result {
                Ok(()) => {
                    if trouble.clear() {
                        info!(endpoint = %self.reg.endpoint(), "etcd answers again");
                    }
                    backoff.reset();
                    not_before = Instant::now();
                }
                Err(e) => {
                    if trouble.note(&e) {
                        self.hooks
                            .notify(Notice::Status(&format!("etcd unreachable, retrying: {e}")));
                        self.ready();
                    }
                    if let Action::KeepAlive = action {
                        for s in self.services.values() {
                            if let Some(b) = &s.board {
                                b.etcd_error(true, &e.endpoint, e.to_string());
                            }
                        }
                    }
                    not_before = Instant::now() + backoff.fail();
                }
            }
        }
    }

    /// `READY=1` once every service has settled (or etcd is unreachable).
    fn settle(&mut self) {
        if !self.ready && self.services.values().all(|s| *s.state.borrow() != State::Starting) {
            let all_up_registered = self.services.values().all(|s| !s.wants_up() || s.registered);
            if all_up_registered {
                self.ready();
            }
        }
    }

    fn ready(&mut self) {
        if !self.ready {
            self.ready = true;
            self.hooks.notify(Notice::Ready);
        }
    }

    fn status_line(&self) {
        if self.hooks.notifier.is_some() {
            let up = self.services.values().filter(|s| s.registered).count();
            self.hooks.notify(Notice::Status(&format!(
                "{up} of {} services registered",
                self.services.len()
            )));
        }
    }

    async fn act(&mut self, action: &Action) -> Result<(), RegistryError> {
        let ttl = self.settings.ttl;
        match action {
            Action::Grant => {
                let id = self.reg.grant(ttl).await?;
                info!(lease = %id, ttl = ttl.as_secs(), "lease granted");
                self.lease = Some((id, Instant::now() + ttl / 3));
            }
            Action::KeepAlive => {
                let (id, _) = self.lease.expect("keep-alive needs a lease");
                if self.reg.keep_alive(id).await? {
                    self.lease = Some((id, Instant::now() + ttl / 3));
                    for s in self.services.values().filter(|s| s.registered) {
                        if let Some(b) = &s.board {
                            b.kept_alive();
                        }
                    }
                } else {
                    warn!(lease = %id, "lease expired or was lost in etcd; registering every healthy service again");
                    self.lease = None;
                    self.reg.unwatch();
                    self.watching.clear();
                    self.shared.clear();
                    for s in self.services.values_mut() {
                        if s.registered || s.partly {
                            s.takeover = false;
                        }
                        s.registered = false;
                        s.partly = false;
                        if let Some(b) = &s.board {
                            b.withdrawn();
                        }
                    }
                    self.retired.clear();
                    self.status_line();
                }
            }
            Action::Retire => {
                let (id, _) = self.lease.expect("retire needs a lease");
                let keys = std::mem::take(&mut self.retired);
                if let Err(e) = self.reg.withdraw_keys(id, &keys).await {
                    self.retired = keys;
                    return Err(e);
                }
                info!(keys = %keys.join(","), "withdrawn after the reload");
                self.shared_due = true;
                self.status_line();
            }
            Action::Shared => {
                let (id, _) = self.lease.expect("shared keys need a lease");
                let declared = self.declared();
                // No longer declared by any registered service: ours go.
                let stale: Vec<String> = self
                    .shared
                    .keys()
                    .filter(|k| !declared.contains_key(*k))
                    .cloned()
                    .collect();
                if !stale.is_empty() {
                    self.reg.withdraw_keys(id, &stale).await?;
                    debug!(keys = %stale.join(","), "shared keys no service declares any more, withdrawn");
                }
                let wanted: Vec<(String, String)> = declared.clone().into_iter().collect();
                let (present, revision) = self.reg.put_shared(id, &wanted).await?;
                for p in &present {
                    let mine = &declared[&p.key];
                    if p.value != *mine && !self.warned.contains(&(p.key.clone(), p.value.clone())) {
                        warn!(key = %p.key, theirs = %p.value, ours = %mine, "shared key holds another value; leaving it as it is");
                        self.warned.push((p.key.clone(), p.value.clone()));
                    }
                }
                let keys: Vec<String> = declared.keys().cloned().collect();
                if keys != self.watching {
                    self.reg.watch_deleted(&keys, revision + 1).await?;
                    self.watching = keys;
                }
                self.shared = declared;
                self.shared_due = false;
            }
            Action::Put(name) => {
                let (id, _) = self.lease.expect("put needs a lease");
                let s = self.services.get_mut(name).expect("a running service");
                let elsewhere = self.reg.put(id, &s.spec.keys, s.takeover).await?;
                s.partly = true;
                for h in &elsewhere {
                    if !s.held.contains(&h.key) {
                        let holder = h.holder.map_or("no lease".to_string(), |l| format!("lease {l}"));
                        warn!(service = %name, key = %h.key, holder = %holder, "key is held elsewhere; not overwriting it, will try again each interval");
                        s.held.push(h.key.clone());
                    }
                }
                s.held.retain(|k| elsewhere.iter().any(|h| &h.key == k));
                if elsewhere.is_empty() {
                    s.registered = true;
                    s.takeover = false;
                    let keys = s.keys().join(",");
                    info!(service = %name, lease = %id, keys = %keys, "registered");
                    if let Some(b) = &s.board {
                        b.registered(id, ttl, self.reg.endpoint());
                    }
                    if !s.spec.shared.is_empty() {
                        self.shared_due = true;
                    }
                    self.status_line();
                } else {
                    s.put_at = Instant::now() + s.spec.timing.interval;
                }
            }
            Action::Withdraw(name) => {
                let (id, _) = self.lease.expect("withdraw needs a lease");
                let s = self.services.get_mut(name).expect("a running service");
                let n = self.reg.withdraw_keys(id, &s.keys()).await?;
                s.registered = false;
                s.partly = false;
                info!(service = %name, deleted = n, "withdrawn");
                if let Some(b) = &s.board {
                    b.withdrawn();
                }
                if !s.spec.shared.is_empty() {
                    self.shared_due = true;
                }
                self.status_line();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! The registrar's rhythm against the in-memory registry, under paused
    //! time; etcd's own behaviour is proven by the integration tests.

    use super::*;
    use crate::config::Timing;
    use crate::registry::MemoryRegistry;

    fn unconditional(n: usize) -> Vec<Service> {
        (0..n)
            .map(|i| Service {
                name: format!("s{i}"),
                file: PathBuf::from("test.toml"),
                keys: vec![(format!("/services/s{i}/1"), "v".into())],
                shared: vec![("/services/shared".into(), "x".into())],
                probe: None,
                timing: Timing {
                    interval: Duration::from_secs(1),
                    rise: 1,
                    fall: 1,
                    ttl: Duration::from_secs(9),
                    grace: Duration::ZERO,
                    drain: Duration::ZERO,
                },
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn one_lease_and_a_keep_alive_rate_independent_of_the_number_of_services() {
        let settings = Settings {
            config: PathBuf::from("test.toml"),
            ttl: Duration::from_secs(9),
            stop_timeout: Duration::from_secs(1),
        };
        let reg = MemoryRegistry::new();
        let token = CancellationToken::new();
        let (_reload_tx, reload) = watch::channel(0);
        let task = tokio::spawn({
            let (reg, token) = (reg.clone(), token.clone());
            async move {
                run(
                    &settings,
                    unconditional(200),
                    reg,
                    token,
                    reload,
                    &AgentHooks::default(),
                )
                .await
            }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (_, lease) = reg.get("/services/s0/1").expect("registered");
        for i in 0..200 {
            assert_eq!(
                reg.get(&format!("/services/s{i}/1")).map(|(_, l)| l),
                Some(lease),
                "s{i}"
            );
        }
        assert_eq!(reg.get("/services/shared").map(|(_, l)| l), Some(lease));
        let revisions = reg.revisions();
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(reg.revisions(), revisions, "nothing written while steady");
        assert_eq!(reg.calls("grant"), 1);
        let ka = reg.calls("keep_alive");
        assert!(
            (19..=21).contains(&ka),
            "one keep-alive every TTL/3 for 200 services: {ka}"
        );
        token.cancel();
        task.await.unwrap();
        assert_eq!(reg.get("/services/s0/1"), None, "revoked on stop");
    }
}
