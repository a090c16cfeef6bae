//! `sidekick agent` against a real etcd: many services under one lease,
//! reloads that write only the difference, ownership and failures per
//! service, etcd restarts and a lost lease.

use std::path::Path;
use std::time::Duration;

use etcd_client::{Client, GetOptions, PutOptions};

use crate::harness::*;

const SEC: Duration = Duration::from_secs(1);

/// A `[services.NAME]` table probing `url` with short timings.
fn service(name: &str, key: &str, value: &str, url: &str, more: &str) -> String {
    format!(
        "[services.{name}]\nkey = \"{key}\"\nvalue = \"{value}\"\nhttp = \"{url}\"\n\
         interval = \"200ms\"\ntimeout = \"100ms\"\nrise = 1\nfall = 1\n{more}\n"
    )
}

fn write(dir: &Path, file: &str, text: &str) {
    std::fs::write(dir.join(file), text).unwrap();
}

fn agent(dir: &Path, eps: &str, more: &[&str]) -> Running {
    let mut args = vec![
        "agent",
        "--config",
        dir.to_str().unwrap(),
        "--ttl",
        "3s",
        "--dial-timeout",
        "1s",
        "--endpoints",
        eps,
    ];
    args.extend_from_slice(more);
    Running::start(&args)
}

async fn lease_of(c: &mut Client, key: &str) -> Option<i64> {
    get(c, key).await.map(|kv| kv.lease())
}

async fn all_under(c: &mut Client, prefix: &str) -> Vec<(String, String)> {
    c.get(prefix, Some(GetOptions::new().with_prefix()))
        .await
        .unwrap()
        .kvs()
        .iter()
        .map(|kv| (kv.key_str().unwrap().to_string(), kv.value_str().unwrap().to_string()))
        .collect()
}

#[tokio::test]
async fn services_share_one_lease_and_a_reload_writes_only_the_difference() {
    let etcd = Etcd::start().await;
    let backend = Backend::start();
    let url = backend.url();
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "a.toml",
        &(service("a", "/services/a/1", "10.0.0.1:80", &url, "")
            + &service("b", "/services/b/1", "10.0.0.2:80", &url, "")),
    );
    write(
        dir.path(),
        "c.toml",
        &service("c", "/services/c/1", "10.0.0.3:80", &url, ""),
    );
    write(dir.path(), "notes.txt", "not a config: ignored");
    let eps = etcd.endpoints();
    let mut sk = agent(dir.path(), &eps, &[]);
    let mut c = etcd.client(0).await;
    for (k, v) in [
        ("/services/a/1", "10.0.0.1:80"),
        ("/services/b/1", "10.0.0.2:80"),
        ("/services/c/1", "10.0.0.3:80"),
    ] {
        assert!(key_becomes(&c, k, Some(v), 10 * SEC).await, "{k}: {}", sk.log());
    }
    let lease = lease_of(&mut c, "/services/a/1").await.unwrap();
    assert_ne!(lease, 0);
    assert_eq!(lease_of(&mut c, "/services/b/1").await, Some(lease), "one lease");
    assert_eq!(lease_of(&mut c, "/services/c/1").await, Some(lease), "one lease");
    let c_rev = get(&mut c, "/services/c/1").await.unwrap().mod_revision();

    // Steady: nothing is written, leases kept alive past the TTL.
    let before = revision(&mut c).await;
    tokio::time::sleep(4 * SEC).await; // the scenario: longer than the TTL
    assert_eq!(revision(&mut c).await, before, "zero revisions while steady");

    // a removed, b changed, c untouched, d added.
    write(
        dir.path(),
        "a.toml",
        &(service("b", "/services/b/1", "10.0.0.22:80", &url, "")
            + &service("d", "/services/d/1", "10.0.0.4:80", &url, "")),
    );
    sk.signal("HUP");
    assert!(key_becomes(&c, "/services/a/1", None, 5 * SEC).await, "{}", sk.log());
    assert!(
        key_becomes(&c, "/services/b/1", Some("10.0.0.22:80"), 5 * SEC).await,
        "{}",
        sk.log()
    );
    assert!(
        key_becomes(&c, "/services/d/1", Some("10.0.0.4:80"), 5 * SEC).await,
        "{}",
        sk.log()
    );
    assert_eq!(
        get(&mut c, "/services/c/1").await.unwrap().mod_revision(),
        c_rev,
        "an unchanged service is not written to"
    );
    assert_eq!(
        lease_of(&mut c, "/services/d/1").await,
        Some(lease),
        "still the one lease"
    );

    // An invalid configuration is refused, naming file, service and field;
    // the running one stays.
    write(
        dir.path(),
        "c.toml",
        &service("c", "/services/c/1", "10.0.0.3:80", &url, "").replace("200ms", "soon"),
    );
    sk.signal("HUP");
    assert!(
        eventually(5 * SEC, || async {
            sk.log()
                .lines()
                .any(|l| l.contains("reload refused") && l.contains("c.toml: service c: interval: 'soon'"))
        })
        .await,
        "{}",
        sk.log()
    );
    tokio::time::sleep(SEC).await; // the scenario: nothing may change
    assert_eq!(get(&mut c, "/services/c/1").await.unwrap().mod_revision(), c_rev);
    assert!(get(&mut c, "/services/d/1").await.is_some());

    sk.signal("TERM");
    assert_eq!(sk.exit_within(5 * SEC).await.unwrap().code(), Some(0));
    assert!(
        all_under(&mut c, "/services/").await.is_empty(),
        "one revoke takes every key"
    );
}

