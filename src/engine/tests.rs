//! The engine's rhythm against the model of etcd, under paused time:
//! deterministic and fast. etcd's own behaviour is proven by the
//! integration tests; the model's fidelity by `tests/it/model.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;

use super::*;
use crate::config::ProbeTarget;
use crate::notify::Notifier;
use crate::probe::Outcome;
use crate::registry::memory::Model;

const KEY: &str = "/services/web/1";

/// A probe whose answer the test switches; counts its calls.
#[derive(Clone, Default)]
pub(super) struct Switch {
    healthy: Arc<AtomicBool>,
    calls: Arc<AtomicU32>,
    /// While set, the probe never answers (a wedged loop).
    wedged: Arc<AtomicBool>,
}

impl Switch {
    pub(super) fn new(healthy: bool) -> Self {
        let s = Switch::default();
        s.set(healthy);
        s
    }
    pub(super) fn set(&self, ok: bool) {
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
        if self.wedged.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        let ok = self.healthy.load(Ordering::SeqCst);
        Outcome {
            ok,
            latency: Duration::from_millis(10),
            detail: if ok { "HTTP 200" } else { "HTTP 503" }.into(),
        }
    }
}

pub(super) fn probe_spec() -> Option<ProbeSpec> {
    Some(ProbeSpec {
        target: ProbeTarget::Tcp {
            host: "model".into(),
            port: 1,
        },
        timeout: Duration::from_millis(100),
    })
}

pub(super) fn timing(interval_ms: u64, rise: u32, fall: u32, ttl_s: u64) -> Timing {
    Timing {
        interval: Duration::from_millis(interval_ms),
        rise,
        fall,
        ttl: Duration::from_secs(ttl_s),
        grace: Duration::ZERO,
        drain: Duration::ZERO,
    }
}

pub(super) fn service(name: &str, keys: &[(&str, &str)], shared: &[(&str, &str)], t: Timing) -> Service {
    let pairs = |l: &[(&str, &str)]| l.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    Service {
        name: name.into(),
        file: PathBuf::from("test.toml"),
        keys: pairs(keys),
        shared: pairs(shared),
        probe: probe_spec(),
        timing: t,
    }
}

/// Probes by service name, switched by the test.
#[derive(Clone, Default)]
pub(super) struct Probes(Arc<Mutex<HashMap<String, Switch>>>);

impl Probes {
    pub(super) fn get(&self, name: &str) -> Switch {
        self.0
            .lock()
            .unwrap()
            .entry(name.to_string())
            .or_insert_with(|| Switch::new(true))
            .clone()
    }
}

/// The configuration a test reloads, and the signal that reloads it.
pub(super) type Reloader = (watch::Sender<u64>, Arc<Mutex<Vec<Service>>>);

/// A running engine: its probes, its store, and the token that stops it.
pub(super) struct Harness {
    pub(super) probes: Probes,
    pub(super) token: CancellationToken,
    pub(super) task: tokio::task::JoinHandle<bool>,
    pub(super) reload: Option<Reloader>,
}

pub(super) fn start_engine(reg: &Model, policy: Policy, ttl_s: u64, services: Vec<Service>, hooks: Hooks) -> Harness {
    let probes = Probes::default();
    let token = CancellationToken::new();
    let config = Arc::new(Mutex::new(services.clone()));
    let (tx, rx) = watch::channel(0);
    let task = tokio::spawn({
        let (probes, reg, token, config) = (probes.clone(), reg.clone(), token.clone(), config.clone());
        async move {
            let settings = Settings {
                ttl: Duration::from_secs(ttl_s),
                stop_timeout: Duration::from_secs(1),
                policy,
            };
            let build = move |s: &Service| Ok(s.probe.as_ref().map(|_| probes.get(&s.name)));
            let reload = Reload {
                signal: rx,
                load: Box::new(move || Ok(config.lock().unwrap().clone())),
            };
            run(&settings, services, &build, reg, &hooks, token, Some(reload)).await
        }
    });
    Harness {
        probes,
        token,
        task,
        reload: Some((tx, config)),
    }
}

