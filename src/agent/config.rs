//! The agent's configuration: `[services.NAME]` tables in a TOML file, or in
//! every `*.toml` of a directory, with the settings of `run` by the same
//! names. Each service goes through the very checks of `run`'s flags; an
//! error names the file, the service and the field.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::cli::{ProbeArgs, ProbeOptions, TimingArgs};
use crate::config;
use crate::parse::UsageError;

/// One `[services.NAME]` table as written.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct RawService {
    key: String,
    value: String,
    #[serde(default)]
    extra: BTreeMap<String, String>,
    #[serde(default)]
    shared: BTreeMap<String, String>,
    http: Option<String>,
    tcp: Option<String>,
    exec: Option<String>,
    grpc: Option<String>,
    grpc_service: Option<String>,
    #[serde(default)]
    grpc_tls: bool,
    interval: Option<String>,
    timeout: Option<String>,
    rise: Option<u32>,
    fall: Option<u32>,
    grace: Option<String>,
    expect_status: Option<String>,
    expect_body: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    method: Option<String>,
    #[serde(default)]
    insecure: bool,
}

/// A file: its service tables are read one by one, so that an error in
/// one names it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    services: BTreeMap<String, toml::Table>,
}

pub(crate) fn one_line(e: impl std::fmt::Display) -> String {
    e.to_string()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

pub use crate::engine::Service;

/// A configuration error: the file, the service (when known) and what is
/// wrong with which field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn error(file: &Path, service: Option<&str>, msg: impl std::fmt::Display) -> ConfigError {
    let text = match service {
        Some(s) => format!("{}: service {s}: {msg}", file.display()),
        None => format!("{}: {msg}", file.display()),
    };
    ConfigError(UsageError::new(text).0)
}

/// `--interval`-style flag names in a message, as the config's field names.
fn field_names(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(i) = rest.find("--") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let len = after
            .find(|c: char| !(c.is_ascii_lowercase() || c == '-'))
            .unwrap_or(after.len());
        out.push_str(&after[..len].replace('-', "_"));
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

/// The `*.toml` files of `path` (itself when it is a file), in name order.
pub(crate) fn files(path: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let meta = std::fs::metadata(path).map_err(|e| error(path, None, format!("cannot read it: {e}")))?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| error(path, None, format!("cannot list it: {e}")))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    found.sort();
    Ok(found)
}

/// Loads and checks every service under `path` (a file or a directory of
/// `*.toml`), with the agent's lease `ttl`.
pub fn load(path: &Path, ttl: Duration) -> Result<Vec<Service>, ConfigError> {
    let mut services: Vec<Service> = Vec::new();
    for file in files(path)? {
        let text = std::fs::read_to_string(&file).map_err(|e| error(&file, None, format!("cannot read it: {e}")))?;
        for s in parse(&file, &text, ttl)? {
            if let Some(before) = services.iter().find(|o| o.name == s.name) {
                return Err(error(
                    &file,
                    Some(&s.name),
                    format!("is defined in {} already", before.file.display()),
                ));
            }
            services.push(s);
        }
    }
    check_together(&services)?;
    Ok(services)
}

/// The services of one file's text.
pub fn parse(file: &Path, text: &str, ttl: Duration) -> Result<Vec<Service>, ConfigError> {
    let raw: RawFile = toml::from_str(text).map_err(|e| error(file, None, one_line(e)))?;
    raw.services
        .into_iter()
        .map(|(name, table)| {
            let r: RawService = table.try_into().map_err(|e| error(file, Some(&name), one_line(e)))?;
            service(file, name, r, ttl)
        })
        .collect()
}

