//! `sidekick wait` against a real etcd: conditions already true, met later,
//! timed out, ridden across etcd restarts, bad flags; and proof that an
//! idle wait watches rather than polls.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use etcd_client::{Client, PutOptions};

use crate::harness::bounds::*;
use crate::harness::*;

/// The `--dial-timeout` of the waits that [`start_wait`] starts.
const DIAL: &str = "1s";

fn out(args: &[&str]) -> (Option<i32>, String, String) {
    let o = sidekick(args).output().unwrap();
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
    (o.status.code(), text(o.stdout), text(o.stderr))
}

async fn put(c: &mut Client, key: &str, value: &str) {
    c.put(key, value, None).await.unwrap();
}

async fn del(c: &mut Client, key: &str) {
    c.delete(key, None).await.unwrap();
}

/// One metric of etcd member `i`, read from `/metrics` on its client URL.
fn metric(etcd: &Etcd, i: usize, name: &str) -> f64 {
    let addr = etcd.url(i).trim_start_matches("http://").to_string();
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(IO)).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("etcd has no metric {name}"))
}

/// Waits until member `i` has at least `n` watchers: the wait has read the
/// keys and is watching, so a change made now comes after its read.
async fn watching(etcd: &Etcd, i: usize, n: f64) {
    let ok = eventually(SOON, || async {
        metric(etcd, i, "etcd_debugging_mvcc_watcher_total") >= n
    })
    .await;
    assert!(ok, "no watch opened on etcd member {i}");
}

/// Starts `sidekick wait ARGS --endpoints EPS --dial-timeout DIAL`.
fn start_wait(args: &[&str], eps: &str) -> Running {
    let mut all = vec!["wait"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--endpoints", eps, "--dial-timeout", DIAL]);
    Running::start(&all)
}

/// Asserts that the wait is still waiting: it has not exited within a
/// short while after a change that must not end it.
async fn still_waiting(w: &mut Running, what: &str) {
    assert!(w.stays_running(QUIET).await, "{what}:\n{}", w.log());
}

/// Asserts that a wait started by [`start_wait`] still waits while its
/// etcd is away: no early exit 1 while reads fail and are retried.
async fn waits_through_the_outage(w: &mut Running) {
    assert!(w.stays_running(wait_retrying(flag(DIAL))).await, "{}", w.log());
}

async fn ends_with_0(w: &mut Running, what: &str) {
    let st = w.exit_within(wait_reacts(flag(DIAL))).await;
    assert_eq!(st.and_then(|s| s.code()), Some(0), "{what}:\n{}", w.log());
}

#[tokio::test]
async fn a_condition_already_true_returns_at_once() {
    let etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let mut c = etcd.client(0).await;
    for k in ["/a", "/b", "/p/1", "/p/2", "/p/3"] {
        put(&mut c, k, "x").await;
    }
    let cases: [&[&str]; 6] = [
        &["/a", "/b"],
        &["/nothing", "/none", "--gone"],
        &["--prefix", "/p/"],
        &["--prefix", "/p/", "--count", "3"],
        &["--prefix", "/q/", "--gone"],
        &["--prefix", "/p/", "--gone", "--count", "3"],
    ];
    for args in cases {
        let mut all = vec!["wait", "--endpoints", &eps, "--timeout", "30s"];
        all.extend_from_slice(args);
        let started = Instant::now();
        let (code, stdout, stderr) = out(&all);
        assert_eq!((code, stdout.as_str(), stderr.as_str()), (Some(0), "", ""), "{args:?}");
        // Far below the 30s timeout: it did not wait for anything.
        assert!(started.elapsed() < one_shot_within(Duration::ZERO), "{args:?}");
    }
}

// More keys than etcd allows in one transaction (128 by default): they are
// read in several, all at one revision.
#[tokio::test]
async fn many_keys_are_read_in_several_transactions() {
    let etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let mut c = etcd.client(0).await;
    let keys: Vec<String> = (0..300).map(|i| format!("/many/{i:03}")).collect();
    for k in &keys[..299] {
        put(&mut c, k, "x").await;
    }
    let mut all = vec!["wait", "--endpoints", &eps, "--timeout", "1s"];
    all.extend(keys.iter().map(String::as_str));
    let (code, _, stderr) = out(&all);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stderr, "sidekick: timed out after 1s: missing /many/299\n");
    put(&mut c, &keys[299], "x").await;
    let (code, _, stderr) = out(&all);
    assert_eq!(code, Some(0), "{stderr}");
}

