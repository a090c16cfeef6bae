//! `sidekick render` against a real etcd: files rendered from the keys
//! under prefixes, followed through a watch, checked, installed atomically
//! and reloaded; what it keeps when etcd, a check or a reload fails; what
//! it refuses before writing anything; and what it costs while idle.

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, CompactionOptions, Txn, TxnOp};
use tempfile::TempDir;

use crate::harness::bounds::*;
use crate::harness::*;

/// `--dial-timeout` of every render here.
const DIAL: &str = "1s";

/// How long the reload command of the overlap test takes: long enough
/// that the other template's reload is due while it runs. The scenario
/// itself (a slow reload), not a wait for something.
const RELOAD_TAKES: &str = "0.3";

/// The servers under `/app/web/`, one line each, through `addr`.
const SERVERS: &str = "{% for kv in gets(\"/app/web/*\") %}server {{ kv.key|base }} {{ kv.value|addr }}\n{% endfor %}";

/// What [`SERVERS`] renders for `(name, address)` pairs in key order.
fn servers(pairs: &[(&str, &str)]) -> String {
    pairs.iter().map(|(n, a)| format!("server {n} {a}\n")).collect()
}

/// One test's files: templates and configuration at the top, destinations
/// under `out/`, what its commands record under `log/`.
struct Site(TempDir);

impl Site {
    fn new() -> Site {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["out", "log", "staged"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        Site(dir)
    }

    fn path(&self, rel: &str) -> String {
        self.0.path().join(rel).to_str().unwrap().to_string()
    }

    /// Writes `rel` and returns its path.
    fn write(&self, rel: &str, text: &str) -> String {
        let p = self.path(rel);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn read(&self, rel: &str) -> Option<String> {
        std::fs::read_to_string(self.path(rel)).ok()
    }

    /// The names in directory `rel`, sorted.
    fn ls(&self, rel: &str) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.path(rel))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    /// The lines a command appended to `log/NAME` (none when it never ran).
    fn record(&self, name: &str) -> Vec<String> {
        self.read(&format!("log/{name}"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// A check command that copies each staged rendering into `staged/`,
    /// named by the time it ran, so that the test sees every rendering
    /// that was about to be installed, in order. `{{src}}` comes quoted
    /// for the shell already.
    fn stage_cmd(&self) -> String {
        format!("cp {} \"{}/$(date +%s%N)-$$\"", "{{src}}", self.path("staged"))
    }

    /// Every staged rendering, oldest first.
    fn staged(&self) -> Vec<String> {
        self.ls("staged")
            .iter()
            .map(|n| self.read(&format!("staged/{n}")).unwrap())
            .collect()
    }

    /// A reload command that appends a line to `log/NAME`.
    fn note_cmd(&self, name: &str) -> String {
        format!("echo reload >> \"{}\"", self.path(&format!("log/{name}")))
    }
}

/// `render SRC DEST --prefix P...` against `eps`, with a 1 s dial timeout.
fn render<'a>(src: &'a str, dest: &'a str, eps: &'a str, prefixes: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["render", src, dest, "--endpoints", eps, "--dial-timeout", DIAL];
    for p in prefixes {
        v.extend(["--prefix", p]);
    }
    v
}

/// `render --config PATH` against `eps`, with a 1 s dial timeout.
fn render_config<'a>(config: &'a str, eps: &'a str) -> Vec<&'a str> {
    vec!["render", "--config", config, "--endpoints", eps, "--dial-timeout", DIAL]
}

/// A free loopback address for `--status-addr`, for the life of the test
/// binary (the argument lists borrow it).
fn status_addr() -> &'static str {
    String::leak(format!("127.0.0.1:{}", free_port()))
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':').unwrap().1.trim_end_matches('/').parse().unwrap()
}

/// The samples of `name` (all of them when `labels` is empty) on a
/// Prometheus endpoint, summed; `None` while it does not answer.
fn prom_sum(port: u16, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let (code, body) = http_get(port, "127.0.0.1", "/metrics").ok()?;
    assert_eq!(code, 200, "{body}");
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
    let sum = scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{name}: {other:?}"),
        })
        .sum();
    Some(sum)
}

/// A render counter of `template` on the status server (0 before its
/// first increment).
fn counter(addr: &str, name: &str, template: &str) -> f64 {
    prom_sum(port_of(addr), name, &[("template", template)]).expect("the status server answers")
}

/// Waits until a render counter of `template` is at least `n`.
async fn counter_reaches(addr: &str, name: &str, template: &str, n: f64, limit: Duration) -> bool {
    eventually(limit, || async {
        prom_sum(port_of(addr), name, &[("template", template)]).is_some_and(|v| v >= n)
    })
    .await
}

/// `/status` as JSON, `None` while the server does not answer.
fn status(addr: &str) -> Option<serde_json::Value> {
    let (code, body) = http_get(port_of(addr), "127.0.0.1", "/status").ok()?;
    assert_eq!(code, 200, "{body}");
    Some(serde_json::from_str(&body).unwrap_or_else(|e| panic!("/status is not JSON ({e}): {body}")))
}

/// The `/status` entry of template `name`.
fn template_status(addr: &str, name: &str) -> serde_json::Value {
    let s = status(addr).expect("the status server answers");
    s["templates"]
        .as_array()
        .unwrap_or_else(|| panic!("no templates array: {s}"))
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("no template {name}: {s}"))
        .clone()
}

/// A counter of etcd's own, summed over its labels, read on its client URL.
fn etcd_metric(etcd: &Etcd, name: &str, labels: &[(&str, &str)]) -> f64 {
    prom_sum(port_of(&etcd.url(0)), name, labels).expect("etcd serves /metrics")
}

/// Waits until the file at `path` holds exactly `want`.
async fn file_becomes(path: &str, want: &str, limit: Duration) -> bool {
    eventually(limit, || async {
        std::fs::read_to_string(path).ok().as_deref() == Some(want)
    })
    .await
}

/// A rendering that waited for etcd: the read backoff's cap, then a read
/// bounded by the dial timeout.
fn etcd_back() -> Duration {
    RENDER_READ_BACKOFF_CAP + flag(DIAL) + SLACK
}

/// Runs a command that ends by itself; fails the test when it hangs.
async fn finish(args: &[&str]) -> Output {
    output_within(sidekick(args), HANG).await
}

/// `sidekick ARGS` run to its end: exit code, stdout, stderr.
async fn once(args: &[&str]) -> (Option<i32>, String, String) {
    let o = finish(args).await;
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
    (o.status.code(), text(o.stdout), text(o.stderr))
}

