//! The composite operations of this project, written once over [`Etcd`]:
//! each is a few transactions built here, so the model and the real etcd
//! run the very same requests. None exceeds [`MAX_TXN_OPS`]: longer lists
//! are split over several transactions.

use std::time::Duration;

use super::{
    Compare, ErrorKind, Etcd, KeyValue, LeaseId, Op, OpResult, Range, RegistryError, Target, Txn, MAX_TXN_OPS,
};

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

/// How many nested transactions of `inner` operations each fit in one: etcd
/// counts a nested transaction's operations against what its parent leaves.
const fn nested_per_txn(inner: usize) -> usize {
    MAX_TXN_OPS - inner
}

fn holder(lease: i64) -> Option<LeaseId> {
    (lease != 0).then_some(LeaseId(lease))
}

fn nested(results: &[OpResult]) -> impl Iterator<Item = &super::TxnResult> {
    results.iter().filter_map(|r| match r {
        OpResult::Txn(t) => Some(t),
        _ => None,
    })
}

fn found(t: &super::TxnResult) -> Option<&KeyValue> {
    t.results.iter().find_map(|r| match r {
        OpResult::Get { kvs, .. } => kvs.first(),
        _ => None,
    })
}

/// Puts `keys` under `lease`. With `takeover` every key is written whoever
/// holds it; without, a key that exists on another lease (or none) is left
/// alone and returned. Each transaction lands in one revision, so a
/// watcher sees up to [`MAX_TXN_OPS`] keys appear together.
pub async fn put_keys<E: Etcd>(
    reg: &mut E,
    lease: LeaseId,
    keys: &[(String, String)],
    takeover: bool,
) -> Result<Vec<HeldElsewhere>, RegistryError> {
    let mut held = Vec::new();
    if takeover {
        for chunk in keys.chunks(MAX_TXN_OPS) {
            let then = chunk.iter().map(|(k, v)| Op::put(k, v, lease.0)).collect();
            reg.txn(Txn { then, ..Txn::default() })
                .await
                .map_err(|e| e.during("put the keys").writing(chunk.iter().map(|(k, _)| k.as_str())))?;
        }
        return Ok(held);
    }
    for chunk in keys.chunks(nested_per_txn(1)) {
        // Put only where nobody is: a key that exists and is not on our
        // lease belongs to someone else now.
        let then = chunk
            .iter()
            .map(|(k, v)| {
                Op::Txn(Txn {
                    when: vec![Compare::new(k, Target::Version(0))],
                    then: vec![Op::put(k, v, lease.0)],
                    otherwise: vec![Op::get(Range::Key(k.clone()))],
                })
            })
            .collect();
        let r = reg
            .txn(Txn { then, ..Txn::default() })
            .await
            .map_err(|e| e.during("put the keys").writing(chunk.iter().map(|(k, _)| k.as_str())))?;
        for ((k, _), t) in chunk.iter().zip(nested(&r.results)) {
            if t.succeeded {
                continue;
            }
            match found(t) {
                Some(kv) if kv.lease == lease.0 => {}
                kv => held.push(HeldElsewhere {
                    key: k.clone(),
                    holder: kv.and_then(|kv| holder(kv.lease)),
                }),
            }
        }
    }
    Ok(held)
}

/// Deletes each of `keys` that `lease` still holds: a key another writer
/// holds now is left alone. Up to [`MAX_TXN_OPS`] − 1 keys go in one
/// revision. Returns how many were deleted.
pub async fn withdraw_keys<E: Etcd>(reg: &mut E, lease: LeaseId, keys: &[String]) -> Result<usize, RegistryError> {
    let mut deleted = 0;
    for chunk in keys.chunks(nested_per_txn(1)) {
        let then = chunk
            .iter()
            .map(|k| {
                Op::Txn(Txn {
                    when: vec![Compare::new(k, Target::Lease(lease.0))],
                    then: vec![Op::Delete(Range::Key(k.clone()))],
                    otherwise: vec![],
                })
            })
            .collect();
        let r = reg
            .txn(Txn { then, ..Txn::default() })
            .await
            .map_err(|e| e.during("withdraw the keys"))?;
        deleted += nested(&r.results).filter(|t| t.succeeded).count();
    }
    Ok(deleted)
}

