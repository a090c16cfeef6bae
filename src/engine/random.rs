//! A randomized test of the engine under paused time: several sidekicks
//! (`run`s and agents) on one model of etcd, driven by a seeded random
//! schedule of probe outcomes, reloads, signals, foreign writers and etcd
//! faults (refused, hung, a lost lease, a restart, a wipe, a compaction),
//! with the README's Guarantees checked every 100 ms of model time:
//!
//! - a service healthy (and etcd answering) for its register bound has its
//!   keys in etcd;
//! - a service down, removed or stopped for its withdraw bound (etcd
//!   answering) has none left; one killed has none left after the TTL;
//! - no key another writer holds is ever deleted or rewritten;
//! - a shared key is present whenever a service declaring it is
//!   registered (etcd answering, outside a moment after a deletion);
//! - nothing is written while nothing changes.
//!
//! `ENGINE_SEED=N` replays one case; `ENGINE_CASES=N` runs N cases from
//! `ENGINE_SEED` on (default: 300 cases from a fixed seed, about ten seconds);
//! a failure prints the seed and the schedule up to it. A long run:
//! `ENGINE_CASES=5000 cargo test --release --lib engine::random`.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use super::tests::{probe_spec, start_engine, timing, Harness};
use super::*;
use crate::registry::memory::Model;

const TICK: Duration = Duration::from_millis(100);
const FOREIGN_LEASE: i64 = 0x7777;

/// One sidekick process of the case.
struct Proc {
    policy: Policy,
    services: Vec<Service>,
    /// Which of `services` are in its configuration now.
    active: BTreeSet<usize>,
    h: Option<Harness>,
    /// Stopped by SIGTERM (`Some(false)`) or killed (`Some(true)`), and when.
    ended: Option<(bool, Instant)>,
}

/// What the checker knows of one service.
#[derive(Clone)]
struct Track {
    /// Probe healthy since, or unhealthy since.
    healthy: bool,
    since: Instant,
    /// In the configuration (agent) since, or out since.
    active: bool,
    active_since: Instant,
    /// Seen registered with our value since its (re)start: only then may a
    /// foreign writer take a key over (a first registration takes keys
    /// over, as the contract says).
    seen: bool,
    /// A foreign writer deleted a key of ours that it had taken over while
    /// we were registered: the engine does not watch its own keys, so the
    /// key comes back at the next registration only (a documented limit).
    orphan: bool,
}

struct World {
    reg: Model,
    ttl: Duration,
    procs: Vec<Proc>,
    tracks: BTreeMap<(usize, usize), Track>,
    /// Keys another writer holds: key → value.
    foreign: BTreeMap<String, String>,
    /// etcd answering since (None while refused or hung).
    ok_since: Option<Instant>,
    /// etcd frozen: no request answers, no lease expires.
    hung: bool,
    /// The last fault that may cost a registration or a lease.
    disturbed: Instant,
    /// Shared keys deleted by hand, and when.
    shared_deleted: Instant,
    log: Vec<String>,
    start: Instant,
}

fn secs(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64())
}

impl World {
    fn note(&mut self, what: String) {
        let t = secs(Instant::now() - self.start);
        self.log.push(format!("{t}s {what}"));
    }

