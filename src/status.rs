//! What a running sidekick says about itself: a board the loop writes its
//! probes, states and etcd events to, and the `--status-addr` server that
//! reads it (`/healthz`, `/status` as JSON, `/metrics` in Prometheus' text
//! format). Without `--status-addr` there is no board and no server: the
//! loop's writes are skipped before they cost anything.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::probe::Outcome;
use crate::registry::LeaseId;

/// Upper bounds of the probe duration histogram, in seconds.
const BUCKETS: [f64; 11] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
/// Probes kept for `/status`.
const LAST_PROBES: usize = 5;

/// Whether a service's loop is alive: the one stall rule, read by
/// `/healthz` and by the watchdog. The loop beats at every turn; time spent
/// waiting for a probe slot (the agent runs at most so many probes at once)
/// is not a stall, and the last such wait is shown in `/status`.
#[derive(Debug)]
pub struct Pulse {
    stall: Duration,
    inner: Mutex<PulseState>,
}

#[derive(Debug)]
struct PulseState {
    last: tokio::time::Instant,
    waiting_since: Option<tokio::time::Instant>,
    last_wait: Duration,
}

impl Pulse {
    /// The pulse of a loop probing every `interval` with `timeout`: stalled
    /// after two intervals, a timeout and a second without a turn.
    pub fn new(interval: Duration, timeout: Duration) -> Self {
        Pulse {
            stall: 2 * interval + timeout + Duration::from_secs(1),
            inner: Mutex::new(PulseState {
                last: tokio::time::Instant::now(),
                waiting_since: None,
                last_wait: Duration::ZERO,
            }),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut PulseState) -> T) -> T {
        f(&mut self.inner.lock().expect("pulse lock"))
    }

    /// The loop turned.
    pub fn beat(&self) {
        self.with(|p| p.last = tokio::time::Instant::now());
    }

    /// The loop waits for a probe slot (`true`), or got one (`false`).
    pub fn waiting(&self, waiting: bool) {
        self.with(|p| {
            let now = tokio::time::Instant::now();
            if waiting {
                p.waiting_since = Some(now);
            } else if let Some(since) = p.waiting_since.take() {
                p.last_wait = now - since;
                p.last = now;
            }
        });
    }

    /// Whether the loop turned within the stall limit, or is waiting for
    /// a slot.
    pub fn alive(&self) -> bool {
        self.with(|p| p.waiting_since.is_some() || p.last.elapsed() <= self.stall)
    }

    /// How long the last wait for a probe slot took.
    pub fn last_wait(&self) -> Duration {
        self.with(|p| p.last_wait)
    }
}

/// One probe as `/status` shows it.
#[derive(Debug, Clone)]
struct ProbeRecord {
    ok: bool,
    latency: Duration,
    detail: String,
}

#[derive(Debug)]
struct Snapshot {
    state: &'static str,
    /// Consecutive failures while up: the state shows as `suspect`.
    failing: u32,
    lease: Option<(LeaseId, Duration, Instant)>,
    registered: bool,
    endpoint: String,
    last_probes: VecDeque<ProbeRecord>,
    /// The last etcd error since the last success, and when.
    last_error: Option<(Instant, String)>,
    /// The last failed probe's detail while the probe fails, and when.
    probe_error: Option<(Instant, String)>,
    probes_ok: u64,
    probes_failed: u64,
    transitions: u64,
    keepalive_failures: u64,
    buckets: [u64; BUCKETS.len()],
    duration_sum: f64,
}

/// The status of one service, shared by the loop and the server.
#[derive(Debug)]
pub struct Board {
    service: String,
    keys: Vec<String>,
    /// The loop's liveness, for `/healthz`.
    pulse: Arc<Pulse>,
    inner: Mutex<Snapshot>,
}

impl Board {
    /// A board for `service` (the label of every metric) keeping `keys`;
    /// `/healthz` fails when `pulse` says the loop stalled.
    pub fn new(service: &str, keys: Vec<String>, endpoint: &str, pulse: Arc<Pulse>) -> Self {
        Board {
            service: service.to_string(),
            keys,
            pulse,
            inner: Mutex::new(Snapshot {
                state: "starting",
                failing: 0,
                lease: None,
                registered: false,
                endpoint: endpoint.to_string(),
                last_probes: VecDeque::with_capacity(LAST_PROBES),
                last_error: None,
                probe_error: None,
                probes_ok: 0,
                probes_failed: 0,
                transitions: 0,
                keepalive_failures: 0,
                buckets: [0; BUCKETS.len()],
                duration_sum: 0.0,
            }),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Snapshot) -> T) -> T {
        f(&mut self.inner.lock().expect("status board lock"))
    }

