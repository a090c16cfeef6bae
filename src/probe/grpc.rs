//! The gRPC probe: `grpc.health.v1.Health/Check`, healthy on `SERVING`.
//!
//! One fresh connection per probe, as the HTTP probe does: a pooled channel
//! reconnects behind our back and could answer from a connection the
//! listener no longer has, and a connection per probe costs the instance
//! nothing it would not pay for any client. We open the TCP (and TLS)
//! connection ourselves, so a refused port or a bad certificate reads as
//! such in the detail, then hand it to a tonic channel for the one call.
//! Nothing is kept between probes, so an unused probe kind costs nothing.

use std::future::{ready, Ready};
use std::io;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};
use tokio_rustls::TlsConnector;
use tonic::codegen::Service;
use tonic::transport::{Endpoint, Uri};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::{tls, SetupError};
use crate::config::GrpcSpec;

/// One gRPC health target.
pub struct GrpcProbe {
    host: String,
    port: u16,
    service: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    pub(super) timeout: Duration,
}

impl std::fmt::Debug for GrpcProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcProbe")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("service", &self.service)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// A byte stream the channel can run HTTP/2 over: TCP or TLS.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

impl GrpcProbe {
    /// For `--grpc-tls`, sets up TLS once (offering `h2`, which gRPC
    /// servers require).
    pub fn new(spec: &GrpcSpec, timeout: Duration) -> Result<Self, SetupError> {
        let tls = if spec.tls {
            let config = tls::client_config(spec.insecure, &[b"h2"])?;
            Some((TlsConnector::from(config), tls::server_name(&spec.host)?))
        } else {
            None
        };
        Ok(GrpcProbe {
            host: spec.host.clone(),
            port: spec.port,
            service: spec.service.clone(),
            tls,
            timeout,
        })
    }

    /// Connects, asks once, and judges the answer; bounds its own time and
    /// says at which step it ran out.
    pub(super) async fn check(&self) -> Result<String, String> {
        let deadline = Instant::now() + self.timeout;
        let late = |step: &str| format!("timed out after {} {step}", humantime::format_duration(self.timeout));
        let target = format!("{}:{}", self.host, self.port);
        let io = timeout_at(deadline, self.connect(&target))
            .await
            .map_err(|_| late(&format!("connecting to {target}")))??;
        let authority = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            target.clone()
        };
        let endpoint = Endpoint::from_shared(format!("http://{authority}"))
            .map_err(|e| format!("'{authority}' is not a gRPC address: {}", chain(&e)))?;
        let channel = timeout_at(deadline, endpoint.connect_with_connector(Connected(Some(io))))
            .await
            .map_err(|_| late(&format!("starting HTTP/2 with {target}")))?
            .map_err(|e| format!("could not start HTTP/2 with {target}: {}", chain(&e)))?;
        let request = HealthCheckRequest {
            service: self.service.clone(),
        };
        let answer = timeout_at(deadline, HealthClient::new(channel).check(request))
            .await
            .map_err(|_| late("waiting for the answer"))?;
        let of = if self.service.is_empty() {
            String::new()
        } else {
            format!(" for service '{}'", self.service)
        };
        match answer {
            Ok(r) => match ServingStatus::try_from(r.into_inner().status) {
                Ok(ServingStatus::Serving) => Ok(format!("SERVING{of}")),
                Ok(s) => Err(format!("{}{of}", s.as_str_name())),
                Err(n) => Err(format!("unknown serving status {}{of}", n.0)),
            },
            Err(status) => Err(rpc_error(&status, &of)),
        }
    }

    /// The TCP connection, and the TLS handshake over it with `--grpc-tls`.
    async fn connect(&self, target: &str) -> Result<Box<dyn Io>, String> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("could not connect to {target}: {e}"))?;
        // gRPC sends small frames both ways; do not let Nagle hold them.
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => Ok(Box::new(tcp)),
            Some((connector, name)) => match connector.connect(name.clone(), tcp).await {
                Ok(stream) => Ok(Box::new(stream)),
                Err(e) => Err(format!("TLS handshake with {target} failed: {e}")),
            },
        }
    }
}

/// What a failed call means for the probe.
fn rpc_error(status: &tonic::Status, of: &str) -> String {
    let code = code_name(status.code());
    let message = status.message();
    match status.code() {
        // The standard health service answers NOT_FOUND for a service it
        // has no status for (SERVICE_UNKNOWN is for Watch only).
        tonic::Code::NotFound => {
            format!("SERVICE_UNKNOWN{of}: the server has no health status for it ({code}: {message})")
        }
        tonic::Code::Unimplemented => {
            format!("the server does not serve grpc.health.v1.Health ({code}: {message})")
        }
        _ => format!("gRPC error {code}{of}: {message}"),
    }
}

/// A gRPC status code as the protocol spells it: `NOT_FOUND`.
fn code_name(code: tonic::Code) -> String {
    let mut out = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// An error and its sources on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Hands the connection we opened to the channel, once; a reconnect finds
/// nothing and fails, which ends the probe rather than dialling again.
struct Connected(Option<Box<dyn Io>>);

impl Service<Uri> for Connected {
    type Response = TokioIo<Box<dyn Io>>;
    type Error = io::Error;
    type Future = Ready<Result<Self::Response, io::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        ready(
            self.0
                .take()
                .map(TokioIo::new)
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "the probe's connection is closed")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_are_spelled_as_the_protocol_does() {
        for (code, want) in [
            (tonic::Code::Ok, "OK"),
            (tonic::Code::NotFound, "NOT_FOUND"),
            (tonic::Code::DeadlineExceeded, "DEADLINE_EXCEEDED"),
            (tonic::Code::Unavailable, "UNAVAILABLE"),
            (tonic::Code::Unimplemented, "UNIMPLEMENTED"),
        ] {
            assert_eq!(code_name(code), want);
        }
    }

    #[test]
    fn each_rpc_error_says_what_it_means() {
        let of = " for service 'web'";
        for (status, want) in [
            (
                tonic::Status::not_found("service not registered"),
                "SERVICE_UNKNOWN for service 'web': the server has no health status for it (NOT_FOUND: service not registered)",
            ),
            (
                tonic::Status::unimplemented(""),
                "the server does not serve grpc.health.v1.Health (UNIMPLEMENTED: )",
            ),
            (
                tonic::Status::unavailable("connection reset"),
                "gRPC error UNAVAILABLE for service 'web': connection reset",
            ),
        ] {
            assert_eq!(rpc_error(&status, of), want);
        }
    }
}
