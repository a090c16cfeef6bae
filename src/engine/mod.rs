//! The one engine: services in, keys in etcd out. `sidekick run` is this
//! engine with one service whose withdrawal revokes its lease
//! ([`Policy::Revoke`]); `sidekick agent` is it with many services under
//! one process lease, each withdrawn by a transaction that deletes only the
//! keys our lease still holds ([`Policy::PerKey`]).
//!
//! Each service has a probe loop ([`probe_loop`]) that publishes its health
//! state and wakes the registrar; the registrar follows every state. Its
//! order of work is a priority, not a queue:
//!
//! 1. the keep-alive of the process lease (every TTL/3);
//! 2. withdrawals of services that went down;
//! 3. everything else: keys of services removed by a reload, shared keys
//!    (their service leases' grants and keep-alives, the put of absent
//!    ones), the grant of the process lease, registrations.
//!
//! Each step retries with its own backoff: one that etcd refuses (no
//! permission for a prefix, a key held elsewhere) never holds up the
//! others. An etcd that does not answer holds up every step alike (one
//! backoff for all, capped at the shortest interval), and the next attempt
//! goes to the most urgent step. Every call is bounded by min(dial
//! timeout, TTL/3), so no step blocks the others for longer than that.
//!
//! Shared keys are held jointly ([`shared`]): each under a service lease
//! whose id every declaring instance computes alike, joined with a
//! keep-alive while a service declaring it is up, never revoked, so an
//! instance leaving changes nothing in etcd for the others.
//!
//! A write that got no answer may still reach etcd, late (it went to a
//! member cut off from us, and was delivered when the link came back). So
//! a registration's keys carry its revision and its withdrawal deletes
//! only that one ([`ops::withdraw_keys`]), and the agent watches its own
//! keys as it watches the shared ones: a key of ours that appears while its
//! service is withdrawn (or gone) is deleted, and one deleted while its
//! service is registered is put back. `run` needs none of it: its
//! withdrawal revokes the lease, which a late registration cannot outlive.

pub mod probe_loop;
pub mod shared;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

pub use probe_loop::Check;

use crate::config::{ProbeSpec, Timing};
use crate::health::State;
use crate::hooks::Hooks;
use crate::notify::Notice;
use crate::registry::ops;
use crate::registry::{ErrorKind, Etcd, KeyValue, LeaseId, Range, RegistryError};
use crate::status::{Board, Pulse};
use probe_loop::{probe_loop, Context, Publish};
use support::{stop_revoke, wait_for, Held, SharedNotes, Step, Trouble};

/// Probes in flight at once across all services.
const PROBES_AT_ONCE: usize = 64;

/// How a service that goes down leaves etcd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Revoke the lease: its keys go with it (`run`: one service a lease).
    Revoke,
    /// Delete each of the service's keys that our lease still holds, in
    /// one transaction; the lease stays for the other services (agent).
    PerKey,
}

/// One service, checked: keys, shared keys, probe and timing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// Its name: the `service` label of its metrics (`run`: its KEY).
    pub name: String,
    /// The file it came from (agent), for messages.
    pub file: PathBuf,
    /// The service's own keys: `key` and every `extra`.
    pub keys: Vec<(String, String)>,
    /// Service-level keys held jointly with every instance declaring them.
    pub shared: Vec<(String, String)>,
    /// How it is probed; `None` keeps it registered unconditionally.
    pub probe: Option<ProbeSpec>,
    /// Probe timing (the TTL is the engine's).
    pub timing: Timing,
}

/// How the engine runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The process lease's TTL, also the TTL of the service leases it grants.
    pub ttl: Duration,
    /// Bound on the final revoke (the dial timeout).
    pub stop_timeout: Duration,
    /// How a service that goes down is withdrawn.
    pub policy: Policy,
}

/// Where a reload comes from: a signal counter and the loader it calls.
pub struct Reload {
    /// Goes up on every SIGHUP.
    pub signal: watch::Receiver<u64>,
    /// Reads the configuration again; an error keeps the running one.
    pub load: Box<dyn Fn() -> Result<Vec<Service>, String> + Send + Sync>,
}

/// Builds a service's probe; `Ok(None)` for a service without one.
pub type Build<'a, P> = &'a (dyn Fn(&Service) -> Result<Option<P>, String> + Sync);

