//! The one-shot etcd commands: `announce`, `withdraw`, `list` and
//! `discover --check`. Each is a few requests through [`Etcd`], each
//! bounded by the dial timeout; the binary hands them a one-shot
//! [`EtcdRegistry`](crate::registry::EtcdRegistry), which tries the
//! endpoints in turn within that bound; the unit tests below hand them the
//! model of etcd.

use std::collections::HashMap;
use std::time::Duration;

use crate::probe::{Outcome, Probe};
use crate::registry::{ops, Compare, Etcd, LeaseId, Op, OpResult, Range, RegistryError, Target, Txn};

/// Puts `keys` in one transaction (split past etcd's limit): permanently,
/// or under a new lease of `ttl`, whose id is returned. Each request is
/// bounded by `limit`.
pub async fn announce<R: Etcd>(
    reg: &mut R,
    limit: Duration,
    keys: &[(String, String)],
    ttl: Option<Duration>,
) -> Result<Option<LeaseId>, RegistryError> {
    let lease = match ttl {
        Some(ttl) => Some(
            ops::within(reg, limit, "grant a lease", async |r| r.grant(ttl, None).await)
                .await?
                .id,
        ),
        None => None,
    };
    // Lease 0 is etcd's "no lease": a permanent key.
    let under = lease.unwrap_or(LeaseId(0));
    ops::within(reg, limit, "put the keys", async |r| {
        ops::put_keys(r, under, keys, true).await
    })
    .await?;
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
pub async fn announce_when_healthy<R: Etcd>(
    reg: &mut R,
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

/// How long before `--wait-timeout` the last probe starts at the latest.
const LAST_PROBE_ROOM: Duration = Duration::from_millis(100);

/// Probes until the instance passes or `limit` runs out, one probe a second
/// at most, the whole limit long: a probe that would run past the limit is
/// cut at it (and fails). Returns the last outcome.
pub async fn wait_healthy(probe: &Probe, limit: Duration) -> Outcome {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let started = tokio::time::Instant::now();
        let left = deadline.saturating_duration_since(started);
        let outcome = match tokio::time::timeout(left, probe.check()).await {
            Ok(o) => o,
            Err(_) => Outcome {
                ok: false,
                latency: left,
                detail: format!("no answer within the {} left", humantime::format_duration(left)),
            },
        };
        let now = tokio::time::Instant::now();
        if outcome.ok || now >= deadline {
            return outcome;
        }
        tracing::info!(probe = %outcome, "waiting for the instance to be healthy");
        // The next probe a second after this one started; the last one
        // just before the limit, with the little time left to answer.
        let last = deadline.checked_sub(LAST_PROBE_ROOM).unwrap_or(deadline);
        let next = (started + Duration::from_secs(1)).min(last).max(now);
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
/// transaction. The request is bounded by `limit`.
pub async fn withdraw<R: Etcd>(
    reg: &mut R,
    limit: Duration,
    key: &str,
    if_value: Option<&str>,
    prefix: bool,
) -> Result<Withdrawn, RegistryError> {
    let txn = match if_value {
        None => {
            let range = if prefix {
                Range::Prefix(key.to_string())
            } else {
                Range::Key(key.to_string())
            };
            Txn {
                then: vec![Op::Delete(range)],
                ..Txn::default()
            }
        }
        Some(expected) => Txn {
            when: vec![Compare::new(key, Target::Value(expected.to_string()))],
            then: vec![Op::Delete(Range::Key(key.to_string()))],
            otherwise: vec![Op::get(Range::Key(key.to_string()))],
        },
    };
    let r = ops::within(reg, limit, "delete the key", async |r| r.txn(txn).await).await?;
    Ok(match r.results.into_iter().next() {
        Some(OpResult::Delete(n)) => Withdrawn::Deleted(n),
        Some(OpResult::Get { kvs, .. }) => match kvs.into_iter().next() {
            Some(kv) => Withdrawn::Kept { current: kv.value },
            None => Withdrawn::Deleted(0),
        },
        _ => Withdrawn::Deleted(0),
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
/// remaining TTL of each lease. Each request is bounded by `limit`.
pub async fn list<R: Etcd>(reg: &mut R, limit: Duration, prefix: Option<&str>) -> Result<Vec<Entry>, RegistryError> {
    // An empty prefix is every key.
    let range = Range::Prefix(prefix.unwrap_or_default().to_string());
    let read = Txn {
        then: vec![Op::get(range)],
        ..Txn::default()
    };
    let r = ops::within(reg, limit, "list the keys", async |r| r.txn(read).await).await?;
    let kvs = r.results.into_iter().flat_map(|res| match res {
        OpResult::Get { kvs, .. } => kvs,
        _ => Vec::new(),
    });
    let mut ttls: HashMap<i64, Option<i64>> = HashMap::new();
    let mut out = Vec::new();
    for kv in kvs {
        let lease = kv.lease;
        if lease != 0 && !ttls.contains_key(&lease) {
            // A lease that expired since the read has no time left.
            let left = ops::within(reg, limit, "read a lease", async |r| {
                r.time_to_live(LeaseId(lease)).await
            })
            .await?;
            ttls.insert(lease, left.map(|d| d.as_secs() as i64));
        }
        out.push(Entry {
            key: kv.key,
            value: kv.value,
            lease: (lease != 0).then_some(LeaseId(lease)),
            ttl: ttls.get(&lease).copied().flatten(),
        });
    }
    Ok(out)
}

/// Asks etcd for its status; returns the endpoint that answered and etcd's
/// version. The request is bounded by `limit`.
pub async fn status<R: Etcd>(reg: &mut R, limit: Duration) -> Result<(String, String), RegistryError> {
    let status = ops::within(reg, limit, "read etcd's status", async |r| r.status().await).await?;
    Ok((reg.endpoint().to_string(), status.version))
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

    // Against the model of etcd, under paused time.

    use crate::registry::memory::Model;

    const LIMIT: Duration = Duration::from_secs(1);

    fn pairs(l: &[(&str, &str)]) -> Vec<(String, String)> {
        l.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn announce_without_a_ttl_writes_permanent_keys_in_one_revision() {
        let m = Model::new();
        let keys = pairs(&[("/services/web/1", "a:1"), ("/services/web/scheme", "http")]);
        let lease = announce(&mut m.clone(), LIMIT, &keys, None).await.unwrap();
        assert_eq!(lease, None);
        for (k, v) in &keys {
            let kv = m.get(k).unwrap();
            assert_eq!(
                (kv.value.as_str(), kv.lease, kv.mod_revision),
                (v.as_str(), 0, 2),
                "{k}"
            );
        }
        assert!(m.leases().is_empty());
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(m.get("/services/web/1").is_some(), "permanent");
    }

    #[tokio::test(start_paused = true)]
    async fn announce_with_a_ttl_grants_a_lease_that_holds_the_keys_until_it_expires() {
        let m = Model::new();
        let keys = pairs(&[("/services/web/2", "b:2"), ("/services/web/2/weight", "10")]);
        let lease = announce(&mut m.clone(), LIMIT, &keys, Some(Duration::from_secs(30)))
            .await
            .unwrap()
            .expect("a lease");
        assert_eq!(m.leases(), vec![lease]);
        for (k, _) in &keys {
            assert_eq!(m.get(k).unwrap().lease, lease.0, "{k}");
        }
        assert_eq!(
            m.clone().time_to_live(lease).await.unwrap(),
            Some(Duration::from_secs(30))
        );
        // Nobody keeps it alive: the keys go with it.
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(m.keys("/services/"), vec![]);
    }

    // etcd refuses a transaction of more than 128 operations.
    #[tokio::test(start_paused = true)]
    async fn announce_puts_more_keys_than_one_transaction_holds() {
        let m = Model::new();
        let keys: Vec<(String, String)> = (0..300).map(|i| (format!("/k/{i:03}"), "v".to_string())).collect();
        announce(&mut m.clone(), LIMIT, &keys, None).await.unwrap();
        assert_eq!(m.keys("/k/").len(), 300);
    }

    #[tokio::test(start_paused = true)]
    async fn announce_fails_with_the_cause_when_etcd_is_away_or_frozen_and_writes_nothing() {
        let m = Model::new();
        let keys = pairs(&[("/k", "v")]);
        m.set_unreachable(true);
        let e = announce(&mut m.clone(), LIMIT, &keys, Some(Duration::from_secs(10)))
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "could not grant a lease at model: connection refused");
        let e = announce(&mut m.clone(), LIMIT, &keys, None).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "could not put the keys at model: connection refused (writing /k)"
        );
        m.set_unreachable(false);
        m.set_hung(true);
        let started = tokio::time::Instant::now();
        let e = announce(&mut m.clone(), LIMIT, &keys, None).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "could not put the keys at model: no answer within 1s (writing /k)"
        );
        assert_eq!(started.elapsed(), LIMIT, "bounded by the limit");
        m.set_hung(false);
        assert_eq!((m.get("/k"), m.leases()), (None, vec![]));
    }

    #[tokio::test(start_paused = true)]
    async fn withdraw_if_value_deletes_only_that_value_and_a_missing_key_is_success() {
        let m = Model::new();
        let mut reg = m.clone();
        m.put_foreign("/services/web/1", "theirs:1", 0);

        let done = withdraw(&mut reg, LIMIT, "/services/web/1", Some("ours:1"), false).await;
        assert_eq!(
            done.unwrap(),
            Withdrawn::Kept {
                current: "theirs:1".into()
            }
        );
        assert_eq!(m.get("/services/web/1").unwrap().value, "theirs:1");

        let done = withdraw(&mut reg, LIMIT, "/services/web/1", Some("theirs:1"), false).await;
        assert_eq!(done.unwrap(), Withdrawn::Deleted(1));
        assert_eq!(m.get("/services/web/1"), None);

        let done = withdraw(&mut reg, LIMIT, "/services/web/1", Some("theirs:1"), false).await;
        assert_eq!(done.unwrap(), Withdrawn::Deleted(0), "missing");
        let done = withdraw(&mut reg, LIMIT, "/nothing/here", None, false).await;
        assert_eq!(done.unwrap(), Withdrawn::Deleted(0), "missing");
    }

    #[tokio::test(start_paused = true)]
    async fn withdraw_deletes_the_key_or_the_whole_subtree_only() {
        let m = Model::new();
        let mut reg = m.clone();
        for k in [
            "/services/web",
            "/services/web/1",
            "/services/web/2",
            "/services/webber/1",
        ] {
            m.put_foreign(k, "v", 0);
        }
        let done = withdraw(&mut reg, LIMIT, "/services/web", None, false).await;
        assert_eq!(done.unwrap(), Withdrawn::Deleted(1));
        assert!(m.get("/services/web/1").is_some(), "a key, not a prefix");
        let done = withdraw(&mut reg, LIMIT, "/services/web/", None, true).await;
        assert_eq!(done.unwrap(), Withdrawn::Deleted(2));
        let left: Vec<String> = m.keys("/").into_iter().map(|kv| kv.key).collect();
        assert_eq!(left, ["/services/webber/1"]);

        m.set_unreachable(true);
        let e = withdraw(&mut reg, LIMIT, "/services/webber/1", Some("v"), false).await;
        assert_eq!(
            e.unwrap_err().to_string(),
            "could not delete the key at model: connection refused"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn list_shows_values_leases_and_the_time_left_in_key_order() {
        let m = Model::new();
        let mut reg = m.clone();
        let lease = m.clone().grant(Duration::from_secs(60), None).await.unwrap().id;
        m.put_foreign("/services/web/b", "10.0.0.2:80", lease.0);
        m.put_foreign("/services/web/a", "10.0.0.1:80", 0);
        m.put_foreign("/services/web/c", "10.0.0.3:80", lease.0);
        m.put_foreign("/other", "x", 0);
        tokio::time::advance(Duration::from_millis(4500)).await;

        let entries = list(&mut reg, LIMIT, Some("/services/")).await.unwrap();
        let lines: Vec<String> = entries.iter().map(|e| e.line(false)).collect();
        assert_eq!(
            lines,
            [
                "/services/web/a 10.0.0.1:80 (permanent)".to_string(),
                format!("/services/web/b 10.0.0.2:80 (lease {lease}, ttl 55s)"),
                format!("/services/web/c 10.0.0.3:80 (lease {lease}, ttl 55s)"),
            ]
        );
        assert_eq!(m.calls("time_to_live"), 1, "each lease asked once");

        for every in [None, Some("")] {
            let all = list(&mut reg, LIMIT, every).await.unwrap();
            let keys: Vec<&str> = all.iter().map(|e| e.key.as_str()).collect();
            assert_eq!(
                keys,
                ["/other", "/services/web/a", "/services/web/b", "/services/web/c"]
            );
        }
        assert_eq!(list(&mut reg, LIMIT, Some("/none/")).await.unwrap(), vec![]);

        m.set_unreachable(true);
        let e = list(&mut reg, LIMIT, None).await.unwrap_err();
        assert_eq!(e.to_string(), "could not list the keys at model: connection refused");
    }

    #[tokio::test(start_paused = true)]
    async fn status_names_the_endpoint_and_the_version() {
        let m = Model::new();
        let mut reg = m.clone();
        assert_eq!(
            status(&mut reg, LIMIT).await.unwrap(),
            ("model".to_string(), Model::VERSION.to_string())
        );
        m.set_hung(true);
        let e = status(&mut reg, LIMIT).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "could not read etcd's status at model: no answer within 1s"
        );
    }
}
