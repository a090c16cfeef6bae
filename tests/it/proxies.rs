//! A real proxy (HAProxy, nginx) whose configuration a long-lived
//! `sidekick render` keeps from the keys that `sidekick run` sidekicks keep
//! in etcd, and what the tests of both proxies do through it: replace the
//! instances one by one under load without a failed request, and take a
//! failing instance out of the pool.
//!
//! Which configuration served a request is told by the response: each
//! rendered configuration makes the proxy add `X-Upstreams: [ADDR,...]`, its
//! server list, and `X-Worker: PID`, the worker process that answered. The
//! proxy sends nothing more to an address once every live worker of its
//! master has answered with a list without it: a worker started by an
//! older configuration has then exited, and a newer one lists what etcd
//! holds.

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::Client;
use tempfile::TempDir;

use crate::harness::bounds::*;
use crate::harness::proxy::{LOAD_REQUESTS, LOAD_TIME};
use crate::harness::*;

/// Where the instances of the scenarios keep their keys.
pub(crate) const PREFIX: &str = "/services/web/";
/// The instances' `--drain`: time for a render and a reload, with room.
const DRAIN: &str = "2s";
/// Probe timings of the instances' sidekicks: a probe answered late by a
/// backend on two cores busy with the load must not withdraw it.
const INTERVAL: &str = "500ms";
const TIMEOUT: &str = "400ms";
/// Requests sent after an instance left the pool, at least, before the
/// test judges that none went to it.
const AFTER: usize = 100;
/// How many times the proxy is started again on a fresh port after its
/// frontend port was taken.
const PORT_RETRIES: usize = 5;

/// A proxy the test starts on a rendered configuration file and reloads
/// with a signal to its master process.
pub(crate) trait Proxy: Sized {
    /// The configuration file's name, also the template's name in
    /// `sidekick render`'s status and metrics.
    const CONFIG: &'static str;
    /// Started until a worker serves, or signalled until only workers on
    /// the new configuration remain.
    const READY: Duration;

    /// The template for the keys under `prefix`: the frontend on `port`,
    /// every file of the proxy's own in `dir`.
    fn template(prefix: &str, port: u16, dir: &Path) -> String;

    /// `check_cmd`, `{{src}}` standing for the staged file.
    fn check_cmd(dir: &Path) -> String;

    /// `reload_cmd`: a signal to the master, and what it takes for the
    /// next one not to be lost (files it needs go in `dir`).
    fn reload_cmd(&self, dir: &Path) -> String;

    /// Starts the proxy on `cfg`, its frontend on `port`, and waits until
    /// a worker serves. `Err` with its log when the port was taken; any
    /// other failure fails the test.
    async fn spawn(cfg: &Path, dir: &Path, port: u16) -> Result<Self, String>;

    /// The frontend's port.
    fn port(&self) -> u16;

    /// The master process's PID.
    fn pid(&self) -> u32;

    /// What it logged.
    fn log(&self) -> String;
}

/// The live (not zombie) child processes of `pid`: a proxy master's workers,
/// current and old.
pub(crate) fn children(pid: u32) -> BTreeSet<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return BTreeSet::new();
    };
    dir.filter_map(|e| {
        let child: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).ok()?;
        // PID (COMM) STATE PPID ...; COMM may hold spaces and parentheses.
        let mut f = stat.rsplit_once(')')?.1.split_whitespace();
        let state = f.next()?;
        let ppid: u32 = f.next()?.parse().ok()?;
        (ppid == pid && state != "Z").then_some(child)
    })
    .collect()
}

/// A proxy and the `sidekick render` that keeps its configuration, with
/// their files in a temp dir; both are stopped on drop.
pub(crate) struct Rendered<P: Proxy> {
    /// `sidekick render SRC DEST --prefix P ... --reload-cmd CMD`.
    pub(crate) render: Running,
    pub(crate) proxy: P,
    /// The configuration file (DEST).
    pub(crate) cfg: PathBuf,
    /// The port of the render's `--status-addr`.
    status: u16,
    pub(crate) dir: TempDir,
}