impl Harness {
    /// Reloads with `services`.
    pub(super) fn reload(&self, services: Vec<Service>) {
        let (tx, config) = self.reload.as_ref().unwrap();
        *config.lock().unwrap() = services;
        tx.send_modify(|n| *n += 1);
    }
}

/// `run`: one service, revoked on failure.
fn start(t: Timing, healthy: bool) -> (Switch, Model, Harness) {
    let reg = Model::new();
    let ttl = t.ttl.as_secs();
    let h = start_engine(
        &reg,
        Policy::Revoke,
        ttl,
        vec![service(KEY, &[(KEY, "v"), ("/services/web/scheme", "http")], &[], t)],
        Hooks::default(),
    );
    let probe = h.probes.get(KEY);
    probe.set(healthy);
    (probe, reg, h)
}

async fn at(secs: f64) {
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
}

fn value(reg: &Model, key: &str) -> Option<String> {
    reg.get(key).map(|kv| kv.value)
}

fn lease_of(reg: &Model, key: &str) -> Option<i64> {
    reg.get(key).map(|kv| kv.lease)
}

#[tokio::test(start_paused = true)]
async fn registers_after_rise_successes_not_before() {
    let (_probe, reg, _h) = start(timing(1000, 3, 2, 15), true);
    // Probes at 0, ~0.95, ~1.9: the third success is before 3s.
    at(1.5).await;
    assert_eq!(reg.get(KEY), None, "two successes are not enough");
    at(1.5).await;
    assert_eq!(value(&reg, KEY).as_deref(), Some("v"));
    assert_eq!(value(&reg, "/services/web/scheme").as_deref(), Some("http"));
    assert_eq!(
        reg.get(KEY).unwrap().mod_revision,
        reg.get("/services/web/scheme").unwrap().mod_revision,
        "the keys appear in one revision"
    );
}

#[tokio::test(start_paused = true)]
async fn steady_state_only_keeps_alive_every_third_of_the_ttl() {
    let (probe, reg, _h) = start(timing(1000, 1, 1, 9), true);
    at(0.5).await;
    let revision = reg.revision();
    assert_eq!(revision, 2, "both keys put in one transaction");
    at(60.0).await;
    assert_eq!(reg.revision(), revision, "heartbeats never rewrite keys");
    assert_eq!((reg.calls("grant"), reg.calls("txn")), (1, 1));
    let ka = reg.calls("keep_alive");
    assert!((19..=21).contains(&ka), "{ka} keep-alives");
    // ~60/0.95 probes: the interval holds independently of the lease.
    assert!((60..=68).contains(&probe.calls()), "{} probes", probe.calls());
}

#[tokio::test(start_paused = true)]
async fn fall_failures_revoke_and_nothing_is_sent_while_down() {
    let (probe, reg, _h) = start(timing(1000, 1, 2, 15), true);
    at(0.5).await;
    assert!(reg.get(KEY).is_some());
    probe.set(false);
    at(1.0).await;
    assert!(reg.get(KEY).is_some(), "one failure is not two");
    at(1.0).await;
    assert_eq!(reg.get(KEY), None, "revoked after the second failure");
    assert!(reg.leases().is_empty(), "the lease is gone");
    let calls = |reg: &Model| -> u64 {
        ["grant", "txn", "keep_alive", "revoke"]
            .iter()
            .map(|op| reg.calls(op))
            .sum()
    };
    let before = calls(&reg);
    at(30.0).await;
    assert_eq!(calls(&reg), before, "no etcd traffic while the instance is down");
    probe.set(true);
    at(1.0).await;
    assert!(reg.get(KEY).is_some(), "back after recovery");
}

