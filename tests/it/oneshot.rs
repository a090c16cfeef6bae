//! The one-shot commands against a real etcd: announce, withdraw, list.

use std::time::Instant;

use crate::harness::bounds::*;
use crate::harness::*;

fn out(args: &[&str]) -> (Option<i32>, String, String) {
    let o = sidekick(args).output().unwrap();
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
    (o.status.code(), text(o.stdout), text(o.stderr))
}

#[tokio::test]
async fn announce_writes_permanent_keys_or_a_lease_and_prints_its_id() {
    let etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let mut c = etcd.client(0).await;

    let (code, stdout, _) = out(&[
        "announce",
        "/services/web/1",
        "a:1",
        "--extra",
        "/services/web/scheme=http",
        "--endpoints",
        &eps,
    ]);
    assert_eq!((code, stdout.as_str()), (Some(0), ""));
    let kv = get(&mut c, "/services/web/1").await.unwrap();
    assert_eq!((kv.value_str().unwrap(), kv.lease()), ("a:1", 0), "permanent");
    assert_eq!(value(&mut c, "/services/web/scheme").await.as_deref(), Some("http"));

    let (code, stdout, _) = out(&[
        "announce",
        "/services/web/2",
        "b:2",
        "--ttl",
        "30s",
        "--endpoints",
        &eps,
    ]);
    assert_eq!(code, Some(0));
    let kv = get(&mut c, "/services/web/2").await.unwrap();
    assert_eq!(stdout.trim(), format!("{:x}", kv.lease()), "prints the lease id in hex");
    assert_eq!(c.lease_time_to_live(kv.lease(), None).await.unwrap().granted_ttl(), 30);
}

#[tokio::test]
async fn announce_waits_for_health_and_writes_nothing_when_it_never_comes() {
    let etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let backend = Backend::start();
    let url = backend.url();
    let mut c = etcd.client(0).await;
    let rev = revision(&mut c).await;

    backend.set_healthy(false);
    let wait_timeout = "2s";
    let started = Instant::now();
    let (code, stdout, stderr) = out(&[
        "announce",
        "/k",
        "v",
        "--ttl",
        "10s",
        "--wait-http",
        &url,
        "--wait-timeout",
        wait_timeout,
        "--endpoints",
        &eps,
    ]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stdout.is_empty());
    assert!(
        stderr
            .lines()
            .last()
            .unwrap()
            .starts_with("sidekick: instance not healthy within 2s, nothing written"),
        "{stderr}"
    );
    assert!(
        started.elapsed() < one_shot_within(flag(wait_timeout)),
        "bounded by --wait-timeout"
    );
    assert!(
        started.elapsed() >= at_least(flag(wait_timeout)),
        "probes for the whole --wait-timeout, not a second less"
    );
    assert_eq!(revision(&mut c).await, rev, "nothing written");
    assert!(c.leases().await.unwrap().leases().is_empty(), "no lease granted");

    // Healthy after a moment: announce waits, then writes.
    let hits = backend.hits();
    let mut child = sidekick(&[
        "announce",
        "/k",
        "v",
        "--wait-http",
        &url,
        "--wait-timeout",
        "20s",
        "--endpoints",
        &eps,
    ])
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    // Two failed probes (one a second): still waiting, nothing written.
    let two_probes = 2 * ANNOUNCE_PROBE_EVERY + SLACK;
    let probed = eventually(two_probes, || async { backend.hits() >= hits + 2 }).await;
    assert!(probed, "announce probes while it waits");
    assert!(child.try_wait().unwrap().is_none(), "still waiting");
    assert!(get(&mut c, "/k").await.is_none(), "not before the instance is healthy");
    backend.set_healthy(true);
    let status = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(status.status.code(), Some(0));
    assert_eq!(value(&mut c, "/k").await.as_deref(), Some("v"));
}

#[tokio::test]
async fn withdraw_if_value_deletes_only_our_own_value() {
    let etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let mut c = etcd.client(0).await;
    c.put("/services/web/1", "theirs:1", None).await.unwrap();

    let (code, stdout, stderr) = out(&[
        "withdraw",
        "/services/web/1",
        "--if-value",
        "ours:1",
        "--endpoints",
        &eps,
    ]);
    assert_eq!(code, Some(0), "another owner is not an error");
    assert!(stdout.is_empty());
    assert!(
        stderr.contains("kept /services/web/1") && stderr.contains("theirs:1"),
        "{stderr}"
    );
    assert_eq!(value(&mut c, "/services/web/1").await.as_deref(), Some("theirs:1"));

    let (code, stdout, _) = out(&[
        "withdraw",
        "/services/web/1",
        "--if-value",
        "theirs:1",
        "--endpoints",
        &eps,
    ]);
    assert_eq!((code, stdout.trim()), (Some(0), "deleted 1 key"));
    assert!(get(&mut c, "/services/web/1").await.is_none());

    // Missing keys are success, with or without --if-value.
    let (code, stdout, _) = out(&["withdraw", "/services/web/1", "--if-value", "x", "--endpoints", &eps]);
    assert_eq!((code, stdout.trim()), (Some(0), "deleted 0 keys"));
    let (code, _, _) = out(&["withdraw", "/nothing/here", "--endpoints", &eps]);
    assert_eq!(code, Some(0));
}