impl<P: Proxy> Rendered<P> {
    /// Renders the keys under `prefix` once (`--once`, checked) and starts
    /// the proxy on the result, then starts the long-lived `sidekick
    /// render`, which reloads the proxy by signalling its master. A proxy
    /// that finds its frontend port taken is started again on another,
    /// rendered again for it.
    pub(crate) async fn start(etcd: &Etcd, prefix: &str) -> Rendered<P> {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join(P::CONFIG);
        let src = dir.path().join(format!("{}.j2", P::CONFIG));
        let (src_s, cfg_s) = (src.to_str().unwrap(), cfg.to_str().unwrap());
        let check = P::check_cmd(dir.path());
        let eps = etcd.endpoints();
        let common: [&str; 8] = [
            "--prefix",
            prefix,
            "--check-cmd",
            &check,
            "--endpoints",
            &eps,
            "--dial-timeout",
            "1s",
        ];
        let mut proxy = None;
        for attempt in 1..=PORT_RETRIES {
            let port = free_port();
            std::fs::write(&src, P::template(prefix, port, dir.path())).unwrap();
            let mut args = vec!["render", src_s, cfg_s, "--once"];
            args.extend(common);
            let out = bounded(sidekick(&args)).await;
            assert!(
                out.status.success(),
                "sidekick render --once failed ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            match P::spawn(&cfg, dir.path(), port).await {
                Ok(p) => {
                    proxy = Some(p);
                    break;
                }
                Err(log) => eprintln!(
                    "{} start {attempt}: port {port} was taken, trying another:\n{log}",
                    P::CONFIG
                ),
            }
        }
        let proxy = proxy.unwrap_or_else(|| panic!("{} found its port taken {PORT_RETRIES} times", P::CONFIG));
        let status = free_port();
        let reload = proxy.reload_cmd(dir.path());
        let status_addr = format!("127.0.0.1:{status}");
        let mut args: Vec<&str> = vec![
            "render",
            src_s,
            cfg_s,
            "--reload-cmd",
            &reload,
            "--status-addr",
            &status_addr,
        ];
        args.extend(common);
        let mut render = Running::start(&args);
        let up = eventually(SOON, || {
            let up = http_get(status, "127.0.0.1", "/status").is_ok();
            async move { up }
        })
        .await;
        assert!(
            up && render.alive(),
            "sidekick render does not serve /status on {status_addr}:\n{}",
            render.log()
        );
        Rendered {
            render,
            proxy,
            cfg,
            status,
            dir,
        }
    }

    /// The installed configuration.
    pub(crate) fn rendered(&self) -> String {
        std::fs::read_to_string(&self.cfg).unwrap_or_default()
    }

    /// `sidekick_reloads_total` of the template, from `/metrics`.
    pub(crate) fn reloads(&self) -> Option<u64> {
        let (code, body) = http_get(self.status, "127.0.0.1", "/metrics").ok()?;
        assert_eq!(code, 200, "{body}");
        let label = format!("template=\"{}\"", P::CONFIG);
        let sample = body
            .lines()
            .find(|l| l.starts_with("sidekick_reloads_total{") && l.contains(&label));
        // Absent before the first reload.
        Some(sample.map_or(0.0, |l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap()) as u64)
    }

    /// Everything that tells what happened: render's `/status` and log,
    /// the installed file, the proxy's log.
    pub(crate) fn report(&self) -> String {
        let status = http_get(self.status, "127.0.0.1", "/status")
            .map(|(_, body)| body)
            .unwrap_or_else(|e| format!("no answer: {e}"));
        format!(
            "render /status: {status}\n--- render log:\n{}\n--- {}:\n{}\n--- proxy log:\n{}",
            tail(&self.render.log(), 60),
            P::CONFIG,
            self.rendered(),
            tail(&self.proxy.log(), 40)
        )
    }

    /// Waits up to `limit` until every live worker of the proxy has
    /// answered `load` with the server list `want`: the proxy sends every
    /// request to one of `want` from then on.
    pub(crate) async fn serves_only(&self, load: &Load, want: &BTreeSet<String>, limit: Duration) -> bool {
        eventually(limit, || {
            let workers = children(self.proxy.pid());
            let seen = load.seen.lock().unwrap();
            let ok = !workers.is_empty() && workers.iter().all(|w| seen.configs.get(w) == Some(want));
            async move { ok }
        })
        .await
    }
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs a command that ends by itself; fails the test when it does not
/// within [`HANG`].
async fn bounded(mut cmd: std::process::Command) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    match tokio::time::timeout(HANG, tokio::task::spawn_blocking(move || child.wait_with_output())).await {
        Ok(out) => out.unwrap().unwrap(),
        Err(_) => {
            signal(pid, "KILL");
            panic!("{cmd:?} did not end within {HANG:?}");
        }
    }
}