/// Its log without the HTTP/2 frames, for a failure message.
fn shown(sk: &Running) -> String {
    sk.log()
        .lines()
        .filter(|l| !l.contains("frame=") && !l.contains("Connection{"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// How many lines of its log are warnings or errors.
fn problems(sk: &Running) -> usize {
    sk.log()
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .count()
}

/// Puts `key`; returns the revision of the write.
async fn put(c: &mut Client, key: &str, value: &str) -> i64 {
    c.put(key, value, None).await.unwrap().header().unwrap().revision()
}

async fn delete(c: &mut Client, key: &str) -> i64 {
    c.delete(key, None).await.unwrap().header().unwrap().revision()
}

/// Inode and modification time: what a rewrite, even of the same bytes,
/// would change.
fn stamp(path: &str) -> (u64, i64, i64) {
    let m = std::fs::metadata(path).unwrap();
    (m.ino(), m.mtime(), m.mtime_nsec())
}

fn mode(path: &str) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Records every distinct content a file shows, from a thread polling it,
/// until dropped: to check that nothing else ever showed meanwhile.
struct Watcher {
    seen: Arc<Mutex<BTreeSet<Option<String>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watcher {
    fn on(path: &str) -> Watcher {
        let (seen, stop) = (Arc::new(Mutex::new(BTreeSet::new())), Arc::new(AtomicBool::new(false)));
        let (s, st, path) = (seen.clone(), stop.clone(), path.to_string());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                s.lock().unwrap().insert(std::fs::read_to_string(&path).ok());
                // Sampling the file is what this watcher is for.
                std::thread::sleep(POLL);
            }
        });
        Watcher {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    /// Stops it and returns what it saw.
    fn seen(mut self) -> BTreeSet<Option<String>> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap();
        self.seen.lock().unwrap().clone()
    }
}

// ---------------------------------------------------------------------------
// Following etcd

#[tokio::test]
async fn renders_the_keys_and_follows_puts_changes_and_deletes() {
    let etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let mut c = etcd.client(0).await;
    let site = Site::new();
    let (src, dest) = (site.write("web.tmpl", SERVERS), site.path("out/web.cfg"));
    let addr = status_addr();
    put(&mut c, "/app/web/1", "10.0.0.1:80").await;
    put(&mut c, "/app/web/2", "10.0.0.2:80").await;
    // Outside the prefix: never read.
    put(&mut c, "/other/web/9", "10.0.0.9:80").await;

    let args = render(&src, &dest, &eps, &["/app/web/"])
        .with("--status-addr", addr)
        .with("--log-format", "json");
    let sk = Running::start(&args);
    let want = servers(&[("1", "10.0.0.1:80"), ("2", "10.0.0.2:80")]);
    assert!(file_becomes(&dest, &want, SOON).await, "{}", shown(&sk));
    assert_eq!(mode(&dest), 0o644, "a new file gets 0644");

    put(&mut c, "/app/web/1", "10.0.0.11:81").await;
    let want = servers(&[("1", "10.0.0.11:81"), ("2", "10.0.0.2:80")]);
    assert!(file_becomes(&dest, &want, SOON).await, "{}", shown(&sk));
    delete(&mut c, "/app/web/2").await;
    assert!(
        file_becomes(&dest, &servers(&[("1", "10.0.0.11:81")]), SOON).await,
        "{}",
        shown(&sk)
    );
    let last = put(&mut c, "/app/web/3", "web3.example.com:8080").await;
    let want = servers(&[("1", "10.0.0.11:81"), ("3", "web3.example.com:8080")]);
    assert!(file_becomes(&dest, &want, SOON).await, "{}", shown(&sk));

    // The board: the revision rendered, the time, no error, four renders.
    let at_last = || async { template_status(addr, "web.cfg")["revision"].as_i64() == Some(last) };
    assert!(eventually(SOON, at_last).await, "{:?}", status(addr));
    let t = template_status(addr, "web.cfg");
    assert!(t["dest"].as_str().unwrap().ends_with("out/web.cfg"), "{t}");
    let when = t["last_render"].as_str().unwrap_or_else(|| panic!("{t}"));
    assert!(when.len() >= 20 && when.as_bytes()[10] == b'T', "RFC 3339: {t}");
    assert!(t["last_error"].is_null(), "{t}");
    assert!(t["renders"].as_f64().unwrap() >= 4.0, "{t}");
    for figure in [
        "last_read_s",
        "last_render_s",
        "last_check_s",
        "last_reload_s",
        "wait_max_s",
    ] {
        let v = &t[figure];
        assert!(v.is_null() || v.as_f64().is_some_and(|s| s >= 0.0), "{figure}: {t}");
        assert!(t.get(figure).is_some(), "{figure}: {t}");
    }
    assert!(counter(addr, "sidekick_render_total", "web.cfg") >= 4.0);
    assert_eq!(counter(addr, "sidekick_render_errors_total", "web.cfg"), 0.0);
    assert_eq!(http_get(port_of(addr), "127.0.0.1", "/healthz").unwrap().0, 200);

    // One JSON object a line; each install names the dest and its revision,
    // later installs later revisions, the last one the last change's.
    let log = sk.log();
    let installs: Vec<i64> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .filter(|l| l["message"].as_str().is_some_and(|m| m.contains("installed")))
        .map(|l| {
            assert!(l["dest"].as_str().is_some_and(|d| d.ends_with("web.cfg")), "{l}");
            match &l["revision"] {
                serde_json::Value::Number(n) => n.as_i64().unwrap(),
                serde_json::Value::String(s) => s.parse().unwrap(),
                other => panic!("revision {other}: {l}"),
            }
        })
        .collect();
    assert_eq!(installs.len(), 4, "{log}");
    assert!(installs.windows(2).all(|w| w[0] < w[1]), "{installs:?}");
    assert_eq!(*installs.last().unwrap(), last);
}

#[tokio::test]
async fn an_unchanged_rendering_writes_nothing_and_reloads_nothing() {
    let etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let mut c = etcd.client(0).await;
    let site = Site::new();
    let (src, dest) = (site.write("web.tmpl", SERVERS), site.path("out/web.cfg"));
    let reload = site.note_cmd("reloads");
    put(&mut c, "/app/web/1", "10.0.0.1:80").await;
    // The template prints /app/web/* only; the prefix covers more.
    let sk = Running::start(&render(&src, &dest, &eps, &["/app/"]).with("--reload-cmd", &reload));
    let want = servers(&[("1", "10.0.0.1:80")]);
    assert!(file_becomes(&dest, &want, SOON).await, "{}", shown(&sk));
    let reloaded_once = || async { site.record("reloads").len() == 1 };
    assert!(eventually(SOON, reloaded_once).await, "{}", shown(&sk));
    let before = stamp(&dest);

    // A key the template does not print, then the same value put again:
    // two new revisions, one rendering.
    put(&mut c, "/app/other/x", "1").await;
    put(&mut c, "/app/web/1", "10.0.0.1:80").await;
    let_pass(QUIET).await;
    assert_eq!(stamp(&dest), before, "not rewritten: {}", shown(&sk));
    assert_eq!(site.record("reloads").len(), 1, "not reloaded: {}", shown(&sk));
    assert_eq!(site.ls("out"), ["web.cfg"]);

    // Those events came before this one, and none of them installed or
    // reloaded anything.
    put(&mut c, "/app/web/2", "10.0.0.2:80").await;
    let want = servers(&[("1", "10.0.0.1:80"), ("2", "10.0.0.2:80")]);
    assert!(file_becomes(&dest, &want, SOON).await, "{}", shown(&sk));
    assert!(eventually(SOON, || async { site.record("reloads").len() == 2 }).await);
    let_pass(QUIET).await;
    assert_eq!(
        site.record("reloads").len(),
        2,
        "one reload per install: {}",
        shown(&sk)
    );
}

#[tokio::test]
async fn the_mode_is_0644_when_new_the_existing_one_otherwise_and_mode_wins() {
    let etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let mut c = etcd.client(0).await;
    let site = Site::new();
    let src = site.write("web.tmpl", SERVERS);
    put(&mut c, "/app/web/1", "10.0.0.1:80").await;
    let want = servers(&[("1", "10.0.0.1:80")]);

    let new = site.path("out/new.cfg");
    let (code, _, err) = once(&render(&src, &new, &eps, &["/app/web/"]).and(&["--once"])).await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!((site.read("out/new.cfg").unwrap(), mode(&new)), (want.clone(), 0o644));

    let kept = site.write("out/kept.cfg", "old\n");
    std::fs::set_permissions(&kept, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, _, err) = once(&render(&src, &kept, &eps, &["/app/web/"]).and(&["--once"])).await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!((site.read("out/kept.cfg").unwrap(), mode(&kept)), (want.clone(), 0o600));

    let given = site.path("out/given.cfg");
    let args = render(&src, &given, &eps, &["/app/web/"]).with("--mode", "0640");
    let (code, _, err) = once(&args.and(&["--once"])).await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        (site.read("out/given.cfg").unwrap(), mode(&given)),
        (want.clone(), 0o640)
    );

    // --mode over an existing file's mode; a long-running render too.
    let over = site.write("out/over.cfg", "old\n");
    std::fs::set_permissions(&over, std::fs::Permissions::from_mode(0o600)).unwrap();
    let sk = Running::start(&render(&src, &over, &eps, &["/app/web/"]).with("--mode", "0604"));
    assert!(file_becomes(&over, &want, SOON).await, "{}", shown(&sk));
    assert_eq!(mode(&over), 0o604);
    assert_eq!(site.ls("out"), ["given.cfg", "kept.cfg", "new.cfg", "over.cfg"]);
}

/// The burst's template: the keys each transaction writes together, and
/// a key written alone.
const BURST: &str = "a={{ getv(\"/burst/a\", \"-\") }} b={{ getv(\"/burst/b\", \"-\") }} \
c={{ getv(\"/burst/c\", \"-\") }} x={% for kv in gets(\"/burst/x/*\") %}{{ kv.value }};{% endfor %}\n\
solo={{ getv(\"/burst/solo\", \"-\") }}\n";

fn burst_rendering(generation: &str, solo: &str) -> String {
    let x = if generation == "-" {
        String::new()
    } else {
        format!("{generation};")
    };
    format!("a={generation} b={generation} c={generation} x={x}\nsolo={solo}\n")
}

/// The generation and solo value of one rendering of [`BURST`], after
/// checking that it shows one transaction whole.
fn burst_parts(r: &str) -> (i64, i64) {
    let field = |name: &str| -> &str {
        r.split([' ', '\n'])
            .find_map(|f| f.strip_prefix(name).and_then(|f| f.strip_prefix('=')))
            .unwrap_or_else(|| panic!("no {name} in {r:?}"))
    };
    let g = field("a");
    assert_eq!(r, burst_rendering(g, field("solo")), "one revision, whole");
    let num = |s: &str| if s == "-" { -1 } else { s.parse().unwrap() };
    (num(g), num(field("solo")))
}

#[tokio::test]
async fn a_burst_ends_on_the_last_revision_and_no_rendering_mixes_revisions() {
    let etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let mut c = etcd.client(0).await;
    let site = Site::new();
    let (src, dest) = (site.write("burst.tmpl", BURST), site.path("out/burst.cfg"));
    let check = site.stage_cmd();
    let sk = Running::start(&render(&src, &dest, &eps, &["/burst/"]).with("--check-cmd", &check));
    assert!(
        file_becomes(&dest, &burst_rendering("-", "-"), SOON).await,
        "{}",
        shown(&sk)
    );

    // 200 writes without pause: every fourth a transaction of five keys
    // (a, b, c put, the previous x deleted, a new x put), the others one
    // key alone. Every write changes the rendering.
    let (mut generation, mut solo) = (String::from("-"), String::from("-"));
    for i in 0..200 {
        if i % 4 == 0 {
            let g = format!("{i:03}");
            let mut ops = vec![
                TxnOp::put("/burst/a", g.as_str(), None),
                TxnOp::put("/burst/b", g.as_str(), None),
                TxnOp::put("/burst/c", g.as_str(), None),
                TxnOp::put(format!("/burst/x/{g}"), g.as_str(), None),
            ];
            if generation != "-" {
                ops.push(TxnOp::delete(format!("/burst/x/{generation}"), None));
            }
            c.txn(Txn::new().and_then(ops)).await.unwrap();
            generation = g;
        } else {
            solo = format!("{i:03}");
            put(&mut c, "/burst/solo", &solo).await;
        }
    }
    let last = revision(&mut c).await;
    let want = burst_rendering(&generation, &solo);
    assert!(file_becomes(&dest, &want, CATCH_UP).await, "{}", shown(&sk));

    // Every rendering that reached the check showed whole transactions,
    // and none went back in time; the last one is what was installed.
    let staged = site.staged();
    let parts: Vec<(i64, i64)> = staged.iter().map(|r| burst_parts(r)).collect();
    assert!(
        parts.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1),
        "in order: {parts:?}"
    );
    assert_eq!(staged.last(), Some(&want));
    assert!(
        parts.len() <= 201,
        "one rendering per revision at most: {}",
        parts.len()
    );
    assert_eq!(site.ls("out"), ["burst.cfg"], "no temporary file left");
    drop(sk);

    // A fresh start reads the same revision and finds nothing to do.
    let before = stamp(&dest);
    let (code, _, err) = once(&render(&src, &dest, &eps, &["/burst/"]).and(&["--once"])).await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!((stamp(&dest), revision(&mut c).await), (before, last));
}

