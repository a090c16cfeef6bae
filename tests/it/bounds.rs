//! Bounds that hold when etcd hangs rather than refuses, and logs that stay
//! one line per cause: against real etcd members frozen with SIGSTOP.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use crate::harness::bounds::*;
use crate::harness::*;

const KEY: &str = "/services/web/1";
const VALUE: &str = "10.0.0.5:8080";

// Regression: a SIGTERM during a hung keep-alive waited for that call (up to
// the dial timeout), then for the stop revoke (the dial timeout again).
#[tokio::test]
async fn sigterm_with_etcd_frozen_exits_within_dial_timeout_plus_drain() {
    let etcd = Etcd::start().await;
    let backend = Backend::start();
    let (url, eps) = (backend.url(), etcd.endpoints());
    // TTL 9s: keep-alives every 3s, each bounded by min(3s, 9s/3) = 3s.
    let args = fast_run(KEY, VALUE, &url, &eps, "1", "2")
        .with("--interval", "300ms")
        .with("--ttl", "9s")
        .with("--dial-timeout", "3s")
        .with("--drain", "1s");
    let mut sk = Running::start(&args);
    let f = sk.figures();
    let (dial, drain) = (f.inputs.dial_timeout, f.drain());
    let c = etcd.client(0).await;
    assert!(
        key_becomes(&c, KEY, Some(VALUE), f.registration()).await,
        "{}",
        sk.log()
    );

    let frozen = Frozen::freeze(etcd.pid(0));
    // The next keep-alive hangs for its whole bound and fails; the one
    // after it goes once its backoff (one interval at most) is over, and
    // hangs in turn: from then on a call is in flight almost all the time.
    let first_failure = f.keepalives(1) + f.etcd_attempts(1);
    assert!(sk.logs("no answer within", first_failure).await, "{}", sk.log());
    advance(f.intervals(1)).await;
    let signalled = Instant::now();
    sk.signal("TERM");
    let status = sk.exit_within(f.exit()).await.expect("exits");
    let took = signalled.elapsed();
    drop(frozen);
    assert_eq!(status.code(), Some(0), "{}", sk.log());
    assert!(
        took <= within(f.exit_after_sigterm),
        "exit took {took:?}, more than dial timeout {dial:?} + drain {drain:?}: {}",
        sk.log()
    );
    assert!(
        sk.log().contains("the keys expire with the lease"),
        "says the revoke was not answered: {}",
        sk.log()
    );
}

// Regression: with `--ttl 3s` and the default 5s dial timeout, a keep-alive
// hung on a frozen member outlived the lease.
#[tokio::test]
async fn a_hung_keep_alive_with_a_short_ttl_is_retried_before_expiry() {
    let etcd = Etcd::cluster(3).await;
    let backend = Backend::start();
    let (url, eps) = (backend.url(), etcd.endpoints());
    // The default 5s dial timeout: only the TTL/3 bound saves the lease.
    let args = fast_run(KEY, VALUE, &url, &eps, "1", "2")
        .with("--interval", "500ms")
        .with("--timeout", "200ms")
        .with("--ttl", "3s")
        .with("--dial-timeout", "5s");
    let mut sk = Running::start(&args);
    let f = sk.figures();
    // The sidekick talks to the first endpoint; the test reads through the
    // second, which stays up.
    let mut c = etcd.client(1).await;
    assert!(
        key_becomes(&c, KEY, Some(VALUE), f.registration()).await,
        "{}",
        sk.log()
    );
    let lease = get(&mut c, KEY).await.unwrap().lease();

    let frozen = Frozen::freeze(etcd.pid(0));
    // Three TTLs: without a bound below the TTL the lease would be gone.
    let reads = AtomicUsize::new(0);
    let kept = throughout(f.steady(), || {
        let (mut c, reads) = (c.clone(), &reads);
        async move {
            let Ok(r) = c.get(KEY, None).await else {
                return true;
            };
            reads.fetch_add(1, Ordering::SeqCst);
            r.kvs().first().map(|kv| kv.lease()) == Some(lease)
        }
    })
    .await;
    drop(frozen);
    assert!(kept, "the key kept its lease: {}", sk.log());
    let reads = reads.load(Ordering::SeqCst);
    assert!(reads >= 10, "read the key {reads} times through the second member");
    assert!(sk.alive(), "{}", sk.log());
    assert!(
        sk.logs("no answer within 1s", SOON).await,
        "a call is bounded by TTL/3 = 1s: {}",
        sk.log()
    );
}

