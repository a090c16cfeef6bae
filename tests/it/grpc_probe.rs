//! `--grpc HOST:PORT`: etcd's own health service, a tonic-health server of
//! ours (plain and TLS) for each answer, a closed port, a server that never
//! answers; and `run --grpc` against a real etcd.

use std::net::SocketAddr;
use std::process::Output;
use std::sync::mpsc;
use std::time::Instant;

use tokio::sync::oneshot;
use tonic::codegen::tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::harness::bounds::*;
use crate::harness::*;

/// A `grpc.health.v1` server on 127.0.0.1, in a thread with its own
/// runtime so the test may block on the sidekick binary meanwhile.
struct HealthServer {
    addr: SocketAddr,
    reporter: HealthReporter,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HealthServer {
    /// Serves plaintext HTTP/2, or TLS with `identity` (PEM certificate and key).
    fn start(identity: Option<(String, String)>) -> HealthServer {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (reporter, service) = tonic_health::server::health_reporter();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let incoming = TcpListenerStream::new(tokio::net::TcpListener::from_std(listener).unwrap());
                let mut builder = Server::builder();
                if let Some((cert, key)) = identity {
                    let tls = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
                    builder = builder.tls_config(tls).unwrap();
                }
                builder
                    .add_service(service)
                    .serve_with_incoming_shutdown(incoming, async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
        });
        HealthServer {
            addr,
            reporter,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    async fn set(&self, service: &str, status: ServingStatus) {
        self.reporter.set_service_status(service, status).await;
    }
}

impl Drop for HealthServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn check(args: &[&str]) -> (Option<i32>, String) {
    let mut all = vec!["check"];
    all.extend(args);
    let out: Output = sidekick(&all).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(text.lines().count(), 1, "{args:?}: one line: {text:?}");
    (out.status.code(), text)
}

fn assert_check(args: &[&str], code: i32, want: &str) {
    let (got, text) = check(args);
    assert_eq!(got, Some(code), "{args:?}: {text}");
    assert!(text.starts_with(want), "{args:?}: want {want:?}, got {text:?}");
}

/// etcd 3.4 registers the standard health service on its client port and
/// reports the whole server (service "") as SERVING.
#[tokio::test]
async fn etcd_serves_the_standard_health_service() {
    let etcd = Etcd::start().await;
    let url = etcd.url(0);
    let addr = url.trim_start_matches("http://");
    assert_check(&["--grpc", addr], 0, "healthy: SERVING in ");
}

#[tokio::test]
async fn each_serving_status_and_an_unknown_service() {
    let server = HealthServer::start(None);
    server.set("", ServingStatus::NotServing).await;
    server.set("web.Api", ServingStatus::Serving).await;
    server.set("web.Batch", ServingStatus::Unknown).await;
    let addr = server.addr.to_string();
    let a = addr.as_str();
    assert_check(&["--grpc", a], 1, "unhealthy: NOT_SERVING in ");
    assert_check(
        &["--grpc", a, "--grpc-service", "web.Api"],
        0,
        "healthy: SERVING for service 'web.Api' in ",
    );
    assert_check(
        &["--grpc", a, "--grpc-service", "web.Batch"],
        1,
        "unhealthy: UNKNOWN for service 'web.Batch' in ",
    );
    assert_check(
        &["--grpc", a, "--grpc-service", "nope"],
        1,
        "unhealthy: SERVICE_UNKNOWN for service 'nope': the server has no health status for it (NOT_FOUND",
    );
    // A status change is seen by the next probe: nothing is cached.
    server.set("", ServingStatus::Serving).await;
    assert_check(&["--grpc", a], 0, "healthy: SERVING in ");
}

#[tokio::test]
async fn a_closed_port_and_a_stopped_server_fail_at_once() {
    let closed = format!("127.0.0.1:{}", free_port());
    assert_check(
        &["--grpc", &closed],
        1,
        &format!("unhealthy: could not connect to {closed}: "),
    );

    let server = HealthServer::start(None);
    let addr = server.addr.to_string();
    assert_check(&["--grpc", &addr], 0, "healthy: SERVING");
    drop(server);
    assert_check(
        &["--grpc", &addr],
        1,
        &format!("unhealthy: could not connect to {addr}: "),
    );
}

/// A listener that accepts and never says a word: the probe gives up at
/// the timeout and says it was waiting.
#[test]
fn a_server_that_never_answers_meets_the_timeout() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (release, released) = mpsc::channel::<()>();
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        // The probe's one connection, held open and unanswered until the
        // probe is over.
        if let Ok((c, _)) = listener.accept() {
            conns.push(c);
        }
        let _ = released.recv_timeout(HANG);
    });
    let timeout = "1s";
    let start = Instant::now();
    let (code, text) = check(&["--grpc", &addr, "--timeout", timeout]);
    let took = start.elapsed();
    release.send(()).unwrap();
    held.join().unwrap();
    assert_eq!(code, Some(1), "{text}");
    assert!(text.starts_with("unhealthy: timed out after 1s "), "{text}");
    assert!(took < one_shot_within(flag(timeout)), "took {took:?}");
}

#[tokio::test]
async fn tls_is_verified_unless_insecure() {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let server = HealthServer::start(Some((cert.pem(), key.serialize_pem())));
    let addr = server.addr.to_string();
    assert_check(&["--grpc", &addr, "--grpc-tls", "--insecure"], 0, "healthy: SERVING");
    // Our own certificate is no system root.
    assert_check(
        &["--grpc", &addr, "--grpc-tls"],
        1,
        &format!("unhealthy: TLS handshake with {addr} failed: invalid peer certificate"),
    );
    // Plaintext HTTP/2 to a TLS port gets no health answer.
    let (code, text) = check(&["--grpc", &addr, "--timeout", "1s"]);
    assert_eq!(code, Some(1), "{text}");
}

/// `run --grpc` registers while the server says SERVING and withdraws
/// when it says NOT_SERVING.
#[tokio::test]
async fn run_follows_the_serving_status() {
    let etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let server = HealthServer::start(None);
    server.set("web.Api", ServingStatus::Serving).await;
    let addr = server.addr.to_string();
    let key = "/services/api/1";
    let sk = Running::start(&[
        "run",
        key,
        &addr,
        "--grpc",
        &addr,
        "--grpc-service",
        "web.Api",
        "--interval",
        "200ms",
        "--timeout",
        "150ms",
        "--ttl",
        "2s",
        "--rise",
        "1",
        "--fall",
        "1",
        "--dial-timeout",
        "1s",
        "--endpoints",
        &eps,
    ]);
    let f = sk.figures();
    let c = etcd.client(0).await;
    assert!(
        key_becomes(&c, key, Some(&addr), f.registration()).await,
        "{}",
        sk.log()
    );
    server.set("web.Api", ServingStatus::NotServing).await;
    assert!(key_becomes(&c, key, None, f.withdrawal()).await, "{}", sk.log());
    assert!(sk.log().contains("NOT_SERVING for service 'web.Api'"), "{}", sk.log());
    server.set("web.Api", ServingStatus::Serving).await;
    assert!(
        key_becomes(&c, key, Some(&addr), f.reregistration()).await,
        "{}",
        sk.log()
    );
}
