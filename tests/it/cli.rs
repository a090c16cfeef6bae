//! The command line as a user meets it: bad input, `check`, `discover`.

use crate::harness::bounds::*;
use crate::harness::*;

/// Every invalid flag or combination exits 2 with one line naming the flag,
/// and writes nothing: not a lease, not a key.
#[tokio::test]
async fn bad_flags_exit_2_with_one_line_and_write_nothing() {
    let etcd = Etcd::start().await;
    let backend = Backend::start();
    let eps = etcd.endpoints();
    let url = backend.url();
    let mut c = etcd.client(0).await;
    let rev = revision(&mut c).await;

    let base = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["run", "/k", "v", "--endpoints", &eps]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (base(&["--http", &url, "--timeout", "5s"]), "--timeout"),
        (base(&["--http", &url, "--ttl", "6s"]), "--ttl"),
        (base(&["--ttl", "1s"]), "--ttl"),
        (base(&["--http", &url, "--interval", "fast"]), "--interval"),
        (base(&["--http", &url, "--rise", "0"]), "--rise"),
        (base(&["--http", &url, "--fall", "x"]), "--fall"),
        (base(&["--http", &url, "--tcp", "127.0.0.1:1"]), "--tcp"),
        (base(&["--http", "localhost:8080"]), "--http"),
        (base(&["--tcp", "nope"]), "--tcp"),
        (base(&["--http", &url, "--expect-status", "20x"]), "--expect-status"),
        (base(&["--http", &url, "--header", "broken"]), "--header"),
        (base(&["--tcp", "127.0.0.1:1", "--expect-body", "ok"]), "--expect-body"),
        (base(&["--interval", "1s"]), "--interval"),
        (base(&["--http", &url, "--exec", "true"]), "--http and --exec"),
        (
            base(&["--tcp", "127.0.0.1:1", "--exec", "true", "--grpc", "127.0.0.1:2"]),
            "--tcp, --exec and --grpc",
        ),
        (base(&["--grpc-service", "web"]), "--grpc-service"),
        (base(&["--http", &url, "--grpc-tls"]), "--grpc-tls"),
        (base(&["--exec", "true", "--expect-status", "200"]), "--expect-status"),
        (base(&["--grpc", "127.0.0.1:1", "--insecure"]), "--insecure"),
        (base(&["--grpc", "nope"]), "--grpc"),
        (base(&["--exec", ""]), "--exec"),
        (base(&["--extra", "novalue"]), "--extra"),
        (base(&["--drain", "soon"]), "--drain"),
        (base(&["--dial-timeout", "0s"]), "--dial-timeout"),
        (base(&["--cert", "/nonexistent.pem"]), "--cert"),
        (base(&["--no-such-flag"]), "--no-such-flag"),
        (vec!["run".into(), "/k".into()], "VALUE"),
        (
            vec![
                "run".into(),
                "/k".into(),
                "v".into(),
                "--endpoints".into(),
                "ftp://x".into(),
            ],
            "--endpoints",
        ),
        (vec!["check".into()], "--http"),
        (
            vec![
                "check".into(),
                "--exec".into(),
                "true".into(),
                "--grpc".into(),
                "127.0.0.1:1".into(),
            ],
            "--exec and --grpc",
        ),
        (
            vec![
                "check".into(),
                "--http".into(),
                url.clone(),
                "--timeout".into(),
                "soon".into(),
            ],
            "--timeout",
        ),
    ];
    for (args, flag) in cases {
        let out = sidekick(&args.iter().map(String::as_str).collect::<Vec<_>>())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        // One line; a missing argument adds clap's usage line after it.
        let lines = stderr.lines().filter(|l| !l.starts_with("Usage: ")).count();
        assert_eq!(lines, 1, "{args:?}: one line: {stderr}");
        assert!(
            stderr.starts_with("sidekick: ") && stderr.contains(flag),
            "{args:?} names {flag}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{args:?}: nothing on stdout");
    }
    assert_eq!(revision(&mut c).await, rev, "nothing was written to etcd");
    assert!(c.leases().await.unwrap().leases().is_empty(), "no lease was granted");
}

#[tokio::test]
async fn check_prints_one_line_and_exits_0_or_1() {
    let backend = Backend::start();
    let url = backend.url();
    let out = sidekick(&["check", "--http", &url]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1);
    assert!(stdout.starts_with("healthy: HTTP 200"), "{stdout}");

    backend.set_healthy(false);
    let out = sidekick(&["check", "--http", &url]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.starts_with("unhealthy: HTTP 503 is not an expected status"),
        "{stdout}"
    );
    // ... unless 503 is what the operator expects.
    let out = sidekick(&["check", "--http", &url, "--expect-status", "503"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));

    let tcp = backend.addr.to_string();
    let out = sidekick(&["check", "--tcp", &tcp]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let closed = format!("127.0.0.1:{}", free_port());
    let out = sidekick(&["check", "--tcp", &closed]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("could not connect"));
}

#[tokio::test]
async fn check_http_options() {
    // A tiny server that answers 200 only for the right Host, method and
    // path, with a known body, and a redirect elsewhere.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for conn in listener.incoming().take(8) {
            let mut conn = conn.unwrap();
            let mut buf = vec![0u8; 8192];
            let n = conn.read(&mut buf).unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]).to_lowercase();
            let resp = if req.starts_with("get /redirect") {
                "HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n".to_string()
            } else if req.starts_with("head /h ") && req.contains("\r\nhost: web.example\r\n") {
                "HTTP/1.1 204 No Content\r\n\r\n".to_string()
            } else {
                let body = "status: all good";
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len())
            };
            let _ = conn.write_all(resp.as_bytes());
        }
    });
    let base = format!("http://{addr}");
    let run = |args: &[&str]| sidekick(args).output().unwrap();
    let code = |args: &[&str]| run(args).status.code();
    assert_eq!(
        code(&["check", "--http", &format!("{base}/"), "--expect-body", "all good"]),
        Some(0)
    );
    assert_eq!(
        code(&["check", "--http", &format!("{base}/"), "--expect-body", "bad"]),
        Some(1)
    );
    let h = format!("{base}/h");
    assert_eq!(
        code(&[
            "check",
            "--http",
            &h,
            "--method",
            "HEAD",
            "--header",
            "Host: web.example"
        ]),
        Some(0)
    );
    // Redirects are judged, not followed: a 302 passes the default 200-399 ...
    assert_eq!(code(&["check", "--http", &format!("{base}/redirect")]), Some(0));
    // ... and fails a stricter list.
    let out = run(&["check", "--http", &format!("{base}/redirect"), "--expect-status", "200"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("HTTP 302"));
}

