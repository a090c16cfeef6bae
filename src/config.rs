//! Validated settings built from the raw flags, and every cross-flag rule.
//!
//! Each rule lives here once and fails with one line that names the flags and
//! the rule. Nothing in this module talks to etcd, so a bad combination is
//! refused before anything is written.

use std::time::Duration;

use crate::cli::{
    AnnounceArgs, CheckArgs, EtcdArgs, OperabilityArgs, ProbeArgs, ProbeOptions, RunArgs, TimingArgs, WithdrawArgs,
};
use crate::discover::{self, Discovery, Environment};
use crate::parse::{count, duration, usage};
pub use crate::parse::{parse_extra, parse_header, parse_host_port, parse_key_value, parse_url, UsageError};

/// Everything `sidekick run` needs.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The keys to keep, `KEY` first, then every `--extra`.
    pub keys: Vec<(String, String)>,
    /// The `--shared` keys, put only where absent.
    pub shared: Vec<(String, String)>,
    /// `--status-addr` and `--maintenance-file`.
    pub ops: Operability,
    /// How the instance is probed; `None` announces unconditionally.
    pub probe: Option<ProbeSpec>,
    /// Probe and lease timing.
    pub timing: Timing,
    /// Where etcd is and how to reach it.
    pub etcd: EtcdSettings,
}

impl RunConfig {
    /// The bound on each etcd call while running: the dial timeout, but at
    /// most a third of the TTL, so a keep-alive that hangs leaves time for
    /// another attempt (on the next endpoint) before the lease runs out.
    pub fn call_bound(&self) -> Duration {
        etcd_call_bound(self.timing.ttl, self.etcd.dial_timeout)
    }
}

/// min(dial timeout, TTL/3), in whole milliseconds: see [`RunConfig::call_bound`].
pub fn etcd_call_bound(ttl: Duration, dial_timeout: Duration) -> Duration {
    let third = Duration::from_millis((ttl / 3).as_millis() as u64);
    dial_timeout.min(third)
}

/// The probe flags of `run` and `check`, as messages name them.
const PROBE_FLAGS: &str = "--http URL, --tcp HOST:PORT, --exec CMD or --grpc HOST:PORT";

/// `--status-addr` and `--maintenance-file`, checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Operability {
    /// Where to serve /healthz, /status and /metrics.
    pub status_addr: Option<(String, u16)>,
    /// While this file exists, the keys are withdrawn.
    pub maintenance_file: Option<std::path::PathBuf>,
}

/// Checks `run`'s and `agent`'s operability flags.
pub fn operability(args: &OperabilityArgs) -> Result<Operability, UsageError> {
    let status_addr = args
        .status_addr
        .as_deref()
        .map(|a| parse_host_port("--status-addr", a))
        .transpose()?;
    let maintenance_file = match args.maintenance_file.as_deref() {
        Some("") => return Err(usage("--maintenance-file: the path must not be empty")),
        other => other.map(std::path::PathBuf::from),
    };
    Ok(Operability {
        status_addr,
        maintenance_file,
    })
}

/// The probe of `sidekick check`, which needs one.
pub fn check_probe(args: &CheckArgs) -> Result<ProbeSpec, UsageError> {
    probe_spec(&args.probe)?.ok_or_else(|| usage(format!("check needs a probe: {PROBE_FLAGS}")))
}

/// The etcd settings of `sidekick withdraw`, after its own checks.
pub fn withdraw_settings(args: &WithdrawArgs, env: &dyn Environment) -> Result<EtcdSettings, UsageError> {
    if args.key.is_empty() {
        return Err(usage("KEY must not be empty"));
    }
    etcd_settings(&args.etcd, env)
}

/// Probe and lease timing of `run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timing {
    /// Time between probe starts, before jitter.
    pub interval: Duration,
    /// Consecutive successes before the keys are put.
    pub rise: u32,
    /// Consecutive failures before the keys are removed.
    pub fall: u32,
    /// Lease TTL.
    pub ttl: Duration,
    /// Failures during this long after start do not count.
    pub grace: Duration,
    /// Wait after withdrawing on SIGTERM/SIGINT.
    pub drain: Duration,
}

/// One kind of probe with its options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSpec {
    /// What is probed.
    pub target: ProbeTarget,
    /// Time limit of one probe.
    pub timeout: Duration,
}

/// The probed thing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeTarget {
    /// An HTTP(S) request.
    Http(HttpSpec),
    /// A TCP connect to `host:port`.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
    /// `/bin/sh -c COMMAND`.
    Exec {
        /// The command line, as given.
        command: String,
    },
    /// A gRPC health check.
    Grpc(GrpcSpec),
}

/// Options of a gRPC health probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcSpec {
    /// Host name or address (an IPv6 address without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
    /// The service asked about; empty for the whole server.
    pub service: String,
    /// TLS rather than plaintext HTTP/2.
    pub tls: bool,
    /// Skip TLS verification.
    pub insecure: bool,
}