// ---------------------------------------------------------------------------
// Check and reload

#[tokio::test]
async fn a_failing_check_keeps_the_installed_file_and_the_next_change_tries_again() {
    let etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let mut c = etcd.client(0).await;
    let site = Site::new();
    let (src, dest) = (site.write("web.tmpl", SERVERS), site.path("out/web.cfg"));
    let addr = status_addr();
    // Rejects any rendering that mentions a bad host, and says why.
    let check = format!(
        "{}; if grep -q bad {}; then echo 'config rejected: bad host' >&2; exit 1; fi",
        site.stage_cmd(),
        "{{src}}"
    );
    put(&mut c, "/app/web/1", "10.0.0.1:80").await;
    let args = render(&src, &dest, &eps, &["/app/web/"])
        .with("--check-cmd", &check)
        .with("--status-addr", addr);
    let sk = Running::start(&args);
    let good = servers(&[("1", "10.0.0.1:80")]);
    assert!(file_becomes(&dest, &good, SOON).await, "{}", shown(&sk));

    put(&mut c, "/app/web/2", "bad.example.com:80").await;
    let counted = counter_reaches(addr, "sidekick_render_errors_total", "web.cfg", 1.0, SOON).await;
    assert!(counted, "{}", shown(&sk));
    assert_eq!(site.read("out/web.cfg").unwrap(), good, "the installed file stays");
    assert_eq!(site.ls("out"), ["web.cfg"], "the staged file is gone");
    let checked = site.staged();
    assert!(
        checked.len() >= 2 && checked[1].contains("bad"),
        "the rejected rendering was checked: {checked:?}"
    );
    assert!(
        sk.logs("config rejected: bad host", SOON).await,
        "the check's output is logged"
    );
    let t = template_status(addr, "web.cfg");
    assert!(t["last_error"].is_string(), "{t}");

    // The next change is tried (a fresh read after a broken watch may try
    // the rejected one again meanwhile, and be rejected again).
    put(&mut c, "/app/web/2", "good.example.com:80").await;
    let want = servers(&[("1", "10.0.0.1:80"), ("2", "good.example.com:80")]);
    assert!(file_becomes(&dest, &want, SOON).await, "{}", shown(&sk));
    assert_eq!(site.staged().last(), Some(&want), "checked before it was installed");
    let errors = counter(addr, "sidekick_render_errors_total", "web.cfg");
    let rejected = site.staged().iter().filter(|r| r.contains("bad")).count();
    assert_eq!(errors, rejected as f64, "each rejection counted once");
    assert_eq!(site.ls("out"), ["web.cfg"]);
}

