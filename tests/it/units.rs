//! The systemd unit templates in `units/`: `systemd-analyze verify` accepts
//! them, and the sidekick unit keeps the stop order its comments promise.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

const SIDEKICK_PATH: &str = "/usr/local/bin/sidekick";
const DOCKER_PATH: &str = "/usr/bin/docker";
/// The unit that `*.conf` drop-ins are attached to for verification; a name
/// no host has, so the host's own etcd units do not interfere.
const DROPIN_HOST: &str = "sidekick-test-etcd.service";
/// Where systemd looks for units besides the ones we stage.
const SYSTEM_UNIT_DIRS: [&str; 4] = [
    "/etc/systemd/system",
    "/run/systemd/system",
    "/lib/systemd/system",
    "/usr/lib/systemd/system",
];

fn units_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("units")
}

/// The files in `units/` ending in `suffix`, sorted.
fn unit_files(suffix: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(units_dir())
        .expect("read units/")
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    files.sort();
    files
}

fn file_name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

/// `systemd-analyze`, or a failure saying how to get it: these tests must not
/// pass silently on a machine that cannot check the units.
fn systemd_analyze() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin".into(), "/bin".into()])
        .map(|dir| dir.join("systemd-analyze"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "systemd-analyze not found in PATH or /usr/bin: the unit files in units/ cannot be verified. \
                 Install the `systemd` package (scripts/test does so when run as root)."
            )
        })
}

/// The units copied into a temp dir, made verifiable on this machine, and
/// the unit names to verify (template instances, not templates).
struct Staged {
    dir: TempDir,
    verify: Vec<String>,
    /// Names whose mention in systemd-analyze's output is about our files.
    ours: Vec<String>,
}

impl Staged {
    fn new() -> Staged {
        let dir = tempfile::tempdir().unwrap();
        let mut verify = Vec::new();
        let mut ours = vec![DROPIN_HOST.to_string()];
        let replace_docker = !Path::new(DOCKER_PATH).exists();
        for src in unit_files(".service") {
            let name = file_name(&src);
            // verify checks that every Exec*= binary exists: point it at the
            // binary under test, and at /bin/true where docker is absent.
            let mut text = fs::read_to_string(&src).unwrap();
            text = text.replace(SIDEKICK_PATH, env!("CARGO_BIN_EXE_sidekick"));
            if replace_docker {
                text = text.replace(DOCKER_PATH, "/bin/true");
            }
            fs::write(dir.path().join(&name), text).unwrap();
            verify.push(name.replace("@.", "@1."));
            ours.push(name.split('.').next().unwrap().to_string());
        }
        // A drop-in is not a unit: attach it to a stub that is.
        let dropins = dir.path().join(format!("{DROPIN_HOST}.d"));
        fs::create_dir(&dropins).unwrap();
        fs::write(
            dir.path().join(DROPIN_HOST),
            "[Unit]\nDescription=etcd stand-in\n\n[Service]\nType=oneshot\nExecStart=/bin/true\n",
        )
        .unwrap();
        for src in unit_files(".conf") {
            fs::copy(&src, dropins.join(file_name(&src))).unwrap();
            ours.push(file_name(&src));
        }
        verify.push(DROPIN_HOST.to_string());
        // Requires=docker.service must resolve; a stub where docker is not
        // installed as a unit.
        if !SYSTEM_UNIT_DIRS
            .iter()
            .any(|d| Path::new(d).join("docker.service").exists())
        {
            fs::write(
                dir.path().join("docker.service"),
                "[Unit]\nDescription=docker stand-in\n\n[Service]\nExecStart=/bin/true\n",
            )
            .unwrap();
        }
        Staged { dir, verify, ours }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs `systemd-analyze verify`; returns whether it exited 0, the lines
    /// of its output about our files, and the whole output.
    fn verify(&self) -> (bool, Vec<String>, String) {
        // The trailing ':' appends the default search path (targets, slices).
        let unit_path = format!("{}:", self.dir.path().display());
        let out = Command::new(systemd_analyze())
            .arg("verify")
            .arg("--man=no")
            .args(&self.verify)
            .env("SYSTEMD_UNIT_PATH", unit_path)
            .env("SYSTEMD_LOG_COLOR", "0")
            .output()
            .expect("run systemd-analyze verify");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let dir = self.dir.path().to_string_lossy().into_owned();
        // systemd-analyze may also complain about the host's own units;
        // those are not ours to fix.
        let findings = text
            .lines()
            .filter(|l| l.contains(&dir) || self.ours.iter().any(|n| l.contains(n.as_str())))
            .map(str::to_string)
            .collect();
        (out.status.success(), findings, text)
    }
}

#[test]
fn systemd_analyze_verify_accepts_every_unit_file() {
    assert!(
        !unit_files(".service").is_empty() && !unit_files(".conf").is_empty(),
        "units/ holds the templates"
    );
    let staged = Staged::new();
    let (ok, findings, text) = staged.verify();
    assert!(
        ok && findings.is_empty(),
        "systemd-analyze verify {:?} complained about units/:\n{}\nfull output:\n{text}",
        staged.verify,
        findings.join("\n")
    );
}

/// Proves the check above can fail: a warning systemd-analyze prints with
/// exit code 0 is still caught.
#[test]
fn systemd_analyze_verify_catches_a_broken_directive() {
    let staged = Staged::new();
    let unit = staged.path("app_presence@.service");
    let text = fs::read_to_string(&unit).unwrap();
    let broken = text.replace("KillSignal=SIGTERM", "KillSignal=SIGNOPE\nTimeoutStopSecs=20s");
    assert_ne!(text, broken, "app_presence@.service sets KillSignal=SIGTERM");
    fs::write(&unit, broken).unwrap();
    let (_, findings, text) = staged.verify();
    for bad in ["SIGNOPE", "TimeoutStopSecs"] {
        assert!(
            findings.iter().any(|l| l.contains(bad)),
            "a broken {bad} line is reported:\n{text}"
        );
    }
}

/// A unit file as (section, key, value) triples: comments skipped,
/// backslash continuations joined.
fn parse_unit(path: &Path) -> Vec<(String, String, String)> {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mut entries = Vec::new();
    let mut section = String::new();
    let mut pending = String::new();
    for raw in text.lines() {
        let line = raw.trim();
        if pending.is_empty() && (line.is_empty() || line.starts_with('#') || line.starts_with(';')) {
            continue;
        }
        if let Some(rest) = line.strip_suffix('\\') {
            pending.push_str(rest);
            pending.push(' ');
            continue;
        }
        let line = format!("{pending}{line}");
        pending.clear();
        if line.starts_with('[') && line.ends_with(']') {
            section = line[1..line.len() - 1].to_string();
        } else if let Some((k, v)) = line.split_once('=') {
            entries.push((section.clone(), k.trim().to_string(), v.trim().to_string()));
        }
    }
    entries
}

/// Every value of `key` in `section`, in file order.
fn values<'a>(entries: &'a [(String, String, String)], section: &str, key: &str) -> Vec<&'a str> {
    entries
        .iter()
        .filter(|(s, k, _)| s == section && k == key)
        .map(|(_, _, v)| v.as_str())
        .collect()
}

