//! `sidekick run` against a real etcd: registration, health, signals, leases,
//! ownership.

use std::time::Instant;

use crate::harness::bounds::*;
use crate::harness::*;

const KEY: &str = "/services/web/1";
const ADDR: &str = "10.0.0.5:8080";

#[tokio::test]
async fn registers_under_a_lease_with_every_extra_key() {
    let extras = [
        "--extra",
        "/services/web/scheme=http",
        "--extra",
        "/services/web/hosts/1=10.0.0.5:8080",
    ];
    let (_etcd, _backend, sk, mut c) = registered_with(KEY, ADDR, "2", "2", |a| a.and(&extras)).await;

    let main = get(&mut c, KEY).await.unwrap();
    assert_ne!(main.lease(), 0, "the key is attached to a lease");
    for k in ["/services/web/scheme", "/services/web/hosts/1"] {
        let kv = get(&mut c, k).await.unwrap_or_else(|| panic!("{k} missing"));
        assert_eq!(kv.lease(), main.lease(), "{k} shares the lease");
        assert_eq!(
            kv.mod_revision(),
            main.mod_revision(),
            "all keys are written in one revision"
        );
    }
    assert_eq!(value(&mut c, "/services/web/scheme").await.as_deref(), Some("http"));
    let ttl = c.lease_time_to_live(main.lease(), None).await.unwrap();
    assert_eq!(ttl.granted_ttl(), 2);
    assert!(sk.logs("INFO registered", SOON).await, "{}", sk.log());
}

#[tokio::test]
async fn unhealthy_removes_the_keys_and_recovery_brings_them_back() {
    let extra = ["--extra", "/services/web/scheme=http"];
    let (_etcd, backend, sk, c) = registered_with(KEY, ADDR, "2", "2", |a| a.and(&extra)).await;
    let f = sk.figures();

    backend.set_healthy(false);
    assert!(key_becomes(&c, KEY, None, f.withdrawal()).await, "{}", sk.log());
    assert!(
        key_becomes(&c, "/services/web/scheme", None, SOON).await,
        "extra keys go too"
    );
    backend.set_healthy(true);
    assert!(
        key_becomes(&c, KEY, Some(ADDR), f.reregistration()).await,
        "{}",
        sk.log()
    );
    assert!(key_becomes(&c, "/services/web/scheme", Some("http"), SOON).await);
    // The key can be seen in etcd a moment before the line is logged.
    assert!(sk.logs_n("INFO registered", 2, SOON).await, "{}", sk.log());
    assert_eq!(sk.log_count("INFO registered"), 2, "{}", sk.log());
    let log = sk.log();
    let (down, withdrawn, up_again) = (
        log.find("instance is down").expect("down logged"),
        log.find("withdrawn: lease revoked").expect("withdrawal logged"),
        log.rfind("registered").unwrap(),
    );
    assert!(down < withdrawn && withdrawn < up_again, "{log}");
}

#[tokio::test]
async fn fall_3_rides_out_one_failure() {
    let (_etcd, backend, sk, mut c) = registered(KEY, ADDR, "1", "3").await;
    let f = sk.figures();
    let before = get(&mut c, KEY).await.unwrap();

    // Two failing probes in a row, less than --fall 3.
    let hits = backend.hits();
    backend.fail_next(2);
    assert!(eventually(f.probes(4), || async { backend.hits() >= hits + 4 }).await);
    let after = get(&mut c, KEY).await.expect("key kept through two failures");
    assert_eq!(
        after.create_revision(),
        before.create_revision(),
        "never withdrawn and re-put"
    );
    assert!(
        sk.log().contains("probe failed (2 of 3 before withdrawal)"),
        "{}",
        sk.log()
    );

    // A third failure in a row does withdraw.
    backend.set_healthy(false);
    assert!(key_becomes(&c, KEY, None, f.withdrawal()).await, "{}", sk.log());
}

async fn stops_on(sig: &str) {
    let (_etcd, _backend, mut sk, mut c) = registered(KEY, ADDR, "1", "1").await;

    sk.signal(sig);
    let status = sk
        .exit_within(sk.figures().exit())
        .await
        .expect("exits after the signal");
    assert_eq!(status.code(), Some(0), "{}", sk.log());
    // Revoked, not expired: gone at once, well inside the 2s TTL.
    assert!(get(&mut c, KEY).await.is_none(), "{}", sk.log());
    assert!(sk.log().contains("withdrawn: lease revoked on stop"), "{}", sk.log());
}

#[tokio::test]
async fn sigterm_removes_the_keys_and_exits_0() {
    stops_on("TERM").await;
}

#[tokio::test]
async fn sigint_removes_the_keys_and_exits_0() {
    stops_on("INT").await;
}

#[tokio::test]
async fn drain_waits_after_withdrawing() {
    let (_etcd, _backend, mut sk, c) = registered_with(KEY, ADDR, "1", "1", |a| a.with("--drain", "2s")).await;
    let f = sk.figures();

    let signalled = Instant::now();
    sk.signal("TERM");
    assert!(
        key_becomes(&c, KEY, None, f.stop_withdrawal()).await,
        "keys go before the drain wait"
    );
    assert!(sk.alive(), "still draining once the key is gone");
    let status = sk.exit_within(f.exit()).await.expect("exits after the drain");
    assert_eq!(status.code(), Some(0));
    assert!(
        signalled.elapsed() >= at_least(f.drain()),
        "drained {:?}",
        signalled.elapsed()
    );
}