#[tokio::test]
async fn an_undefined_value_is_a_render_error_that_keeps_the_file() {
    let etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let mut c = etcd.client(0).await;
    let site = Site::new();
    let src = site.write("w.tmpl", "weight {{ keys[\"/app/weight\"] }}\n");
    let dest = site.write("out/w.cfg", "old\n");
    let addr = status_addr();

    let (code, _, err) = once(&render(&src, &dest, &eps, &["/app/"]).and(&["--once"])).await;
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(site.read("out/w.cfg").unwrap(), "old\n");
    assert_eq!(site.ls("out"), ["w.cfg"]);

    // No key under the prefix and DEST holds a rendering: render would
    // wait --settle first (etcd may have lost its data); not the point here.
    let args = render(&src, &dest, &eps, &["/app/"])
        .with("--status-addr", addr)
        .with("--settle", "0s");
    let sk = Running::start(&args);
    let failed = counter_reaches(addr, "sidekick_render_errors_total", "w.cfg", 1.0, SOON).await;
    assert!(failed, "{}", shown(&sk));
    assert_eq!(site.read("out/w.cfg").unwrap(), "old\n");
    assert!(problems(&sk) >= 1, "logged: {}", shown(&sk));
    assert!(sk.log().contains("w.cfg"), "names the template: {}", shown(&sk));
    put(&mut c, "/app/weight", "5").await;
    assert!(file_becomes(&dest, "weight 5\n", SOON).await, "{}", shown(&sk));
    delete(&mut c, "/app/weight").await;
    let failed = counter_reaches(addr, "sidekick_render_errors_total", "w.cfg", 2.0, SOON).await;
    assert!(failed, "{}", shown(&sk));
    assert_eq!(site.read("out/w.cfg").unwrap(), "weight 5\n");
    let status = template_status(addr, "w.cfg");
    assert!(status["last_error"].is_string());
    assert_eq!(status["endpoint"], eps.as_str(), "the member it follows");
}

#[tokio::test]
async fn a_reload_follows_each_install_and_a_failing_one_is_retried_until_it_passes() {
    let etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let mut c = etcd.client(0).await;
    let site = Site::new();
    let (src, dest) = (site.write("web.tmpl", SERVERS), site.path("out/web.cfg"));
    let addr = status_addr();
    let flag_file = site.write("reload-works", "");
    let reload = format!(
        "if test -e \"{flag_file}\"; then echo ok >> \"{log}\"; else echo fail >> \"{log}\"; exit 1; fi",
        log = site.path("log/reloads")
    );
    let count = |what: &str| site.record("reloads").iter().filter(|l| *l == what).count();
    put(&mut c, "/app/web/1", "10.0.0.1:80").await;
    let args = render(&src, &dest, &eps, &["/app/web/"])
        .with("--reload-cmd", &reload)
        .with("--status-addr", addr);
    let sk = Running::start(&args);
    assert!(
        counter_reaches(addr, "sidekick_reloads_total", "web.cfg", 1.0, SOON).await,
        "{}",
        shown(&sk)
    );
    assert_eq!(count("ok"), 1);
    put(&mut c, "/app/web/2", "10.0.0.2:80").await;
    assert!(
        counter_reaches(addr, "sidekick_reloads_total", "web.cfg", 2.0, SOON).await,
        "{}",
        shown(&sk)
    );
    assert_eq!(count("ok"), 2);

    // The reload fails: the new file is installed all the same, and the
    // reload is tried again and again, each failure counted.
    std::fs::remove_file(&flag_file).unwrap();
    put(&mut c, "/app/web/3", "10.0.0.3:80").await;
    let want = servers(&[("1", "10.0.0.1:80"), ("2", "10.0.0.2:80"), ("3", "10.0.0.3:80")]);
    assert!(file_becomes(&dest, &want, SOON).await, "{}", shown(&sk));
    let retried = eventually(2 * RENDER_RELOAD_BACKOFF_CAP + SLACK, || async { count("fail") >= 3 }).await;
    assert!(retried, "{:?} {}", site.record("reloads"), shown(&sk));
    let failures = counter(addr, "sidekick_reload_failures_total", "web.cfg");
    assert!(failures >= 2.0, "{failures}");
    assert!(problems(&sk) >= 1, "logged: {}", shown(&sk));

    // It works again: the next retry succeeds, and then they stop.
    std::fs::write(&flag_file, "").unwrap();
    let passed = counter_reaches(
        addr,
        "sidekick_reloads_total",
        "web.cfg",
        3.0,
        RENDER_RELOAD_BACKOFF_CAP + SLACK,
    );
    assert!(passed.await, "{:?} {}", site.record("reloads"), shown(&sk));
    assert_eq!(count("ok"), 3);
    let fails = count("fail");
    let settled = eventually(SOON, || async {
        counter(addr, "sidekick_reload_failures_total", "web.cfg") == fails as f64
    })
    .await;
    assert!(settled, "every failure counted once");
    let_pass(QUIET).await;
    assert_eq!(count("ok"), 3, "no more reloads");
    assert_eq!(site.ls("out"), ["web.cfg"]);
}

#[tokio::test]
async fn reloads_of_two_templates_never_overlap() {
    let etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let mut c = etcd.client(0).await;
    let site = Site::new();
    // mkdir is atomic: a second reload starting while one runs finds the
    // lock taken and says so.
    let reload = format!(
        "mkdir \"{lock}\" || echo overlap >> \"{log}\"; echo start >> \"{log}\"; sleep {RELOAD_TAKES}; \
         echo end >> \"{log}\"; rmdir \"{lock}\"",
        lock = site.path("lock"),
        log = site.path("log/reloads")
    );
    for name in ["a", "b"] {
        site.write(
            &format!("{name}.tmpl"),
            &format!("{name}={{{{ getv(\"/{name}/k\", \"-\") }}}}\n"),
        );
    }
    let config = site.write(
        "render.toml",
        &format!(
            "[templates.a]\nsrc = \"a.tmpl\"\ndest = \"out/a.cfg\"\nprefixes = [\"/a/\"]\nreload_cmd = '{reload}'\n\n\
             [templates.b]\nsrc = \"b.tmpl\"\ndest = \"out/b.cfg\"\nprefixes = [\"/b/\"]\nreload_cmd = '{reload}'\n"
        ),
    );
    let addr = status_addr();
    let sk = Running::start(&render_config(&config, &eps).with("--status-addr", addr));
    let (a, b) = (site.path("out/a.cfg"), site.path("out/b.cfg"));
    assert!(file_becomes(&a, "a=-\n", SOON).await, "{}", shown(&sk));
    assert!(file_becomes(&b, "b=-\n", SOON).await, "{}", shown(&sk));

    for i in 0..10 {
        put(&mut c, "/a/k", &i.to_string()).await;
        put(&mut c, "/b/k", &i.to_string()).await;
    }
    assert!(file_becomes(&a, "a=9\n", SOON).await, "{}", shown(&sk));
    assert!(file_becomes(&b, "b=9\n", SOON).await, "{}", shown(&sk));
    // Every reload counted has ended.
    let reloads = || counter(addr, "sidekick_reloads_total", "a") + counter(addr, "sidekick_reloads_total", "b");
    let ends = || site.record("reloads").iter().filter(|l| *l == "end").count() as f64;
    let done = eventually(SOON, || async {
        let n = reloads();
        n >= 4.0 && ends() == n && !Path::new(&site.path("lock")).exists()
    })
    .await;
    assert!(done, "{} reloads, {} ended: {}", reloads(), ends(), shown(&sk));
    let record = site.record("reloads");
    assert!(!record.contains(&"overlap".to_string()), "{record:?}");
    let alternate = record.chunks(2).all(|p| p == ["start".to_string(), "end".to_string()]);
    assert!(alternate, "one at a time: {record:?}");
    assert_eq!(counter(addr, "sidekick_reload_failures_total", "a"), 0.0);
}

