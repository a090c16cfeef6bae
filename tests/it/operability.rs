//! What operators see of a running sidekick, against a real etcd:
//! `--status-addr` (`/healthz`, `/status`, `/metrics` read with a real
//! Prometheus text-format parser), systemd's notify socket bound by the
//! test, and maintenance by file and by signal.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::bounds::*;
use crate::harness::*;

const KEY: &str = "/services/web/1";
const VALUE: &str = "10.0.0.5:8080";

/// A free loopback address for `--status-addr`, for the life of the test
/// binary (the harness's argument builders take `'static` strings).
fn status_addr() -> &'static str {
    String::leak(format!("127.0.0.1:{}", free_port()))
}

/// `GET path` on the status server: status code and body.
fn get_http(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(IO)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let code = raw[9..12].parse().unwrap();
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// One sample of `/metrics`, parsed by prometheus-parse.
fn metric(addr: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (code, body) = get_http(addr, "/metrics");
    assert_eq!(code, 200);
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
    let found: Vec<f64> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && s.labels.get("service") == Some(KEY))
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            prometheus_parse::Value::Histogram(ref h) => h.iter().map(|c| c.count).fold(0.0, f64::max),
            ref other => panic!("{name}: {other:?}"),
        })
        .collect();
    assert_eq!(found.len(), 1, "one {name}{labels:?} in\n{body}");
    found[0]
}

fn status(addr: &str) -> serde_json::Value {
    let (code, body) = get_http(addr, "/status");
    assert_eq!(code, 200);
    serde_json::from_str(&body).unwrap()
}

#[tokio::test]
async fn status_and_metrics_follow_the_instance() {
    let addr = status_addr();
    let (_etcd, backend, sk, mut c) = registered_with(KEY, VALUE, "1", "1", |a| a.with("--status-addr", addr)).await;
    let f = sk.figures();
    assert_eq!(get_http(addr, "/healthz").0, 200);
    // The key can be seen in etcd a moment before the board says so.
    let on_board = || async { metric(addr, "sidekick_registered", &[]) == 1.0 };
    assert!(eventually(SOON, on_board).await, "{}", sk.log());

    let s = status(addr);
    assert_eq!(s["state"], "up", "{s}");
    assert_eq!(s["keys"], serde_json::json!([KEY]));
    let lease = get(&mut c, KEY).await.unwrap().lease();
    assert_eq!(s["lease_id"], format!("{lease:x}"), "the lease etcd has");
    let ttl = s["ttl_remaining_s"].as_f64().unwrap();
    assert!(ttl > 0.0 && ttl <= 2.0, "{s}");
    assert!(s["etcd_endpoint"].as_str().unwrap().starts_with("http://127.0.0.1:"));
    assert!(s["last_probes"][0]["ok"].as_bool().unwrap(), "{s}");
    assert!(s["last_error"].is_null());

    // Probes are counted, and the histogram with them.
    assert_eq!(metric(addr, "sidekick_registered", &[]), 1.0);
    let probes = metric(addr, "sidekick_probes_total", &[("result", "ok")]);
    assert!(
        eventually(f.probes(3), || async {
            metric(addr, "sidekick_probes_total", &[("result", "ok")]) >= probes + 3.0
        })
        .await,
        "probes counted"
    );
    assert!(metric(addr, "sidekick_probe_duration_seconds", &[]) >= probes + 3.0);
    let transitions = metric(addr, "sidekick_transitions_total", &[]);

    // Down: a transition, `registered` flips, the failure shows.
    backend.set_healthy(false);
    assert!(key_becomes(&c, KEY, None, f.withdrawal()).await, "{}", sk.log());
    assert!(eventually(SOON, || async { metric(addr, "sidekick_registered", &[]) == 0.0 }).await);
    assert_eq!(metric(addr, "sidekick_transitions_total", &[]), transitions + 1.0);
    assert!(metric(addr, "sidekick_probes_total", &[("result", "failed")]) >= 1.0);
    let s = status(addr);
    assert_eq!(s["state"], "down", "{s}");
    assert!(s["lease_id"].is_null(), "{s}");
    assert!(!s["last_probes"].as_array().unwrap().last().unwrap()["ok"]
        .as_bool()
        .unwrap());

    assert_eq!(get_http(addr, "/nope").0, 404);
}