/// The process lease, while we have one.
#[derive(Debug)]
struct Own {
    id: LeaseId,
    refresh_at: Instant,
    ttl: Duration,
}

/// One service while the engine runs it.
struct Running {
    spec: Service,
    state: watch::Receiver<State>,
    stop: CancellationToken,
    board: Option<Arc<Board>>,
    pulse: Arc<Pulse>,
    /// All its keys are in etcd under the process lease.
    registered: bool,
    /// Some of its keys may be in etcd (a put was tried, or a withdrawal
    /// did not answer).
    partly: bool,
    /// The revision of the registration that wrote each key: its
    /// withdrawal deletes that one and no later one.
    written: BTreeMap<String, i64>,
    /// The revision of its last withdrawal: a write of ours seen from
    /// before it is no news.
    withdrawn_at: i64,
    /// When keys held elsewhere are tried again.
    put_at: Instant,
    /// The first registration takes its keys over.
    takeover: bool,
    held: Held,
    step: Step,
}

impl Running {
    fn wants_up(&self) -> bool {
        *self.state.borrow() == State::Up
    }

    fn keys(&self) -> Vec<String> {
        keys_of(&self.spec)
    }

    /// Each key with the revision of our registration of it (0: unknown).
    fn written_keys(&self) -> Vec<(String, i64)> {
        self.keys()
            .into_iter()
            .map(|k| {
                let rev = self.written.get(&k).copied().unwrap_or(0);
                (k, rev)
            })
            .collect()
    }
}

/// A shared key we want present, and its service lease.
#[derive(Debug)]
struct SharedKey {
    value: String,
    lease: LeaseId,
    /// When its service lease is next kept alive; `None` until we granted
    /// or joined it.
    refresh_at: Option<Instant>,
    step: Step,
}

/// What the registrar does next.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    KeepAlive,
    Withdraw(String),
    Retire,
    KeepShared(String),
    JoinShared(String),
    PutShared,
    Grant,
    Put(String),
    Watch,
}

struct Engine<'a, R: Etcd, P: Check> {
    settings: &'a Settings,
    hooks: &'a Hooks,
    build: Build<'a, P>,
    reg: R,
    lease: Option<Own>,
    /// The process lease's grant and keep-alive.
    own: Step,
    /// One backoff for all when etcd does not answer.
    global: Step,
    services: BTreeMap<String, Running>,
    /// Keys of services removed or changed by a reload, still to withdraw,
    /// each with the revision of our registration of it.
    retired: Vec<(String, i64)>,
    retire_step: Step,
    shared: BTreeMap<String, SharedKey>,
    /// Absent shared keys are to be put.
    shared_due: bool,
    shared_step: Step,
    /// The keys watched: the shared keys put, and (agent) every key of
    /// ours, so that a write of ours that etcd applies late is undone.
    watching: Vec<String>,
    /// The watch is to be set again, after a read of what it watches.
    watch_due: bool,
    watch_step: Step,
    /// Keys of services a reload removed (agent): watched while the
    /// process lease lives, since a registration of theirs may land late.
    /// Each with the revision of its withdrawal (0 until withdrawn).
    gone: BTreeMap<String, i64>,
    notes: SharedNotes,
    trouble: Trouble,
    wake: Arc<Notify>,
    permits: Arc<Semaphore>,
    shutdown: CancellationToken,
    ready: bool,
}

