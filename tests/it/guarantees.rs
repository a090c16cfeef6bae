//! The README's guarantees, each measured against a real etcd with the
//! bound computed from the flags. The slack (1 s) covers a busy machine; a
//! broken guarantee misses by whole intervals or TTLs.

use std::time::{Duration, Instant};

use crate::harness::*;

const KEY: &str = "/services/web/1";
const SLACK: Duration = Duration::from_secs(1);
const INTERVAL: Duration = Duration::from_millis(300);
const TIMEOUT: Duration = Duration::from_millis(100);
const TTL: Duration = Duration::from_secs(3);
const DIAL: Duration = Duration::from_secs(1);

fn args<'a>(eps: &'a str, url: &'a str, fall: &'a str) -> Vec<&'a str> {
    vec![
        "run",
        KEY,
        "v",
        "--http",
        url,
        "--interval",
        "300ms",
        "--timeout",
        "100ms",
        "--ttl",
        "3s",
        "--rise",
        "1",
        "--fall",
        fall,
        "--dial-timeout",
        "1s",
        "--endpoints",
        eps,
    ]
}

async fn registered(etcd: &Etcd, fall: &str) -> (Backend, Running, etcd_client::Client) {
    let backend = Backend::start();
    let (url, eps) = (backend.url(), etcd.endpoints());
    let sk = Running::start(&args(&eps, &url, fall));
    let c = etcd.client(0).await;
    assert!(key_becomes(&c, KEY, Some("v"), 10 * SLACK).await, "{}", sk.log());
    (backend, sk, c)
}

/// Withdrawn at most fall × interval + timeout after the instance fails.
#[tokio::test]
async fn withdraw_after_failure_within_fall_intervals_plus_timeout() {
    let etcd = Etcd::start().await;
    let (backend, sk, c) = registered(&etcd, "3").await;
    let failed = Instant::now();
    backend.set_healthy(false);
    let bound = 3 * INTERVAL + TIMEOUT;
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
    let (_backend, mut sk, mut c) = registered(&etcd, "1").await;
    let signalled = Instant::now();
    sk.signal("TERM");
    sk.exit_within(DIAL + SLACK)
        .await
        .expect("exits within the dial timeout");
    assert!(get(&mut c, KEY).await.is_none(), "gone when the process is");
    assert!(signalled.elapsed() <= DIAL + SLACK);
}

/// Gone at most one TTL after SIGKILL (no leader change here).
#[tokio::test]
async fn gone_after_sigkill_within_the_ttl() {
    let etcd = Etcd::start().await;
    let (_backend, sk, c) = registered(&etcd, "1").await;
    let killed = Instant::now();
    sk.signal("KILL");
    assert!(key_becomes(&c, KEY, None, TTL + SLACK).await, "expired within the TTL");
    assert!(killed.elapsed() <= TTL + SLACK);
}

/// Registered again at most interval + dial timeout after etcd answers.
#[tokio::test]
async fn registered_after_etcd_returns_within_interval_plus_dial_timeout() {
    let mut etcd = Etcd::start().await;
    let (_backend, sk, _c) = registered(&etcd, "1").await;
    // Away for two TTLs: the lease is gone for sure, a new one is needed.
    etcd.stop(0);
    tokio::time::sleep(2 * TTL).await;
    etcd.restart(0).await;
    let back = Instant::now();
    let c = etcd.client(0).await;
    let bound = INTERVAL + DIAL;
    assert!(key_becomes(&c, KEY, Some("v"), bound + SLACK).await, "{}", sk.log());
    assert!(back.elapsed() <= bound + SLACK, "back after {:?}", back.elapsed());
}