#[tokio::test]
async fn wait_min_max_coalesces_a_burst_into_few_renders() {
    let etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let mut c = etcd.client(0).await;
    let site = Site::new();
    let src = site.write("n.tmpl", "n={{ getv(\"/w/n\", \"-\") }}\n");
    let dest = site.path("out/n.cfg");
    let check = site.stage_cmd();
    let (min, max) = (flag("300ms"), flag("1s"));
    let args = render(&src, &dest, &eps, &["/w/"])
        .with("--wait", "300ms:1s")
        .with("--check-cmd", &check);
    let sk = Running::start(&args);
    assert!(file_becomes(&dest, "n=-\n", SOON).await, "{}", shown(&sk));
    let first = site.staged().len();

    // 100 puts, one after the other, for as long as they take.
    let started = Instant::now();
    let mut stamps = Vec::new();
    for i in 0..100 {
        put(&mut c, "/w/n", &i.to_string()).await;
        stamps.push(started.elapsed());
    }
    let burst = started.elapsed();
    let waited = eventually(max + SLACK, || async {
        std::fs::read_to_string(&dest).unwrap() == "n=99\n"
    });
    assert!(waited.await, "{}", shown(&sk));
    let renders = site.staged().len() - first;

    // At most one rendering per MAX while the burst lasted, one per pause
    // in it long enough to look quiet to the sidekick (half of MIN, for
    // the events' delivery), and the one after it.
    let pauses = std::iter::once(Duration::ZERO)
        .chain(stamps.iter().copied())
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[1] - w[0] >= min / 2)
        .count();
    let most = (burst.as_secs_f64() / max.as_secs_f64()).ceil() as usize + pauses + 2;
    assert!(
        (1..=most).contains(&renders),
        "{renders} renders for 100 puts in {burst:?} ({pauses} pauses): {:?}",
        site.staged()
    );
}

#[tokio::test]
async fn wait_delays_a_single_change_by_min() {
    let etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let mut c = etcd.client(0).await;
    let site = Site::new();
    let src = site.write("n.tmpl", "n={{ getv(\"/w/n\", \"-\") }}\n");
    let dest = site.path("out/n.cfg");
    let sk = Running::start(&render(&src, &dest, &eps, &["/w/"]).with("--wait", "1s:2s"));
    assert!(file_becomes(&dest, "n=-\n", SOON).await, "{}", shown(&sk));
    let min = flag("1s");
    let sent = Instant::now();
    put(&mut c, "/w/n", "1").await;
    assert!(file_becomes(&dest, "n=1\n", flag("2s") + SLACK).await, "{}", shown(&sk));
    let took = sent.elapsed();
    assert!(took >= at_least(min), "rendered {took:?} after the change, before MIN");
}

// ---------------------------------------------------------------------------
// etcd failing

#[tokio::test]
async fn render_resumes_after_etcd_restarts_and_keeps_the_file_meanwhile() {
    let mut etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let mut c = etcd.client(0).await;
    let site = Site::new();
    let (src, dest) = (site.write("web.tmpl", SERVERS), site.path("out/web.cfg"));
    put(&mut c, "/app/web/1", "10.0.0.1:80").await;
    let sk = Running::start(&render(&src, &dest, &eps, &["/app/web/"]));
    let before = servers(&[("1", "10.0.0.1:80")]);
    assert!(file_becomes(&dest, &before, SOON).await, "{}", shown(&sk));

    let watcher = Watcher::on(&dest);
    etcd.restart(0).await;
    let mut c = etcd.client(0).await;
    put(&mut c, "/app/web/2", "10.0.0.2:80").await;
    let after = servers(&[("1", "10.0.0.1:80"), ("2", "10.0.0.2:80")]);
    assert!(file_becomes(&dest, &after, etcd_back()).await, "{}", shown(&sk));
    let seen = watcher.seen();
    let expected: BTreeSet<Option<String>> = [Some(before), Some(after)].into();
    assert!(seen.is_subset(&expected), "only whole renderings: {seen:?}");
    assert_eq!(site.ls("out"), ["web.cfg"]);
}

#[tokio::test]
async fn render_follows_a_cluster_when_its_first_member_dies() {
    let mut etcd = Etcd::cluster(3).await;
    let eps = etcd.endpoints();
    let mut c = etcd.client(1).await;
    let site = Site::new();
    let (src, dest) = (site.write("web.tmpl", SERVERS), site.path("out/web.cfg"));
    put(&mut c, "/app/web/1", "10.0.0.1:80").await;
    let sk = Running::start(&render(&src, &dest, &eps, &["/app/web/"]));
    assert!(
        file_becomes(&dest, &servers(&[("1", "10.0.0.1:80")]), SOON).await,
        "{}",
        shown(&sk)
    );

    etcd.kill(0);
    // Through a member that stays, once the two elect a leader if they must.
    let put_done = eventually(ELECTION, || async {
        let mut c = c.clone();
        c.put("/app/web/2", "10.0.0.2:80", None).await.is_ok()
    });
    assert!(put_done.await, "the cluster takes writes");
    let want = servers(&[("1", "10.0.0.1:80"), ("2", "10.0.0.2:80")]);
    assert!(
        file_becomes(&dest, &want, ELECTION + etcd_back()).await,
        "{}",
        shown(&sk)
    );
    etcd.restart(0).await;
}

#[tokio::test]
async fn a_compacted_watch_is_followed_by_a_fresh_read() {
    let etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let mut c = etcd.client(0).await;
    let site = Site::new();
    let src = site.write(
        "c.tmpl",
        "n={{ gets(\"/c/bulk/*\")|length }} last={{ getv(\"/c/last\", \"-\") }}\n",
    );
    let dest = site.path("out/c.cfg");
    // The connection's HTTP/2 pings go every dial timeout (at least 10 s)
    // and wait a dial timeout for the answer: a freeze longer than that
    // (400 writes on a loaded machine) would end the connection on thaw,
    // and the watch would break before etcd could say it was compacted.
    // A dial timeout of HANG keeps the connection through the freeze.
    let dial = format!("{}s", HANG.as_secs());
    let mut args = render(&src, &dest, &eps, &["/c/"]);
    let at = args.iter().position(|a| *a == "--dial-timeout").unwrap() + 1;
    args[at] = &dial;
    let mut sk = Running::start(&args);
    assert!(file_becomes(&dest, "n=0 last=-\n", SOON).await, "{}", shown(&sk));

    // Frozen, the sidekick reads nothing of its watch: etcd's buffers for
    // it fill, its watcher falls behind (a slow watcher), and compaction
    // passes it. Thawed, it is told its watch was compacted.
    let frozen = Frozen::freeze(sk.pid());
    // 6 MB in 400 revisions: more than the HTTP/2 window of the watch
    // stream (2 MB) and etcd's 128 responses buffered per watch stream.
    let value = "v".repeat(4096);
    for t in 0..400 {
        let ops: Vec<TxnOp> = (0..4)
            .map(|k| TxnOp::put(format!("/c/bulk/{:03}", (4 * t + k) % 100), value.as_str(), None))
            .collect();
        c.txn(Txn::new().and_then(ops)).await.unwrap();
    }
    let last = put(&mut c, "/c/last", "after").await;
    let behind = eventually(SOON, || async {
        etcd_metric(&etcd, "etcd_debugging_mvcc_slow_watcher_total", &[]) >= 1.0
    });
    assert!(behind.await, "the watcher fell behind");
    c.compact(last, Some(CompactionOptions::new().with_physical()))
        .await
        .unwrap();
    drop(frozen);

    assert!(
        file_becomes(&dest, "n=100 last=after\n", CATCH_UP).await,
        "{}",
        shown(&sk)
    );
    assert!(
        sk.log().contains("compacted"),
        "the watch was compacted: {}",
        shown(&sk)
    );
    assert_eq!(site.ls("out"), ["c.cfg"]);
    assert!(sk.alive());
}

