//! `sidekick run`: the [`engine`](crate::engine) with one service, which a
//! failure withdraws by revoking its lease, then the drain.

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::RunConfig;
use crate::engine::{self, Build, Check, Policy, Service, Settings};
use crate::hooks::Hooks;
use crate::registry::Etcd;

/// The one service of a `run`: named after its KEY.
pub fn service(cfg: &RunConfig) -> Service {
    Service {
        name: cfg.keys[0].0.clone(),
        file: Default::default(),
        keys: cfg.keys.clone(),
        shared: cfg.shared.clone(),
        probe: cfg.probe.clone(),
        timing: cfg.timing.clone(),
    }
}

/// The engine's settings for a `run`: its own lease, revoked on failure.
pub fn settings(cfg: &RunConfig) -> Settings {
    Settings {
        ttl: cfg.timing.ttl,
        stop_timeout: cfg.etcd.dial_timeout,
        policy: Policy::Revoke,
    }
}

/// Runs `service` until `shutdown`, then withdraws and drains: stop probing
/// → revoke the lease (bounded by the dial timeout) → wait `--drain` →
/// return.
pub async fn run<R: Etcd, P: Check>(
    service: Service,
    settings: &Settings,
    build: Build<'_, P>,
    registry: R,
    hooks: &Hooks,
    shutdown: CancellationToken,
) {
    let drain = service.timing.drain;
    let was_registered = engine::run(settings, vec![service], build, registry, hooks, shutdown, None).await;
    // The lease is revoked (or left to expire if etcd did not answer in
    // time); now give the load balancer time to notice before the
    // instance goes away.
    if was_registered && !drain.is_zero() {
        info!(drain = %humantime::format_duration(drain), "keys withdrawn; draining before exit");
        tokio::time::sleep(drain).await;
    }
}
