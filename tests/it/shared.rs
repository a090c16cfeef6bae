//! `--shared` keys against a real etcd with two and three instances: put
//! only where absent, never overwritten or taken over, put again by another
//! instance when the holder goes, gone with the last one.

use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, WatchOptions};

use crate::harness::*;

const SEC: Duration = Duration::from_secs(1);
const SCHEME: &str = "/services/web/scheme";
const HOST_PORT: &str = "/services/web/host_port";

/// Instance `n` of the seed layout: its own host key, the two shared keys.
fn instance(n: usize, eps: &str, url: &str) -> Running {
    let key = format!("/services/web/hosts/{n}");
    let value = format!("10.0.0.{n}:8080");
    let mut args = fast_run(&key, &value, url, eps, "1", "1");
    args.extend([
        "--shared",
        "/services/web/scheme=http",
        "--shared",
        "/services/web/host_port=8080",
    ]);
    Running::start(&args)
}

/// The value and lease of `key`, if it exists.
async fn held(c: &mut Client, key: &str) -> Option<(String, i64)> {
    get(c, key)
        .await
        .map(|kv| (kv.value_str().unwrap().to_string(), kv.lease()))
}

async fn lease_of(c: &mut Client, key: &str) -> i64 {
    get(c, key).await.unwrap_or_else(|| panic!("{key} missing")).lease()
}

/// Starts `n` instances on one backend and waits until all are registered.
async fn instances(etcd: &Etcd, backend: &Backend, n: usize) -> Vec<Running> {
    let (url, eps) = (backend.url(), etcd.endpoints());
    let mut running = Vec::new();
    let c = etcd.client(0).await;
    for i in 1..=n {
        let sk = instance(i, &eps, &url);
        let key = format!("/services/web/hosts/{i}");
        let value = format!("10.0.0.{i}:8080");
        assert!(key_becomes(&c, &key, Some(&value), 10 * SEC).await, "{}", sk.log());
        running.push(sk);
    }
    running
}

/// Watches `key` from now on and returns how long after its next deletion
/// it was put again (None: not within `limit`).
async fn gap_until_put_again(c: &mut Client, key: &str, limit: Duration) -> Option<Duration> {
    let mut stream = c.watch(key, Some(WatchOptions::new())).await.unwrap();
    let deadline = Instant::now() + limit;
    let mut deleted_at = None;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        let resp = tokio::time::timeout(left, stream.message()).await.ok()?.ok()??;
        for e in resp.events() {
            match (e.event_type(), deleted_at) {
                (EventType::Delete, None) => deleted_at = Some(Instant::now()),
                (EventType::Put, Some(at)) => return Some(at.elapsed()),
                _ => {}
            }
        }
    }
}

