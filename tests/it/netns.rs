//! Discovery through the default gateway, the way a container finds etcd on
//! the host's docker0: two network namespaces made by the test, joined by a
//! veth pair. etcd listens on the "host" side; the sidekick runs on the
//! "container" side with no endpoint given and a default route only.
//! No traffic leaves the two namespaces.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::bounds::*;
use crate::harness::*;

const GATEWAY: &str = "198.18.0.1";
const CONTAINER: &str = "198.18.0.2";

/// The two namespaces and etcd inside one of them; all removed on drop.
struct Net {
    gw: String,
    app: String,
    etcd: Option<Child>,
    dir: tempfile::TempDir,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip (iproute2) runs");
    assert!(
        out.status.success(),
        "ip {args:?} failed (needs root and iproute2): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `sidekick ARGS` inside the namespace `ns`, with the harness's clean
/// environment.
fn sidekick_in(ns: &str, args: &[&str]) -> Command {
    let template = sidekick(args);
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_sidekick")])
        .args(args);
    for (k, v) in template.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    cmd
}

impl Net {
    fn new() -> Net {
        let n = std::process::id() % 100_000;
        let (gw, app) = (format!("skgw{n}"), format!("skapp{n}"));
        let (vgw, vapp) = (format!("skg{n}"), format!("ska{n}"));
        let net = Net {
            gw: gw.clone(),
            app: app.clone(),
            etcd: None,
            dir: tempfile::tempdir().unwrap(),
        };
        ip(&["netns", "add", &gw]);
        ip(&["netns", "add", &app]);
        ip(&["link", "add", &vgw, "type", "veth", "peer", "name", &vapp]);
        ip(&["link", "set", &vgw, "netns", &gw]);
        ip(&["link", "set", &vapp, "netns", &app]);
        for (ns, dev, addr) in [(&gw, &vgw, GATEWAY), (&app, &vapp, CONTAINER)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ip(&["-n", &app, "route", "add", "default", "via", GATEWAY]);
        net
    }

    fn start_etcd(&mut self) {
        let data = self.dir.path().join("etcd");
        let client = format!("http://{GATEWAY}:2379");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.gw, "etcd", "--name", "gw", "--data-dir"])
            .arg(&data)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-advertise-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-cluster", "gw=http://127.0.0.1:2380"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.etcd = Some(child);
    }

    /// `sidekick ARGS` inside the container namespace, with the harness's
    /// clean environment (no endpoints, no env file).
    fn sidekick_in_app(&self, args: &[&str]) -> Command {
        let mut cmd = sidekick_in(&self.app, args);
        // An env file without endpoints, so that discovery goes on to the
        // default gateway whatever the machine's /etc/etcd.environment says.
        let empty = self.dir.path().join("empty.env");
        std::fs::write(&empty, "# no endpoints here\n").unwrap();
        cmd.env("SIDEKICK_ENV_FILE", empty);
        cmd
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if let Some(mut c) = self.etcd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Deleting a namespace deletes the veth end in it, and so the pair.
        for ns in [&self.gw, &self.app] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[tokio::test]
async fn a_container_finds_etcd_through_its_default_gateway() {
    let mut net = Net::new();
    net.start_etcd();

    let out = net.sidekick_in_app(&["discover"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.trim(), format!("http://{GATEWAY}:2379 (default gateway)"));

    // etcd answers there once it is up.
    let answered = eventually(ETCD_READY, || async {
        let out = net
            .sidekick_in_app(&["discover", "--check", "--dial-timeout", "1s"])
            .output()
            .unwrap();
        out.status.success()
    })
    .await;
    assert!(answered, "etcd on the gateway never answered");

    // And the whole job works through it: announce, then list.
    let out = net
        .sidekick_in_app(&["announce", "/services/web/c1", &format!("{CONTAINER}:80")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let out = net.sidekick_in_app(&["list", "/services/", "--json"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(r#""key":"/services/web/c1","value":"198.18.0.2:80""#),
        "{stdout}"
    );
}

const CLIENT_NET: &str = "198.18.1";
const PEER_NET: &str = "198.18.2";

/// Three etcd members, each in a network namespace of its own with two
/// links: one for clients, to a bridge in an "app" namespace where the
/// sidekick runs, and one for its peers, to a bridge in a "peers"
/// namespace. A member can be cut off from its cluster (its peer link
/// down) and still answer clients. No traffic leaves the five namespaces.
struct Cluster {
    app: String,
    peers: String,
    members: Vec<String>,
    /// The peers' side of each member's peer link.
    peer_links: Vec<String>,
    etcd: Vec<Child>,
    dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Cluster {
        let n = std::process::id() % 100_000;
        let (app, peers) = (format!("skcapp{n}"), format!("skcpeer{n}"));
        let mut c = Cluster {
            app: app.clone(),
            peers: peers.clone(),
            members: Vec::new(),
            peer_links: Vec::new(),
            etcd: Vec::new(),
            dir: tempfile::tempdir().unwrap(),
        };
        for (ns, net) in [(&app, CLIENT_NET), (&peers, PEER_NET)] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "link", "add", "br0", "type", "bridge"]);
            ip(&["-n", ns, "addr", "add", &format!("{net}.1/24"), "dev", "br0"]);
            ip(&["-n", ns, "link", "set", "br0", "up"]);
        }
        for i in 1..=3 {
            let ns = format!("skcm{n}x{i}");
            ip(&["netns", "add", &ns]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            c.members.push(ns.clone());
            for (side, net, bridge_ns) in [("c", CLIENT_NET, &app), ("p", PEER_NET, &peers)] {
                let (inside, outside) = (format!("skm{side}{n}x{i}"), format!("skb{side}{n}x{i}"));
                ip(&["link", "add", &inside, "type", "veth", "peer", "name", &outside]);
                ip(&["link", "set", &inside, "netns", &ns]);
                ip(&["link", "set", &outside, "netns", bridge_ns]);
                ip(&["-n", bridge_ns, "link", "set", &outside, "master", "br0"]);
                ip(&["-n", bridge_ns, "link", "set", &outside, "up"]);
                ip(&[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("{net}.{}/24", 10 + i),
                    "dev",
                    &inside,
                ]);
                ip(&["-n", &ns, "link", "set", &inside, "up"]);
                if side == "p" {
                    c.peer_links.push(outside);
                }
            }
        }
        let peer = |i: usize| format!("http://{PEER_NET}.{}:2380", 10 + i);
        let cluster: Vec<String> = (1..=3).map(|i| format!("m{i}={}", peer(i))).collect();
        for i in 1..=3 {
            let client = Self::url(i);
            let child = Command::new("ip")
                .args(["netns", "exec", &c.members[i - 1], "etcd", "--name", &format!("m{i}")])
                .arg("--data-dir")
                .arg(c.dir.path().join(format!("m{i}")))
                .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
                .args([
                    "--listen-peer-urls",
                    &peer(i),
                    "--initial-advertise-peer-urls",
                    &peer(i),
                ])
                .args(["--initial-cluster", &cluster.join(",")])
                .args(["--initial-cluster-state", "new", "--initial-cluster-token", &app])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            c.etcd.push(child);
        }
        c
    }

    /// Member `i` (from 1) cut off from the others; clients still reach it.
    fn cut_off(&self, i: usize) {
        ip(&["-n", &self.peers, "link", "set", &self.peer_links[i - 1], "down"]);
    }

    fn url(i: usize) -> String {
        format!("http://{CLIENT_NET}.{}:2379", 10 + i)
    }

    /// `sidekick ARGS` inside the app namespace, with the harness's clean
    /// environment.
    fn sidekick(&self, args: &[&str]) -> Command {
        sidekick_in(&self.app, args)
    }

    /// Puts `key` through the members in `through`, until one takes it.
    async fn put(&self, key: &str, through: &[usize], limit: Duration) -> bool {
        let eps: Vec<String> = through.iter().map(|&i| Self::url(i)).collect();
        let eps = eps.join(",");
        eventually(limit, || async {
            let args = ["announce", key, "x", "--endpoints", &eps, "--dial-timeout", "1s"];
            self.sidekick(&args).output().unwrap().status.success()
        })
        .await
    }
}

/// A child killed and reaped when the test ends, however it ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &mut self.etcd {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.members.iter().chain([&self.app, &self.peers]) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

// Regression: `wait` watching through a member cut off from its cluster
// (but not from the client) hung until --timeout: the member, alive, had
// nothing to send. Asked for a leader (require-leader), it cancels the
// watch once it has lost its leader, and `wait` reads again through the
// next endpoint.
#[tokio::test]
async fn wait_on_a_member_cut_off_from_its_cluster_goes_to_another() {
    let net = Cluster::start();
    assert!(
        net.put("/net/ready", &[1, 2, 3], ETCD_READY).await,
        "the cluster never answered"
    );
    let eps = (1..=3).map(Cluster::url).collect::<Vec<_>>().join(",");
    // The member still answers the connection's HTTP/2 pings: only etcd's
    // "no leader" can end the watch.
    let log = net.dir.path().join("wait.log");
    let mut wait = Reaped(
        net.sidekick(&[
            "wait",
            "/net/key",
            "--endpoints",
            &eps,
            "--timeout",
            "120s",
            "--dial-timeout",
            "1s",
        ])
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap(),
    );
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let first = Cluster::url(1);
    let watching = eventually(SOON, || async {
        read().lines().any(|l| l.contains("watching") && l.contains(&first))
    })
    .await;
    assert!(watching, "wait never watched through the first member: {}", read());

    net.cut_off(1);
    assert!(
        net.put("/net/key", &[2, 3], SLACK).await,
        "the two members left never took the key"
    );
    let put = Instant::now();
    let limit = NO_LEADER + SLACK;
    let mut status = None;
    while put.elapsed() < limit {
        if let Some(st) = wait.0.try_wait().unwrap() {
            status = Some(st);
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    drop(wait);
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "wait did not see the key through another member within {limit:?}: {}",
        read()
    );
}
