//! The sidekick loop: probe → health → registry, and the shutdown order.
//!
//! Two loops run side by side in one task. The probe loop checks the
//! instance every interval and publishes the health state; it never waits on
//! etcd, so probing keeps its rhythm while etcd is slow or gone. The
//! registrar follows that state: it grants a lease and puts the keys when the
//! instance is up, keeps the lease alive every TTL/3 without rewriting a key,
//! revokes the lease when the instance goes down, and retries every etcd
//! failure with capped, jittered backoff. An etcd failure never changes what
//! the registrar wants, so an etcd blip never withdraws the keys.

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::Timing;
use crate::health::{Health, State};
use crate::hooks::Hooks;
use crate::probe::{Outcome, Probe};
use crate::registry::{HeldElsewhere, LeaseId, Registry, RegistryError, SharedPresent};

/// Something that can check the instance once.
#[allow(async_fn_in_trait)]
pub trait Check {
    /// One probe, bounded in time.
    async fn check(&self) -> Outcome;
}

impl Check for Probe {
    async fn check(&self) -> Outcome {
        Probe::check(self).await
    }
}

/// What one sidekick keeps, and how.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The keys and values, all under one lease.
    pub keys: Vec<(String, String)>,
    /// Service-level keys every instance declares: put under the lease only
    /// where absent, watched, and put again when deleted.
    pub shared: Vec<(String, String)>,
    /// Probe and lease timing.
    pub timing: Timing,
    /// Bound on the final revoke (the dial timeout).
    pub stop_timeout: Duration,
}

/// Runs until `shutdown` is cancelled, then withdraws and drains.
///
/// Without a probe the instance counts as up from the start.
pub async fn run<P: Check, R: Registry>(plan: &Plan, probe: Option<P>, registry: R, shutdown: CancellationToken) {
    run_with(plan, probe, registry, shutdown, &Hooks::default()).await
}

/// [`run`], reporting to (and taking maintenance from) `hooks`.
pub async fn run_with<P: Check, R: Registry>(
    plan: &Plan,
    probe: Option<P>,
    registry: R,
    shutdown: CancellationToken,
    hooks: &Hooks,
) {
    let initial = if probe.is_some() { State::Starting } else { State::Up };
    let (tx, rx) = watch::channel(initial);
    let probing = async {
        match &probe {
            Some(p) => probe_loop(p, &plan.timing, &tx, hooks, &shutdown).await,
            None => shutdown.cancelled().await,
        }
    };
    let (_, was_registered) = tokio::join!(probing, registrar(plan, registry, rx, hooks, &shutdown));

    // Shutdown order: probing has stopped and the lease is revoked (or left
    // to expire if etcd did not answer in time); now give the load balancer
    // time to notice before the instance goes away.
    if was_registered && !plan.timing.drain.is_zero() {
        info!(drain = %humantime::format_duration(plan.timing.drain), "keys withdrawn; draining before exit");
        tokio::time::sleep(plan.timing.drain).await;
    }
}

/// A duration shortened by a random 0–10 %, so that many sidekicks started
/// together spread out, and the TTL rule (TTL > interval + timeout) holds.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(1.0 - fastrand::f64() * 0.1)
}

/// Where the probe loop publishes the state it settles on.
pub(crate) trait Publish {
    /// The state now; a repeat of the last one is no news.
    fn publish(&self, state: State);
}

impl Publish for watch::Sender<State> {
    fn publish(&self, state: State) {
        self.send_if_modified(|s| std::mem::replace(s, state) != state);
    }
}

