//! Integration tests: the `sidekick` binary against real etcd servers
//! started on free loopback ports. One test binary keeps link time down.

mod agent;
mod bounds;
mod cli;
mod explain;
mod faults;
mod guarantees;
mod haproxy;
mod harness;
mod netns;
mod oneshot;
mod operability;
mod repo;
mod rollout;
mod run;
mod security;
mod shared;
mod trouble;
mod units;
mod wait;
