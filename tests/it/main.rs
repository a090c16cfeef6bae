//! Integration tests: the `sidekick` binary against real etcd servers
//! started on free loopback ports. One test binary keeps link time down.

mod cli;
mod faults;
mod guarantees;
mod haproxy;
mod harness;
mod netns;
mod oneshot;
mod probe_http;
mod repo;
mod run;
mod security;
mod trouble;
mod units;