/// Probes every interval and publishes the health state, until `shutdown`.
pub(crate) async fn probe_loop<P: Check>(
    probe: &P,
    timing: &Timing,
    tx: &impl Publish,
    hooks: &Hooks,
    shutdown: &CancellationToken,
) {
    let start = Instant::now();
    let mut health = Health::new(timing.rise, timing.fall, timing.grace);
    // Many probe loops in one process start at spread-out phases.
    let mut next = start + hooks.phase;
    let mut switch = hooks.maintenance_switch.clone();
    let mut ping = hooks.watchdog.map(|every| Instant::now() + every);
    let mut maintenance = false;
    loop {
        let probe_due = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = sleep_until(next) => true,
            _ = changed(&mut switch) => false,
            _ = sleep_until(ping.unwrap_or(next)), if ping.is_some() => {
                // From the loop itself, between probes: a wedged loop stops
                // the pings and systemd restarts it.
                hooks.watchdog();
                ping = hooks.watchdog.map(|every| Instant::now() + every);
                continue;
            }
        };
        let now = hooks.in_maintenance();
        if now != maintenance {
            maintenance = now;
            if maintenance {
                info!("entering maintenance: withdrawing the keys; probing goes on");
                hooks.state(State::Maintenance, "maintenance, withdrawn");
                tx.publish(State::Maintenance);
            } else {
                info!(
                    rise = timing.rise,
                    "leaving maintenance: registering again after rise successes"
                );
                health = Health::new(timing.rise, timing.fall, Duration::ZERO);
                hooks.state(State::Starting, "leaving maintenance, probing");
                tx.publish(State::Starting);
            }
        }
        if !probe_due {
            continue;
        }
        let began = Instant::now();
        next = began + jitter(timing.interval);
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => return,
            o = async {
                // Bounded: an agent's thousand services never probe all at once.
                let _permit = match &hooks.probe_permits {
                    Some(p) => p.acquire().await.ok(),
                    None => None,
                };
                probe.check().await
            } => o,
        };
        if maintenance {
            hooks.probed(&outcome, 0);
            debug!(probe = %outcome, "probe (in maintenance)");
            continue;
        }
        let was = health.state();
        let changed_to = health.observe(outcome.ok, began - start);
        hooks.probed(
            &outcome,
            if health.state() == State::Up {
                health.failures()
            } else {
                0
            },
        );
        match changed_to {
            Some(State::Up) => {
                info!(probe = %outcome, "instance is up");
                hooks.state(State::Up, &format!("instance healthy: {}", outcome.detail));
            }
            Some(State::Down) => {
                warn!(probe = %outcome, "instance is down");
                hooks.state(
                    State::Down,
                    &format!("instance unhealthy: {}, withdrawn", outcome.detail),
                );
            }
            Some(_) => {}
            None if !outcome.ok && was == State::Up && health.failures() > 0 => info!(
                probe = %outcome,
                "probe failed ({} of {} before withdrawal)",
                health.failures(),
                timing.fall
            ),
            None => debug!(probe = %outcome, state = health.state().as_str(), "probe"),
        }
        tx.publish(health.state());
    }
}

/// Waits for the maintenance switch to flip; never returns without one.
async fn changed(switch: &mut Option<watch::Receiver<bool>>) {
    match switch {
        Some(rx) => {
            if rx.changed().await.is_err() {
                *switch = None;
            }
        }
        None => std::future::pending().await,
    }
}

/// Exponential backoff with jitter, capped.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
    first: Duration,
    cap: Duration,
}

impl Backoff {
    pub(crate) fn new(cap: Duration) -> Self {
        let first = Duration::from_millis(100).min(cap);
        Backoff {
            next: first,
            first,
            cap,
        }
    }

    /// The wait before the next attempt: random in [next/2, next].
    pub(crate) fn fail(&mut self) -> Duration {
        let wait = self.next.mul_f64(0.5 + fastrand::f64() * 0.5);
        self.next = (self.next * 2).min(self.cap);
        wait
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.first;
    }
}

/// The registrar's view of its lease.
#[derive(Debug)]
struct Lease {
    id: LeaseId,
    /// Keys not yet in etcd under this lease (indices into the plan's keys).
    pending: Vec<usize>,
    /// When the next keep-alive is due.
    refresh_at: Instant,
    /// When pending keys may be put (again): keys held elsewhere are tried
    /// once an interval.
    put_at: Instant,
    /// The shared keys are to be put where absent (after the grant, or
    /// when one was deleted).
    shared_due: bool,
    /// The shared keys are watched for deletion.
    watching: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Grant,
    Shared,
    Put,
    KeepAlive,
    Revoke,
}

