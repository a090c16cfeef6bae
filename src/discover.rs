//! Where etcd is: flags, environment, the env file, the default gateway, loopback.
//!
//! The first rule that gives an answer wins, in this order: `--endpoints`,
//! `SIDEKICK_ENDPOINTS`, `ETCDCTL_ENDPOINTS`, the env file (default
//! `/etc/etcd.environment`), the IPv4 default gateway from `/proc/net/route`
//! on port 2379 (inside a Docker container that is the host's docker0), and
//! `http://127.0.0.1:2379`. Nothing here opens a connection.

use std::collections::HashMap;
use std::fmt;
use std::net::Ipv4Addr;

use crate::parse::UsageError;

/// The env file read when `--env-file` is not given.
pub const DEFAULT_ENV_FILE: &str = "/etc/etcd.environment";
/// The variables read from the env file, first hit wins.
const ENV_FILE_VARS: [&str; 3] = ["ETCD_ENDPOINTS", "ETCD_ENDPOINT", "ETCDCTL_ENDPOINTS"];

/// The process environment as discovery sees it; tests hand in their own.
pub trait Environment {
    /// The value of variable `name`, if set and not empty.
    fn var(&self, name: &str) -> Option<String>;
    /// The contents of `path`, if it can be read.
    fn read_file(&self, path: &str) -> std::io::Result<String>;
}

/// The real environment and file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemEnv;

impl Environment for SystemEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.trim().is_empty())
    }
    fn read_file(&self, path: &str) -> std::io::Result<String> {
        std::fs::read_to_string(path)
    }
}

/// An environment made of maps, for tests.
#[derive(Debug, Default, Clone)]
pub struct MapEnv {
    /// Variables.
    pub vars: HashMap<String, String>,
    /// Files by path.
    pub files: HashMap<String, String>,
    /// Paths that exist but cannot be read.
    pub unreadable: Vec<String>,
}

impl Environment for MapEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.vars.get(name).cloned().filter(|v| !v.trim().is_empty())
    }
    fn read_file(&self, path: &str) -> std::io::Result<String> {
        if self.unreadable.iter().any(|p| p == path) {
            return Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        }
        self.files
            .get(path)
            .cloned()
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
    }
}

/// Which rule chose the endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// `--endpoints`.
    Flag,
    /// An environment variable, by name.
    EnvVar(&'static str),
    /// A variable in the env file.
    EnvFile {
        /// The file.
        path: String,
        /// The variable in it.
        var: &'static str,
    },
    /// The IPv4 default gateway.
    DefaultGateway,
    /// Nothing else answered: loopback.
    Fallback,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Flag => f.write_str("--endpoints"),
            Rule::EnvVar(name) => f.write_str(name),
            Rule::EnvFile { path, var } => write!(f, "{var} in {path}"),
            Rule::DefaultGateway => f.write_str("default gateway"),
            Rule::Fallback => f.write_str("fallback"),
        }
    }
}

/// The chosen endpoints and the rule that chose them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovery {
    /// Client URLs, each `http://` or `https://`.
    pub endpoints: Vec<String>,
    /// Which rule chose them.
    pub rule: Rule,
}

impl Discovery {
    /// For an etcd that does not answer: how its endpoint was chosen and
    /// how to choose another, in one clause.
    pub fn hint(&self) -> String {
        let eps = self.endpoints.join(",");
        let choose = "give --endpoints URL or set SIDEKICK_ENDPOINTS";
        match &self.rule {
            Rule::Flag => format!("{eps} is what --endpoints says"),
            Rule::EnvVar(name) => format!("{eps} came from {name}; --endpoints overrides it"),
            Rule::EnvFile { path, var } => format!("{eps} came from {var} in {path}; {choose}"),
            Rule::DefaultGateway => format!(
                "{eps} is the default gateway's port 2379, used because no --endpoints, SIDEKICK_ENDPOINTS, \
                 ETCDCTL_ENDPOINTS or env file gave one (right inside a container, seldom on a host); {choose}"
            ),
            Rule::Fallback => format!("{eps} is the last resort, used because nothing else gave an endpoint; {choose}"),
        }
    }
}

