//! Integration tests: the `sidekick` binary against real etcd servers
//! started on free loopback ports. One test binary keeps link time down.

mod agent;
mod bounds;
mod cli;
mod exec_probe;
mod explain;
mod faults;
mod grpc_probe;
mod guarantees;
mod haproxy;
mod harness;
mod model;
mod netns;
mod nginx;
mod oneshot;
mod operability;
mod probe_http;
mod proxies;
mod recipes;
mod render;
mod render_examples;
mod repo;
mod rollout;
mod run;
mod security;
mod shared;
mod traefik;
mod trouble;
mod units;
mod wait;