/// Options of an HTTP probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSpec {
    /// `https://` rather than `http://`.
    pub https: bool,
    /// Host to connect to (an IPv6 address without brackets).
    pub host: String,
    /// Port to connect to (the scheme's default when the URL has none).
    pub port: u16,
    /// `host[:port]` as written in the URL, for the Host header.
    pub authority: String,
    /// Path and query, at least `/`.
    pub path: String,
    /// HTTP method.
    pub method: http::Method,
    /// Healthy status codes.
    pub expect_status: StatusSet,
    /// Substring the body must contain.
    pub expect_body: Option<String>,
    /// Extra request headers, `Host` included.
    pub headers: Vec<(String, String)>,
    /// Skip TLS verification.
    pub insecure: bool,
}

/// A set of HTTP status codes, as inclusive ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusSet(Vec<(u16, u16)>);

impl StatusSet {
    /// Whether `code` is in the set.
    pub fn contains(&self, code: u16) -> bool {
        self.0.iter().any(|&(lo, hi)| lo <= code && code <= hi)
    }
}

impl Default for StatusSet {
    fn default() -> Self {
        StatusSet(vec![(200, 399)])
    }
}

impl std::str::FromStr for StatusSet {
    type Err = String;

    /// Parses `200,204,300-399`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut ranges = Vec::new();
        for part in s.split(',').map(str::trim) {
            let (lo, hi) = match part.split_once('-') {
                Some((lo, hi)) => (lo.trim(), hi.trim()),
                None => (part, part),
            };
            let code = |t: &str| -> Result<u16, String> {
                match t.parse::<u16>() {
                    Ok(c) if (100..=599).contains(&c) => Ok(c),
                    _ => Err(format!("'{t}' is not an HTTP status code (100-599)")),
                }
            };
            let (lo, hi) = (code(lo)?, code(hi)?);
            if lo > hi {
                return Err(format!("range '{part}' runs backwards"));
            }
            ranges.push((lo, hi));
        }
        Ok(StatusSet(ranges))
    }
}

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdSettings {
    /// Where etcd is, and which rule said so.
    pub discovery: Discovery,
    /// User name and password.
    pub auth: Option<(String, String)>,
    /// TLS files.
    pub tls: Option<TlsFiles>,
    /// Connect and request time limit.
    pub dial_timeout: Duration,
}

/// TLS material for the etcd connection, as file paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA bundle verifying the server.
    pub cacert: Option<String>,
    /// Client certificate and key.
    pub identity: Option<(String, String)>,
}

impl ProbeOptions {
    /// The first HTTP-only option that is set, if any.
    fn http_only_option(&self) -> Option<&'static str> {
        if self.expect_status.is_some() {
            Some("--expect-status")
        } else if self.expect_body.is_some() {
            Some("--expect-body")
        } else if !self.headers.is_empty() {
            Some("--header")
        } else if self.method.is_some() {
            Some("--method")
        } else if self.insecure {
            Some("--insecure")
        } else {
            None
        }
    }
}

/// Builds the probe of `run` and `check`, or `None` when no probe flag was
/// given.
pub fn probe_spec(args: &ProbeArgs) -> Result<Option<ProbeSpec>, UsageError> {
    let given: Vec<&str> = [
        ("--http", args.http.is_some()),
        ("--tcp", args.tcp.is_some()),
        ("--exec", args.exec.is_some()),
        ("--grpc", args.grpc.is_some()),
    ]
    .into_iter()
    .filter_map(|(flag, set)| set.then_some(flag))
    .collect();
    if let [first @ .., last] = given.as_slice() {
        if !first.is_empty() {
            return Err(usage(format!(
                "{} and {last} cannot be used together: give one probe",
                first.join(", ")
            )));
        }
    }
    if args.grpc.is_none() {
        let grpc_only = [
            ("--grpc-service", args.grpc_service.is_some()),
            ("--grpc-tls", args.grpc_tls),
        ];
        if let Some((flag, _)) = grpc_only.into_iter().find(|(_, set)| *set) {
            return Err(usage(format!("{flag} needs --grpc HOST:PORT")));
        }
    }
    let opts = &args.options;
    let target = match (&args.exec, &args.grpc) {
        (Some(command), _) => {
            if let Some(flag) = opts.http_only_option() {
                return Err(usage(format!("{flag} applies to --http probes only, not --exec")));
            }
            if command.trim().is_empty() {
                return Err(usage("--exec: the command must not be empty"));
            }
            ProbeTarget::Exec {
                command: command.clone(),
            }
        }
        (None, Some(addr)) => {
            match opts.http_only_option() {
                // The last one it names, so no HTTP-only option is set.
                Some("--insecure") if !args.grpc_tls => {
                    return Err(usage(
                        "--insecure needs --grpc-tls with --grpc: it skips TLS verification",
                    ))
                }
                Some("--insecure") | None => {}
                Some(flag) => return Err(usage(format!("{flag} applies to --http probes only, not --grpc"))),
            }
            let (host, port) = parse_host_port("--grpc", addr)?;
            ProbeTarget::Grpc(GrpcSpec {
                host,
                port,
                service: args.grpc_service.clone().unwrap_or_default(),
                tls: args.grpc_tls,
                insecure: opts.insecure,
            })
        }
        (None, None) => {
            if args.http.is_none() && args.tcp.is_none() {
                if let Some(flag) = opts.http_only_option().or(opts.timeout.as_ref().map(|_| "--timeout")) {
                    return Err(usage(format!("{flag} needs a probe: add {PROBE_FLAGS}")));
                }
            }
            return target_spec([("--http", &args.http), ("--tcp", &args.tcp)], opts);
        }
    };
    Ok(Some(ProbeSpec {
        target,
        timeout: probe_timeout(opts)?,
    }))
}

