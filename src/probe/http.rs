//! The HTTP probe: status in the expected set, and the body containing the
//! expected text when one is given. Redirects are not followed.
//!
//! Built on hyper's connection-level HTTP/1.1 client (`client::conn::http1`),
//! not on a pooled client such as reqwest's: every probe opens a fresh
//! connection (TLS over it for `https://`), sends one request with
//! `Connection: close`, and drops the connection, as a load balancer's check
//! does. A pool would answer the next probe over a kept-alive connection and
//! so hide a listener that died or stopped accepting, which is what a probe
//! is there to see; and its redirects, decompression and pool timers would be
//! cost without use beside every instance. hyper does the HTTP/1.1 parsing
//! (interim `1xx` responses skipped, chunked and close-delimited bodies); the
//! probe reads body frames only until `--expect-body` is found, 64 KiB, or
//! the end.

use std::pin::pin;
use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue, ACCEPT, CONNECTION, HOST, USER_AGENT};
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::SetupError;
use crate::config::{HttpSpec, StatusSet};

/// How much of the body is searched for `--expect-body`.
const BODY_LIMIT: usize = 64 * 1024;
/// Header fields accepted in a response head (SPEC: up to 100 in all).
const MAX_HEADERS: usize = 100;
/// hyper's read buffer never grows past this, which also bounds the
/// response head.
const MAX_BUF: usize = 64 * 1024;

/// One HTTP(S) target with its request built once.
pub struct HttpProbe {
    host: String,
    port: u16,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    /// Boxed, so that this probe kind's size is not every `Probe`'s.
    request: Box<Fixed>,
    expect_status: StatusSet,
    expect_body: Option<String>,
    pub(super) timeout: Duration,
}

/// What every probe sends, and how its connection is set up.
struct Fixed {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    conn: http1::Builder,
}

impl std::fmt::Debug for HttpProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpProbe")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl HttpProbe {
    /// Builds the request and, for `https://`, sets up TLS once.
    pub fn new(spec: &HttpSpec, timeout: Duration) -> Result<Self, SetupError> {
        let tls = if spec.https {
            let config = super::tls::client_config(spec.insecure, &[])?;
            Some((TlsConnector::from(config), super::tls::server_name(&spec.host)?))
        } else {
            None
        };
        let uri = spec
            .path
            .parse()
            .map_err(|e| SetupError(format!("'{}' is not a request target: {e}", spec.path)))?;
        let mut conn = http1::Builder::new();
        conn.max_headers(MAX_HEADERS)
            .max_buf_size(MAX_BUF)
            // As curl and load balancers write them; a few old servers care.
            .title_case_headers(true);
        Ok(HttpProbe {
            host: spec.host.clone(),
            port: spec.port,
            tls,
            request: Box::new(Fixed {
                method: spec.method.clone(),
                uri,
                headers: request_headers(spec)?,
                conn,
            }),
            expect_status: spec.expect_status.clone(),
            expect_body: spec.expect_body.clone(),
            timeout,
        })
    }

    /// Sends one request on a fresh connection and judges the answer; the
    /// caller bounds the time.
    pub(super) async fn check(&self) -> Result<String, String> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("could not connect to {}:{}: {e}", self.host, self.port))?;
        match &self.tls {
            // No TCP_NODELAY here: hyper writes the request head in one
            // write, which Nagle's algorithm never holds back, and the
            // option would cost a syscall on every probe.
            None => self.exchange(tcp).await,
            Some((connector, name)) => {
                // A TLS handshake writes several small records in a row,
                // which Nagle's algorithm would hold back behind delayed ACKs.
                let _ = tcp.set_nodelay(true);
                let stream = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS handshake with {}:{} failed: {e}", self.host, self.port))?;
                self.exchange(stream).await
            }
        }
    }

    /// Drives the connection and the request side by side on this task (no
    /// task spawned per probe) until the verdict is in; returning drops the
    /// connection, unread body and all.
    async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(&self, stream: S) -> Result<String, String> {
        let (mut sender, mut conn) = self
            .request
            .conn
            .handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP/1.1 set-up failed: {}", chain(&e)))?;
        // Without hyper's shutdown(2) once the answer is in: dropping the
        // connection closes the socket, which sends the same FIN, and the
        // syscall saved counts on every probe.
        let mut conn = pin!(std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)));
        let mut verdict = pin!(self.judge(&mut sender));
        let mut conn_ended = false;
        loop {
            tokio::select! {
                biased;
                v = &mut verdict => return v,
                // The request's side sees any error of the connection too.
                _ = &mut conn, if !conn_ended => conn_ended = true,
            }
        }
    }

    async fn judge(&self, sender: &mut http1::SendRequest<Empty<Bytes>>) -> Result<String, String> {
        let mut req = Request::new(Empty::new());
        *req.method_mut() = self.request.method.clone();
        *req.uri_mut() = self.request.uri.clone();
        *req.headers_mut() = self.request.headers.clone();
        let resp = sender.send_request(req).await.map_err(|e| response_error(&e))?;
        let code = resp.status().as_u16();
        if !self.expect_status.contains(code) {
            return Err(format!("HTTP {code} is not an expected status"));
        }
        let Some(want) = &self.expect_body else {
            return Ok(format!("HTTP {code}"));
        };
        let want = want.as_bytes();
        let mut body = resp.into_body();
        let mut seen = Vec::new();
        // Where a match not already ruled out could start.
        let mut from = 0;
        loop {
            if contains(&seen[from..], want) {
                return Ok(format!("HTTP {code}, body matched"));
            }
            if seen.len() >= BODY_LIMIT {
                break;
            }
            from = seen.len().saturating_sub(want.len().saturating_sub(1));
            match body.frame().await {
                None => break,
                Some(Err(e)) => return Err(body_error(&e, seen.len())),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        let room = BODY_LIMIT - seen.len();
                        seen.extend_from_slice(&data[..data.len().min(room)]);
                    }
                }
            }
        }
        Err(format!(
            "HTTP {code}, body lacks {:?} in its first 64 KiB",
            String::from_utf8_lossy(want)
        ))
    }
}

