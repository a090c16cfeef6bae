//! An in-memory registry with leases that expire on tokio's clock. It is for
//! unit tests of timing logic (with paused time); it proves nothing about
//! etcd itself, which the integration tests exercise.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::mpsc;

use super::{HeldElsewhere, LeaseId, Registry, RegistryError, SharedPresent};

#[derive(Debug, Default)]
struct Store {
    /// key → (value, lease; 0 for none)
    keys: BTreeMap<String, (String, i64)>,
    /// lease → (expiry, ttl)
    leases: HashMap<i64, (Instant, Duration)>,
    next_lease: i64,
    /// Revisions written, as etcd would count them.
    revisions: u64,
    /// While set, every operation fails as an unreachable etcd would.
    unreachable: bool,
    /// Calls by operation name.
    calls: HashMap<&'static str, u64>,
    /// Open watches: the keys, and where their deletions go.
    watches: Vec<(Vec<String>, mpsc::UnboundedSender<String>)>,
}

impl Store {
    fn expire(&mut self) {
        let now = Instant::now();
        let dead: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, (t, _))| *t <= now)
            .map(|(&id, _)| id)
            .collect();
        for id in dead {
            self.drop_lease(id);
        }
    }

    fn drop_lease(&mut self, id: i64) {
        self.leases.remove(&id);
        let gone: Vec<String> = self
            .keys
            .iter()
            .filter(|(_, (_, l))| *l == id)
            .map(|(k, _)| k.clone())
            .collect();
        if !gone.is_empty() {
            self.revisions += 1;
        }
        for k in gone {
            self.delete(&k);
        }
    }

    fn delete(&mut self, key: &str) {
        if self.keys.remove(key).is_some() {
            self.watches
                .retain(|(keys, tx)| !keys.iter().any(|k| k == key) || tx.send(key.to_string()).is_ok());
        }
    }
}

/// A shared in-memory store; clones see the same data, so a test keeps one
/// handle to look at while the sidekick owns another. Each handle has its
/// own watch.
#[derive(Debug, Default)]
pub struct MemoryRegistry {
    store: Arc<Mutex<Store>>,
    watch: Option<mpsc::UnboundedReceiver<String>>,
}

impl Clone for MemoryRegistry {
    fn clone(&self) -> Self {
        MemoryRegistry {
            store: self.store.clone(),
            watch: None,
        }
    }
}

impl MemoryRegistry {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn begin(&self, op: &'static str) -> Result<std::sync::MutexGuard<'_, Store>, RegistryError> {
        let mut s = self.store.lock().expect("store lock");
        *s.calls.entry(op).or_default() += 1;
        s.expire();
        if s.unreachable {
            return Err(RegistryError {
                op,
                endpoint: "memory".into(),
                cause: "unreachable".into(),
            });
        }
        Ok(s)
    }

    /// The value of `key` and its lease, after expiring leases.
    pub fn get(&self, key: &str) -> Option<(String, Option<LeaseId>)> {
        let mut s = self.store.lock().expect("store lock");
        s.expire();
        s.keys
            .get(key)
            .map(|(v, l)| (v.clone(), (*l != 0).then_some(LeaseId(*l))))
    }

    /// Writes `key` as another writer would, under `lease` (0: none).
    pub fn put_foreign(&self, key: &str, value: &str, lease: i64) {
        let mut s = self.store.lock().expect("store lock");
        s.keys.insert(key.into(), (value.into(), lease));
        s.revisions += 1;
    }

    /// Deletes `key` as another writer (or etcdctl) would.
    pub fn delete(&self, key: &str) {
        let mut s = self.store.lock().expect("store lock");
        s.delete(key);
        s.revisions += 1;
    }

    /// Makes every operation fail (`true`) or work again (`false`).
    pub fn set_unreachable(&self, unreachable: bool) {
        self.store.lock().expect("store lock").unreachable = unreachable;
    }

    /// Forgets everything, as an etcd whose data dir was wiped.
    pub fn wipe(&self) {
        let mut s = self.store.lock().expect("store lock");
        s.keys.clear();
        s.leases.clear();
        s.watches.clear();
    }

    /// Revisions written so far.
    pub fn revisions(&self) -> u64 {
        self.store.lock().expect("store lock").revisions
    }

    /// How many times `op` (`grant`, `keep_alive`, `put`, `revoke`) was called.
    pub fn calls(&self, op: &str) -> u64 {
        self.store
            .lock()
            .expect("store lock")
            .calls
            .get(op)
            .copied()
            .unwrap_or(0)
    }
}

impl Registry for MemoryRegistry {
    async fn grant(&mut self, ttl: Duration) -> Result<LeaseId, RegistryError> {
        let mut s = self.begin("grant")?;
        s.next_lease += 1;
        let id = s.next_lease;
        s.leases.insert(id, (Instant::now() + ttl, ttl));
        Ok(LeaseId(id))
    }