/// `--timeout`, more than zero.
fn probe_timeout(opts: &ProbeOptions) -> Result<Duration, UsageError> {
    let timeout = duration("--timeout", &opts.timeout, Duration::from_secs(2))?;
    if timeout.is_zero() {
        return Err(usage("--timeout must be more than 0s"));
    }
    Ok(timeout)
}

/// Builds a probe from an HTTP URL flag and a TCP address flag, named as the
/// user typed them (`--http`/`--tcp`, `--wait-http`/`--wait-tcp`).
fn target_spec(
    [(http_flag, http), (tcp_flag, tcp)]: [(&str, &Option<String>); 2],
    opts: &ProbeOptions,
) -> Result<Option<ProbeSpec>, UsageError> {
    let timeout = probe_timeout(opts)?;
    let target = match (http, tcp) {
        (Some(_), Some(_)) => return Err(usage(format!("{http_flag} and {tcp_flag} cannot be used together"))),
        (Some(url), None) => {
            let expect_status = match &opts.expect_status {
                None => StatusSet::default(),
                Some(s) => s.parse().map_err(|e| usage(format!("--expect-status: {e}")))?,
            };
            let method = match &opts.method {
                None => http::Method::GET,
                Some(m) => http::Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                    .map_err(|_| usage(format!("--method: '{m}' is not an HTTP method")))?,
            };
            let headers = opts.headers.iter().map(|h| parse_header(h)).collect::<Result<_, _>>()?;
            let (https, host, port, authority, path) = parse_url(http_flag, url)?;
            ProbeTarget::Http(HttpSpec {
                https,
                host,
                port,
                authority,
                path,
                method,
                expect_status,
                expect_body: opts.expect_body.clone(),
                headers,
                insecure: opts.insecure,
            })
        }
        (None, Some(addr)) => {
            if let Some(flag) = opts.http_only_option() {
                return Err(usage(format!(
                    "{flag} applies to {http_flag} probes only, not {tcp_flag}"
                )));
            }
            let (host, port) = parse_host_port(tcp_flag, addr)?;
            ProbeTarget::Tcp { host, port }
        }
        (None, None) => {
            if let Some(flag) = opts.http_only_option().or(opts.timeout.as_ref().map(|_| "--timeout")) {
                return Err(usage(format!(
                    "{flag} needs a probe: add {http_flag} URL or {tcp_flag} HOST:PORT"
                )));
            }
            return Ok(None);
        }
    };
    Ok(Some(ProbeSpec { target, timeout }))
}

/// A flag's value for a message: as the user typed it, or the default,
/// said to be one (`2s (the default)`), since a default can be the culprit.
fn as_given(raw: &Option<String>, value: Duration) -> String {
    match raw {
        Some(r) => r.trim().to_string(),
        None => format!("{} (the default)", humantime::format_duration(value)),
    }
}

/// Builds the timing and checks it against the probe, whose `--timeout`
/// was given as `timeout_raw` (`None`: the default).
pub fn timing(
    args: &TimingArgs,
    probe: Option<&ProbeSpec>,
    timeout_raw: &Option<String>,
) -> Result<Timing, UsageError> {
    let t = Timing {
        interval: duration("--interval", &args.interval, Duration::from_secs(5))?,
        rise: count("--rise", &args.rise, 2)?,
        fall: count("--fall", &args.fall, 2)?,
        ttl: lease_ttl(&args.ttl, Duration::from_secs(15))?,
        grace: duration("--grace", &args.grace, Duration::ZERO)?,
        drain: duration("--drain", &args.drain, Duration::ZERO)?,
    };
    let show = |d: Duration| humantime::format_duration(d).to_string();
    if t.interval.is_zero() {
        return Err(usage("--interval must be more than 0s"));
    }
    if let Some(p) = probe {
        if p.timeout >= t.interval {
            return Err(usage(format!(
                "--timeout {} must be smaller than --interval {}",
                as_given(timeout_raw, p.timeout),
                as_given(&args.interval, t.interval)
            )));
        }
        if t.ttl <= t.interval + p.timeout {
            return Err(usage(format!(
                "--ttl {} must be greater than --interval + --timeout ({} + {} = {})",
                as_given(&args.ttl, t.ttl),
                as_given(&args.interval, t.interval),
                as_given(timeout_raw, p.timeout),
                show(t.interval + p.timeout)
            )));
        }
    } else {
        for (flag, set) in [
            ("--interval", args.interval.is_some()),
            ("--rise", args.rise.is_some()),
            ("--fall", args.fall.is_some()),
            ("--grace", args.grace.is_some()),
        ] {
            if set {
                return Err(usage(format!("{flag} needs a probe: add {PROBE_FLAGS}")));
            }
        }
    }
    Ok(t)
}

