//! A Rust service that announces itself in etcd, with no sidekick process:
//! the library's loop runs next to the service's own work on one tokio
//! runtime, and the key is revoked when the service stops.
//!
//! ```sh
//! cargo run --example embed -- [--endpoints URL[,URL]] [--key KEY] [--listen ADDR]
//! etcdctl get --prefix /services/embed/     # while it runs
//! ```
//!
//! Defaults: etcd at `http://127.0.0.1:2379` (or `SIDEKICK_ENDPOINTS`), key
//! `/services/embed/<pid>`, listening on `127.0.0.1:0`. The value is the
//! address actually bound. Ctrl-C or SIGTERM revokes the lease (the key goes
//! at once) and exits; a SIGKILL leaves the key to expire with the 10 s TTL.
//!
//! No probe is passed, so the key is kept while the process lives, like
//! `sidekick run KEY VALUE` without `--http`. Pass a
//! `etcd_sidekick::probe::Probe` built from a `ProbeSpec` to announce only
//! while a health check passes.

use std::io::IsTerminal;
use std::time::Duration;

use etcd_sidekick::config::Timing;
use etcd_sidekick::discover::parse_endpoints;
use etcd_sidekick::engine::{Policy, Service, Settings};
use etcd_sidekick::hooks::Hooks;
use etcd_sidekick::probe::Probe;
use etcd_sidekick::registry::EtcdRegistry;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// `--name value` from the command line, else `env`, else `default`.
fn setting(args: &[String], name: &str, env: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| std::env::var(env).ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| default.to_string())
}

/// Waits for SIGINT (Ctrl-C) or SIGTERM.
async fn signalled() -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r,
        _ = term.recv() => Ok(()),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let endpoints = setting(&args, "--endpoints", "SIDEKICK_ENDPOINTS", "http://127.0.0.1:2379");
    let key = setting(
        &args,
        "--key",
        "EMBED_KEY",
        &format!("/services/embed/{}", std::process::id()),
    );
    let listen = setting(&args, "--listen", "EMBED_LISTEN", "127.0.0.1:0");

    // The service's own work: a tiny HTTP server.
    let listener = TcpListener::bind(&listen).await?;
    let addr = listener.local_addr()?;
    println!("serving on {addr}, announced as {key}");

    // What to keep in etcd, and how: one service, withdrawn by revoking
    // its lease, as `sidekick run` does.
    let service = Service {
        name: key.clone(),
        file: Default::default(),
        keys: vec![(key, addr.to_string())],
        shared: vec![],
        probe: None,
        timing: Timing {
            interval: Duration::from_secs(2),
            rise: 1,
            fall: 1,
            ttl: Duration::from_secs(10), // whole seconds, at least 2s
            grace: Duration::ZERO,
            drain: Duration::ZERO,
        },
    };
    let settings = Settings {
        ttl: Duration::from_secs(10),
        stop_timeout: Duration::from_secs(5), // bound on the final revoke
        policy: Policy::Revoke,
    };
    let endpoints = parse_endpoints("--endpoints", &endpoints)?;
    let registry = EtcdRegistry::new(endpoints, etcd_client::ConnectOptions::new(), Duration::from_secs(5));

    // No probe: announced while the process lives.
    let build = |_: &Service| Ok(None::<Probe>);
    let hooks = Hooks::default();

    // One token stops both the service and the announcement.
    let token = CancellationToken::new();
    let serve = async {
        loop {
            tokio::select! {
                _ = token.cancelled() => break,
                accepted = listener.accept() => {
                    if let Ok((mut conn, _)) = accepted {
                        let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n").await;
                    }
                }
            }
        }
    };
    let stop = async {
        let signalled = signalled().await;
        eprintln!("stopping: revoking the lease");
        token.cancel();
        signalled
    };
    let (_, (), stopped) = tokio::join!(
        etcd_sidekick::run::run(service, &settings, &build, registry, &hooks, token.clone()),
        serve,
        stop
    );
    stopped?;
    Ok(())
}