/// Follows the health state in etcd. Returns whether the keys were
/// registered when the stop came.
async fn registrar<R: Registry>(
    plan: &Plan,
    mut reg: R,
    mut state: watch::Receiver<State>,
    hooks: &Hooks,
    shutdown: &CancellationToken,
) -> bool {
    let mut lease: Option<Lease> = None;
    // The first registration of a run takes the keys over (they may be this
    // instance's leftovers); any later one leaves other writers' keys alone.
    let mut takeover = true;
    let mut backoff = Backoff::new(plan.timing.interval);
    let mut not_before = Instant::now();
    let mut trouble = Trouble::default();
    let mut held = Held::default();
    let mut shared = SharedNotes::default();

    loop {
        let want_up = *state.borrow_and_update() == State::Up;
        let next = match (&lease, want_up) {
            (None, true) => Some((Action::Grant, not_before)),
            // Shared keys first, so a template never sees this instance
            // without the service-level keys.
            // (A keep-alive that falls due goes first: a put that keeps
            // failing may mean the lease is gone, which only it finds out.)
            (Some(l), true) if l.shared_due && not_before <= l.refresh_at => Some((Action::Shared, not_before)),
            (Some(l), true) if !l.pending.is_empty() && l.put_at.max(not_before) <= l.refresh_at => {
                Some((Action::Put, l.put_at.max(not_before)))
            }
            (Some(l), true) => Some((Action::KeepAlive, l.refresh_at.max(not_before))),
            (Some(_), false) => Some((Action::Revoke, not_before)),
            (None, false) => None,
        };
        let watching = lease.as_ref().is_some_and(|l| l.watching);
        let action = tokio::select! {
            _ = shutdown.cancelled() => break,
            gone = reg.deleted(), if watching => {
                let l = lease.as_mut().expect("watching needs a lease");
                l.shared_due = true;
                match gone {
                    Ok(keys) => info!(keys = %keys.join(","), "shared key deleted; putting it again"),
                    Err(e) => {
                        // Deletions may have gone unseen: check every key.
                        l.watching = false;
                        let first = trouble.note(&e);
                        hooks.etcd_failed(false, &e.endpoint, &e.to_string(), first);
                        not_before = Instant::now() + backoff.fail();
                    }
                }
                continue;
            }
            changed = state.changed() => {
                if changed.is_err() {
                    // The probe loop has ended, which happens only on shutdown.
                    shutdown.cancelled().await;
                    break;
                }
                continue;
            }
            action = wait_for(next) => action,
        };

        // A signal cancels the call in flight: the stop below has a bound of
        // its own, so the exit comes within it (plus the drain) however long
        // etcd would have kept this call waiting.
        let result = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            result = apply(action, plan, &mut reg, &mut lease, (&mut held, &mut shared), hooks, takeover) => result,
        };
        match result {
            Ok(complete) => {
                if complete {
                    takeover = false;
                }
                if trouble.clear() {
                    info!(endpoint = %reg.endpoint(), "etcd answers again");
                }
                backoff.reset();
                not_before = Instant::now();
            }
            Err(e) => {
                let first = trouble.note(&e);
                hooks.etcd_failed(action == Action::KeepAlive, &e.endpoint, &e.to_string(), first);
                not_before = Instant::now() + backoff.fail();
            }
        }
    }

    hooks.stopping();

    let registered = lease.as_ref().is_some_and(|l| l.pending.len() < plan.keys.len());
    if let Some(l) = lease {
        stop_revoke(&mut reg, l.id, plan.stop_timeout).await;
    }
    registered
}

