//! Flag values: the small parsers (durations, counts, `KEY=VALUE`, headers,
//! `HOST:PORT`, URLs) and the usage error they fail with. A leaf module, so
//! that config and discovery can both use it without importing each other.

use std::time::Duration;

/// A flag value or combination that is not allowed: exit 2.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct UsageError(pub String);

impl UsageError {
    /// A usage error; control characters (a newline in a flag's value, say)
    /// are escaped so the message stays one line.
    pub fn new(msg: impl Into<String>) -> Self {
        let mut out = String::new();
        for c in msg.into().chars() {
            if c.is_control() {
                out.extend(c.escape_default());
            } else {
                out.push(c);
            }
        }
        UsageError(out)
    }
}

pub(crate) fn usage(msg: impl Into<String>) -> UsageError {
    UsageError::new(msg)
}

/// Parses a humantime duration for `flag`, or its default.
pub(crate) fn duration(flag: &str, raw: &Option<String>, default: Duration) -> Result<Duration, UsageError> {
    match raw {
        None => Ok(default),
        Some(s) => humantime::parse_duration(s.trim()).map_err(|e| {
            usage(format!(
                "{flag}: '{s}' is not a duration ({e}); use e.g. 500ms, 5s, 1m30s"
            ))
        }),
    }
}

pub(crate) fn count(flag: &str, raw: &Option<String>, default: u32) -> Result<u32, UsageError> {
    match raw {
        None => Ok(default),
        Some(s) => match s.trim().parse::<u32>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err(usage(format!("{flag}: '{s}' must be a whole number of at least 1"))),
        },
    }
}

/// Parses `KEY=VALUE` of `--extra`.
pub fn parse_extra(raw: &str) -> Result<(String, String), UsageError> {
    parse_key_value("--extra", raw)
}

/// Parses `KEY=VALUE` of `flag` (`--extra`, `--shared`).
pub fn parse_key_value(flag: &str, raw: &str) -> Result<(String, String), UsageError> {
    match raw.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(usage(format!("{flag}: '{raw}' must be KEY=VALUE with a non-empty KEY"))),
    }
}

/// Parses `Name: value` of `--header`.
pub fn parse_header(raw: &str) -> Result<(String, String), UsageError> {
    let bad = || usage(format!("--header: '{raw}' must be 'Name: value'"));
    let (name, value) = raw.split_once(':').ok_or_else(bad)?;
    let name = name.trim();
    if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
        return Err(bad());
    }
    let value = value.trim();
    if http::HeaderValue::from_str(value).is_err() {
        return Err(usage(format!(
            "--header: the value of '{name}' has characters a header cannot carry"
        )));
    }
    Ok((name.to_string(), value.to_string()))
}

/// Parses `HOST:PORT` (or `[v6]:PORT`) of `--tcp`.
pub fn parse_host_port(flag: &str, raw: &str) -> Result<(String, u16), UsageError> {
    let bad = || usage(format!("{flag}: '{raw}' must be HOST:PORT with a port from 1 to 65535"));
    let (host, port) = raw.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if port == 0 || host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/') {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

/// An `http://` or `https://` URL with a host: scheme, host, port,
/// authority and path.
pub fn parse_url(flag: &str, raw: &str) -> Result<(bool, String, u16, String, String), UsageError> {
    let bad = || {
        usage(format!(
            "{flag}: '{raw}' must be an http:// or https:// URL with a host"
        ))
    };
    if raw.contains(|c: char| c.is_whitespace() || c.is_control()) {
        return Err(bad());
    }
    let uri: http::Uri = raw.parse().map_err(|_| bad())?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(bad()),
    };
    let authority = uri.authority().ok_or_else(bad)?;
    if authority.as_str().contains('@') {
        return Err(usage(format!("{flag}: '{raw}' must not carry user:password@")));
    }
    let host = authority.host();
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if host.is_empty() {
        return Err(bad());
    }
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    if port == 0 {
        return Err(bad());
    }
    // A URL without a path (`http://h:8080?ready`) asks for `/`, keeping its
    // query: the request target must start with `/`.
    let path = uri.path_and_query().map_or("", |p| p.as_str());
    let slash = if path.starts_with('/') { "" } else { "/" };
    Ok((
        https,
        host.to_string(),
        port,
        authority.as_str().to_string(),
        format!("{slash}{path}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse() {
        assert_eq!(
            parse_header("Host: example.com").unwrap(),
            ("Host".into(), "example.com".into())
        );
        assert_eq!(parse_header("X-A:b:c").unwrap(), ("X-A".into(), "b:c".into()));
        for bad in ["", ": v", "Bad Name: v", "NoColon"] {
            assert!(parse_header(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn extras_parse() {
        assert_eq!(parse_extra("k=v").unwrap(), ("k".into(), "v".into()));
        assert_eq!(parse_extra("k=").unwrap(), ("k".into(), "".into()));
        assert!(parse_extra("=v").is_err());
        assert!(parse_extra("kv").is_err());
    }

    #[test]
    fn urls_parse() {
        // (URL, https, host, port, authority, path)
        let cases = [
            ("http://h:8080/health", false, "h", 8080, "h:8080", "/health"),
            ("http://h:8080", false, "h", 8080, "h:8080", "/"),
            ("http://h:8080/", false, "h", 8080, "h:8080", "/"),
            // No path: the request target is still origin-form.
            ("http://h:8080?ready", false, "h", 8080, "h:8080", "/?ready"),
            ("http://h?a=1&b=2", false, "h", 80, "h", "/?a=1&b=2"),
            ("http://h/x?y", false, "h", 80, "h", "/x?y"),
            ("https://h", true, "h", 443, "h", "/"),
            ("http://[::1]:81/", false, "::1", 81, "[::1]:81", "/"),
        ];
        for (url, https, host, port, authority, path) in cases {
            let got = parse_url("--http", url).unwrap();
            let want = (https, host.to_string(), port, authority.to_string(), path.to_string());
            assert_eq!(got, want, "{url}");
        }
        for bad in [
            "h:8080",
            "http://",
            "ftp://h/",
            "http://u:p@h/",
            "http://h:0/",
            "http://h/a b",
        ] {
            assert!(parse_url("--http", bad).is_err(), "{bad:?} should not parse");
        }
    }
}