#[tokio::test]
async fn after_etcd_lost_its_data_renders_wait_settle_and_keys_put_again_survive() {
    let mut etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let mut c = etcd.client(0).await;
    let site = Site::new();
    let (src, dest) = (site.write("web.tmpl", SERVERS), site.path("out/web.cfg"));
    let check = site.stage_cmd();
    // Long enough that the test's writes, made as soon as etcd is back,
    // land within it.
    let settle = format!("{}ms", SOON.as_millis());
    put(&mut c, "/app/web/1", "10.0.0.1:80").await;
    put(&mut c, "/app/web/2", "10.0.0.2:80").await;
    // A revision well above what the wiped store reaches in this test.
    for _ in 0..20 {
        put(&mut c, "/filler", "x").await;
    }
    let args = render(&src, &dest, &eps, &["/app/web/"])
        .with("--settle", &settle)
        .with("--check-cmd", &check);
    let sk = Running::start(&args);
    let before = servers(&[("1", "10.0.0.1:80"), ("2", "10.0.0.2:80")]);
    assert!(file_becomes(&dest, &before, SOON).await, "{}", shown(&sk));
    let staged = site.staged().len();

    let watcher = Watcher::on(&dest);
    let wiped = Instant::now();
    etcd.wipe_and_start().await;
    let mut c = etcd.client(0).await;
    // Instance 1 registers again; instance 2 does not.
    put(&mut c, "/app/web/1", "10.0.0.1:80").await;
    let after = servers(&[("1", "10.0.0.1:80")]);
    assert!(
        file_becomes(&dest, &after, flag(&settle) + etcd_back()).await,
        "{}",
        shown(&sk)
    );
    let took = wiped.elapsed();
    let seen = watcher.seen();
    assert!(took >= at_least(flag(&settle)), "rewritten {took:?} after the wipe");
    let expected: BTreeSet<Option<String>> = [Some(before), Some(after.clone())].into();
    assert!(seen.is_subset(&expected), "never emptied: {seen:?}");
    let since = &site.staged()[staged..];
    assert_eq!(since, [after], "one rendering after the settle, with the key put again");
}

#[tokio::test]
async fn after_etcd_lost_its_data_an_empty_store_renders_empty_after_settle() {
    let mut etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let mut c = etcd.client(0).await;
    let site = Site::new();
    let (src, dest) = (site.write("web.tmpl", SERVERS), site.path("out/web.cfg"));
    let settle = "3s";
    put(&mut c, "/app/web/1", "10.0.0.1:80").await;
    put(&mut c, "/app/web/2", "10.0.0.2:80").await;
    let sk = Running::start(&render(&src, &dest, &eps, &["/app/web/"]).with("--settle", settle));
    let before = servers(&[("1", "10.0.0.1:80"), ("2", "10.0.0.2:80")]);
    assert!(file_becomes(&dest, &before, SOON).await, "{}", shown(&sk));

    let wiped = Instant::now();
    etcd.wipe_and_start().await;
    assert!(
        file_becomes(&dest, "", flag(settle) + etcd_back()).await,
        "{}",
        shown(&sk)
    );
    let took = wiped.elapsed();
    assert!(took >= at_least(flag(settle)), "emptied {took:?} after the wipe");
}

// Regression: the revision seen before a wipe stayed the mark to compare
// with, so every fresh read after it (a restart, a broken watch) until the
// new store passed the old revision was taken for another wipe, and waited
// --settle again.
#[tokio::test]
async fn after_a_wipe_has_settled_a_restart_does_not_wait_settle_again() {
    let mut etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let mut c = etcd.client(0).await;
    let site = Site::new();
    let (src, dest) = (site.write("web.tmpl", SERVERS), site.path("out/web.cfg"));
    // The default dial timeout (5 s): `etcd_back` with it.
    let back = RENDER_READ_BACKOFF_CAP + flag("5s") + SLACK;
    // Longer than a render takes to follow a restart, so waiting it again
    // shows.
    let settle = format!("{}s", (back + IDLE).as_secs());
    put(&mut c, "/app/web/1", "10.0.0.1:80").await;
    for _ in 0..20 {
        put(&mut c, "/filler", "x").await;
    }
    let args = [
        "render",
        &src,
        &dest,
        "--prefix",
        "/app/web/",
        "--endpoints",
        &eps,
        "--settle",
        &settle,
    ];
    let sk = Running::start(&args);
    assert!(
        file_becomes(&dest, &servers(&[("1", "10.0.0.1:80")]), SOON).await,
        "{}",
        shown(&sk)
    );

    etcd.wipe_and_start().await;
    let mut c = etcd.client(0).await;
    put(&mut c, "/app/web/2", "10.0.0.2:80").await;
    let settled = servers(&[("2", "10.0.0.2:80")]);
    assert!(
        file_becomes(&dest, &settled, flag(&settle) + back).await,
        "{}",
        shown(&sk)
    );

    // etcd restarts with its data: nothing was lost, nothing to wait for.
    etcd.restart(0).await;
    let mut c = etcd.client(0).await;
    put(&mut c, "/app/web/3", "10.0.0.3:80").await;
    let want = servers(&[("2", "10.0.0.2:80"), ("3", "10.0.0.3:80")]);
    assert!(file_becomes(&dest, &want, back).await, "{}", shown(&sk));
}

#[tokio::test]
async fn with_etcd_unreachable_once_exits_1_and_leaves_dest_alone() {
    let site = Site::new();
    let src = site.write("web.tmpl", SERVERS);
    let dest = site.write("out/web.cfg", "old\n");
    let eps = format!("http://127.0.0.1:{}", free_port());
    let (code, stdout, stderr) = once(&render(&src, &dest, &eps, &["/app/web/"]).and(&["--once"])).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(!stderr.is_empty());
    assert_eq!(site.read("out/web.cfg").unwrap(), "old\n");
    assert_eq!(site.ls("out"), ["web.cfg"]);
}

#[tokio::test]
async fn with_etcd_unreachable_a_running_render_keeps_dest_until_etcd_answers() {
    let mut etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let mut c = etcd.client(0).await;
    let site = Site::new();
    let src = site.write("web.tmpl", SERVERS);
    let dest = site.write("out/web.cfg", "old\n");
    let addr = status_addr();
    put(&mut c, "/app/web/1", "10.0.0.1:80").await;
    etcd.kill(0);

    let sk = Running::start(&render(&src, &dest, &eps, &["/app/web/"]).with("--status-addr", addr));
    let warned = eventually(flag(DIAL) + SLACK, || async { problems(&sk) >= 1 }).await;
    assert!(warned, "{}", shown(&sk));
    assert!(sk.log().contains("web.cfg"), "names the template: {}", shown(&sk));
    assert_eq!(http_get(port_of(addr), "127.0.0.1", "/healthz").unwrap().0, 200);
    let_pass(RENDER_READ_BACKOFF_CAP).await;
    assert_eq!(site.read("out/web.cfg").unwrap(), "old\n");
    assert_eq!(site.ls("out"), ["web.cfg"]);

    etcd.restart(0).await;
    let want = servers(&[("1", "10.0.0.1:80")]);
    assert!(file_becomes(&dest, &want, etcd_back()).await, "{}", shown(&sk));
}

// ---------------------------------------------------------------------------
// Bad input, untrusted values

/// What a bad configuration looks like, and what its message must name.
struct Bad {
    what: &'static str,
    args: Vec<String>,
    names: Vec<String>,
}

