//! TLS and authentication to a real etcd, and secrets kept out of every
//! output. Certificates are made by the test.

use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, Permission, TlsOptions};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

use crate::harness::bounds::*;
use crate::harness::*;

const KEY: &str = "/services/web/1";
const ADDR: &str = "10.0.0.5:8080";

/// A CA and the PEM files it signed, in a temp dir.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "sidekick test ca");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        for (name, sans, usage) in [
            (
                "server",
                vec!["127.0.0.1".to_string(), "localhost".to_string()],
                ExtendedKeyUsagePurpose::ServerAuth,
            ),
            (
                "client",
                vec!["sidekick".to_string()],
                ExtendedKeyUsagePurpose::ClientAuth,
            ),
        ] {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(sans).unwrap();
            p.distinguished_name.push(DnType::CommonName, name);
            p.extended_key_usages = vec![usage];
            let cert = p.signed_by(&key, &issuer).unwrap();
            std::fs::write(dir.path().join(format!("{name}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.path().join(format!("{name}.key")), key.serialize_pem()).unwrap();
        }
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_string()
    }

    /// The test's own client options: our CA and the client certificate.
    fn client_options(&self) -> ConnectOptions {
        let read = |n: &str| std::fs::read(self.path(n)).unwrap();
        ConnectOptions::new().with_tls(
            TlsOptions::new()
                .ca_certificate(Certificate::from_pem(read("ca.pem")))
                .identity(Identity::from_pem(read("client.pem"), read("client.key"))),
        )
    }

    /// etcd's flags: serve TLS with the server certificate, require client
    /// certificates signed by our CA.
    fn etcd_flags(&self) -> Vec<String> {
        vec![
            "--cert-file".into(),
            self.arg("server.pem"),
            "--key-file".into(),
            self.arg("server.key"),
            "--client-cert-auth".into(),
            "--trusted-ca-file".into(),
            self.arg("ca.pem"),
        ]
    }
}

/// Failed etcd attempts logged, the first of a cause as a warning and the
/// rest at debug level.
fn retries(log: &str) -> usize {
    log.lines().filter(|l| l.contains("; retrying")).count()
}

#[tokio::test]
async fn tls_with_client_certificates() {
    let pki = Pki::new();
    let etcd = Etcd::start_tls(pki.etcd_flags(), pki.client_options()).await;
    let eps = etcd.endpoints();
    assert!(eps.starts_with("https://"));
    let (ca, cert, key) = (pki.arg("ca.pem"), pki.arg("client.pem"), pki.arg("client.key"));
    let mut sk = Running::start(&plain_run(KEY, ADDR, &eps).and(&["--cacert", &ca, "--cert", &cert, "--key", &key]));
    let f = sk.figures();
    let mut c = etcd.client(0).await;
    assert!(
        key_becomes(&c, KEY, Some("10.0.0.5:8080"), f.registration()).await,
        "{}",
        sk.log()
    );
    sk.signal("TERM");
    assert_eq!(sk.exit_within(f.exit()).await.unwrap().code(), Some(0));
    assert!(get(&mut c, KEY).await.is_none(), "revoked over TLS");

    // etcdctl's variable names work too.
    let out = sidekick(&["announce", "/services/web/2", "v", "--endpoints", &eps])
        .env("ETCDCTL_CACERT", &ca)
        .env("ETCDCTL_CERT", &cert)
        .env("ETCDCTL_KEY", &key)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(value(&mut c, "/services/web/2").await.as_deref(), Some("v"));
}

#[tokio::test]
async fn tls_with_the_wrong_ca_or_no_client_certificate_is_a_clear_error_and_retried() {
    let pki = Pki::new();
    let other = Pki::new();
    let etcd = Etcd::start_tls(pki.etcd_flags(), pki.client_options()).await;
    let eps = etcd.endpoints();
    let (cert, key) = (pki.arg("client.pem"), pki.arg("client.key"));

    // Our client certificate, but a CA that did not sign etcd's.
    let wrong_ca = other.arg("ca.pem");
    let mut sk =
        Running::start(&plain_run(KEY, ADDR, &eps).and(&["--cacert", &wrong_ca, "--cert", &cert, "--key", &key]));
    let f = sk.figures();
    assert!(
        sk.logs("could not grant a lease", f.etcd_attempts(1)).await,
        "{}",
        sk.log()
    );
    assert!(
        eventually(f.etcd_attempts(3), || async { retries(&sk.log()) >= 3 }).await,
        "{}",
        sk.log()
    );
    assert!(sk.alive(), "retries, never exits: {}", sk.log());
    let log = sk.log();
    let line = log.lines().find(|l| l.contains("could not grant a lease")).unwrap();
    assert!(
        line.to_lowercase().contains("certificate"),
        "names the certificate problem: {line}"
    );
    let mut c = etcd.client(0).await;
    assert!(get(&mut c, KEY).await.is_none());
    sk.signal("TERM");
    assert_eq!(sk.exit_within(f.exit()).await.unwrap().code(), Some(0));

    // The right CA but no client certificate: etcd refuses us.
    let ca = pki.arg("ca.pem");
    let out = sidekick(&[
        "announce",
        KEY,
        "v",
        "--cacert",
        &ca,
        "--dial-timeout",
        "2s",
        "--endpoints",
        &eps,
    ])
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");

    // A TLS file that cannot be read is a usage error before any contact.
    let out = sidekick(&[
        "announce",
        KEY,
        "v",
        "--cacert",
        "/nonexistent/ca.pem",
        "--endpoints",
        &eps,
    ])
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.starts_with("sidekick: --cacert: cannot read /nonexistent/ca.pem"),
        "{stderr}"
    );
}