    /// A probe's outcome, and the consecutive failures it leaves.
    pub fn probe(&self, o: &Outcome, failing: u32) {
        self.with(|s| {
            if s.last_probes.len() == LAST_PROBES {
                s.last_probes.pop_front();
            }
            s.last_probes.push_back(ProbeRecord {
                ok: o.ok,
                latency: o.latency,
                detail: o.detail.clone(),
            });
            if o.ok {
                s.probes_ok += 1;
            } else {
                s.probes_failed += 1;
            }
            s.failing = failing;
            s.probe_error = (!o.ok).then(|| (Instant::now(), format!("probe: {}", o.detail)));
            let secs = o.latency.as_secs_f64();
            s.duration_sum += secs;
            for (i, le) in BUCKETS.iter().enumerate() {
                if secs <= *le {
                    s.buckets[i] += 1;
                }
            }
        });
    }

    /// A new state (`starting`, `up`, `down`, `maintenance`).
    pub fn state(&self, state: &'static str) {
        self.with(|s| {
            if s.state != state {
                s.transitions += 1;
                s.state = state;
            }
        });
    }

    /// The keys are in etcd under `lease` of `ttl`, through `endpoint`.
    pub fn registered(&self, lease: LeaseId, ttl: Duration, endpoint: &str) {
        self.with(|s| {
            s.lease = Some((lease, ttl, Instant::now()));
            s.registered = true;
            s.endpoint = endpoint.to_string();
            s.last_error = None;
        });
    }

    /// The lease was refreshed.
    pub fn kept_alive(&self) {
        self.with(|s| {
            if let Some((_, _, at)) = s.lease.as_mut() {
                *at = Instant::now();
            }
            s.last_error = None;
        });
    }

    /// The keys are no longer in etcd (withdrawn, or the lease was lost).
    pub fn withdrawn(&self) {
        self.with(|s| {
            s.lease = None;
            s.registered = false;
        });
    }

    /// An etcd call failed.
    pub fn etcd_error(&self, keep_alive: bool, endpoint: &str, text: String) {
        self.with(|s| {
            if keep_alive {
                s.keepalive_failures += 1;
            }
            s.endpoint = endpoint.to_string();
            s.last_error = Some((Instant::now(), text));
        });
    }

    /// Whether the loop turned recently.
    pub fn healthy(&self) -> bool {
        self.pulse.alive()
    }

    /// `/status` of this service: one JSON object.
    pub fn to_json(&self) -> String {
        self.json_value().to_string()
    }

    fn json_value(&self) -> serde_json::Value {
        self.with(|s| {
            let state = if s.state == "up" && s.failing > 0 {
                "suspect"
            } else {
                s.state
            };
            let ttl = s
                .lease
                .map(|(_, ttl, at)| ttl.saturating_sub(at.elapsed()).as_secs_f64());
            let probes: Vec<serde_json::Value> = s
                .last_probes
                .iter()
                .map(|p| {
                    serde_json::json!({
                        "ok": p.ok,
                        "latency_s": p.latency.as_secs_f64(),
                        "detail": p.detail,
                        "error": if p.ok { None } else { Some(&p.detail) },
                    })
                })
                .collect();
            serde_json::json!({
                "name": self.service,
                "state": state,
                "keys": self.keys,
                "lease_id": s.lease.map(|(l, _, _)| l.to_string()),
                "ttl_remaining_s": ttl,
                "etcd_endpoint": s.endpoint,
                "last_probes": probes,
                "last_error": match (&s.last_error, &s.probe_error) {
                    (Some((a, e)), Some((b, p))) => Some(if a > b { e } else { p }),
                    (Some((_, e)), None) => Some(e),
                    (None, Some((_, p))) => Some(p),
                    (None, None) => None,
                },
                "last_etcd_error": s.last_error.as_ref().map(|(_, e)| e),
                "last_probe_error": s.probe_error.as_ref().map(|(_, p)| p),
                "probe_slot_wait_s": self.pulse.last_wait().as_secs_f64(),
            })
        })
    }

    /// `/metrics` of this service alone.
    pub fn to_metrics(&self) -> String {
        metrics(std::slice::from_ref(&self))
    }
}