    fn interval(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn call_bound(&self) -> Duration {
        Duration::from_secs(1).min(self.ttl / 3)
    }

    /// Register bound after the service and etcd are both fine.
    fn register_bound(&self, s: &Service) -> Duration {
        let t = &s.timing;
        t.interval * t.rise + Duration::from_millis(100) + self.interval() + 2 * self.call_bound() + TICK * 3
    }

    fn withdraw_bound(&self, s: &Service) -> Duration {
        let t = &s.timing;
        t.interval * t.fall + Duration::from_millis(100) + self.interval() + 2 * self.call_bound() + TICK * 3
    }

    fn our_value(s: &Service, k: &str) -> Option<String> {
        s.keys.iter().find(|(o, _)| o == k).map(|(_, v)| v.clone())
    }

    /// Checks every invariant now; an error says which.
    fn check(&mut self) -> Result<(), String> {
        let now = Instant::now();
        let etcd_ok = self.ok_since.map(|t| now - t);
        let calm = now - self.disturbed;
        // Foreign keys are never deleted or rewritten.
        for (k, v) in &self.foreign {
            match self.reg.get(k) {
                Some(kv) if &kv.value == v && kv.lease == FOREIGN_LEASE => {}
                other => return Err(format!("foreign key {k}={v} is now {other:?}")),
            }
        }
        let mut registered_shared: BTreeSet<String> = BTreeSet::new();
        for ((p, i), t) in self.tracks.clone() {
            let proc_ = &self.procs[p];
            let s = &proc_.services[i];
            let own: Vec<(String, Option<String>)> = s
                .keys
                .iter()
                .filter(|(k, _)| !self.foreign.contains_key(k))
                .map(|(k, _)| (k.clone(), self.reg.get(k).map(|kv| kv.value)))
                .collect();
            let all_ours = own
                .iter()
                .all(|(k, v)| v.as_deref() == Self::our_value(s, k).as_deref());
            let none = own.iter().all(|(_, v)| v.is_none());
            let alive = proc_.ended.is_none();
            let up = alive && t.active && t.healthy;
            if all_ours && !own.is_empty() && up {
                self.tracks.get_mut(&(p, i)).expect("tracked").seen = true;
                registered_shared.extend(s.shared.iter().map(|(k, _)| k.clone()));
            }
            if up {
                let bound = self.register_bound(s);
                let fine = (now - t.since).min(now - t.active_since);
                if !t.orphan
                    && fine >= bound
                    && etcd_ok.is_some_and(|e| e >= bound)
                    && calm >= bound + self.ttl / 3
                    && !all_ours
                {
                    return Err(format!(
                        "service {p}/{i} healthy for {} s: keys missing: {own:?}",
                        secs(fine)
                    ));
                }
            } else {
                // A process that ended leaves its keys to its lease (the
                // revoke on SIGTERM may not reach etcd): the TTL, counted
                // from the end or from a restart that renewed the lease.
                let ended = proc_.ended.map(|(_, at)| at.max(self.disturbed));
                let down_since = match ended {
                    Some(at) => at,
                    None if !t.active => t.active_since,
                    None => t.since,
                };
                let down = now - down_since;
                let bound = if ended.is_some() {
                    self.ttl + TICK * 3
                } else {
                    self.withdraw_bound(s)
                };
                let etcd_fine = if ended.is_some() {
                    !self.hung
                } else {
                    etcd_ok.is_some_and(|e| e >= bound)
                };
                // Surely seen down by now: the next registration is whole.
                if down >= bound {
                    self.tracks.get_mut(&(p, i)).expect("tracked").orphan = false;
                }
                if down >= bound && etcd_fine && !none {
                    return Err(format!("service {p}/{i} down for {} s: keys left: {own:?}", secs(down)));
                }
            }
        }
        // Shared keys present while a declaring service is registered.
        if etcd_ok.is_some_and(|e| e >= Duration::from_secs(2)) && now - self.shared_deleted >= Duration::from_secs(1) {
            for k in &registered_shared {
                if self.reg.get(k).is_none() {
                    let keys: Vec<String> = self
                        .reg
                        .keys("/svc/")
                        .iter()
                        .map(|kv| format!("{}@{:x}", kv.key, kv.lease))
                        .collect();
                    return Err(format!("shared key {k} absent while a declaring service is registered; keys {keys:?}; leases {:?}; services {:?}", self.reg.leases(), self.procs.iter().map(|p| p.services.iter().map(|s| (s.name.clone(), s.shared.clone())).collect::<Vec<_>>()).collect::<Vec<_>>()));
                }
            }
        }
        Ok(())
    }

    fn live_services(&self) -> Vec<(usize, usize)> {
        self.tracks
            .keys()
            .filter(|(p, _)| self.procs[*p].ended.is_none())
            .copied()
            .collect()
    }

    /// One random step of the schedule.
    fn act(&mut self, rng: &mut fastrand::Rng) {
        let now = Instant::now();
        let live = self.live_services();
        match rng.u32(0..100) {
            0..=34 if !live.is_empty() => {
                let (p, i) = live[rng.usize(..live.len())];
                let healthy = rng.bool();
                let h = self.procs[p].h.as_ref().expect("live");
                h.probes.get(&self.procs[p].services[i].name).set(healthy);
                let t = self.tracks.get_mut(&(p, i)).expect("tracked");
                if t.healthy != healthy {
                    t.healthy = healthy;
                    t.since = now;
                }
                self.note(format!("service {p}/{i} healthy={healthy}"));
            }
            35..=44 => {
                // An agent reload: one service out, or back in.
                let agents: Vec<usize> = (0..self.procs.len())
                    .filter(|&p| self.procs[p].policy == Policy::PerKey && self.procs[p].ended.is_none())
                    .collect();
                if agents.is_empty() {
                    return;
                }
                let p = agents[rng.usize(..agents.len())];
                let i = rng.usize(..self.procs[p].services.len());
                let s = &self.procs[p].services[i];
                if s.keys.iter().any(|(k, _)| self.foreign.contains_key(k)) {
                    return;
                }
                let proc_ = &mut self.procs[p];
                let active = !proc_.active.contains(&i);
                if active {
                    proc_.active.insert(i);
                } else {
                    proc_.active.remove(&i);
                }
                let config: Vec<Service> = proc_.active.iter().map(|&j| proc_.services[j].clone()).collect();
                proc_.h.as_ref().expect("live").reload(config);
                let t = self.tracks.get_mut(&(p, i)).expect("tracked");
                t.active = active;
                t.active_since = now;
                t.seen = false;
                t.orphan = false;
                // A service added back starts probing afresh, healthy.
                if active {
                    let name = self.procs[p].services[i].name.clone();
                    self.procs[p].h.as_ref().expect("live").probes.get(&name).set(true);
                    let t = self.tracks.get_mut(&(p, i)).expect("tracked");
                    t.healthy = true;
                    t.since = now;
                }
                self.note(format!("reload {p}: service {i} active={active}"));
            }
            45..=52 => {
                let faults = [
                    "refused", "hung", "answers", "answers", "lease", "restart", "wipe", "compact",
                ];
                let f = faults[rng.usize(..faults.len())];
                match f {
                    "refused" => {
                        self.reg.set_unreachable(true);
                        self.ok_since = None;
                    }
                    "hung" => {
                        self.reg.set_hung(true);
                        self.hung = true;
                        self.ok_since = None;
                    }
                    "answers" => {
                        self.reg.set_unreachable(false);
                        self.reg.set_hung(false);
                        self.hung = false;
                        if self.ok_since.is_none() {
                            self.ok_since = Some(now);
                        }
                    }
                    "lease" => {
                        // An operator revokes one of our process leases.
                        let ours: Vec<LeaseId> = self
                            .reg
                            .leases()
                            .into_iter()
                            .filter(|l| l.0 != FOREIGN_LEASE && !self.is_service_lease(*l))
                            .collect();
                        if let Some(l) = ours.first() {
                            self.reg.revoke_lease(*l);
                        }
                    }
                    "restart" => self.reg.restart(),
                    "wipe" => {
                        self.reg.wipe();
                        self.foreign.clear();
                    }
                    _ => self.reg.compact(self.reg.revision()),
                }
                self.disturbed = now;
                self.note(format!("etcd {f}"));
            }
            53..=60 if !live.is_empty() && self.ok_since.is_some() => {
                // Another writer takes one of our keys over.
                let (p, i) = live[rng.usize(..live.len())];
                let t = &self.tracks[&(p, i)];
                if !t.seen {
                    return;
                }
                let s = &self.procs[p].services[i];
                let (k, _) = s.keys[rng.usize(..s.keys.len())].clone();
                self.reg.put_foreign(&k, "theirs", FOREIGN_LEASE);
                self.foreign.insert(k.clone(), "theirs".into());
                self.note(format!("foreign writer takes {k}"));
            }
            61..=64 if !self.foreign.is_empty() && self.ok_since.is_some() => {
                // ... and lets it go again.
                let k = self.foreign.keys().next().expect("non-empty").clone();
                self.foreign.remove(&k);
                self.reg.delete(&k);
                for ((p, i), t) in self.tracks.iter_mut() {
                    if k.starts_with(&format!("/svc/p{p}/s{i}/")) && t.healthy {
                        t.orphan = true;
                    }
                }
                // Ours again within an interval (held keys are retried).
                self.disturbed = now;
                self.note(format!("foreign writer deletes {k}"));
            }
            65..=69 if self.ok_since.is_some() => {
                for k in ["/svc/shared/a", "/svc/shared/b"] {
                    self.reg.delete(k);
                }
                self.shared_deleted = now;
                self.note("shared keys deleted by hand".into());
            }
            70..=72 => {
                // SIGTERM or SIGKILL of a process (never the last one).
                let alive: Vec<usize> = (0..self.procs.len())
                    .filter(|&p| self.procs[p].ended.is_none())
                    .collect();
                if alive.len() < 2 {
                    return;
                }
                let p = alive[rng.usize(..alive.len())];
                let kill = rng.bool();
                let h = self.procs[p].h.take().expect("live");
                if kill {
                    h.task.abort();
                }
                h.token.cancel();
                self.procs[p].ended = Some((kill, now));
                self.note(format!("process {p} {}", if kill { "killed" } else { "stopped" }));
            }
            _ => {}
        }
    }

    fn is_service_lease(&self, l: LeaseId) -> bool {
        ["/svc/shared/a=1", "/svc/shared/b=2"].iter().any(|kv| {
            let (k, v) = kv.split_once('=').expect("k=v");
            shared::lease_id(k, v) == l
        })
    }
}

/// The services of a case: `run`s with one service, agents with several;
/// each declares some of two shared keys.
fn processes(rng: &mut fastrand::Rng, ttl: Duration) -> Vec<Proc> {
    let n = rng.usize(2..=3);
    (0..n)
        .map(|p| {
            let agent = rng.bool();
            let count = if agent { rng.usize(2..=4) } else { 1 };
            let services = (0..count)
                .map(|i| {
                    let mut t = timing(1000, rng.u32(1..=3), rng.u32(1..=3), ttl.as_secs());
                    t.ttl = ttl;
                    let keys: Vec<(String, String)> = (0..rng.usize(1..=3))
                        .map(|k| (format!("/svc/p{p}/s{i}/k{k}"), format!("v{p}{i}{k}")))
                        .collect();
                    let mut shared = Vec::new();
                    if rng.bool() {
                        shared.push(("/svc/shared/a".to_string(), "1".to_string()));
                    }
                    if rng.bool() {
                        shared.push(("/svc/shared/b".to_string(), "2".to_string()));
                    }
                    Service {
                        name: format!("p{p}s{i}"),
                        file: "random.toml".into(),
                        keys,
                        shared,
                        probe: probe_spec(),
                        timing: t,
                    }
                })
                .collect::<Vec<_>>();
            Proc {
                policy: if agent { Policy::PerKey } else { Policy::Revoke },
                active: (0..services.len()).collect(),
                services,
                h: None,
                ended: None,
            }
        })
        .collect()
}

async fn case(seed: u64) -> Result<(), (String, Vec<String>)> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let ttl = Duration::from_secs(rng.u64(3..=9));
    let reg = Model::new();
    reg.set_call_bound(Duration::from_secs(1).min(ttl / 3));
    let start = Instant::now();
    let mut w = World {
        reg: reg.clone(),
        ttl,
        procs: processes(&mut rng, ttl),
        tracks: BTreeMap::new(),
        foreign: BTreeMap::new(),
        ok_since: Some(start),
        hung: false,
        disturbed: start,
        shared_deleted: start,
        log: Vec::new(),
        start,
    };
    // A foreign writer's key beside ours, on a lease of its own.
    reg.put_foreign("/svc/foreign/1", "x", FOREIGN_LEASE);
    w.foreign.insert("/svc/foreign/1".into(), "x".into());
    for p in 0..w.procs.len() {
        let proc_ = &w.procs[p];
        let h = start_engine(
            &reg,
            proc_.policy,
            ttl.as_secs(),
            proc_.services.clone(),
            Hooks::default(),
        );
        for i in 0..proc_.services.len() {
            w.tracks.insert(
                (p, i),
                Track {
                    healthy: true,
                    since: start,
                    active: true,
                    active_since: start,
                    seen: false,
                    orphan: false,
                },
            );
        }
        w.procs[p].h = Some(h);
    }

