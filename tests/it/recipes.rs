//! The CoreDNS and Traefik recipes in `examples/`: the `sidekick run` line
//! each README documents, run as written (with a local address) against a
//! real etcd, writes keys and values of the shape the consumer reads. The
//! consumers themselves are not run here: tests/it/traefik.rs runs a real
//! Traefik on these lines; CoreDNS's shapes follow its docs.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions};
use tempfile::TempDir;

use crate::harness::bounds::*;
use crate::harness::*;

/// The short timings [`Documented::start`] gives through the flags'
/// variables (`--interval 200ms` as `SIDEKICK_INTERVAL=200ms`, ...).
const TIMING: [(&str, &str); 5] = [
    ("--interval", "200ms"),
    ("--timeout", "100ms"),
    ("--ttl", "2s"),
    ("--rise", "1"),
    ("--dial-timeout", "1s"),
];

fn example(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(path)
}

pub(crate) fn read(path: &str) -> String {
    std::fs::read_to_string(example(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The documented command: from the `sh` block of `readme` holding
/// `sidekick run`, its first line (the variables, `IP=... PORT=...`) and
/// the command with its continuation lines, which docs/recipes.md must show
/// too.
pub(crate) fn documented(readme: &str) -> (Vec<String>, String) {
    let text = read(readme);
    let block = text
        .split("```sh\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .find(|b| b.contains("sidekick run"))
        .unwrap_or_else(|| panic!("{readme} has no sh block with sidekick run"));
    let mut lines = block.lines();
    let vars: Vec<String> = lines
        .next()
        .unwrap()
        .split_whitespace()
        .map(|a| {
            a.split_once('=')
                .expect("the first line sets the variables")
                .0
                .to_string()
        })
        .collect();
    let command = lines.collect::<Vec<_>>().join("\n");
    assert!(command.starts_with("sidekick run "), "{readme}: {command}");
    for v in &vars {
        assert!(command.contains(&format!("${v}")), "{readme}: ${v} is set but not used");
    }
    // The project's recipes page shows the same line; the test runs both.
    let top = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/recipes.md")).unwrap();
    assert!(
        top.contains(&command),
        "docs/recipes.md shows another line than {readme}:\n{command}"
    );
    (vars, command)
}

/// `command` run by `sh` as the README shows it, with `vars` set, the
/// binary under test as `sidekick`, etcd from the environment and short
/// timings through the flags' variables (the documented line is untouched).
/// `sh` execs the sidekick, so the child is the sidekick itself; its stderr
/// goes to a file.
pub(crate) struct Documented {
    child: Child,
    log: PathBuf,
    _dir: TempDir,
}

impl Documented {
    pub(crate) fn start(command: &str, vars: &[(&str, String)], endpoints: &str) -> Documented {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("sidekick.log");
        let bin = Path::new(env!("CARGO_BIN_EXE_sidekick")).parent().unwrap();
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
        let mut cmd = Command::new("sh");
        for (k, _) in std::env::vars() {
            if k.starts_with("SIDEKICK_") || k.starts_with("ETCDCTL_") || k == "RUST_LOG" {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .arg("-c")
            .arg(format!("exec {command}"))
            .envs(vars.iter().map(|(k, v)| (*k, v.as_str())))
            .env("PATH", path)
            .env("SIDEKICK_ENV_FILE", "/nonexistent/etcd.environment")
            .env("SIDEKICK_ENDPOINTS", endpoints)
            .envs(TIMING.map(|(flag, v)| {
                let name = flag.trim_start_matches("--").replace('-', "_").to_uppercase();
                (format!("SIDEKICK_{name}"), v)
            }))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Documented { child, log, _dir: dir }
    }

    /// The figures of a documented line with [`TIMING`] (an HTTP probe).
    fn figures() -> Figures {
        let mut args = vec!["run", "KEY", "VALUE", "--http", "http://127.0.0.1/health"];
        args.extend(TIMING.iter().flat_map(|(flag, v)| [*flag, *v]));
        Figures::of(&args)
    }

    /// SIGTERM (which withdraws) and wait.
    pub(crate) fn stop(mut self) {
        signal(self.child.id(), "TERM");
        let _ = self.child.wait();
    }

    /// Sends `sig` ("TERM", "KILL").
    pub(crate) fn signal(&self, sig: &str) {
        signal(self.child.id(), sig);
    }

    /// Waits up to `limit` for it to exit.
    pub(crate) async fn exit_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// What it logged so far.
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Documented {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A DNS label as CoreDNS needs each part of the key to be.
fn is_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Every key under `prefix`, with its value and lease.
async fn under(c: &mut Client, prefix: &str) -> Vec<(String, String, i64)> {
    let r = c.get(prefix, Some(GetOptions::new().with_prefix())).await.unwrap();
    r.kvs()
        .iter()
        .map(|kv| {
            (
                kv.key_str().unwrap().to_string(),
                kv.value_str().unwrap().to_string(),
                kv.lease(),
            )
        })
        .collect()
}

#[test]
fn dns_labels() {
    for (s, ok) in [
        ("web3", true),
        ("3", true),
        ("web-3", true),
        ("", false),
        ("-web", false),
        ("web-", false),
        ("Web", false),
        ("10.0.0.5:8080", false),
        ("a.b", false),
        (&"x".repeat(64), false),
    ] {
        assert_eq!(is_dns_label(s), ok, "{s:?}");
    }
}

/// The Corefile's etcd zone and path give the key prefix; the documented
/// line writes one key per instance under it, every part a DNS label, and
/// a JSON value with the fields CoreDNS reads, `ttl` always among them.
#[tokio::test]
async fn coredns_recipe_writes_skydns_keys() {
    let corefile = read("coredns/Corefile");
    let lines: Vec<&str> = corefile
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    let zone = lines
        .iter()
        .filter_map(|l| l.strip_suffix('{').map(str::trim))
        .find(|z| *z != "." && *z != "etcd")
        .expect("a zone served from etcd");
    let path = lines
        .iter()
        .find_map(|l| l.strip_prefix("path "))
        .expect("the etcd plugin's path")
        .trim();
    let mut prefix = path.to_string();
    for label in zone.trim_end_matches('.').rsplit('.') {
        prefix.push('/');
        prefix.push_str(label);
    }
    assert_eq!(prefix, "/skydns/local/skydns");

    let (vars, command) = documented("coredns/README.md");
    assert_eq!(vars, ["IP", "PORT", "INSTANCE"]);
    let etcd = Etcd::start().await;
    let backend = Backend::start();
    let port = backend.addr.port();
    let sk = Documented::start(
        &command,
        &[
            ("IP", "127.0.0.1".into()),
            ("PORT", port.to_string()),
            ("INSTANCE", "web3".into()),
        ],
        &etcd.endpoints(),
    );
    let mut c = etcd.client(0).await;
    let key = format!("{prefix}/web/web3");
    let registered = Documented::figures().registration();
    assert!(eventually(registered, || async { value(&mut c.clone(), &key).await.is_some() }).await);

    let found = under(&mut c, &format!("{path}/")).await;
    assert_eq!(found.len(), 1, "{found:?}");
    let (k, v, lease) = &found[0];
    assert_eq!(*k, key);
    assert_ne!(*lease, 0, "the key lives under the sidekick's lease");
    for part in k[prefix.len() + 1..].split('/') {
        assert!(is_dns_label(part), "'{part}' of {k} is not a DNS label");
    }
    let json: serde_json::Value = serde_json::from_str(v).unwrap_or_else(|e| panic!("{v}: {e}"));
    let host = json["host"].as_str().expect("host is a string");
    assert_eq!(host.parse::<IpAddr>().unwrap().to_string(), "127.0.0.1");
    assert_eq!(json["port"].as_u64(), Some(u64::from(port)), "port is a number: {v}");
    let ttl = json["ttl"].as_u64().expect("ttl is a whole number");
    assert!((1..=u64::from(u32::MAX)).contains(&ttl), "ttl {ttl}");

    sk.stop();
    assert!(key_becomes(&c, &key, None, SOON).await, "withdrawn on SIGTERM");
}

/// The root key and entry point come from traefik.yml; each instance's
/// documented line puts its server URL, and the router is shared: one
/// copy while any instance is registered, handed over when its holder
/// goes, gone with the last instance.
#[tokio::test]
async fn traefik_recipe_writes_servers_and_a_shared_router() {
    let static_config = read("traefik/traefik.yml");
    let root = static_config
        .lines()
        .find_map(|l| l.trim().strip_prefix("rootKey:"))
        .expect("rootKey")
        .trim()
        .trim_matches('"')
        .to_string();
    assert!(!root.starts_with('/'), "Traefik's root key has no leading slash");
    let entry_points: Vec<&str> = static_config
        .lines()
        .skip_while(|l| !l.starts_with("entryPoints:"))
        .skip(1)
        .take_while(|l| l.starts_with(' ') || l.is_empty())
        .filter_map(|l| l.strip_prefix("  ")?.strip_suffix(':'))
        .filter(|n| !n.starts_with(' ') && !n.starts_with('#'))
        .collect();
    // `web` for the traffic, `traefik` for the API and the ping.
    assert_eq!(entry_points, ["web", "traefik"]);

    let (vars, command) = documented("traefik/README.md");
    assert_eq!(vars, ["IP", "PORT", "N"]);
    let etcd = Etcd::start().await;
    let backend = Backend::start();
    let port = backend.addr.port().to_string();
    let instance = |n: &str| {
        Documented::start(
            &command,
            &[("IP", "127.0.0.1".into()), ("PORT", port.clone()), ("N", n.into())],
            &etcd.endpoints(),
        )
    };
    let mut c = etcd.client(0).await;
    let servers = format!("{root}/http/services/web/loadbalancer/servers/");
    let router = format!("{root}/http/routers/web/");
    let registered = Documented::figures().registration();
    let first = instance("1");
    assert!(key_becomes(&c, &format!("{router}service"), Some("web"), registered).await);
    let url = format!("http://127.0.0.1:{port}");
    // The router (shared) is put before the instance's own key.
    assert!(key_becomes(&c, &format!("{servers}1/url"), Some(&url), SOON).await);
    let second = instance("3");
    assert!(key_becomes(&c, &format!("{servers}3/url"), Some(&url), registered).await);

    let found = under(&mut c, &format!("{root}/")).await;
    let keys: Vec<&str> = found.iter().map(|(k, _, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            format!("{router}entrypoints/0"),
            format!("{router}rule"),
            format!("{router}service"),
            format!("{servers}1/url"),
            format!("{servers}3/url"),
        ],
        "one server key per instance, one router"
    );
    let get = |k: &str| found.iter().find(|(key, _, _)| key == k).unwrap();
    for n in ["1", "3"] {
        let (_, v, _) = get(&format!("{servers}{n}/url"));
        let uri: http::Uri = v.parse().unwrap();
        assert_eq!(
            (uri.scheme_str(), uri.host(), uri.port_u16()),
            (Some("http"), Some("127.0.0.1"), port.parse().ok())
        );
    }
    assert_eq!(get(&format!("{router}rule")).1, "Host(`web.example.com`)");
    // The router's service is the one the servers are listed under.
    let service = &get(&format!("{router}service")).1;
    assert!(servers.contains(&format!("/services/{service}/")), "{service}");
    assert!(entry_points.contains(&get(&format!("{router}entrypoints/0")).1.as_str()));
    // The router is held jointly: each key under its service lease.
    for k in ["rule", "service", "entrypoints/0"] {
        let (key, v, lease) = get(&format!("{router}{k}"));
        assert_eq!(*lease, etcd_sidekick::engine::shared::lease_id(key, v).0, "{key}");
    }
    let written: Vec<i64> = {
        let mut revs = Vec::new();
        for k in ["rule", "service", "entrypoints/0"] {
            revs.push(
                crate::harness::get(&mut c, &format!("{router}{k}"))
                    .await
                    .unwrap()
                    .mod_revision(),
            );
        }
        revs
    };

    // One instance goes: its server goes, the router is not written.
    first.stop();
    assert!(key_becomes(&c, &format!("{servers}1/url"), None, SOON).await);
    for (i, k) in ["rule", "service", "entrypoints/0"].iter().enumerate() {
        let kv = crate::harness::get(&mut c, &format!("{router}{k}"))
            .await
            .expect("the router stays");
        assert_eq!(kv.mod_revision(), written[i], "{k} untouched");
    }
    // The last one goes: nothing is left for Traefik to route to once the
    // router's service leases expire (the sidekick's TTL).
    second.stop();
    let gone = eventually(SOON, || {
        let mut c = c.clone();
        let root = root.clone();
        async move { under(&mut c, &format!("{root}/")).await.is_empty() }
    })
    .await;
    assert!(gone, "{:?}", under(&mut c, &format!("{root}/")).await);
}

/// `systemd-analyze verify` accepts the CoreDNS unit (with `/bin/true`
/// standing in for the CoreDNS binary, which verify wants to exist) and
/// says nothing about it: a misspelt key is only a warning, so the output
/// is checked too.
#[test]
fn the_coredns_unit_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let unit = read("coredns/coredns.service");
    assert!(unit.contains("ExecStart=/usr/local/bin/coredns "), "{unit}");
    let staged = unit.replace("/usr/local/bin/coredns", "/bin/true");
    std::fs::write(dir.path().join("coredns.service"), staged).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no", "coredns.service"])
        .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.path().display()))
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .expect("systemd-analyze runs (the systemd package; scripts/test installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    let ours: Vec<&str> = text.lines().filter(|l| l.contains("coredns.service")).collect();
    assert!(ours.is_empty(), "{ours:?}");
}
