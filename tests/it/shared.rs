//! `--shared` keys against a real etcd with two and three instances: held
//! jointly under a service lease every instance computes alike, so no
//! instance leaving (SIGTERM, failure, SIGKILL) writes anything; never
//! overwritten; expired after the last one goes.

use etcd_client::Client;
use etcd_sidekick::engine::shared::lease_id;

use crate::harness::bounds::*;
use crate::harness::*;

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

/// The figures of every instance's flags (they differ only in key and value).
fn figures() -> Figures {
    Figures::of(&fast_run(
        "/k",
        "v",
        "http://127.0.0.1/health",
        "http://127.0.0.1:2379",
        "1",
        "1",
    ))
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
        assert!(
            key_becomes(&c, &key, Some(&value), figures().registration()).await,
            "{}",
            sk.log()
        );
        running.push(sk);
    }
    running
}

/// The service lease of a shared key.
fn service_lease(key: &str, value: &str) -> i64 {
    lease_id(key, value).0
}

/// The revision that last wrote each shared key.
async fn shared_revisions(c: &mut Client) -> [i64; 2] {
    let mut out = [0; 2];
    for (i, k) in [SCHEME, HOST_PORT].iter().enumerate() {
        out[i] = get(c, k).await.unwrap_or_else(|| panic!("{k} missing")).mod_revision();
    }
    out
}

#[tokio::test]
async fn the_shared_keys_are_held_jointly_and_an_instance_leaving_writes_nothing() {
    let etcd = Etcd::start().await;
    let backend = Backend::start();
    let mut sks = instances(&etcd, &backend, 2).await;
    let mut c = etcd.client(0).await;
    assert_eq!(lease_of(&mut c, SCHEME).await, service_lease(SCHEME, "http"));
    assert_eq!(lease_of(&mut c, HOST_PORT).await, service_lease(HOST_PORT, "8080"));
    let written = shared_revisions(&mut c).await;

    // Steady: two instances with shared keys write nothing.
    let before = revision(&mut c).await;
    let_pass(figures().steady()).await;
    assert_eq!(revision(&mut c).await, before, "zero revisions while steady");

    // One stops: its own key goes, the shared keys are not touched.
    sks[0].signal("TERM");
    assert!(key_becomes(&c, "/services/web/hosts/1", None, figures().stop_withdrawal()).await);
    assert_eq!(sks[0].exit_within(figures().exit()).await.unwrap().code(), Some(0));
    let_pass(figures().past_ttl()).await; // the other keeps them alive meanwhile
    assert_eq!(shared_revisions(&mut c).await, written, "{}", sks[1].log());

    // The last one stops: the keys outlive it by at most the TTL (2 s).
    sks[1].signal("TERM");
    assert!(key_becomes(&c, "/services/web/hosts/2", None, figures().stop_withdrawal()).await);
    assert!(key_becomes(&c, SCHEME, None, figures().expiry()).await);
    assert!(key_becomes(&c, HOST_PORT, None, figures().expiry()).await);
    assert!(c
        .get("/services/", Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .unwrap()
        .kvs()
        .is_empty());
}

#[tokio::test]
async fn killed_and_failing_instances_change_nothing_for_the_others() {
    let etcd = Etcd::start().await;
    let backend = Backend::start();
    let sks = instances(&etcd, &backend, 3).await;
    let mut c = etcd.client(0).await;
    let written = shared_revisions(&mut c).await;

    // Killed: its lease expires (2 s TTL) with its own key only.
    sks[0].signal("KILL");
    assert!(key_becomes(&c, "/services/web/hosts/1", None, figures().expiry()).await);
    let_pass(figures().past_ttl()).await; // every lease of its would have expired
    assert_eq!(shared_revisions(&mut c).await, written, "{}", sks[1].log());

    // Another withdraws: still nothing.
    sks[1].signal("TERM");
    assert!(key_becomes(&c, "/services/web/hosts/2", None, figures().stop_withdrawal()).await);
    assert_eq!(shared_revisions(&mut c).await, written);

    // Deleted by hand while an instance is registered: back at once,
    // under the service lease.
    c.delete(SCHEME, None).await.unwrap();
    assert!(key_becomes(&c, SCHEME, Some("http"), SOON).await, "{}", sks[2].log());
    assert_eq!(lease_of(&mut c, SCHEME).await, service_lease(SCHEME, "http"));
    sks[2].signal("TERM");
    assert!(key_becomes(&c, SCHEME, None, figures().expiry()).await);
    assert!(key_becomes(&c, HOST_PORT, None, figures().expiry()).await);
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
        assert!(key_becomes(&c, "/services/web/hosts/1", None, figures().withdrawal()).await);
        backend.set_healthy(true);
        assert!(
            key_becomes(
                &c,
                "/services/web/hosts/1",
                Some("10.0.0.1:8080"),
                figures().reregistration()
            )
            .await
        );
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

    // The foreign holder goes: the instance puts its own value, under the
    // service lease.
    c.lease_revoke(theirs).await.unwrap();
    assert!(key_becomes(&c, HOST_PORT, Some("8080"), SOON).await, "{log}");
    assert_eq!(lease_of(&mut c, HOST_PORT).await, service_lease(HOST_PORT, "8080"));
}

#[tokio::test]
async fn an_etcd_restart_and_a_wipe_keep_the_invariant() {
    let mut etcd = Etcd::start().await;
    let backend = Backend::start();
    let sks = instances(&etcd, &backend, 2).await;
    let mut c = etcd.client(0).await;
    let written = shared_revisions(&mut c).await;

    // Restart with the data: the same leases hold the same keys, unwritten.
    etcd.restart(0).await;
    let mut c = etcd.client(0).await;
    let_pass(figures().past_ttl()).await; // leases must be kept alive meanwhile
    assert_eq!(shared_revisions(&mut c).await, written, "{}", sks[0].log());

    // Wiped: every lease is lost; both instances register again, and the
    // shared keys exist once more, under their service leases.
    etcd.wipe_and_start().await;
    let mut c = etcd.client(0).await;
    for i in 1..=2 {
        let (k, v) = (format!("/services/web/hosts/{i}"), format!("10.0.0.{i}:8080"));
        assert!(
            key_becomes(&c, &k, Some(&v), figures().etcd_back() + figures().keepalives(1)).await,
            "{}",
            sks[i - 1].log()
        );
    }
    for (k, v) in [(SCHEME, "http"), (HOST_PORT, "8080")] {
        assert!(
            key_becomes(&c, k, Some(v), figures().etcd_back() + figures().keepalives(1)).await,
            "{}",
            sks[0].log()
        );
        assert_eq!(lease_of(&mut c, k).await, service_lease(k, v));
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
    let_pass(QUIET).await;
    assert!(ok.try_wait().unwrap().is_none(), "accepted and running");
    signal(ok.id(), "KILL");
    let _ = ok.wait();
}