#[tokio::test]
async fn a_failing_service_withdraws_only_its_own_keys_and_never_another_writers() {
    let etcd = Etcd::start().await;
    let (good, bad) = (Backend::start(), Backend::start());
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "s.toml",
        &(service("good", "/services/good/1", "g", &good.url(), "")
            + &service(
                "bad",
                "/services/bad/1",
                "b",
                &bad.url(),
                "extra = { \"/services/bad/1/weight\" = \"10\" }",
            )),
    );
    let eps = etcd.endpoints();
    let sk = agent(dir.path(), &eps, &[]);
    let mut c = etcd.client(0).await;
    assert!(
        key_becomes(&c, "/services/bad/1/weight", Some("10"), 10 * SEC).await,
        "{}",
        sk.log()
    );
    assert!(
        key_becomes(&c, "/services/good/1", Some("g"), 10 * SEC).await,
        "{}",
        sk.log()
    );

    // Another writer takes one of bad's keys; then bad fails.
    let theirs = c.lease_grant(60, None).await.unwrap().id();
    c.put(
        "/services/bad/1/weight",
        "theirs",
        Some(PutOptions::new().with_lease(theirs)),
    )
    .await
    .unwrap();
    bad.set_healthy(false);
    assert!(key_becomes(&c, "/services/bad/1", None, 5 * SEC).await, "{}", sk.log());
    assert_eq!(
        value(&mut c, "/services/bad/1/weight").await.as_deref(),
        Some("theirs"),
        "a key another lease holds is never deleted"
    );
    assert_eq!(
        value(&mut c, "/services/good/1").await.as_deref(),
        Some("g"),
        "the others stay"
    );

    // Back: bad's own key returns, the other writer's is not overwritten.
    bad.set_healthy(true);
    assert!(
        key_becomes(&c, "/services/bad/1", Some("b"), 5 * SEC).await,
        "{}",
        sk.log()
    );
    tokio::time::sleep(SEC).await; // the scenario: retries must not overwrite
    assert_eq!(value(&mut c, "/services/bad/1/weight").await.as_deref(), Some("theirs"));
    let log = sk.log();
    assert_eq!(
        log.lines()
            .filter(|l| l.contains(" WARN ") && l.contains("held elsewhere"))
            .count(),
        1,
        "{log}"
    );
}

#[tokio::test]
async fn shared_keys_stay_while_any_declaring_service_is_registered() {
    let etcd = Etcd::start().await;
    let (one, two) = (Backend::start(), Backend::start());
    let shared = "shared = { \"/services/web/scheme\" = \"http\" }";
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "s.toml",
        &(service("one", "/services/web/hosts/1", "a", &one.url(), shared)
            + &service("two", "/services/web/hosts/2", "b", &two.url(), shared)),
    );
    let sk = agent(dir.path(), &etcd.endpoints(), &[]);
    let mut c = etcd.client(0).await;
    assert!(
        key_becomes(&c, "/services/web/scheme", Some("http"), 10 * SEC).await,
        "{}",
        sk.log()
    );
    assert!(key_becomes(&c, "/services/web/hosts/2", Some("b"), 10 * SEC).await);
    one.set_healthy(false);
    assert!(key_becomes(&c, "/services/web/hosts/1", None, 5 * SEC).await);
    tokio::time::sleep(SEC / 2).await; // the scenario: the shared key must stay
    assert_eq!(value(&mut c, "/services/web/scheme").await.as_deref(), Some("http"));
    // Deleted by hand while declared: put back.
    c.delete("/services/web/scheme", None).await.unwrap();
    assert!(
        key_becomes(&c, "/services/web/scheme", Some("http"), 2 * SEC).await,
        "{}",
        sk.log()
    );
    two.set_healthy(false);
    assert!(key_becomes(&c, "/services/web/hosts/2", None, 5 * SEC).await);
    assert!(
        key_becomes(&c, "/services/web/scheme", None, 5 * SEC).await,
        "gone with the last: {}",
        sk.log()
    );
}

