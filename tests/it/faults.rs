//! Fault injection against real etcd on loopback: a frozen etcd, a restart
//! storm (brief and longer outages), a killed raft leader that was also the
//! first endpoint, bad first endpoints, and backends that
//! misbehave (flapping, slow, resetting, a 100 MiB body, a redirect loop), plus
//! a name that does not resolve. Every case checks that the sidekick stays up,
//! that the key ends right, that up/down transitions are what rise/fall allow,
//! and that the log says what happened once per event, not once per retry.
//!
//! Only processes this test binary started are signalled, by PID.

use std::cell::Cell;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::Client;

use crate::harness::bounds::*;
use crate::harness::*;

const KEY: &str = "/services/web/1";
const VALUE: &str = "10.0.0.5:8080";
const MIB: u64 = 1024 * 1024;
/// How long [`Mode::Slow`] waits before it answers: five times
/// `fast_run`'s `--timeout`, so every probe of it times out.
const SLOW: Duration = Duration::from_millis(500);

/// Log lines containing `pat`.
fn lines<'a>(log: &'a str, pat: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(pat)).collect()
}

/// Log lines that report an etcd failure as a warning (the first of a cause).
fn etcd_warnings(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains(" WARN ") && l.contains("; retrying"))
        .collect()
}

/// Every failed etcd attempt, logged (WARN) or not (DEBUG).
fn etcd_attempts_failed(log: &str) -> usize {
    lines(log, "; retrying").len()
}

/// (instance is up, instance is down) lines.
fn transitions(log: &str) -> (usize, usize) {
    (lines(log, "instance is up").len(), lines(log, "instance is down").len())
}

/// The key's value and lease when it exists and its lease is alive in etcd.
async fn live_key(c: &Client, key: &str) -> Option<(String, i64)> {
    let mut c = c.clone();
    let kv = c.get(key, None).await.ok()?.kvs().first().cloned()?;
    if kv.lease() == 0 {
        return None;
    }
    let ttl = c.lease_time_to_live(kv.lease(), None).await.ok()?.ttl();
    (ttl > 0).then(|| (kv.value_str().unwrap().to_string(), kv.lease()))
}

/// Waits until `key` holds VALUE under a live lease; returns the lease.
async fn live_key_within(c: &Client, key: &str, limit: Duration) -> Option<i64> {
    let found = Cell::new(None);
    eventually(limit, || async {
        let lease = live_key(c, key).await.filter(|(v, _)| v == VALUE).map(|(_, l)| l);
        found.set(lease);
        lease.is_some()
    })
    .await;
    found.get()
}

/// The PID of etcd member `i`: the child of this test process that serves
/// that member's client URL. Found in /proc, so that only our own etcd is
/// ever signalled.
fn etcd_pid(etcd: &Etcd, i: usize) -> u32 {
    let url = etcd.url(i);
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces, so split after ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid != Some(me) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let serves = args
            .windows(2)
            .any(|w| w[0] == b"--listen-client-urls" && w[1] == url.as_bytes());
        if serves {
            found.push(pid);
        }
    }
    assert_eq!(found.len(), 1, "exactly one etcd child serves {url}: {found:?}");
    found[0]
}

/// The index of the raft leader, asked of each of `members`, which must
/// agree on it.
async fn leader_among(etcd: &Etcd, members: &[usize]) -> usize {
    let mut leader_id = None;
    let mut ids = Vec::new();
    for &i in members {
        let mut c = etcd.client(i).await;
        let st = c.status().await.unwrap();
        ids.push((i, st.header().unwrap().member_id()));
        leader_id = leader_id.or(Some(st.leader()));
        assert_eq!(leader_id, Some(st.leader()), "members agree on the leader");
    }
    ids.iter()
        .find(|(_, id)| Some(*id) == leader_id)
        .map(|(i, _)| *i)
        .expect("the leader is one of them")
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// How the misbehaving backend answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Mode {
    /// 200 with a body containing "needle".
    Ok,
    /// 503.
    Fail,
    /// 200 and 503 in turn, request by request.
    Flap,
    /// Waits [`SLOW`], then 200.
    Slow,
    /// Reads one byte of the request and closes: the unread rest makes the
    /// kernel send a RST.
    Reset,
    /// 200 with `Content-Length: 104857600`, then zeros until the client
    /// closes.
    Huge,
    /// 302 to itself.
    Redirect,
}