/// The `--dial-timeout`: more than zero, 5s by default.
pub fn dial_timeout(raw: &Option<String>) -> Result<Duration, UsageError> {
    let d = duration("--dial-timeout", raw, Duration::from_secs(5))?;
    if d.is_zero() {
        return Err(usage("--dial-timeout must be more than 0s"));
    }
    Ok(d)
}

/// Builds the etcd settings, discovering the endpoints.
pub fn etcd_settings(args: &EtcdArgs, env: &dyn Environment) -> Result<EtcdSettings, UsageError> {
    let dial_timeout = dial_timeout(&args.dial_timeout)?;
    let discovery = discover::discover(args.endpoints.as_deref(), args.env_file.as_deref(), env)?;
    let password = args
        .password
        .clone()
        .or_else(|| env.var("SIDEKICK_PASSWORD"))
        .or_else(|| env.var("ETCDCTL_PASSWORD"));
    let auth = match (&args.user, password) {
        (None, None) => None,
        (None, Some(_)) => return Err(usage("--password needs --user")),
        (Some(u), pass) => {
            let (name, inline) = match u.split_once(':') {
                Some((n, p)) => (n, Some(p.to_string())),
                None => (u.as_str(), None),
            };
            if name.is_empty() {
                return Err(usage("--user must name a user: NAME or NAME:PASS"));
            }
            match (inline, pass) {
                (Some(_), Some(_)) if args.password.is_some() => {
                    return Err(usage("--user NAME:PASS and --password cannot be used together"))
                }
                (Some(p), _) | (None, Some(p)) => Some((name.to_string(), p)),
                (None, None) => {
                    return Err(usage(
                        "--user needs a password: NAME:PASS, --password or SIDEKICK_PASSWORD",
                    ))
                }
            }
        }
    };
    let identity = match (&args.cert, &args.tls_key) {
        (Some(c), Some(k)) => Some((c.clone(), k.clone())),
        (None, None) => None,
        (Some(_), None) => return Err(usage("--cert needs --key")),
        (None, Some(_)) => return Err(usage("--key needs --cert")),
    };
    let tls = (args.cacert.is_some() || identity.is_some()).then(|| TlsFiles {
        cacert: args.cacert.clone(),
        identity,
    });
    if tls.is_some() {
        if let Some(ep) = discovery.endpoints.iter().find(|e| e.starts_with("http://")) {
            return Err(usage(format!(
                "--cacert/--cert/--key need https:// endpoints, but {ep} is http:// ({})",
                discovery.rule
            )));
        }
    }
    Ok(EtcdSettings {
        discovery,
        auth,
        tls,
        dial_timeout,
    })
}

/// `KEY VALUE` plus every `--extra KEY=VALUE`, each key once.
fn key_values(key: &str, value: &str, extra: &[String]) -> Result<Vec<(String, String)>, UsageError> {
    if key.is_empty() {
        return Err(usage("KEY must not be empty"));
    }
    let mut keys = vec![(key.to_string(), value.to_string())];
    for raw in extra {
        let (k, v) = parse_extra(raw)?;
        if keys.iter().any(|(existing, _)| *existing == k) {
            return Err(usage(format!("--extra: key '{k}' is given twice")));
        }
        keys.push((k, v));
    }
    Ok(keys)
}

/// A lease TTL: whole seconds (etcd grants leases in seconds, and rounding
/// silently would change what the operator asked for), at least 2s.
pub(crate) fn lease_ttl(raw: &Option<String>, default: Duration) -> Result<Duration, UsageError> {
    let ttl = duration("--ttl", raw, default)?;
    let show = as_given(raw, ttl);
    if ttl.subsec_nanos() != 0 {
        return Err(usage(format!(
            "--ttl {show} must be a whole number of seconds (etcd leases count seconds)"
        )));
    }
    if ttl < Duration::from_secs(2) {
        return Err(usage(format!("--ttl {show} must be at least 2s")));
    }
    Ok(ttl)
}

/// Everything `sidekick announce` needs.
#[derive(Debug, Clone)]
pub struct AnnounceConfig {
    /// The keys to put.
    pub keys: Vec<(String, String)>,
    /// Lease TTL; `None` writes permanent keys.
    pub ttl: Option<Duration>,
    /// The probe to pass first, and how long to wait for it.
    pub wait: Option<(ProbeSpec, Duration)>,
    /// Where etcd is and how to reach it.
    pub etcd: EtcdSettings,
}