#[tokio::test]
async fn a_restart_keeps_the_lease_and_a_wipe_registers_every_healthy_service_and_no_other() {
    let mut etcd = Etcd::start().await;
    let (up, down) = (Backend::start(), Backend::start());
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "s.toml",
        &(service("up", "/services/up/1", "u", &up.url(), "")
            + &service("down", "/services/down/1", "d", &down.url(), "")),
    );
    down.set_healthy(false);
    let sk = agent(dir.path(), &etcd.endpoints(), &[]);
    let mut c = etcd.client(0).await;
    assert!(
        key_becomes(&c, "/services/up/1", Some("u"), 10 * SEC).await,
        "{}",
        sk.log()
    );
    let lease = lease_of(&mut c, "/services/up/1").await;

    etcd.restart(0).await;
    let mut c = etcd.client(0).await;
    tokio::time::sleep(4 * SEC).await; // the scenario: past the TTL
    assert_eq!(
        lease_of(&mut c, "/services/up/1").await,
        lease,
        "same lease after a restart: {}",
        sk.log()
    );

    etcd.wipe_and_start().await;
    let mut c = etcd.client(0).await;
    assert!(
        key_becomes(&c, "/services/up/1", Some("u"), 10 * SEC).await,
        "{}",
        sk.log()
    );
    assert_ne!(lease_of(&mut c, "/services/up/1").await, lease, "a new lease");
    tokio::time::sleep(SEC).await; // the scenario: the unhealthy one must stay out
    assert!(get(&mut c, "/services/down/1").await.is_none());
    assert_eq!(all_under(&mut c, "/services/").await.len(), 1);
}

#[tokio::test]
async fn an_invalid_configuration_at_start_exits_2_before_any_write() {
    let etcd = Etcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let url = "http://127.0.0.1:1/";
    for (text, want) in [
        (
            service("web", "/k", "v", url, "grace = 5"),
            "web.toml: service web: invalid type: integer `5`, expected a string",
        ),
        (
            service("web", "/k", "v", url, "colour = 1"),
            "web.toml: service web: unknown field `colour`",
        ),
        (
            service("web", "/k", "v", url, "shared = { \"/s\" = \"a\" }")
                + &service("api", "/k2", "v", url, "shared = { \"/s\" = \"b\" }"),
            "service web: shared: key '/s' is 'a' here and 'b' in service api",
        ),
        (
            "[services.web]\nkey = \"/k\"\nvalue = \"v\"\nhttp = \"ftp://x\"\n".to_string(),
            "service web: http: 'ftp://x' must be an http",
        ),
    ] {
        write(dir.path(), "web.toml", &text);
        let out = sidekick(&[
            "agent",
            "--config",
            dir.path().to_str().unwrap(),
            "--endpoints",
            &etcd.endpoints(),
        ])
        .output()
        .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(want), "want {want:?}: {err}");
    }
    let mut c = etcd.client(0).await;
    assert_eq!(revision(&mut c).await, 1, "nothing was ever written");
}

#[tokio::test]
async fn status_lists_every_service_and_metrics_carry_their_names() {
    let etcd = Etcd::start().await;
    let (a, b) = (Backend::start(), Backend::start());
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "s.toml",
        &(service("alpha", "/services/alpha/1", "x", &a.url(), "")
            + &service("beta", "/services/beta/1", "y", &b.url(), "")),
    );
    let addr = format!("127.0.0.1:{}", free_port());
    let sk = agent(dir.path(), &etcd.endpoints(), &["--status-addr", &addr]);
    let c = etcd.client(0).await;
    assert!(
        key_becomes(&c, "/services/beta/1", Some("y"), 10 * SEC).await,
        "{}",
        sk.log()
    );
    assert!(
        key_becomes(&c, "/services/alpha/1", Some("x"), 10 * SEC).await,
        "{}",
        sk.log()
    );
    b.set_healthy(false);
    assert!(key_becomes(&c, "/services/beta/1", None, 5 * SEC).await);

    let fetch = |path: &str| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        raw.split_once("\r\n\r\n").unwrap().1.to_string()
    };
    let status: serde_json::Value = serde_json::from_str(&fetch("/status")).unwrap();
    let services = status["services"].as_array().unwrap();
    let state = |name: &str| services.iter().find(|s| s["name"] == name).map(|s| s["state"].clone());
    assert_eq!(state("alpha"), Some("up".into()), "{status}");
    assert_eq!(state("beta"), Some("down".into()), "{status}");
    let scrape = prometheus_parse::Scrape::parse(fetch("/metrics").lines().map(|l| Ok(l.to_string()))).unwrap();
    let registered = |name: &str| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == "sidekick_registered" && s.labels.get("service") == Some(name))
            .map(|s| s.value.clone())
    };
    assert_eq!(registered("alpha"), Some(prometheus_parse::Value::Gauge(1.0)));
    assert_eq!(registered("beta"), Some(prometheus_parse::Value::Gauge(0.0)));
}