#[tokio::test]
async fn second_signal_exits_at_once_during_drain() {
    let etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let (mut sk, c) = start_registered(&etcd, &plain_run(KEY, "v", &eps).with("--drain", "60s")).await;
    let f = sk.figures();
    sk.signal("TERM");
    assert!(key_becomes(&c, KEY, None, f.stop_withdrawal()).await);
    sk.signal("TERM");
    // Well inside the drain: the drain is what the second signal ends.
    let status = sk.exit_within(SOON).await.expect("second signal ends the 60s drain");
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn sigkill_leaves_the_key_to_expire_with_the_lease() {
    let (_etcd, _backend, sk, mut c) = registered(KEY, ADDR, "1", "1").await;
    let f = sk.figures();

    sk.signal("KILL");
    let killed = Instant::now();
    assert!(
        get(&mut c, KEY).await.is_some(),
        "nobody revoked: the key outlives the process"
    );
    assert!(key_becomes(&c, KEY, None, f.expiry()).await, "gone with the lease");
    // A lease refreshed every third of its TTL has at least half of it
    // left when killed.
    assert!(
        killed.elapsed() >= at_least(f.ttl() / 2),
        "expired after {:?}",
        killed.elapsed()
    );
}

#[tokio::test]
async fn steady_state_writes_no_revisions() {
    let (_etcd, backend, sk, mut c) = registered(KEY, ADDR, "1", "1").await;
    let f = sk.figures();

    let before = revision(&mut c).await;
    let lease = get(&mut c, KEY).await.unwrap().lease();
    let hits = backend.hits();
    // The scenario: three TTLs (about nine keep-alives and thirty probes) in
    // which nothing may be written...
    let_pass(f.steady()).await;
    // ... and at least twenty of those probes (a slow machine may need a
    // little longer for them).
    let probed = eventually(f.probes(20), || async { backend.hits() >= hits + 20 }).await;
    assert_eq!(
        revision(&mut c).await,
        before,
        "heartbeats must not write: {}",
        sk.log()
    );
    assert_eq!(get(&mut c, KEY).await.unwrap().lease(), lease, "same lease throughout");
    assert!(probed, "kept probing: {} probes", backend.hits() - hits);
}

#[tokio::test]
async fn no_probe_announces_unconditionally_and_says_so_first() {
    let etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let (sk, _c) = start_registered(&etcd, &plain_run(KEY, "v", &eps)).await;
    let log = sk.log();
    let first = log.lines().next().unwrap();
    assert!(first.contains("no probe given: announcing unconditionally"), "{first}");
    assert!(
        first.contains(&eps) && first.contains("--endpoints"),
        "endpoints and rule: {first}"
    );
}

#[tokio::test]
async fn another_writers_key_survives_our_withdrawal() {
    let (_etcd, backend, sk, mut c) = registered(KEY, ADDR, "1", "1").await;
    let f = sk.figures();

    // A new instance takes the key over under its own lease.
    let theirs = c.lease_grant(30, None).await.unwrap().id();
    let opts = etcd_client::PutOptions::new().with_lease(theirs);
    c.put(KEY, "10.0.0.9:8080", Some(opts)).await.unwrap();

    backend.set_healthy(false);
    assert!(
        sk.logs("withdrawn: lease revoked", f.withdrawal()).await,
        "{}",
        sk.log()
    );
    assert_eq!(
        value(&mut c, KEY).await.as_deref(),
        Some("10.0.0.9:8080"),
        "their key survives"
    );

    // Recovery does not take it back either.
    backend.set_healthy(true);
    assert!(
        sk.logs("key is held elsewhere", f.reregistration()).await,
        "{}",
        sk.log()
    );
    // It tries again each interval: give it five more probes' worth of tries.
    let hits = backend.hits();
    assert!(eventually(f.probes(5), || async { backend.hits() >= hits + 5 }).await);
    let kv = get(&mut c, KEY).await.unwrap();
    assert_eq!((kv.value_str().unwrap(), kv.lease()), ("10.0.0.9:8080", theirs));

    // Once theirs is gone, ours comes back by itself.
    c.lease_revoke(theirs).await.unwrap();
    assert!(
        key_becomes(&c, KEY, Some(ADDR), f.etcd_attempts(1)).await,
        "{}",
        sk.log()
    );
}

#[tokio::test]
async fn first_registration_takes_over_a_leftover_key() {
    let etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let mut c = etcd.client(0).await;
    // What a previous run of this instance (or `etcdctl set`) left behind.
    c.put(KEY, "stale", None).await.unwrap();
    let (_sk, _) = start_registered(&etcd, &plain_run(KEY, "fresh", &eps)).await;
    assert_ne!(get(&mut c, KEY).await.unwrap().lease(), 0);
}

#[tokio::test]
async fn json_logs_name_endpoints_and_rule_in_the_first_line() {
    // The global flag before the subcommand.
    let (etcd, _backend, mut sk, _c) =
        registered_with(KEY, ADDR, "1", "1", |a| [&["--log-format", "json"][..], &a].concat()).await;
    let eps = etcd.endpoints();
    sk.signal("TERM");
    sk.exit_within(sk.figures().exit()).await.expect("exits");
    let log = sk.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let first = &lines[0];
    assert_eq!(first["endpoints"], eps.as_str(), "{first}");
    assert_eq!(first["rule"], "--endpoints", "{first}");
    assert!(
        first["message"]
            .as_str()
            .unwrap()
            .starts_with("probing http://127.0.0.1:"),
        "{first}"
    );
    assert!(lines.iter().any(|l| l["message"] == "registered"), "{log}");
}
