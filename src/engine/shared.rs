//! Shared keys, held jointly: each under a service lease whose id every
//! declaring instance computes alike, so no instance leaving takes them.

use ring::digest::{digest, SHA256};

use crate::registry::LeaseId;

/// The service lease of a shared key: the first 8 bytes of SHA-256 over
/// `KEY=VALUE\n`, big-endian, top bit cleared (etcd's ids are positive),
/// 0 read as 1 (etcd reads 0 as "choose one").
pub fn lease_id(key: &str, value: &str) -> LeaseId {
    let hash = digest(&SHA256, format!("{key}={value}\n").as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_ref()[..8]);
    let id = i64::from_be_bytes(first) & i64::MAX;
    LeaseId(if id == 0 { 1 } else { id })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_is_the_first_eight_bytes_of_sha256_with_the_top_bit_cleared() {
        // printf '/services/web/host_port=8080\n' | sha256sum | cut -c1-16
        let id = lease_id("/services/web/host_port", "8080");
        let hex = std::process::Command::new("sh")
            .args([
                "-c",
                "printf '/services/web/host_port=8080\\n' | sha256sum | cut -c1-16",
            ])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        let expected = i64::from_str_radix(&hex, 16)
            .or_else(|_| u64::from_str_radix(&hex, 16).map(|u| (u & (i64::MAX as u64)) as i64))
            .expect("sha256sum output");
        assert_eq!(id.0, expected & i64::MAX);
        assert!(id.0 > 0);
        assert_ne!(lease_id("/k", "a"), lease_id("/k", "b"), "the value counts");
    }
}
