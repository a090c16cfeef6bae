//! A rolling update through a real HAProxy that drops no request:
//! `examples/rollout/rollout` replaces three registered instances with three
//! new ones while requests go through HAProxy without pause; and a failed
//! rollout (new instances never healthy) leaves the old ones serving.
//!
//! The layout is the seed's: the sidekick of instance N keeps
//! `/services/web/hosts/N = 127.0.0.1:PORT` and the shared keys
//! `/services/web/scheme` and `/services/web/host_port`. A long-lived
//! `sidekick render` follows `/services/web/hosts/`: on every change it
//! renders the HAProxy configuration, checks it with `haproxy -c`, installs
//! it and reloads HAProxy with SIGUSR2 to its master. The script's start and stop commands are a small
//! bash client of a control socket of the test, which plays systemd: `web@N`
//! is an HTTP server in the test that names itself in every answer,
//! `web_presence@N` a `sidekick run` process, and a stop returns once the
//! unit is down (for a sidekick: revoked, drained, exited).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{EventType, GetOptions, WatchOptions};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::haproxy::{get_through, Haproxy};
use crate::harness::bounds::*;
use crate::harness::*;
use crate::proxies::Rendered;

const HOSTS: &str = "/services/web/hosts/";
/// The sidekicks' `--drain`: time for a re-render and a reload, with room.
const DRAIN: Duration = Duration::from_secs(2);
/// The fewest requests a rollout is judged on.
const MIN_REQUESTS: usize = 1000;
/// Bound of the load generator: requests per thread (its time is
/// [`LOAD`]).
const MAX_REQUESTS: usize = 100_000;
/// Threads sending requests, each one after the other without pause.
const CLIENTS: usize = 2;
/// How long an instance answers 503 after its start, as an application
/// that loads before it serves: a rollout must wait for it.
const WARMUP: Duration = Duration::from_secs(1);
/// Back-to-back reloads in the reload test.
const RELOADS: usize = 30;

