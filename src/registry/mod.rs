//! Where the keys live: etcd, seen through the few requests this project
//! makes of it.
//!
//! [`Etcd`] is etcd's own shape (leases, transactions, watches), so the
//! composite operations in [`ops`] (put only where absent, withdraw what our
//! lease still holds, shared keys in one revision, split at etcd's limit of
//! operations per transaction) are written once and run unchanged against
//! both implementations: [`EtcdRegistry`], the real thing over gRPC, and
//! [`memory::Model`], a model of etcd on tokio's clock for unit tests of
//! timing logic. The model refuses what etcd refuses (too many operations,
//! a duplicate key, a lease it does not have, a compacted revision) and
//! keeps revisions and history, so a watch from a revision replays what
//! etcd would; `tests/it/model.rs` runs the same operations against both
//! and compares the answers.

mod etcd;
pub mod memory;
pub mod ops;

use std::fmt;
use std::time::Duration;

pub use etcd::{connect_options, keepalive_interval, EtcdRegistry};

/// etcd's default limit on the operations of one transaction
/// (`--max-txn-ops`); a nested transaction counts its own operations
/// against what its parent leaves.
pub const MAX_TXN_OPS: usize = 128;

/// An etcd lease id; shown in hex, as etcdctl does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub i64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// A key as etcd keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// Its value (lossy UTF-8).
    pub value: String,
    /// The revision that created it (since its last deletion).
    pub create_revision: i64,
    /// The revision of its last change.
    pub mod_revision: i64,
    /// Writes since its creation.
    pub version: i64,
    /// The lease holding it; 0 for none.
    pub lease: i64,
}

/// The keys a request covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Range {
    /// One key.
    Key(String),
    /// Every key starting with this (raw prefix).
    Prefix(String),
    /// Every key from `start` (included) to `end` (excluded), byte-wise:
    /// the one range a watch over several prefixes needs.
    Span {
        /// The first key of the range.
        start: String,
        /// The first key past it.
        end: Vec<u8>,
    },
}

impl Range {
    /// Whether `key` is in the range.
    pub fn contains(&self, key: &str) -> bool {
        match self {
            Range::Key(k) => k == key,
            Range::Prefix(p) => key.starts_with(p.as_str()),
            Range::Span { start, end } => key >= start.as_str() && key.as_bytes() < end.as_slice(),
        }
    }

    /// The smallest range covering every key under `prefixes`: the prefix
    /// itself when one covers all the others, else the span from the first
    /// prefix to the end of the last. The empty prefix covers every key.
    pub fn covering(prefixes: &[String]) -> Range {
        let mut sorted: Vec<&String> = prefixes.iter().collect();
        sorted.sort();
        let Some(first) = sorted.first() else {
            return Range::Prefix(String::new());
        };
        if sorted.iter().all(|p| p.starts_with(first.as_str())) {
            return Range::Prefix((*first).clone());
        }
        let last = sorted.last().expect("not empty");
        match prefix_end(last) {
            Some(end) => Range::Span {
                start: (*first).clone(),
                end,
            },
            // A prefix of 0xff bytes only: to the end of the key space,
            // which a span from `first` with no end would need; the whole
            // space from the first prefix is covered by its own prefix
            // range only if it covers all, so fall back to every key.
            None => Range::Prefix(String::new()),
        }
    }
}

/// The first key past every key starting with `prefix` (etcd's range end
/// for a prefix), or `None` when no key is past them all.
pub fn prefix_end(prefix: &str) -> Option<Vec<u8>> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// What a compare looks at; always compared for equality.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Writes since creation; 0 when the key does not exist.
    Version(i64),
    /// The creating revision; 0 when the key does not exist.
    CreateRevision(i64),
    /// The last change's revision; 0 when the key does not exist.
    ModRevision(i64),
    /// The lease holding the key; 0 for none or no key.
    Lease(i64),
    /// The value; never equal when the key does not exist.
    Value(String),
}

/// One condition of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    /// The key compared.
    pub key: String,
    /// What must equal what.
    pub target: Target,
}

impl Compare {
    /// `key`'s `target` equals the given value.
    pub fn new(key: &str, target: Target) -> Self {
        Compare {
            key: key.to_string(),
            target,
        }
    }
}

/// One operation of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Puts a key, under a lease (0 for none).
    Put {
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// The lease; 0 for none.
        lease: i64,
    },
    /// Deletes every key in the range.
    Delete(Range),
    /// Reads the range at `revision` (0: the transaction's).
    Get {
        /// What to read.
        range: Range,
        /// The revision to read at; 0 for the current one.
        revision: i64,
        /// Only count the keys.
        count_only: bool,
    },
    /// A nested transaction.
    Txn(Txn),
}

impl Op {
    /// Puts `key` = `value` under `lease` (0: none).
    pub fn put(key: &str, value: &str, lease: i64) -> Self {
        Op::Put {
            key: key.to_string(),
            value: value.to_string(),
            lease,
        }
    }

    /// Reads `range` now.
    pub fn get(range: Range) -> Self {
        Op::Get {
            range,
            revision: 0,
            count_only: false,
        }
    }
}

/// A transaction: when every compare holds, `then`, else `otherwise`, all
/// at one revision.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Txn {
    /// Conditions, all of which must hold.
    pub when: Vec<Compare>,
    /// Operations when they hold.
    pub then: Vec<Op>,
    /// Operations when one does not.
    pub otherwise: Vec<Op>,
}

/// The answer to one operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpResult {
    /// A put was done.
    Put,
    /// A delete was done: how many keys it removed.
    Delete(i64),
    /// What a read found, and how many keys matched.
    Get {
        /// The keys (empty with `count_only`).
        kvs: Vec<KeyValue>,
        /// How many keys matched.
        count: i64,
    },
    /// A nested transaction's answer.
    Txn(TxnResult),
}