/// Runs `services` until `shutdown`: registers each while it is healthy,
/// withdraws it when it is not, applies a reload when one comes, and at the
/// end stops probing and revokes the process lease (bounded by the stop
/// timeout; the shared keys' service leases are left to the others).
/// Returns whether any service was registered when the stop came.
pub async fn run<R: Etcd, P: Check>(
    settings: &Settings,
    services: Vec<Service>,
    build: Build<'_, P>,
    registry: R,
    hooks: &Hooks,
    shutdown: CancellationToken,
    reload: Option<Reload>,
) -> bool {
    let cap = services
        .iter()
        .map(|s| s.timing.interval)
        .min()
        .unwrap_or(Duration::from_secs(1));
    let mut engine = Engine {
        settings,
        hooks,
        build,
        reg: registry,
        lease: None,
        own: Step::new(cap),
        global: Step::new(cap),
        services: BTreeMap::new(),
        retired: Vec::new(),
        retire_step: Step::new(cap),
        shared: BTreeMap::new(),
        shared_due: false,
        shared_step: Step::new(cap),
        watching: Vec::new(),
        watch_due: false,
        watch_step: Step::new(cap),
        gone: BTreeMap::new(),
        notes: SharedNotes::default(),
        trouble: Trouble::with_hint(&hooks.etcd_hint),
        wake: Arc::new(Notify::new()),
        permits: Arc::new(Semaphore::new(PROBES_AT_ONCE)),
        shutdown: shutdown.clone(),
        ready: false,
    };
    let spread = services.len() > 1;
    for s in services {
        engine.start(s, spread);
    }
    engine.registrar(reload).await;

    // Shutdown order: stop probing, say so, revoke the process lease
    // (bounded); the caller then drains.
    for s in engine.services.values() {
        s.stop.cancel();
    }
    hooks.notify(Notice::Stopping);
    let registered = engine.services.values().any(|s| s.registered || s.partly);
    for k in engine.shared.values() {
        engine.reg.forget(k.lease);
    }
    if let Some(own) = engine.lease.take() {
        stop_revoke(&mut engine.reg, own.id, settings.stop_timeout).await;
    }
    registered
}

