//! End to end with a real nginx, started by the test without root's
//! privileges in mind: its own prefix, configuration, pid file, logs and
//! temp dirs in a temp dir, a loopback port, no `user` directive. A
//! long-lived `sidekick render` keeps its upstream from the keys that
//! `sidekick run` sidekicks keep for their backends, checks each rendering
//! with `nginx -t` and reloads nginx with SIGHUP to its master. Instances
//! are replaced one by one under load without a failed request, and a
//! failing instance leaves the pool (see `proxies`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::bounds::*;
use crate::harness::*;
use crate::proxies::{children, failing_instance, rolling_update, Proxy, UPSTREAMS};

/// What nginx logs, before it exits, when its port is taken.
const BIND_FAILED: &str = "Address already in use";

/// The `nginx` binary, or a failure that says how to get it.
fn nginx_bin() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into(), "/usr/local/sbin".into()])
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "nginx is not installed, and this test needs a real one: \
                 apt-get install nginx (scripts/prereqs.sh installs it when run as root)"
            )
        })
}

/// The tests' nginx template: one worker, every path in the test's dir,
/// an upstream with a `server` per key under the prefix (and a 503 when
/// there is none, as nginx refuses an empty upstream), and the headers
/// that tell which configuration answered. A request sent to an instance
/// fails with it: `proxy_next_upstream off`, so that nginx does not hide a
/// request sent to an instance that is gone by retrying it on another.
const TEMPLATE: &str = r#"# Rendered by sidekick render from the keys under @PREFIX@; edits are overwritten.
pid @DIR@/nginx.pid;
error_log @DIR@/error.log notice;
worker_processes 1;

events {
    worker_connections 1024;
}

http {
    access_log off;
    client_body_temp_path @DIR@/client_body;
    proxy_temp_path @DIR@/proxy;
    fastcgi_temp_path @DIR@/fastcgi;
    uwsgi_temp_path @DIR@/uwsgi;
    scgi_temp_path @DIR@/scgi;
    proxy_next_upstream off;
{% set servers = gets("@PREFIX@*") %}{% if servers %}
    upstream web {
{% for kv in servers %}        server {{ kv.value|addr }};
{% endfor %}    }
{% endif %}
    server {
        listen 127.0.0.1:@PORT@;
        add_header X-Worker $pid always;
        add_header X-Upstreams "@UPSTREAMS@" always;
        location / {
{% if servers %}            proxy_pass http://web;
{% else %}            return 503;
{% endif %}        }
    }
}
"#;

/// An nginx master process we started (`daemon off`), with its worker;
/// stopped on drop.
struct Nginx {
    child: Option<Child>,
    dir: PathBuf,
    port: u16,
}

impl Proxy for Nginx {
    const CONFIG: &'static str = "nginx.conf";
    const READY: Duration = NGINX;

    fn template(prefix: &str, port: u16, dir: &Path) -> String {
        TEMPLATE
            .replace("@UPSTREAMS@", UPSTREAMS)
            .replace("@PREFIX@", prefix)
            .replace("@PORT@", &port.to_string())
            .replace("@DIR@", dir.to_str().unwrap())
    }

    fn check_cmd(dir: &Path) -> String {
        format!("{} -t -p {} -c {{{{src}}}}", nginx_bin().display(), dir.display())
    }

    /// SIGHUP to the master. One that comes while the master still carries
    /// out the last is not lost: nginx blocks signals meanwhile and takes
    /// it after.
    fn reload_cmd(&self, _dir: &Path) -> String {
        format!("kill -HUP {}", self.pid())
    }

    /// `nginx -p DIR -c CFG -g 'daemon off;'`; waits until its worker
    /// serves the frontend.
    async fn spawn(cfg: &Path, dir: &Path, port: u16) -> Result<Nginx, String> {
        let child = Command::new(nginx_bin())
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(cfg)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("nginx.stderr")).unwrap())
            .spawn()
            .expect("nginx starts");
        let mut n = Nginx {
            child: Some(child),
            dir: dir.to_path_buf(),
            port,
        };
        // Serving, or gone: the master binds before it starts its worker,
        // and exits when it cannot.
        let settled = eventually(NGINX, || {
            let exited = n.child.as_mut().unwrap().try_wait().unwrap().is_some();
            let ok =
                exited || !children(n.pid()).is_empty() && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
            async move { ok }
        })
        .await;
        if let Some(st) = n.child.as_mut().unwrap().try_wait().unwrap() {
            n.child = None;
            let log = n.log();
            if log.contains(BIND_FAILED) {
                return Err(log);
            }
            panic!("nginx exited ({st}):\n{log}");
        }
        assert!(settled, "nginx did not start serving on {port}:\n{}", n.log());
        Ok(n)
    }

    fn port(&self) -> u16 {
        self.port
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("nginx runs").id()
    }

    fn log(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        format!("{}{}", read("nginx.stderr"), read("error.log"))
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGTERM: the master stops its workers; SIGKILL if it does not.
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

#[tokio::test]
async fn nginx_replaces_instances_one_by_one_under_load_dropping_no_request() {
    rolling_update::<Nginx>().await;
}

#[tokio::test]
async fn nginx_sends_nothing_to_a_failing_instance_once_render_reloaded_it() {
    failing_instance::<Nginx>().await;
}