#[tokio::test]
async fn exec_and_grpc_checks_work_in_the_agent() {
    let etcd = Etcd::start().await;
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("healthy");
    let flag_path = flag.to_str().unwrap();
    // etcd serves the standard gRPC health service on its client port.
    let grpc = etcd.url(0).trim_start_matches("http://").to_string();
    write(
        dir.path(),
        "s.toml",
        &format!(
            "[services.script]\nkey = \"/services/script/1\"\nvalue = \"s\"\nexec = \"test -e {flag_path}\"\n\
             interval = \"200ms\"\ntimeout = \"100ms\"\nrise = 1\nfall = 1\n\n\
             [services.rpc]\nkey = \"/services/rpc/1\"\nvalue = \"r\"\ngrpc = \"{grpc}\"\n\
             interval = \"300ms\"\ntimeout = \"200ms\"\nrise = 1\nfall = 1\n"
        ),
    );
    let sk = agent(dir.path(), &etcd.endpoints(), &[]);
    let c = etcd.client(0).await;
    assert!(
        key_becomes(&c, "/services/rpc/1", Some("r"), 10 * SEC).await,
        "{}",
        sk.log()
    );
    tokio::time::sleep(SEC / 2).await; // the scenario: the script fails while the file is missing
    assert!(get(&mut c.clone(), "/services/script/1").await.is_none());
    std::fs::write(&flag, "").unwrap();
    assert!(
        key_becomes(&c, "/services/script/1", Some("s"), 5 * SEC).await,
        "{}",
        sk.log()
    );
    std::fs::remove_file(&flag).unwrap();
    assert!(
        key_becomes(&c, "/services/script/1", None, 5 * SEC).await,
        "{}",
        sk.log()
    );
}

// A registration that reaches etcd after its withdrawal (it got no answer
// from a member cut off from the agent, which delivered it when the link
// came back) must not stay: the agent watches its own keys and deletes such
// a key, by its revision, whether its service is down or removed by a
// reload. A key deleted behind its back while registered is put back.
#[tokio::test]
async fn a_late_registration_is_undone_and_a_key_deleted_by_hand_put_back() {
    let etcd = Etcd::start().await;
    let web = Backend::start();
    let dir = tempfile::tempdir().unwrap();
    const KEY: &str = "/services/web/1";
    write(dir.path(), "web.toml", &service("web", KEY, "w", &web.url(), ""));
    let eps = etcd.endpoints();
    let mut sk = agent(dir.path(), &eps, &[]);
    let mut c = etcd.client(0).await;
    assert!(key_becomes(&c, KEY, Some("w"), 10 * SEC).await, "{}", sk.log());
    let lease = lease_of(&mut c, KEY).await.unwrap();

    c.delete(KEY, None).await.unwrap();
    assert!(key_becomes(&c, KEY, Some("w"), 5 * SEC).await, "{}", sk.log());
    assert!(sk.log().contains("key deleted while registered; putting it again"));

    // Down, withdrawn; then its registration, late, under the agent's lease.
    web.set_healthy(false);
    assert!(key_becomes(&c, KEY, None, 5 * SEC).await, "{}", sk.log());
    let late = Some(PutOptions::new().with_lease(lease));
    c.put(KEY, "w", late.clone()).await.unwrap();
    assert!(key_becomes(&c, KEY, None, 5 * SEC).await, "{}", sk.log());
    assert!(sk.log().contains("reached etcd after its withdrawal"), "{}", sk.log());

    // Back, then removed by a reload; then a late registration again.
    web.set_healthy(true);
    assert!(key_becomes(&c, KEY, Some("w"), 5 * SEC).await, "{}", sk.log());
    std::fs::remove_file(dir.path().join("web.toml")).unwrap();
    sk.signal("HUP");
    assert!(key_becomes(&c, KEY, None, 5 * SEC).await, "{}", sk.log());
    c.put(KEY, "w", late).await.unwrap();
    assert!(key_becomes(&c, KEY, None, 5 * SEC).await, "{}", sk.log());

    // Another writer's key there is never touched.
    c.put(KEY, "theirs", None).await.unwrap();
    tokio::time::sleep(SEC).await; // the scenario: nothing may change
    assert_eq!(value(&mut c, KEY).await.as_deref(), Some("theirs"));
    sk.signal("TERM");
    assert_eq!(sk.exit_within(5 * SEC).await.unwrap().code(), Some(0));
}