#[tokio::test(start_paused = true)]
async fn etcd_outage_backs_off_up_to_the_interval_and_probing_goes_on() {
    let (probe, reg, _h) = start(timing(2000, 1, 1, 15), true);
    reg.set_unreachable(true);
    at(20.0).await;
    assert_eq!(reg.get(KEY), None);
    let grants = reg.calls("grant");
    // 100ms doubling to the 2s cap, jittered down to half: at least
    // 20s / 2s = 10 attempts, and at most what the first steps allow.
    assert!((10..=30).contains(&grants), "{grants} attempts in 20s");
    let probes = probe.calls();
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
    let (_probe, reg, _h) = start(timing(1000, 1, 1, 6), true);
    at(0.5).await;
    let first = lease_of(&reg, KEY).unwrap();
    reg.wipe();
    // The next keep-alive (≤ 2s away) finds the lease gone.
    at(2.5).await;
    let second = lease_of(&reg, KEY).expect("put again");
    assert_ne!(first, second, "under a new lease");
    assert_eq!(reg.calls("grant"), 2);
}

#[tokio::test(start_paused = true)]
async fn an_outage_longer_than_the_ttl_ends_in_a_new_lease() {
    let (_probe, reg, _h) = start(timing(1000, 1, 1, 3), true);
    at(0.5).await;
    let first = lease_of(&reg, KEY).unwrap();
    reg.set_unreachable(true);
    at(10.0).await;
    assert_eq!(reg.get(KEY), None, "expired with the lease");
    reg.set_unreachable(false);
    at(1.5).await;
    let second = lease_of(&reg, KEY).expect("registered again");
    assert_ne!(first, second);
}

#[tokio::test(start_paused = true)]
async fn a_key_held_elsewhere_is_not_overwritten_on_re_registration() {
    let (probe, reg, _h) = start(timing(1000, 1, 1, 15), true);
    at(0.5).await;
    probe.set(false);
    at(1.0).await;
    assert_eq!(reg.get(KEY), None);
    reg.put_foreign(KEY, "theirs", 0);
    probe.set(true);
    at(5.0).await;
    assert_eq!(value(&reg, KEY).as_deref(), Some("theirs"));
    assert!(reg.get("/services/web/scheme").is_some(), "the free keys are put");
    // One put at registration, one after recovery, then one a second.
    let puts = reg.calls("txn");
    assert!((6..=8).contains(&puts), "tried again once each interval: {puts}");
}

#[tokio::test(start_paused = true)]
async fn shutdown_revokes_then_drains() {
    let reg = Model::new();
    let mut t = timing(1000, 1, 1, 15);
    t.drain = Duration::from_secs(5);
    let token = CancellationToken::new();
    let task = tokio::spawn({
        let (reg, token) = (reg.clone(), token.clone());
        let s = service(KEY, &[(KEY, "v")], &[], t);
        async move {
            let settings = Settings {
                ttl: Duration::from_secs(15),
                stop_timeout: Duration::from_secs(1),
                policy: Policy::Revoke,
            };
            let build = |_: &Service| Ok(Some(Switch::new(true)));
            crate::run::run(s, &settings, &build, reg, &Hooks::default(), token).await
        }
    });
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
    let reg = Model::new();
    let mut s = service(KEY, &[(KEY, "v")], &[], timing(1000, 2, 2, 15));
    s.probe = None;
    let h = start_engine(&reg, Policy::Revoke, 15, vec![s], Hooks::default());
    at(0.01).await;
    assert!(reg.get(KEY).is_some());
    h.token.cancel();
    h.task.await.unwrap();
    assert_eq!(reg.get(KEY), None);
}

const SHARED: &str = "/services/web/host_port";

fn instance(name: &str, t: Timing) -> Service {
    service(name, &[(name, "v")], &[(SHARED, "8080")], t)
}

