//! etcd trouble: absent at start, wiped, away while the instance fails. The
//! sidekick never exits and registers again. Restarts and killed cluster
//! members are in `faults.rs`, with the log checks of fault injection.

use crate::harness::bounds::*;
use crate::harness::*;

const KEY: &str = "/services/web/1";
const ADDR: &str = "10.0.0.5:8080";

#[tokio::test]
async fn etcd_absent_at_start_then_appears() {
    // Start the sidekick first, against an etcd that is not running yet.
    let mut etcd = Etcd::start().await;
    etcd.stop(0);
    let backend = Backend::start();
    let (url, eps) = (backend.url(), etcd.endpoints());
    let mut sk = Running::start(&fast_run(KEY, ADDR, &url, &eps, "1", "1"));
    let f = sk.figures();
    let hits = backend.hits();
    // Several grants fail (each logged, at warn or debug level, with
    // "; retrying"), and probing goes on meanwhile.
    let retried = || async { sk.log().matches("could not grant a lease").count() >= 4 };
    assert!(eventually(f.etcd_attempts(4), retried).await, "{}", sk.log());
    assert!(
        eventually(f.probes(10), || async { backend.hits() >= hits + 10 }).await,
        "kept probing while etcd was away"
    );
    assert!(sk.alive(), "must not exit while etcd is away: {}", sk.log());
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
    assert!(key_becomes(&c, KEY, Some(ADDR), f.etcd_back()).await, "{}", sk.log());
    assert!(sk.logs("etcd answers again", SOON).await, "{}", sk.log());
}

#[tokio::test]
async fn wiped_data_dir_gets_a_new_lease_and_the_keys_again() {
    let (mut etcd, _backend, sk, mut c) = registered(KEY, ADDR, "1", "1").await;
    let f = sk.figures();
    let old = get(&mut c, KEY).await.unwrap().lease();

    etcd.wipe_and_start().await;
    let mut c = etcd.client(0).await;
    // The next keep-alive finds the lease gone: a new grant and put.
    let back = f.keepalives(1) + f.etcd_back();
    assert!(key_becomes(&c, KEY, Some(ADDR), back).await, "{}", sk.log());
    let new = get(&mut c, KEY).await.unwrap().lease();
    assert_ne!(new, old, "a new lease was granted");
    assert!(sk.log().contains("lease expired or was lost"), "{}", sk.log());
}

#[tokio::test]
async fn unhealthy_while_etcd_is_down_is_withdrawn_when_it_returns() {
    // A long TTL, so expiry cannot be what removes the key.
    let (mut etcd, backend, sk, _c) = registered_with(KEY, ADDR, "1", "1", |a| a.with("--ttl", "30s")).await;
    let f = sk.figures();
    etcd.stop(0);
    backend.set_healthy(false);
    assert!(sk.logs("instance is down", f.withdrawal()).await, "{}", sk.log());
    etcd.restart(0).await;
    let c = etcd.client(0).await;
    assert!(
        key_becomes(&c, KEY, None, f.etcd_back()).await,
        "revoked once etcd answered: {}",
        sk.log()
    );
}