/// The answer to a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnResult {
    /// Whether the compares held (`then` ran).
    pub succeeded: bool,
    /// The store's revision after the transaction.
    pub revision: i64,
    /// One answer per operation of the branch that ran.
    pub results: Vec<OpResult>,
}

/// A granted lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granted {
    /// Its id.
    pub id: LeaseId,
    /// The TTL etcd gave it.
    pub ttl: Duration,
}

/// What the member that answered says of itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Its etcd version, such as `3.5.17`.
    pub version: String,
}

/// A change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// A put (`true`) or a delete.
    pub put: bool,
    /// The key after the change; a deletion has only the key and its
    /// `mod_revision` (the deleting revision).
    pub kv: KeyValue,
}

/// Why an etcd request failed, as far as a caller branches on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No answer, a broken connection, no leader: try again, maybe on
    /// another endpoint.
    Unavailable,
    /// The lease named does not exist (expired, revoked, etcd lost it).
    LeaseNotFound,
    /// A lease with the asked-for id exists already.
    LeaseExists,
    /// More operations in a transaction than etcd allows.
    TooManyOps,
    /// A key put twice, or put and deleted, in one transaction.
    DuplicateKey,
    /// The revision asked for was compacted away.
    Compacted,
    /// The revision asked for is in the future.
    FutureRevision,
    /// Refused: authentication, permission, certificate.
    Denied,
    /// Anything else.
    Other,
}

/// Why an etcd operation failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("could not {op} at {endpoint}: {cause}")]
pub struct RegistryError {
    /// What was being done: `grant a lease`, `put the keys`, ...
    pub op: &'static str,
    /// The endpoint that was asked.
    pub endpoint: String,
    /// What went wrong.
    pub cause: String,
    /// The cause, for callers that branch on it.
    pub kind: ErrorKind,
}

impl RegistryError {
    /// Adds the keys being written to the cause, so that a refusal (no
    /// permission for a prefix, say) names them.
    pub fn writing<'a>(mut self, keys: impl IntoIterator<Item = &'a str>) -> Self {
        let names: Vec<&str> = keys.into_iter().collect();
        self.cause = format!("{} (writing {})", self.cause, names.join(", "));
        self
    }

    /// The same error for another operation.
    pub fn during(mut self, op: &'static str) -> Self {
        self.op = op;
        self
    }
}

/// etcd's requests, as this project makes them. Each call is one attempt;
/// the caller bounds its time, retries and backs off.
#[allow(async_fn_in_trait)]
pub trait Etcd {
    /// Grants a lease of `ttl`, with the id `id` when given; a lease with
    /// that id existing already is [`ErrorKind::LeaseExists`].
    async fn grant(&mut self, ttl: Duration, id: Option<LeaseId>) -> Result<Granted, RegistryError>;

    /// Refreshes `lease`; `Ok(None)` when etcd does not have it, else the
    /// TTL etcd keeps it for.
    async fn keep_alive(&mut self, lease: LeaseId) -> Result<Option<Duration>, RegistryError>;

    /// Revokes `lease`, deleting the keys attached to it in one revision;
    /// `Ok(false)` when etcd did not have it.
    async fn revoke(&mut self, lease: LeaseId) -> Result<bool, RegistryError>;

    /// The time `lease` has left, in whole seconds as etcd counts it
    /// (rounded down); `Ok(None)` when etcd does not have the lease (it
    /// answers a TTL of -1 then, not an error).
    async fn time_to_live(&mut self, lease: LeaseId) -> Result<Option<Duration>, RegistryError>;

    /// Runs one transaction.
    async fn txn(&mut self, txn: Txn) -> Result<TxnResult, RegistryError>;

    /// Watches `ranges` from revision `from` on (deletions only with
    /// `deletes_only`), on one stream, replacing any earlier watch.
    async fn watch(&mut self, ranges: &[Range], from: i64, deletes_only: bool) -> Result<(), RegistryError>;

    /// The next events of the watch, in revision order. Never returns
    /// while nothing is watched; an error means the watch ended (etcd
    /// restarted, compacted past it, cancelled it) and is gone.
    async fn watched(&mut self) -> Result<Vec<Event>, RegistryError>;

    /// The status of the member that answers.
    async fn status(&mut self) -> Result<Status, RegistryError>;

    /// Stops watching.
    fn unwatch(&mut self);

    /// Forgets the keep-alive stream of `lease`, if any (we no longer keep
    /// it alive).
    fn forget(&mut self, lease: LeaseId);

    /// The endpoint in use, for logs and status.
    fn endpoint(&self) -> &str;
}

#[cfg(test)]
mod range_tests {
    use super::*;

    fn p(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_covering_range_is_the_smallest() {
        assert_eq!(Range::covering(&p(&["/a/"])), Range::Prefix("/a/".into()));
        assert_eq!(Range::covering(&p(&["/a/b/", "/a/"])), Range::Prefix("/a/".into()));
        let span = Range::covering(&p(&["/web/", "/api/"]));
        assert_eq!(
            span,
            Range::Span {
                start: "/api/".into(),
                end: b"/web0".to_vec()
            }
        );
        for (key, inside) in [
            ("/api/1", true),
            ("/web/9", true),
            ("/db/1", true),
            ("/web0", false),
            ("/", false),
        ] {
            assert_eq!(span.contains(key), inside, "{key}");
        }
        assert_eq!(Range::covering(&p(&["", "/a/"])), Range::Prefix(String::new()));
        assert_eq!(prefix_end("a\u{7f}"), Some(b"a\x80".to_vec()));
        assert_eq!(prefix_end(""), None);
    }
}