/// Every space-separated unit name listed under `key` in `section`.
fn listed<'a>(entries: &'a [(String, String, String)], section: &str, key: &str) -> Vec<&'a str> {
    values(entries, section, key)
        .into_iter()
        .flat_map(str::split_whitespace)
        .collect()
}

/// The value following `flag` in a command line, if any.
fn flag<'a>(command: &'a str, flag: &str) -> Option<&'a str> {
    let words: Vec<&str> = command.split_whitespace().collect();
    words.windows(2).find(|w| w[0] == flag).map(|w| w[1])
}

/// A systemd or humantime duration: `20s`, `1min 30s`, or bare seconds.
fn duration(text: &str) -> Duration {
    match text.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(text).unwrap_or_else(|e| panic!("duration {text:?}: {e}")),
    }
}

/// Where a unit gets `PORT` from: its `EnvironmentFile=` lines naming a
/// per-instance file, and any `Environment=PORT=` line.
fn port_sources(entries: &[(String, String, String)]) -> (Vec<&str>, Vec<&str>) {
    let files = values(entries, "Service", "EnvironmentFile")
        .into_iter()
        .filter(|f| f.contains("%i"))
        .collect();
    let literal = values(entries, "Service", "Environment")
        .into_iter()
        .filter(|v| v.starts_with("PORT="))
        .collect();
    (files, literal)
}