/// A `run` of one instance declaring the shared key, TTL `ttl_s`.
fn start_instance(reg: &Model, name: &str, ttl_s: u64) -> Harness {
    start_engine(
        reg,
        Policy::Revoke,
        ttl_s,
        vec![instance(name, timing(1000, 1, 1, ttl_s))],
        Hooks::default(),
    )
}

#[tokio::test(start_paused = true)]
async fn a_shared_key_is_held_jointly_and_outlives_a_leaving_instance_without_a_write() {
    let reg = Model::new();
    let service_lease = shared::lease_id(SHARED, "8080").0;
    let a = start_instance(&reg, "/services/web/hosts/a", 15);
    at(0.5).await;
    assert_eq!(lease_of(&reg, SHARED), Some(service_lease), "under the service lease");
    let b = start_instance(&reg, "/services/web/hosts/b", 15);
    at(0.5).await;
    assert!(reg.get("/services/web/hosts/b").is_some());
    let created = reg.get(SHARED).unwrap().mod_revision;
    let revision = reg.revision();
    at(30.0).await;
    assert_eq!(reg.revision(), revision, "zero revisions while steady");

    // The first instance goes down: nothing happens to the shared key.
    a.probes.get("/services/web/hosts/a").set(false);
    at(1.0).await;
    assert_eq!(reg.get("/services/web/hosts/a"), None);
    assert_eq!(reg.get(SHARED).unwrap().mod_revision, created, "not written");
    // It is killed outright: still nothing.
    a.task.abort();
    at(20.0).await;
    assert_eq!(
        reg.get(SHARED).unwrap().mod_revision,
        created,
        "kept alive by the other"
    );

    // Deleted by hand while an instance is registered: back at once.
    reg.delete(SHARED);
    at(0.01).await;
    assert_eq!(lease_of(&reg, SHARED), Some(service_lease));

    // The last one goes: the key expires with the service lease.
    b.probes.get("/services/web/hosts/b").set(false);
    at(1.0).await;
    assert!(reg.get(SHARED).is_some(), "never revoked");
    at(15.0).await;
    assert_eq!(reg.get(SHARED), None, "gone within the TTL");
}

// Regression: after etcd lost its data, the put of the shared keys failed
// for ever with "lease not found", ahead of the keep-alive that would
// have found the lease gone.
#[tokio::test(start_paused = true)]
async fn a_wipe_brings_back_the_keys_and_the_shared_keys() {
    let reg = Model::new();
    let _a = start_instance(&reg, KEY, 6);
    at(0.5).await;
    assert!(reg.get(SHARED).is_some());
    reg.wipe();
    at(5.0).await;
    assert!(reg.get(KEY).is_some(), "registered again");
    assert_eq!(lease_of(&reg, SHARED), Some(shared::lease_id(SHARED, "8080").0));
}

#[tokio::test(start_paused = true)]
async fn a_foreign_or_permanent_shared_value_is_never_overwritten() {
    let reg = Model::new();
    reg.put_foreign(SHARED, "9090", 0);
    let _a = start_instance(&reg, "/services/web/hosts/a", 15);
    at(0.5).await;
    assert!(reg.get("/services/web/hosts/a").is_some(), "registers all the same");
    at(10.0).await;
    assert_eq!(value(&reg, SHARED).as_deref(), Some("9090"));
    assert_eq!(lease_of(&reg, SHARED), Some(0));
}

#[tokio::test(start_paused = true)]
async fn a_refused_shared_key_never_delays_the_own_keys() {
    let reg = Model::new();
    reg.deny(SHARED);
    let _a = start_instance(&reg, "/services/web/hosts/a", 15);
    at(0.5).await;
    assert!(reg.get("/services/web/hosts/a").is_some(), "own keys in");
    assert_eq!(reg.get(SHARED), None);
}

/// Records every notification.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<String>>>);

impl Notifier for Recorder {
    fn send(&self, notice: Notice<'_>) {
        self.0.lock().unwrap().push(format!("{notice:?}"));
    }
}