/// Enables auth: `root`, and `svc` with read-write on `/services/` only.
async fn enable_auth(c: &mut Client) {
    c.user_add("root", "root-secret-pw", None).await.unwrap();
    c.user_grant_role("root", "root").await.unwrap();
    c.role_add("svc").await.unwrap();
    c.role_grant_permission("svc", Permission::read_write("/services/").with_prefix())
        .await
        .unwrap();
    c.user_add("svc", "svc-Secret-4711", None).await.unwrap();
    c.user_grant_role("svc", "svc").await.unwrap();
    c.auth_enable().await.unwrap();
}

async fn root_client(etcd: &Etcd) -> Client {
    let opts = ConnectOptions::new()
        .with_user("root", "root-secret-pw")
        .with_auto_token_refresh(true);
    Client::connect([etcd.url(0)], Some(opts)).await.unwrap()
}

#[tokio::test]
async fn auth_with_a_role_limited_to_a_prefix() {
    let etcd = Etcd::start().await;
    enable_auth(&mut etcd.client(0).await).await;
    let eps = etcd.endpoints();
    let root = root_client(&etcd).await;

    // The password from SIDEKICK_PASSWORD, the safe way.
    let env = [("SIDEKICK_PASSWORD", "svc-Secret-4711")];
    let mut sk = Running::start_with_env(&plain_run(KEY, ADDR, &eps).and(&["--user", "svc"]), &env);
    let f = sk.figures();
    assert!(
        key_becomes(&root, KEY, Some("10.0.0.5:8080"), f.registration()).await,
        "{}",
        sk.log()
    );
    sk.signal("TERM");
    assert_eq!(sk.exit_within(f.exit()).await.unwrap().code(), Some(0));
    assert!(key_becomes(&root, KEY, None, SOON).await, "{}", sk.log());

    // Outside the permitted prefix: a clear error naming the key.
    let out = sidekick(&["announce", "/other/x", "v", "--user", "svc", "--endpoints", &eps])
        .env("SIDEKICK_PASSWORD", "svc-Secret-4711")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("permission denied") && stderr.contains("/other/x"),
        "{stderr}"
    );

    // `run` keeps trying, and says why, naming the key.
    let mut sk = Running::start_with_env(
        &plain_run("/other/x", "v", &eps).and(&["--user", "svc"]),
        &[("SIDEKICK_PASSWORD", "svc-Secret-4711")],
    );
    assert!(
        eventually(f.etcd_attempts(1), || async {
            sk.log()
                .lines()
                .any(|l| l.contains("permission denied") && l.contains("/other/x"))
        })
        .await,
        "{}",
        sk.log()
    );
    assert!(sk.alive());
}