#[tokio::test]
async fn keep_alive_failures_are_counted_and_the_error_shown() {
    let addr = status_addr();
    let (mut etcd, _backend, sk, _c) = registered_with(KEY, VALUE, "1", "1", |a| a.with("--status-addr", addr)).await;
    let f = sk.figures();
    etcd.stop(0);
    // The next keep-alive fails.
    assert!(
        eventually(f.keepalives(1) + f.etcd_attempts(1), || async {
            metric(addr, "sidekick_keepalive_failures_total", &[]) >= 1.0
        })
        .await,
        "{}",
        sk.log()
    );
    assert!(status(addr)["last_error"]
        .as_str()
        .is_some_and(|e| e.contains("keep the lease alive")));
}

#[tokio::test]
async fn a_status_address_in_use_is_an_error_before_anything_is_written() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let out = sidekick(&plain_run(KEY, VALUE, &eps).with("--status-addr", &addr))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("could not serve --status-addr {addr}: ")) && err.contains("in use"),
        "names the address: {err}"
    );
    let mut c = etcd.client(0).await;
    assert!(get(&mut c, KEY).await.is_none(), "nothing written");
}

/// A notify socket bound by the test, as systemd's; collects every message.
struct NotifySocket {
    path: std::path::PathBuf,
    got: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(POLL)).unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let out = got.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends with the test (checked at every read timeout), and after
            // HANG at the most.
            let end = Instant::now() + HANG;
            while Instant::now() < end {
                if let Ok(n) = sock.recv(&mut buf) {
                    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                    out.lock().unwrap().extend(msg.lines().map(String::from));
                }
                if Arc::strong_count(&out) == 1 {
                    return;
                }
            }
        });
        NotifySocket { path, got, _dir: dir }
    }

    fn messages(&self) -> Vec<String> {
        self.got.lock().unwrap().clone()
    }

    fn count(&self, prefix: &str) -> usize {
        self.messages().iter().filter(|m| m.starts_with(prefix)).count()
    }
}

#[tokio::test]
async fn systemd_hears_ready_status_watchdog_and_stopping() {
    let etcd = Etcd::start().await;
    let backend = Backend::start();
    let (url, eps) = (backend.url(), etcd.endpoints());
    let notify = NotifySocket::bind();
    let path = notify.path.to_str().unwrap().to_string();
    // systemd's watchdog timeout; the sidekick pings at half of it.
    let watchdog = Duration::from_millis(400);
    let usec = watchdog.as_micros().to_string();
    let mut sk = Running::start_with_env(
        &fast_run(KEY, VALUE, &url, &eps, "1", "1"),
        &[("NOTIFY_SOCKET", path.as_str()), ("WATCHDOG_USEC", usec.as_str())],
    );
    let f = sk.figures();
    let c = etcd.client(0).await;
    assert!(
        key_becomes(&c, KEY, Some(VALUE), f.registration()).await,
        "{}",
        sk.log()
    );
    assert!(
        eventually(SOON, || async { notify.count("READY=1") == 1 }).await,
        "{:?}",
        notify.messages()
    );
    // READY once the first probe settled the state, never waiting for etcd.
    let m = notify.messages();
    let ready_at = m.iter().position(|l| l == "READY=1").unwrap();
    let healthy_at = m.iter().position(|l| l.starts_with("STATUS=instance healthy")).unwrap();
    assert!(healthy_at < ready_at, "READY once settled: {m:?}");
    assert!(
        m.iter()
            .any(|l| l.starts_with("STATUS=registered /services/web/1, lease ")),
        "{m:?}"
    );

    // WATCHDOG=1 every 200 ms from the probe loop: about ten in a window
    // of ten intervals, whatever it measures on a slow machine.
    let (pings, counting) = (notify.count("WATCHDOG=1"), Instant::now());
    let_pass(f.intervals(10)).await; // the scenario: count pings
    let more = notify.count("WATCHDOG=1") - pings;
    let window = counting.elapsed();
    let due = window.as_secs_f64() / (watchdog / 2).as_secs_f64();
    assert!(
        (due / 2.0..=due * 1.5).contains(&(more as f64)),
        "{more} pings in {window:?}"
    );

    backend.set_healthy(false);
    assert!(
        eventually(f.withdrawal(), || async {
            notify.count("STATUS=instance unhealthy: HTTP 503") == 1
        })
        .await,
        "{:?}",
        notify.messages()
    );
    assert!(eventually(SOON, || async { notify.count("STATUS=withdrawn, lease") == 1 }).await);
    sk.signal("TERM");
    assert_eq!(sk.exit_within(f.exit()).await.unwrap().code(), Some(0));
    assert!(
        eventually(SOON, || async { notify.count("STOPPING=1") == 1 }).await,
        "{:?}",
        notify.messages()
    );
    assert_eq!(notify.count("READY=1"), 1, "READY is said once");
}