/// Splits a comma list of endpoints, turning a bare `host:port` into
/// `http://host:port`.
pub fn parse_endpoints(source: &str, raw: &str) -> Result<Vec<String>, UsageError> {
    let mut out = Vec::new();
    for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let url = if part.contains("://") {
            part.to_string()
        } else {
            format!("http://{part}")
        };
        if crate::parse::parse_url(source, &url).is_err() {
            return Err(UsageError::new(format!(
                "{source}: '{part}' must be an http:// or https:// URL, or HOST:PORT"
            )));
        }
        out.push(url.trim_end_matches('/').to_string());
    }
    if out.is_empty() {
        return Err(UsageError::new(format!("{source}: no endpoint given")));
    }
    Ok(out)
}

/// Reads `NAME=value` lines of an env file (systemd `EnvironmentFile=` style:
/// comments, blank lines, `export`, and single or double quotes allowed).
pub fn parse_env_file(text: &str) -> HashMap<String, String> {
    let mut vars = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((name, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim();
        let value = [('"', '"'), ('\'', '\'')]
            .iter()
            .find_map(|&(a, b)| value.strip_prefix(a).and_then(|v| v.strip_suffix(b)))
            .unwrap_or(value);
        vars.insert(name.trim().to_string(), value.to_string());
    }
    vars
}

/// The IPv4 default gateway in the text of `/proc/net/route`, if any.
pub fn parse_default_gateway(route_table: &str) -> Option<Ipv4Addr> {
    const RTF_UP: u32 = 0x1;
    const RTF_GATEWAY: u32 = 0x2;
    route_table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
        if f.len() < 8 || f[1] != "00000000" || f[7] != "00000000" {
            return None;
        }
        let flags = u32::from_str_radix(f[3], 16).ok()?;
        if flags & (RTF_UP | RTF_GATEWAY) != RTF_UP | RTF_GATEWAY {
            return None;
        }
        // The kernel prints the address in host byte order, which is
        // little-endian on every machine this runs on.
        let gw = u32::from_str_radix(f[2], 16).ok()?;
        (gw != 0).then(|| Ipv4Addr::from(gw.swap_bytes()))
    })
}

/// The kernel's IPv4 route table, read through [`Environment::read_file`].
const ROUTE_FILE: &str = "/proc/net/route";