#[tokio::test]
async fn keys_put_after_the_wait_started_end_it() {
    let etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let mut c = etcd.client(0).await;
    let mut w = start_wait(&["/svc/a", "/svc/b", "--timeout", "60s"], &eps);
    watching(&etcd, 0, 2.0).await;
    put(&mut c, "/svc/a", "1").await;
    still_waiting(&mut w, "one key of two").await;
    put(&mut c, "/svc/b", "1").await;
    ends_with_0(&mut w, "both keys there").await;
}

#[tokio::test]
async fn gone_ends_when_the_last_key_is_deleted_or_expires() {
    let etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let mut c = etcd.client(0).await;
    put(&mut c, "/svc/a", "1").await;
    let lease = c.lease_grant(30, None).await.unwrap().id();
    c.put("/svc/b", "1", Some(PutOptions::new().with_lease(lease)))
        .await
        .unwrap();
    let mut w = start_wait(&["/svc/a", "/svc/b", "--gone", "--timeout", "60s"], &eps);
    watching(&etcd, 0, 2.0).await;
    del(&mut c, "/svc/a").await;
    still_waiting(&mut w, "one key still there").await;
    // The key goes with its lease, as a crashed instance's key does.
    c.lease_revoke(lease).await.unwrap();
    ends_with_0(&mut w, "both keys gone").await;
}

#[tokio::test]
async fn a_prefix_count_is_reached_as_keys_are_added() {
    let etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let mut c = etcd.client(0).await;
    put(&mut c, "/services/web/1", "a").await;
    let mut w = start_wait(
        &["--prefix", "/services/web/", "--count", "3", "--timeout", "60s"],
        &eps,
    );
    watching(&etcd, 0, 1.0).await;
    // Neither an update, nor a key beside the raw prefix, nor a key that
    // comes and goes adds to the count.
    put(&mut c, "/services/web/1", "b").await;
    put(&mut c, "/services/webx", "a").await;
    put(&mut c, "/services/web/9", "a").await;
    del(&mut c, "/services/web/9").await;
    put(&mut c, "/services/web/2", "a").await;
    still_waiting(&mut w, "two keys of three").await;
    put(&mut c, "/services/web/3", "a").await;
    ends_with_0(&mut w, "three keys").await;
}

#[tokio::test]
async fn a_prefix_with_gone_waits_for_at_most_count() {
    let etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let mut c = etcd.client(0).await;
    for k in ["/p/1", "/p/2", "/p/3"] {
        put(&mut c, k, "x").await;
    }
    let mut w = start_wait(&["--prefix", "/p/", "--gone", "--count", "1", "--timeout", "60s"], &eps);
    watching(&etcd, 0, 1.0).await;
    del(&mut c, "/p/1").await;
    still_waiting(&mut w, "two keys left, at most one wanted").await;
    del(&mut c, "/p/2").await;
    ends_with_0(&mut w, "one key left").await;
}

#[tokio::test]
async fn a_timeout_exits_1_with_one_line_naming_what_is_missing() {
    let etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let mut c = etcd.client(0).await;
    put(&mut c, "/a", "x").await;
    put(&mut c, "/p/1", "x").await;
    let cases: [(&[&str], &str); 4] = [
        (&["/a", "/b", "/c"], "missing /b, /c"),
        (&["/a", "/b", "--gone"], "still there: /a"),
        (
            &["--prefix", "/p/", "--count", "2"],
            "1 key under /p/, wanted at least 2",
        ),
        (&["--prefix", "/p/", "--gone"], "1 key under /p/, wanted at most 0"),
    ];
    for (args, detail) in cases {
        let timeout = "1s";
        let mut all = vec!["wait", "--endpoints", &eps, "--timeout", timeout];
        all.extend_from_slice(args);
        let started = Instant::now();
        let (code, stdout, stderr) = out(&all);
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr, format!("sidekick: timed out after 1s: {detail}\n"), "{args:?}");
        assert!(stdout.is_empty());
        assert!(started.elapsed() >= at_least(flag(timeout)), "{args:?} waited");
    }
}

#[tokio::test]
async fn an_etcd_restart_during_the_wait_does_not_end_it() {
    let mut etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let mut w = start_wait(&["/svc/a", "--timeout", "60s"], &eps);
    watching(&etcd, 0, 1.0).await;
    etcd.stop(0);
    // Reads fail and are retried for a while: no early exit 1.
    waits_through_the_outage(&mut w).await;
    etcd.restart(0).await;
    let mut c = etcd.client(0).await;
    put(&mut c, "/svc/a", "1").await;
    ends_with_0(&mut w, "key put after etcd came back").await;

    // The same with a killed etcd, and the key put before the wait has
    // reconnected: the re-read finds it.
    let mut w = start_wait(&["/svc/b", "--timeout", "60s"], &eps);
    watching(&etcd, 0, 1.0).await;
    etcd.kill(0);
    waits_through_the_outage(&mut w).await;
    etcd.restart(0).await;
    let mut c = etcd.client(0).await;
    put(&mut c, "/svc/b", "1").await;
    ends_with_0(&mut w, "key put while the wait was reconnecting").await;
}