/// Carries out one registrar action; `Ok(true)` when it completed the
/// registration of every key.
async fn apply<R: Registry>(
    action: Action,
    plan: &Plan,
    reg: &mut R,
    lease: &mut Option<Lease>,
    (held, shared): (&mut Held, &mut SharedNotes),
    hooks: &Hooks,
    takeover: bool,
) -> Result<bool, RegistryError> {
    let ttl = plan.timing.ttl;
    let refresh_every = ttl / 3;
    match action {
        Action::Grant => {
            let id = reg.grant(ttl).await?;
            debug!(lease = %id, ttl = ttl.as_secs(), "lease granted");
            *lease = Some(Lease {
                id,
                pending: (0..plan.keys.len()).collect(),
                refresh_at: Instant::now() + refresh_every,
                put_at: Instant::now(),
                shared_due: !plan.shared.is_empty(),
                watching: false,
            });
            Ok(false)
        }
        Action::Shared => {
            let l = lease.as_mut().expect("shared keys need a lease");
            let (present, revision) = reg.put_shared(l.id, &plan.shared).await?;
            shared.found(&present, &plan.shared);
            if !l.watching {
                let keys: Vec<String> = plan.shared.iter().map(|(k, _)| k.clone()).collect();
                reg.watch_deleted(&keys, revision + 1).await?;
                l.watching = true;
            }
            l.shared_due = false;
            Ok(false)
        }
        Action::Put => {
            let l = lease.as_mut().expect("put needs a lease");
            let keys: Vec<(String, String)> = l.pending.iter().map(|&i| plan.keys[i].clone()).collect();
            let elsewhere = reg.put(l.id, &keys, takeover).await?;
            l.pending.retain(|&i| elsewhere.iter().any(|h| h.key == plan.keys[i].0));
            held.update(&keys, &elsewhere);
            if l.pending.is_empty() {
                let keys = key_list(&plan.keys);
                info!(lease = %l.id, keys = %keys, endpoint = %reg.endpoint(), "registered");
                hooks.registered(l.id, plan.timing.ttl, reg.endpoint(), &keys);
                return Ok(true);
            }
            // Try the held keys again each interval.
            l.put_at = Instant::now() + plan.timing.interval;
            Ok(false)
        }
        Action::KeepAlive => {
            let id = lease.as_ref().expect("keep-alive needs a lease").id;
            if reg.keep_alive(id).await? {
                if let Some(l) = lease.as_mut() {
                    l.refresh_at = Instant::now() + refresh_every;
                }
                hooks.kept_alive();
            } else {
                warn!(lease = %id, "lease expired or was lost in etcd; granting a new one");
                hooks.withdrawn("lease lost in etcd, registering again");
                reg.unwatch();
                *lease = None;
            }
            Ok(false)
        }
        Action::Revoke => {
            let id = lease.as_ref().expect("revoke needs a lease").id;
            // Our own shared keys go with the lease; the watch is no longer
            // ours to act on.
            reg.unwatch();
            if let Some(l) = lease.as_mut() {
                l.watching = false;
            }
            reg.revoke(id).await?;
            info!(lease = %id, "withdrawn: lease revoked");
            hooks.withdrawn(&format!("withdrawn, lease {id} revoked"));
            *lease = None;
            Ok(false)
        }
    }
}

/// Sleeps until the action is due; never returns when there is none.
pub(crate) async fn wait_for<A>(next: Option<(A, Instant)>) -> A {
    match next {
        Some((action, at)) => {
            sleep_until(at).await;
            action
        }
        None => std::future::pending().await,
    }
}

/// The etcd failures of one outage: each distinct cause is logged once as a
/// warning, whichever endpoint gave it, and repeats go to debug, so a
/// partitioned cluster tried over and over does not fill the journal.
#[derive(Debug, Default)]
pub(crate) struct Trouble {
    seen: Vec<(&'static str, String)>,
}

impl Trouble {
    /// Logs `e`; true when its cause is new in this outage.
    pub(crate) fn note(&mut self, e: &RegistryError) -> bool {
        let cause = (e.op, e.cause.replace(&e.endpoint, "ENDPOINT"));
        if self.seen.contains(&cause) {
            debug!(endpoint = %e.endpoint, "{e}; retrying");
            false
        } else {
            warn!(endpoint = %e.endpoint, "{e}; retrying");
            self.seen.push(cause);
            true
        }
    }

