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

/// The fast timings with this file's interval and TTL.
fn timings(args: Vec<&str>) -> Vec<&str> {
    args.with("--interval", "300ms").with("--ttl", "3s")
}

/// Withdrawn at most fall × interval + timeout after the instance fails.
#[tokio::test]
async fn withdraw_after_failure_within_fall_intervals_plus_timeout() {
    let (_etcd, backend, sk, c) = registered_with(KEY, "v", "1", "3", timings).await;
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
    let (_etcd, _backend, mut sk, mut c) = registered_with(KEY, "v", "1", "1", timings).await;
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
    let (_etcd, _backend, sk, c) = registered_with(KEY, "v", "1", "1", timings).await;
    let killed = Instant::now();
    sk.signal("KILL");
    assert!(key_becomes(&c, KEY, None, TTL + SLACK).await, "expired within the TTL");
    assert!(killed.elapsed() <= TTL + SLACK);
}

/// Registered again at most interval + dial timeout after etcd answers.
#[tokio::test]
async fn registered_after_etcd_returns_within_interval_plus_dial_timeout() {
    let (mut etcd, _backend, sk, _c) = registered_with(KEY, "v", "1", "1", timings).await;
    // The scenario: etcd away for two TTLs.
    etcd.stop(0);
    tokio::time::sleep(2 * TTL).await;
    etcd.restart(0).await;
    let back = Instant::now();
    let c = etcd.client(0).await;
    let bound = INTERVAL + DIAL;
    assert!(key_becomes(&c, KEY, Some("v"), bound + SLACK).await, "{}", sk.log());
    assert!(back.elapsed() <= bound + SLACK, "back after {:?}", back.elapsed());
}