#[tokio::test]
async fn bad_input_exits_2_with_one_line_naming_the_problem_and_writes_nothing() {
    let site = Site::new();
    let eps = format!("http://127.0.0.1:{}", free_port());
    let good = site.write("good.tmpl", SERVERS);
    let broken = site.write("broken.tmpl", "{% for kv in gets(\"/app/*\") %}{{ kv.value }\n");
    let dest = site.path("out/web.cfg");
    let flags = |src: &str, dest: &str, more: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["render", src, dest, "--endpoints", eps.as_str()]
            .map(String::from)
            .into();
        v.extend(more.iter().map(|s| s.to_string()));
        v
    };
    let config = |path: &str| -> Vec<String> {
        ["render", "--config", path, "--endpoints", eps.as_str()]
            .map(String::from)
            .into()
    };
    // A directory of configurations, one with a misspelt field.
    std::fs::create_dir(site.path("conf.d")).unwrap();
    site.write(
        "conf.d/a.toml",
        "[templates.a]\nsrc = \"../good.tmpl\"\ndest = \"../out/a.cfg\"\nprefixes = [\"/a/\"]\n",
    );
    site.write(
        "conf.d/b.toml",
        "[templates.web]\nsrc = \"../good.tmpl\"\ndest = \"../out/b.cfg\"\nprefixes = [\"/b/\"]\nreload_comand = \"true\"\n",
    );
    let twice = site.write(
        "twice.toml",
        "[templates.one]\nsrc = \"good.tmpl\"\ndest = \"out/same.cfg\"\nprefixes = [\"/a/\"]\n\n\
         [templates.two]\nsrc = \"good.tmpl\"\ndest = \"out/same.cfg\"\nprefixes = [\"/b/\"]\n",
    );
    let no_prefix = site.write(
        "noprefix.toml",
        "[templates.lonely]\nsrc = \"good.tmpl\"\ndest = \"out/lonely.cfg\"\nprefixes = []\n",
    );
    let syntax = site.write(
        "syntax.toml",
        "[templates.fine]\nsrc = \"good.tmpl\"\ndest = \"out/fine.cfg\"\nprefixes = [\"/a/\"]\n\n\
         [templates.bad]\nsrc = \"broken.tmpl\"\ndest = \"out/bad.cfg\"\nprefixes = [\"/b/\"]\n",
    );
    let missing = site.path("nonexistent.tmpl");
    let nowhere = site.path("nodir/web.cfg");
    let s = |v: &str| v.to_string();
    let cases = vec![
        Bad {
            what: "missing template",
            args: flags(&missing, &dest, &["--prefix", "/app/"]),
            names: vec![s("nonexistent.tmpl")],
        },
        Bad {
            what: "syntax error",
            args: flags(&broken, &dest, &["--prefix", "/app/"]),
            names: vec![s("broken.tmpl")],
        },
        Bad {
            what: "syntax error in a config's second template",
            args: config(&syntax),
            names: vec![s("broken.tmpl")],
        },
        Bad {
            what: "unknown field",
            args: config(&site.path("conf.d")),
            names: vec![s("b.toml"), s("web"), s("reload_comand")],
        },
        Bad {
            what: "DEST's directory missing",
            args: flags(&good, &nowhere, &["--prefix", "/app/"]),
            names: vec![s("nodir")],
        },
        Bad {
            what: "two templates, one DEST",
            args: config(&twice),
            names: vec![s("same.cfg")],
        },
        Bad {
            what: "no prefix (flags)",
            args: flags(&good, &dest, &[]),
            names: vec![s("prefix")],
        },
        Bad {
            what: "no prefix (config)",
            args: config(&no_prefix),
            names: vec![s("lonely"), s("prefixes")],
        },
        Bad {
            what: "bad mode",
            args: flags(&good, &dest, &["--prefix", "/app/", "--mode", "rw-r--r--"]),
            names: vec![s("--mode")],
        },
        Bad {
            what: "bad wait",
            args: flags(&good, &dest, &["--prefix", "/app/", "--wait", "2s:1s"]),
            names: vec![s("--wait")],
        },
    ];
    for case in cases {
        let args: Vec<&str> = case.args.iter().map(String::as_str).collect();
        let (code, stdout, stderr) = once(&args).await;
        let what = case.what;
        assert_eq!(code, Some(2), "{what}: {stderr}");
        assert!(stdout.is_empty(), "{what}: {stdout}");
        assert_eq!(stderr.lines().count(), 1, "{what}: one line: {stderr}");
        assert!(stderr.starts_with("sidekick: "), "{what}: {stderr}");
        for name in &case.names {
            assert!(stderr.contains(name.as_str()), "{what}: names {name}: {stderr}");
        }
        assert!(site.ls("out").is_empty(), "{what}: wrote {:?}", site.ls("out"));
    }
}

#[tokio::test]
async fn a_printed_value_with_a_newline_fails_the_rendering_naming_its_key() {
    let etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let mut c = etcd.client(0).await;
    let site = Site::new();
    let src = site.write("i.tmpl", "server web {{ getv(\"/i/web\") }}\n");
    let dest = site.write("out/i.cfg", "old\n");
    let addr = status_addr();
    put(&mut c, "/i/web", "10.0.0.1:80\n    server evil 6.6.6.6:80").await;

    let (code, _, err) = once(&render(&src, &dest, &eps, &["/i/"]).and(&["--once"])).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("/i/web"), "names the key: {err}");
    assert_eq!(site.read("out/i.cfg").unwrap(), "old\n");

    let sk = Running::start(&render(&src, &dest, &eps, &["/i/"]).with("--status-addr", addr));
    let failed = counter_reaches(addr, "sidekick_render_errors_total", "i.cfg", 1.0, SOON).await;
    assert!(failed, "{}", shown(&sk));
    let t = template_status(addr, "i.cfg");
    assert!(t["last_error"].as_str().is_some_and(|e| e.contains("/i/web")), "{t}");
    assert!(sk.log().contains("/i/web"), "{}", shown(&sk));
    assert_eq!(site.read("out/i.cfg").unwrap(), "old\n");
    assert_eq!(site.ls("out"), ["i.cfg"]);
    put(&mut c, "/i/web", "10.0.0.1:80").await;
    assert!(
        file_becomes(&dest, "server web 10.0.0.1:80\n", SOON).await,
        "{}",
        shown(&sk)
    );
}

#[tokio::test]
async fn json_lets_a_multi_line_value_through_and_addr_refuses_more_than_an_address() {
    let etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let mut c = etcd.client(0).await;
    let site = Site::new();
    let src = site.write(
        "a.tmpl",
        "{% for kv in gets(\"/s/addr/*\") %}server {{ kv.key|base }} {{ kv.value|addr }}\n{% endfor %}\
         meta {{ (getv(\"/s/meta\")|json).addr|addr }}\n",
    );
    let dest = site.write("out/a.cfg", "old\n");
    // Pretty-printed JSON: newlines, parsed, never printed as they are.
    put(&mut c, "/s/meta", "{\n  \"addr\": \"10.0.0.9:80\"\n}").await;
    put(&mut c, "/s/addr/1", "[::1]:8080").await;
    put(&mut c, "/s/addr/2", "db.example.com:5432").await;
    let args = render(&src, &dest, &eps, &["/s/"]).and(&["--once"]);
    let (code, _, err) = once(&args).await;
    assert_eq!(code, Some(0), "{err}");
    let want = "server 1 [::1]:8080\nserver 2 db.example.com:5432\nmeta 10.0.0.9:80\n";
    assert_eq!(site.read("out/a.cfg").unwrap(), want);

    for refused in ["1.2.3.4:80 backup", "1.2.3.4", "1.2.3.4:80;", "1.2.3.4:99999"] {
        put(&mut c, "/s/addr/3", refused).await;
        let (code, _, err) = once(&args).await;
        assert_eq!(code, Some(1), "{refused}: {err}");
        assert!(err.contains(refused), "{refused}: names the value: {err}");
        assert_eq!(site.read("out/a.cfg").unwrap(), want, "{refused}");
        assert_eq!(site.ls("out"), ["a.cfg"]);
    }
}

// ---------------------------------------------------------------------------
// One-shot modes

