//! The HTTP probe: status in the expected set, and the body containing the
//! expected text when one is given. Redirects are not followed.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use super::SetupError;
use crate::config::{HttpSpec, StatusSet};

/// How much of the body is searched for `--expect-body`.
const BODY_LIMIT: usize = 64 * 1024;

/// One reusable HTTP client aimed at one URL.
#[derive(Debug)]
pub struct HttpProbe {
    client: reqwest::Client,
    url: reqwest::Url,
    method: reqwest::Method,
    expect_status: StatusSet,
    expect_body: Option<String>,
    pub(super) timeout: Duration,
}

impl HttpProbe {
    /// Builds the client: no redirects, no connection reuse, the probe's
    /// headers on every request.
    pub fn new(spec: &HttpSpec, timeout: Duration) -> Result<Self, SetupError> {
        let mut headers = HeaderMap::new();
        for (name, value) in &spec.headers {
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| SetupError(e.to_string()))?;
            let value = HeaderValue::from_str(value).map_err(|e| SetupError(e.to_string()))?;
            headers.append(name, value);
        }
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            // A fresh connection each time, as a load balancer's check opens
            // one: a server that keeps old connections alive but accepts no
            // new ones is not healthy.
            .pool_max_idle_per_host(0)
            .timeout(timeout)
            .connect_timeout(timeout)
            .danger_accept_invalid_certs(spec.insecure)
            .default_headers(headers)
            .user_agent(concat!("etcd-sidekick/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| SetupError(e.to_string()))?;
        Ok(HttpProbe {
            client,
            url: spec.url.clone(),
            method: spec.method.clone(),
            expect_status: spec.expect_status.clone(),
            expect_body: spec.expect_body.clone(),
            timeout,
        })
    }

    /// Sends one request and judges the answer; the caller bounds the time.
    pub(super) async fn check(&self) -> Result<String, String> {
        let mut resp = self
            .client
            .request(self.method.clone(), self.url.clone())
            .send()
            .await
            .map_err(|e| describe(&e))?;
        let code = resp.status().as_u16();
        if !self.expect_status.contains(code) {
            return Err(format!("HTTP {code} is not an expected status"));
        }
        let Some(want) = &self.expect_body else {
            return Ok(format!("HTTP {code}"));
        };
        let mut body = Vec::new();
        while body.len() < BODY_LIMIT {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    let room = BODY_LIMIT - body.len();
                    body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
                Ok(None) => break,
                Err(e) => return Err(format!("HTTP {code}, reading the body failed: {}", describe(&e))),
            }
        }
        if contains(&body, want.as_bytes()) {
            Ok(format!("HTTP {code}, body matched"))
        } else {
            Err(format!("HTTP {code}, body lacks {want:?} in its first 64 KiB"))
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// reqwest's top-level message says little ("error sending request"); the
/// cause chain says what happened (connection refused, certificate, ...).
fn describe(err: &reqwest::Error) -> String {
    use std::error::Error;
    if err.is_timeout() {
        return "timed out".to_string();
    }
    let mut msg = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::contains;

    #[test]
    fn substring_search() {
        assert!(contains(b"status: ok", b"ok"));
        assert!(contains(b"abc", b""));
        assert!(!contains(b"o", b"ok"));
        assert!(!contains(b"", b"ok"));
    }
}
