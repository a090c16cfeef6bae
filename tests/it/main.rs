//! Integration tests: the `sidekick` binary against real etcd servers
//! started on free loopback ports. One test binary keeps link time down.

mod bounds;
mod cli;
mod faults;
mod guarantees;
mod haproxy;
mod harness;
mod netns;
mod oneshot;
mod repo;
mod rollout;
mod run;
mod security;
mod trouble;
mod units;
mod wait;
