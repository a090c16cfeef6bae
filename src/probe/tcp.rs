//! The TCP probe: healthy when a connection opens within the timeout.

use std::time::Duration;

use tokio::net::TcpStream;

/// Connects to `host:port`.
#[derive(Debug)]
pub struct TcpProbe {
    host: String,
    port: u16,
    pub(super) timeout: Duration,
}

impl TcpProbe {
    /// A probe of `host:port`.
    pub fn new(host: &str, port: u16, timeout: Duration) -> Self {
        TcpProbe {
            host: host.to_string(),
            port,
            timeout,
        }
    }

    /// Opens and closes one connection; the caller bounds the time.
    pub(super) async fn check(&self) -> Result<String, String> {
        match TcpStream::connect((self.host.as_str(), self.port)).await {
            Ok(_) => Ok("connected".to_string()),
            Err(e) => Err(format!("could not connect to {}:{}: {e}", self.host, self.port)),
        }
    }
}