#[tokio::test]
async fn check_times_out() {
    // Accepts but never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let timeout = "300ms";
    let started = std::time::Instant::now();
    let out = sidekick(&["check", "--http", &url, "--timeout", timeout])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("timed out"));
    let bound = one_shot_within(flag(timeout));
    assert!(started.elapsed() < bound, "bounded by --timeout");
    drop(listener);
}

#[tokio::test]
async fn discover_says_which_rule_chose() {
    let dir = tempfile::tempdir().unwrap();
    let env_file = dir.path().join("etcd.environment");
    std::fs::write(&env_file, "ETCD_ENDPOINT=10.1.2.3:4001\n").unwrap();
    let env_file = env_file.to_str().unwrap();
    // (environment, flags, what stdout starts with)
    type Case<'a> = (Vec<(&'a str, &'a str)>, Vec<&'a str>, &'a str);
    let cases: Vec<Case> = vec![
        (vec![], vec!["--endpoints", "h:1"], "http://h:1 (--endpoints)"),
        (
            vec![("SIDEKICK_ENDPOINTS", "http://a:1")],
            vec![],
            "http://a:1 (SIDEKICK_ENDPOINTS)",
        ),
        (
            vec![("ETCDCTL_ENDPOINTS", "http://b:2,http://c:3")],
            vec![],
            "http://b:2,http://c:3 (ETCDCTL_ENDPOINTS)",
        ),
        (
            vec![("SIDEKICK_ENV_FILE", env_file)],
            vec![],
            "http://10.1.2.3:4001 (ETCD_ENDPOINT in ",
        ),
        (
            vec![],
            vec!["--env-file", env_file],
            "http://10.1.2.3:4001 (ETCD_ENDPOINT in ",
        ),
    ];
    for (vars, args, want) in cases {
        let mut cmd = sidekick(&["discover"]);
        cmd.args(&args);
        for (k, v) in vars {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(0));
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert!(stdout.starts_with(want), "want {want}, got {stdout}");
    }
}

#[tokio::test]
async fn discover_check_asks_etcd() {
    let etcd = Etcd::start().await;
    let out = sidekick(&["discover", "--check", "--endpoints", &etcd.endpoints()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("answers at"));

    let dead = format!("http://127.0.0.1:{}", free_port());
    let out = sidekick(&["discover", "--check", "--dial-timeout", "1s", "--endpoints", &dead])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("sidekick: etcd does not answer: "), "{stderr}");
}

/// An HTTPS server with a self-signed certificate, answering 200 "ok".
fn https_server() -> std::net::SocketAddr {
    use std::sync::Arc;
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], der)
        .unwrap();
    let config = Arc::new(config);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for tcp in listener.incoming().take(4) {
            let Ok(mut tcp) = tcp else { continue };
            let mut conn = rustls::ServerConnection::new(config.clone()).unwrap();
            let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
            let mut buf = [0u8; 4096];
            if tls.read(&mut buf).is_ok() {
                let _ = tls.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n");
                let _ = tls.flush();
            }
        }
    });
    addr
}

#[tokio::test]
async fn https_probes_verify_the_certificate_unless_insecure() {
    let url = format!("https://{}/", https_server());
    let out = sidekick(&["check", "--http", &url, "--insecure", "--expect-body", "ok"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.starts_with("healthy: HTTP 200, body matched"), "{stdout}");

    let out = sidekick(&["check", "--http", &url]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("TLS handshake") && stdout.contains("certificate"),
        "{stdout}"
    );
}

#[tokio::test]
async fn chunked_and_unframed_bodies_are_searched() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for (i, conn) in listener.incoming().take(2).enumerate() {
            let mut conn = conn.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = conn.read(&mut buf);
            let resp: &[u8] = if i == 0 {
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nstatu\r\n6\r\ns: gre\r\n2\r\nen\r\n0\r\n\r\n"
            } else {
                b"HTTP/1.0 200 OK\r\n\r\nstatus: green"
            };
            let _ = conn.write_all(resp);
        }
    });
    for _ in 0..2 {
        let out = sidekick(&[
            "check",
            "--http",
            &format!("http://{addr}/"),
            "--expect-body",
            "status: green",
        ])
        .output()
        .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    }
}