impl Recorder {
    fn count(&self, what: &str) -> usize {
        self.0.lock().unwrap().iter().filter(|m| m.starts_with(what)).count()
    }
}

fn watchdog_hooks(rec: &Recorder) -> Hooks {
    Hooks {
        notifier: Some(Arc::new(rec.clone())),
        watchdog: Some(Duration::from_millis(300)),
        ..Hooks::default()
    }
}

#[tokio::test(start_paused = true)]
async fn watchdog_pings_stop_when_a_probe_loop_wedges() {
    let rec = Recorder::default();
    let reg = Model::new();
    let h = start_engine(
        &reg,
        Policy::Revoke,
        15,
        vec![service(KEY, &[(KEY, "v")], &[], timing(1000, 1, 1, 15))],
        watchdog_hooks(&rec),
    );
    at(3.5).await;
    let pings = rec.count("Watchdog");
    assert!((9..=12).contains(&pings), "{pings} pings in 3.5 s");
    assert_eq!(rec.count("Ready"), 1, "ready once settled");
    h.probes.get(KEY).wedged.store(true, Ordering::SeqCst);
    // The loop is stalled 2 intervals + timeout + 1 s after its last turn.
    at(5.0).await;
    let wedged = rec.count("Watchdog");
    at(15.0).await;
    assert_eq!(
        rec.count("Watchdog"),
        wedged,
        "pings stop once the loop wedges (after {pings})"
    );
    h.token.cancel();
    h.task.await.unwrap();
    assert_eq!(rec.count("Stopping"), 1);
}

// Regression: with no probe, no WATCHDOG=1 was ever sent and systemd
// killed the classic sidekick; READY=1 waited for etcd.
#[tokio::test(start_paused = true)]
async fn without_a_probe_the_registrar_sends_the_watchdog_and_ready_comes_at_once() {
    let rec = Recorder::default();
    let reg = Model::new();
    reg.set_unreachable(true);
    let mut s = service(KEY, &[(KEY, "v")], &[], timing(5000, 2, 2, 15));
    s.probe = None;
    let _h = start_engine(&reg, Policy::Revoke, 15, vec![s], watchdog_hooks(&rec));
    at(0.1).await;
    assert_eq!(rec.count("Ready"), 1, "READY never waits for etcd");
    at(60.0).await;
    let pings = rec.count("Watchdog");
    assert!(pings >= 190, "{pings} pings in 60 s, etcd down all along");
    reg.set_unreachable(false);
    at(10.0).await;
    assert!(reg.get(KEY).is_some());
}

