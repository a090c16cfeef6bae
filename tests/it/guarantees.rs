//! The README's guarantees, each measured against a real etcd with the
//! bound that `sidekick explain` computes from the flags (its arithmetic is
//! checked against the README's table by a unit test). The slack (1 s)
//! covers a busy machine; a broken guarantee misses by whole intervals or
//! TTLs.

use std::time::{Duration, Instant};

use clap::Parser;
use etcd_sidekick::cli::{Cli, Command};
use etcd_sidekick::explain::{self, Explanation};

use crate::harness::*;

const KEY: &str = "/services/web/1";
const SLACK: Duration = Duration::from_secs(1);
const INTERVAL: Duration = Duration::from_millis(300);

/// The probe and timing flags of every test here; rise and fall vary.
fn timing<'a>(rise: &'a str, fall: &'a str) -> Vec<&'a str> {
    vec![
        "--interval",
        "300ms",
        "--timeout",
        "100ms",
        "--ttl",
        "3s",
        "--rise",
        rise,
        "--fall",
        fall,
        "--dial-timeout",
        "1s",
    ]
}

fn args<'a>(eps: &'a str, url: &'a str, rise: &'a str, fall: &'a str) -> Vec<&'a str> {
    [
        &["run", KEY, "v", "--http", url][..],
        &timing(rise, fall),
        &["--endpoints", eps],
    ]
    .concat()
}

/// What `sidekick explain` says for the same flags.
fn bounds(rise: &str, fall: &str) -> Explanation {
    let argv = [
        &["sidekick", "explain", "--http", "http://127.0.0.1:1/"][..],
        &timing(rise, fall),
    ]
    .concat();
    let Command::Explain(a) = Cli::try_parse_from(argv).unwrap().command else {
        unreachable!("explain parses as explain")
    };
    Explanation::new(explain::inputs(&a).unwrap())
}

async fn registered(etcd: &Etcd, rise: &str, fall: &str) -> (Backend, Running, etcd_client::Client) {
    let backend = Backend::start();
    let (url, eps) = (backend.url(), etcd.endpoints());
    let sk = Running::start(&args(&eps, &url, rise, fall));
    let c = etcd.client(0).await;
    assert!(key_becomes(&c, KEY, Some("v"), 10 * SLACK).await, "{}", sk.log());
    (backend, sk, c)
}

/// Withdrawn at most fall × interval + timeout after the instance fails.
#[tokio::test]
async fn withdraw_after_failure_within_fall_intervals_plus_timeout() {
    let etcd = Etcd::start().await;
    let (backend, sk, c) = registered(&etcd, "1", "3").await;
    let failed = Instant::now();
    backend.set_healthy(false);
    let bound = bounds("1", "3").withdraw_after_failure.unwrap();
    assert!(key_becomes(&c, KEY, None, bound + SLACK).await, "{}", sk.log());
    let took = failed.elapsed();
    assert!(took <= bound + SLACK, "withdrawn after {took:?}, bound {bound:?}");
    // And not before fall failures: two failing probes take at least one interval.
    assert!(took >= INTERVAL.mul_f64(0.9), "withdrawn after only {took:?}");
}

/// Withdrawn on SIGTERM before the process exits, within the dial timeout.
#[tokio::test]
async fn withdraw_after_sigterm_within_the_dial_timeout() {
    let etcd = Etcd::start().await;
    let (_backend, mut sk, mut c) = registered(&etcd, "1", "1").await;
    let b = bounds("1", "1");
    let signalled = Instant::now();
    sk.signal("TERM");
    sk.exit_within(b.exit_after_sigterm + SLACK)
        .await
        .expect("exits within the dial timeout");
    assert!(get(&mut c, KEY).await.is_none(), "gone when the process is");
    assert!(signalled.elapsed() <= b.withdraw_after_sigterm + SLACK);
}

/// Gone at most one TTL after SIGKILL (no leader change here).
#[tokio::test]
async fn gone_after_sigkill_within_the_ttl() {
    let etcd = Etcd::start().await;
    let (_backend, sk, c) = registered(&etcd, "1", "1").await;
    let bound = bounds("1", "1").stale_after_sigkill;
    let killed = Instant::now();
    sk.signal("KILL");
    assert!(
        key_becomes(&c, KEY, None, bound + SLACK).await,
        "expired within the TTL"
    );
    assert!(killed.elapsed() <= bound + SLACK);
}

/// Registered again at most interval + min(dial timeout, TTL/3) after etcd answers.
#[tokio::test]
async fn registered_after_etcd_returns_within_interval_plus_dial_timeout() {
    let mut etcd = Etcd::start().await;
    let (_backend, sk, _c) = registered(&etcd, "1", "1").await;
    let b = bounds("1", "1");
    // Away for two TTLs: the lease is gone for sure, a new one is needed.
    etcd.stop(0);
    tokio::time::sleep(2 * b.stale_after_sigkill).await;
    etcd.restart(0).await;
    let back = Instant::now();
    let c = etcd.client(0).await;
    let bound = b.register_after_etcd_back;
    assert!(key_becomes(&c, KEY, Some("v"), bound + SLACK).await, "{}", sk.log());
    assert!(back.elapsed() <= bound + SLACK, "back after {:?}", back.elapsed());
}

/// Registered at most (rise − 1) × interval + timeout after start: the first
/// probe goes at once; and not before rise probes have passed.
#[tokio::test]
async fn registered_after_start_within_rise_minus_one_intervals_plus_timeout() {
    let etcd = Etcd::start().await;
    let c = etcd.client(0).await;
    let backend = Backend::start();
    let (url, eps) = (backend.url(), etcd.endpoints());
    let bound = bounds("3", "1").register_after_start;
    let started = Instant::now();
    let sk = Running::start(&args(&eps, &url, "3", "1"));
    assert!(key_becomes(&c, KEY, Some("v"), bound + SLACK).await, "{}", sk.log());
    let took = started.elapsed();
    assert!(took <= bound + SLACK, "registered after {took:?}, bound {bound:?}");
    assert!(took >= 2 * INTERVAL.mul_f64(0.9), "registered after only {took:?}");
}

/// Registered again at most rise × interval + timeout after the instance
/// recovers; and not before rise probes have passed.
#[tokio::test]
async fn registered_after_recovery_within_rise_intervals_plus_timeout() {
    let etcd = Etcd::start().await;
    let (backend, sk, c) = registered(&etcd, "3", "1").await;
    backend.set_healthy(false);
    assert!(key_becomes(&c, KEY, None, 10 * SLACK).await, "{}", sk.log());
    let recovered = Instant::now();
    backend.set_healthy(true);
    let bound = bounds("3", "1").register_after_recovery.unwrap();
    assert!(key_becomes(&c, KEY, Some("v"), bound + SLACK).await, "{}", sk.log());
    let took = recovered.elapsed();
    assert!(took <= bound + SLACK, "registered after {took:?}, bound {bound:?}");
    assert!(took >= 2 * INTERVAL.mul_f64(0.9), "registered after only {took:?}");
}