/// One instance of the service: an HTTP server on loopback answering
/// `served by N` to every request once it has warmed up, and 503 before
/// that, or forever when it is never to be healthy. Stopping it closes its
/// listener, as a stopped process would.
struct Instance {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl Instance {
    fn start(name: &str, healthy: bool) -> Instance {
        let ready_at = healthy.then(|| Instant::now() + WARMUP);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, body) = (stop.clone(), format!("served by {name}\n"));
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut conn) = conn else { continue };
                let body = body.clone();
                let ready = ready_at.is_some_and(|t| Instant::now() >= t);
                std::thread::spawn(move || answer_http(&mut conn, ready, &body));
            }
        });
        Instance {
            addr,
            stop,
            accept: Some(accept),
        }
    }

    fn stop(&mut self) {
        if let Some(accept) = self.accept.take() {
            self.stop.store(true, Ordering::SeqCst);
            // Wake the accept loop; the listener closes when it returns.
            let _ = TcpStream::connect(self.addr);
            accept.join().unwrap();
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The test's systemd: `web@N` is an [`Instance`], `web_presence@N` its
/// sidekick.
struct Units {
    eps: String,
    frontend_port: u16,
    /// Instances started as never healthy.
    never_healthy: BTreeSet<String>,
    instances: HashMap<String, Instance>,
    sidekicks: HashMap<String, Running>,
    /// Every command handled, in order, and when: `start web@4`,
    /// `stop web_presence@1`, ...
    log: Vec<(Instant, String)>,
    /// A client of etcd, to read what it holds when a stop comes.
    etcd: etcd_client::Client,
    /// The instances (N) etcd held under `HOSTS` when the first stop came,
    /// read before that stop was carried out.
    at_first_stop: Option<BTreeSet<String>>,
}

/// Carries out `start UNIT` or `stop UNIT` as systemd would: a start is
/// done once the process runs, a stop once it has exited.
async fn command(units: &Mutex<Units>, line: &str) -> Result<(), String> {
    let (action, unit) = line.trim().split_once(' ').ok_or("want: start|stop UNIT")?;
    let unit = unit.strip_suffix(".service").unwrap_or(unit);
    let (kind, n) = unit.split_once('@').ok_or_else(|| format!("{unit}: no instance"))?;
    let n = n.to_string();
    let first_stop = {
        let u = units.lock().unwrap();
        (action == "stop" && u.at_first_stop.is_none()).then(|| u.etcd.clone())
    };
    if let Some(mut c) = first_stop {
        // What etcd holds at this moment, whatever the test's watcher has
        // seen of it yet.
        let r = c.get(HOSTS, Some(GetOptions::new().with_prefix())).await;
        let r = r.map_err(|e| format!("reading {HOSTS}: {e}"))?;
        let hosts = r
            .kvs()
            .iter()
            .map(|kv| kv.key_str().unwrap().trim_start_matches(HOSTS).to_string());
        units.lock().unwrap().at_first_stop = Some(hosts.collect());
    }
    let mut sidekick = {
        let mut u = units.lock().unwrap();
        u.log.push((Instant::now(), format!("{action} {unit}")));
        match (action, kind) {
            ("start", "web") => {
                let healthy = !u.never_healthy.contains(&n);
                u.instances
                    .entry(n.clone())
                    .or_insert_with(|| Instance::start(&n, healthy));
                return Ok(());
            }
            ("start", "web_presence") => {
                let addr = u.instances.get(&n).ok_or("web@N is not running")?.addr.to_string();
                let (key, url) = (format!("{HOSTS}{n}"), format!("http://{addr}/health"));
                let port = format!("/services/web/host_port={}", u.frontend_port);
                let drain = format!("{}s", DRAIN.as_secs());
                let mut args = fast_run(&key, &addr, &url, &u.eps, "2", "2");
                args.extend([
                    "--drain",
                    &drain,
                    "--shared",
                    "/services/web/scheme=http",
                    "--shared",
                    &port,
                ]);
                let sk = Running::start(&args);
                u.sidekicks.insert(n, sk);
                return Ok(());
            }
            ("stop", "web") => {
                if let Some(mut i) = u.instances.remove(&n) {
                    i.stop();
                }
                return Ok(());
            }
            ("stop", "web_presence") => match u.sidekicks.remove(&n) {
                Some(sk) => sk,
                None => return Ok(()),
            },
            _ => return Err(format!("unknown: {line}")),
        }
    };
    sidekick.signal("TERM");
    match sidekick.exit_within(sidekick.figures().exit()).await {
        Some(st) if st.success() => Ok(()),
        other => Err(format!("sidekick {n} ended {other:?}: {}", sidekick.log())),
    }
}

/// Serves the control socket: one `start|stop UNIT` line a connection,
/// answered `ok` or `error: ...` once done.
async fn control(listener: tokio::net::TcpListener, units: Arc<Mutex<Units>>, done: CancellationToken) {
    loop {
        let conn = tokio::select! {
            c = listener.accept() => c,
            _ = done.cancelled() => return,
        };
        let Ok((conn, _)) = conn else { continue };
        let (rd, mut wr) = conn.into_split();
        let mut line = String::new();
        let reply = match tokio::time::timeout(IO, BufReader::new(rd).read_line(&mut line)).await {
            Ok(Ok(_)) => match command(&units, &line).await {
                Ok(()) => "ok".to_string(),
                Err(e) => format!("error: {}", e.replace('\n', " | ")),
            },
            _ => "error: no command".to_string(),
        };
        let _ = wr.write_all(format!("{reply}\n").as_bytes()).await;
    }
}

/// The unit commands the script runs: `unitctl start|stop UNIT`.
const UNITCTL: &str = r#"#!/usr/bin/env bash
# unitctl start|stop UNIT: asks the test to start or stop UNIT; exit 0 once done.
set -euo pipefail
exec 3<>/dev/tcp/127.0.0.1/PORT
printf '%s %s\n' "$1" "$2" >&3
IFS= read -r -t LIMIT reply <&3 || { echo "unitctl: no answer to $1 $2" >&2; exit 1; }
[ "$reply" = ok ] || { echo "unitctl: $1 $2: $reply" >&2; exit 1; }
"#;

/// What the test saw of the instances' keys: when, which N, put or deleted.
type Events = Arc<Mutex<Vec<(Instant, String, bool)>>>;

/// One request through HAProxy: when it was sent and answered, and the
/// instance that answered or what went wrong.
struct Sample {
    start: Instant,
    end: Instant,
    answer: Result<String, String>,
}

/// What one rollout did.
struct Rollout {
    out: Output,
    /// render's reloads of HAProxy before the rollout began.
    reloads_before: Option<u64>,
    started: Instant,
    took: Duration,
    ended: Instant,
    samples: Vec<Sample>,
}

impl Rollout {
    fn failures(&self) -> Vec<String> {
        self.samples
            .iter()
            .filter_map(|s| s.answer.as_ref().err().cloned())
            .collect()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.out.stderr).into_owned()
    }
}

/// etcd, HAProxy kept by `sidekick render`, and instances 1 to 3
/// registered by their sidekicks.
struct Stage {
    etcd: Etcd,
    units: Arc<Mutex<Units>>,
    unitctl: PathBuf,
    events: Events,
    done: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    lb: Rendered<Haproxy>,
    port: u16,
}

impl Stage {
    async fn start(never_healthy: &[&str]) -> Stage {
        let etcd = Etcd::start().await;
        let eps = etcd.endpoints();
        // HAProxy first, with no instance yet: its frontend port (another
        // one when the first it tried was taken) is known before the
        // sidekicks publish it as /services/web/host_port.
        let lb = Rendered::<Haproxy>::start(&etcd, HOSTS).await;
        let port = lb.proxy.port;
        let done = CancellationToken::new();
        let units = Arc::new(Mutex::new(Units {
            eps: eps.clone(),
            frontend_port: port,
            never_healthy: never_healthy.iter().map(|s| s.to_string()).collect(),
            instances: HashMap::new(),
            sidekicks: HashMap::new(),
            log: Vec::new(),
            etcd: etcd.client(0).await,
            at_first_stop: None,
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let unitctl = lb.dir.path().join("unitctl");
        let ctl_port = listener.local_addr().unwrap().port().to_string();
        let script = UNITCTL
            .replace("PORT", &ctl_port)
            .replace("LIMIT", &HANG.as_secs().to_string());
        std::fs::write(&unitctl, script).unwrap();
        let mut tasks = vec![tokio::spawn(control(listener, units.clone(), done.clone()))];

        // Every change under HOSTS is recorded.
        let events: Events = Default::default();
        let mut c = etcd.client(0).await;
        let mut stream = c.watch(HOSTS, Some(WatchOptions::new().with_prefix())).await.unwrap();
        // The watch is in place once etcd says it was created.
        let created = stream.message().await.unwrap().unwrap();
        assert!(created.created(), "{created:?}");
        let (ev, d) = (events.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    m = stream.message() => m,
                    _ = d.cancelled() => return,
                };
                let Ok(Some(resp)) = msg else { return };
                let now = Instant::now();
                for e in resp.events() {
                    let Some(kv) = e.kv() else { continue };
                    let n = kv.key_str().unwrap().trim_start_matches(HOSTS).to_string();
                    ev.lock().unwrap().push((now, n, e.event_type() == EventType::Put));
                }
            }
        }));

        for n in ["1", "2", "3"] {
            command(&units, &format!("start web@{n}")).await.unwrap();
            command(&units, &format!("start web_presence@{n}")).await.unwrap();
        }
        for n in ["1", "2", "3"] {
            let limit = sidekick_figures(&units, n).registration();
            let ok = key_becomes(&c, &format!("{HOSTS}{n}"), Some(&addr(&units, n)), limit).await;
            assert!(ok, "instance {n} never registered:\n{}", sidekick_logs(&units));
        }
        // render follows the registrations, checks, installs and reloads.
        let want: BTreeSet<_> = ["1", "2", "3"].map(|n| (n.to_string(), addr(&units, n))).into();
        assert!(
            lb.proxy.settles_on(&want, RENDER_REACTS + HAPROXY).await,
            "haproxy did not come to run with instances 1 to 3\n{}",
            lb.report()
        );
        // From here on the log holds the script's commands only.
        units.lock().unwrap().log.clear();
        Stage {
            etcd,
            units,
            unitctl,
            events,
            done,
            tasks,
            lb,
            port,
        }
    }

    /// Runs `rollout web OLD NEW` while clients send requests through
    /// HAProxy, from before it starts until after it ends and at least
    /// [`MIN_REQUESTS`] were sent.
    async fn rollout(&self, old: &str, new: &str, wait_timeout: &str) -> Rollout {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let (stop, sent, port) = (stop.clone(), sent.clone(), self.port);
                std::thread::spawn(move || load(port, &stop, &sent))
            })
            .collect();
        let began = Instant::now();
        assert!(
            eventually(SOON, || async { sent.load(Ordering::SeqCst) >= 20 }).await,
            "the clients sent nothing"
        );

        let mut cmd = Command::new("bash");
        for (k, _) in std::env::vars() {
            if k.starts_with("SIDEKICK_") || k.starts_with("ETCDCTL_") || k == "RUST_LOG" {
                cmd.env_remove(k);
            }
        }
        let ctl = self.unitctl.display();
        cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/rollout/rollout"))
            .args(["web", old, new])
            .env_remove("UNIT_CTL")
            .env("START_CMD", format!("bash {ctl} start"))
            .env("STOP_CMD", format!("bash {ctl} stop"))
            .env("KEY", format!("{HOSTS}%i"))
            .env("WAIT_TIMEOUT", wait_timeout)
            .env("SIDEKICK", env!("CARGO_BIN_EXE_sidekick"))
            .env("SIDEKICK_ENDPOINTS", self.etcd.endpoints())
            .env("SIDEKICK_ENV_FILE", "/nonexistent/etcd.environment")
            .stdin(Stdio::null());
        let reloads_before = self.lb.reloads();
        let start = Instant::now();
        let out = tokio::task::spawn_blocking(move || cmd.output().expect("bash runs the rollout script"))
            .await
            .unwrap();
        let (took, ended) = (start.elapsed(), Instant::now());

        // A little traffic after the end, in which only new instances may
        // answer, and enough of it in all.
        let_pass(QUIET).await;
        let enough = eventually(LOAD.saturating_sub(began.elapsed()), || async {
            sent.load(Ordering::SeqCst) >= MIN_REQUESTS
        })
        .await;
        stop.store(true, Ordering::SeqCst);
        let samples: Vec<Sample> = clients.into_iter().flat_map(|c| c.join().unwrap()).collect();
        assert!(
            enough && samples.len() >= MIN_REQUESTS,
            "only {} requests sent",
            samples.len()
        );
        Rollout {
            out,
            reloads_before,
            started: start,
            took,
            ended,
            samples,
        }
    }

    /// The responses served by an instance whose key was not in etcd at the
    /// time (give or take the drain after its withdrawal).
    fn served_unregistered(&self, r: &Rollout) -> Vec<String> {
        let events = self.events.lock().unwrap();
        let mut spans: HashMap<&str, Vec<(Instant, Option<Instant>)>> = HashMap::new();
        for (at, n, put) in events.iter() {
            let v = spans.entry(n).or_default();
            match (put, v.last_mut()) {
                (true, Some((_, None))) => {} // a rewrite of a registered key
                (true, _) => v.push((*at, None)),
                (false, Some((_, end @ None))) => *end = Some(*at),
                (false, _) => {}
            }
        }
        r.samples
            .iter()
            .filter_map(|s| {
                let n = s.answer.as_ref().ok()?;
                let ok = spans.get(n.as_str()).is_some_and(|v| {
                    v.iter()
                        .any(|(from, to)| *from <= s.end && to.is_none_or(|to| s.start <= to + DRAIN))
                });
                (!ok).then(|| {
                    let at = s.start.saturating_duration_since(r.started);
                    format!("{n} answered a request sent {at:?} after the rollout began")
                })
            })
            .collect()
    }

    /// Waits until etcd holds `want` under `/services/web/` and HAProxy
    /// lists exactly instances `ns`: the shared keys of a sidekick that
    /// stopped are put again by another once its watch has seen them go,
    /// and the last change is rendered and reloaded a moment after the
    /// rollout ends. Whether they did is asserted by the test.
    async fn settled(&self, want: &BTreeMap<String, String>, ns: &[&str]) {
        let servers: BTreeSet<_> = ns.iter().map(|n| (n.to_string(), addr(&self.units, n))).collect();
        eventually(RENDER_REACTS + HAPROXY, || async {
            self.keys().await == *want && self.lb.proxy.servers_now().is_some_and(|s| s == servers)
        })
        .await;
    }

    /// Everything under `/services/web/`.
    async fn keys(&self) -> BTreeMap<String, String> {
        let mut c = self.etcd.client(0).await;
        let r = c
            .get("/services/web/", Some(GetOptions::new().with_prefix()))
            .await
            .unwrap();
        r.kvs()
            .iter()
            .map(|kv| (kv.key_str().unwrap().to_string(), kv.value_str().unwrap().to_string()))
            .collect()
    }

    /// The keys `rollout` must leave: instances `ns` and the shared keys.
    fn want_keys(&self, ns: &[&str]) -> BTreeMap<String, String> {
        let mut want: BTreeMap<String, String> = ns
            .iter()
            .map(|n| (format!("{HOSTS}{n}"), addr(&self.units, n)))
            .collect();
        want.insert("/services/web/scheme".into(), "http".into());
        want.insert("/services/web/host_port".into(), self.port.to_string());
        want
    }

    fn unit_log(&self) -> Vec<String> {
        self.units.lock().unwrap().log.iter().map(|(_, c)| c.clone()).collect()
    }

    /// The instances registered in etcd when the script first stopped a
    /// unit.
    fn at_first_stop(&self) -> Option<BTreeSet<String>> {
        self.units.lock().unwrap().at_first_stop.clone()
    }

    /// Stops the watcher and the control socket; returns HAProxy with its
    /// render.
    async fn finish(self) -> Rendered<Haproxy> {
        self.done.cancel();
        for t in self.tasks {
            t.await.unwrap();
        }
        self.lb
    }
}

