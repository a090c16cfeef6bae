//! etcd trouble: absent at start, restarted, wiped, a cluster member gone.
//! The sidekick never exits, never flaps the key, and registers again.

use std::time::Duration;

use crate::harness::*;

const KEY: &str = "/services/web/1";
const SEC: Duration = Duration::from_secs(1);

fn fast_args<'a>(etcd: &'a str, url: &'a str) -> Vec<&'a str> {
    fast_run(KEY, "10.0.0.5:8080", url, etcd, "1", "1")
}

#[tokio::test]
async fn etcd_absent_at_start_then_appears() {
    // Start the sidekick first, against an etcd that is not running yet.
    let mut etcd = Etcd::start().await;
    etcd.stop(0);
    let backend = Backend::start();
    let (url, eps) = (backend.url(), etcd.endpoints());
    let mut sk = Running::start(&fast_args(&eps, &url));
    let hits = backend.hits();
    tokio::time::sleep(3 * SEC).await;
    assert!(sk.alive(), "must not exit while etcd is away: {}", sk.log());
    assert!(backend.hits() >= hits + 10, "kept probing while etcd was away");
    let log = sk.log();
    assert!(
        log.contains("could not grant a lease at http://127.0.0.1"),
        "names the cause: {log}"
    );
    let complaints = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("could not grant"))
        .count();
    assert!(
        complaints <= 2,
        "one line per cause, not one per retry: {complaints}\n{log}"
    );

    etcd.restart(0).await;
    let c = etcd.client(0).await;
    assert!(
        key_becomes(&c, KEY, Some("10.0.0.5:8080"), 5 * SEC).await,
        "{}",
        sk.log()
    );
    assert!(sk.log().contains("etcd answers again"), "{}", sk.log());
}

#[tokio::test]
async fn etcd_restart_keeps_the_same_key_without_a_rewrite() {
    let (mut etcd, _backend, mut sk, mut c) = registered(KEY, "10.0.0.5:8080", "1", "1").await;
    let before = get(&mut c, KEY).await.unwrap();

    // A quick restart: the lease survives in etcd's data, so the key must
    // not flap (no delete, no re-put).
    etcd.restart(0).await;
    let mut c = etcd.client(0).await;
    tokio::time::sleep(3 * SEC).await;
    let after = get(&mut c, KEY).await.expect("key still there after the restart");
    assert_eq!(after.mod_revision(), before.mod_revision(), "not rewritten");
    assert_eq!(
        after.lease(),
        before.lease(),
        "same lease, kept alive across the restart"
    );
    assert!(sk.alive());
    let ttl = c.lease_time_to_live(after.lease(), None).await.unwrap().ttl();
    assert!(ttl > 0, "lease is being kept alive: ttl {ttl}");
}

#[tokio::test]
async fn etcd_restarted_many_times_never_stops_the_sidekick() {
    let (mut etcd, _backend, mut sk, _c) = registered(KEY, "10.0.0.5:8080", "1", "1").await;
    for _ in 0..3 {
        etcd.stop(0);
        // Down longer than the TTL: the lease is gone when etcd returns
        // only if etcd let it expire; either way the key must come back.
        tokio::time::sleep(3 * SEC).await;
        assert!(sk.alive(), "{}", sk.log());
        etcd.restart(0).await;
        let c = etcd.client(0).await;
        assert!(
            key_becomes(&c, KEY, Some("10.0.0.5:8080"), 5 * SEC).await,
            "{}",
            sk.log()
        );
    }
}

#[tokio::test]
async fn wiped_data_dir_gets_a_new_lease_and_the_keys_again() {
    let (mut etcd, _backend, sk, mut c) = registered(KEY, "10.0.0.5:8080", "1", "1").await;
    let old = get(&mut c, KEY).await.unwrap().lease();

    etcd.wipe_and_start().await;
    let mut c = etcd.client(0).await;
    assert!(
        key_becomes(&c, KEY, Some("10.0.0.5:8080"), 5 * SEC).await,
        "{}",
        sk.log()
    );
    let new = get(&mut c, KEY).await.unwrap().lease();
    assert_ne!(new, old, "a new lease was granted");
    assert!(sk.log().contains("lease expired or was lost"), "{}", sk.log());
}

#[tokio::test]
async fn unhealthy_while_etcd_is_down_is_withdrawn_when_it_returns() {
    let mut etcd = Etcd::start().await;
    let backend = Backend::start();
    let (url, eps) = (backend.url(), etcd.endpoints());
    // A long TTL, so expiry cannot be what removes the key.
    let args = [
        "run",
        KEY,
        "v",
        "--http",
        &url,
        "--interval",
        "200ms",
        "--timeout",
        "100ms",
        "--ttl",
        "30s",
        "--rise",
        "1",
        "--fall",
        "1",
        "--dial-timeout",
        "1s",
        "--endpoints",
        &eps,
    ];
    let sk = Running::start(&args);
    let c = etcd.client(0).await;
    assert!(key_becomes(&c, KEY, Some("v"), 10 * SEC).await, "{}", sk.log());
    etcd.stop(0);
    backend.set_healthy(false);
    tokio::time::sleep(SEC).await;
    etcd.restart(0).await;
    let c = etcd.client(0).await;
    assert!(
        key_becomes(&c, KEY, None, 5 * SEC).await,
        "revoked once etcd answered: {}",
        sk.log()
    );
}

#[tokio::test]
async fn first_endpoint_of_a_cluster_killed() {
    let mut etcd = Etcd::cluster(3).await;
    let backend = Backend::start();
    let (url, eps) = (backend.url(), etcd.endpoints());
    let mut sk = Running::start(&fast_args(&eps, &url));
    let c = etcd.client(1).await;
    assert!(
        key_becomes(&c, KEY, Some("10.0.0.5:8080"), 15 * SEC).await,
        "{}",
        sk.log()
    );
    let mut c1 = etcd.client(1).await;
    let before = get(&mut c1, KEY).await.unwrap();

    etcd.kill(0);
    // Several TTLs later the same lease is still alive, kept through the
    // other members.
    tokio::time::sleep(5 * SEC).await;
    let after = get(&mut c1, KEY).await.expect("key kept while a member is gone");
    assert_eq!(after.lease(), before.lease(), "{}", sk.log());
    assert_eq!(after.mod_revision(), before.mod_revision(), "not rewritten");
    assert!(c1.lease_time_to_live(after.lease(), None).await.unwrap().ttl() > 0);
    assert!(sk.alive());

    // Withdrawal still works through the remaining members.
    backend.set_healthy(false);
    assert!(key_becomes(&c1, KEY, None, 5 * SEC).await, "{}", sk.log());
}