/// Puts each shared key (key, value, its service lease) that does not
/// exist, compared by creation revision, in one transaction (one revision,
/// so a watcher never sees part of the set; split past the limit), and
/// never touches one that does. Returns the keys found present, and the
/// revision at which all were checked, from which a watch misses nothing.
pub async fn put_shared<E: Etcd>(
    reg: &mut E,
    keys: &[(String, String, LeaseId)],
) -> Result<(Vec<SharedPresent>, i64), RegistryError> {
    let mut present = Vec::new();
    let mut revision = 0;
    for chunk in keys.chunks(nested_per_txn(1)) {
        let then = chunk
            .iter()
            .map(|(k, v, lease)| {
                Op::Txn(Txn {
                    when: vec![Compare::new(k, Target::CreateRevision(0))],
                    then: vec![Op::put(k, v, lease.0)],
                    otherwise: vec![Op::get(Range::Key(k.clone()))],
                })
            })
            .collect();
        let r = reg.txn(Txn { then, ..Txn::default() }).await.map_err(|e| {
            e.during("put the shared keys")
                .writing(chunk.iter().map(|(k, _, _)| k.as_str()))
        })?;
        revision = revision.max(r.revision);
        for ((k, _, _), t) in chunk.iter().zip(nested(&r.results)) {
            if let (false, Some(kv)) = (t.succeeded, found(t)) {
                present.push(SharedPresent {
                    key: k.clone(),
                    value: kv.value.clone(),
                    holder: holder(kv.lease),
                });
            }
        }
    }
    Ok((present, revision))
}

/// Reads `keys` (each a whole key) at one revision: the first transaction
/// fixes it and the others read at it. Returns the keys present, in the
/// order given, and the revision.
pub async fn read_keys<E: Etcd>(reg: &mut E, keys: &[String]) -> Result<(Vec<KeyValue>, i64), RegistryError> {
    let mut revision = 0;
    let mut present = Vec::new();
    for chunk in keys.chunks(MAX_TXN_OPS) {
        let then = chunk
            .iter()
            .map(|k| Op::Get {
                range: Range::Key(k.clone()),
                revision,
                count_only: false,
            })
            .collect();
        let r = reg
            .txn(Txn { then, ..Txn::default() })
            .await
            .map_err(|e| e.during("read the keys"))?;
        if revision == 0 {
            revision = r.revision;
        }
        for res in &r.results {
            if let OpResult::Get { kvs, .. } = res {
                present.extend(kvs.iter().cloned());
            }
        }
    }
    Ok((present, revision))
}

/// Reads every key under each of `prefixes` in one transaction, at one
/// revision.
pub async fn read_prefixes<E: Etcd>(reg: &mut E, prefixes: &[String]) -> Result<(Vec<KeyValue>, i64), RegistryError> {
    let then = prefixes.iter().map(|p| Op::get(Range::Prefix(p.clone()))).collect();
    let r = reg
        .txn(Txn { then, ..Txn::default() })
        .await
        .map_err(|e| e.during("read the keys"))?;
    let mut kvs: Vec<KeyValue> = r
        .results
        .into_iter()
        .flat_map(|res| match res {
            OpResult::Get { kvs, .. } => kvs,
            _ => Vec::new(),
        })
        .collect();
    kvs.sort_by(|a, b| a.key.cmp(&b.key));
    kvs.dedup_by(|a, b| a.key == b.key);
    Ok((kvs, r.revision))
}

/// Counts the keys under the raw `prefix` without reading them. Returns
/// the count and the revision it was taken at.
pub async fn count_prefix<E: Etcd>(reg: &mut E, prefix: &str) -> Result<(u64, i64), RegistryError> {
    let get = Op::Get {
        range: Range::Prefix(prefix.to_string()),
        revision: 0,
        count_only: true,
    };
    let r = reg
        .txn(Txn {
            then: vec![get],
            ..Txn::default()
        })
        .await
        .map_err(|e| e.during("read the keys"))?;
    let count = r.results.iter().find_map(|res| match res {
        OpResult::Get { count, .. } => Some(*count),
        _ => None,
    });
    Ok((count.unwrap_or(0).max(0) as u64, r.revision))
}

/// Runs `f` against `reg` within `limit`, its error naming `op`: what
/// etcd does not answer in time fails as [`ErrorKind::Unavailable`].
pub async fn within<E: Etcd, T>(
    reg: &mut E,
    limit: Duration,
    op: &'static str,
    f: impl AsyncFnOnce(&mut E) -> Result<T, RegistryError>,
) -> Result<T, RegistryError> {
    match tokio::time::timeout(limit, f(reg)).await {
        Ok(r) => r.map_err(|e| e.during(op)),
        Err(_) => Err(RegistryError {
            op,
            endpoint: reg.endpoint().to_string(),
            cause: format!("no answer within {}", humantime::format_duration(limit)),
            kind: ErrorKind::Unavailable,
        }),
    }
}