/// The metric families, each written once with the samples of every board.
const FAMILIES: [(&str, &str, &str); 5] = [
    (
        "sidekick_registered",
        "gauge",
        "Whether the keys are registered in etcd.",
    ),
    ("sidekick_probe_duration_seconds", "histogram", "How long probes took."),
    ("sidekick_probes_total", "counter", "Probes by result."),
    (
        "sidekick_transitions_total",
        "counter",
        "State changes (starting, up, down, maintenance).",
    ),
    (
        "sidekick_keepalive_failures_total",
        "counter",
        "Lease keep-alives that failed.",
    ),
];

/// `/metrics` in Prometheus' text format: every family once, a series per
/// board labelled `service`.
pub fn metrics(boards: &[&Board]) -> String {
    let mut out = String::new();
    for (name, kind, help) in FAMILIES {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for b in boards {
            let label = format!("service=\"{}\"", escape_label(&b.service));
            b.with(|s| match name {
                "sidekick_registered" => {
                    let _ = writeln!(out, "{name}{{{label}}} {}", u8::from(s.registered));
                }
                "sidekick_probe_duration_seconds" => {
                    let count = s.probes_ok + s.probes_failed;
                    for (i, le) in BUCKETS.iter().enumerate() {
                        let _ = writeln!(out, "{name}_bucket{{{label},le=\"{le}\"}} {}", s.buckets[i]);
                    }
                    let _ = writeln!(out, "{name}_bucket{{{label},le=\"+Inf\"}} {count}");
                    let _ = writeln!(out, "{name}_sum{{{label}}} {}", s.duration_sum);
                    let _ = writeln!(out, "{name}_count{{{label}}} {count}");
                }
                "sidekick_probes_total" => {
                    let _ = writeln!(out, "{name}{{{label},result=\"ok\"}} {}", s.probes_ok);
                    let _ = writeln!(out, "{name}{{{label},result=\"failed\"}} {}", s.probes_failed);
                }
                "sidekick_transitions_total" => {
                    let _ = writeln!(out, "{name}{{{label}}} {}", s.transitions);
                }
                _ => {
                    let _ = writeln!(out, "{name}{{{label}}} {}", s.keepalive_failures);
                }
            });
        }
    }
    out
}

/// The boards the server shows; the engine adds and removes them as
/// services start and stop.
pub type Boards = Arc<Mutex<Vec<Arc<Board>>>>;

/// What the server shows: one service (`run`), or the agent's services,
/// which a reload changes.
#[derive(Debug, Clone)]
pub enum View {
    /// `run`: `/status` is the service's object.
    One(Boards),
    /// `agent`: `/status` is `{"services": [...]}`.
    Many(Boards),
    /// Anything else that shows itself (`render`'s templates).
    Other(Arc<dyn Shows>),
}

/// What a command other than `run` and `agent` serves.
pub trait Shows: Send + Sync + std::fmt::Debug {
    /// `/status`'s JSON.
    fn status(&self) -> String;
    /// `/metrics`' text.
    fn metrics(&self) -> String;
    /// Whether `/healthz` answers 200.
    fn healthy(&self) -> bool;
}

impl View {
    fn boards(&self) -> Vec<Arc<Board>> {
        match self {
            View::One(list) | View::Many(list) => list.lock().expect("boards lock").clone(),
            View::Other(_) => Vec::new(),
        }
    }

    fn status(&self) -> String {
        let boards = self.boards();
        match self {
            View::One(_) => boards.first().map_or_else(|| "{}".to_string(), |b| b.to_json()),
            View::Many(_) => {
                let services: Vec<serde_json::Value> = boards.iter().map(|b| b.json_value()).collect();
                serde_json::json!({ "services": services }).to_string()
            }
            View::Other(o) => o.status(),
        }
    }

    fn metrics(&self) -> String {
        if let View::Other(o) = self {
            return o.metrics();
        }
        let boards = self.boards();
        metrics(&boards.iter().map(|b| b.as_ref()).collect::<Vec<_>>())
    }

    fn healthy(&self) -> bool {
        if let View::Other(o) = self {
            return o.healthy();
        }
        self.boards().iter().all(|b| b.healthy())
    }
}