#[tokio::test]
async fn the_holder_withdraws_and_another_instance_puts_the_key_again_at_once() {
    let etcd = Etcd::start().await;
    let backend = Backend::start();
    let sks = instances(&etcd, &backend, 2).await;
    let mut c = etcd.client(0).await;
    let first = lease_of(&mut c, "/services/web/hosts/1").await;
    let second = lease_of(&mut c, "/services/web/hosts/2").await;
    for k in [SCHEME, HOST_PORT] {
        assert_eq!(
            lease_of(&mut c, k).await,
            first,
            "{k}: the first instance put it, the second left it"
        );
    }

    // Steady: two instances with shared keys write nothing.
    let before = revision(&mut c).await;
    tokio::time::sleep(3 * SEC).await; // the scenario: watch for writes
    assert_eq!(revision(&mut c).await, before, "zero revisions while steady");

    // The holder stops: its lease takes the shared keys, the other
    // instance's watch puts them back within one round trip.
    let mut watcher = etcd.client(0).await;
    let watching = tokio::spawn(async move { gap_until_put_again(&mut watcher, SCHEME, 10 * SEC).await });
    tokio::time::sleep(SEC / 5).await; // let the watch start
    sks[0].signal("TERM");
    let gap = watching.await.unwrap();
    let gap = gap.unwrap_or_else(|| panic!("put again: {}", sks[1].log()));
    assert!(gap < SEC, "back {gap:?} after the deletion");
    for k in [SCHEME, HOST_PORT] {
        let (v, lease) = held(&mut c, k).await.unwrap();
        assert_eq!(lease, second, "{k} now under the remaining instance's lease");
        assert!(v == "http" || v == "8080");
    }
    assert!(
        eventually(5 * SEC, || async { sks[1].log().contains("shared key deleted") }).await,
        "{}",
        sks[1].log()
    );

    // The last one stops: everything goes.
    sks[1].signal("TERM");
    assert!(key_becomes(&c, SCHEME, None, 5 * SEC).await);
    assert!(key_becomes(&c, HOST_PORT, None, 5 * SEC).await);
    assert!(c
        .get("/services/", Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .unwrap()
        .kvs()
        .is_empty());
}

#[tokio::test]
async fn three_instances_keep_the_keys_until_the_last_one_goes() {
    let etcd = Etcd::start().await;
    let backend = Backend::start();
    let sks = instances(&etcd, &backend, 3).await;
    let mut c = etcd.client(0).await;
    let holder = lease_of(&mut c, SCHEME).await;

    // The holder is killed: its lease expires (2 s TTL) and another
    // instance puts the keys again under its own lease.
    sks[0].signal("KILL");
    assert!(key_becomes(&c, "/services/web/hosts/1", None, 5 * SEC).await);
    let moved = || async {
        let mut c = c.clone();
        let s = held(&mut c, SCHEME).await;
        let h = held(&mut c, HOST_PORT).await;
        matches!((s, h), (Some((_, a)), Some((_, b))) if a != holder && b != holder && a != 0 && b != 0)
    };
    assert!(eventually(2 * SEC, moved).await, "{}{}", sks[1].log(), sks[2].log());

    // One unhealthy instance withdraws; the keys stay with the other.
    sks[1].signal("TERM");
    assert!(key_becomes(&c, "/services/web/hosts/2", None, 5 * SEC).await);
    assert!(eventually(2 * SEC, || async { held(&mut c.clone(), SCHEME).await.is_some() }).await);
    let last = lease_of(&mut c, "/services/web/hosts/3").await;
    assert!(
        eventually(2 * SEC, || async {
            held(&mut c.clone(), SCHEME).await.map(|(_, l)| l) == Some(last)
        })
        .await,
        "{}",
        sks[2].log()
    );
    sks[2].signal("TERM");
    assert!(key_becomes(&c, SCHEME, None, 5 * SEC).await);
    assert!(key_becomes(&c, HOST_PORT, None, 5 * SEC).await);
}

#[tokio::test]
async fn a_foreign_or_permanent_value_is_never_overwritten_and_warned_about_once() {
    let etcd = Etcd::start().await;
    let backend = Backend::start();
    let mut c = etcd.client(0).await;
    // Written once by hand, as the README used to teach: permanent.
    c.put(SCHEME, "tcp", None).await.unwrap();
    let theirs = c.lease_grant(60, None).await.unwrap().id();
    c.put(
        HOST_PORT,
        "9090",
        Some(etcd_client::PutOptions::new().with_lease(theirs)),
    )
    .await
    .unwrap();
    let sks = instances(&etcd, &backend, 1).await;
    // Withdraw and re-register a few times: still one warning per value.
    for _ in 0..2 {
        backend.set_healthy(false);
        assert!(key_becomes(&c, "/services/web/hosts/1", None, 5 * SEC).await);
        backend.set_healthy(true);
        assert!(key_becomes(&c, "/services/web/hosts/1", Some("10.0.0.1:8080"), 5 * SEC).await);
    }
    assert_eq!(
        held(&mut c, SCHEME).await,
        Some(("tcp".into(), 0)),
        "permanent, untouched"
    );
    assert_eq!(
        held(&mut c, HOST_PORT).await,
        Some(("9090".into(), theirs)),
        "theirs, untouched"
    );
    let log = sks[0].log();
    let warned = |key: &str| {
        log.lines()
            .filter(|l| l.contains(" WARN ") && l.contains("another value") && l.contains(key))
            .count()
    };
    assert_eq!((warned(SCHEME), warned(HOST_PORT)), (1, 1), "{log}");
    assert!(
        log.contains("theirs=tcp") && log.contains("ours=http"),
        "names both values: {log}"
    );

    // The foreign holder goes: the instance puts its own value.
    c.lease_revoke(theirs).await.unwrap();
    assert!(key_becomes(&c, HOST_PORT, Some("8080"), 2 * SEC).await, "{log}");
}

#[tokio::test]
async fn an_etcd_restart_and_a_wipe_keep_the_invariant() {
    let mut etcd = Etcd::start().await;
    let backend = Backend::start();
    let sks = instances(&etcd, &backend, 2).await;
    let mut c = etcd.client(0).await;
    let holder = lease_of(&mut c, SCHEME).await;

    // Restart with the data: the same leases hold the same keys.
    etcd.restart(0).await;
    let mut c = etcd.client(0).await;
    tokio::time::sleep(3 * SEC).await; // longer than the TTL: leases must be kept alive
    assert_eq!(lease_of(&mut c, SCHEME).await, holder, "{}", sks[0].log());

    // Wiped: every lease is lost; both instances register again, and the
    // shared keys exist once more, under one of the new leases.
    etcd.wipe_and_start().await;
    let c = etcd.client(0).await;
    for i in 1..=2 {
        let (k, v) = (format!("/services/web/hosts/{i}"), format!("10.0.0.{i}:8080"));
        assert!(key_becomes(&c, &k, Some(&v), 10 * SEC).await, "{}", sks[i - 1].log());
    }
    let mut c2 = c.clone();
    let leases = [
        lease_of(&mut c2, "/services/web/hosts/1").await,
        lease_of(&mut c2, "/services/web/hosts/2").await,
    ];
    for k in [SCHEME, HOST_PORT] {
        let l = lease_of(&mut c2, k).await;
        assert!(leases.contains(&l), "{k} under a live instance's lease");
    }
}

#[tokio::test]
async fn a_key_both_own_and_shared_or_shared_twice_differently_is_a_usage_error() {
    let port = free_port().to_string();
    let eps = format!("http://127.0.0.1:{port}");
    for (args, want) in [
        (
            vec!["--shared", "/services/web/1=x"],
            "--shared: key '/services/web/1' is also given as KEY or --extra",
        ),
        (
            vec!["--extra", "/e=1", "--shared", "/e=1"],
            "--shared: key '/e' is also given as KEY or --extra",
        ),
        (
            vec!["--shared", "/s=a", "--shared", "/s=b"],
            "--shared: key '/s' is given twice with different values ('a' and 'b')",
        ),
        (vec!["--shared", "novalue"], "--shared: 'novalue' must be KEY=VALUE"),
    ] {
        let mut all = vec!["run", "/services/web/1", "v", "--endpoints", &eps];
        all.extend(args);
        let out = sidekick(&all).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with(&format!("sidekick: {want}")), "{err}");
    }
    // The same key twice with the same value is no conflict.
    let ok = sidekick(&[
        "run",
        "/k",
        "v",
        "--shared",
        "/s=a",
        "--shared",
        "/s=a",
        "--endpoints",
        &eps,
    ])
    .stderr(std::process::Stdio::null())
    .spawn();
    let mut ok = ok.unwrap();
    tokio::time::sleep(SEC / 2).await;
    assert!(ok.try_wait().unwrap().is_none(), "accepted and running");
    signal(ok.id(), "KILL");
    let _ = ok.wait();
}
