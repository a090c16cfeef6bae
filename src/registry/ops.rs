//! The composite operations of this project, written once over [`Etcd`]:
//! each is a few transactions built here, so the model and the real etcd
//! run the very same requests. None exceeds [`MAX_TXN_OPS`]: longer lists
//! are split over several transactions.

use std::collections::BTreeMap;
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

/// How many nested transactions each fit in one, when each needs `inner`
/// operations of what its parent leaves: etcd counts a nested
/// transaction's operations (its longest list) against what its parent
/// leaves, level by level.
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

/// What a registration left in etcd.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registered {
    /// Keys another lease (or a permanent write) holds, left alone.
    pub held: Vec<HeldElsewhere>,
    /// Each key now ours, with the revision of the put that wrote it: what
    /// identifies this registration, so that its withdrawal (see
    /// [`withdraw_keys`]) deletes this one and no later one.
    pub ours: Vec<(String, i64)>,
}

/// Puts `keys` under `lease`. With `takeover` every key is written whoever
/// holds it; without, a key that exists on another lease (or none) is left
/// alone and returned. A key our lease holds already is written again, so
/// that it carries this registration's revision, unless `known` gives the
/// revision it still has (a key this registration wrote before, retried
/// for the others): that one is left as it is. Each transaction lands in
/// one revision, so a watcher sees up to [`MAX_TXN_OPS`] keys appear
/// together.
pub async fn put_keys<E: Etcd>(
    reg: &mut E,
    lease: LeaseId,
    keys: &[(String, String)],
    known: &BTreeMap<String, i64>,
    takeover: bool,
) -> Result<Registered, RegistryError> {
    let mut out = Registered::default();
    if takeover {
        for chunk in keys.chunks(MAX_TXN_OPS) {
            let then = chunk.iter().map(|(k, v)| Op::put(k, v, lease.0)).collect();
            let r = reg
                .txn(Txn { then, ..Txn::default() })
                .await
                .map_err(|e| e.during("put the keys").writing(chunk.iter().map(|(k, _)| k.as_str())))?;
            out.ours.extend(chunk.iter().map(|(k, _)| (k.clone(), r.revision)));
        }
        return Ok(out);
    }
    for chunk in keys.chunks(nested_per_txn(3)) {
        // Put where our lease is, or nobody is: a key that exists on
        // another lease belongs to someone else now.
        let then = chunk
            .iter()
            .map(|(k, v)| {
                let put = Txn {
                    when: vec![Compare::new(k, Target::Lease(lease.0))],
                    then: vec![Op::put(k, v, lease.0)],
                    otherwise: vec![Op::Txn(Txn {
                        when: vec![Compare::new(k, Target::Version(0))],
                        then: vec![Op::put(k, v, lease.0)],
                        otherwise: vec![Op::get(Range::Key(k.clone()))],
                    })],
                };
                match known.get(k) {
                    Some(&rev) if rev > 0 => Op::Txn(Txn {
                        when: vec![Compare::new(k, Target::ModRevision(rev))],
                        then: vec![],
                        otherwise: vec![Op::Txn(put)],
                    }),
                    _ => Op::Txn(put),
                }
            })
            .collect();
        let r = reg
            .txn(Txn { then, ..Txn::default() })
            .await
            .map_err(|e| e.during("put the keys").writing(chunk.iter().map(|(k, _)| k.as_str())))?;
        for ((k, _), t) in chunk.iter().zip(nested(&r.results)) {
            let mut t = t;
            if let Some(&rev) = known.get(k).filter(|&&rev| rev > 0) {
                if t.succeeded {
                    out.ours.push((k.clone(), rev));
                    continue;
                }
                t = nested(&t.results).next().expect("the put, nested");
            }
            match nested(&t.results).next() {
                Some(inner) if !t.succeeded && !inner.succeeded => out.held.push(HeldElsewhere {
                    key: k.clone(),
                    holder: found(inner).and_then(|kv| holder(kv.lease)),
                }),
                _ => out.ours.push((k.clone(), r.revision)),
            }
        }
    }
    Ok(out)
}

