//! Discovery through the default gateway, the way a container finds etcd on
//! the host's docker0: two network namespaces made by the test, joined by a
//! veth pair. etcd listens on the "host" side; the sidekick runs on the
//! "container" side with no endpoint given and a default route only.
//! No traffic leaves the two namespaces.

use std::process::{Child, Command, Stdio};

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
        let template = sidekick(args);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.app, env!("CARGO_BIN_EXE_sidekick")])
            .args(args);
        for (k, v) in template.get_envs() {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
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