/// Applies the discovery rules in order.
pub fn discover(flag: Option<&str>, env_file: Option<&str>, env: &dyn Environment) -> Result<Discovery, UsageError> {
    if let Some(raw) = flag {
        return Ok(Discovery {
            endpoints: parse_endpoints("--endpoints", raw)?,
            rule: Rule::Flag,
        });
    }
    for name in ["SIDEKICK_ENDPOINTS", "ETCDCTL_ENDPOINTS"] {
        if let Some(raw) = env.var(name) {
            return Ok(Discovery {
                endpoints: parse_endpoints(name, &raw)?,
                rule: Rule::EnvVar(name),
            });
        }
    }
    let (path, explicit) = match env_file {
        Some(p) => (p, true),
        None => (DEFAULT_ENV_FILE, false),
    };
    match env.read_file(path) {
        Ok(text) => {
            let vars = parse_env_file(&text);
            for var in ENV_FILE_VARS {
                if let Some(raw) = vars.get(var).filter(|v| !v.trim().is_empty()) {
                    return Ok(Discovery {
                        endpoints: parse_endpoints(&format!("{var} in {path}"), raw)?,
                        rule: Rule::EnvFile {
                            path: path.to_string(),
                            var,
                        },
                    });
                }
            }
        }
        Err(e) if explicit => return Err(UsageError::new(format!("--env-file: cannot read {path}: {e}"))),
        // A default file that exists but cannot be read (root-only, with
        // DynamicUser=) must not send us on to the default gateway.
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(UsageError::new(format!(
                "cannot read {path}: {e}; make it readable, or give --env-file or --endpoints"
            )))
        }
        Err(_) => {}
    }
    if let Some(gw) = env
        .read_file(ROUTE_FILE)
        .ok()
        .as_deref()
        .and_then(parse_default_gateway)
    {
        return Ok(Discovery {
            endpoints: vec![format!("http://{gw}:2379")],
            rule: Rule::DefaultGateway,
        });
    }
    Ok(Discovery {
        endpoints: vec!["http://127.0.0.1:2379".to_string()],
        rule: Rule::Fallback,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTES: &str = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t010011AC\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
";

    fn env(vars: &[(&str, &str)], files: &[(&str, &str)]) -> MapEnv {
        MapEnv {
            vars: vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            files: files.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            unreadable: Vec::new(),
        }
    }

    #[test]
    fn rules_apply_in_order() {
        let file = ("/etc/etcd.environment", "ETCD_ENDPOINT=172.17.42.1:4001\n");
        let route = ("/proc/net/route", ROUTES);
        let all_vars = [
            ("SIDEKICK_ENDPOINTS", "http://a:1"),
            ("ETCDCTL_ENDPOINTS", "http://b:2"),
        ];
        let cases: Vec<(Option<&str>, MapEnv, &str, Rule)> = vec![
            (Some("c:3"), env(&all_vars, &[file, route]), "http://c:3", Rule::Flag),
            (
                None,
                env(&all_vars, &[file, route]),
                "http://a:1",
                Rule::EnvVar("SIDEKICK_ENDPOINTS"),
            ),
            (
                None,
                env(&all_vars[1..], &[file, route]),
                "http://b:2",
                Rule::EnvVar("ETCDCTL_ENDPOINTS"),
            ),
            (
                None,
                env(&[], &[file, route]),
                "http://172.17.42.1:4001",
                Rule::EnvFile {
                    path: "/etc/etcd.environment".into(),
                    var: "ETCD_ENDPOINT",
                },
            ),
            (None, env(&[], &[route]), "http://172.17.0.1:2379", Rule::DefaultGateway),
            (None, env(&[], &[]), "http://127.0.0.1:2379", Rule::Fallback),
            // An empty variable does not count as set.
            (
                None,
                env(&[("SIDEKICK_ENDPOINTS", " ")], &[]),
                "http://127.0.0.1:2379",
                Rule::Fallback,
            ),
        ];
        for (flag, e, want, rule) in cases {
            let d = discover(flag, None, &e).unwrap();
            assert_eq!((d.endpoints[0].as_str(), &d.rule), (want, &rule));
        }
    }

    #[test]
    fn explicit_env_file_must_exist() {
        let e = env(&[], &[]);
        let err = discover(None, Some("/nope"), &e).unwrap_err();
        assert!(err.0.starts_with("--env-file: cannot read /nope"), "{err}");
        let e = env(
            &[],
            &[(
                "/x.env",
                "# comment\nexport ETCDCTL_ENDPOINTS=\"https://h:2379, h2:2379\"\n",
            )],
        );
        let d = discover(None, Some("/x.env"), &e).unwrap();
        assert_eq!(d.endpoints, vec!["https://h:2379", "http://h2:2379"]);
        assert_eq!(d.rule.to_string(), "ETCDCTL_ENDPOINTS in /x.env");
    }

    #[test]
    fn an_unreadable_default_env_file_is_an_error_not_a_fall_through() {
        let mut e = env(&[], &[("/proc/net/route", ROUTES)]);
        e.unreadable.push(DEFAULT_ENV_FILE.into());
        let err = discover(None, None, &e).unwrap_err();
        assert!(
            err.0
                .starts_with("cannot read /etc/etcd.environment: permission denied"),
            "{err}"
        );
    }

    #[test]
    fn env_file_lines() {
        let vars = parse_env_file("A=1\n  # c\n; c\nexport B='two words'\nC=\"q\"\nnoequals\nD = spaced \n");
        assert_eq!(vars.get("A").unwrap(), "1");
        assert_eq!(vars.get("B").unwrap(), "two words");
        assert_eq!(vars.get("C").unwrap(), "q");
        assert_eq!(vars.get("D").unwrap(), "spaced");
        assert_eq!(vars.len(), 4);
    }

    #[test]
    fn route_tables() {
        assert_eq!(parse_default_gateway(ROUTES), Some(Ipv4Addr::new(172, 17, 0, 1)));
        // A default route without the gateway flag (point-to-point) does not count.
        let no_gw = "h\neth0\t00000000\t00000000\t0001\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(parse_default_gateway(no_gw), None);
        let down = "h\neth0\t00000000\t010011AC\t0002\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(parse_default_gateway(down), None);
        for junk in [
            "",
            "header only",
            "h\nshort line",
            "h\neth0\t00000000\tZZZZ\t0003\t0\t0\t0\t00000000",
        ] {
            assert_eq!(parse_default_gateway(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn endpoint_lists() {
        assert_eq!(
            parse_endpoints("x", "h:1,https://g:2/").unwrap(),
            vec!["http://h:1", "https://g:2"]
        );
        for bad in ["", " , ", "ftp://h:1", "http://", "http://a\nb", "h\t:1"] {
            assert!(parse_endpoints("x", bad).is_err(), "{bad:?}");
        }
    }
}