    /// Forgets the outage; true when there was one.
    pub(crate) fn clear(&mut self) -> bool {
        let was = !self.seen.is_empty();
        self.seen.clear();
        was
    }
}

/// What the shared keys were found holding: a value other than ours is
/// warned about once per value seen, then left alone.
#[derive(Debug, Default)]
struct SharedNotes {
    warned: Vec<(String, String)>,
}

impl SharedNotes {
    fn found(&mut self, present: &[SharedPresent], ours: &[(String, String)]) {
        for p in present {
            let Some((_, mine)) = ours.iter().find(|(k, _)| *k == p.key) else {
                continue;
            };
            let holder = p.holder.map_or("no lease".to_string(), |id| format!("lease {id}"));
            if p.value == *mine {
                debug!(key = %p.key, holder = %holder, "shared key present");
            } else if !self.warned.contains(&(p.key.clone(), p.value.clone())) {
                warn!(
                    key = %p.key,
                    theirs = %p.value,
                    ours = %mine,
                    holder = %holder,
                    "shared key holds another value; leaving it as it is"
                );
                self.warned.push((p.key.clone(), p.value.clone()));
            }
        }
    }
}

/// Keys another writer holds: warned about once, retried quietly, and a
/// line when each comes back to us.
#[derive(Debug, Default)]
struct Held {
    keys: Vec<String>,
}

impl Held {
    /// After a put of `tried`, of which `elsewhere` were left alone.
    fn update(&mut self, tried: &[(String, String)], elsewhere: &[HeldElsewhere]) {
        for h in elsewhere {
            if self.keys.contains(&h.key) {
                debug!(key = %h.key, "key is still held elsewhere");
            } else {
                let holder = h.holder.map_or("no lease".to_string(), |id| format!("lease {id}"));
                warn!(key = %h.key, holder = %holder, "key is held elsewhere; not overwriting it, will try again each interval");
                self.keys.push(h.key.clone());
            }
        }
        self.keys.retain(|k| {
            let resolved = tried.iter().any(|(t, _)| t == k) && !elsewhere.iter().any(|h| &h.key == k);
            if resolved {
                info!(key = %k, "key is free again and ours");
            }
            !resolved
        });
    }
}

/// The final revoke on shutdown: retried over the endpoints until `bound`.
pub(crate) async fn stop_revoke<R: Registry>(reg: &mut R, id: LeaseId, bound: Duration) {
    let deadline = Instant::now() + bound;
    let attempts = async {
        loop {
            match reg.revoke(id).await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() + Duration::from_millis(50) >= deadline => return Err(e),
                Err(e) => {
                    debug!(error = %e, "revoke on stop failed; trying again");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    };
    match tokio::time::timeout_at(deadline, attempts).await {
        Ok(Ok(())) => info!(lease = %id, "withdrawn: lease revoked on stop"),
        Ok(Err(e)) => warn!(lease = %id, "{e}; the keys expire with the lease"),
        Err(_) => warn!(lease = %id, "etcd did not answer the revoke in time; the keys expire with the lease"),
    }
}

fn key_list(keys: &[(String, String)]) -> String {
    keys.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    //! The loop's timing against the in-memory registry, under paused time:
    //! deterministic and fast. etcd's own behaviour is proven by the
    //! integration tests.

    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::registry::MemoryRegistry;

    const KEY: &str = "/services/web/1";

    /// A probe whose answer the test switches; counts its calls.
    #[derive(Clone, Default)]
    struct Switch {
        healthy: Arc<AtomicBool>,
        calls: Arc<AtomicU32>,
    }

    impl Switch {
        fn set(&self, ok: bool) {
            self.healthy.store(ok, Ordering::SeqCst);
        }
        fn calls(&self) -> u32 {
            self.calls.load(Ordering::SeqCst)
        }
    }

    impl Check for Switch {
        async fn check(&self) -> Outcome {
            self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(10)).await;
            let ok = self.healthy.load(Ordering::SeqCst);
            Outcome {
                ok,
                latency: Duration::from_millis(10),
                detail: if ok { "HTTP 200" } else { "HTTP 503" }.into(),
            }
        }
    }

    fn plan(interval_ms: u64, rise: u32, fall: u32, ttl_s: u64) -> Plan {
        Plan {
            keys: vec![(KEY.into(), "v".into()), ("/services/web/scheme".into(), "http".into())],
            shared: vec![],
            timing: Timing {
                interval: Duration::from_millis(interval_ms),
                rise,
                fall,
                ttl: Duration::from_secs(ttl_s),
                grace: Duration::ZERO,
                drain: Duration::ZERO,
            },
            stop_timeout: Duration::from_secs(1),
        }
    }

    /// Starts the loop in the background; returns the probe, the store and
    /// the token that stops it, and the task to await.
    fn start(p: Plan, healthy: bool) -> (Switch, MemoryRegistry, CancellationToken, tokio::task::JoinHandle<()>) {
        let probe = Switch::default();
        probe.set(healthy);
        let reg = MemoryRegistry::new();
        let token = CancellationToken::new();
        let task = tokio::spawn({
            let (probe, reg, token) = (probe.clone(), reg.clone(), token.clone());
            async move { run(&p, Some(probe), reg, token).await }
        });
        (probe, reg, token, task)
    }

    async fn at(secs: f64) {
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn registers_after_rise_successes_not_before() {
        let (_probe, reg, _token, _task) = start(plan(1000, 3, 2, 15), true);
        // Probes at 0, ~0.95, ~1.9: the third success is before 3s.
        at(1.5).await;
        assert_eq!(reg.get(KEY), None, "two successes are not enough");
        at(1.5).await;
        assert_eq!(reg.get(KEY).map(|(v, _)| v), Some("v".into()));
        assert_eq!(reg.get("/services/web/scheme").map(|(v, _)| v), Some("http".into()));
    }

    #[tokio::test(start_paused = true)]
    async fn steady_state_only_keeps_alive_every_third_of_the_ttl() {
        let (probe, reg, _token, _task) = start(plan(1000, 1, 1, 9), true);
        at(0.5).await;
        let revisions = reg.revisions();
        assert_eq!(revisions, 2, "two keys put once");
        at(60.0).await;
        assert_eq!(reg.revisions(), revisions, "heartbeats never rewrite keys");
        assert_eq!((reg.calls("grant"), reg.calls("put")), (1, 1));
        // One keep-alive every 3s for 60s.
        let ka = reg.calls("keep_alive");
        assert!((19..=21).contains(&ka), "{ka} keep-alives");
        // ~60/0.95 probes: the interval holds independently of the lease.
        assert!((60..=68).contains(&probe.calls()), "{} probes", probe.calls());
    }

    #[tokio::test(start_paused = true)]
    async fn fall_failures_revoke_and_nothing_is_sent_while_down() {
        let (probe, reg, _token, _task) = start(plan(1000, 1, 2, 15), true);
        at(0.5).await;
        assert!(reg.get(KEY).is_some());
        probe.set(false);
        at(1.0).await;
        assert!(reg.get(KEY).is_some(), "one failure is not two");
        at(1.0).await;
        assert_eq!(reg.get(KEY), None, "revoked after the second failure");
        let calls: u64 = ["grant", "put", "keep_alive", "revoke"]
            .iter()
            .map(|op| reg.calls(op))
            .sum();
        at(30.0).await;
        let later: u64 = ["grant", "put", "keep_alive", "revoke"]
            .iter()
            .map(|op| reg.calls(op))
            .sum();
        assert_eq!(later, calls, "no etcd traffic while the instance is down");
        probe.set(true);
        at(1.0).await;
        assert!(reg.get(KEY).is_some(), "back after recovery");
    }

    #[tokio::test(start_paused = true)]
    async fn etcd_outage_backs_off_up_to_the_interval_and_probing_goes_on() {
        let (probe, reg, _token, _task) = start(plan(2000, 1, 1, 15), true);
        reg.set_unreachable(true);
        at(20.0).await;
        assert_eq!(reg.get(KEY), None);
        let grants = reg.calls("grant");
        // 100ms doubling to the 2s cap, jittered down to half: at least
        // 20s / 2s = 10 attempts, and at most what the first steps allow.
        assert!((10..=30).contains(&grants), "{grants} attempts in 20s");
        let probes = probe.calls();
        // One probe every 1.8-2s.
        assert!(
            (10..=12).contains(&probes),
            "{probes} probes in 20s: probing never waits on etcd"
        );
        reg.set_unreachable(false);
        at(2.1).await;
        assert!(
            reg.get(KEY).is_some(),
            "registered within one interval of etcd's return"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_lease_is_replaced_and_the_keys_put_again() {
        let (_probe, reg, _token, _task) = start(plan(1000, 1, 1, 6), true);
        at(0.5).await;
        let (_, first) = reg.get(KEY).unwrap();
        reg.wipe();
        // The next keep-alive (≤ 2s away) finds the lease gone.
        at(2.5).await;
        let (_, second) = reg.get(KEY).expect("put again");
        assert_ne!(first, second, "under a new lease");
        assert_eq!(reg.calls("grant"), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_longer_than_the_ttl_ends_in_a_new_lease() {
        let (_probe, reg, _token, _task) = start(plan(1000, 1, 1, 3), true);
        at(0.5).await;
        let (_, first) = reg.get(KEY).unwrap();
        reg.set_unreachable(true);
        at(10.0).await;
        assert_eq!(reg.get(KEY), None, "expired with the lease");
        reg.set_unreachable(false);
        at(1.5).await;
        let (_, second) = reg.get(KEY).expect("registered again");
        assert_ne!(first, second);
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_held_elsewhere_is_not_overwritten_on_re_registration() {
        let (probe, reg, _token, _task) = start(plan(1000, 1, 1, 15), true);
        at(0.5).await;
        probe.set(false);
        at(1.0).await;
        assert_eq!(reg.get(KEY), None);
        reg.put_foreign(KEY, "theirs", 0);
        probe.set(true);
        at(5.0).await;
        assert_eq!(reg.get(KEY).map(|(v, _)| v), Some("theirs".into()));
        assert!(reg.get("/services/web/scheme").is_some(), "the free keys are put");
        // One put at registration, one after recovery, then one a second.
        let puts = reg.calls("put");
        assert!((6..=8).contains(&puts), "tried again once each interval: {puts}");
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_revokes_then_drains() {
        let mut p = plan(1000, 1, 1, 15);
        p.timing.drain = Duration::from_secs(5);
        let (_probe, reg, token, task) = start(p, true);
        at(0.5).await;
        assert!(reg.get(KEY).is_some());
        token.cancel();
        at(0.01).await;
        assert_eq!(reg.get(KEY), None, "revoked at once");
        assert!(!task.is_finished(), "draining");
        at(5.0).await;
        assert!(task.is_finished());
    }

    #[tokio::test(start_paused = true)]
    async fn no_probe_means_registered_at_once() {
        let reg = MemoryRegistry::new();
        let token = CancellationToken::new();
        let p = plan(1000, 2, 2, 15);
        let task = tokio::spawn({
            let (reg, token) = (reg.clone(), token.clone());
            async move { run::<Switch, _>(&p, None, reg, token).await }
        });
        at(0.01).await;
        assert!(reg.get(KEY).is_some());
        token.cancel();
        task.await.unwrap();
        assert_eq!(reg.get(KEY), None);
    }

    const SHARED: &str = "/services/web/host_port";

    fn with_shared(mut p: Plan, key: &str) -> Plan {
        p.keys = vec![(key.into(), "v".into())];
        p.shared = vec![(SHARED.into(), "8080".into())];
        p
    }

    /// Starts a second sidekick on the same store.
    fn start_on(reg: &MemoryRegistry, p: Plan) -> (Switch, CancellationToken) {
        let probe = Switch::default();
        probe.set(true);
        let token = CancellationToken::new();
        tokio::spawn({
            let (probe, reg, token) = (probe.clone(), reg.clone(), token.clone());
            async move { run(&p, Some(probe), reg, token).await }
        });
        (probe, token)
    }

    #[tokio::test(start_paused = true)]
    async fn a_shared_key_is_put_where_absent_and_put_again_by_another_instance_when_deleted() {
        let (probe_a, reg, _token, _task) = start(with_shared(plan(1000, 1, 1, 15), "/services/web/hosts/a"), true);
        at(0.5).await;
        let (_, lease_a) = reg.get(SHARED).expect("put by the first instance");
        let (probe_b, _token_b) = start_on(&reg, with_shared(plan(1000, 1, 1, 15), "/services/web/hosts/b"));
        at(0.5).await;
        let (_, lease_b) = reg.get("/services/web/hosts/b").expect("second instance registered");
        assert_eq!(reg.get(SHARED).map(|(_, l)| l), Some(lease_a), "never taken over");
        let revisions = reg.revisions();
        at(30.0).await;
        assert_eq!(reg.revisions(), revisions, "zero revisions while steady");

        // The holder goes down: its lease takes the shared key, and the
        // other instance puts it back at once under its own lease.
        probe_a.set(false);
        at(1.0).await;
        assert_eq!(reg.get("/services/web/hosts/a"), None);
        assert_eq!(reg.get(SHARED), Some(("8080".into(), lease_b)));

        // Deleted by hand while an instance is registered: back again.
        reg.delete(SHARED);
        at(0.01).await;
        assert_eq!(reg.get(SHARED), Some(("8080".into(), lease_b)));

        // The last one goes: so does the shared key.
        probe_b.set(false);
        at(1.0).await;
        assert_eq!(reg.get(SHARED), None);
    }

    // Regression: after etcd lost its data, the put of the shared keys failed
    // for ever with "lease not found", ahead of the keep-alive that would
    // have found the lease gone.
    #[tokio::test(start_paused = true)]
    async fn a_lost_lease_with_shared_keys_is_replaced() {
        let (_probe, reg, _token, _task) = start(with_shared(plan(1000, 1, 1, 6), KEY), true);
        at(0.5).await;
        assert!(reg.get(SHARED).is_some());
        // The wipe breaks the watch, so the shared keys are due again while
        // the lease is already gone.
        reg.wipe();
        at(5.0).await;
        let (_, lease) = reg.get(KEY).expect("registered again");
        assert_eq!(reg.get(SHARED).map(|(_, l)| l), Some(lease), "under the new lease");
        assert_eq!(reg.calls("grant"), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_foreign_or_permanent_shared_value_is_never_overwritten() {
        let reg = MemoryRegistry::new();
        reg.put_foreign(SHARED, "9090", 0);
        let (_probe, _token) = start_on(&reg, with_shared(plan(1000, 1, 1, 15), "/services/web/hosts/a"));
        at(0.5).await;
        assert!(reg.get("/services/web/hosts/a").is_some(), "registers all the same");
        assert_eq!(reg.get(SHARED), Some(("9090".into(), None)));
        at(10.0).await;
        assert_eq!(reg.get(SHARED), Some(("9090".into(), None)));
        assert_eq!(reg.calls("put_shared"), 1, "checked once, not every interval");
    }

    /// Records every notification.
    #[derive(Clone, Default)]
    struct Recorder(Arc<std::sync::Mutex<Vec<String>>>);

    impl crate::notify::Notifier for Recorder {
        fn send(&self, notice: crate::notify::Notice<'_>) {
            self.0.lock().unwrap().push(format!("{notice:?}"));
        }
    }

    impl Recorder {
        fn count(&self, what: &str) -> usize {
            self.0.lock().unwrap().iter().filter(|m| m.starts_with(what)).count()
        }
    }

    /// A probe that passes `healthy_for` times, then never answers: a loop
    /// wedged in a probe.
    struct Wedges(AtomicU32);

    impl Check for Wedges {
        async fn check(&self) -> Outcome {
            if self.0.fetch_sub(1, Ordering::SeqCst) == 0 {
                std::future::pending::<()>().await;
            }
            Outcome {
                ok: true,
                latency: Duration::ZERO,
                detail: "HTTP 200".into(),
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn watchdog_pings_come_from_the_probe_loop_and_stop_when_it_wedges() {
        let rec = Recorder::default();
        let mut hooks = Hooks::default();
        hooks.notifier = Some(Box::new(rec.clone()));
        hooks.watchdog = Some(Duration::from_millis(300));
        let reg = MemoryRegistry::new();
        let token = CancellationToken::new();
        let p = plan(1000, 1, 1, 15);
        // Five probes pass (0 to ~4 s), the sixth hangs.
        let probe = Wedges(AtomicU32::new(5));
        let task = tokio::spawn({
            let (reg, token) = (reg.clone(), token.clone());
            async move { run_with(&p, Some(probe), reg, token, &hooks).await }
        });
        at(3.5).await;
        let pings = rec.count("Watchdog");
        assert!((9..=12).contains(&pings), "{pings} pings in 3.5 s");
        assert_eq!(rec.count("Ready"), 1, "ready once registered");
        // The sixth probe starts by 5 s at the latest and hangs.
        at(2.0).await;
        let wedged = rec.count("Watchdog");
        at(15.0).await;
        assert_eq!(
            rec.count("Watchdog"),
            wedged,
            "pings stop once the loop wedges (after {pings})"
        );
        token.cancel();
        task.await.unwrap();
        assert_eq!(rec.count("Stopping"), 1);
    }

    #[test]
    fn jitter_stays_within_ten_percent_below() {
        let d = Duration::from_secs(10);
        for _ in 0..1000 {
            let j = jitter(d);
            assert!(j <= d && j >= Duration::from_secs(9), "{j:?}");
        }
    }

    #[test]
    fn backoff_doubles_to_the_cap() {
        let mut b = Backoff::new(Duration::from_secs(1));
        let waits: Vec<Duration> = (0..8).map(|_| b.fail()).collect();
        for (i, w) in waits.iter().enumerate() {
            let step = Duration::from_millis(100 * (1 << i.min(10))).min(Duration::from_secs(1));
            assert!(*w >= step / 2 && *w <= step, "attempt {i}: {w:?} vs {step:?}");
        }
        b.reset();
        assert!(b.fail() <= Duration::from_millis(100));
    }
}