#[tokio::test]
async fn dry_run_prints_each_rendering_under_its_name_and_installs_nothing() {
    let etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let mut c = etcd.client(0).await;
    let site = Site::new();
    put(&mut c, "/app/web/1", "10.0.0.1:80").await;
    put(&mut c, "/app/db/1", "10.0.0.7:5432").await;
    site.write("web.tmpl", SERVERS);
    site.write("db.tmpl", "db {{ getv(\"/app/db/1\")|addr }}\n");
    let touched = site.path("log/touched");
    let (web, db) = (site.path("out/web.cfg"), site.path("out/db.cfg"));
    // Two files in a directory; relative paths from the file's directory.
    std::fs::create_dir(site.path("conf.d")).unwrap();
    site.write(
        "conf.d/web.toml",
        &format!(
            "[templates.web]\nsrc = \"../web.tmpl\"\ndest = \"{web}\"\nprefixes = [\"/app/web/\"]\n\
             check_cmd = 'touch {touched}'\nreload_cmd = 'touch {touched}'\n"
        ),
    );
    site.write(
        "conf.d/db.toml",
        &format!("[templates.db]\nsrc = \"../db.tmpl\"\ndest = \"{db}\"\nprefixes = [\"/app/db/\"]\nmode = \"0600\"\n"),
    );
    let dir = site.path("conf.d");
    let (code, stdout, err) = once(&render_config(&dir, &eps).and(&["--dry-run"])).await;
    assert_eq!(code, Some(0), "{err}");
    let want = format!(
        "# db -> {db}\ndb 10.0.0.7:5432\n# web -> {web}\n{}",
        servers(&[("1", "10.0.0.1:80")])
    );
    assert_eq!(stdout, want);
    assert!(site.ls("out").is_empty(), "installed nothing");
    assert!(site.ls("log").is_empty(), "ran nothing");

    // One template: the rendering alone.
    let src = site.path("web.tmpl");
    let (code, stdout, err) = once(&render(&src, &web, &eps, &["/app/web/"]).and(&["--dry-run"])).await;
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(stdout, servers(&[("1", "10.0.0.1:80")]));
    assert!(site.ls("out").is_empty());
}

#[tokio::test]
async fn once_exits_0_installed_or_unchanged_and_1_when_a_check_or_reload_fails() {
    let etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let mut c = etcd.client(0).await;
    let site = Site::new();
    let (src, dest) = (site.write("web.tmpl", SERVERS), site.path("out/web.cfg"));
    let reload = site.note_cmd("reloads");
    put(&mut c, "/app/web/1", "10.0.0.1:80").await;
    let base = render(&src, &dest, &eps, &["/app/web/"]).and(&["--once"]);

    let (code, stdout, err) = once(&base.clone().with("--reload-cmd", &reload)).await;
    assert_eq!((code, stdout.as_str()), (Some(0), ""), "{err}");
    let one = servers(&[("1", "10.0.0.1:80")]);
    assert_eq!(site.read("out/web.cfg").unwrap(), one);
    assert_eq!(site.record("reloads").len(), 1);

    let before = stamp(&dest);
    let (code, _, err) = once(&base.clone().with("--reload-cmd", &reload)).await;
    assert_eq!(code, Some(0), "unchanged: {err}");
    assert_eq!(stamp(&dest), before);
    assert_eq!(site.record("reloads").len(), 1, "nothing to reload");

    put(&mut c, "/app/web/2", "10.0.0.2:80").await;
    let args = base.clone().with("--check-cmd", "echo no good >&2; false");
    let (code, _, err) = once(&args.with("--reload-cmd", &reload)).await;
    assert_eq!(code, Some(1), "check failed: {err}");
    assert!(err.contains("no good"), "the check's output: {err}");
    assert_eq!(site.read("out/web.cfg").unwrap(), one);
    assert_eq!(site.ls("out"), ["web.cfg"]);
    assert_eq!(site.record("reloads").len(), 1);

    let (code, _, err) = once(&base.clone().with("--reload-cmd", "false")).await;
    assert_eq!(code, Some(1), "reload failed: {err}");
    let two = servers(&[("1", "10.0.0.1:80"), ("2", "10.0.0.2:80")]);
    assert_eq!(site.read("out/web.cfg").unwrap(), two, "installed before the reload");
    assert_eq!(site.ls("out"), ["web.cfg"]);
}

// ---------------------------------------------------------------------------
// Signals, idling

#[tokio::test]
async fn sighup_rereads_config_and_templates_and_refuses_a_broken_one() {
    let etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let mut c = etcd.client(0).await;
    let site = Site::new();
    put(&mut c, "/h/k", "one").await;
    site.write("h.tmpl", "v1 {{ getv(\"/h/k\") }}\n");
    let one = "[templates.h]\nsrc = \"h.tmpl\"\ndest = \"out/h.cfg\"\nprefixes = [\"/h/\"]\n";
    let config = site.write("render.toml", one);
    let mut sk = Running::start(&render_config(&config, &eps));
    let h = site.path("out/h.cfg");
    assert!(file_becomes(&h, "v1 one\n", SOON).await, "{}", shown(&sk));

    // A changed template, and a template more.
    site.write("h.tmpl", "v2 {{ getv(\"/h/k\") }}\n");
    site.write("extra.tmpl", "extra {{ getv(\"/h/k\") }}\n");
    let two =
        format!("{one}\n[templates.extra]\nsrc = \"extra.tmpl\"\ndest = \"out/extra.cfg\"\nprefixes = [\"/h/\"]\n");
    site.write("render.toml", &two);
    sk.signal("HUP");
    assert!(file_becomes(&h, "v2 one\n", SOON).await, "{}", shown(&sk));
    let extra = site.path("out/extra.cfg");
    assert!(file_becomes(&extra, "extra one\n", SOON).await, "{}", shown(&sk));

    // A broken one: refused, and the old set goes on following etcd.
    let logged = problems(&sk);
    site.write("h.tmpl", "v3 {{ getv(\"/h/k\") \n");
    sk.signal("HUP");
    let refused = eventually(SOON, || async { problems(&sk) > logged }).await;
    assert!(refused, "{}", shown(&sk));
    assert!(sk.log().contains("h.tmpl"), "names the template: {}", shown(&sk));
    put(&mut c, "/h/k", "two").await;
    assert!(file_becomes(&h, "v2 two\n", SOON).await, "{}", shown(&sk));
    assert!(file_becomes(&extra, "extra two\n", SOON).await, "{}", shown(&sk));
    assert!(sk.alive());

    sk.signal("TERM");
    let status = sk.exit_within(SOON).await.expect("exits on SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", shown(&sk));
    assert_eq!(site.ls("out"), ["extra.cfg", "h.cfg"]);
}

#[tokio::test]
async fn idle_it_asks_etcd_nothing_and_renders_nothing() {
    let etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let mut c = etcd.client(0).await;
    let site = Site::new();
    let (src, dest) = (site.write("web.tmpl", SERVERS), site.path("out/web.cfg"));
    let addr = status_addr();
    put(&mut c, "/app/web/1", "10.0.0.1:80").await;
    drop(c);
    let sk = Running::start(&render(&src, &dest, &eps, &["/app/web/"]).with("--status-addr", addr));
    assert!(
        file_becomes(&dest, &servers(&[("1", "10.0.0.1:80")]), SOON).await,
        "{}",
        shown(&sk)
    );
    assert!(counter_reaches(addr, "sidekick_render_total", "web.cfg", 1.0, SOON).await);
    // Every gRPC call (reads, transactions, streams) etcd has begun.
    let calls = || etcd_metric(&etcd, "grpc_server_started_total", &[]);
    let (renders, before, stamped) = (counter(addr, "sidekick_render_total", "web.cfg"), calls(), stamp(&dest));
    // Longer than the longest period of render's own (its read backoff's
    // cap), should it poll instead of watching.
    let_pass(RENDER_READ_BACKOFF_CAP + IDLE).await;
    assert_eq!(calls(), before, "no etcd request while idle: {}", shown(&sk));
    assert_eq!(counter(addr, "sidekick_render_total", "web.cfg"), renders);
    assert_eq!(stamp(&dest), stamped);
}
