//! The one-shot etcd commands: `announce`, `withdraw`, `list` and
//! `discover --check`. Each is one bounded exchange with etcd: the endpoints
//! are tried in turn, and the whole command gives up after the dial timeout.

use std::collections::HashMap;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};

use crate::probe::{Outcome, Probe};
use crate::registry::{Etcd, EtcdRegistry, LeaseId, RegistryError};

/// Puts `keys` in one transaction: permanently, or under a new lease of
/// `ttl`, whose id is returned.
pub async fn announce(
    reg: &mut EtcdRegistry,
    limit: Duration,
    keys: &[(String, String)],
    ttl: Option<Duration>,
) -> Result<Option<LeaseId>, RegistryError> {
    let lease = match ttl {
        Some(ttl) => {
            let secs = ttl.as_secs() as i64;
            let granted = reg
                .once("grant a lease", limit, async |c| c.lease_grant(secs, None).await)
                .await?;
            Some(LeaseId(granted.id()))
        }
        None => None,
    };
    let ops = || -> Vec<TxnOp> {
        keys.iter()
            .map(|(k, v)| TxnOp::put(k.as_str(), v.as_str(), lease.map(|l| PutOptions::new().with_lease(l.0))))
            .collect()
    };
    reg.once("put the keys", limit, async |c| c.txn(Txn::new().and_then(ops())).await)
        .await
        .map_err(|e| e.writing(keys.iter().map(|(k, _)| k.as_str())))?;
    Ok(lease)
}

/// Why `announce` wrote nothing.
#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    /// `--wait-*` ran out before the instance was healthy.
    #[error("instance not healthy within {}, nothing written: {last}", humantime::format_duration(*.limit))]
    NotHealthy {
        /// The wait.
        limit: Duration,
        /// The last probe's outcome.
        last: Outcome,
    },
    /// etcd refused or did not answer.
    #[error(transparent)]
    Etcd(#[from] RegistryError),
}

/// `announce` as a whole: with `wait`, first waits (up to its limit) for the
/// probe to pass and writes nothing if it never does; then puts the keys.
pub async fn announce_when_healthy(
    reg: &mut EtcdRegistry,
    limit: Duration,
    keys: &[(String, String)],
    ttl: Option<Duration>,
    wait: Option<(&Probe, Duration)>,
) -> Result<Option<LeaseId>, AnnounceError> {
    if let Some((probe, wait_limit)) = wait {
        let last = wait_healthy(probe, wait_limit).await;
        if !last.ok {
            return Err(AnnounceError::NotHealthy {
                limit: wait_limit,
                last,
            });
        }
    }
    Ok(announce(reg, limit, keys, ttl).await?)
}

/// Probes until the instance passes or `limit` runs out, one probe a second
/// at most. Returns the last outcome.
pub async fn wait_healthy(probe: &Probe, limit: Duration) -> Outcome {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let started = tokio::time::Instant::now();
        let outcome = probe.check().await;
        let next = started + Duration::from_secs(1);
        if outcome.ok || next >= deadline {
            return outcome;
        }
        tracing::info!(probe = %outcome, "waiting for the instance to be healthy");
        tokio::time::sleep_until(next).await;
    }
}

/// What `withdraw` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Withdrawn {
    /// This many keys were deleted (0: there was nothing to delete).
    Deleted(i64),
    /// The key holds another value now, so it was kept.
    Kept {
        /// The value it holds.
        current: String,
    },
}

/// Deletes `key` (every key under it with `prefix`); with `if_value`, only
/// when the key still holds that value, compared and deleted in one
/// transaction.
pub async fn withdraw(
    reg: &mut EtcdRegistry,
    limit: Duration,
    key: &str,
    if_value: Option<&str>,
    prefix: bool,
) -> Result<Withdrawn, RegistryError> {
    let Some(expected) = if_value else {
        let opts = || prefix.then(|| DeleteOptions::new().with_prefix());
        let resp = reg
            .once("delete the key", limit, async |c| c.delete(key, opts()).await)
            .await?;
        return Ok(Withdrawn::Deleted(resp.deleted()));
    };
    let txn = || {
        Txn::new()
            .when([Compare::value(key, CompareOp::Equal, expected)])
            .and_then([TxnOp::delete(key, None)])
            .or_else([TxnOp::get(key, None)])
    };
    let resp = reg.once("delete the key", limit, async |c| c.txn(txn()).await).await?;
    if resp.succeeded() {
        return Ok(Withdrawn::Deleted(1));
    }
    let current = resp.op_responses().into_iter().find_map(|r| match r {
        TxnOpResponse::Get(g) => g
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
        _ => None,
    });
    Ok(match current {
        Some(current) => Withdrawn::Kept { current },
        None => Withdrawn::Deleted(0),
    })
}

/// One key as `list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key.
    pub key: String,
    /// Its value (invalid UTF-8 replaced).
    pub value: String,
    /// Its lease, if any.
    pub lease: Option<LeaseId>,
    /// Seconds left on the lease, if any and still alive.
    pub ttl: Option<i64>,
}

impl Withdrawn {
    /// What `withdraw` says: a line for stdout when keys were deleted, or a
    /// note for stderr when the key was kept (still exit 0).
    pub fn report(&self, key: &str, if_value: Option<&str>) -> Report {
        match self {
            Withdrawn::Deleted(n) => Report::Stdout(format!("deleted {n} key{}", if *n == 1 { "" } else { "s" })),
            Withdrawn::Kept { current } => Report::Stderr(format!(
                "kept {key}: it holds {current:?} now, not {:?}; another instance owns it",
                if_value.unwrap_or_default()
            )),
        }
    }
}

