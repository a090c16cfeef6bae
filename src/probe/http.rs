//! The HTTP probe: status in the expected set, and the body containing the
//! expected text when one is given. Redirects are not followed.
//!
//! A small HTTP/1.1 client of our own rather than a general one: a probe
//! sends one fixed request on a fresh connection (as a load balancer's check
//! does) and reads at most a 16 KiB head and a 64 KiB body, so a general
//! client's pooling, redirects and decompression would be cost without use.
//! On a node running one sidekick per instance, every probe's CPU and every
//! resident page count many times over.

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::SetupError;
use crate::config::{HttpSpec, StatusSet};

/// How much of the body is searched for `--expect-body`.
const BODY_LIMIT: usize = 64 * 1024;
/// The largest response head accepted.
const HEAD_LIMIT: usize = 16 * 1024;

/// One HTTP(S) target with its request rendered once.
pub struct HttpProbe {
    host: String,
    port: u16,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    request: Vec<u8>,
    head_only: bool,
    expect_status: StatusSet,
    expect_body: Option<String>,
    pub(super) timeout: Duration,
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
    /// Renders the request and, for `https://`, sets up TLS once.
    pub fn new(spec: &HttpSpec, timeout: Duration) -> Result<Self, SetupError> {
        let tls = if spec.https {
            let name = ServerName::try_from(spec.host.clone())
                .map_err(|e| SetupError(format!("'{}' is not a TLS server name: {e}", spec.host)))?;
            Some((tls_connector(spec.insecure)?, name))
        } else {
            None
        };
        Ok(HttpProbe {
            host: spec.host.clone(),
            port: spec.port,
            tls,
            request: render_request(spec),
            head_only: spec.method == http::Method::HEAD,
            expect_status: spec.expect_status.clone(),
            expect_body: spec.expect_body.clone(),
            timeout,
        })
    }

    /// Sends one request and judges the answer; the caller bounds the time.
    pub(super) async fn check(&self) -> Result<String, String> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("could not connect to {}:{}: {e}", self.host, self.port))?;
        match &self.tls {
            // No TCP_NODELAY here: the request goes out in one write, which
            // Nagle's algorithm never holds back, and the option would cost
            // a syscall on every probe.
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

    async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(&self, mut s: S) -> Result<String, String> {
        s.write_all(&self.request)
            .await
            .map_err(|e| format!("sending the request failed: {e}"))?;
        let mut buf = Vec::with_capacity(1024);
        let (code, head_len, framing) = loop {
            if read_some(&mut s, &mut buf, HEAD_LIMIT).await? == 0 {
                return Err(format!(
                    "connection closed after {} bytes, before a whole response head",
                    buf.len()
                ));
            }
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&buf) {
                Ok(httparse::Status::Complete(len)) => {
                    let code = resp.code.unwrap_or(0);
                    break (code, len, Framing::of(resp.headers));
                }
                Ok(httparse::Status::Partial) if buf.len() >= HEAD_LIMIT => {
                    return Err("response head is larger than 16 KiB".to_string())
                }
                Ok(httparse::Status::Partial) => {}
                Err(e) => return Err(format!("malformed response: {e}")),
            }
        };
        if !self.expect_status.contains(code) {
            return Err(format!("HTTP {code} is not an expected status"));
        }
        let Some(want) = &self.expect_body else {
            return Ok(format!("HTTP {code}"));
        };
        let framing = if self.head_only || code == 204 || code == 304 {
            Framing::Length(0)
        } else {
            framing
        };
        let body = read_body(&mut s, buf.split_off(head_len), framing, want.as_bytes()).await?;
        if contains(&body, want.as_bytes()) {
            Ok(format!("HTTP {code}, body matched"))
        } else {
            Err(format!("HTTP {code}, body lacks {want:?} in its first 64 KiB"))
        }
    }
}

/// `METHOD /path HTTP/1.1` with Host, the operator's headers, and
/// `Connection: close`.
fn render_request(spec: &HttpSpec) -> Vec<u8> {
    let has = |name: &str| spec.headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
    let mut req = format!("{} {} HTTP/1.1\r\n", spec.method, spec.path);
    if !has("host") {
        req.push_str(&format!("Host: {}\r\n", spec.authority));
    }
    if !has("user-agent") {
        req.push_str(concat!("User-Agent: etcd-sidekick/", env!("CARGO_PKG_VERSION"), "\r\n"));
    }
    if !has("accept") {
        req.push_str("Accept: */*\r\n");
    }
    for (name, value) in &spec.headers {
        if !name.eq_ignore_ascii_case("connection") {
            req.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    req.push_str("Connection: close\r\n\r\n");
    req.into_bytes()
}

/// How the body's end is marked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked,
    UntilClose,
}

impl Framing {
    fn of(headers: &[httparse::Header<'_>]) -> Framing {
        let value = |name: &str| {
            headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
        };
        if value("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            Framing::Chunked
        } else if let Some(n) = value("content-length").and_then(|v| v.trim().parse().ok()) {
            Framing::Length(n)
        } else {
            Framing::UntilClose
        }
    }
}

/// Reads once into `buf` (which never grows past `limit`); 0 means end of
/// stream.
async fn read_some<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>, limit: usize) -> Result<usize, String> {
    let mut chunk = [0u8; 8192];
    let room = limit.saturating_sub(buf.len()).clamp(1, chunk.len());
    let n = s
        .read(&mut chunk[..room])
        .await
        .map_err(|e| format!("reading the response failed: {e}"))?;
    buf.extend_from_slice(&chunk[..n.min(limit.saturating_sub(buf.len()))]);
    Ok(n)
}

/// Reads the body (starting with what came with the head) until its end,
/// 64 KiB, or `want` is found.
async fn read_body<S: AsyncRead + Unpin>(
    s: &mut S,
    first: Vec<u8>,
    framing: Framing,
    want: &[u8],
) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    let mut chunked = Dechunk::default();
    let mut raw = first;
    loop {
        match framing {
            Framing::Chunked => chunked.feed(&raw, &mut body)?,
            Framing::Length(n) => {
                let room = (n as usize).min(BODY_LIMIT).saturating_sub(body.len());
                body.extend_from_slice(&raw[..raw.len().min(room)]);
            }
            Framing::UntilClose => {
                let room = BODY_LIMIT - body.len();
                body.extend_from_slice(&raw[..raw.len().min(room)]);
            }
        }
        body.truncate(BODY_LIMIT);
        let complete = match framing {
            Framing::Chunked => chunked.done,
            Framing::Length(n) => body.len() as u64 >= n,
            Framing::UntilClose => false,
        };
        if complete || body.len() >= BODY_LIMIT || contains(&body, want) {
            return Ok(body);
        }
        raw.clear();
        if read_some(s, &mut raw, 8192).await? == 0 {
            return match framing {
                Framing::UntilClose => Ok(body),
                _ => Err(format!("connection closed after {} bytes of the body", body.len())),
            };
        }
    }
}

