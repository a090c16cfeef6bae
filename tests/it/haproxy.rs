//! End to end with a real HAProxy: sidekicks keep backends in etcd, a
//! long-lived `sidekick render` turns the keys into an HAProxy
//! configuration (checked with `haproxy -c`), and HAProxy (master-worker
//! mode, reloaded by render's reload command, SIGUSR2 to its master as
//! `systemctl reload` sends it) sends traffic only to the backends whose
//! keys exist.
//!
//! Which backend answered a proxied request is told two ways: an unhealthy
//! backend answers 503 to every request, so a 200 through HAProxy cannot
//! come from it; and each backend counts the connections it accepts, of
//! which the sidekick's own probes (one per interval at most) are
//! subtracted with a generous bound. HAProxy's own health checks are off, so
//! only the rendered server list decides where traffic goes.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::bounds::*;
use crate::harness::*;
use crate::proxies::{failing_instance, rolling_update, Proxy, Rendered, PREFIX, UPSTREAMS};

/// Requests sent through HAProxy in each phase.
const REQUESTS: u64 = 40;
/// What HAProxy logs, before it exits, when a port it should listen on is
/// taken.
const BIND_FAILED: &str = "cannot bind socket";

/// The `haproxy` binary, or a failure that says how to get it.
pub(crate) fn haproxy_bin() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into(), "/usr/local/sbin".into()])
        .map(|d| d.join("haproxy"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "haproxy is not installed, and this test needs a real one: \
                 apt-get install haproxy (scripts/prereqs.sh installs it when run as root)"
            )
        })
}

/// The tests' HAProxy template: master-worker, the frontend on loopback,
/// one `server` per key under the prefix, named after the key's last
/// segment, and the headers that tell which configuration answered (see
/// `proxies`). HAProxy's own health checks and retries on another server
/// are off, so only the rendered server list decides where traffic goes,
/// and a request sent to an instance that is gone fails.
const TEMPLATE: &str = r#"# Rendered by sidekick render from the keys under @PREFIX@; edits are overwritten.
global
    master-worker
    maxconn 1024

defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s
    timeout http-request 5s

frontend web_in
    bind 127.0.0.1:@PORT@
    default_backend web

backend web
    balance roundrobin
    http-response set-header X-Worker %pid
    http-response set-header X-Upstreams "@UPSTREAMS@"
{% for kv in gets("@PREFIX@*") %}    server {{ kv.key|base }} {{ kv.value|addr }}
{% else %}    # no keys under @PREFIX@: every request gets 503
{% endfor %}"#;

/// render's reload command for HAProxy: SIGUSR2 to the master, then wait
/// until the master answers on its CLI with a new worker. HAProxy 2.6's
/// master loses a SIGUSR2 that comes while it still starts up again after
/// the last one (a few of a thousand reloads back to back), so a command
/// that returned at once could have its reload lost to the next.
const RELOAD: &str = r#"#!/usr/bin/env bash
set -euo pipefail
# The master's current worker, from `show proc` on its CLI (`quit`: the
# CLI closes once it has answered); none while it does not answer.
current() {
  { exec 3<>/dev/tcp/127.0.0.1/@CLI@ && printf 'show proc; quit\n' >&3 && timeout @IO@ cat <&3; } 2>/dev/null |
    awk '$2 == "worker" { print $1; exit }'
}
before=$(current || true)
kill -USR2 @PID@
for ((i = 0; i < @TRIES@; i++)); do
  now=$(current || true)
  [ -n "$now" ] && [ "$now" != "$before" ] && exit 0
  sleep @POLL@
done
echo "haproxy did not start a new worker within @LIMIT@ s" >&2
exit 1
"#;

/// An HAProxy master process we started, with its workers; stopped on drop.
pub(crate) struct Haproxy {
    child: Option<Child>,
    /// The port of its master CLI.
    cli: u16,
    log: PathBuf,
    pub(crate) port: u16,
}

impl Proxy for Haproxy {
    const CONFIG: &'static str = "haproxy.cfg";
    const READY: Duration = HAPROXY;

    fn template(prefix: &str, port: u16, _dir: &Path) -> String {
        TEMPLATE
            .replace("@UPSTREAMS@", UPSTREAMS)
            .replace("@PREFIX@", prefix)
            .replace("@PORT@", &port.to_string())
    }