    let steps = 30;
    for step in 0..steps {
        w.act(&mut rng);
        let dt = TICK * rng.u32(1..=30);
        let until = Instant::now() + dt;
        while Instant::now() < until {
            tokio::time::sleep(TICK).await;
            if let Err(e) = w.check() {
                return Err((format!("step {step}: {e}"), w.log));
            }
        }
    }
    // Calm: etcd answers, nothing changes; after settling, no writes.
    w.reg.set_unreachable(false);
    w.reg.set_hung(false);
    w.hung = false;
    if w.ok_since.is_none() {
        w.ok_since = Some(Instant::now());
    }
    w.note("calm".into());
    let settle = Duration::from_secs(12) + 2 * ttl;
    let until = Instant::now() + settle;
    while Instant::now() < until {
        tokio::time::sleep(TICK).await;
        if let Err(e) = w.check() {
            return Err((format!("settling: {e}"), w.log));
        }
    }
    let before = w.reg.revision();
    tokio::time::sleep(3 * ttl).await;
    if let Err(e) = w.check() {
        return Err((format!("steady: {e}"), w.log));
    }
    if w.reg.revision() != before {
        return Err((format!("steady: revision {before} became {}", w.reg.revision()), w.log));
    }
    for p in &mut w.procs {
        if let Some(h) = p.h.take() {
            h.token.cancel();
            let _ = h.task.await;
        }
    }
    Ok(())
}

#[test]
fn random_schedules_keep_the_guarantees() {
    let first: u64 = std::env::var("ENGINE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261204);
    let cases: u64 = std::env::var("ENGINE_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if std::env::var("ENGINE_SEED").is_ok() { 1 } else { 300 });
    for seed in first..first + cases {
        // The engine's own jitter comes from this thread's generator: seeded
        // too, so a seed replays its case exactly.
        fastrand::seed(seed);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("a runtime");
        if let Err((what, log)) = rt.block_on(case(seed)) {
            panic!("ENGINE_SEED={seed} fails: {what}\nschedule:\n{}", log.join("\n"));
        }
    }
}