/// If this breaks, `systemctl stop app@N` stops the instance while its key
/// is still in etcd, or kills the sidekick before its drain is over.
#[test]
fn sidekick_unit_stops_before_its_instance_and_outlives_its_drain() {
    let unit = parse_unit(&units_dir().join("app_presence@.service"));
    let instance = "app@%i.service";
    for key in ["BindsTo", "After"] {
        assert!(
            listed(&unit, "Unit", key).contains(&instance),
            "[Unit] {key}= lists {instance}: {:?}",
            listed(&unit, "Unit", key)
        );
    }
    assert!(
        listed(&unit, "Install", "WantedBy").contains(&instance),
        "[Install] WantedBy={instance}"
    );
    assert_eq!(
        values(&unit, "X-Fleet", "MachineOf"),
        [instance],
        "[X-Fleet] MachineOf={instance}"
    );
    assert!(
        values(&unit, "Service", "KillSignal").iter().all(|s| *s == "SIGTERM"),
        "sidekick withdraws on SIGTERM"
    );

    let exec = values(&unit, "Service", "ExecStart");
    assert_eq!(exec.len(), 1, "one ExecStart=: {exec:?}");
    let exec = exec[0];
    assert!(
        exec.starts_with(&format!("{SIDEKICK_PATH} run ")),
        "ExecStart runs the sidekick: {exec}"
    );
    let drain = duration(flag(exec, "--drain").unwrap_or("0s"));
    let dial = duration(flag(exec, "--dial-timeout").unwrap_or("5s"));
    let stop = values(&unit, "Service", "TimeoutStopSec");
    assert_eq!(stop.len(), 1, "one TimeoutStopSec=: {stop:?}");
    let stop = duration(stop[0]);
    assert!(
        stop > drain + dial,
        "TimeoutStopSec={stop:?} must exceed --dial-timeout {dial:?} (the revoke) + --drain {drain:?}"
    );

    // The instance starts its sidekick, also on its automatic restarts, and
    // both agree on the port.
    let app = parse_unit(&units_dir().join("app@.service"));
    assert!(
        listed(&app, "Unit", "Wants").contains(&"app_presence@%i.service"),
        "app@.service Wants=app_presence@%i.service"
    );
    assert_eq!(
        port_sources(&app),
        port_sources(&unit),
        "app@.service and app_presence@.service take PORT from the same place"
    );
}

/// `Environment=PORT=808%i` made `app@10` listen on port 80810, which does
/// not exist: systemd specifiers have no arithmetic, so a port is never a
/// literal followed by `%i`; every instance unit reads `PORT` from one file
/// per instance instead.
#[test]
fn instance_10_and_up_get_a_real_port_not_digits_followed_by_the_instance() {
    for path in unit_files(".service") {
        let unit = parse_unit(&path);
        for (section, key, value) in &unit {
            let glued = value
                .match_indices("%i")
                .any(|(at, _)| value[..at].ends_with(|c: char| c.is_ascii_digit()));
            assert!(
                !glued,
                "{}: [{section}] {key}={value} appends the instance to digits",
                file_name(&path)
            );
        }
        if !values(&unit, "Service", "ExecStart")
            .iter()
            .any(|e| e.contains("${PORT}"))
        {
            continue;
        }
        let (files, literal) = port_sources(&unit);
        assert!(
            literal.is_empty(),
            "{}: PORT set in the unit: {literal:?}",
            file_name(&path)
        );
        assert_eq!(
            files,
            ["/etc/app/%i.env"],
            "{}: PORT from the instance's file, which must exist (no \"-\")",
            file_name(&path)
        );
    }
}

/// If this breaks, the inline unit deletes a key another instance owns now,
/// withdraws only after the container is gone, or writes a key that expires
/// under a running instance.
#[test]
fn inline_unit_withdraws_its_own_value_before_the_container_stops() {
    let unit = parse_unit(&units_dir().join("app-inline@.service"));
    let announce = values(&unit, "Service", "ExecStartPost");
    assert_eq!(announce.len(), 1, "one ExecStartPost=: {announce:?}");
    let words: Vec<&str> = announce[0].split_whitespace().collect();
    assert_eq!(words[..2], [SIDEKICK_PATH, "announce"], "{announce:?}");
    let (key, value) = (words[2], words[3]);
    assert!(flag(announce[0], "--ttl").is_none(), "no --ttl: nothing renews the key");
    assert!(
        flag(announce[0], "--wait-http").is_some(),
        "announce waits for the instance"
    );

    let withdraw = format!("{SIDEKICK_PATH} withdraw {key} --if-value {value}");
    let stop = values(&unit, "Service", "ExecStop");
    let first = stop.first().copied().unwrap_or_default();
    assert_eq!(
        first.trim_start_matches('-'),
        withdraw,
        "the first ExecStop withdraws: {stop:?}"
    );
    assert!(
        stop.last().is_some_and(|c| c.contains("docker stop")),
        "the container stops last: {stop:?}"
    );
    let post = values(&unit, "Service", "ExecStopPost");
    assert!(
        post.iter().any(|c| c.trim_start_matches('-') == withdraw),
        "ExecStopPost withdraws after a crash too: {post:?}"
    );
}