/// One instance: a backend answering `served by NAME` (503 while
/// unhealthy) and its `sidekick run` keeping `PREFIX/NAME = ADDR`.
pub(crate) struct Instance {
    pub(crate) name: String,
    pub(crate) key: String,
    pub(crate) addr: String,
    pub(crate) backend: Backend,
    pub(crate) sidekick: Running,
}

impl Instance {
    /// Starts the backend and its sidekick and waits until the key is in
    /// etcd.
    pub(crate) async fn start(name: &str, etcd: &Etcd, c: &Client) -> Instance {
        let backend = Backend::answering(&format!("served by {name}\n"));
        let (key, addr, url) = (format!("{PREFIX}{name}"), backend.addr.to_string(), backend.url());
        let eps = etcd.endpoints();
        let args = fast_run(&key, &addr, &url, &eps, "2", "2")
            .with("--interval", INTERVAL)
            .with("--timeout", TIMEOUT)
            .with("--drain", DRAIN);
        let sidekick = Running::start(&args);
        assert!(
            key_becomes(c, &key, Some(&addr), sidekick.figures().registration()).await,
            "{key} never registered:\n{}",
            sidekick.log()
        );
        Instance {
            name: name.to_string(),
            key,
            addr,
            backend,
            sidekick,
        }
    }
}

/// One request through the proxy.
pub(crate) struct Sample {
    pub(crate) start: Instant,
    pub(crate) end: Instant,
    /// The instance that answered `200 served by NAME`, or what went wrong.
    pub(crate) answer: Result<String, String>,
}

/// What the client has seen so far.
#[derive(Default)]
pub(crate) struct Seen {
    pub(crate) samples: Vec<Sample>,
    /// The server list each worker answered with (a worker's never
    /// changes: a reload starts new workers).
    pub(crate) configs: HashMap<u32, BTreeSet<String>>,
}

/// A client sending requests through the proxy on its own thread, one
/// after the other without pause, until told to stop (by [`Load::finish`],
/// or on drop when the test fails first) or until [`LOAD_TIME`] or
/// [`LOAD_REQUESTS`].
pub(crate) struct Load {
    stop: Arc<AtomicBool>,
    pub(crate) seen: Arc<Mutex<Seen>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    pub(crate) fn start(port: u16) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let seen: Arc<Mutex<Seen>> = Default::default();
        let (s, shared) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            let began = Instant::now();
            for i in 0..LOAD_REQUESTS {
                if s.load(Ordering::SeqCst) || began.elapsed() >= LOAD_TIME {
                    return;
                }
                let start = Instant::now();
                let (answer, worker, upstreams) = match request(port, &format!("/r{i}")) {
                    Ok(reply) => {
                        let worker = reply.header("x-worker").and_then(|w| w.parse::<u32>().ok());
                        let upstreams = reply.header("x-upstreams").map(upstream_set);
                        let answer = match reply.body.strip_prefix("served by ") {
                            Some(n) if reply.code == 200 => Ok(n.trim().to_string()),
                            _ => Err(format!("{} {:?}", reply.code, reply.body)),
                        };
                        (answer, worker, upstreams)
                    }
                    Err(e) => (Err(e), None, None),
                };
                let mut seen = shared.lock().unwrap();
                if let (Some(w), Some(u)) = (worker, upstreams) {
                    seen.configs.entry(w).or_insert(u);
                }
                seen.samples.push(Sample {
                    start,
                    end: Instant::now(),
                    answer,
                });
            }
        });
        Load {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    /// Whether instance `name` answered a request sent after `since`.
    pub(crate) fn answered_since(&self, name: &str, since: Instant) -> bool {
        let seen = self.seen.lock().unwrap();
        seen.samples
            .iter()
            .rev()
            .take_while(|s| s.start >= since)
            .any(|s| s.answer.as_deref() == Ok(name))
    }

    /// Requests sent after `since`.
    pub(crate) fn sent_since(&self, since: Instant) -> usize {
        let seen = self.seen.lock().unwrap();
        seen.samples.iter().rev().take_while(|s| s.start >= since).count()
    }

    /// Waits up to `limit` until instance `name` answers a request sent
    /// after `since`.
    pub(crate) async fn answers(&self, name: &str, since: Instant, limit: Duration) -> bool {
        eventually(limit, || {
            let ok = self.answered_since(name, since);
            async move { ok }
        })
        .await
    }

    /// Waits up to [`SOON`] until [`AFTER`] requests were sent after
    /// `since`.
    pub(crate) async fn more_sent(&self, since: Instant) -> bool {
        eventually(SOON, || {
            let ok = self.sent_since(since) >= AFTER;
            async move { ok }
        })
        .await
    }

    /// Stops the client; every request it sent.
    pub(crate) fn finish(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap();
        std::mem::take(&mut self.seen.lock().unwrap().samples)
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

/// `[ADDR,ADDR]` as a set.
fn upstream_set(header: &str) -> BTreeSet<String> {
    let list = header.trim().trim_start_matches('[').trim_end_matches(']');
    list.split(',').filter(|a| !a.is_empty()).map(str::to_string).collect()
}

/// What the templates print in `X-Upstreams`: the rendered server
/// addresses, comma-separated, in key order, in brackets.
pub(crate) const UPSTREAMS: &str = "[{% for kv in gets(\"@PREFIX@*\") %}{{ kv.value|addr }}\
{% if not loop.last %},{% endif %}{% endfor %}]";

/// An HTTP answer.
struct Reply {
    code: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        let h = self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name));
        h.map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.0 GET through the proxy, or what went wrong.
fn request(port: u16, path: &str) -> Result<Reply, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(IO)).unwrap();
    s.set_write_timeout(Some(IO)).unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: web.test\r\nConnection: close\r\n\r\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no header end: {text:?}"))?;
    let mut lines = head.lines();
    let code = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status: {head:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(Reply {
        code,
        headers,
        body: body.to_string(),
    })
}