#[tokio::test]
async fn a_wrong_password_is_a_clear_error_and_retried() {
    let etcd = Etcd::start().await;
    enable_auth(&mut etcd.client(0).await).await;
    let eps = etcd.endpoints();
    let mut sk = Running::start_with_env(
        &plain_run(KEY, ADDR, &eps).and(&["--user", "svc"]),
        &[("SIDEKICK_PASSWORD", "wrong-pw-123")],
    );
    let f = sk.figures();
    assert!(
        sk.logs("authentication failed", f.etcd_attempts(1)).await,
        "{}",
        sk.log()
    );
    assert!(
        eventually(f.etcd_attempts(3), || async { retries(&sk.log()) >= 3 }).await,
        "{}",
        sk.log()
    );
    assert!(sk.alive(), "retries, never exits: {}", sk.log());
    assert!(!sk.log().contains("wrong-pw-123"), "the password is never logged");
}

#[tokio::test]
async fn secrets_never_appear_in_logs_errors_or_help() {
    let etcd = Etcd::start().await;
    enable_auth(&mut etcd.client(0).await).await;
    let eps = etcd.endpoints();
    let root = root_client(&etcd).await;
    let secret = "svc-Secret-4711";
    let dir = tempfile::tempdir().unwrap();

    // A whole life cycle at trace level, password from the environment.
    let log = dir.path().join("trace.log");
    let args = plain_run(KEY, ADDR, &eps).and(&["--user", "svc"]);
    let mut child = sidekick(&args)
        .env("SIDEKICK_PASSWORD", secret)
        .env("RUST_LOG", "trace")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let registered = Figures::of(&args).registration();
    assert!(key_becomes(&root, KEY, Some("10.0.0.5:8080"), registered).await);
    signal(child.id(), "TERM");
    assert_eq!(child.wait().unwrap().code(), Some(0));
    assert_no_secret(&log, secret);

    // Inline NAME:PASS, a wrong password, a failing command, --help: none
    // of their outputs carries the password.
    let outputs = [
        sidekick(&[
            "announce",
            "/other/x",
            "v",
            "--user",
            &format!("svc:{secret}"),
            "--endpoints",
            &eps,
        ])
        .output(),
        sidekick(&[
            "announce",
            "/other/x",
            "v",
            "--user",
            "svc",
            "--password",
            secret,
            "--endpoints",
            &eps,
        ])
        .output(),
        sidekick(&["list", "/", "--user", "svc", "--endpoints", &eps])
            .env("ETCDCTL_PASSWORD", secret)
            .output(),
        sidekick(&["run", "--help"])
            .env("SIDEKICK_PASSWORD", secret)
            .env("ETCDCTL_USER", "svc")
            .output(),
        sidekick(&[
            "run",
            KEY,
            "v",
            "--ttl",
            "1s",
            "--user",
            "svc",
            "--password",
            secret,
            "--endpoints",
            &eps,
        ])
        .output(),
    ];
    for (i, out) in outputs.into_iter().enumerate() {
        let out = out.unwrap();
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!all.contains(secret), "output {i} carries the password: {all}");
    }
}

fn assert_no_secret(log: &Path, secret: &str) {
    let text = std::fs::read_to_string(log).unwrap();
    assert!(text.lines().count() > 20, "a trace log was written: {text}");
    assert!(!text.contains(secret), "the password is in the trace log");
}

