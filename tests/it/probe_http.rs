//! The HTTP probe against raw-socket servers that send exactly the bytes a
//! case needs: interim responses, many header fields, chunked and
//! close-delimited bodies, IPv6, huge and slow answers.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::bounds::*;
use crate::harness::*;

const MIB: u64 = 1024 * 1024;
/// The pause of a server between two writes it wants read apart.
const APART: Duration = Duration::from_millis(100);

/// A server on `bind` that reads each request head, keeps it, and lets
/// `answer` write the response; it stops after `conns` connections.
struct Raw {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    /// Bytes `answer` reported as sent, summed over connections.
    sent: Arc<AtomicU64>,
}

impl Raw {
    fn start<F>(bind: &str, conns: usize, answer: F) -> Raw
    where
        F: Fn(&mut TcpStream, &AtomicU64) + Send + 'static,
    {
        let listener = TcpListener::bind(bind).unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let sent = Arc::new(AtomicU64::new(0));
        let (h, s) = (heads.clone(), sent.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().take(conns) {
                let Ok(mut conn) = conn else { continue };
                conn.set_read_timeout(Some(IO)).unwrap();
                conn.set_write_timeout(Some(IO)).unwrap();
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 * 1024 {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                h.lock().unwrap().push(String::from_utf8_lossy(&head).into_owned());
                answer(&mut conn, &s);
            }
        });
        Raw { addr, heads, sent }
    }

    /// Serves the same bytes to every connection.
    fn fixed(conns: usize, response: impl Into<Vec<u8>>) -> Raw {
        let response = response.into();
        Raw::start("127.0.0.1:0", conns, move |c, _| {
            let _ = c.write_all(&response);
        })
    }

    fn url(&self, rest: &str) -> String {
        format!("http://{}{rest}", self.addr)
    }

    /// The request heads read so far.
    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

/// `sidekick check ARGS`: exit code, stdout and how long it took; fails the
/// test if it does not end within [`HANG`].
fn check(args: &[&str]) -> (Option<i32>, String, Duration) {
    let mut all = vec!["check"];
    all.extend_from_slice(args);
    let started = Instant::now();
    let mut child = sidekick(&all)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > HANG {
            let _ = child.kill();
            panic!("sidekick check {args:?} did not end within {HANG:?}");
        }
        std::thread::sleep(SAMPLE);
    }
    let took = started.elapsed();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(stdout.lines().count(), 1, "one line: {stdout:?}");
    (out.status.code(), stdout, took)
}