fn unconditional(n: usize) -> Vec<Service> {
    (0..n)
        .map(|i| {
            let mut s = service(
                &format!("s{i}"),
                &[(&format!("/services/s{i}/1"), "v")],
                &[("/services/shared", "x")],
                timing(1000, 1, 1, 9),
            );
            s.probe = None;
            s
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn one_lease_and_a_keep_alive_rate_independent_of_the_number_of_services() {
    let reg = Model::new();
    let h = start_engine(&reg, Policy::PerKey, 9, unconditional(200), Hooks::default());
    at(1.0).await;
    let lease = lease_of(&reg, "/services/s0/1").expect("registered");
    for i in 0..200 {
        assert_eq!(lease_of(&reg, &format!("/services/s{i}/1")), Some(lease), "s{i}");
    }
    assert_eq!(
        lease_of(&reg, "/services/shared"),
        Some(shared::lease_id("/services/shared", "x").0)
    );
    let revision = reg.revision();
    at(60.0).await;
    assert_eq!(reg.revision(), revision, "nothing written while steady");
    assert_eq!(reg.calls("grant"), 2, "the process lease and the service lease");
    let ka = reg.calls("keep_alive");
    assert!(
        (38..=42).contains(&ka),
        "two leases kept alive every TTL/3 for 200 services: {ka}"
    );
    h.token.cancel();
    h.task.await.unwrap();
    assert_eq!(reg.get("/services/s0/1"), None, "revoked on stop");
}

// Regression: a reload removing 80 services (160 keys) failed for ever with
// "too many operations", and meanwhile an unrelated service whose backend
// died was never withdrawn.
#[tokio::test(start_paused = true)]
async fn a_big_reload_never_blocks_a_withdrawal() {
    let reg = Model::new();
    let mut services: Vec<Service> = (0..80)
        .map(|i| {
            let k1 = format!("/services/big/{i}/a");
            let k2 = format!("/services/big/{i}/b");
            let mut s = service(
                &format!("big{i}"),
                &[(&k1, "v"), (&k2, "v")],
                &[],
                timing(1000, 1, 1, 15),
            );
            s.probe = None;
            s
        })
        .collect();
    services.push(service("web", &[("/services/web/1", "v")], &[], timing(1000, 1, 1, 15)));
    let h = start_engine(&reg, Policy::PerKey, 15, services.clone(), Hooks::default());
    at(2.0).await;
    assert_eq!(reg.keys("/services/big/").len(), 160);
    assert!(reg.get("/services/web/1").is_some());
    // Remove the 80 and kill web's backend at once.
    h.reload(services.split_off(80));
    h.probes.get("web").set(false);
    at(1.5).await;
    assert_eq!(
        reg.get("/services/web/1"),
        None,
        "withdrawn within fall × interval + a probe"
    );
    assert!(reg.keys("/services/big/").is_empty(), "the 160 keys are withdrawn too");
}

#[tokio::test(start_paused = true)]
async fn a_service_refused_by_etcd_never_holds_up_another() {
    let reg = Model::new();
    reg.deny("/services/denied/");
    let services = vec![
        service("denied", &[("/services/denied/1", "v")], &[], timing(1000, 1, 1, 15)),
        service("web", &[("/services/web/1", "v")], &[], timing(1000, 1, 1, 15)),
    ];
    let h = start_engine(&reg, Policy::PerKey, 15, services, Hooks::default());
    // Two services start at random phases within their interval.
    at(2.5).await;
    assert!(reg.get("/services/web/1").is_some());
    h.probes.get("web").set(false);
    at(1.2).await;
    assert_eq!(
        reg.get("/services/web/1"),
        None,
        "withdrawn while the other keeps failing"
    );
}

#[tokio::test(start_paused = true)]
async fn a_per_key_withdrawal_never_deletes_another_writers_key() {
    let reg = Model::new();
    let services = vec![service(
        "web",
        &[("/services/web/1", "v"), ("/services/web/2", "v")],
        &[],
        timing(1000, 1, 1, 15),
    )];
    let h = start_engine(&reg, Policy::PerKey, 15, services, Hooks::default());
    at(0.5).await;
    reg.put_foreign("/services/web/2", "theirs", 0);
    h.probes.get("web").set(false);
    at(1.2).await;
    assert_eq!(reg.get("/services/web/1"), None);
    assert_eq!(value(&reg, "/services/web/2").as_deref(), Some("theirs"));
}

// Regression (found by the fault campaign): a withdrawal that got no
// answer may still reach etcd, late. When the service came back first, the
// agent took it for registered still and wrote nothing, so the late
// withdrawal deleted its key for good. Now a withdrawal without an answer
// leaves the keys unknown: a service back up writes them again, at a
// revision the late withdrawal does not match.
#[tokio::test(start_paused = true)]
async fn a_service_back_before_its_withdrawal_answered_is_written_again() {
    let reg = Model::new();
    let services = vec![service("web", &[(KEY, "v")], &[], timing(1000, 1, 1, 15))];
    let h = start_engine(&reg, Policy::PerKey, 15, services, Hooks::default());
    at(1.5).await;
    let first = reg.get(KEY).expect("registered");
    reg.set_unreachable(true);
    h.probes.get("web").set(false);
    at(2.5).await;
    h.probes.get("web").set(true);
    at(2.5).await;
    reg.set_unreachable(false);
    at(3.0).await;
    let now = reg.get(KEY).expect("registered again");
    assert!(now.mod_revision > first.mod_revision, "not written again: {now:?}");
    // The first withdrawal, delivered late.
    let late = [(KEY.to_string(), first.mod_revision)];
    let (n, _) = ops::withdraw_keys(&mut reg.clone(), LeaseId(first.lease), &late)
        .await
        .unwrap();
    assert_eq!(n, 0);
    assert!(reg.get(KEY).is_some());
}

// The mirror of the late withdrawal: a registration that got no answer and
// reaches etcd after the withdrawal that followed it brings the key of a
// service that is down back, under the agent's living lease. The agent
// watches its own keys and deletes it, comparing its revision.
#[tokio::test(start_paused = true)]
async fn a_registration_landing_after_its_withdrawal_is_deleted() {
    let reg = Model::new();
    let services = vec![service("web", &[(KEY, "v")], &[], timing(1000, 1, 1, 15))];
    let h = start_engine(&reg, Policy::PerKey, 15, services, Hooks::default());
    at(1.5).await;
    let lease = lease_of(&reg, KEY).expect("registered");
    h.probes.get("web").set(false);
    at(1.5).await;
    assert_eq!(reg.get(KEY), None, "withdrawn");
    // The late registration.
    reg.put_foreign(KEY, "v", lease);
    at(0.1).await;
    assert_eq!(
        reg.get(KEY),
        None,
        "a late registration of a service that is down stays"
    );
    // And one of a service a reload removed.
    h.reload(vec![]);
    at(0.1).await;
    reg.put_foreign(KEY, "v", lease);
    at(0.1).await;
    assert_eq!(reg.get(KEY), None, "a late registration of a removed service stays");
    // Somebody else's key there is left alone.
    reg.put_foreign(KEY, "theirs", 0);
    at(2.0).await;
    assert_eq!(value(&reg, KEY).as_deref(), Some("theirs"));
}

// A key of a registered service deleted behind the agent's back (by hand,
// or a late withdrawal) is put back within a round trip; the agent's own
// withdrawals and registrations, seen by the same watch, cost no write.
#[tokio::test(start_paused = true)]
async fn a_key_deleted_while_registered_is_put_back_and_our_own_writes_cost_nothing() {
    let reg = Model::new();
    let services = vec![
        service("web", &[(KEY, "v")], &[], timing(1000, 1, 1, 15)),
        service("api", &[("/services/api/1", "v")], &[], timing(1000, 1, 1, 15)),
    ];
    let h = start_engine(&reg, Policy::PerKey, 15, services, Hooks::default());
    at(2.5).await;
    assert!(reg.get(KEY).is_some() && reg.get("/services/api/1").is_some());
    reg.delete(KEY);
    at(0.1).await;
    assert!(reg.get(KEY).is_some(), "not put back");
    // Five flaps: one put and one delete each, nothing more.
    let before = reg.revision();
    for _ in 0..5 {
        h.probes.get("web").set(false);
        at(1.5).await;
        assert_eq!(reg.get(KEY), None);
        h.probes.get("web").set(true);
        at(1.5).await;
        assert!(reg.get(KEY).is_some());
    }
    assert_eq!(reg.revision(), before + 10);
    at(30.0).await;
    assert_eq!(reg.revision(), before + 10, "nothing written while steady");
}

// `run` has nothing to watch without shared keys: no watch at all.
#[tokio::test(start_paused = true)]
async fn run_without_shared_keys_sets_no_watch() {
    let (probe, reg, _h) = start(timing(1000, 1, 1, 15), true);
    at(2.0).await;
    assert!(reg.get(KEY).is_some());
    probe.set(false);
    at(2.0).await;
    assert_eq!(reg.get(KEY), None);
    assert_eq!(reg.calls("watch"), 0);
}