/// Builds the `announce` configuration.
pub fn announce_config(args: &AnnounceArgs, env: &dyn Environment) -> Result<AnnounceConfig, UsageError> {
    let keys = key_values(&args.key, &args.value, &args.extra)?;
    let ttl = args
        .ttl
        .as_ref()
        .map(|_| lease_ttl(&args.ttl, Duration::ZERO))
        .transpose()?;
    let w = &args.wait;
    let probe = target_spec([("--wait-http", &w.wait_http), ("--wait-tcp", &w.wait_tcp)], &w.options)?;
    let wait_timeout = duration("--wait-timeout", &w.wait_timeout, Duration::from_secs(60))?;
    let wait = match probe {
        Some(p) => Some((p, wait_timeout)),
        None if w.wait_timeout.is_some() => {
            return Err(usage("--wait-timeout needs --wait-http URL or --wait-tcp HOST:PORT"))
        }
        None => None,
    };
    let etcd = etcd_settings(&args.etcd, env)?;
    Ok(AnnounceConfig { keys, ttl, wait, etcd })
}

/// The `--shared` keys: none of them also the instance's own, none given
/// twice with different values.
fn shared_values(keys: &[(String, String)], shared: &[String]) -> Result<Vec<(String, String)>, UsageError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for raw in shared {
        let (k, v) = parse_key_value("--shared", raw)?;
        if keys.iter().any(|(own, _)| *own == k) {
            return Err(usage(format!(
                "--shared: key '{k}' is also given as KEY or --extra; a key is either this instance's or shared"
            )));
        }
        match out.iter().find(|(existing, _)| *existing == k) {
            Some((_, before)) if *before != v => {
                return Err(usage(format!(
                    "--shared: key '{k}' is given twice with different values ('{before}' and '{v}')"
                )))
            }
            Some(_) => {}
            None => out.push((k, v)),
        }
    }
    Ok(out)
}