/// One line of a command's output, and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// Command output.
    Stdout(String),
    /// A note for the operator (prefixed `sidekick: `).
    Stderr(String),
}

impl Entry {
    /// The entry as `list` prints it: `KEY VALUE (lease L, ttl Ns)`, or one
    /// line of JSON with `json`.
    pub fn line(&self, json: bool) -> String {
        if json {
            return self.to_json();
        }
        match (self.lease, self.ttl) {
            (None, _) => format!("{} {} (permanent)", self.key, self.value),
            (Some(l), Some(ttl)) => format!("{} {} (lease {l}, ttl {ttl}s)", self.key, self.value),
            (Some(l), None) => format!("{} {} (lease {l}, expiring)", self.key, self.value),
        }
    }

    /// The entry as one line of JSON, fields in a fixed order: key, value,
    /// lease (hex or null), ttl (seconds or null).
    pub fn to_json(&self) -> String {
        let text = |s: &str| serde_json::Value::from(s).to_string();
        let lease = self.lease.map_or("null".to_string(), |l| text(&l.to_string()));
        let ttl = self.ttl.map_or("null".to_string(), |t| t.to_string());
        format!(
            r#"{{"key":{},"value":{},"lease":{lease},"ttl":{ttl}}}"#,
            text(&self.key),
            text(&self.value)
        )
    }
}

/// Every key under `prefix` (all keys when `None`), in key order, with the
/// remaining TTL of each lease.
pub async fn list(reg: &mut EtcdRegistry, limit: Duration, prefix: Option<&str>) -> Result<Vec<Entry>, RegistryError> {
    let (key, opts) = match prefix {
        Some(p) if !p.is_empty() => (p.to_string(), GetOptions::new().with_prefix()),
        _ => ("\0".to_string(), GetOptions::new().with_from_key()),
    };
    let resp = reg
        .once("list the keys", limit, async |c| {
            c.get(key.as_str(), Some(opts.clone())).await
        })
        .await?;
    let mut ttls: HashMap<i64, Option<i64>> = HashMap::new();
    let mut out = Vec::new();
    for kv in resp.kvs() {
        let lease = kv.lease();
        if lease != 0 && !ttls.contains_key(&lease) {
            let ttl = reg
                .once("read a lease", limit, async |c| c.lease_time_to_live(lease, None).await)
                .await?;
            // A lease that expired between the two reads reports -1.
            ttls.insert(lease, (ttl.ttl() >= 0).then(|| ttl.ttl()));
        }
        out.push(Entry {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            value: String::from_utf8_lossy(kv.value()).into_owned(),
            lease: (lease != 0).then_some(LeaseId(lease)),
            ttl: ttls.get(&lease).copied().flatten(),
        });
    }
    Ok(out)
}

/// Asks etcd for its status; returns the endpoint that answered and etcd's
/// version.
pub async fn status(reg: &mut EtcdRegistry, limit: Duration) -> Result<(String, String), RegistryError> {
    let resp = reg
        .once("read etcd's status", limit, async |c| c.status().await)
        .await?;
    Ok((reg.endpoint().to_string(), resp.version().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines() {
        let e = Entry {
            key: "/services/web/1".into(),
            value: "10.0.0.5:8080".into(),
            lease: Some(LeaseId(0x694d)),
            ttl: Some(12),
        };
        assert_eq!(
            e.to_json(),
            r#"{"key":"/services/web/1","value":"10.0.0.5:8080","lease":"694d","ttl":12}"#
        );
        let p = Entry {
            lease: None,
            ttl: None,
            ..e
        };
        assert!(p.to_json().ends_with(r#""lease":null,"ttl":null}"#));
        let odd = Entry {
            key: "/k\"q".into(),
            value: "a\nb".into(),
            lease: None,
            ttl: None,
        };
        let v: serde_json::Value = serde_json::from_str(&odd.to_json()).unwrap();
        assert_eq!((v["key"].as_str(), v["value"].as_str()), (Some("/k\"q"), Some("a\nb")));
    }

    #[test]
    fn list_lines() {
        let e = |lease: Option<i64>, ttl: Option<i64>| Entry {
            key: "/k".into(),
            value: "v".into(),
            lease: lease.map(LeaseId),
            ttl,
        };
        for (entry, json, want) in [
            (e(None, None), false, "/k v (permanent)"),
            (e(Some(0x2a), Some(9)), false, "/k v (lease 2a, ttl 9s)"),
            (e(Some(0x2a), None), false, "/k v (lease 2a, expiring)"),
            (
                e(None, None),
                true,
                r#"{"key":"/k","value":"v","lease":null,"ttl":null}"#,
            ),
        ] {
            assert_eq!(entry.line(json), want);
        }
    }

    #[test]
    fn withdraw_reports() {
        for (done, if_value, want) in [
            (Withdrawn::Deleted(0), None, Report::Stdout("deleted 0 keys".into())),
            (Withdrawn::Deleted(1), None, Report::Stdout("deleted 1 key".into())),
            (Withdrawn::Deleted(3), None, Report::Stdout("deleted 3 keys".into())),
            (
                Withdrawn::Kept { current: "b".into() },
                Some("a"),
                Report::Stderr(r#"kept /k: it holds "b" now, not "a"; another instance owns it"#.into()),
            ),
        ] {
            assert_eq!(done.report("/k", if_value), want);
        }
    }
}