/// The answers of `samples` per instance, and the failures.
fn tally(samples: &[Sample]) -> (std::collections::BTreeMap<&str, usize>, Vec<&str>) {
    let mut by = std::collections::BTreeMap::new();
    let mut failed = Vec::new();
    for s in samples {
        match &s.answer {
            Ok(n) => *by.entry(n.as_str()).or_default() += 1,
            Err(e) => failed.push(e.as_str()),
        }
    }
    (by, failed)
}

/// Instances `a` and `b` are replaced by `a2` and `b2` while a client sends
/// requests through the proxy without pause; no request fails. For each:
/// the new instance starts and registers, and the proxy serves it; the old
/// one's sidekick is stopped (SIGTERM: withdraw, drain, exit), and once
/// render has installed the file without it and the proxy has reloaded,
/// no request goes to it; then the old instance stops.
pub(crate) async fn rolling_update<P: Proxy>() {
    let etcd = Etcd::start().await;
    let c = etcd.client(0).await;
    let mut old = vec![
        Instance::start("a", &etcd, &c).await,
        Instance::start("b", &etcd, &c).await,
    ];
    let lb = Rendered::<P>::start(&etcd, PREFIX).await;
    let load = Load::start(lb.proxy.port());
    let began = Instant::now();
    let mut pool: BTreeSet<String> = old.iter().map(|i| i.addr.clone()).collect();
    // The first file was rendered before the proxy started, with both.
    let react = RENDER_REACTS + P::READY;
    assert!(lb.serves_only(&load, &pool, P::READY).await, "{}", lb.report());
    for i in &old {
        assert!(
            load.answers(&i.name, began, SOON).await,
            "{} answers nothing\n{}",
            i.name,
            lb.report()
        );
    }

    let mut out_of_pool = Vec::new();
    let mut new = Vec::new();
    for name in ["a2", "b2"] {
        let since = Instant::now();
        let fresh = Instance::start(name, &etcd, &c).await;
        assert!(
            load.answers(name, since, react).await,
            "the proxy never sent a request to {name}\n{}",
            lb.report()
        );
        pool.insert(fresh.addr.clone());
        let mut gone = old.remove(0);
        let f = gone.sidekick.figures();
        gone.sidekick.signal("TERM");
        assert!(
            key_becomes(&c, &gone.key, None, f.stop_withdrawal()).await,
            "{} stayed\n{}",
            gone.key,
            gone.sidekick.log()
        );
        pool.remove(&gone.addr);
        assert!(
            lb.serves_only(&load, &pool, react).await,
            "the proxy did not come to serve only {pool:?} once {} was withdrawn\n{}",
            gone.name,
            lb.report()
        );
        out_of_pool.push((gone.name.clone(), Instant::now()));
        assert!(!lb.rendered().contains(&gone.addr), "{}", lb.report());
        let st = gone.sidekick.exit_within(f.exit()).await;
        assert!(
            st.is_some_and(|s| s.success()),
            "the sidekick of {} ended {st:?}\n{}",
            gone.name,
            gone.sidekick.log()
        );
        // The instance stops: its listener closes.
        drop(gone);
        new.push(fresh);
    }
    let end = Instant::now();
    assert!(load.more_sent(end).await, "the client stalled\n{}", lb.report());
    let reloads = lb.reloads();
    let samples = load.finish();

    let (by, failed) = tally(&samples);
    println!(
        "{}: rolling update a,b -> a2,b2: {} requests, {} failed, {reloads:?} reloads, answered by {by:?}",
        P::CONFIG,
        samples.len(),
        failed.len(),
    );
    assert!(
        failed.is_empty(),
        "{} of {} requests failed, e.g. {:?}\n{}",
        failed.len(),
        samples.len(),
        &failed[..failed.len().min(10)],
        lb.report()
    );
    for (name, at) in &out_of_pool {
        let late = samples
            .iter()
            .filter(|s| s.start > *at && s.answer.as_deref() == Ok(name.as_str()))
            .count();
        assert_eq!(late, 0, "{name} answered {late} requests sent after it left the pool");
    }
    for name in ["a", "b", "a2", "b2"] {
        assert!(by.contains_key(name), "{name} answered nothing: {by:?}");
    }
    assert!(samples.iter().filter(|s| s.start > end).count() >= AFTER);
}