fn service(file: &Path, name: String, r: RawService, ttl: Duration) -> Result<Service, ConfigError> {
    let fail = |msg: String| error(file, Some(&name), field_names(&msg));
    if r.key.is_empty() {
        return Err(fail("key must not be empty".into()));
    }
    let mut keys = vec![(r.key.clone(), r.value.clone())];
    for (k, v) in &r.extra {
        if k.is_empty() || *k == r.key {
            return Err(fail(format!("extra: key '{k}' is empty or the same as key")));
        }
        keys.push((k.clone(), v.clone()));
    }
    let mut shared = Vec::new();
    for (k, v) in &r.shared {
        if keys.iter().any(|(own, _)| own == k) {
            return Err(fail(format!(
                "shared: key '{k}' is also given as key or extra; a key is either the service's or shared"
            )));
        }
        shared.push((k.clone(), v.clone()));
    }
    let probe_args = ProbeArgs {
        http: r.http.clone(),
        tcp: r.tcp.clone(),
        exec: r.exec.clone(),
        grpc: r.grpc.clone(),
        grpc_service: r.grpc_service.clone(),
        grpc_tls: r.grpc_tls,
        options: ProbeOptions {
            expect_status: r.expect_status.clone(),
            expect_body: r.expect_body.clone(),
            headers: r.headers.iter().map(|(n, v)| format!("{n}: {v}")).collect(),
            method: r.method.clone(),
            insecure: r.insecure,
            timeout: r.timeout.clone(),
        },
    };
    let probe = config::probe_spec(&probe_args).map_err(|e| fail(e.0))?;
    // A probe that cannot be built (a TLS set-up that fails, say) is an
    // error now, not a service that never registers.
    if let Some(spec) = &probe {
        crate::probe::Probe::new(spec).map_err(|e| fail(format!("the probe cannot be set up: {e}")))?;
    }
    let timing_args = TimingArgs {
        interval: r.interval.clone(),
        rise: r.rise.map(|n| n.to_string()),
        fall: r.fall.map(|n| n.to_string()),
        ttl: Some(format!("{}s", ttl.as_secs())),
        grace: r.grace.clone(),
        drain: None,
    };
    let timing = config::timing(&timing_args, probe.as_ref(), &r.timeout).map_err(|e| {
        // The TTL is the agent's `--ttl`, not a field of the service.
        fail(e.0.replacen("--ttl", "the agent's --ttl", 1).replace("--", ""))
    })?;
    Ok(Service {
        name,
        file: file.to_path_buf(),
        keys,
        shared,
        probe,
        timing,
    })
}