/// Builds the whole `run` configuration.
pub fn run_config(args: &RunArgs, env: &dyn Environment) -> Result<RunConfig, UsageError> {
    let keys = key_values(&args.key, &args.value, &args.extra)?;
    let shared = shared_values(&keys, &args.shared)?;
    let ops = operability(&args.ops)?;
    let probe = probe_spec(&args.probe)?;
    let timing = timing(&args.timing, probe.as_ref(), &args.probe.options.timeout)?;
    let etcd = etcd_settings(&args.etcd, env)?;
    Ok(RunConfig {
        keys,
        shared,
        ops,
        probe,
        timing,
        etcd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discover::MapEnv;

    fn s(v: &str) -> Option<String> {
        Some(v.to_string())
    }

    fn run_args(f: impl FnOnce(&mut RunArgs)) -> RunArgs {
        let mut a = RunArgs {
            key: "/services/web/1".into(),
            value: "10.0.0.5:8080".into(),
            extra: vec![],
            shared: vec![],
            ops: Default::default(),
            probe: ProbeArgs::default(),
            timing: TimingArgs::default(),
            etcd: EtcdArgs {
                endpoints: s("http://127.0.0.1:2379"),
                ..EtcdArgs::default()
            },
        };
        f(&mut a);
        a
    }

    fn err(a: RunArgs) -> String {
        run_config(&a, &MapEnv::default()).unwrap_err().0
    }

    #[test]
    fn each_etcd_call_is_bounded_by_the_dial_timeout_and_a_third_of_the_ttl() {
        for (ttl, dial, bound_ms) in [
            ("15s", None, 5000),
            ("3s", None, 1000),
            ("30s", Some("2s"), 2000),
            ("2s", Some("10s"), 666),
        ] {
            let a = run_args(|a| {
                a.timing.ttl = s(ttl);
                a.etcd.dial_timeout = dial.map(String::from);
            });
            let cfg = run_config(&a, &MapEnv::default()).unwrap();
            assert_eq!(cfg.call_bound().as_millis(), bound_ms, "ttl {ttl}, dial {dial:?}");
        }
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = run_config(
            &run_args(|a| a.probe.http = s("http://127.0.0.1:8080/health")),
            &MapEnv::default(),
        )
        .unwrap();
        assert_eq!(
            c.timing,
            Timing {
                interval: Duration::from_secs(5),
                rise: 2,
                fall: 2,
                ttl: Duration::from_secs(15),
                grace: Duration::ZERO,
                drain: Duration::ZERO,
            }
        );
        let p = c.probe.unwrap();
        assert_eq!(p.timeout, Duration::from_secs(2));
        let ProbeTarget::Http(h) = p.target else {
            panic!("not http")
        };
        assert_eq!(h.method, http::Method::GET);
        assert_eq!(
            (h.host.as_str(), h.port, h.path.as_str()),
            ("127.0.0.1", 8080, "/health")
        );
        assert!(h.expect_status.contains(200) && h.expect_status.contains(399));
        assert!(!h.expect_status.contains(400) && !h.expect_status.contains(199));
        assert_eq!(c.etcd.dial_timeout, Duration::from_secs(5));
    }

    #[test]
    fn each_bad_flag_names_the_flag_and_the_rule() {
        let http = |a: &mut RunArgs| a.probe.http = s("http://127.0.0.1:1/");
        type Case = (&'static str, Box<dyn Fn(&mut RunArgs)>);
        let cases: Vec<Case> = vec![
            (
                "--timeout 5s must be smaller than --interval 5s",
                Box::new(move |a| {
                    http(a);
                    a.probe.options.timeout = s("5s")
                }),
            ),
            (
                "--ttl 7s must be greater than --interval + --timeout (5s (the default) + 2s (the default) = 7s)",
                Box::new(move |a| {
                    http(a);
                    a.timing.ttl = s("7s")
                }),
            ),
            ("--ttl 1s must be at least 2s", Box::new(|a| a.timing.ttl = s("1s"))),
            (
                "--ttl 2500ms must be a whole number of seconds",
                Box::new(|a| a.timing.ttl = s("2500ms")),
            ),
            (
                "--interval: 'soon' is not a duration",
                Box::new(move |a| {
                    http(a);
                    a.timing.interval = s("soon")
                }),
            ),
            (
                "--interval must be more than 0s",
                Box::new(move |a| {
                    http(a);
                    a.timing.interval = s("0s")
                }),
            ),
            (
                "--timeout must be more than 0s",
                Box::new(move |a| {
                    http(a);
                    a.probe.options.timeout = s("0ms")
                }),
            ),
            (
                "--rise: '0' must be a whole number of at least 1",
                Box::new(move |a| {
                    http(a);
                    a.timing.rise = s("0")
                }),
            ),
            (
                "--fall: '-1' must be a whole number of at least 1",
                Box::new(move |a| {
                    http(a);
                    a.timing.fall = s("-1")
                }),
            ),
            (
                "--grace: 'x' is not a duration",
                Box::new(move |a| {
                    http(a);
                    a.timing.grace = s("x")
                }),
            ),
            ("--drain: '5' is not a duration", Box::new(|a| a.timing.drain = s("5"))),
            ("--rise needs a probe", Box::new(|a| a.timing.rise = s("3"))),
            ("--interval needs a probe", Box::new(|a| a.timing.interval = s("1s"))),
            (
                "--timeout needs a probe",
                Box::new(|a| a.probe.options.timeout = s("1s")),
            ),
            (
                "--expect-status needs a probe",
                Box::new(|a| a.probe.options.expect_status = s("200")),
            ),
            (
                "--expect-body applies to --http probes only",
                Box::new(|a| {
                    a.probe.tcp = s("127.0.0.1:80");
                    a.probe.options.expect_body = s("ok")
                }),
            ),
            (
                "--http and --tcp cannot be used together",
                Box::new(|a| {
                    a.probe.tcp = s("127.0.0.1:80");
                    a.probe.http = s("http://x/")
                }),
            ),
            (
                "--http, --tcp and --exec cannot be used together: give one probe",
                Box::new(|a| {
                    a.probe.http = s("http://x/");
                    a.probe.tcp = s("127.0.0.1:80");
                    a.probe.exec = s("true")
                }),
            ),
            (
                "--exec and --grpc cannot be used together",
                Box::new(|a| {
                    a.probe.exec = s("true");
                    a.probe.grpc = s("127.0.0.1:50051")
                }),
            ),
            (
                "--grpc-service needs --grpc HOST:PORT",
                Box::new(|a| {
                    a.probe.http = s("http://x/");
                    a.probe.grpc_service = s("web")
                }),
            ),
            (
                "--grpc-tls needs --grpc HOST:PORT",
                Box::new(|a| a.probe.grpc_tls = true),
            ),
            (
                "--expect-body applies to --http probes only, not --exec",
                Box::new(|a| {
                    a.probe.exec = s("true");
                    a.probe.options.expect_body = s("ok")
                }),
            ),
            (
                "--insecure applies to --http probes only, not --exec",
                Box::new(|a| {
                    a.probe.exec = s("true");
                    a.probe.options.insecure = true
                }),
            ),
            (
                "--method applies to --http probes only, not --grpc",
                Box::new(|a| {
                    a.probe.grpc = s("127.0.0.1:50051");
                    a.probe.options.method = s("POST")
                }),
            ),
            (
                "--insecure needs --grpc-tls with --grpc",
                Box::new(|a| {
                    a.probe.grpc = s("127.0.0.1:50051");
                    a.probe.options.insecure = true
                }),
            ),
            (
                "--exec: the command must not be empty",
                Box::new(|a| a.probe.exec = s("  ")),
            ),
            (
                "--grpc: '127.0.0.1' must be HOST:PORT",
                Box::new(|a| a.probe.grpc = s("127.0.0.1")),
            ),
            (
                "--timeout 5s must be smaller than --interval 5s",
                Box::new(|a| {
                    a.probe.exec = s("true");
                    a.probe.options.timeout = s("5s")
                }),
            ),
            (
                "--timeout must be more than 0s",
                Box::new(|a| {
                    a.probe.grpc = s("h:1");
                    a.probe.options.timeout = s("0s")
                }),
            ),
            (
                "--timeout needs a probe: add --http URL, --tcp HOST:PORT, --exec CMD or --grpc HOST:PORT",
                Box::new(|a| a.probe.options.timeout = s("1s")),
            ),
            (
                "--http: 'localhost:8080/health' must be an http:// or https:// URL",
                Box::new(|a| a.probe.http = s("localhost:8080/health")),
            ),
            (
                "--http: 'http://' must be an http:// or https:// URL",
                Box::new(|a| a.probe.http = s("http://")),
            ),
            (
                "--http: 'ftp://h/x' must be an http:// or https:// URL",
                Box::new(|a| a.probe.http = s("ftp://h/x")),
            ),
            (
                "--tcp: '127.0.0.1' must be HOST:PORT",
                Box::new(|a| a.probe.tcp = s("127.0.0.1")),
            ),
            ("--tcp: 'h:0' must be HOST:PORT", Box::new(|a| a.probe.tcp = s("h:0"))),
            ("--tcp: ':80' must be HOST:PORT", Box::new(|a| a.probe.tcp = s(":80"))),
            (
                "--expect-status: '600' is not an HTTP status code",
                Box::new(move |a| {
                    http(a);
                    a.probe.options.expect_status = s("200,600")
                }),
            ),
            (
                "--expect-status: range '399-200' runs backwards",
                Box::new(move |a| {
                    http(a);
                    a.probe.options.expect_status = s("399-200")
                }),
            ),
            (
                "--header: 'NoColon' must be 'Name: value'",
                Box::new(move |a| {
                    http(a);
                    a.probe.options.headers = vec!["NoColon".into()]
                }),
            ),
            (
                "--method: 'GE T' is not an HTTP method",
                Box::new(move |a| {
                    http(a);
                    a.probe.options.method = s("GE T")
                }),
            ),
            (
                "--extra: '=v' must be KEY=VALUE",
                Box::new(|a| a.extra = vec!["=v".into()]),
            ),
            (
                "--extra: 'novalue' must be KEY=VALUE",
                Box::new(|a| a.extra = vec!["novalue".into()]),
            ),
            (
                "--extra: key '/services/web/1' is given twice",
                Box::new(|a| a.extra = vec!["/services/web/1=x".into()]),
            ),
            ("KEY must not be empty", Box::new(|a| a.key = String::new())),
            (
                "--dial-timeout must be more than 0s",
                Box::new(|a| a.etcd.dial_timeout = s("0s")),
            ),
            ("--password needs --user", Box::new(|a| a.etcd.password = s("pw"))),
            ("--user needs a password", Box::new(|a| a.etcd.user = s("bob"))),
            (
                "--user NAME:PASS and --password cannot be used together",
                Box::new(|a| {
                    a.etcd.user = s("bob:pw");
                    a.etcd.password = s("pw2")
                }),
            ),
            ("--cert needs --key", Box::new(|a| a.etcd.cert = s("c.pem"))),
            ("--key needs --cert", Box::new(|a| a.etcd.tls_key = s("k.pem"))),
            (
                "--cacert/--cert/--key need https:// endpoints",
                Box::new(|a| a.etcd.cacert = s("ca.pem")),
            ),
            (
                "--endpoints: 'ftp://x:1' must be",
                Box::new(|a| a.etcd.endpoints = s("ftp://x:1")),
            ),
        ];
        for (want, f) in cases {
            let mut a = run_args(|_| {});
            f(&mut a);
            let got = err(a);
            assert!(got.starts_with(want), "want {want:?}, got {got:?}");
            assert!(!got.contains('\n'), "one line: {got:?}");
        }
    }

    #[test]
    fn good_combinations_pass() {
        let ok = |f: &dyn Fn(&mut RunArgs)| {
            let a = run_args(f);
            run_config(&a, &MapEnv::default()).unwrap_or_else(|e| panic!("{e}"))
        };
        // The short timings an operator tries first.
        let c = ok(&|a| {
            a.probe.http = s("http://127.0.0.1:8080/");
            a.timing.interval = s("200ms");
            a.probe.options.timeout = s("100ms");
            a.timing.ttl = s("2s");
        });
        assert_eq!(c.timing.interval, Duration::from_millis(200));
        // No probe: only the TTL rule applies.
        let c = ok(&|a| a.timing.ttl = s("2s"));
        assert!(c.probe.is_none());
        let c = ok(&|a| {
            a.probe.tcp = s("[::1]:6379");
            a.extra = vec!["/services/web/scheme=http".into(), "/x=a=b".into()];
            a.etcd.user = s("bob");
            a.etcd.password = s("secret");
        });
        assert_eq!(c.keys[2], ("/x".into(), "a=b".into()));
        let e = ok(&|a| {
            a.probe.exec = s("pg_isready -q");
            a.probe.options.timeout = s("1s");
        });
        let p = e.probe.unwrap();
        assert_eq!(p.timeout, Duration::from_secs(1));
        assert_eq!(
            p.target,
            ProbeTarget::Exec {
                command: "pg_isready -q".into()
            }
        );
        let grpc = |f: &dyn Fn(&mut RunArgs)| {
            ok(&|a| {
                a.probe.grpc = s("[::1]:50051");
                f(a)
            })
            .probe
            .unwrap()
            .target
        };
        let plain = GrpcSpec {
            host: "::1".into(),
            port: 50051,
            service: String::new(),
            tls: false,
            insecure: false,
        };
        assert_eq!(grpc(&|_| {}), ProbeTarget::Grpc(plain.clone()));
        assert_eq!(
            grpc(&|a| {
                a.probe.grpc_service = s("web.Api");
                a.probe.grpc_tls = true;
                a.probe.options.insecure = true;
            }),
            ProbeTarget::Grpc(GrpcSpec {
                service: "web.Api".into(),
                tls: true,
                insecure: true,
                ..plain
            })
        );
        assert_eq!(c.etcd.auth, Some(("bob".into(), "secret".into())));
        assert_eq!(
            c.probe.unwrap().target,
            ProbeTarget::Tcp {
                host: "::1".into(),
                port: 6379
            }
        );
    }

    #[test]
    fn announce_rules() {
        use crate::cli::{AnnounceArgs, WaitArgs};
        let args = |f: &dyn Fn(&mut AnnounceArgs)| {
            let mut a = AnnounceArgs {
                key: "/k".into(),
                value: "v".into(),
                extra: vec![],
                ttl: None,
                wait: WaitArgs::default(),
                etcd: EtcdArgs {
                    endpoints: s("h:1"),
                    ..EtcdArgs::default()
                },
            };
            f(&mut a);
            announce_config(&a, &MapEnv::default())
        };
        let c = args(&|_| {}).unwrap();
        assert_eq!((c.ttl, c.wait.is_none()), (None, true), "permanent, no wait");
        let c = args(&|a| {
            a.ttl = s("30s");
            a.wait.wait_tcp = s("127.0.0.1:80");
        })
        .unwrap();
        assert_eq!(c.ttl, Some(Duration::from_secs(30)));
        assert_eq!(c.wait.unwrap().1, Duration::from_secs(60), "default --wait-timeout");
        type Case<'a> = (&'a str, &'a dyn Fn(&mut AnnounceArgs));
        let cases: &[Case] = &[
            ("--ttl 1s must be at least 2s", &|a| a.ttl = s("1s")),
            ("--wait-timeout needs --wait-http", &|a| a.wait.wait_timeout = s("5s")),
            ("--wait-http: 'nope' must be an http:// or https:// URL", &|a| {
                a.wait.wait_http = s("nope")
            }),
            ("--wait-tcp: 'h' must be HOST:PORT", &|a| a.wait.wait_tcp = s("h")),
            ("--expect-body applies to --wait-http probes only", &|a| {
                a.wait.wait_tcp = s("h:1");
                a.wait.options.expect_body = s("ok");
            }),
            ("--extra: 'x' must be KEY=VALUE", &|a| a.extra = vec!["x".into()]),
        ];
        for (want, f) in cases {
            let got = args(*f).unwrap_err().0;
            assert!(got.starts_with(want), "want {want:?}, got {got:?}");
        }
    }

    #[test]
    fn status_lists_parse() {
        let set: StatusSet = "200, 204,300-302".parse().unwrap();
        for (code, want) in [
            (200, true),
            (201, false),
            (204, true),
            (300, true),
            (302, true),
            (303, false),
        ] {
            assert_eq!(set.contains(code), want, "{code}");
        }
        for bad in ["", "abc", "200-", "-200", "99", "1000", "200,,204", "300-200"] {
            assert!(bad.parse::<StatusSet>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn check_and_withdraw_have_rules_of_their_own() {
        use crate::cli::{CheckArgs, WithdrawArgs};
        let check = CheckArgs {
            probe: ProbeArgs::default(),
        };
        assert_eq!(
            check_probe(&check).unwrap_err().0,
            "check needs a probe: --http URL, --tcp HOST:PORT, --exec CMD or --grpc HOST:PORT"
        );
        let check = CheckArgs {
            probe: ProbeArgs {
                tcp: s("127.0.0.1:80"),
                ..ProbeArgs::default()
            },
        };
        assert!(check_probe(&check).is_ok());
        let withdraw = |key: &str| WithdrawArgs {
            key: key.into(),
            if_value: None,
            prefix: false,
            etcd: EtcdArgs {
                endpoints: s("http://127.0.0.1:2379"),
                ..EtcdArgs::default()
            },
        };
        assert_eq!(
            withdraw_settings(&withdraw(""), &MapEnv::default()).unwrap_err().0,
            "KEY must not be empty"
        );
        assert!(withdraw_settings(&withdraw("/k"), &MapEnv::default()).is_ok());
    }
}