impl Mode {
    fn from_u8(n: u8) -> Mode {
        [
            Mode::Ok,
            Mode::Fail,
            Mode::Flap,
            Mode::Slow,
            Mode::Reset,
            Mode::Huge,
            Mode::Redirect,
        ][n as usize]
    }
}

/// A plain std::net HTTP/1.1 server, a thread per connection, whose
/// behaviour the test switches. Every connection thread ends by itself
/// (read and write timeouts, a bounded body), at most 32 run at once, and
/// the accept loop ends when the server is dropped.
struct Bad {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    hits: Arc<AtomicU64>,
    /// The most bytes of body written on one connection.
    sent_max: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Bad {
    fn start(mode: Mode) -> Bad {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let b = Bad {
            addr,
            mode: Arc::new(AtomicU8::new(mode as u8)),
            hits: Arc::new(AtomicU64::new(0)),
            sent_max: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (mode, hits, sent_max, stop) = (b.mode.clone(), b.hits.clone(), b.sent_max.clone(), b.stop.clone());
        let live = Arc::new(AtomicUsize::new(0));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                if live.load(Ordering::SeqCst) >= 32 {
                    continue; // dropped: bounded, and the probe fails
                }
                let n = hits.fetch_add(1, Ordering::SeqCst);
                let m = Mode::from_u8(mode.load(Ordering::SeqCst));
                let (live, sent_max) = (live.clone(), sent_max.clone());
                live.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    answer(conn, m, n, addr, &sent_max);
                    live.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        b
    }

    fn url(&self) -> String {
        format!("http://{}/health", self.addr)
    }

    fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    fn sent_max(&self) -> u64 {
        self.sent_max.load(Ordering::SeqCst)
    }
}

impl Drop for Bad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

fn answer(mut conn: TcpStream, mode: Mode, n: u64, addr: SocketAddr, sent_max: &AtomicU64) {
    conn.set_read_timeout(Some(IO)).ok();
    conn.set_write_timeout(Some(IO)).ok();
    if mode == Mode::Reset {
        let _ = conn.read(&mut [0u8; 1]);
        return;
    }
    let mut buf = [0u8; 4096];
    let mut seen = Vec::new();
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") && seen.len() < 16 * 1024 {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(k) => seen.extend_from_slice(&buf[..k]),
        }
    }
    let simple = |status: &str, extra: &str, body: &str| {
        format!(
            "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let ok = simple("200 OK", "", "ok: needle\n");
    let fail = simple("503 Service Unavailable", "", "down\n");
    let resp = match mode {
        Mode::Ok => ok,
        Mode::Fail => fail,
        Mode::Flap if n.is_multiple_of(2) => ok,
        Mode::Flap => fail,
        Mode::Slow => {
            std::thread::sleep(SLOW);
            ok
        }
        Mode::Redirect => simple("302 Found", &format!("Location: http://{addr}/health\r\n"), ""),
        Mode::Huge => {
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                100 * MIB
            );
            if conn.write_all(head.as_bytes()).is_err() {
                return;
            }
            let zeros = vec![0u8; 64 * 1024];
            let mut sent = 0u64;
            // Stops when the client closes (or stalls for the write timeout).
            while sent < 100 * MIB && conn.write_all(&zeros).is_ok() {
                sent += zeros.len() as u64;
            }
            sent_max.fetch_max(sent, Ordering::SeqCst);
            return;
        }
        Mode::Reset => unreachable!(),
    };
    let _ = conn.write_all(resp.as_bytes());
}

// ---------------------------------------------------------------- etcd faults

#[tokio::test]
async fn etcd_frozen_longer_than_the_ttl_then_resumed() {
    let (etcd, backend, mut sk, c) = registered(KEY, VALUE, "1", "1").await;
    let f = sk.figures();
    let first = live_key(&c, KEY).await.map(|(_, lease)| lease);
    assert!(first.is_some(), "registered: {}", sk.log());

    let pid = etcd_pid(&etcd, 0);
    // The scenario: 5 s with a 2 s TTL and a 1 s dial timeout: the lease expires in etcd,
    // and the sidekick's keep-alive fails three or four times in a row.
    signal(pid, "STOP");
    let frozen_at = Instant::now();
    let hits = backend.hits();
    let_pass(f.long_outage()).await;
    // Still frozen: the failed keep-alives and (of the 25 due) 15 probes
    // have come by now, or come on a slow machine.
    let failed_while_frozen = sk.logs_n("; retrying", 3, f.etcd_attempts(3)).await;
    eventually(f.probes(15), || async { backend.hits() >= hits + 15 }).await;
    let alive = sk.alive();
    let probes = backend.hits() - hits;
    signal(pid, "CONT");
    let resumed = Instant::now();
    assert!(alive, "must not exit while etcd is frozen: {}", sk.log());
    assert!(
        probes >= 15,
        "kept probing while etcd was frozen: {probes} probes in {:?}",
        resumed - frozen_at
    );
    assert!(failed_while_frozen, "keep-alives failed while frozen: {}", sk.log());

    let c = etcd.client(0).await;
    let lease = live_key_within(&c, KEY, f.etcd_back()).await;
    assert!(
        lease.is_some(),
        "back under a live lease after the resume: {}",
        sk.log()
    );
    let back_after = resumed.elapsed();
    // The scenario: longer than a TTL later it is still there, the lease
    // kept alive.
    let_pass(f.past_ttl()).await;
    assert!(live_key(&c, KEY).await.is_some(), "still registered: {}", sk.log());
    assert!(sk.alive(), "{}", sk.log());

    let log = sk.log();
    assert_eq!(
        transitions(&log),
        (1, 0),
        "etcd trouble is no instance transition: {log}"
    );
    let warns = etcd_warnings(&log);
    let failed = etcd_attempts_failed(&log);
    assert!(!warns.is_empty(), "the freeze is reported: {log}");
    // The same cause again and again ("no answer within 1s"), perhaps after
    // a closed stream first: at most two lines for three or more retries.
    assert!(
        failed >= 3,
        "each keep-alive waits the 1s dial timeout: {failed} failed attempts\n{log}"
    );
    assert!(
        warns.len() <= 2,
        "one line per distinct cause, not one per retry ({failed} failed attempts): {warns:#?}"
    );
    assert!(sk.logs("etcd answers again", SOON).await, "{log}");
    eprintln!(
        "frozen: key back {back_after:?} after the resume, lease {} -> {}, {} warnings / {} failed attempts",
        first.unwrap(),
        lease.unwrap(),
        warns.len(),
        etcd_attempts_failed(&log)
    );
}

/// etcd stopped and started ten times in a row: mostly for a moment (a
/// restart storm), every third time for longer than the TTL. etcd keeps
/// leases across a restart and extends them once it leads again, so the key
/// must stay under its first lease, never rewritten, while the sidekick
/// keeps probing at its own pace and reports each outage in a few lines.
#[tokio::test]
async fn etcd_restarted_ten_times_in_a_row() {
    let (mut etcd, backend, mut sk, mut c) = registered(KEY, VALUE, "1", "1").await;
    let f = sk.figures();
    let interval = f.interval().as_secs_f64();
    let first = get(&mut c, KEY).await.unwrap();

    let start = Instant::now();
    let hits = backend.hits();
    let mut min_rate = f64::MAX;
    for round in 0..10 {
        let (t, h) = (Instant::now(), backend.hits());
        etcd.stop(0);
        // The scenario: away for a moment (an interval), or for longer
        // than the 2 s TTL; the sidekick must not exit meanwhile.
        let away = if round % 3 == 2 { f.past_ttl() } else { f.intervals(1) };
        let_pass(away).await;
        assert!(sk.alive(), "round {round}: {}", sk.log());
        etcd.restart(0).await;
        let c = etcd.client(0).await;
        assert_eq!(
            live_key_within(&c, KEY, f.etcd_back()).await,
            Some(first.lease()),
            "round {round}: back under the first lease: {}",
            sk.log()
        );
        // The scenario: up for a moment (two intervals) before the next
        // outage, in which the key stays under its first lease.
        let_pass(f.intervals(2)).await;
        let rate = (backend.hits() - h) as f64 / (t.elapsed().as_secs_f64() / interval);
        min_rate = min_rate.min(rate);
        assert!(
            rate >= 0.5,
            "round {round}: probing stalled, {:.0}% of the probes due",
            rate * 100.0
        );
    }
    let elapsed = start.elapsed();
    let probes = backend.hits() - hits;
    let due = elapsed.as_secs_f64() / interval;
    assert!(
        probes as f64 >= 0.6 * due,
        "probing never waits on etcd: {probes} probes in {elapsed:?} ({due:.0} due)"
    );

    // The scenario: longer than a TTL after the last restart, the key is
    // still there, kept alive, and was never written again.
    let_pass(f.past_ttl()).await;
    let mut c = etcd.client(0).await;
    let last = get(&mut c, KEY).await.expect("registered after the last restart");
    assert_eq!(
        (last.lease(), last.mod_revision()),
        (first.lease(), first.mod_revision()),
        "same lease, never rewritten: {}",
        sk.log()
    );
    assert!(live_key(&c, KEY).await.is_some(), "lease kept alive: {}", sk.log());
    assert!(sk.alive(), "{}", sk.log());
    let log = sk.log();
    assert_eq!(transitions(&log), (1, 0), "{log}");
    assert!(!log.contains("lease expired or was lost"), "{log}");
    let warns = etcd_warnings(&log);
    let failed = etcd_attempts_failed(&log);
    // Each outage shows a few distinct causes (the keep-alive stream closed,
    // a refused connection, an etcd not ready within the dial timeout), and
    // each is a new event once etcd has answered in between: at most three
    // lines per outage, and each outage ends in one "answers again".
    assert!(
        warns.len() <= 30,
        "at most three lines per outage: {} warnings, {failed} failed attempts: {warns:#?}",
        warns.len()
    );
    assert!(lines(&log, "etcd answers again").len() <= 10, "{log}");
    eprintln!(
        "restarts: {probes} probes in {elapsed:?} ({due:.0} due, worst round {:.0}%), {} warnings / {failed} failed \
         attempts, lease {} kept",
        min_rate * 100.0,
        warns.len(),
        first.lease()
    );
}

/// A three-member cluster loses the member that leads it and is also the
/// sidekick's first endpoint, the one it talks to. The key must stay under
/// the same lease, never rewritten (the new leader extends every lease),
/// kept alive through the survivors for longer than a TTL, and withdrawal
/// must still work through them.
#[tokio::test]
async fn cluster_leader_at_the_first_endpoint_killed() {
    let mut etcd = Etcd::cluster(3).await;
    let lead = leader_among(&etcd, &[0, 1, 2]).await;
    let survivors: Vec<usize> = (0..3).filter(|&i| i != lead).collect();
    let eps = [lead, survivors[0], survivors[1]].map(|i| etcd.url(i)).join(",");
    let backend = Backend::start();
    let url = backend.url();
    let (mut sk, _) = start_registered(&etcd, &fast_run(KEY, VALUE, &url, &eps, "1", "1")).await;
    let f = sk.figures();
    // The key can be seen in etcd a moment before the line is logged.
    assert!(sk.logs("registered", SOON).await, "{}", sk.log());
    let registered = lines(&sk.log(), "registered").concat();
    assert!(
        registered.contains(&etcd.url(lead)),
        "registered through the leader: {registered}"
    );
    let mut c = etcd.client(survivors[0]).await;
    let before = get(&mut c, KEY).await.unwrap();

    etcd.kill(lead);
    // A new leader is elected within a few election timeouts.
    let new_lead = eventually(ELECTION, || async {
        let mut c = c.clone();
        matches!(tokio::time::timeout(ETCD_PING, c.status()).await, Ok(Ok(st)) if st.leader() != 0)
    })
    .await;
    assert!(new_lead, "no new leader among {survivors:?}");
    // The scenario: longer than a TTL on the survivors alone.
    let_pass(f.past_ttl()).await;
    let after = get(&mut c, KEY).await.expect("key kept while the leader is gone");
    assert_eq!(
        (after.lease(), after.mod_revision()),
        (before.lease(), before.mod_revision()),
        "same lease, not rewritten: {}",
        sk.log()
    );
    assert!(
        live_key(&c, KEY).await.is_some(),
        "kept alive through the survivors: {}",
        sk.log()
    );
    assert!(sk.alive(), "{}", sk.log());
    let new_lead = leader_among(&etcd, &survivors).await;
    assert_ne!(new_lead, lead);

    // Withdrawal still works through the survivors.
    backend.set_healthy(false);
    assert!(key_becomes(&c, KEY, None, f.withdrawal()).await, "{}", sk.log());
    // The key can be gone a moment before the line is logged.
    assert!(sk.logs("withdrawn: lease revoked", SOON).await, "{}", sk.log());
    let log = sk.log();
    assert_eq!(transitions(&log), (1, 1), "{log}");
    // Each failed attempt moves to the next endpoint, so the causes
    // alternate (refused by the dead member, no answer from a follower
    // during the election) and each is a line; the election bounds them.
    let warns = etcd_warnings(&log);
    assert!(
        warns.len() <= 6,
        "{} warnings, {} failed attempts: {warns:#?}",
        warns.len(),
        etcd_attempts_failed(&log)
    );
    eprintln!(
        "leader {lead} killed, new leader {new_lead}: lease {} kept, {} warnings / {} failed attempts",
        before.lease(),
        warns.len(),
        etcd_attempts_failed(&log)
    );
}

/// A sidekick whose first endpoint is `bad` registers and withdraws through
/// the second one, and complains about the first once.
async fn first_endpoint_bad(bad: &str, max_warnings: usize) {
    let etcd = Etcd::start().await;
    let backend = Backend::start();
    let url = backend.url();
    let eps = format!("{bad},{}", etcd.url(0));
    let (mut sk, c) = start_registered(&etcd, &fast_run(KEY, VALUE, &url, &eps, "1", "1")).await;
    let f = sk.figures();
    // The scenario: steady for a while (three keep-alives), in which the
    // bad endpoint is not tried again.
    let_pass(f.keepalives(3)).await;
    backend.set_healthy(false);
    assert!(
        key_becomes(&c, KEY, None, f.withdrawal()).await,
        "withdrawn: {}",
        sk.log()
    );
    assert!(sk.alive(), "{}", sk.log());
    // The key can be gone a moment before the line is logged.
    assert!(sk.logs("withdrawn: lease revoked", SOON).await, "{}", sk.log());

    let log = sk.log();
    let real = etcd.url(0);
    let registered = lines(&log, "registered");
    assert!(
        registered.len() == 1 && registered[0].contains(&real),
        "registered once, through {real}: {log}"
    );
    assert!(lines(&log, "withdrawn: lease revoked").len() == 1, "{log}");
    assert_eq!(transitions(&log), (1, 1), "{log}");
    let warns = etcd_warnings(&log);
    assert!(
        !warns.is_empty() && warns.iter().all(|l| l.contains(bad)),
        "the bad endpoint is named: {warns:#?}"
    );
    assert!(warns.len() <= max_warnings, "{warns:#?}");
    assert!(
        warns.iter().all(|l| l.contains("could not grant a lease")),
        "only the first grant went to the bad endpoint; the revoke did not: {warns:#?}"
    );
    eprintln!("first endpoint {bad}: {warns:#?}");
}

#[tokio::test]
async fn first_endpoint_refuses_connections() {
    first_endpoint_bad(&format!("http://127.0.0.1:{}", free_port()), 1).await;
}

#[tokio::test]
async fn first_endpoint_speaks_plain_http1() {
    let http1 = Backend::start();
    first_endpoint_bad(&format!("http://{}", http1.addr), 1).await;
}

// ------------------------------------------------------------ backend faults

#[tokio::test]
async fn flapping_every_probe_with_rise_2_fall_2_never_transitions() {
    // Results alternate request by request, and every probe is exactly one
    // request on a fresh connection: whatever the jitter, no two successive
    // probes agree, so rise 2 / fall 2 allow no transition while it flaps.
    // The timeout is generous so that a slow machine does not turn a
    // success into a failure.
    let etcd = Etcd::start().await;
    let bad = Bad::start(Mode::Ok);
    let (url, eps) = (bad.url(), etcd.endpoints());
    let args = fast_run(KEY, VALUE, &url, &eps, "2", "2")
        .with("--interval", "300ms")
        .with("--timeout", "250ms");
    let (mut sk, mut c) = start_registered(&etcd, &args).await;
    let f = sk.figures();
    let before = get(&mut c, KEY).await.unwrap();

    let flap = |n: u32| {
        let (bad, limit) = (&bad, f.probes(n));
        async move {
            let h = bad.hits();
            bad.set(Mode::Flap);
            let done = eventually(limit, || async { bad.hits() >= h + u64::from(n) }).await;
            assert!(done, "{n} flapping probes");
        }
    };

    // Up, then flapping: the key stays, untouched.
    flap(16).await;
    bad.set(Mode::Ok);
    let after = get(&mut c, KEY).await.expect("kept while flapping");
    assert_eq!(
        (after.create_revision(), after.mod_revision(), after.lease()),
        (before.create_revision(), before.mod_revision(), before.lease()),
        "never withdrawn or rewritten: {}",
        sk.log()
    );
    let log = sk.log();
    assert_eq!(transitions(&log), (1, 0), "{log}");
    let single = lines(&log, "probe failed (1 of 2 before withdrawal)").len();
    assert!(single >= 6, "the single failures are logged: {single}\n{log}");
    assert!(lines(&log, "timed out").is_empty(), "no probe timed out: {log}");

    // Down, then flapping: the key stays away.
    bad.set(Mode::Fail);
    assert!(key_becomes(&c, KEY, None, f.withdrawal()).await, "{}", sk.log());
    flap(16).await;
    assert!(
        get(&mut c, KEY).await.is_none(),
        "not registered while flapping: {}",
        sk.log()
    );
    assert_eq!(transitions(&sk.log()), (1, 1), "{}", sk.log());

    // Steady again: registered after two successes.
    bad.set(Mode::Ok);
    assert!(
        live_key_within(&c, KEY, f.reregistration()).await.is_some(),
        "{}",
        sk.log()
    );
    assert!(sk.alive(), "{}", sk.log());
    let log = sk.log();
    assert_eq!(transitions(&log), (2, 1), "{log}");
    assert!(lines(&log, "timed out").is_empty(), "no probe timed out: {log}");
}

/// Registered, then `mode` until the key is gone, then healthy again.
/// Returns the log line of the withdrawal.
async fn fails_then_recovers(mode: Mode) -> String {
    let etcd = Etcd::start().await;
    let bad = Bad::start(Mode::Ok);
    let (url, eps) = (bad.url(), etcd.endpoints());
    let (mut sk, c) = start_registered(&etcd, &fast_run(KEY, VALUE, &url, &eps, "1", "1")).await;
    let f = sk.figures();

    bad.set(mode);
    assert!(
        key_becomes(&c, KEY, None, f.withdrawal()).await,
        "{mode:?} withdraws: {}",
        sk.log()
    );
    // Probing goes on while it fails: the sidekick does not hang on it.
    let h = bad.hits();
    assert!(
        eventually(f.probes(5), || async { bad.hits() >= h + 5 }).await,
        "still probing: {}",
        sk.log()
    );
    assert!(sk.alive(), "{}", sk.log());
    bad.set(Mode::Ok);
    assert!(
        live_key_within(&c, KEY, f.reregistration()).await.is_some(),
        "back after recovery: {}",
        sk.log()
    );
    assert!(sk.alive(), "{}", sk.log());
    let log = sk.log();
    assert_eq!(transitions(&log), (2, 1), "{log}");
    assert!(etcd_warnings(&log).is_empty(), "etcd was fine: {log}");
    lines(&log, "instance is down")[0].to_string()
}

#[tokio::test]
async fn slow_answers_past_the_timeout_withdraw_then_recover() {
    let down = fails_then_recovers(Mode::Slow).await;
    assert!(down.contains("timed out"), "{down}");
}

#[tokio::test]
async fn connection_resets_withdraw_then_recover() {
    let down = fails_then_recovers(Mode::Reset).await;
    assert!(down.contains("unhealthy:"), "{down}");
    assert!(!down.contains("timed out"), "a reset fails at once: {down}");
}

/// Samples the sidekick's resident memory while `bad` serves `n` more
/// probes (its [`Figures::probes`] at most); returns the peak and how many
/// probes there were.
async fn peak_rss(sk: &Running, bad: &Bad, n: u64) -> (u64, u64) {
    let (h, peak) = (bad.hits(), Cell::new(0));
    eventually(sk.figures().probes(n as u32), || {
        peak.set(peak.get().max(rss(sk.pid())));
        async { bad.hits() >= h + n }
    })
    .await;
    (peak.get(), bad.hits() - h)
}

#[tokio::test]
async fn a_100_mib_body_without_the_needle_fails_in_bounded_memory() {
    let etcd = Etcd::start().await;
    let bad = Bad::start(Mode::Ok);
    let (url, eps) = (bad.url(), etcd.endpoints());
    let args = fast_run(KEY, VALUE, &url, &eps, "1", "1").with("--expect-body", "needle");
    let (mut sk, c) = start_registered(&etcd, &args).await;

    bad.set(Mode::Huge);
    assert!(
        key_becomes(&c, KEY, None, sk.figures().withdrawal()).await,
        "{}",
        sk.log()
    );
    let (peak, probes) = peak_rss(&sk, &bad, 10).await;
    assert!(probes >= 10, "not hung on the body: {probes} probes");
    assert!(sk.alive(), "{}", sk.log());
    assert!(peak < 64 * MIB, "RSS {} MiB", peak / MIB);
    let sent = bad.sent_max();
    assert!(sent < 50 * MIB, "the client stopped reading: {} MiB sent", sent / MIB);

    let log = sk.log();
    assert_eq!(transitions(&log), (1, 1), "{log}");
    let down = lines(&log, "instance is down")[0];
    assert!(down.contains("body lacks \"needle\" in its first 64 KiB"), "{down}");
    eprintln!(
        "huge body, expect-body: peak RSS {} KiB, at most {} KiB sent",
        peak / 1024,
        sent / 1024
    );
}

#[tokio::test]
async fn a_100_mib_body_is_healthy_by_status_alone_in_bounded_memory() {
    let etcd = Etcd::start().await;
    let bad = Bad::start(Mode::Huge);
    let (url, eps) = (bad.url(), etcd.endpoints());
    let (mut sk, c) = start_registered(&etcd, &fast_run(KEY, VALUE, &url, &eps, "1", "1")).await;
    let (peak, probes) = peak_rss(&sk, &bad, 10).await;
    assert!(probes >= 10, "not hung on the body: {probes} probes");
    assert!(live_key(&c, KEY).await.is_some(), "{}", sk.log());
    assert!(sk.alive(), "{}", sk.log());
    assert!(peak < 64 * MIB, "RSS {} MiB", peak / MIB);
    let sent = bad.sent_max();
    assert!(sent < 50 * MIB, "the body is not read: {} MiB sent", sent / MIB);
    let log = sk.log();
    assert_eq!(transitions(&log), (1, 0), "{log}");
    assert!(lines(&log, "instance is up")[0].contains("HTTP 200"), "{log}");
    eprintln!(
        "huge body, status only: peak RSS {} KiB, at most {} KiB sent",
        peak / 1024,
        sent / 1024
    );
}

#[tokio::test]
async fn a_redirect_loop_is_judged_not_followed() {
    let etcd = Etcd::start().await;
    let bad = Bad::start(Mode::Redirect);
    let (url, eps) = (bad.url(), etcd.endpoints());

    // One-shot: 302 is in the default 200-399, and not in 200.
    let out = output_within(sidekick(&["check", "--http", &url]), HANG).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.starts_with("healthy: HTTP 302") && stdout.lines().count() == 1,
        "{stdout}"
    );
    let out = output_within(sidekick(&["check", "--http", &url, "--expect-status", "200"]), HANG).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.starts_with("unhealthy: HTTP 302 is not an expected status") && stdout.lines().count() == 1,
        "{stdout}"
    );

    // Long-running, side by side: the default registers, 200 never does.
    let strict = fast_run("/services/web/2", VALUE, &url, &eps, "1", "1").with("--expect-status", "200");
    let mut no = Running::start(&strict);
    let (mut yes, c) = start_registered(&etcd, &fast_run(KEY, VALUE, &url, &eps, "1", "1")).await;
    let f = yes.figures();
    assert!(no.logs("instance is down", f.probes(1)).await, "{}", no.log());
    let (h, counting) = (bad.hits(), Instant::now());
    // The scenario: a window of ten intervals in which the requests are
    // counted.
    let_pass(f.intervals(10)).await;
    let requests = bad.hits() - h;
    let window = counting.elapsed().as_secs_f64();
    // Two sidekicks probing every 180-200 ms: about 20 requests in 2 s,
    // at most one per probe and one more at each edge of the window;
    // following the loop would cost up to ten times that.
    let due = 2.0 * window / f.interval().as_secs_f64();
    let most = 2 * ((window / f.probe_every_least.unwrap().as_secs_f64()).floor() as u64 + 2);
    assert!(
        (due / 2.0) as u64 <= requests && requests <= most,
        "one request per probe, redirects not followed: {requests} in {window:.1}s"
    );
    assert!(live_key(&c, KEY).await.is_some(), "{}", yes.log());
    let mut c2 = c.clone();
    assert!(get(&mut c2, "/services/web/2").await.is_none(), "{}", no.log());
    assert!(yes.alive() && no.alive());
    assert_eq!(transitions(&yes.log()), (1, 0), "{}", yes.log());
    let log = no.log();
    assert_eq!(transitions(&log), (0, 1), "{log}");
    assert!(
        lines(&log, "instance is down")[0].contains("HTTP 302 is not an expected status"),
        "{log}"
    );
    assert!(!log.contains("grant"), "etcd is never contacted: {log}");
}