/// Host (the URL's authority unless `--header Host:` overrides it), a
/// User-Agent and Accept unless given, the operator's headers, and
/// `Connection: close` whatever they say.
fn request_headers(spec: &HttpSpec) -> Result<HeaderMap, SetupError> {
    let has = |name: &str| spec.headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
    let value = |v: &str| HeaderValue::from_str(v).map_err(|e| SetupError(format!("header value {v:?}: {e}")));
    let mut headers = HeaderMap::new();
    if !has("host") {
        headers.insert(HOST, value(&spec.authority)?);
    }
    if !has("user-agent") {
        let ua = concat!("etcd-sidekick/", env!("CARGO_PKG_VERSION"));
        headers.insert(USER_AGENT, HeaderValue::from_static(ua));
    }
    if !has("accept") {
        headers.insert(ACCEPT, HeaderValue::from_static("*/*"));
    }
    for (name, v) in &spec.headers {
        let name =
            HeaderName::from_bytes(name.as_bytes()).map_err(|e| SetupError(format!("header name {name:?}: {e}")))?;
        if name != CONNECTION {
            headers.append(name, value(v)?);
        }
    }
    headers.insert(CONNECTION, HeaderValue::from_static("close"));
    Ok(headers)
}

/// Why no usable response head came.
fn response_error(e: &hyper::Error) -> String {
    if e.is_parse_too_large() {
        format!("response head has more than {MAX_HEADERS} header fields or 64 KiB")
    } else if e.is_parse() || e.is_parse_status() {
        format!("malformed response: {}", chain(e))
    } else if e.is_incomplete_message() {
        "connection closed before a whole response head".to_string()
    } else {
        format!("reading the response failed: {}", chain(e))
    }
}

/// Why the body could not be read to the needle.
fn body_error(e: &hyper::Error, read: usize) -> String {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::UnexpectedEof)
        {
            return format!("connection closed after {read} bytes of the body");
        }
        cause = c.source();
    }
    format!("reading the body failed after {read} bytes: {}", chain(e))
}

/// An error and its causes, `what: why: why`.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let s = c.to_string();
        if !out.ends_with(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cause = c.source();
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substring_search() {
        assert!(contains(b"status: ok", b"ok"));
        assert!(contains(b"abc", b""));
        assert!(!contains(b"o", b"ok"));
        assert!(!contains(b"", b"ok"));
    }

    #[test]
    fn requests_carry_host_and_close() {
        let spec = HttpSpec {
            https: false,
            host: "10.0.0.5".into(),
            port: 8080,
            authority: "10.0.0.5:8080".into(),
            path: "/health?full=1".into(),
            method: http::Method::HEAD,
            expect_status: StatusSet::default(),
            expect_body: None,
            headers: vec![
                ("X-Probe".into(), "1".into()),
                ("Connection".into(), "keep-alive".into()),
            ],
            insecure: false,
        };
        // (operator's headers, Host sent)
        let cases = [
            (vec![], "10.0.0.5:8080"),
            (vec![("host", "web.example")], "web.example"),
            (vec![("Host", "a"), ("X-Probe", "2")], "a"),
        ];
        for (extra, host) in cases {
            let mut spec = spec.clone();
            spec.headers
                .extend(extra.iter().map(|(n, v)| (n.to_string(), v.to_string())));
            let h = request_headers(&spec).unwrap();
            let all = |name: &str| h.get_all(name).iter().map(|v| v.to_str().unwrap()).collect::<Vec<_>>();
            assert_eq!(all("host"), [host], "{extra:?}");
            assert_eq!(all("connection"), ["close"], "{extra:?}");
            assert!(all("x-probe").contains(&"1"), "{extra:?}");
            assert_eq!(all("accept"), ["*/*"]);
        }
    }
}