// Regression: `https://` endpoints without `--cacert` trusted nothing, where
// etcdctl uses the system's roots. SSL_CERT_FILE stands in for the system
// store here (the system's roots loader reads it).
#[tokio::test]
async fn https_without_cacert_uses_the_system_roots() {
    let pki = Pki::new();
    let etcd = Etcd::start_tls(pki.etcd_flags(), pki.client_options()).await;
    let eps = etcd.endpoints();
    let (cert, key) = (pki.arg("client.pem"), pki.arg("client.key"));
    let announce = |roots: &Path| {
        sidekick(&[
            "announce",
            KEY,
            "v",
            "--cert",
            &cert,
            "--key",
            &key,
            "--dial-timeout",
            "2s",
            "--endpoints",
            &eps,
        ])
        .env("SSL_CERT_FILE", roots)
        .env_remove("SSL_CERT_DIR")
        .output()
        .unwrap()
    };
    let out = announce(&pki.path("ca.pem"));
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(value(&mut etcd.client(0).await, KEY).await.as_deref(), Some("v"));

    // Roots that do not include our CA: refused, not trusted blindly.
    let other = Pki::new();
    let out = announce(&other.path("ca.pem"));
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
}

// Regression: etcd-client does not refresh an expired simple token unless
// asked, so the first call after a quiet spell longer than the token TTL
// (the withdrawal, typically) failed once with "invalid auth token".
#[tokio::test]
async fn withdrawal_after_the_auth_token_expired() {
    let token_ttl = Duration::from_secs(1);
    let etcd = Etcd::start_with(&[&format!("--auth-token-ttl={}", token_ttl.as_secs())]).await;
    enable_auth(&mut etcd.client(0).await).await;
    let eps = etcd.endpoints();
    let root = root_client(&etcd).await;
    let backend = Backend::start();
    let url = backend.url();
    // A long TTL: the key can only go this fast by a revoke.
    let mut sk = Running::start_with_env(
        &[
            "run",
            KEY,
            "v",
            "--http",
            &url,
            "--interval",
            "300ms",
            "--timeout",
            "100ms",
            "--rise",
            "1",
            "--fall",
            "1",
            "--ttl",
            "60s",
            "--user",
            "svc",
            "--endpoints",
            &eps,
        ],
        &[("SIDEKICK_PASSWORD", "svc-Secret-4711")],
    );
    let f = sk.figures();
    assert!(
        key_becomes(&root, KEY, Some("v"), f.registration()).await,
        "{}",
        sk.log()
    );
    // Quiet for longer than the token lives (keep-alives come every 20s).
    advance(token_expired(token_ttl)).await;
    backend.set_healthy(false);
    assert!(key_becomes(&root, KEY, None, f.withdrawal()).await, "{}", sk.log());
    // The key can be gone a moment before the line is logged.
    assert!(sk.logs("withdrawn: lease revoked", SOON).await, "{}", sk.log());
    let log = sk.log();
    assert!(
        !log.contains("retrying"),
        "the revoke went through at the first try: {log}"
    );

    // And once more on SIGTERM, after another quiet spell.
    backend.set_healthy(true);
    assert!(
        key_becomes(&root, KEY, Some("v"), f.reregistration()).await,
        "{}",
        sk.log()
    );
    advance(token_expired(token_ttl)).await;
    sk.signal("TERM");
    assert_eq!(sk.exit_within(f.exit()).await.unwrap().code(), Some(0));
    assert!(key_becomes(&root, KEY, None, SOON).await, "{}", sk.log());
    assert!(!sk.log().contains("retrying"), "{}", sk.log());
}

/// A scheme that does not match the server: `https://` to a plain etcd and
/// `http://` to a TLS one each say so, rather than a bare transport error.
#[tokio::test]
async fn a_scheme_that_does_not_match_the_server_says_so() {
    let pki = Pki::new();
    let tls = Etcd::start_tls(pki.etcd_flags(), pki.client_options()).await;
    let plain = Etcd::start().await;
    let as_http = tls.endpoints().replacen("https://", "http://", 1);
    let as_https = plain.endpoints().replacen("http://", "https://", 1);
    let (ca, cert, key) = (pki.arg("ca.pem"), pki.arg("client.pem"), pki.arg("client.key"));
    for (eps, want) in [(&as_https, "does not seem to speak TLS"), (&as_http, "may speak TLS")] {
        let mut args = vec!["list", "--endpoints", eps.as_str(), "--dial-timeout", "2s"];
        if eps.starts_with("https") {
            args.extend(["--cacert", &ca, "--cert", &cert, "--key", &key]);
        }
        let out = sidekick(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(want), "{eps}: {err}");
    }
}
