//! The guarantees of docs/guarantees.md, each measured against a real etcd
//! with the bound that `sidekick explain` computes from the flags (its
//! arithmetic is checked against that page's table by a unit test), through the
//! harness's [`Figures`]. The harness's `LATE` covers a busy machine; a
//! broken guarantee misses by a TTL or more.

use std::time::Instant;

use crate::harness::bounds::*;
use crate::harness::*;

const KEY: &str = "/services/web/1";

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

async fn registered(etcd: &Etcd, rise: &str, fall: &str) -> (Backend, Running, etcd_client::Client) {
    let backend = Backend::start();
    let (url, eps) = (backend.url(), etcd.endpoints());
    let sk = Running::start(&args(&eps, &url, rise, fall));
    let c = etcd.client(0).await;
    assert!(
        key_becomes(&c, KEY, Some("v"), sk.figures().registration()).await,
        "{}",
        sk.log()
    );
    (backend, sk, c)
}

/// Withdrawn at most fall × interval + timeout after the instance fails.
#[tokio::test]
async fn withdraw_after_failure_within_fall_intervals_plus_timeout() {
    let etcd = Etcd::start().await;
    let (backend, sk, c) = registered(&etcd, "1", "3").await;
    let f = sk.figures();
    let failed = Instant::now();
    backend.set_healthy(false);
    let bound = f.withdraw_after_failure.unwrap();
    assert!(key_becomes(&c, KEY, None, f.withdrawal()).await, "{}", sk.log());
    let took = failed.elapsed();
    assert!(took <= within(bound), "withdrawn after {took:?}, bound {bound:?}");
    // And not before fall failures: two failing probes take at least one interval.
    let gap = f.probe_every_least.unwrap();
    assert!(took >= gap, "withdrawn after only {took:?}");
}

/// Withdrawn on SIGTERM before the process exits, within the dial timeout.
#[tokio::test]
async fn withdraw_after_sigterm_within_the_dial_timeout() {
    let etcd = Etcd::start().await;
    let (_backend, mut sk, mut c) = registered(&etcd, "1", "1").await;
    let f = sk.figures();
    let signalled = Instant::now();
    sk.signal("TERM");
    sk.exit_within(f.exit()).await.expect("exits within the dial timeout");
    assert!(get(&mut c, KEY).await.is_none(), "gone when the process is");
    let took = signalled.elapsed();
    let bound = f.withdraw_after_sigterm;
    assert!(took <= within(bound), "exited after {took:?}, bound {bound:?}");
}

/// Gone at most one TTL after SIGKILL (no leader change here).
#[tokio::test]
async fn gone_after_sigkill_within_the_ttl() {
    let etcd = Etcd::start().await;
    let (_backend, sk, c) = registered(&etcd, "1", "1").await;
    let f = sk.figures();
    let bound = f.stale_after_sigkill;
    let killed = Instant::now();
    sk.signal("KILL");
    assert!(key_becomes(&c, KEY, None, f.expiry()).await, "expired within the TTL");
    let took = killed.elapsed();
    assert!(took <= within(bound), "expired after {took:?}, bound {bound:?}");
}

/// Registered again at most interval + min(dial timeout, TTL/3) after etcd answers.
#[tokio::test]
async fn registered_after_etcd_returns_within_interval_plus_dial_timeout() {
    let mut etcd = Etcd::start().await;
    let (_backend, sk, _c) = registered(&etcd, "1", "1").await;
    let f = sk.figures();
    // Away for two TTLs and more: the lease is gone for sure, a new one is
    // needed.
    etcd.stop(0);
    advance(f.long_outage()).await;
    etcd.restart(0).await;
    let back = Instant::now();
    let c = etcd.client(0).await;
    let bound = f.register_after_etcd_back;
    assert!(key_becomes(&c, KEY, Some("v"), f.etcd_back()).await, "{}", sk.log());
    let took = back.elapsed();
    assert!(took <= within(bound), "back after {took:?}, bound {bound:?}");
}

/// Registered at most (rise − 1) × interval + timeout after start: the first
/// probe goes at once; and not before rise probes have passed.
#[tokio::test]
async fn registered_after_start_within_rise_minus_one_intervals_plus_timeout() {
    let etcd = Etcd::start().await;
    let c = etcd.client(0).await;
    let backend = Backend::start();
    let (url, eps) = (backend.url(), etcd.endpoints());
    let started = Instant::now();
    let sk = Running::start(&args(&eps, &url, "3", "1"));
    let f = sk.figures();
    let bound = f.register_after_start;
    assert!(key_becomes(&c, KEY, Some("v"), f.registration()).await, "{}", sk.log());
    let took = started.elapsed();
    assert!(took <= within(bound), "registered after {took:?}, bound {bound:?}");
    let gap = f.probe_every_least.unwrap();
    assert!(took >= 2 * gap, "registered after only {took:?}");
}

/// Registered again at most rise × interval + timeout after the instance
/// recovers; and not before rise probes have passed.
#[tokio::test]
async fn registered_after_recovery_within_rise_intervals_plus_timeout() {
    let etcd = Etcd::start().await;
    let (backend, sk, c) = registered(&etcd, "3", "1").await;
    let f = sk.figures();
    backend.set_healthy(false);
    assert!(key_becomes(&c, KEY, None, f.withdrawal()).await, "{}", sk.log());
    let recovered = Instant::now();
    backend.set_healthy(true);
    let bound = f.register_after_recovery.unwrap();
    assert!(
        key_becomes(&c, KEY, Some("v"), f.reregistration()).await,
        "{}",
        sk.log()
    );
    let took = recovered.elapsed();
    assert!(took <= within(bound), "registered after {took:?}, bound {bound:?}");
    let gap = f.probe_every_least.unwrap();
    assert!(took >= 2 * gap, "registered after only {took:?}");
}