    async fn keep_alive(&mut self, lease: LeaseId) -> Result<bool, RegistryError> {
        let mut s = self.begin("keep_alive")?;
        match s.leases.get_mut(&lease.0) {
            Some((expiry, ttl)) => {
                *expiry = Instant::now() + *ttl;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn put(
        &mut self,
        lease: LeaseId,
        keys: &[(String, String)],
        takeover: bool,
    ) -> Result<Vec<HeldElsewhere>, RegistryError> {
        let mut s = self.begin("put")?;
        if !s.leases.contains_key(&lease.0) {
            return Err(RegistryError {
                op: "put",
                endpoint: "memory".into(),
                cause: "requested lease not found".into(),
            });
        }
        let mut held = Vec::new();
        for (k, v) in keys {
            match s.keys.get(k) {
                Some((_, l)) if !takeover && *l != lease.0 => held.push(HeldElsewhere {
                    key: k.clone(),
                    holder: (*l != 0).then_some(LeaseId(*l)),
                }),
                _ => {
                    s.keys.insert(k.clone(), (v.clone(), lease.0));
                    s.revisions += 1;
                }
            }
        }
        Ok(held)
    }

    async fn revoke(&mut self, lease: LeaseId) -> Result<(), RegistryError> {
        let mut s = self.begin("revoke")?;
        s.drop_lease(lease.0);
        Ok(())
    }

    async fn withdraw_keys(&mut self, lease: LeaseId, keys: &[String]) -> Result<usize, RegistryError> {
        let mut s = self.begin("withdraw_keys")?;
        let ours: Vec<String> = keys
            .iter()
            .filter(|k| s.keys.get(k.as_str()).is_some_and(|(_, l)| *l == lease.0))
            .cloned()
            .collect();
        for k in &ours {
            s.delete(k);
        }
        if !ours.is_empty() {
            s.revisions += 1;
        }
        Ok(ours.len())
    }

    async fn put_shared(
        &mut self,
        lease: LeaseId,
        keys: &[(String, String)],
    ) -> Result<(Vec<SharedPresent>, i64), RegistryError> {
        let mut s = self.begin("put_shared")?;
        if !s.leases.contains_key(&lease.0) {
            return Err(RegistryError {
                op: "put_shared",
                endpoint: "memory".into(),
                cause: "requested lease not found".into(),
            });
        }
        let mut present = Vec::new();
        for (k, v) in keys {
            match s.keys.get(k) {
                Some((value, l)) => present.push(SharedPresent {
                    key: k.clone(),
                    value: value.clone(),
                    holder: (*l != 0).then_some(LeaseId(*l)),
                }),
                None => {
                    s.keys.insert(k.clone(), (v.clone(), lease.0));
                    s.revisions += 1;
                }
            }
        }
        Ok((present, s.revisions as i64))
    }

    async fn watch_deleted(&mut self, keys: &[String], _from: i64) -> Result<(), RegistryError> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.begin("watch")?.watches.push((keys.to_vec(), tx));
        self.watch = Some(rx);
        Ok(())
    }

    async fn deleted(&mut self) -> Result<Vec<String>, RegistryError> {
        let Some(rx) = self.watch.as_mut() else {
            return std::future::pending().await;
        };
        match rx.recv().await {
            Some(key) => Ok(vec![key]),
            // The store dropped the watch (wiped): as a broken etcd watch.
            None => {
                self.watch = None;
                Err(RegistryError {
                    op: "watch",
                    endpoint: "memory".into(),
                    cause: "watch closed".into(),
                })
            }
        }
    }

    fn unwatch(&mut self) {
        self.watch = None;
    }

    fn endpoint(&self) -> &str {
        "memory"
    }
}