/// Sends requests one after the other until `stop`, within the bounds.
fn load(port: u16, stop: &AtomicBool, sent: &AtomicUsize) -> Vec<Sample> {
    let deadline = Instant::now() + LOAD;
    let mut samples = Vec::new();
    while !stop.load(Ordering::SeqCst) && samples.len() < MAX_REQUESTS && Instant::now() < deadline {
        let start = Instant::now();
        let answer = match get_through(port, &format!("/r{}", samples.len())) {
            Ok((200, body)) => match body.strip_prefix("served by ") {
                Some(n) => Ok(n.trim().to_string()),
                None => Err(format!("200 with body {body:?}")),
            },
            Ok((code, body)) => Err(format!("{code} {body:?}")),
            Err(e) => Err(e),
        };
        samples.push(Sample {
            start,
            end: Instant::now(),
            answer,
        });
        sent.fetch_add(1, Ordering::SeqCst);
    }
    samples
}

/// Where instance `n` listens (it was started, and may be stopped since).
fn addr(units: &Mutex<Units>, n: &str) -> String {
    let u = units.lock().unwrap();
    let i = u
        .instances
        .get(n)
        .unwrap_or_else(|| panic!("instance {n} is not running"));
    i.addr.to_string()
}

/// The timing figures of the sidekick of instance `n`.
fn sidekick_figures(units: &Mutex<Units>, n: &str) -> Figures {
    let u = units.lock().unwrap();
    u.sidekicks
        .get(n)
        .unwrap_or_else(|| panic!("sidekick {n} is not running"))
        .figures()
}