pub(crate) fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Binds `addr` (an error here is the caller's to report before anything
/// is written) and serves `view` on it until `shutdown`.
pub async fn bind_and_serve(addr: &(String, u16), view: View, shutdown: CancellationToken) -> std::io::Result<()> {
    let listener = TcpListener::bind((addr.0.as_str(), addr.1)).await?;
    tracing::info!(addr = %listener.local_addr()?, "serving /healthz, /status and /metrics");
    tokio::spawn(serve(listener, view, shutdown));
    Ok(())
}

/// Serves the board on `listener` until `shutdown`: one small HTTP/1.1
/// server on hyper (already in the tree), no framework.
async fn serve(listener: TcpListener, view: View, shutdown: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    debug!(error = %e, "status server: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let view = view.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let view = view.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&view, &req)) }
            });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            // A client that never finishes its request is cut off.
            let _ = tokio::time::timeout(Duration::from_secs(10), conn).await;
        });
    }
}

fn answer<B>(view: &View, req: &Request<B>) -> Response<Full<Bytes>> {
    let (status, kind, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") if view.healthy() => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        (&Method::GET, "/healthz") => (
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "the probe loop has stalled\n".to_string(),
        ),
        (&Method::GET, "/status") => (StatusCode::OK, "application/json", view.status() + "\n"),
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            view.metrics(),
        ),
        (&Method::GET, _) => (StatusCode::NOT_FOUND, "text/plain", "not found\n".to_string()),
        _ => (StatusCode::METHOD_NOT_ALLOWED, "text/plain", "only GET\n".to_string()),
    };
    Response::builder()
        .status(status)
        .header("content-type", kind)
        .body(Full::new(Bytes::from(body)))
        .expect("a valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(ok: bool, ms: u64) -> Outcome {
        Outcome {
            ok,
            latency: Duration::from_millis(ms),
            detail: if ok { "HTTP 200" } else { "HTTP 503" }.into(),
        }
    }

    #[test]
    fn metrics_count_probes_transitions_and_registration() {
        let b = Board::new(
            "/services/web/1",
            vec!["/services/web/1".into()],
            "http://e:2379",
            Arc::new(Pulse::new(Duration::from_secs(1), Duration::ZERO)),
        );
        b.probe(&outcome(true, 3), 0);
        b.probe(&outcome(false, 30), 1);
        b.state("up");
        b.registered(LeaseId(0x2a), Duration::from_secs(15), "http://e:2379");
        b.etcd_error(true, "http://e:2379", "no answer".into());
        let m = b.to_metrics();
        for line in [
            r#"sidekick_registered{service="/services/web/1"} 1"#,
            r#"sidekick_probes_total{service="/services/web/1",result="ok"} 1"#,
            r#"sidekick_probes_total{service="/services/web/1",result="failed"} 1"#,
            r#"sidekick_transitions_total{service="/services/web/1"} 1"#,
            r#"sidekick_keepalive_failures_total{service="/services/web/1"} 1"#,
            r#"sidekick_probe_duration_seconds_bucket{service="/services/web/1",le="0.005"} 1"#,
            r#"sidekick_probe_duration_seconds_bucket{service="/services/web/1",le="0.05"} 2"#,
            r#"sidekick_probe_duration_seconds_count{service="/services/web/1"} 2"#,
        ] {
            assert!(m.lines().any(|l| l == line), "{line} in\n{m}");
        }
        let v: serde_json::Value = serde_json::from_str(&b.to_json()).unwrap();
        assert_eq!(v["state"], "suspect", "up with a failure in a row");
        assert_eq!(v["lease_id"], "2a");
        assert_eq!(v["last_error"], "no answer");
        assert_eq!(v["last_probe_error"], "probe: HTTP 503");
        assert_eq!(v["last_probes"].as_array().unwrap().len(), 2);
        // A probe failing after the etcd error is the last error; a healthy
        // probe ends it, and the etcd error shows again until a success.
        b.probe(&outcome(false, 30), 2);
        let v: serde_json::Value = serde_json::from_str(&b.to_json()).unwrap();
        assert_eq!(v["last_error"], "probe: HTTP 503");
        b.probe(&outcome(true, 3), 0);
        let v: serde_json::Value = serde_json::from_str(&b.to_json()).unwrap();
        assert_eq!(v["last_error"], "no answer");
        assert!(v["last_probe_error"].is_null());
        b.kept_alive();
        let v: serde_json::Value = serde_json::from_str(&b.to_json()).unwrap();
        assert!(v["last_error"].is_null());
        b.withdrawn();
        let v: serde_json::Value = serde_json::from_str(&b.to_json()).unwrap();
        assert!(v["lease_id"].is_null() && v["ttl_remaining_s"].is_null());
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