#[tokio::test]
async fn a_name_that_does_not_resolve_fails_at_once() {
    // No DNS query may leave this machine: the sidekick runs in a new network
    // namespace with only loopback, where the resolver has no route.
    let bin = env!("CARGO_BIN_EXE_sidekick");
    let env = sidekick(&[]);
    for (target, args) in [
        ("no-such-host.invalid", ["--http", "http://no-such-host.invalid/"]),
        ("no-such-host.invalid:80", ["--tcp", "no-such-host.invalid:80"]),
    ] {
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--net",
            "sh",
            "-c",
            r#"ip link set lo up || exit 99; exec "$0" "$@""#,
            bin,
            "check",
        ])
        .args(args);
        cmd.env_clear();
        for (k, v) in env.get_envs() {
            if let Some(v) = v {
                cmd.env(k, v);
            }
        }
        for k in ["PATH", "HOME"] {
            if let Ok(v) = std::env::var(k) {
                cmd.env(k, v);
            }
        }
        let started = Instant::now();
        let out = output_within(cmd, HANG).await;
        let took = started.elapsed();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            out.status.code() != Some(99) && !stderr.contains("unshare:"),
            "this test needs `unshare --net` and `ip` (root, util-linux, iproute2): {:?} {stderr}",
            out.status
        );
        assert_eq!(out.status.code(), Some(1), "stdout {stdout:?} stderr {stderr:?}");
        assert_eq!(stdout.lines().count(), 1, "one line: {stdout:?}");
        let line = stdout.trim_end();
        assert!(line.starts_with("unhealthy: "), "{line}");
        let lower = line.to_lowercase();
        assert!(
            ["dns", "resolve", "lookup", "name or service"]
                .iter()
                .any(|w| lower.contains(w)),
            "says the name did not resolve: {line}"
        );
        assert!(took < one_shot_within(Duration::ZERO), "{target}: took {took:?}");
        eprintln!("{target}: {line} ({took:?})");
    }
}
