//! Probes: one check of the instance, bounded by a timeout, and its outcome.

pub(crate) mod exec;
mod grpc;
mod http;
mod tcp;
mod tls;

use std::fmt;
use std::time::{Duration, Instant};

use crate::config::{ProbeSpec, ProbeTarget};

pub use exec::ExecProbe;
pub use grpc::GrpcProbe;
pub use http::HttpProbe;
pub use tcp::TcpProbe;

/// The result of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Whether the instance passed.
    pub ok: bool,
    /// How long the probe took.
    pub latency: Duration,
    /// What was seen: `HTTP 200`, `connected`, `exit 0: ready`, `SERVING`,
    /// or why it failed.
    pub detail: String,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = if self.ok { "healthy" } else { "unhealthy" };
        write!(f, "{word}: {} in {:.1?}", self.detail, self.latency)
    }
}

/// A probe that could not be built (a TLS set-up failure, say).
#[derive(Debug, thiserror::Error)]
#[error("could not set up the probe: {0}")]
pub struct SetupError(String);

/// Any kind of probe.
#[derive(Debug)]
pub enum Probe {
    /// HTTP(S).
    Http(HttpProbe),
    /// TCP connect.
    Tcp(TcpProbe),
    /// A shell command.
    Exec(ExecProbe),
    /// gRPC health checking.
    Grpc(GrpcProbe),
}

impl Probe {
    /// Builds the probe once; it is reused for every check.
    pub fn new(spec: &ProbeSpec) -> Result<Self, SetupError> {
        Ok(match &spec.target {
            ProbeTarget::Http(h) => Probe::Http(HttpProbe::new(h, spec.timeout)?),
            ProbeTarget::Tcp { host, port } => Probe::Tcp(TcpProbe::new(host, *port, spec.timeout)),
            ProbeTarget::Exec { command } => Probe::Exec(ExecProbe::new(command, spec.timeout)),
            ProbeTarget::Grpc(g) => Probe::Grpc(GrpcProbe::new(g, spec.timeout)?),
        })
    }

    /// Runs one check. Never takes much longer than the timeout.
    pub async fn check(&self) -> Outcome {
        let start = Instant::now();
        let (timeout, result) = match self {
            Probe::Http(p) => (p.timeout, tokio::time::timeout(p.timeout, p.check()).await),
            Probe::Tcp(p) => (p.timeout, tokio::time::timeout(p.timeout, p.check()).await),
            // These two bound themselves: an exec probe must kill and reap
            // its process group at the timeout, and a gRPC probe says at
            // which step it ran out of time.
            Probe::Exec(p) => (p.timeout, Ok(p.check().await)),
            Probe::Grpc(p) => (p.timeout, Ok(p.check().await)),
        };
        let (ok, detail) = match result {
            Ok(Ok(detail)) => (true, detail),
            Ok(Err(why)) => (false, why),
            Err(_) => (
                false,
                format!("timed out after {}", humantime::format_duration(timeout)),
            ),
        };
        Outcome {
            ok,
            latency: start.elapsed(),
            detail,
        }
    }
}