fn sidekick_logs(units: &Mutex<Units>) -> String {
    let u = units.lock().unwrap();
    let mut out = String::new();
    for (n, sk) in &u.sidekicks {
        out += &format!("--- sidekick {n}:\n{}\n", sk.log());
    }
    out
}

/// The unit commands of a rollout from `old` to `new`: start every new
/// instance and its sidekick, then (`then`) stop sidekicks and instances.
fn unit_commands(new: &[&str], stops: &[&str]) -> Vec<String> {
    let mut v = Vec::new();
    for n in new {
        v.push(format!("start web@{n}"));
        v.push(format!("start web_presence@{n}"));
    }
    for n in stops {
        v.push(format!("stop web_presence@{n}"));
    }
    for n in stops {
        v.push(format!("stop web@{n}"));
    }
    v
}

/// Prints what a rollout did, for the figures of docs/rolling-updates.md.
fn figures(what: &str, r: &Rollout, lb: &Rendered<Haproxy>) {
    let reloads = lb.reloads().zip(r.reloads_before).map(|(after, before)| after - before);
    let by: BTreeMap<&str, usize> = r.samples.iter().fold(BTreeMap::new(), |mut m, s| {
        if let Ok(n) = &s.answer {
            *m.entry(n.as_str()).or_default() += 1;
        }
        m
    });
    let slowest = r.samples.iter().map(|s| s.end - s.start).max().unwrap_or_default();
    println!(
        "{what}: {} requests, {} failed, rollout took {:.1}s, {reloads:?} reloads by render meanwhile, \
         slowest request {} ms, answered by instance {by:?}",
        r.samples.len(),
        r.failures().len(),
        r.took.as_secs_f64(),
        slowest.as_millis(),
    );
}

