//! End to end with a real HAProxy: two sidekicks keep two backends in etcd,
//! `examples/haproxy/render` turns `sidekick list` into an HAProxy
//! configuration, and HAProxy (master-worker mode, reloaded through its
//! master socket as `systemctl reload` would) sends traffic only to the
//! backends whose keys exist.
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
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::harness::bounds::*;
use crate::harness::*;

const PREFIX: &str = "/services/web/";
/// Requests sent through HAProxy in each phase.
const REQUESTS: u64 = 40;
/// What HAProxy logs, before it exits, when a port it should listen on is
/// taken.
const BIND_FAILED: &str = "cannot bind socket";
/// How many times HAProxy is started again on a fresh port after its
/// frontend port was taken.
const PORT_RETRIES: usize = 5;

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

/// Runs `examples/haproxy/render PREFIX CFG --endpoints EPS` with the
/// frontend on `port` and the stats socket in `dir`.
fn render(cfg: &Path, dir: &Path, port: u16, endpoints: &str) -> String {
    render_prefix(PREFIX, cfg, dir, port, endpoints)
}

/// [`render`] for the keys under `prefix`.
pub(crate) fn render_prefix(prefix: &str, cfg: &Path, dir: &Path, port: u16, endpoints: &str) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/haproxy/render");
    let mut cmd = Command::new("bash");
    for (k, _) in std::env::vars() {
        if k.starts_with("SIDEKICK_") || k.starts_with("ETCDCTL_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    for k in ["SERVER_OPTS", "HAPROXY_CHECK"] {
        cmd.env_remove(k);
    }
    let out = cmd
        .arg(script)
        .arg(prefix)
        .arg(cfg)
        .args(["--endpoints", endpoints])
        .env("SIDEKICK", env!("CARGO_BIN_EXE_sidekick"))
        .env("SIDEKICK_ENV_FILE", "/nonexistent/etcd.environment")
        .env("FRONTEND_ADDR", "127.0.0.1")
        .env("FRONTEND_PORT", port.to_string())
        .env("STATS_SOCKET", dir.join("stats.sock"))
        .env("MASTER_WORKER", "1")
        // The backend `servers` reads, whatever the prefix.
        .env("BACKEND_NAME", "web")
        .stdin(Stdio::null())
        .output()
        .expect("bash runs examples/haproxy/render");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "render failed ({}):\n{stderr}", out.status);
    std::fs::read_to_string(cfg).unwrap()
}

/// An HAProxy master process we started, with its workers; stopped on drop.
pub(crate) struct Haproxy {
    child: Option<Child>,
    master: PathBuf,
    log: PathBuf,
    pub(crate) port: u16,
}

impl Haproxy {
    /// `haproxy -W -S DIR/master.sock -f CFG`, in the foreground, with its
    /// frontend on a fresh port for which `render(port)` has written CFG;
    /// waits until a worker serves the frontend. The port is free when
    /// [`free_port`] picks it, not necessarily when HAProxy binds it: when
    /// another process took it meanwhile, HAProxy exits saying so, and it is
    /// started again on another port, as the harness's etcd is.
    pub(crate) async fn start(bin: &Path, cfg: &Path, dir: &Path, mut render: impl FnMut(u16)) -> Haproxy {
        for attempt in 1..=PORT_RETRIES {
            let port = free_port();
            render(port);
            match Self::spawn(bin, cfg, dir, port).await {
                Ok(h) => return h,
                Err(log) => eprintln!("haproxy start {attempt}: port {port} was taken, trying another:\n{log}"),
            }
        }
        panic!("haproxy found its port taken {PORT_RETRIES} times in a row");
    }

    /// One start on `port`: `Err` with HAProxy's log when it exited because
    /// the port was taken; any other exit, or no worker serving within
    /// [`HAPROXY`], fails the test.
    async fn spawn(bin: &Path, cfg: &Path, dir: &Path, port: u16) -> Result<Haproxy, String> {
        let master = dir.join("master.sock");
        let log = dir.join("haproxy.log");
        let child = Command::new(bin)
            .arg("-W")
            .arg("-S")
            .arg(&master)
            .arg("-f")
            .arg(cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("haproxy starts");
        let mut h = Haproxy {
            child: Some(child),
            master,
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
            let log = h.log();
            if log.contains(BIND_FAILED) {
                return Err(log);
            }
            panic!("haproxy exited ({st}):\n{log}");
        }
        assert!(settled, "haproxy did not start serving on {port}:\n{}", h.log());
        Ok(h)
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn assert_alive(&mut self) {
        if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("haproxy exited ({st}):\n{}", self.log());
        }
    }

    /// One command on the master CLI; `None` while the master does not
    /// answer (it re-executes itself on reload).
    pub(crate) fn cli(&self, command: &str) -> Option<String> {
        master_cli(&self.master, command)
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
            self.log()
        );
    }

    /// The servers of backend `web` in the running worker: (name, addr:port).
    pub(crate) fn servers(&self) -> BTreeSet<(String, String)> {
        let out = self.cli(SHOW_SERVERS).expect("the master CLI answers");
        parse_servers(&out).unwrap_or_else(|| panic!("no header in 'show servers state':\n{out}"))
    }
}

/// One command on the master CLI at `master`; `None` while the master does
/// not answer (it re-executes itself on reload).
fn master_cli(master: &Path, command: &str) -> Option<String> {
    let mut s = UnixStream::connect(master).ok()?;
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

/// The servers of backend `web` in the running worker of the HAProxy whose
/// master CLI is at `master`: (name, addr:port); `None` while it does not
/// tell (the master re-executes itself on reload, a new worker starts).
pub(crate) fn servers_at(master: &Path) -> Option<BTreeSet<(String, String)>> {
    parse_servers(&master_cli(master, SHOW_SERVERS)?)
}

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
    let bin = haproxy_bin();
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

    let dir: TempDir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("haproxy.cfg");
    let mut haproxy = Haproxy::start(&bin, &cfg, dir.path(), |port| {
        render(&cfg, dir.path(), port, &eps);
    })
    .await;
    let port = haproxy.port;
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("master-worker"), "{text}");
    assert_eq!(haproxy.servers(), both(&addrs), "rendered:\n{text}");

    // Both healthy: round-robin gives each about half, far beyond what
    // probes could explain.
    let up = burst(port, [&b[0], &b[1]], gap);
    assert!(up.bad.is_empty(), "{up:?}\n{}", haproxy.log());
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
    let text = render(&cfg, dir.path(), port, &eps);
    assert!(!text.contains(&addrs[0]), "{text}");
    haproxy.reload().await;
    assert_eq!(
        haproxy.servers(),
        [("2".to_string(), addrs[1].clone())].into(),
        "rendered:\n{text}"
    );
    let down = burst(port, [&b[0], &b[1]], gap);
    // Backend 1 answers 503 to everything now: every 200 came from backend 2.
    assert!(down.bad.is_empty(), "{down:?}\n{}", haproxy.log());
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
    let text = render(&cfg, dir.path(), port, &eps);
    haproxy.reload().await;
    assert_eq!(haproxy.servers(), both(&addrs), "rendered:\n{text}");
    let again = burst(port, [&b[0], &b[1]], gap);
    assert!(again.bad.is_empty(), "{again:?}\n{}", haproxy.log());
    for i in 0..2 {
        assert!(
            again.hits[i] >= again.probe_bound + REQUESTS / 4,
            "backend {} got too little proxied traffic after recovery: {again:?}",
            i + 1
        );
    }
}