/// Rules across services: a key belongs to one service; a shared key has
/// one value.
fn check_together(services: &[Service]) -> Result<(), ConfigError> {
    for (i, a) in services.iter().enumerate() {
        for b in &services[..i] {
            for (k, _) in &a.keys {
                if b.keys.iter().any(|(o, _)| o == k) || b.shared.iter().any(|(o, _)| o == k) {
                    return Err(error(
                        &a.file,
                        Some(&a.name),
                        format!("key '{k}' belongs to service {} too", b.name),
                    ));
                }
            }
            for (k, v) in &a.shared {
                if b.keys.iter().any(|(o, _)| o == k) {
                    return Err(error(
                        &a.file,
                        Some(&a.name),
                        format!("shared: key '{k}' is service {}'s own key", b.name),
                    ));
                }
                if let Some((_, other)) = b.shared.iter().find(|(o, _)| o == k) {
                    if other != v {
                        return Err(error(
                            &a.file,
                            Some(&a.name),
                            format!("shared: key '{k}' is '{v}' here and '{other}' in service {}", b.name),
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(15);

    fn one(text: &str) -> Result<Vec<Service>, String> {
        parse(Path::new("/etc/sidekick/web.toml"), text, TTL).map_err(|e| e.0)
    }

    #[test]
    fn a_service_takes_the_settings_of_run() {
        let s = one(r#"
            [services.web]
            key = "/services/web/hosts/1"
            value = "10.0.0.5:8080"
            extra = { "/services/web/hosts/1/weight" = "10" }
            shared = { "/services/web/scheme" = "http" }
            http = "http://10.0.0.5:8080/health"
            interval = "200ms"
            timeout = "100ms"
            rise = 3
            expect_status = "200-299"
            headers = { Host = "web.example" }
            "#)
        .unwrap();
        assert_eq!(s.len(), 1);
        let w = &s[0];
        assert_eq!(w.name, "web");
        assert_eq!(w.keys.len(), 2);
        assert_eq!(w.shared, vec![("/services/web/scheme".to_string(), "http".to_string())]);
        assert_eq!(w.timing.interval, Duration::from_millis(200));
        assert_eq!((w.timing.rise, w.timing.fall), (3, 2));
        assert_eq!(w.timing.ttl, TTL);
        assert_eq!(w.probe.as_ref().unwrap().timeout, Duration::from_millis(100));
    }

    #[test]
    fn each_error_names_file_service_and_field() {
        let base = "[services.web]\nkey = \"/k\"\nvalue = \"v\"\nhttp = \"http://127.0.0.1:1/\"\n";
        for (extra, want) in [
            (
                "interval = \"soon\"\n",
                "/etc/sidekick/web.toml: service web: interval: 'soon' is not a duration",
            ),
            (
                "timeout = \"5s\"\n",
                "service web: timeout 5s must be smaller than interval 5s",
            ),
            ("expect_status = \"abc\"\n", "service web: expect_status:"),
            (
                "rise = 0\n",
                "service web: rise: '0' must be a whole number of at least 1",
            ),
            (
                "interval = \"14s\"\n",
                "service web: the agent's ttl 15s must be greater than interval + timeout",
            ),
            (
                "colour = \"red\"\n",
                "/etc/sidekick/web.toml: service web: unknown field `colour`",
            ),
            (
                "shared = { \"/k\" = \"x\" }\n",
                "service web: shared: key '/k' is also given as key or extra",
            ),
        ] {
            let got = one(&format!("{base}{extra}")).unwrap_err();
            assert!(got.contains(want), "want {want:?} in {got:?}");
            assert_eq!(got.lines().count(), 1, "{got}");
        }
        let got =
            one("[services.web]\nkey = \"/k\"\nvalue = \"v\"\ntcp = \"127.0.0.1:1\"\nexec = \"true\"\n").unwrap_err();
        assert!(
            got.contains("service web:") && got.contains("tcp") && got.contains("exec"),
            "{got}"
        );
        let got = one("[services.web]\nkey = \"/k\"\nvalue = \"v\"\ngrpc_tls = true\n").unwrap_err();
        assert!(got.contains("service web: grpc_tls"), "{got}");
        let got = one("[services.web]\nkey = \"/k\"\nvalue = \"v\"\ntcp = \"nope\"\n").unwrap_err();
        assert!(got.contains("service web: tcp: 'nope' must be HOST:PORT"), "{got}");
        let got = one("[services.web]\nvalue = \"v\"\n").unwrap_err();
        assert!(got.contains("service web: missing field `key`"), "{got}");
        let got = one("[services.web]\nkey = \"/k\"\nvalue = \"v\"\nrise = \"3\"\n").unwrap_err();
        assert!(
            got.contains("service web: invalid type: string \"3\", expected u32"),
            "{got}"
        );
        assert!(got.contains("rise"), "names the field: {got}");
        let got = one("[sevices.web]\n").unwrap_err();
        assert!(got.contains("unknown field `sevices`"), "{got}");
    }

    #[test]
    fn services_agree_on_keys_and_shared_values() {
        let two = |a: &str, b: &str| {
            let mut s = one(a).unwrap();
            s.extend(one(b).unwrap());
            check_together(&s).map_err(|e| e.0)
        };
        let web = "[services.web]\nkey = \"/services/web/1\"\nvalue = \"v\"\nshared = { \"/services/web/scheme\" = \"http\" }\n";
        let api_same = "[services.api]\nkey = \"/services/web/2\"\nvalue = \"v\"\nshared = { \"/services/web/scheme\" = \"http\" }\n";
        let api_other = "[services.api]\nkey = \"/services/web/2\"\nvalue = \"v\"\nshared = { \"/services/web/scheme\" = \"tcp\" }\n";
        let api_clash = "[services.api]\nkey = \"/services/web/1\"\nvalue = \"v\"\n";
        assert!(two(web, api_same).is_ok());
        let e = two(web, api_other).unwrap_err();
        assert!(
            e.contains("service api: shared: key '/services/web/scheme' is 'tcp' here and 'http' in service web"),
            "{e}"
        );
        let e = two(web, api_clash).unwrap_err();
        assert!(e.contains("key '/services/web/1' belongs to service web too"), "{e}");
    }

    #[test]
    fn flag_names_become_field_names() {
        assert_eq!(field_names("--expect-status: bad"), "expect_status: bad");
        assert_eq!(
            field_names("--timeout 5s must be smaller than --interval 5s"),
            "timeout 5s must be smaller than interval 5s"
        );
    }
}