fn warnings<'a>(log: &'a str, what: &str) -> Vec<&'a str> {
    log.lines()
        .filter(|l| l.contains(" WARN ") && l.contains(what))
        .collect()
}

// Regression: with every endpoint refusing, each retry on each endpoint
// logged a WARN of its own, because the endpoint was part of the cause.
#[tokio::test]
async fn one_warning_per_cause_whatever_the_endpoint() {
    let eps: Vec<String> = (0..3).map(|_| format!("http://127.0.0.1:{}", free_port())).collect();
    let eps = eps.join(",");
    let backend = Backend::start();
    let url = backend.url();
    let args = fast_run(KEY, VALUE, &url, &eps, "1", "2").with("--interval", "300ms");
    let mut sk = Running::start_with_env(&args, &[("RUST_LOG", "info,etcd_sidekick=debug")]);
    // Backoff is capped at the interval: dozens of attempts in 5 s.
    let attempts = || sk_attempts(&sk);
    assert!(
        sk.logs_n("; retrying", 10, sk.figures().etcd_attempts(10)).await,
        "retried: {}",
        sk.log()
    );
    let log = sk.log();
    let warns = warnings(&log, "retrying");
    assert_eq!(
        warns.len(),
        1,
        "one WARN for one cause over {} attempts: {log}",
        attempts()
    );
    assert!(
        warns[0].contains("connection refused") || warns[0].contains("Connection refused"),
        "{log}"
    );
    assert!(sk.alive());
}

fn sk_attempts(sk: &Running) -> usize {
    sk.log_count("; retrying")
}

// Regression: a key another lease holds logged a WARN every interval.
#[tokio::test]
async fn a_key_held_elsewhere_is_warned_once_and_its_release_is_logged() {
    let (etcd, backend, mut sk, mut c) = registered(KEY, VALUE, "1", "1").await;
    let f = sk.figures();
    // Down: the lease is revoked. Another writer takes the key meanwhile.
    backend.set_healthy(false);
    assert!(key_becomes(&c, KEY, None, f.withdrawal()).await, "{}", sk.log());
    let theirs = c.lease_grant(60, None).await.unwrap().id();
    c.put(KEY, "theirs", Some(etcd_client::PutOptions::new().with_lease(theirs)))
        .await
        .unwrap();
    backend.set_healthy(true);
    // Up again: retried once an interval (200 ms) without taking the key.
    assert!(sk.logs("held elsewhere", f.reregistration()).await, "{}", sk.log());
    // Ten retries, each logged at debug level.
    assert!(
        sk.logs_n("still held elsewhere", 10, f.etcd_attempts(10)).await,
        "{}",
        sk.log()
    );
    assert_eq!(value(&mut c, KEY).await.as_deref(), Some("theirs"));
    let log = sk.log();
    assert_eq!(warnings(&log, "held elsewhere").len(), 1, "{log}");

    // The other writer goes: the key is ours again, and the log says so.
    c.lease_revoke(theirs).await.unwrap();
    assert!(
        key_becomes(&c, KEY, Some(VALUE), f.etcd_attempts(1)).await,
        "{}",
        sk.log()
    );
    assert!(sk.logs("free again", SOON).await, "{}", sk.log());
    assert!(sk.alive());
    drop(etcd);
}