#[tokio::test]
async fn rolling_update_through_haproxy_drops_no_request() {
    let stage = Stage::start(&[]).await;
    let r = stage.rollout("1,2,3", "4,5,6", "30s").await;
    let stderr = r.stderr();
    stage
        .settled(&stage.want_keys(&["4", "5", "6"]), &["4", "5", "6"])
        .await;
    let keys = stage.keys().await;
    let unregistered = stage.served_unregistered(&r);
    let log = stage.unit_log();
    let at_first_stop = stage.at_first_stop();
    let want_keys = stage.want_keys(&["4", "5", "6"]);
    let new_addrs: BTreeSet<_> = ["4", "5", "6"].map(|n| (n.to_string(), addr(&stage.units, n))).into();
    let logs = sidekick_logs(&stage.units);
    let lb = stage.finish().await;
    figures("rolling update", &r, &lb);

    assert_eq!(r.out.status.code(), Some(0), "rollout failed:\n{stderr}\n{logs}");
    let failures = r.failures();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed, e.g. {:?}\nrollout:\n{stderr}\nhaproxy:\n{}",
        failures.len(),
        r.samples.len(),
        &failures[..failures.len().min(10)],
        lb.report()
    );
    assert!(
        unregistered.is_empty(),
        "{} answers from unregistered instances, e.g. {:?}",
        unregistered.len(),
        &unregistered[..unregistered.len().min(10)]
    );
    assert_eq!(log, unit_commands(&["4", "5", "6"], &["1", "2", "3"]), "{stderr}");
    // No old instance left before every new one was registered.
    assert!(
        at_first_stop
            .as_ref()
            .is_some_and(|at| ["4", "5", "6"].iter().all(|n| at.contains(*n))),
        "instances registered when the first stop came: {at_first_stop:?}"
    );
    assert_eq!(keys, want_keys);
    assert_eq!(lb.proxy.servers(), new_addrs);
    // Traffic really moved: both generations answered, and only the new
    // one once the rollout was over.
    let answered = |n: &str| r.samples.iter().any(|s| s.answer.as_deref() == Ok(n));
    for n in ["1", "2", "3", "4", "5", "6"] {
        assert!(answered(n), "instance {n} answered nothing");
    }
    assert!(
        r.samples
            .iter()
            .filter(|s| s.start > r.ended)
            .all(|s| matches!(s.answer.as_deref(), Ok("4" | "5" | "6"))),
        "an old instance answered after the rollout"
    );
}

