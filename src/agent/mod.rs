//! `sidekick agent`: many services in one process, under one lease, from
//! TOML. This module reads and checks the configuration and hands the
//! services to the [`engine`](crate::engine) with the per-key withdrawal
//! policy and a reload source; the engine does the rest (see its design).

pub mod config;

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::{ConfigError, Service};

use crate::engine::{self, Policy, Reload, Settings};
use crate::hooks::Hooks;
use crate::probe::Probe;
use crate::registry::Etcd;

/// Everything `sidekick agent` needs, checked before anything is written.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The file or directory of `*.toml` that SIGHUP reads again.
    pub config: PathBuf,
    /// The process lease's TTL.
    pub ttl: Duration,
    /// The services, checked.
    pub services: Vec<Service>,
    /// Where etcd is and how to reach it.
    pub etcd: crate::config::EtcdSettings,
    /// `--status-addr` and `--maintenance-file`.
    pub ops: crate::config::Operability,
}

impl AgentConfig {
    /// The bound on each etcd call: the dial timeout, at most a third of
    /// the TTL (as `run`).
    pub fn call_bound(&self) -> Duration {
        crate::config::etcd_call_bound(self.ttl, self.etcd.dial_timeout)
    }

    /// The engine's settings: one lease for the process, services withdrawn
    /// key by key.
    pub fn settings(&self) -> Settings {
        Settings {
            ttl: self.ttl,
            stop_timeout: self.etcd.dial_timeout,
            policy: Policy::PerKey,
        }
    }
}

/// Checks `sidekick agent`'s flags and loads its configuration: any error
/// (exit 2) names the flag, or the file, service and field.
pub fn agent_config(
    args: &crate::cli::AgentArgs,
    env: &dyn crate::discover::Environment,
) -> Result<AgentConfig, crate::parse::UsageError> {
    use crate::parse::UsageError;
    let ttl = crate::config::lease_ttl(&args.ttl, Duration::from_secs(15))?;
    let etcd = crate::config::etcd_settings(&args.etcd, env)?;
    let ops = crate::config::operability(&args.ops)?;
    let path = PathBuf::from(&args.config);
    let services = config::load(&path, ttl).map_err(|e| UsageError::new(e.0))?;
    Ok(AgentConfig {
        config: path,
        ttl,
        services,
        etcd,
        ops,
    })
}

/// Builds a service's probe (validation built it once already).
pub fn build_probe(s: &Service) -> Result<Option<Probe>, String> {
    s.probe.as_ref().map(Probe::new).transpose().map_err(|e| e.to_string())
}

/// Runs the agent until `shutdown`, reloading its configuration on every
/// `reload` tick.
pub async fn run<R: Etcd>(
    cfg: &AgentConfig,
    registry: R,
    hooks: &Hooks,
    shutdown: CancellationToken,
    reload: watch::Receiver<u64>,
) {
    info!(services = cfg.services.len(), ttl = cfg.ttl.as_secs(), "agent starting");
    let (path, ttl) = (cfg.config.clone(), cfg.ttl);
    let none = |path: &std::path::Path| {
        warn!(
            config = %path.display(),
            "no [services.NAME] table: the agent runs and registers nothing (add a service and send SIGHUP)"
        )
    };
    if cfg.services.is_empty() {
        none(&path);
    }
    let reload = Reload {
        signal: reload,
        load: Box::new(move || {
            let services = config::load(&path, ttl).map_err(|e| e.0)?;
            if services.is_empty() {
                none(&path);
            }
            Ok(services)
        }),
    };
    engine::run(
        &cfg.settings(),
        cfg.services.clone(),
        &build_probe,
        registry,
        hooks,
        shutdown,
        Some(reload),
    )
    .await;
}