#[tokio::test]
async fn withdraw_prefix_deletes_the_whole_subtree_only() {
    let etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let mut c = etcd.client(0).await;
    for k in [
        "/services/web/1",
        "/services/web/2",
        "/services/webber/1",
        "/services/db/1",
    ] {
        c.put(k, "v", None).await.unwrap();
    }
    let (code, stdout, _) = out(&["withdraw", "/services/web/", "--prefix", "--endpoints", &eps]);
    assert_eq!((code, stdout.trim()), (Some(0), "deleted 2 keys"));
    assert!(get(&mut c, "/services/webber/1").await.is_some());
    assert!(get(&mut c, "/services/db/1").await.is_some());
}

#[tokio::test]
async fn list_shows_values_and_remaining_ttl() {
    let etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let mut c = etcd.client(0).await;
    c.put("/services/web/a", "10.0.0.1:80", None).await.unwrap();
    let granted = Instant::now();
    let lease = c.lease_grant(60, None).await.unwrap().id();
    c.put(
        "/services/web/b",
        "10.0.0.2:80",
        Some(etcd_client::PutOptions::new().with_lease(lease)),
    )
    .await
    .unwrap();
    c.put("/other", "x", None).await.unwrap();

    let (code, stdout, _) = out(&["list", "/services/", "--endpoints", &eps]);
    assert_eq!(code, Some(0));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert_eq!(lines[0], "/services/web/a 10.0.0.1:80 (permanent)");
    assert!(
        lines[1].starts_with(&format!("/services/web/b 10.0.0.2:80 (lease {lease:x}, ttl ")),
        "{}",
        lines[1]
    );

    let (code, stdout, _) = out(&["list", "/services/", "--json", "--endpoints", &eps]);
    assert_eq!(code, Some(0));
    let rows: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(
        rows[0],
        serde_json::json!({"key": "/services/web/a", "value": "10.0.0.1:80", "lease": null, "ttl": null})
    );
    assert_eq!(rows[1]["lease"], format!("{lease:x}"));
    let ttl = rows[1]["ttl"].as_i64().unwrap();
    // What is left of the 60 s: less the whole seconds gone since the grant,
    // and one more for etcd's rounding down.
    let gone = granted.elapsed().as_secs() as i64 + 1;
    assert!((60 - gone..=60).contains(&ttl), "ttl {ttl} after {gone}s");

    let (_, stdout, _) = out(&["list", "--endpoints", &eps]);
    assert_eq!(stdout.lines().count(), 3, "every key without a prefix: {stdout}");
}

#[tokio::test]
async fn one_shot_commands_exit_1_within_the_dial_timeout_when_etcd_is_away() {
    // One endpoint refuses, the other accepts connections but never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let eps = format!(
        "http://127.0.0.1:{},http://{}",
        free_port(),
        silent.local_addr().unwrap()
    );
    let cases: Vec<Vec<&str>> = vec![
        vec!["announce", "/k", "v"],
        vec!["announce", "/k", "v", "--ttl", "10s"],
        vec!["withdraw", "/k"],
        vec!["withdraw", "/k", "--if-value", "v"],
        vec!["list", "/"],
        vec!["discover", "--check"],
    ];
    let dial = "1s";
    for mut args in cases {
        args.extend(["--dial-timeout", dial, "--endpoints", &eps]);
        let started = Instant::now();
        let (code, _, stderr) = out(&args);
        let took = started.elapsed();
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: one line: {stderr}");
        assert!(
            stderr.starts_with("sidekick: ") && stderr.contains("127.0.0.1"),
            "{args:?}: {stderr}"
        );
        assert!(
            took < one_shot_within(flag(dial)),
            "{args:?} took {took:?} with a 1s dial timeout"
        );
    }
    drop(silent);
}

/// etcd not answering: the error says how its endpoint was chosen and how
/// to choose another, whichever rule chose it.
#[test]
fn an_unanswered_etcd_names_the_rule_that_chose_it() {
    let dead = format!("127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().unwrap();
    let env_file = dir.path().join("etcd.environment");
    std::fs::write(&env_file, format!("ETCD_ENDPOINTS=http://{dead}\n")).unwrap();
    let env_file = env_file.display().to_string();
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str], String);
    let cases: [Case; 3] = [
        (
            &[],
            &["--endpoints", &dead],
            format!("http://{dead} is what --endpoints says"),
        ),
        (
            &[("SIDEKICK_ENDPOINTS", &dead)],
            &[],
            format!("http://{dead} came from SIDEKICK_ENDPOINTS; --endpoints overrides it"),
        ),
        (
            &[("SIDEKICK_ENV_FILE", &env_file)],
            &[],
            format!("came from ETCD_ENDPOINTS in {env_file}; give --endpoints URL or set SIDEKICK_ENDPOINTS"),
        ),
    ];
    for (vars, flags, want) in cases {
        let mut cmd = sidekick(&["list", "--dial-timeout", "1s"]);
        cmd.args(flags).envs(vars.iter().copied());
        let o = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(err.contains(&want), "{vars:?} {flags:?}: {err}");
    }
}