#[tokio::test]
async fn failed_rollout_leaves_the_old_instances_serving() {
    let stage = Stage::start(&["4", "5", "6"]).await;
    let old_addrs: BTreeSet<_> = ["1", "2", "3"].map(|n| (n.to_string(), addr(&stage.units, n))).into();
    let r = stage.rollout("1,2,3", "4,5,6", "3s").await;
    let stderr = r.stderr();
    stage
        .settled(&stage.want_keys(&["1", "2", "3"]), &["1", "2", "3"])
        .await;
    let keys = stage.keys().await;
    let unregistered = stage.served_unregistered(&r);
    let log = stage.unit_log();
    let want_keys = stage.want_keys(&["1", "2", "3"]);
    let (running, sidekicks) = {
        let u = stage.units.lock().unwrap();
        let running: BTreeSet<String> = u.instances.keys().cloned().collect();
        (running, u.sidekicks.keys().cloned().collect::<BTreeSet<_>>())
    };
    let new_ever_registered = stage.events.lock().unwrap().iter().any(|(_, n, _)| n.as_str() > "3");
    let lb = stage.finish().await;
    figures("failed rollout", &r, &lb);

    assert_eq!(r.out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("missing /services/web/hosts/4") && stderr.contains("the old ones keep serving"),
        "{stderr}"
    );
    let failures = r.failures();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed, e.g. {:?}",
        failures.len(),
        r.samples.len(),
        &failures[..failures.len().min(10)]
    );
    assert!(
        unregistered.is_empty(),
        "{} answers from unregistered instances, e.g. {:?}",
        unregistered.len(),
        &unregistered[..unregistered.len().min(10)]
    );
    assert!(!new_ever_registered, "a never healthy instance was registered");
    assert!(
        r.samples
            .iter()
            .all(|s| matches!(s.answer.as_deref(), Ok("1" | "2" | "3"))),
        "only the old instances answer"
    );
    // Every new sidekick and instance stopped (sidekicks first), the old
    // ones untouched.
    let mut want_log = unit_commands(&["4", "5", "6"], &["4", "5", "6"]);
    want_log.truncate(6);
    want_log.extend(["4", "5", "6"].map(|n| format!("stop web_presence@{n}")));
    want_log.extend(["4", "5", "6"].map(|n| format!("stop web@{n}")));
    assert_eq!(log, want_log, "{stderr}");
    assert_eq!(running, ["1", "2", "3"].map(String::from).into());
    assert_eq!(sidekicks, ["1", "2", "3"].map(String::from).into());
    assert_eq!(keys, want_keys);
    assert_eq!(lb.proxy.servers(), old_addrs);
}

