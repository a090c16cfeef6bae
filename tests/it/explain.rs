//! `sidekick explain`: the figures as text and JSON, the warnings, and the
//! same usage errors as `run`, all without contacting anything.

use std::net::TcpListener;

use crate::harness::*;

/// `sidekick explain ARGS`: exit code, stdout, stderr.
fn explain(args: &[&str], vars: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let out = sidekick(&[&["explain"], args].concat())
        .envs(vars.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn text_names_each_figure_with_its_value() {
    let (code, out, err) = explain(&["--http", "http://127.0.0.1:8080/health"], &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.is_empty(), "nothing on stderr: {err}");
    for (label, value) in [
        ("withdrawn after the instance fails", "12 s"),
        ("withdrawn after SIGTERM/SIGINT", "5 s"),
        ("stale after SIGKILL or a crash", "15 s"),
        ("registered after start", "7 s"),
        ("registered after recovery", "12 s"),
        ("registered after etcd returns", "10 s"),
        ("a keep-alive every", "5 s (12 a minute)"),
        ("a probe every", "4.5 s to 5 s"),
    ] {
        let line = out
            .lines()
            .find(|l| l.contains(label))
            .unwrap_or_else(|| panic!("a line names {label:?}:\n{out}"));
        assert!(line.contains(value), "{label}: {value} in {line:?}");
    }
    assert!(!out.contains("warning"), "no warning for the defaults:\n{out}");
}

/// The run flags' environment variables count too, as they would for `run`
/// in the same unit.
#[test]
fn text_follows_the_environment_like_run() {
    let (code, out, err) = explain(
        &["--tcp", "127.0.0.1:6379"],
        &[
            ("SIDEKICK_INTERVAL", "1s"),
            ("SIDEKICK_FALL", "3"),
            ("SIDEKICK_TIMEOUT", "500ms"),
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.starts_with("sidekick run with --interval 1s --timeout 500ms"),
        "{out}"
    );
    let fails = out.lines().find(|l| l.contains("instance fails")).unwrap();
    assert!(fails.contains("3.5 s"), "3 × 1s + 500ms: {fails}");
}

#[test]
fn json_parses_and_has_every_field() {
    let (code, out, err) = explain(
        &[
            "--json",
            "--tcp",
            "127.0.0.1:6379",
            "--interval",
            "1s",
            "--timeout",
            "500ms",
            "--rise",
            "3",
            "--dial-timeout",
            "2s",
        ],
        &[],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.lines().count(), 1, "one line: {out}");
    let j: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    for (field, want) in [
        ("withdraw_after_failure_s", 2.5),
        ("withdraw_after_sigterm_s", 2.0),
        ("stale_after_sigkill_s", 15.0),
        ("register_after_start_s", 2.5),
        ("register_after_recovery_s", 3.5),
        ("register_after_etcd_back_s", 3.0),
        ("keepalives_per_minute", 12.0),
        // max(2 s, 10 s) + 2 s: the ping floor, then the dial timeout.
        ("watch_leaves_lost_member_s", 12.0),
    ] {
        assert_eq!(j[field].as_f64(), Some(want), "{field} in {j}");
    }
    for field in ["exit_after_sigterm_s", "etcd_call_bound_s", "probes_per_minute_max"] {
        assert!(j[field].is_number(), "{field} in {j}");
    }
    assert_eq!(j["warnings"], serde_json::json!([]), "{j}");
}

#[test]
fn a_risky_combination_warns_in_text_and_json() {
    let risky = [
        "--http",
        "http://127.0.0.1:1/",
        "--interval",
        "500ms",
        "--timeout",
        "100ms",
        "--fall",
        "1",
    ];
    let (code, out, err) = explain(&risky, &[]);
    assert_eq!(code, Some(0), "a warning is not an error: {err}");
    let warning = out
        .lines()
        .find(|l| l.starts_with("warning: "))
        .unwrap_or_else(|| panic!("a warning line:\n{out}"));
    assert!(warning.contains("--fall 1") && warning.contains("500ms"), "{warning}");

    let (_, out, _) = explain(&[&["--json"], &risky[..]].concat(), &[]);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    let warnings = j["warnings"].as_array().expect("warnings array");
    assert_eq!(warnings.len(), 1, "{j}");
    assert!(warnings[0].as_str().unwrap().starts_with("--fall 1"), "{j}");
}

/// Every bad combination exits 2 with one line naming the flag, as `run`
/// does; neither the probe target nor etcd is contacted, then or ever.
#[test]
fn bad_combinations_exit_2_with_one_line_and_contact_nothing() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let url = format!("http://{addr}/health");
    let etcd = format!("http://{addr}");
    let vars = [
        ("SIDEKICK_ENDPOINTS", etcd.as_str()),
        ("ETCDCTL_ENDPOINTS", etcd.as_str()),
    ];
    let cases: &[(&[&str], &str)] = &[
        (&["--http", &url, "--timeout", "5s"], "--timeout"),
        (&["--http", &url, "--ttl", "7s"], "--ttl"),
        (&["--tcp", &addr, "--ttl", "2500ms"], "--ttl"),
        (&["--ttl", "1s"], "--ttl"),
        (&["--interval", "1s"], "--interval"),
        (&["--http", &url, "--rise", "0"], "--rise"),
        (&["--http", &url, "--fall", "x"], "--fall"),
        (&["--http", &url, "--grace", "later"], "--grace"),
        (&["--drain", "5"], "--drain"),
        (&["--http", &url, "--tcp", &addr], "--tcp"),
        (&["--tcp", &addr, "--expect-body", "ok"], "--expect-body"),
        (&["--http", "localhost:8080"], "--http"),
        (&["--dial-timeout", "0s"], "--dial-timeout"),
        (&["--endpoints", &etcd], "--endpoints"),
        (&["/services/web/1", "10.0.0.5:8080"], "/services/web/1"),
    ];
    for (args, flag) in cases {
        let (code, out, err) = explain(args, &vars);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
        assert!(
            err.starts_with("sidekick: ") && err.contains(flag),
            "{args:?} names {flag}: {err}"
        );
        assert!(out.is_empty(), "{args:?}: nothing on stdout: {out}");
    }
    // A good one contacts nothing either.
    let (code, _, err) = explain(&["--http", &url], &vars);
    assert_eq!(code, Some(0), "{err}");
    // Timing flags alone are explained as for an HTTP or TCP probe; with no
    // flag at all, the no-probe mode shows only the settings it takes.
    let (code, out, err) = explain(&["--interval", "3s", "--ttl", "10s"], &vars);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("sidekick run with --interval 3s --timeout 2s"), "{out}");
    let (code, out, err) = explain(&[], &vars);
    assert_eq!(code, Some(0), "{err}");
    let header = out.lines().next().unwrap_or_default();
    assert!(
        header.contains("no probe") && !header.contains("--interval") && !header.contains("--rise"),
        "{header}"
    );
    let accepted = (0..100).take_while(|_| listener.accept().is_ok()).count();
    assert_eq!(accepted, 0, "explain opened connections to the probe target or etcd");
}