#[tokio::test]
async fn a_timeout_while_etcd_is_away_says_what_was_last_read_and_why() {
    let mut etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let child = sidekick(&["wait", "/svc/a", "--endpoints", &eps, "--timeout", "3s"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    watching(&etcd, 0, 1.0).await;
    etcd.kill(0);
    let o = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8(o.stderr).unwrap();
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "sidekick: timed out after 3s: missing /svc/a as last read; since then: could not read the keys at {eps}: "
        )),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_dead_member_moves_the_wait_to_the_next_endpoint() {
    let mut etcd = Etcd::cluster(3).await;
    let eps = etcd.endpoints();
    let mut w = start_wait(&["/svc/a", "--timeout", "60s"], &eps);
    // The wait starts on the first endpoint.
    watching(&etcd, 0, 1.0).await;
    etcd.kill(0);
    let c = etcd.client(1).await;
    // Member 0 may have led the cluster: the put waits for a new leader.
    let written = eventually(ELECTION, || {
        let mut c = c.clone();
        async move { c.put("/svc/a", "1", None).await.is_ok() }
    })
    .await;
    assert!(written, "no leader after member 0 died");
    ends_with_0(&mut w, "key put through another member").await;
}

/// A watch, not polling: while a wait sits idle, etcd serves no reads.
#[tokio::test]
async fn an_idle_wait_reads_nothing_while_it_waits() {
    let etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let mut c = etcd.client(0).await;
    let mut keys = start_wait(&["/svc/a", "--timeout", "60s"], &eps);
    let mut prefix = start_wait(&["--prefix", "/svc/", "--count", "2", "--timeout", "60s"], &eps);
    watching(&etcd, 0, 2.0).await;
    let reads = metric(&etcd, 0, "etcd_debugging_mvcc_range_total");
    let_pass(IDLE).await;
    assert_eq!(
        metric(&etcd, 0, "etcd_debugging_mvcc_range_total"),
        reads,
        "reads while idle"
    );
    put(&mut c, "/svc/a", "1").await;
    ends_with_0(&mut keys, "the key wait, after its watch saw the put").await;
    put(&mut c, "/svc/b", "1").await;
    ends_with_0(&mut prefix, "the prefix wait, after its watch saw the puts").await;
}

/// Every bad flag exits 2 with one line naming the flag, and never opens
/// a connection to etcd.
#[tokio::test]
async fn bad_usage_exits_2_with_one_line_before_contacting_etcd() {
    // Stands in for etcd and records whether anyone connects.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let ep = format!("http://{}", listener.local_addr().unwrap());
    let cases: [(&[&str], &str); 11] = [
        (&[], "KEY"),
        (&["--gone"], "--prefix"),
        (&["/a", "--prefix", "/p/"], "--prefix"),
        (&["/a", "--count", "2"], "--count"),
        (&["--prefix", "/p/", "--count", "-1"], "--count"),
        (&["--prefix", "/p/", "--count=-1"], "--count"),
        (&["--prefix", "/p/", "--count", "many"], "--count"),
        (&["--prefix", ""], "--prefix"),
        (&["/a", "--timeout", "soon"], "--timeout"),
        (&["/a", "--timeout", "0s"], "--timeout"),
        (&["/a", "--dial-timeout", "x"], "--dial-timeout"),
    ];
    for (args, flag) in cases {
        let mut all = vec!["wait", "--endpoints", &ep];
        all.extend_from_slice(args);
        let (code, stdout, stderr) = out(&all);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: one line: {stderr}");
        assert!(
            stderr.starts_with("sidekick: ") && stderr.contains(flag),
            "{args:?} names {flag}: {stderr}"
        );
        assert!(stdout.is_empty(), "{args:?}");
        let contact = listener.accept();
        assert!(
            matches!(&contact, Err(e) if e.kind() == ErrorKind::WouldBlock),
            "{args:?} contacted etcd"
        );
    }
    // The check above can see a contact: valid flags do connect.
    let (code, _, _) = out(&[
        "wait",
        "/a",
        "--endpoints",
        &ep,
        "--timeout",
        "1s",
        "--dial-timeout",
        "500ms",
    ]);
    assert_eq!(code, Some(1));
    assert!(listener.accept().is_ok(), "a valid wait connects");
}