/// A reload through the master socket hands the listening socket from the
/// old worker to the new one (`-x sockpair@N`), so back-to-back reloads
/// under load refuse or reset no connection; the rollout relies on it.
#[tokio::test]
async fn haproxy_reloads_under_load_drop_no_request() {
    let stage = Stage::start(&[]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (stop, sent, port) = (stop.clone(), sent.clone(), stage.port);
            std::thread::spawn(move || load(port, &stop, &sent))
        })
        .collect();
    // The instances live on, and render has nothing to change: the test
    // reloads HAProxy itself.
    let _units = stage.units.clone();
    let mut lb = stage.finish().await;
    for _ in 0..RELOADS {
        lb.proxy.reload().await;
    }
    let enough = eventually(LOAD, || async { sent.load(Ordering::SeqCst) >= MIN_REQUESTS }).await;
    stop.store(true, Ordering::SeqCst);
    let samples: Vec<Sample> = clients.into_iter().flat_map(|c| c.join().unwrap()).collect();
    let failed: Vec<&String> = samples.iter().filter_map(|s| s.answer.as_ref().err()).collect();
    println!(
        "{RELOADS} reloads under load: {} requests, {} failed",
        samples.len(),
        failed.len()
    );
    assert!(enough, "only {} requests sent", samples.len());
    assert!(
        failed.is_empty(),
        "{} of {} requests failed, e.g. {:?}\n{}",
        failed.len(),
        samples.len(),
        &failed[..failed.len().min(10)],
        lb.report()
    );
}

#[test]
fn rollout_refuses_bad_usage_with_exit_2() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/rollout/rollout");
    for args in [
        &[][..],
        &["web", "1,2"],
        &["web", "1,2", "2,3"],
        &["web", "", "4"],
        &["web", "1,,2", "4"],
        &["we b", "1", "2"],
        &["web", "1", "2", "3"],
    ] {
        let out = Command::new("bash")
            .arg(script)
            .args(args)
            .env("START_CMD", "false")
            .env("STOP_CMD", "false")
            .env("SIDEKICK", "false")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.starts_with("usage: rollout"), "{args:?}: {stderr}");
    }
}