/// Deletes each of `keys` (a key and the revision of our registration
/// that wrote it, 0 when unknown) that `lease` still holds and nobody
/// wrote since: a key another writer holds now is left alone, and so is a
/// later registration of ours, should etcd apply this withdrawal late (it
/// timed out on a member cut off from us, and reached etcd once the link
/// came back). Up to [`MAX_TXN_OPS`] − 2 keys go in one revision (each
/// compares two things). Returns how many were deleted, and the revision
/// after the last transaction.
pub async fn withdraw_keys<E: Etcd>(
    reg: &mut E,
    lease: LeaseId,
    keys: &[(String, i64)],
) -> Result<(usize, i64), RegistryError> {
    let mut deleted = 0;
    let mut revision = 0;
    for chunk in keys.chunks(nested_per_txn(2)) {
        let then = chunk
            .iter()
            .map(|(k, rev)| {
                let mut when = vec![Compare::new(k, Target::Lease(lease.0))];
                if *rev > 0 {
                    when.push(Compare::new(k, Target::ModRevision(*rev)));
                }
                Op::Txn(Txn {
                    when,
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
        revision = r.revision;
    }
    Ok((deleted, revision))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::memory::Model;
    use crate::registry::Etcd;

    const KEY: &str = "/services/web/1";

    fn pairs(n: usize) -> Vec<(String, String)> {
        (0..n)
            .map(|i| (format!("/services/web/{i}"), "v".to_string()))
            .collect()
    }

    // Regression (found by the fault campaign): an agent's withdrawal that
    // timed out on a member cut off from it reached etcd once the link came
    // back, after the agent had registered the service again under the same
    // lease; comparing the lease alone, it deleted the new registration.
    #[tokio::test]
    async fn a_late_withdrawal_does_not_delete_a_later_registration() {
        let mut reg = Model::new();
        let lease = reg.grant(Duration::from_secs(15), None).await.unwrap().id;
        let keys = pairs(1);
        let first = put_keys(&mut reg, lease, &keys, &BTreeMap::new(), false).await.unwrap();
        assert_eq!(first.ours.len(), 1);
        // The withdrawal as first sent, which times out; done again elsewhere.
        let late = first.ours.clone();
        assert_eq!(withdraw_keys(&mut reg, lease, &first.ours).await.unwrap().0, 1);
        put_keys(&mut reg, lease, &keys, &BTreeMap::new(), false).await.unwrap();
        // Delivered late.
        assert_eq!(withdraw_keys(&mut reg, lease, &late).await.unwrap().0, 0);
        assert!(
            reg.get("/services/web/0").is_some(),
            "the later registration was deleted"
        );
    }

    // The same when the first withdrawal never took effect before the
    // service came back: the registration writes the key again, so the
    // late copy meets a newer revision.
    #[tokio::test]
    async fn registering_again_under_our_lease_writes_the_key_again() {
        let mut reg = Model::new();
        let lease = reg.grant(Duration::from_secs(15), None).await.unwrap().id;
        let keys = vec![(KEY.to_string(), "v".to_string())];
        let first = put_keys(&mut reg, lease, &keys, &BTreeMap::new(), false).await.unwrap();
        let again = put_keys(&mut reg, lease, &keys, &BTreeMap::new(), false).await.unwrap();
        assert!(again.held.is_empty());
        assert!(again.ours[0].1 > first.ours[0].1, "{again:?} after {first:?}");
        assert_eq!(reg.get(KEY).unwrap().mod_revision, again.ours[0].1);
        assert_eq!(withdraw_keys(&mut reg, lease, &first.ours).await.unwrap().0, 0);
        assert!(reg.get(KEY).is_some());
        // Retried for keys held elsewhere: what it wrote stays unwritten.
        let known = again.ours.iter().cloned().collect();
        let revision = reg.revision();
        let retried = put_keys(&mut reg, lease, &keys, &known, false).await.unwrap();
        assert_eq!((retried.ours, reg.revision()), (again.ours.clone(), revision));
        assert_eq!(withdraw_keys(&mut reg, lease, &again.ours).await.unwrap().0, 1);
        assert!(reg.get(KEY).is_none());
    }

    #[tokio::test]
    async fn a_key_on_another_lease_is_neither_written_nor_withdrawn() {
        let mut reg = Model::new();
        let lease = reg.grant(Duration::from_secs(15), None).await.unwrap().id;
        reg.put_foreign(KEY, "theirs", 0);
        let keys = vec![(KEY.to_string(), "v".to_string())];
        let done = put_keys(&mut reg, lease, &keys, &BTreeMap::new(), false).await.unwrap();
        assert!(done.ours.is_empty());
        assert_eq!(
            done.held,
            vec![HeldElsewhere {
                key: KEY.into(),
                holder: None
            }]
        );
        let rev = reg.get(KEY).unwrap().mod_revision;
        assert_eq!(withdraw_keys(&mut reg, lease, &[(KEY.into(), rev)]).await.unwrap().0, 0);
        assert_eq!(reg.get(KEY).unwrap().value, "theirs");
    }

    // The model refuses what etcd refuses: more operations than a nested
    // transaction leaves room for.
    #[tokio::test]
    async fn many_keys_fit_within_the_transaction_limit() {
        let mut reg = Model::new();
        let lease = reg.grant(Duration::from_secs(15), None).await.unwrap().id;
        let keys = pairs(3 * MAX_TXN_OPS);
        let done = put_keys(&mut reg, lease, &keys, &BTreeMap::new(), false).await.unwrap();
        assert_eq!(done.ours.len(), keys.len());
        let again = put_keys(&mut reg, lease, &keys, &BTreeMap::new(), false).await.unwrap();
        assert_eq!(again.ours.len(), keys.len());
        assert_eq!(withdraw_keys(&mut reg, lease, &again.ours).await.unwrap().0, keys.len());
        assert!(reg.keys("/services/web/").is_empty());
    }
}