/// A failing instance leaves the pool: once its sidekick has withdrawn it
/// and render has installed and reloaded the file without it, no request
/// goes to it (before that, the requests it gets fail with its 503: what
/// an instance failing on its own costs). It recovers and serves again.
pub(crate) async fn failing_instance<P: Proxy>() {
    let etcd = Etcd::start().await;
    let c = etcd.client(0).await;
    let a = Instance::start("a", &etcd, &c).await;
    let b = Instance::start("b", &etcd, &c).await;
    let lb = Rendered::<P>::start(&etcd, PREFIX).await;
    let load = Load::start(lb.proxy.port());
    let began = Instant::now();
    let both: BTreeSet<String> = [a.addr.clone(), b.addr.clone()].into();
    let react = RENDER_REACTS + P::READY;
    assert!(lb.serves_only(&load, &both, P::READY).await, "{}", lb.report());
    for i in [&a, &b] {
        assert!(
            load.answers(&i.name, began, SOON).await,
            "{} answers nothing\n{}",
            i.name,
            lb.report()
        );
    }

    let f = a.sidekick.figures();
    let failed_at = Instant::now();
    a.backend.set_healthy(false);
    assert!(
        key_becomes(&c, &a.key, None, f.withdrawal()).await,
        "the failing instance's key stayed\n{}",
        a.sidekick.log()
    );
    let only_b: BTreeSet<String> = [b.addr.clone()].into();
    assert!(
        lb.serves_only(&load, &only_b, react).await,
        "the proxy did not come to serve only b once a was withdrawn\n{}",
        lb.report()
    );
    let out_at = Instant::now();
    assert!(!lb.rendered().contains(&a.addr), "{}", lb.report());
    assert!(load.more_sent(out_at).await, "the client stalled\n{}", lb.report());

    let back_at = Instant::now();
    a.backend.set_healthy(true);
    assert!(
        key_becomes(&c, &a.key, Some(&a.addr), f.reregistration()).await,
        "the recovered instance's key did not return\n{}",
        a.sidekick.log()
    );
    assert!(
        load.answers("a", back_at, react).await,
        "the proxy never sent a request to the recovered instance\n{}",
        lb.report()
    );
    assert!(lb.serves_only(&load, &both, react).await, "{}", lb.report());
    let samples = load.finish();

    let (by, failed) = tally(&samples);
    println!(
        "{}: a failing for {:?} until it left the pool: {} requests, {} failed, answered by {by:?}",
        P::CONFIG,
        out_at - failed_at,
        samples.len(),
        failed.len(),
    );
    // Only requests sent to a while it failed and was still in the pool
    // failed (a request in flight when it turned unhealthy may count),
    // and with a's own answer.
    let wrong: Vec<String> = samples
        .iter()
        .filter_map(|s| {
            let e = s.answer.as_ref().err()?;
            let when = s.start.saturating_duration_since(began);
            let in_window = s.end >= failed_at && s.start <= out_at;
            (!in_window || e != "503 \"down\\n\"").then(|| format!("{e} (sent at {when:?})"))
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{} requests failed otherwise or outside a's failure, e.g. {:?}; a failed at {:?} and left at {:?}\n{}",
        wrong.len(),
        &wrong[..wrong.len().min(10)],
        failed_at - began,
        out_at - began,
        lb.report()
    );
    let after = samples.iter().filter(|s| s.start > out_at && s.start < back_at).count();
    assert!(after >= AFTER, "only {after} requests sent while a was out of the pool");
}