#[tokio::test]
async fn ready_comes_when_etcd_is_unreachable_too() {
    // systemd must not kill a sidekick whose etcd is away: the state is
    // settled (etcd unreachable, retrying), so it is READY.
    let backend = Backend::start();
    let eps = format!("http://127.0.0.1:{}", free_port());
    let notify = NotifySocket::bind();
    let path = notify.path.to_str().unwrap().to_string();
    let url = backend.url();
    let sk = Running::start_with_env(
        &fast_run(KEY, VALUE, &url, &eps, "1", "1"),
        &[("NOTIFY_SOCKET", path.as_str())],
    );
    // The first probe passes, the first grant fails at once.
    assert!(
        eventually(sk.figures().registration(), || async { notify.count("READY=1") == 1 }).await,
        "{:?}",
        notify.messages()
    );
    assert!(
        notify.count("STATUS=etcd unreachable, retrying") >= 1,
        "{:?}",
        notify.messages()
    );
}

#[tokio::test]
async fn maintenance_by_file_withdraws_and_probing_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("maintenance");
    let file_arg: &'static str = String::leak(file.to_str().unwrap().to_string());
    let addr = status_addr();
    let (_etcd, backend, sk, c) = registered_with(KEY, VALUE, "2", "2", |a| {
        a.with("--maintenance-file", file_arg).with("--status-addr", addr)
    })
    .await;
    let f = sk.figures();
    std::fs::write(&file, "").unwrap();
    assert!(
        key_becomes(&c, KEY, None, f.withdrawal()).await,
        "withdrawn: {}",
        sk.log()
    );
    assert_eq!(status(addr)["state"], "maintenance");
    let hits = backend.hits();
    assert!(
        eventually(f.probes(3), || async { backend.hits() >= hits + 3 }).await,
        "probing goes on in maintenance"
    );
    std::fs::remove_file(&file).unwrap();
    assert!(
        key_becomes(&c, KEY, Some(VALUE), f.reregistration()).await,
        "back: {}",
        sk.log()
    );
    assert_eq!(status(addr)["state"], "up");
    let log = sk.log();
    assert!(
        log.contains("entering maintenance") && log.contains("leaving maintenance"),
        "{log}"
    );
}

#[tokio::test]
async fn maintenance_by_signal_and_back_after_rise_successes() {
    let (_etcd, backend, sk, c) = registered_with(KEY, VALUE, "3", "2", |a| a).await;
    let f = sk.figures();
    sk.signal("USR1");
    assert!(
        key_becomes(&c, KEY, None, f.withdrawal()).await,
        "withdrawn at once: {}",
        sk.log()
    );
    // Still out while the instance is healthy and time passes: five
    // intervals, more than rise (3) probes take.
    let_pass(f.intervals(5)).await; // the scenario: stays out
    assert!(get(&mut c.clone(), KEY).await.is_none());
    let hits = backend.hits();
    sk.signal("USR2");
    assert!(
        key_becomes(&c, KEY, Some(VALUE), f.reregistration()).await,
        "{}",
        sk.log()
    );
    assert!(backend.hits() >= hits + 3, "back only after rise (3) successes");
}