impl<R: Etcd, P: Check> Engine<'_, R, P> {
    /// Starts a service's probe loop: at a random phase of its interval
    /// when `spread` (many services starting together), else at once.
    fn start(&mut self, spec: Service, spread: bool) {
        let has_probe = spec.probe.is_some();
        let (tx, rx) = watch::channel(if has_probe { State::Starting } else { State::Up });
        let stop = self.shutdown.child_token();
        let timeout = spec.probe.as_ref().map_or(Duration::ZERO, |p| p.timeout);
        let pulse = Arc::new(Pulse::new(spec.timing.interval, timeout));
        let board = self.hooks.add_board(&spec.name, keys_of(&spec), pulse.clone());
        let probe = match (self.build)(&spec) {
            Ok(p) => p.map(Arc::new),
            Err(e) => {
                // Validation builds every probe first; this is a backstop.
                error!(service = %spec.name, "{e}; the service stays unregistered");
                tx.send_replace(State::Down);
                None
            }
        };
        let cx = Context {
            board: board.clone(),
            // The pulse is read only by `/healthz` and the watchdog.
            pulse: (has_probe && (self.hooks.boards.is_some() || self.hooks.watchdog.is_some())).then(|| pulse.clone()),
            notifier: if self.services.is_empty() && !spread {
                self.hooks.notifier.clone()
            } else {
                None
            },
            maintenance_file: self.hooks.maintenance_file.clone(),
            maintenance_switch: self.hooks.maintenance_switch.clone(),
            phase: if spread {
                spec.timing.interval.mul_f64(fastrand::f64())
            } else {
                Duration::ZERO
            },
            // Only an agent has services to bound against each other.
            permits: (self.settings.policy == Policy::PerKey).then(|| self.permits.clone()),
        };
        if probe.is_some() || !has_probe {
            let out = Publish {
                tx,
                wake: self.wake.clone(),
            };
            let span = tracing::info_span!("service", name = %spec.name);
            tokio::spawn(probe_loop(probe, spec.timing.clone(), out, cx, stop.clone()).instrument(span));
        }
        debug!(service = %spec.name, "service started");
        if self.settings.policy == Policy::PerKey {
            self.watch_due = true;
        }
        let cap = spec.timing.interval;
        self.services.insert(
            spec.name.clone(),
            Running {
                spec,
                state: rx,
                stop,
                board,
                pulse,
                registered: false,
                partly: false,
                written: BTreeMap::new(),
                withdrawn_at: 0,
                put_at: Instant::now(),
                takeover: true,
                held: Held::default(),
                step: Step::new(cap),
            },
        );
        self.wake.notify_one();
    }

    /// Stops a service; its keys, if it may have any in etcd, are
    /// withdrawn next.
    fn retire(&mut self, name: &str) {
        if let Some(s) = self.services.remove(name) {
            s.stop.cancel();
            if s.registered || s.partly {
                self.retired.extend(s.written_keys());
            }
            if self.settings.policy == Policy::PerKey {
                self.gone.extend(s.keys().into_iter().map(|k| (k, s.withdrawn_at)));
                self.watch_due = true;
            }
            if let Some(b) = &s.board {
                self.hooks.remove_board(b);
            }
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

    /// The shared keys we want: those of every service that is up.
    fn sync_shared(&mut self) {
        let mut wanted: BTreeMap<&str, &str> = BTreeMap::new();
        for s in self.services.values().filter(|s| s.wants_up()) {
            for (k, v) in &s.spec.shared {
                wanted.insert(k, v);
            }
        }
        let gone: Vec<String> = self
            .shared
            .iter()
            .filter(|(k, sk)| wanted.get(k.as_str()) != Some(&sk.value.as_str()))
            .map(|(k, _)| k.clone())
            .collect();
        if !gone.is_empty() {
            // Watched no more.
            self.watch_due = true;
        }
        for k in gone {
            // Never revoked: while another instance declares it, the key
            // stays without a write; after the last, it expires.
            if let Some(sk) = self.shared.remove(&k) {
                debug!(key = %k, lease = %sk.lease, "no service here declares the shared key now; no longer keeping its lease alive");
                self.reg.forget(sk.lease);
            }
        }
        let cap = self.global_cap();
        for (k, v) in wanted {
            if !self.shared.contains_key(k) {
                self.shared.insert(
                    k.to_string(),
                    SharedKey {
                        value: v.to_string(),
                        lease: shared::lease_id(k, v),
                        refresh_at: None,
                        step: Step::new(cap),
                    },
                );
            }
        }
    }

    /// What the watch covers: the shared keys put, and (agent) every key
    /// of ours: those of the services, and of the services removed while
    /// this process lease lives.
    fn watch_set(&self) -> Vec<String> {
        let mut keys: BTreeSet<&str> = self
            .shared
            .iter()
            .filter(|(_, sk)| sk.refresh_at.is_some())
            .map(|(k, _)| k.as_str())
            .collect();
        if self.settings.policy == Policy::PerKey {
            for s in self.services.values() {
                keys.extend(s.spec.keys.iter().map(|(k, _)| k.as_str()));
            }
            keys.extend(self.gone.keys().map(String::as_str));
            keys.extend(self.retired.iter().map(|(k, _)| k.as_str()));
        }
        keys.into_iter().map(String::from).collect()
    }

    /// Whether [`Self::watch_set`] is empty, without building it.
    fn watches_nothing(&self) -> bool {
        let ours = self.settings.policy == Policy::PerKey
            && (self.services.values().any(|s| !s.spec.keys.is_empty())
                || !self.gone.is_empty()
                || !self.retired.is_empty());
        !ours && self.shared.values().all(|sk| sk.refresh_at.is_none())
    }

    /// What etcd says of a watched key at `revision`: `kv` when present,
    /// `None` when deleted. A shared key deleted is put back. A key of
    /// ours (agent) that etcd shows under our lease while its service is
    /// withdrawn or gone, a registration that landed late, is deleted, by
    /// its revision; one deleted while its service is registered is put
    /// back.
    fn seen(&mut self, key: &str, kv: Option<&KeyValue>, revision: i64) {
        if self.shared.contains_key(key) {
            if kv.is_none() {
                info!(key = %key, "shared key deleted; putting it again");
                self.shared_due = true;
            }
            return;
        }
        let Some(lease) = self.lease.as_ref().map(|l| l.id) else {
            return;
        };
        if self.settings.policy != Policy::PerKey {
            return;
        }
        let owner = self
            .services
            .values_mut()
            .find(|s| s.spec.keys.iter().any(|(k, _)| k == key));
        match (kv, owner) {
            (Some(kv), owner) if kv.lease == lease.0 => match owner {
                Some(s) if s.registered => {
                    // Ours, maybe written again late: withdraw that one.
                    let w = s.written.entry(key.to_string()).or_insert(0);
                    *w = (*w).max(kv.mod_revision);
                }
                Some(s) if s.partly || kv.mod_revision <= s.withdrawn_at => {}
                None if self.gone.get(key).is_some_and(|w| kv.mod_revision <= *w) => {}
                _ => {
                    if !self.retired.iter().any(|(k, r)| k == key && *r == kv.mod_revision) {
                        warn!(key = %key, revision = kv.mod_revision, "a registration of ours reached etcd after its withdrawal; deleting it");
                        self.retired.push((key.to_string(), kv.mod_revision));
                    }
                }
            },
            (None, Some(s)) if s.registered && s.written.get(key).is_none_or(|w| *w < revision) => {
                info!(service = %s.spec.name, key = %key, "key deleted while registered; putting it again");
                s.registered = false;
                s.written.remove(key);
            }
            _ => {}
        }
    }

    fn global_cap(&self) -> Duration {
        self.services
            .values()
            .map(|s| s.spec.timing.interval)
            .min()
            .unwrap_or(Duration::from_secs(1))
    }

    /// The most urgent action due now, else the one due first.
    fn next_action(&self) -> Option<(Action, Instant)> {
        let now = Instant::now();
        let g = self.global.not_before;
        let due = |step: &Step, at: Instant| step.due(at).max(g);
        let mut cands: Vec<(Action, Instant)> = Vec::new();
        if let Some(own) = &self.lease {
            cands.push((Action::KeepAlive, due(&self.own, own.refresh_at)));
            for (name, s) in &self.services {
                if (s.registered || s.partly) && !s.wants_up() {
                    cands.push((Action::Withdraw(name.clone()), due(&s.step, now)));
                }
            }
            if !self.retired.is_empty() {
                cands.push((Action::Retire, due(&self.retire_step, now)));
            }
        }
        for (k, sk) in &self.shared {
            match sk.refresh_at {
                Some(at) => cands.push((Action::KeepShared(k.clone()), due(&sk.step, at))),
                None => cands.push((Action::JoinShared(k.clone()), due(&sk.step, now))),
            }
        }
        if self.shared_due && self.shared.values().any(|sk| sk.refresh_at.is_some()) {
            cands.push((Action::PutShared, due(&self.shared_step, now)));
        }
        match &self.lease {
            None if self.services.values().any(|s| s.wants_up()) => {
                cands.push((Action::Grant, due(&self.own, now)));
            }
            None => {}
            Some(_) => {
                for (name, s) in &self.services {
                    if s.wants_up() && !s.registered {
                        cands.push((Action::Put(name.clone()), due(&s.step, s.put_at)));
                    }
                }
            }
        }
        if self.watch_due {
            cands.push((Action::Watch, due(&self.watch_step, now)));
        }
        if let Some(c) = cands.iter().find(|(_, at)| *at <= now) {
            return Some(c.clone());
        }
        cands.into_iter().min_by_key(|(_, at)| *at)
    }

    /// When the registrar must turn by itself: the watchdog's period, and
    /// the beat of services without a probe (their loop is this one).
    fn tick_every(&self) -> Option<Duration> {
        let beat = if self.hooks.boards.is_some() {
            self.services
                .values()
                .filter(|s| s.spec.probe.is_none())
                .map(|s| s.spec.timing.interval)
                .min()
        } else {
            None
        };
        match (self.hooks.watchdog, beat) {
            (Some(w), Some(b)) => Some(w.min(b)),
            (w, b) => w.or(b),
        }
    }

    /// One turn of the loop that does the work: beats for the services
    /// without a probe, and `WATCHDOG=1` when every probe loop is alive.
    fn tick(&self) {
        self.tick_no_probe();
        if self.hooks.watchdog.is_some() && self.services.values().all(|s| s.pulse.alive()) {
            self.hooks.notify(Notice::Watchdog);
        }
    }

    async fn registrar(&mut self, mut reload: Option<Reload>) {
        let mut tick_at = self.tick_every().map(|every| Instant::now() + every);
        loop {
            self.settle();
            self.sync_shared();
            debug_assert!(!self.watch_due || self.watches_nothing() == self.watch_set().is_empty());
            if self.watch_due && self.watches_nothing() {
                self.reg.unwatch();
                self.watching.clear();
                self.watch_due = false;
            }
            let next = self.next_action();
            let watching = !self.watching.is_empty();
            let action = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = self.wake.notified() => continue,
                changed = async { reload.as_mut().expect("checked").signal.changed().await }, if reload.is_some() => {
                    match changed {
                        Ok(()) => {
                            let r = reload.as_ref().expect("checked");
                            match (r.load)() {
                                Ok(new) => self.apply(new),
                                Err(e) => error!("reload refused, the running configuration stays: {e}"),
                            }
                            tick_at = self.tick_every().map(|every| Instant::now() + every);
                        }
                        Err(_) => reload = None,
                    }
                    continue;
                }
                _ = sleep_until(tick_at.unwrap_or_else(Instant::now)), if tick_at.is_some() => {
                    self.tick();
                    tick_at = self.tick_every().map(|every| Instant::now() + every);
                    continue;
                }
                seen = self.reg.watched(), if watching => {
                    match seen {
                        Ok(events) => {
                            for e in &events {
                                self.seen(&e.kv.key, e.put.then_some(&e.kv), e.kv.mod_revision);
                            }
                        }
                        Err(e) => {
                            // Changes may have gone unseen: read every key
                            // again, and watch from there.
                            self.watching.clear();
                            self.watch_due = true;
                            self.shared_due = true;
                            self.failed(&e, None);
                        }
                    }
                    continue;
                }
                action = wait_for(next) => action,
            };
            self.tick_no_probe();
            // A signal cancels the call in flight: the stop has a bound of
            // its own. The watchdog keeps its rhythm during a long call.
            let shutdown = self.shutdown.clone();
            let (hooks, watchdog) = (self.hooks, self.hooks.watchdog);
            let result = {
                let mut call = pin!(self.act(&action));
                loop {
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => return,
                        r = &mut call => break r,
                        _ = sleep_until(tick_at.unwrap_or_else(Instant::now)), if watchdog.is_some() && tick_at.is_some() => {
                            // The call in flight is this loop's work; the
                            // probe loops are checked at the next turn.
                            hooks.notify(Notice::Watchdog);
                            tick_at = watchdog.map(|every| Instant::now() + every);
                        }
                    }
                }
            };
            match result {
                Ok(()) => {
                    if self.trouble.clear() {
                        info!(endpoint = %self.reg.endpoint(), "etcd answers again");
                    }
                    self.global.done();
                    self.step(&action).done();
                }
                Err(e) => self.failed(&e, Some(&action)),
            }
        }
    }

    /// Services without a probe beat with this loop.
    fn tick_no_probe(&self) {
        for s in self.services.values().filter(|s| s.spec.probe.is_none()) {
            s.pulse.beat();
        }
    }

    /// An etcd failure: logged once per cause, and backed off, for every
    /// step when etcd did not answer, else for the step alone.
    fn failed(&mut self, e: &RegistryError, action: Option<&Action>) {
        if self.trouble.note(e) {
            self.hooks
                .notify(Notice::Status(&format!("etcd unreachable, retrying: {e}")));
        }
        if action == Some(&Action::KeepAlive) {
            for s in self.services.values() {
                if let Some(b) = &s.board {
                    b.etcd_error(true, &e.endpoint, e.to_string());
                }
            }
        } else if let Some(Action::Put(name) | Action::Withdraw(name)) = action {
            if let Some(b) = self.services.get(name).and_then(|s| s.board.as_ref()) {
                b.etcd_error(false, &e.endpoint, e.to_string());
            }
        }
        if let Some(Action::Withdraw(name)) = action {
            // The withdrawal may yet reach etcd, late: should the service
            // come back first, its keys are written again (none is known
            // now), so that this withdrawal, comparing the revision of the
            // registration it meant, deletes nothing.
            if let Some(s) = self.services.get_mut(name) {
                s.registered = false;
                s.partly = true;
                s.written.clear();
            }
        }
        if e.kind == ErrorKind::LeaseNotFound {
            // Which lease is gone, its keep-alive finds out, at once.
            match action {
                Some(Action::PutShared) => {
                    for sk in self.shared.values_mut() {
                        if sk.refresh_at.is_some() {
                            sk.refresh_at = Some(Instant::now());
                        }
                    }
                }
                Some(_) => {
                    if let Some(own) = self.lease.as_mut() {
                        own.refresh_at = Instant::now();
                    }
                }
                None => {}
            }
        }
        match action {
            // A lost lease is no reason to wait: its keep-alive, due now,
            // replaces it and the step runs again right after.
            Some(_) if e.kind == ErrorKind::LeaseNotFound => {}
            Some(a) if e.kind != ErrorKind::Unavailable => self.step(a).failed(),
            _ => self.global.failed(),
        }
    }

    fn step(&mut self, action: &Action) -> &mut Step {
        match action {
            Action::KeepAlive | Action::Grant => &mut self.own,
            Action::Retire => &mut self.retire_step,
            Action::PutShared => &mut self.shared_step,
            Action::Watch => &mut self.watch_step,
            Action::KeepShared(k) | Action::JoinShared(k) => match self.shared.get_mut(k) {
                Some(sk) => &mut sk.step,
                None => &mut self.shared_step,
            },
            Action::Withdraw(name) | Action::Put(name) => match self.services.get_mut(name) {
                Some(s) => &mut s.step,
                None => &mut self.retire_step,
            },
        }
    }

    /// `READY=1` once every service's state is settled; never waits for etcd.
    fn settle(&mut self) {
        if !self.ready && self.services.values().all(|s| *s.state.borrow() != State::Starting) {
            self.ready = true;
            self.hooks.notify(Notice::Ready);
        }
    }

    fn status_line(&self, one: impl FnOnce() -> String) {
        if self.hooks.notifier.is_none() {
            return;
        }
        let line = if self.services.len() == 1 {
            one()
        } else {
            let up = self.services.values().filter(|s| s.registered).count();
            format!("{up} of {} services registered", self.services.len())
        };
        self.hooks.notify(Notice::Status(&line));
    }

    /// The keys of every service went with the process lease. etcd may
    /// have lost every lease (its data wiped): the shared keys' service
    /// leases are checked at once, ahead of the new registrations, so no
    /// instance shows up without its shared keys.
    fn lost_lease(&mut self) {
        self.lease = None;
        for sk in self.shared.values_mut() {
            if sk.refresh_at.is_some() {
                sk.refresh_at = Some(Instant::now());
            }
        }
        for s in self.services.values_mut() {
            if s.registered || s.partly {
                s.takeover = false;
            }
            s.registered = false;
            s.partly = false;
            s.written.clear();
            if let Some(b) = &s.board {
                b.withdrawn();
                if s.spec.probe.is_none() {
                    b.state(State::Starting.as_str());
                }
            }
        }
        self.retired.clear();
        // A late write of ours under the lost lease cannot land.
        if !self.gone.is_empty() {
            self.gone.clear();
            self.watch_due = true;
        }
    }

    async fn act(&mut self, action: &Action) -> Result<(), RegistryError> {
        let ttl = self.settings.ttl;
        match action {
            Action::Grant => {
                let g = self.reg.grant(ttl, None).await?;
                debug!(lease = %g.id, ttl = g.ttl.as_secs(), "lease granted");
                self.lease = Some(Own {
                    id: g.id,
                    refresh_at: Instant::now() + g.ttl / 3,
                    ttl: g.ttl,
                });
            }
            Action::KeepAlive => {
                let own = self.lease.as_ref().expect("keep-alive needs a lease");
                let id = own.id;
                match self.reg.keep_alive(id).await? {
                    Some(t) => {
                        if let Some(own) = self.lease.as_mut() {
                            own.refresh_at = Instant::now() + t / 3;
                            own.ttl = t;
                        }
                        for s in self.services.values().filter(|s| s.registered) {
                            if let Some(b) = &s.board {
                                b.kept_alive();
                            }
                        }
                    }
                    None => {
                        warn!(lease = %id, "lease expired or was lost in etcd; registering every healthy service again");
                        self.lost_lease();
                        self.status_line(|| "lease lost in etcd, registering again".to_string());
                    }
                }
            }
            Action::Withdraw(name) => {
                let id = self.lease.as_ref().expect("withdraw needs a lease").id;
                let s = self.services.get(name).expect("a running service");
                match self.settings.policy {
                    Policy::Revoke => {
                        self.reg.revoke(id).await?;
                        info!(service = %name, lease = %id, "withdrawn: lease revoked");
                        self.lease = None;
                    }
                    Policy::PerKey => {
                        let (n, revision) = ops::withdraw_keys(&mut self.reg, id, &s.written_keys()).await?;
                        info!(service = %name, deleted = n, "withdrawn");
                        let s = self.services.get_mut(name).expect("a running service");
                        s.withdrawn_at = revision;
                    }
                }
                let s = self.services.get_mut(name).expect("a running service");
                s.registered = false;
                s.partly = false;
                s.written.clear();
                if let Some(b) = &s.board {
                    b.withdrawn();
                }
                self.status_line(|| format!("withdrawn, lease {id} revoked"));
            }
            Action::Retire => {
                let id = self.lease.as_ref().expect("retire needs a lease").id;
                let keys = self.retired.clone();
                let (_, revision) = ops::withdraw_keys(&mut self.reg, id, &keys).await?;
                for (k, _) in &keys {
                    if let Some(w) = self.gone.get_mut(k) {
                        *w = revision;
                    }
                }
                let names: Vec<&str> = keys.iter().map(|(k, _)| k.as_str()).collect();
                info!(keys = %names.join(","), "withdrawn after the reload");
                self.retired.retain(|k| !keys.contains(k));
                self.status_line(String::new);
            }
            Action::JoinShared(k) => {
                let sk = self.shared.get(k).expect("a wanted shared key");
                let lease = sk.lease;
                let ttl = match self.reg.grant(ttl, Some(lease)).await {
                    Ok(g) => {
                        debug!(key = %k, lease = %lease, "service lease granted");
                        Some(g.ttl)
                    }
                    // Another instance holds it: join it.
                    Err(e) if e.kind == ErrorKind::LeaseExists => {
                        let t = self.reg.keep_alive(lease).await?;
                        debug!(key = %k, lease = %lease, "service lease joined");
                        t
                    }
                    Err(e) => return Err(e.writing([k.as_str()])),
                };
                // Gone between the grant and the keep-alive: try again.
                if let (Some(t), Some(sk)) = (ttl, self.shared.get_mut(k)) {
                    sk.refresh_at = Some(Instant::now() + t / 3);
                    self.shared_due = true;
                }
            }
            Action::KeepShared(k) => {
                let lease = self.shared.get(k).expect("a wanted shared key").lease;
                let t = self.reg.keep_alive(lease).await?;
                let sk = self.shared.get_mut(k).expect("a wanted shared key");
                match t {
                    Some(t) => sk.refresh_at = Some(Instant::now() + t / 3),
                    None => {
                        info!(key = %k, lease = %lease, "the shared key's service lease expired; granting it again");
                        sk.refresh_at = None;
                        self.shared_due = true;
                    }
                }
            }
            Action::PutShared => {
                let keys: Vec<(String, String, LeaseId)> = self
                    .shared
                    .iter()
                    .filter(|(_, sk)| sk.refresh_at.is_some())
                    .map(|(k, sk)| (k.clone(), sk.value.clone(), sk.lease))
                    .collect();
                let (present, _) = ops::put_shared(&mut self.reg, &keys).await?;
                let shared = &self.shared;
                self.notes.found(&present, |k| shared.get(k).map(|sk| sk.value.clone()));
                if keys.iter().any(|(k, _, _)| self.watching.binary_search(k).is_err()) {
                    self.watch_due = true;
                }
                self.shared_due = false;
            }
            Action::Watch => {
                let keys = self.watch_set();
                let (present, revision) = ops::read_keys(&mut self.reg, &keys).await?;
                let ranges: Vec<Range> = keys.iter().map(|k| Range::Key(k.clone())).collect();
                self.reg.watch(&ranges, revision + 1, false).await?;
                let mut present = present.iter().peekable();
                for k in &keys {
                    let kv = present.next_if(|kv| &kv.key == k);
                    self.seen(k, kv, revision);
                }
                self.watching = keys;
                self.watch_due = false;
            }
            Action::Put(name) => {
                let id = self.lease.as_ref().expect("put needs a lease").id;
                let own_ttl = self.lease.as_ref().map_or(ttl, |l| l.ttl);
                let s = self.services.get_mut(name).expect("a running service");
                // Whatever the answer, some keys may now be in etcd.
                s.partly = true;
                let done = ops::put_keys(&mut self.reg, id, &s.spec.keys, &s.written, s.takeover).await?;
                let endpoint = self.reg.endpoint().to_string();
                let s = self.services.get_mut(name).expect("a running service");
                s.held.update(name, &s.spec.keys, &done.held);
                s.written.extend(done.ours);
                if done.held.is_empty() {
                    s.registered = true;
                    s.takeover = false;
                    let keys = s.keys().join(",");
                    info!(service = %name, lease = %id, keys = %keys, endpoint = %endpoint, "registered");
                    if let Some(b) = &s.board {
                        b.registered(id, own_ttl, &endpoint);
                        if s.spec.probe.is_none() {
                            b.state(State::Up.as_str());
                        }
                    }
                    self.status_line(|| format!("registered {keys}, lease {id}"));
                } else {
                    // Try the held keys again each interval.
                    s.put_at = Instant::now() + s.spec.timing.interval;
                }
            }
        }
        Ok(())
    }
}

fn keys_of(spec: &Service) -> Vec<String> {
    spec.keys.iter().map(|(k, _)| k.clone()).collect()
}

#[cfg(test)]
mod random;
#[cfg(test)]
mod tests;
