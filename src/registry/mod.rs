//! Where the keys live: the operations the sidekick needs from etcd.
//!
//! [`EtcdRegistry`] is the real thing; an in-memory fake with lease expiry
//! on tokio's clock (`MemoryRegistry`, built for unit tests only) stands in
//! for it in the unit tests of timing logic.

mod etcd;
#[cfg(test)]
mod memory;

use std::fmt;
use std::time::Duration;

pub use etcd::{connect_options, EtcdRegistry};
#[cfg(test)]
pub use memory::MemoryRegistry;

/// An etcd lease id; shown in hex, as etcdctl does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseId(pub i64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// A key that another lease (or a permanent write) holds, so it was left alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldElsewhere {
    /// The key.
    pub key: String,
    /// The lease holding it; `None` for a key without a lease.
    pub holder: Option<LeaseId>,
}

/// A shared key found present by a put-if-absent, so left as it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedPresent {
    /// The key.
    pub key: String,
    /// Its value there.
    pub value: String,
    /// The lease holding it; `None` for a permanent key.
    pub holder: Option<LeaseId>,
}

/// Why an etcd operation failed. Every such failure is retried.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("could not {op} at {endpoint}: {cause}")]
pub struct RegistryError {
    /// What was being done: `grant a lease`, `put the keys`, ...
    pub op: &'static str,
    /// The endpoint that was asked.
    pub endpoint: String,
    /// What went wrong.
    pub cause: String,
}

impl RegistryError {
    /// Adds the keys being written to the cause, so that a refusal (no
    /// permission for a prefix, say) names them.
    pub fn writing(mut self, keys: &[(String, String)]) -> Self {
        let names: Vec<&str> = keys.iter().map(|(k, _)| k.as_str()).collect();
        self.cause = format!("{} (writing {})", self.cause, names.join(", "));
        self
    }
}

/// The etcd operations of one sidekick. Each call is one attempt; the caller
/// bounds its time, retries and backs off.
#[allow(async_fn_in_trait)]
pub trait Registry {
    /// Grants a lease of `ttl`.
    async fn grant(&mut self, ttl: Duration) -> Result<LeaseId, RegistryError>;

    /// Refreshes `lease`. `Ok(false)` means etcd no longer has it (expired,
    /// revoked, or etcd lost its data).
    async fn keep_alive(&mut self, lease: LeaseId) -> Result<bool, RegistryError>;

    /// Puts `keys` under `lease`. With `takeover` every key is written
    /// whoever holds it; without, a key held by another lease or written
    /// without one is left alone and returned.
    async fn put(
        &mut self,
        lease: LeaseId,
        keys: &[(String, String)],
        takeover: bool,
    ) -> Result<Vec<HeldElsewhere>, RegistryError>;

    /// Revokes `lease`, deleting exactly the keys still attached to it. A
    /// lease that no longer exists counts as revoked.
    async fn revoke(&mut self, lease: LeaseId) -> Result<(), RegistryError>;

    /// Deletes each of `keys` that `lease` still holds, in one transaction
    /// (one revision): a key another writer holds now is left alone.
    /// Returns how many were deleted.
    async fn withdraw_keys(&mut self, lease: LeaseId, keys: &[String]) -> Result<usize, RegistryError>;

    /// Puts each shared key that does not exist (compared by creation
    /// revision, one transaction a key) under `lease`, and never touches one
    /// that does. Returns the keys found present, and the revision at which
    /// all were checked, from which a watch misses nothing.
    async fn put_shared(
        &mut self,
        lease: LeaseId,
        keys: &[(String, String)],
    ) -> Result<(Vec<SharedPresent>, i64), RegistryError>;

    /// Watches `keys` for deletion from revision `from` on, on one stream,
    /// replacing any earlier watch.
    async fn watch_deleted(&mut self, keys: &[String], from: i64) -> Result<(), RegistryError>;

    /// Waits for watched keys to be deleted and returns them. Never returns
    /// while nothing is watched; an error means the watch broke (etcd
    /// restarted, say) and must be set up again.
    async fn deleted(&mut self) -> Result<Vec<String>, RegistryError>;

    /// Stops watching.
    fn unwatch(&mut self);

    /// The endpoint in use, for logs and status.
    fn endpoint(&self) -> &str;
}