// Regression: the status of a `103 Early Hints` was judged as the answer.
#[test]
fn interim_1xx_responses_are_skipped() {
    let srv = Raw::fixed(
        2,
        "HTTP/1.1 100 Continue\r\n\r\n\
         HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload; as=style\r\n\r\n\
         HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\nstatus ok",
    );
    let url = srv.url("/");
    let (code, out, _) = check(&["--http", &url, "--expect-status", "200", "--expect-body", "ok"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.starts_with("healthy: HTTP 200, body matched in "), "{out}");
    let (code, out, _) = check(&["--http", &url, "--expect-status", "100-199"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.starts_with("unhealthy: HTTP 200 is not an expected status"),
        "{out}"
    );
}

/// The response head with `n` header fields in all.
fn head_with_fields(n: usize) -> String {
    let mut head = String::from("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n");
    for i in 1..n {
        head.push_str(&format!("X-Field-{i}: value {i}\r\n"));
    }
    head + "\r\nok"
}

// Regression: more than 64 header fields were a malformed response.
#[test]
fn a_response_with_100_header_fields_is_accepted() {
    let srv = Raw::fixed(1, head_with_fields(100));
    let (code, out, _) = check(&["--http", &srv.url("/"), "--expect-body", "ok"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.starts_with("healthy: HTTP 200, body matched"), "{out}");
    // The limit is 100 in all, as documented.
    let srv = Raw::fixed(1, head_with_fields(101));
    let (code, out, _) = check(&["--http", &srv.url("/")]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.starts_with("unhealthy: "), "{out}");
}

// Regression: `http://h:8080?ready` sent `GET ?ready HTTP/1.1`.
#[test]
fn a_url_without_a_path_requests_slash_and_its_query() {
    let srv = Raw::fixed(2, "HTTP/1.1 204 No Content\r\n\r\n");
    let (code, out, _) = check(&["--http", &srv.url("?ready")]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out, _) = check(&["--http", &srv.url("")]);
    assert_eq!(code, Some(0), "{out}");
    let heads = srv.heads();
    assert!(heads[0].starts_with("GET /?ready HTTP/1.1\r\n"), "{heads:?}");
    assert!(heads[1].starts_with("GET / HTTP/1.1\r\n"), "{heads:?}");
}

#[test]
fn the_request_names_the_host_and_closes_the_connection() {
    let srv = Raw::fixed(2, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    let url = srv.url("/health?full=1");
    let (code, out, _) = check(&["--http", &url, "--header", "X-Probe: 1"]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out, _) = check(&["--http", &url, "--header", "Host: web.example", "--method", "HEAD"]);
    assert_eq!(code, Some(0), "{out}");
    let heads: Vec<String> = srv.heads().iter().map(|h| h.to_ascii_lowercase()).collect();
    let hosts = |h: &str| {
        h.lines()
            .filter(|l| l.starts_with("host:"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert!(heads[0].starts_with("get /health?full=1 http/1.1\r\n"), "{heads:?}");
    assert_eq!(hosts(&heads[0]), [format!("host: {}", srv.addr)], "{heads:?}");
    assert!(heads[0].contains("\r\nx-probe: 1\r\n"), "{heads:?}");
    assert!(heads[0].contains("\r\nconnection: close\r\n"), "{heads:?}");
    // The override replaces the URL's authority, once.
    assert!(heads[1].starts_with("head /health?full=1 http/1.1\r\n"), "{heads:?}");
    assert_eq!(hosts(&heads[1]), ["host: web.example"], "{heads:?}");
    assert!(heads[1].contains("\r\nconnection: close\r\n"), "{heads:?}");
}

#[test]
fn a_chunked_body_matches_across_chunk_boundaries() {
    // The needle is split over two chunks, sent apart so that they arrive
    // in separate reads.
    let srv = Raw::start("127.0.0.1:0", 2, |c, _| {
        let _ = c.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\nstate: \r\n4\r\nread\r\n");
        let _ = c.flush();
        std::thread::sleep(APART);
        let _ = c.write_all(b"1\r\ny\r\n0\r\n\r\n");
    });
    let url = srv.url("/");
    let (code, out, _) = check(&["--http", &url, "--expect-body", "state: ready"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.starts_with("healthy: HTTP 200, body matched"), "{out}");
    let (code, out, _) = check(&["--http", &url, "--expect-body", "state: readyy"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.starts_with("unhealthy: HTTP 200, body lacks \"state: readyy\" in its first 64 KiB"),
        "{out}"
    );
}

#[test]
fn an_http_1_0_body_ends_when_the_connection_closes() {
    let srv = Raw::start("127.0.0.1:0", 2, |c, _| {
        let _ = c.write_all(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nwarming up\n");
        let _ = c.flush();
        std::thread::sleep(APART);
        let _ = c.write_all(b"ready\n");
        // Dropping the connection ends the body.
    });
    let url = srv.url("/");
    let (code, out, _) = check(&["--http", &url, "--expect-body", "ready"]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out, _) = check(&["--http", &url, "--expect-body", "steady"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("body lacks \"steady\""), "{out}");
}

#[test]
fn an_ipv6_literal_is_connected_to_and_named_in_brackets() {
    let srv = Raw::start("[::1]:0", 1, |c, _| {
        let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    });
    let url = format!("http://[::1]:{}/", srv.addr.port());
    let (code, out, _) = check(&["--http", &url]);
    assert_eq!(code, Some(0), "{out}");
    let head = srv.heads()[0].to_ascii_lowercase();
    assert!(
        head.contains(&format!("\r\nhost: [::1]:{}\r\n", srv.addr.port())),
        "{head}"
    );
}

/// Sends a 200 with a 100 MiB body: `prefix`, then zeros, until the client
/// goes away; adds what it sent to the total.
fn huge(c: &mut TcpStream, sent: &AtomicU64, prefix: &[u8]) {
    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", 100 * MIB);
    if c.write_all(head.as_bytes()).and_then(|_| c.write_all(prefix)).is_err() {
        return;
    }
    let zeros = vec![b'0'; 64 * 1024];
    let mut n = prefix.len() as u64;
    while n < 100 * MIB && c.write_all(&zeros).is_ok() {
        n += zeros.len() as u64;
    }
    sent.fetch_add(n, Ordering::SeqCst);
}

#[test]
fn a_100_mib_body_is_judged_within_the_64_kib_cap() {
    let needle_at = |offset: usize| [vec![b'x'; offset], b"needle".to_vec()].concat();
    let cases: [(Vec<u8>, &[&str], i32, &str); 5] = [
        // (what the body starts with, extra flags, exit code, stdout starts with)
        (vec![], &[], 0, "healthy: HTTP 200 in "),
        (
            vec![],
            &["--expect-body", "needle"],
            1,
            "unhealthy: HTTP 200, body lacks \"needle\" in its first 64 KiB",
        ),
        (
            needle_at(8),
            &["--expect-body", "needle"],
            0,
            "healthy: HTTP 200, body matched",
        ),
        // The needle ends at exactly 64 KiB: found.
        (
            needle_at(64 * 1024 - 6),
            &["--expect-body", "needle"],
            0,
            "healthy: HTTP 200, body matched",
        ),
        // One byte later it is past the cap.
        (
            needle_at(64 * 1024 - 5),
            &["--expect-body", "needle"],
            1,
            "unhealthy: HTTP 200, body lacks",
        ),
    ];
    for (prefix, flags, want_code, want_out) in cases {
        let at = prefix.len();
        let srv = Raw::start("127.0.0.1:0", 1, move |c, sent| huge(c, sent, &prefix));
        let url = srv.url("/");
        let mut args = vec!["--http", &url, "--timeout", "5s"];
        args.extend_from_slice(flags);
        let (code, out, took) = check(&args);
        assert_eq!(code, Some(want_code), "{flags:?} {at}: {out}");
        assert!(out.starts_with(want_out), "{flags:?} {at}: {out}");
        assert!(!out.contains("timed out"), "not read to the end: {out} after {took:?}");
        // The server's writes end once the probe has closed the connection.
        assert!(
            eventually_sync(SOON, || srv.sent.load(Ordering::SeqCst) > 0),
            "the server saw the connection close"
        );
        let sent = srv.sent.load(Ordering::SeqCst);
        // Socket buffers take a few MiB; reading the whole body would take 100.
        assert!(
            sent < 32 * MIB,
            "{flags:?} {at}: {} MiB sent before the probe let go",
            sent / MIB
        );
    }
}

#[test]
fn slow_headers_fail_at_the_timeout() {
    // The status line comes at once, the rest of the head only after twice
    // the time the check may take.
    let timeout = "300ms";
    let bound = one_shot_within(flag(timeout));
    let srv = Raw::start("127.0.0.1:0", 1, move |c, _| {
        let _ = c.write_all(b"HTTP/1.1 200 OK\r\n");
        let _ = c.flush();
        std::thread::sleep(2 * bound);
        let _ = c.write_all(b"Content-Length: 2\r\n\r\nok");
    });
    let (code, out, took) = check(&["--http", &srv.url("/"), "--timeout", timeout]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.starts_with("unhealthy: timed out after 300ms"), "{out}");
    assert!(took < bound, "bounded by --timeout: {took:?}");
}
