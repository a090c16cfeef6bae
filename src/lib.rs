//! etcd-sidekick keeps a service instance registered in etcd v3 while it is
//! healthy, under a lease, and withdraws it when it is not.
//!
//! The pieces, in the order data flows through them:
//!
//! - [`cli`] holds the raw command-line flags; [`config`] turns them into
//!   validated settings and owns every cross-flag rule; [`parse`] holds the
//!   small parsers of flag values and the usage error.
//! - [`discover`] finds etcd: flags, environment, the env file, the default
//!   gateway, then loopback.
//! - [`probe`] checks the instance (HTTP, TCP, a command, gRPC health);
//!   [`health`] turns probe outcomes into up/down with rise/fall
//!   hysteresis.
//! - [`registry`] is etcd as this project uses it (leases, transactions,
//!   watches) with the composite operations written once over it; a model
//!   of etcd stands in for it in unit tests.
//! - [`engine`] is the one registrar: services in, keys in etcd out, with a
//!   probe loop per service and a withdrawal policy; [`run`] is it with one
//!   service (`sidekick run`), [`agent`] with many from TOML (`sidekick
//!   agent`); [`shutdown`] turns signals into cancellation, the
//!   maintenance switch and the agent's reload.
//! - [`hooks`] carries what the engine reports besides its logs: [`status`]
//!   (the `--status-addr` server and its metrics) and [`notify`] (systemd).
//! - [`oneshot`] holds the one-shot etcd commands: announce, withdraw, list.
//! - [`wait`] blocks until keys exist, are gone, or reach a count, on an
//!   etcd watch.
//! - [`explain`] turns `run`'s timing flags into worst-case reaction times.
//! - [`exit`] is the one place exit codes are defined.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod agent;
pub mod cli;
pub mod config;
pub mod discover;
pub mod engine;
pub mod exit;
pub mod explain;
pub mod health;
pub mod hooks;
pub mod notify;
pub mod oneshot;
pub mod parse;
#[cfg(test)]
mod parse_props;
pub mod probe;
pub mod registry;
pub mod render;
pub mod run;
pub mod shutdown;
pub mod status;
pub mod wait;