/// A chunked transfer-coding decoder fed with whatever arrives.
#[derive(Debug, Default)]
struct Dechunk {
    /// Bytes of the current chunk still to copy.
    left: usize,
    /// The CRLF after a chunk's data is still to skip.
    skip_crlf: bool,
    /// The size line read so far.
    line: Vec<u8>,
    done: bool,
}

impl Dechunk {
    fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        while !input.is_empty() && !self.done {
            if self.left > 0 {
                let n = self.left.min(input.len());
                out.extend_from_slice(&input[..n]);
                self.left -= n;
                input = &input[n..];
                self.skip_crlf = self.left == 0;
                continue;
            }
            if self.skip_crlf {
                // Drop the CR and LF that end the data, as they come.
                if matches!(input[0], b'\r' | b'\n') {
                    if input[0] == b'\n' {
                        self.skip_crlf = false;
                    }
                    input = &input[1..];
                    continue;
                }
                self.skip_crlf = false;
            }
            match input.iter().position(|&b| b == b'\n') {
                None => {
                    self.line.extend_from_slice(input);
                    input = &[];
                }
                Some(i) => {
                    self.line.extend_from_slice(&input[..i]);
                    input = &input[i + 1..];
                    let line = String::from_utf8_lossy(&self.line).to_string();
                    let size = line.split(';').next().unwrap_or("").trim();
                    self.left = usize::from_str_radix(size, 16)
                        .map_err(|_| format!("malformed chunked body: chunk size {size:?}"))?;
                    self.line.clear();
                    self.done = self.left == 0;
                }
            }
            if self.line.len() > 1024 {
                return Err("malformed chunked body: chunk size line too long".to_string());
            }
        }
        Ok(())
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// TLS for `https://` probes: the system's trust roots, or none checked at
/// all with `--insecure`.
fn tls_connector(insecure: bool) -> Result<TlsConnector, SetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| SetupError(e.to_string()))?;
    let config = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(found.certs);
        if roots.is_empty() {
            return Err(SetupError(
                "no trusted CA certificates found on this system for https:// probes; install ca-certificates, or use --insecure".into(),
            ));
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    Ok(TlsConnector::from(Arc::new(config)))
}

/// `--insecure`: any certificate is accepted; signatures are still checked
/// so the handshake itself is sound.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
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
    fn chunked_bodies_decode_however_they_are_split() {
        let wire = b"4\r\nWiki\r\n6;ext=1\r\npedia \r\nE\r\nin \r\n\r\nchunks.\r\n0\r\n\r\n";
        for split in 1..wire.len() {
            let mut d = Dechunk::default();
            let mut out = Vec::new();
            for piece in wire.chunks(split) {
                d.feed(piece, &mut out).unwrap();
            }
            assert!(d.done, "split {split}");
            assert_eq!(out, b"Wikipedia in \r\n\r\nchunks.", "split {split}");
        }
        let mut d = Dechunk::default();
        assert!(d.feed(b"zz\r\n", &mut Vec::new()).is_err());
    }

    #[test]
    fn framing_from_headers() {
        let h = |name: &'static str, value: &'static [u8]| httparse::Header { name, value };
        assert_eq!(Framing::of(&[h("Content-Length", b" 12 ")]), Framing::Length(12));
        assert_eq!(
            Framing::of(&[h("transfer-encoding", b"gzip, Chunked")]),
            Framing::Chunked
        );
        assert_eq!(Framing::of(&[h("X", b"1")]), Framing::UntilClose);
    }

    #[test]
    fn requests_render_once_with_host_and_close() {
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
        let req = String::from_utf8(render_request(&spec)).unwrap();
        assert!(
            req.starts_with("HEAD /health?full=1 HTTP/1.1\r\nHost: 10.0.0.5:8080\r\n"),
            "{req}"
        );
        assert!(
            req.contains("X-Probe: 1\r\n") && req.ends_with("Connection: close\r\n\r\n"),
            "{req}"
        );
        assert!(!req.contains("keep-alive"));
        let spec = HttpSpec {
            headers: vec![("host".into(), "web.example".into())],
            ..spec
        };
        let req = String::from_utf8(render_request(&spec)).unwrap();
        assert!(
            req.contains("host: web.example\r\n") && !req.contains("Host: 10.0.0.5"),
            "{req}"
        );
    }
}