    fn check_cmd(_dir: &Path) -> String {
        format!("{} -c -f {{{{src}}}}", haproxy_bin().display())
    }

    fn reload_cmd(&self, dir: &Path) -> String {
        let script = dir.join("reload-haproxy");
        let text = RELOAD
            .replace("@CLI@", &self.cli.to_string())
            .replace("@IO@", &IO.as_secs().to_string())
            .replace("@PID@", &self.pid().to_string())
            .replace("@TRIES@", &(HAPROXY.as_millis() / POLL.as_millis()).to_string())
            .replace("@POLL@", &POLL.as_secs_f64().to_string())
            .replace("@LIMIT@", &HAPROXY.as_secs().to_string());
        std::fs::write(&script, text).unwrap();
        format!("bash {}", script.display())
    }

    /// `haproxy -W -S ipv4@127.0.0.1:CLI -f CFG`, in the foreground; waits
    /// until a worker serves the frontend. The master CLI listens on TCP
    /// for the reload command, a shell script.
    async fn spawn(cfg: &Path, dir: &Path, port: u16) -> Result<Haproxy, String> {
        let cli = free_port();
        let log = dir.join("haproxy.log");
        let child = Command::new(haproxy_bin())
            .arg("-W")
            .arg("-S")
            .arg(format!("ipv4@127.0.0.1:{cli}"))
            .arg("-f")
            .arg(cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("haproxy starts");
        let mut h = Haproxy {
            child: Some(child),
            cli,
            log,
            port,
        };
        // Serving, or gone: a worker exists only once every listener is
        // bound, and the master exits when one cannot be.
        let settled = eventually(HAPROXY, || {
            let exited = h.child.as_mut().unwrap().try_wait().unwrap().is_some();
            let ok =
                exited || h.workers().is_some_and(|w| !w.is_empty()) && TcpStream::connect(("127.0.0.1", port)).is_ok();
            async move { ok }
        })
        .await;
        if let Some(st) = h.child.as_mut().unwrap().try_wait().unwrap() {
            h.child = None;
            let log = Proxy::log(&h);
            if log.contains(BIND_FAILED) {
                return Err(log);
            }
            panic!("haproxy exited ({st}):\n{log}");
        }
        assert!(settled, "haproxy did not start serving on {port}:\n{}", Proxy::log(&h));
        Ok(h)
    }

    fn port(&self) -> u16 {
        self.port
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("haproxy runs").id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Haproxy {
    fn assert_alive(&mut self) {
        if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("haproxy exited ({st}):\n{}", Proxy::log(self));
        }
    }

    /// One command on the master CLI; `None` while the master does not
    /// answer (it re-executes itself on reload).
    pub(crate) fn cli(&self, command: &str) -> Option<String> {
        master_cli(self.cli, command)
    }

    /// PIDs of the workers, current and old, from `show proc`.
    pub(crate) fn workers(&self) -> Option<BTreeSet<u32>> {
        let out = self.cli("show proc")?;
        Some(
            out.lines()
                .filter_map(|l| {
                    let mut f = l.split_whitespace();
                    let pid = f.next()?.parse().ok()?;
                    (f.next()? == "worker").then_some(pid)
                })
                .collect(),
        )
    }

    /// Reloads the configuration through the master socket and waits until
    /// only workers started by this reload remain, so every later request is
    /// served with the new configuration.
    pub(crate) async fn reload(&mut self) {
        let old = self.workers().expect("the master CLI answers");
        assert!(!old.is_empty(), "haproxy has a worker before the reload");
        // The master re-executes itself and may drop this connection.
        let _ = self.cli("reload");
        let done = eventually(HAPROXY, || {
            let ok = self.workers().is_some_and(|w| !w.is_empty() && w.is_disjoint(&old));
            async move { ok }
        })
        .await;
        self.assert_alive();
        assert!(
            done,
            "haproxy did not replace workers {old:?} within {HAPROXY:?}:\n{}",
            Proxy::log(self)
        );
    }

    /// The servers of backend `web` in the running worker: (name, addr:port).
    pub(crate) fn servers(&self) -> BTreeSet<(String, String)> {
        let out = self.cli(SHOW_SERVERS).expect("the master CLI answers");
        parse_servers(&out).unwrap_or_else(|| panic!("no header in 'show servers state':\n{out}"))
    }

    /// [`Haproxy::servers`], `None` while HAProxy does not tell (the master
    /// re-executes itself on reload, a new worker starts).
    pub(crate) fn servers_now(&self) -> Option<BTreeSet<(String, String)>> {
        parse_servers(&self.cli(SHOW_SERVERS)?)
    }

    /// Waits up to `limit` until a single worker runs, with the servers
    /// `want`: a reload has run and its old workers have exited.
    pub(crate) async fn settles_on(&self, want: &BTreeSet<(String, String)>, limit: Duration) -> bool {
        eventually(limit, || {
            let ok = self.workers().is_some_and(|w| w.len() == 1) && self.servers_now().as_ref() == Some(want);
            async move { ok }
        })
        .await
    }
}

/// One command on the master CLI on port `cli`; `None` while the master
/// does not answer (it re-executes itself on reload).
fn master_cli(cli: u16, command: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", cli)).ok()?;
    s.set_read_timeout(Some(IO)).ok()?;
    s.set_write_timeout(Some(IO)).ok()?;
    s.write_all(format!("{command}\n").as_bytes()).ok()?;
    // The CLI answers once our side is closed for writing.
    s.shutdown(std::net::Shutdown::Write).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// What lists the servers of backend `web` in the running worker.
const SHOW_SERVERS: &str = "@1 show servers state web";

/// The (name, addr:port) rows of a `show servers state` answer; `None`
/// without its header.
fn parse_servers(out: &str) -> Option<BTreeSet<(String, String)>> {
    let header: Vec<&str> = out
        .lines()
        .find_map(|l| l.strip_prefix("# be_id"))
        .map(|rest| std::iter::once("be_id").chain(rest.split_whitespace()).collect())?;
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let (name, addr, port) = (col("srv_name"), col("srv_addr"), col("srv_port"));
    Some(
        out.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|f| f.len() == header.len() && !f[0].starts_with('#'))
            .map(|f| (f[name].to_string(), format!("{}:{}", f[addr], f[port])))
            .collect(),
    )
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGTERM lets the master stop its workers; SIGKILL if it does not.
            if c.try_wait().ok().flatten().is_none() {
                signal(c.id(), "TERM");
                let deadline = Instant::now() + STOP;
                while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                    std::thread::sleep(SAMPLE);
                }
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

/// One HTTP/1.0 GET through the frontend: the status code and the body, or
/// what went wrong.
pub(crate) fn get_through(port: u16, path: &str) -> Result<(u16, String), String> {
    http_get(port, "web.test", path)
}

/// What one burst of requests did.
#[derive(Debug)]
struct Burst {
    /// Answers other than `200 ok`.
    bad: Vec<String>,
    /// Connections each backend accepted during the burst, probes included.
    hits: [u64; 2],
    /// The most probe connections one backend can have accepted in that
    /// time: probes start at least `gap` apart (0.9 × interval, jitter only
    /// shortening it), plus one at each edge of the window.
    probe_bound: u64,
}

fn burst(port: u16, backends: [&Backend; 2], gap: Duration) -> Burst {
    let before = backends.map(Backend::hits);
    let start = Instant::now();
    let mut bad = Vec::new();
    for i in 0..REQUESTS {
        match get_through(port, &format!("/r{i}")) {
            Ok((200, body)) if body == "ok\n" => {}
            Ok((code, body)) => bad.push(format!("request {i}: {code} {body:?}")),
            Err(e) => bad.push(format!("request {i}: {e}")),
        }
    }
    let elapsed = start.elapsed();
    let after = backends.map(Backend::hits);
    let probe_bound = (elapsed.as_secs_f64() / gap.as_secs_f64()).floor() as u64 + 2;
    Burst {
        bad,
        hits: [after[0] - before[0], after[1] - before[1]],
        probe_bound,
    }
}

fn both(addrs: &[String; 2]) -> BTreeSet<(String, String)> {
    [("1".to_string(), addrs[0].clone()), ("2".to_string(), addrs[1].clone())].into()
}

#[tokio::test]
async fn haproxy_routes_only_to_healthy_instances_through_render_and_reload() {
    let etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let b = [Backend::start(), Backend::start()];
    let addrs = [b[0].addr.to_string(), b[1].addr.to_string()];
    let urls = [b[0].url(), b[1].url()];
    let keys = ["/services/web/1", "/services/web/2"];
    let sk1 = Running::start(&fast_run(keys[0], &addrs[0], &urls[0], &eps, "1", "1"));
    let sk2 = Running::start(&fast_run(keys[1], &addrs[1], &urls[1], &eps, "1", "1"));
    let logs = || format!("sidekick 1:\n{}\nsidekick 2:\n{}", sk1.log(), sk2.log());
    // Both sidekicks have the same flags.
    let f = sk1.figures();
    let gap = f.probe_every_least.unwrap();
    let c = etcd.client(0).await;
    for i in 0..2 {
        assert!(
            key_becomes(&c, keys[i], Some(&addrs[i]), f.registration()).await,
            "{} never registered\n{}",
            keys[i],
            logs()
        );
    }

    let lb = Rendered::<Haproxy>::start(&etcd, PREFIX).await;
    let haproxy = &lb.proxy;
    let port = haproxy.port;
    let text = lb.rendered();
    assert!(text.contains("master-worker"), "{text}");
    assert_eq!(haproxy.servers(), both(&addrs), "rendered:\n{text}");

    // Both healthy: round-robin gives each about half, far beyond what
    // probes could explain.
    let up = burst(port, [&b[0], &b[1]], gap);
    assert!(up.bad.is_empty(), "{up:?}\n{}", lb.report());
    for i in 0..2 {
        assert!(
            up.hits[i] >= up.probe_bound + REQUESTS / 4,
            "backend {} got too little proxied traffic: {up:?}",
            i + 1
        );
    }

    // Backend 1 fails: its sidekick withdraws the key, the new
    // configuration lists only backend 2, and no request reaches backend 1.
    b[0].set_healthy(false);
    assert!(
        key_becomes(&c, keys[0], None, f.withdrawal()).await,
        "the unhealthy backend's key stayed\n{}",
        logs()
    );
    assert!(key_becomes(&c, keys[1], Some(&addrs[1]), SOON).await, "{}", logs());
    // render installs the file without it and signals HAProxy, which
    // starts a worker on it and lets the old one finish.
    let only_2 = [("2".to_string(), addrs[1].clone())].into();
    assert!(
        haproxy.settles_on(&only_2, RENDER_REACTS + HAPROXY).await,
        "haproxy did not come to run with backend 2 alone\n{}",
        lb.report()
    );
    assert!(!lb.rendered().contains(&addrs[0]), "{}", lb.report());
    let down = burst(port, [&b[0], &b[1]], gap);
    // Backend 1 answers 503 to everything now: every 200 came from backend 2.
    assert!(down.bad.is_empty(), "{down:?}\n{}", lb.report());
    assert!(
        down.hits[0] <= down.probe_bound,
        "backend 1 got more than its probes: {down:?}"
    );
    assert!(down.hits[1] >= REQUESTS, "backend 2 took every request: {down:?}");

    // Recovery: the key returns, and after render + reload both serve again.
    b[0].set_healthy(true);
    assert!(
        key_becomes(&c, keys[0], Some(&addrs[0]), f.reregistration()).await,
        "the recovered backend's key did not return\n{}",
        logs()
    );
    assert!(
        haproxy.settles_on(&both(&addrs), RENDER_REACTS + HAPROXY).await,
        "haproxy did not come to run with both backends again\n{}",
        lb.report()
    );
    let again = burst(port, [&b[0], &b[1]], gap);
    assert!(again.bad.is_empty(), "{again:?}\n{}", lb.report());
    for i in 0..2 {
        assert!(
            again.hits[i] >= again.probe_bound + REQUESTS / 4,
            "backend {} got too little proxied traffic after recovery: {again:?}",
            i + 1
        );
    }
}

#[tokio::test]
async fn haproxy_replaces_instances_one_by_one_under_load_dropping_no_request() {
    rolling_update::<Haproxy>().await;
}

#[tokio::test]
async fn haproxy_sends_nothing_to_a_failing_instance_once_render_reloaded_it() {
    failing_instance::<Haproxy>().await;
}
