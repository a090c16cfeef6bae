//! A model of etcd for unit tests of timing logic, on tokio's clock (so
//! paused time drives its leases). It behaves like etcd where the engine's
//! correctness depends on it, and refuses what etcd refuses:
//!
//! - one revision per transaction that changes something, shared by all its
//!   operations, nested ones included; keys keep their create and mod
//!   revisions, version and lease; reads at a past revision see that past;
//! - at most [`MAX_TXN_OPS`] operations in a transaction, a nested one
//!   counting against what its parent leaves; no empty key; a key put twice
//!   (or put and deleted) in one transaction is refused, with etcd's
//!   exceptions (a nested put then a sibling's delete of the key, a delete
//!   of every key with puts); a put on a lease etcd does not have fails the
//!   whole transaction, before any read of a compacted revision does;
//! - leases granted with a chosen id (refused when it exists) for whole
//!   seconds, at least etcd's minimum of 2, kept alive by id, expiring on
//!   the clock and deleting their keys in one revision;
//! - watches from a start revision replay the history from there (a
//!   future one waits for it), a compacted one is cancelled, and one from
//!   the compaction point sees no deletion made at that point;
//! - faults: unreachable (every request fails), hung (no request answers),
//!   restarted (watches break, leases are renewed), wiped (all data gone,
//!   revisions start again at 1).
//!
//! `tests/it/model.rs` runs the same operations against this model and a
//! real etcd and compares the answers. It proves nothing about etcd itself.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{
    Compare, ErrorKind, Etcd, Event, Granted, KeyValue, LeaseId, Op, OpResult, Range, RegistryError, Status, Target,
    Txn, TxnResult, MAX_TXN_OPS,
};

type WatchItem = Result<Vec<Event>, RegistryError>;

/// etcd's shortest lease TTL in seconds: 1.5 election timeouts, rounded
/// up; 2 with the default election timeout of one second.
const MIN_LEASE_TTL: u64 = 2;

/// etcd's longest lease TTL in seconds.
const MAX_LEASE_TTL: u64 = 9_000_000_000;

#[derive(Debug)]
struct Watcher {
    ranges: Vec<Range>,
    deletes_only: bool,
    /// The next revision this watcher is to see.
    next: i64,
    tx: mpsc::UnboundedSender<WatchItem>,
}

#[derive(Debug)]
struct State {
    revision: i64,
    compacted: i64,
    /// Every key's versions, oldest first; `None` is a deletion.
    versions: BTreeMap<String, Vec<(i64, Option<KeyValue>)>>,
    /// Every change, in revision order, since the last compaction.
    history: Vec<Event>,
    /// lease → (granted TTL, expiry)
    leases: BTreeMap<i64, (Duration, Instant)>,
    next_lease: i64,
    watchers: Vec<Watcher>,
    unreachable: bool,
    hung: bool,
    /// Writes under these prefixes are refused, as a role without
    /// permission for them would be.
    denied: Vec<String>,
    call_bound: Duration,
    calls: HashMap<&'static str, u64>,
}

impl Default for State {
    fn default() -> Self {
        State {
            revision: 1,
            compacted: 0,
            versions: BTreeMap::new(),
            history: Vec::new(),
            leases: BTreeMap::new(),
            next_lease: 0x1000,
            watchers: Vec::new(),
            unreachable: false,
            hung: false,
            denied: Vec::new(),
            call_bound: Duration::from_secs(1),
            calls: HashMap::new(),
        }
    }
}

fn error(op: &'static str, kind: ErrorKind, cause: &str) -> RegistryError {
    RegistryError {
        op,
        endpoint: "model".into(),
        cause: cause.into(),
        kind,
    }
}

impl State {
    fn current(&self, key: &str) -> Option<&KeyValue> {
        self.versions.get(key)?.last()?.1.as_ref()
    }

    fn at(&self, key: &str, revision: i64) -> Option<&KeyValue> {
        self.versions
            .get(key)?
            .iter()
            .rev()
            .find(|(r, _)| *r <= revision)?
            .1
            .as_ref()
    }

    fn live_keys(&self, range: &Range, revision: i64) -> Vec<KeyValue> {
        let keys: Box<dyn Iterator<Item = &String>> = match range {
            Range::Key(k) => Box::new(self.versions.get_key_value(k).map(|(k, _)| k).into_iter()),
            Range::Prefix(p) => Box::new(
                self.versions
                    .range(p.clone()..)
                    .map(|(k, _)| k)
                    .take_while(|k| k.starts_with(p.as_str())),
            ),
            Range::Span { start, .. } => Box::new(
                self.versions
                    .range(start.clone()..)
                    .map(|(k, _)| k)
                    .take_while(|k| range.contains(k)),
            ),
        };
        keys.filter_map(|k| self.at(k, revision).cloned()).collect()
    }

    /// Expires every lease past its time, each in a revision of its own.
    fn expire(&mut self) {
        if self.hung {
            return;
        }
        let now = Instant::now();
        let dead: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, (_, at))| *at <= now)
            .map(|(&id, _)| id)
            .collect();
        for id in dead {
            self.drop_lease(id);
        }
    }

    /// When the next lease expires; none while hung (a frozen etcd expires
    /// nothing).
    fn next_expiry(&self) -> Option<Instant> {
        if self.hung {
            return None;
        }
        self.leases.values().map(|(_, at)| *at).min()
    }

    fn drop_lease(&mut self, id: i64) {
        self.leases.remove(&id);
        let keys: Vec<String> = self
            .versions
            .iter()
            .filter(|(_, v)| {
                v.last()
                    .and_then(|(_, kv)| kv.as_ref())
                    .is_some_and(|kv| kv.lease == id)
            })
            .map(|(k, _)| k.clone())
            .collect();
        if keys.is_empty() {
            return;
        }
        let rev = self.revision + 1;
        for k in keys {
            self.write_delete(&k, rev);
        }
        self.commit(rev);
    }

    fn write_delete(&mut self, key: &str, rev: i64) -> bool {
        if self.current(key).is_none() {
            return false;
        }
        self.set_version(key, rev, None);
        self.history.push(Event {
            put: false,
            kv: KeyValue {
                key: key.to_string(),
                mod_revision: rev,
                ..KeyValue::default()
            },
        });
        true
    }

    fn write_put(&mut self, key: &str, value: &str, lease: i64, rev: i64) {
        let kv = match self.current(key) {
            Some(old) => KeyValue {
                key: key.to_string(),
                value: value.to_string(),
                create_revision: old.create_revision,
                mod_revision: rev,
                version: old.version + 1,
                lease,
            },
            None => KeyValue {
                key: key.to_string(),
                value: value.to_string(),
                create_revision: rev,
                mod_revision: rev,
                version: 1,
                lease,
            },
        };
        self.set_version(key, rev, Some(kv.clone()));
        self.history.push(Event { put: true, kv });
    }

    /// Records `key`'s state as of `rev`. A second write of a key in one
    /// revision replaces the first here (the history keeps both events):
    /// etcd lets a transaction delete every key and put one, or put a key
    /// in a nested transaction and delete it in a later one.
    fn set_version(&mut self, key: &str, rev: i64, kv: Option<KeyValue>) {
        let versions = self.versions.entry(key.to_string()).or_default();
        if versions.last().is_some_and(|(r, _)| *r == rev) {
            versions.pop();
        }
        versions.push((rev, kv));
    }

    /// Makes revision `rev` current and tells the watchers.
    fn commit(&mut self, rev: i64) {
        self.revision = rev;
        self.deliver();
    }

    fn deliver(&mut self) {
        let history = &self.history;
        self.watchers.retain_mut(|w| {
            let mut batch: Vec<Event> = Vec::new();
            let mut ok = true;
            for e in history.iter().filter(|e| e.kv.mod_revision >= w.next) {
                if let Some(last) = batch.last() {
                    if last.kv.mod_revision != e.kv.mod_revision {
                        ok &= w.tx.send(Ok(std::mem::take(&mut batch))).is_ok();
                    }
                }
                if (!w.deletes_only || !e.put) && w.ranges.iter().any(|r| r.contains(&e.kv.key)) {
                    batch.push(e.clone());
                }
            }
            if !batch.is_empty() {
                ok &= w.tx.send(Ok(batch)).is_ok();
            }
            w.next = w.next.max(history.last().map_or(0, |e| e.kv.mod_revision + 1));
            ok
        });
    }

    /// A compare, against the store before the transaction (etcd decides
    /// every branch, nested ones too, before it applies anything).
    fn compare(&self, c: &Compare) -> bool {
        let kv = self.at(&c.key, self.revision);
        let empty = KeyValue::default();
        let kv_or_empty = kv.unwrap_or(&empty);
        match &c.target {
            Target::Version(v) => kv_or_empty.version == *v,
            Target::CreateRevision(r) => kv_or_empty.create_revision == *r,
            Target::ModRevision(r) => kv_or_empty.mod_revision == *r,
            Target::Lease(l) => kv_or_empty.lease == *l,
            Target::Value(v) => kv.is_some_and(|kv| kv.value == *v),
        }
    }

    /// Checks the branches about to run, as etcd does before applying
    /// anything: first that the leases of all their puts exist, then that
    /// the revisions of all their reads are kept.
    fn check(&self, txn: &Txn) -> Result<(), RegistryError> {
        self.on_path(txn, &|op| match op {
            Op::Put { lease, .. } if *lease != 0 && !self.leases.contains_key(lease) => Err(error(
                "run a transaction",
                ErrorKind::LeaseNotFound,
                "requested lease not found",
            )),
            _ => Ok(()),
        })?;
        self.on_path(txn, &|op| match op {
            Op::Get { revision, .. } if *revision > self.revision => Err(error(
                "run a transaction",
                ErrorKind::FutureRevision,
                "mvcc: required revision is a future revision",
            )),
            Op::Get { revision, .. } if *revision != 0 && *revision < self.compacted => Err(error(
                "run a transaction",
                ErrorKind::Compacted,
                "mvcc: required revision has been compacted",
            )),
            _ => Ok(()),
        })
    }

    /// Runs `f` on every operation of the branches `txn` would run.
    fn on_path(&self, txn: &Txn, f: &dyn Fn(&Op) -> Result<(), RegistryError>) -> Result<(), RegistryError> {
        let branch = if txn.when.iter().all(|c| self.compare(c)) {
            &txn.then
        } else {
            &txn.otherwise
        };
        for op in branch {
            match op {
                Op::Txn(t) => self.on_path(t, f)?,
                other => f(other)?,
            }
        }
        Ok(())
    }

    fn apply(&mut self, txn: &Txn, rev: i64, changed: &mut bool) -> TxnResult {
        let succeeded = txn.when.iter().all(|c| self.compare(c));
        let ops = if succeeded { &txn.then } else { &txn.otherwise };
        let mut results = Vec::with_capacity(ops.len());
        for op in ops {
            results.push(match op {
                Op::Put { key, value, lease } => {
                    self.write_put(key, value, *lease, rev);
                    *changed = true;
                    OpResult::Put
                }
                Op::Delete(range) => {
                    // Like a read, a delete sees the writes before it (a
                    // nested put, then a sibling's delete of the key).
                    let now = if *changed { rev } else { self.revision };
                    let keys: Vec<String> = self.live_keys(range, now).into_iter().map(|kv| kv.key).collect();
                    let mut n = 0;
                    for k in keys {
                        if self.write_delete(&k, rev) {
                            n += 1;
                        }
                    }
                    *changed |= n > 0;
                    OpResult::Delete(n)
                }
                Op::Get {
                    range,
                    revision,
                    count_only,
                } => {
                    // A read sees the writes made before it in the transaction.
                    let now = if *changed { rev } else { self.revision };
                    let at = if *revision == 0 { now } else { *revision };
                    let kvs = self.live_keys(range, at);
                    let count = kvs.len() as i64;
                    OpResult::Get {
                        kvs: if *count_only { Vec::new() } else { kvs },
                        count,
                    }
                }
                Op::Txn(t) => OpResult::Txn(self.apply(t, rev, changed)),
            });
        }
        TxnResult {
            succeeded,
            revision: 0,
            results,
        }
    }
}

/// Checks a request as etcd does before anything else. It counts what etcd
/// counts: the largest of the compares, the success and the failure
/// operations, and for each nested transaction its own count within what
/// is left. And every key must be given: an empty one (not the empty
/// prefix, which is every key) is refused.
fn check_request(txn: &Txn, limit: usize) -> Result<(), RegistryError> {
    let n = txn.when.len().max(txn.then.len()).max(txn.otherwise.len());
    if n > limit {
        return Err(error(
            "run a transaction",
            ErrorKind::TooManyOps,
            "too many operations in txn request",
        ));
    }
    let no_key = || error("run a transaction", ErrorKind::Other, "key is not provided");
    if txn.when.iter().any(|c| c.key.is_empty()) {
        return Err(no_key());
    }
    for op in txn.then.iter().chain(&txn.otherwise) {
        match op {
            Op::Txn(t) => check_request(t, limit - n)?,
            Op::Put { key, .. }
            | Op::Delete(Range::Key(key))
            | Op::Get {
                range: Range::Key(key), ..
            } if key.is_empty() => return Err(no_key()),
            _ => {}
        }
    }
    Ok(())
}

/// The puts and deletes of a branch, nested ones included, checked in
/// etcd's order: this level's deletes first, then the nested transactions
/// in turn (a put of theirs may not repeat an earlier one, though the two
/// branches of one may put the same key, nor fall in a delete of this level
/// or of an earlier nested one), then this level's puts. So a nested put
/// followed by a sibling's delete of the key passes, as in etcd.
fn check_duplicates(ops: &[Op]) -> Result<(BTreeSet<String>, Vec<Range>), RegistryError> {
    let dup = || {
        error(
            "run a transaction",
            ErrorKind::DuplicateKey,
            "duplicate key given in txn request",
        )
    };
    let mut dels: Vec<Range> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Delete(r) => Some(r.clone()),
            _ => None,
        })
        .collect();
    let deleted = |dels: &[Range], key: &str| dels.iter().any(|r| overlaps(r, key));
    let mut puts = BTreeSet::new();
    for op in ops {
        let Op::Txn(t) = op else { continue };
        let (then_puts, then_dels) = check_duplicates(&t.then)?;
        let (else_puts, else_dels) = check_duplicates(&t.otherwise)?;
        for k in &then_puts {
            if puts.contains(k) || deleted(&dels, k) {
                return Err(dup());
            }
            puts.insert(k.clone());
        }
        for k in else_puts {
            if (puts.contains(&k) && !then_puts.contains(&k)) || deleted(&dels, &k) {
                return Err(dup());
            }
            puts.insert(k);
        }
        dels.extend(then_dels);
        dels.extend(else_dels);
    }
    for op in ops {
        let Op::Put { key, .. } = op else { continue };
        if puts.contains(key) || deleted(&dels, key) {
            return Err(dup());
        }
        puts.insert(key.clone());
    }
    Ok((puts, dels))
}

/// Whether etcd's duplicate check sees a put of `key` in a delete of
/// `range`. A delete of every key (the empty prefix, sent as the range
/// "\0".."\0") is an empty interval to that check: it overlaps no put.
fn overlaps(range: &Range, key: &str) -> bool {
    !matches!(range, Range::Prefix(p) if p.is_empty()) && range.contains(key)
}

/// A client of the model: clones share the store, each with its own watch.
#[derive(Debug, Default)]
pub struct Model {
    state: Arc<Mutex<State>>,
    watch: Option<mpsc::UnboundedReceiver<WatchItem>>,
}

impl Clone for Model {
    fn clone(&self) -> Self {
        Model {
            state: self.state.clone(),
            watch: None,
        }
    }
}

impl Model {
    /// The version [`Etcd::status`] reports.
    pub const VERSION: &'static str = "0.0.0-model";

    /// An empty store at revision 1.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        let mut s = self.state.lock().expect("model lock");
        s.expire();
        s
    }

    /// Counts the call and fails it as the faults say: at once when
    /// unreachable, after the call bound when hung (as `EtcdRegistry`
    /// gives up on a frozen etcd).
    async fn begin(&self, op: &'static str) -> Result<MutexGuard<'_, State>, RegistryError> {
        let (hung, bound) = {
            let mut s = self.lock();
            *s.calls.entry(op).or_default() += 1;
            if s.unreachable {
                return Err(error(op, ErrorKind::Unavailable, "connection refused"));
            }
            (s.hung, s.call_bound)
        };
        if hung {
            tokio::time::sleep(bound).await;
            let cause = format!("no answer within {}", humantime::format_duration(bound));
            return Err(error(op, ErrorKind::Unavailable, &cause));
        }
        Ok(self.lock())
    }

    /// How long a call waits on a hung store before it gives up (the
    /// caller's bound on every etcd call); 1 s unless set.
    pub fn set_call_bound(&self, bound: Duration) {
        self.lock().call_bound = bound;
    }

    fn set_watch(&mut self, rx: mpsc::UnboundedReceiver<WatchItem>) {
        self.watch = Some(rx);
    }

    /// `key` as the store holds it now.
    pub fn get(&self, key: &str) -> Option<KeyValue> {
        self.lock().current(key).cloned()
    }

    /// Every key under `prefix` now, in key order.
    pub fn keys(&self, prefix: &str) -> Vec<KeyValue> {
        let s = self.lock();
        s.live_keys(&Range::Prefix(prefix.to_string()), s.revision)
    }

    /// Writes `key` as another writer would, under `lease` (0: none).
    pub fn put_foreign(&self, key: &str, value: &str, lease: i64) {
        let mut s = self.lock();
        let rev = s.revision + 1;
        s.write_put(key, value, lease, rev);
        s.commit(rev);
    }

    /// Deletes `key` as another writer (or etcdctl) would.
    pub fn delete(&self, key: &str) {
        let mut s = self.lock();
        let rev = s.revision + 1;
        if s.write_delete(key, rev) {
            s.commit(rev);
        }
    }

    /// Revokes `lease` behind its holder's back (an operator, or its loss).
    pub fn revoke_lease(&self, lease: LeaseId) {
        self.lock().drop_lease(lease.0);
    }

    /// The leases etcd has now.
    pub fn leases(&self) -> Vec<LeaseId> {
        self.lock().leases.keys().map(|&id| LeaseId(id)).collect()
    }

    /// Makes every request fail at once, as a refused connection, and ends
    /// the watches (`true`), or answer again (`false`).
    pub fn set_unreachable(&self, unreachable: bool) {
        let mut s = self.lock();
        s.unreachable = unreachable;
        if unreachable {
            s.watchers.clear();
        }
    }

    /// Makes every request wait for ever, as a frozen etcd (`true`), or
    /// answer again (`false`); the callers' time limits end the waits.
    pub fn set_hung(&self, hung: bool) {
        self.lock().hung = hung;
    }

    /// Refuses every write under `prefix` from now on (etcd's answer to a
    /// role without write permission there).
    pub fn deny(&self, prefix: &str) {
        self.lock().denied.push(prefix.to_string());
    }

    /// A restart with the data kept: watches break, and every lease is
    /// renewed to its full TTL (as a new leader does).
    pub fn restart(&self) {
        let mut s = self.lock();
        s.watchers.clear();
        let now = Instant::now();
        for (ttl, at) in s.leases.values_mut() {
            *at = now + *ttl;
        }
    }

    /// Forgets everything, as an etcd whose data dir was wiped: revisions
    /// start again at 1.
    pub fn wipe(&self) {
        let mut s = self.lock();
        let calls = std::mem::take(&mut s.calls);
        let (unreachable, hung, denied) = (s.unreachable, s.hung, std::mem::take(&mut s.denied));
        // Lease ids are not reused, as etcd's (member id and time) are not.
        let (next_lease, call_bound) = (s.next_lease, s.call_bound);
        *s = State {
            calls,
            call_bound,
            next_lease,
            unreachable,
            hung,
            denied,
            ..State::default()
        };
    }

    /// Compacts the history up to `revision`.
    pub fn compact(&self, revision: i64) {
        let mut s = self.lock();
        s.compacted = revision;
        // etcd keeps, of each key, only its last change at or before the
        // compaction point, and that only when it is a put: a watch from
        // the point itself replays those puts but no deletion made there.
        let history = std::mem::take(&mut s.history);
        s.history = history
            .iter()
            .enumerate()
            .filter(|(i, e)| {
                let at = e.kv.mod_revision;
                let last_there = || {
                    !history[i + 1..]
                        .iter()
                        .take_while(|later| later.kv.mod_revision == at)
                        .any(|later| later.kv.key == e.kv.key)
                };
                at > revision || (at == revision && e.put && last_there())
            })
            .map(|(_, e)| e.clone())
            .collect();
        for versions in s.versions.values_mut() {
            // Keep the newest version at or before the compaction point.
            let keep = versions.iter().rposition(|(r, _)| *r <= revision).unwrap_or(0);
            versions.drain(..keep);
        }
        s.versions.retain(|_, v| !(v.len() == 1 && v[0].1.is_none()));
    }

    /// The store's revision.
    pub fn revision(&self) -> i64 {
        self.lock().revision
    }

    /// How many times `op` was asked for: `grant`, `keep_alive`, `revoke`,
    /// `time_to_live`, `txn`, `watch`, `status`.
    pub fn calls(&self, op: &str) -> u64 {
        self.lock().calls.get(op).copied().unwrap_or(0)
    }
}

impl Etcd for Model {
    async fn grant(&mut self, ttl: Duration, id: Option<LeaseId>) -> Result<Granted, RegistryError> {
        let mut s = self.begin("grant").await?;
        // etcd counts whole seconds (the registry sends those), raised to
        // its minimum, and refuses more than its maximum.
        if ttl.as_secs() > MAX_LEASE_TTL {
            return Err(error("grant a lease", ErrorKind::Other, "too large lease TTL"));
        }
        let ttl = Duration::from_secs(ttl.as_secs().max(MIN_LEASE_TTL));
        let id = match id {
            Some(id) if s.leases.contains_key(&id.0) => {
                return Err(error("grant a lease", ErrorKind::LeaseExists, "lease already exists"))
            }
            Some(id) => id.0,
            None => {
                s.next_lease += 1;
                s.next_lease
            }
        };
        s.leases.insert(id, (ttl, Instant::now() + ttl));
        Ok(Granted { id: LeaseId(id), ttl })
    }

    async fn keep_alive(&mut self, lease: LeaseId) -> Result<Option<Duration>, RegistryError> {
        let mut s = self.begin("keep_alive").await?;
        Ok(s.leases.get_mut(&lease.0).map(|(ttl, at)| {
            *at = Instant::now() + *ttl;
            *ttl
        }))
    }

    async fn revoke(&mut self, lease: LeaseId) -> Result<bool, RegistryError> {
        let mut s = self.begin("revoke").await?;
        if !s.leases.contains_key(&lease.0) {
            return Ok(false);
        }
        s.drop_lease(lease.0);
        Ok(true)
    }

    async fn time_to_live(&mut self, lease: LeaseId) -> Result<Option<Duration>, RegistryError> {
        let s = self.begin("time_to_live").await?;
        // etcd counts whole seconds, rounded down, and answers -1 (here
        // `None`) for a lease it does not have.
        let now = Instant::now();
        Ok(s.leases
            .get(&lease.0)
            .map(|(_, at)| Duration::from_secs(at.saturating_duration_since(now).as_secs())))
    }

    async fn txn(&mut self, txn: Txn) -> Result<TxnResult, RegistryError> {
        let mut s = self.begin("txn").await?;
        check_request(&txn, MAX_TXN_OPS)?;
        check_duplicates(&txn.then)?;
        check_duplicates(&txn.otherwise)?;
        if writes(&txn)
            .iter()
            .any(|k| s.denied.iter().any(|p| k.starts_with(p.as_str())))
        {
            return Err(error(
                "run a transaction",
                ErrorKind::Denied,
                "permission denied (permission denied)",
            ));
        }
        s.check(&txn)?;
        let rev = s.revision + 1;
        let mut changed = false;
        let mut result = s.apply(&txn, rev, &mut changed);
        if changed {
            s.commit(rev);
        }
        result.revision = s.revision;
        set_revision(&mut result, s.revision);
        Ok(result)
    }

    async fn watch(&mut self, ranges: &[Range], from: i64, deletes_only: bool) -> Result<(), RegistryError> {
        self.watch = None;
        let mut s = self.begin("watch").await?;
        let (tx, rx) = mpsc::unbounded_channel();
        if ranges.is_empty() {
            return Ok(());
        }
        let next = if from == 0 { s.revision + 1 } else { from };
        if next < s.compacted {
            let _ = tx.send(Err(error(
                "watch the keys",
                ErrorKind::Compacted,
                "etcd cancelled the watch: mvcc: required revision has been compacted",
            )));
        } else {
            s.watchers.push(Watcher {
                ranges: ranges.to_vec(),
                deletes_only,
                next,
                tx,
            });
            s.deliver();
        }
        drop(s);
        self.set_watch(rx);
        Ok(())
    }

    async fn watched(&mut self) -> Result<Vec<Event>, RegistryError> {
        loop {
            let Some(rx) = self.watch.as_mut() else {
                return std::future::pending().await;
            };
            let expiry = self.state.lock().expect("model lock").next_expiry();
            tokio::select! {
                item = rx.recv() => {
                    return match item {
                        Some(Ok(events)) => Ok(events),
                        Some(Err(e)) => {
                            self.watch = None;
                            Err(e)
                        }
                        None => {
                            self.watch = None;
                            Err(error("watch the keys", ErrorKind::Unavailable, "etcd closed the watch"))
                        }
                    };
                }
                // Leases expire on the clock: the watch drives that, so a
                // watcher hears of an expiry even while nobody calls.
                _ = tokio::time::sleep_until(expiry.unwrap_or_else(Instant::now)), if expiry.is_some() => {
                    drop(self.lock());
                }
            }
        }
    }

    async fn status(&mut self) -> Result<Status, RegistryError> {
        drop(self.begin("status").await?);
        Ok(Status {
            version: Self::VERSION.to_string(),
        })
    }

    fn unwatch(&mut self) {
        self.watch = None;
    }

    fn forget(&mut self, _lease: LeaseId) {}

    fn endpoint(&self) -> &str {
        "model"
    }
}

/// Every key a transaction may write, in either branch.
fn writes(txn: &Txn) -> Vec<&str> {
    let mut keys = Vec::new();
    for op in txn.then.iter().chain(&txn.otherwise) {
        match op {
            Op::Put { key, .. } | Op::Delete(Range::Key(key) | Range::Prefix(key) | Range::Span { start: key, .. }) => {
                keys.push(key.as_str())
            }
            Op::Txn(t) => keys.extend(writes(t)),
            Op::Get { .. } => {}
        }
    }
    keys
}

fn set_revision(t: &mut TxnResult, revision: i64) {
    t.revision = revision;
    for r in &mut t.results {
        if let OpResult::Txn(n) = r {
            set_revision(n, revision);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &str, v: &str) -> Op {
        Op::put(k, v, 0)
    }

    fn txn(then: Vec<Op>) -> Txn {
        Txn { then, ..Txn::default() }
    }

    #[tokio::test(start_paused = true)]
    async fn one_revision_per_transaction_and_none_for_reads() {
        let mut m = Model::new();
        let r = m.txn(txn(vec![put("a", "1"), put("b", "2")])).await.unwrap();
        assert_eq!(r.revision, 2);
        assert_eq!(m.get("a").unwrap().mod_revision, 2);
        let r = m.txn(txn(vec![Op::get(Range::Prefix(String::new()))])).await.unwrap();
        assert_eq!(r.revision, 2);
        let r = m.txn(txn(vec![Op::Delete(Range::Key("zz".into()))])).await.unwrap();
        assert_eq!(r.revision, 2, "deleting nothing changes nothing");
    }

    #[tokio::test(start_paused = true)]
    async fn the_limit_counts_nested_operations_against_the_parent() {
        let mut m = Model::new();
        let nested = |k: String| {
            Op::Txn(Txn {
                when: vec![Compare::new(&k, Target::Version(0))],
                then: vec![put(&k, "v")],
                otherwise: vec![],
            })
        };
        let ok: Vec<Op> = (0..127).map(|i| nested(format!("k{i}"))).collect();
        m.txn(txn(ok)).await.unwrap();
        let too_many: Vec<Op> = (0..128).map(|i| nested(format!("n{i}"))).collect();
        assert_eq!(m.txn(txn(too_many)).await.unwrap_err().kind, ErrorKind::TooManyOps);
        let flat: Vec<Op> = (0..129).map(|i| put(&format!("f{i}"), "v")).collect();
        assert_eq!(m.txn(txn(flat)).await.unwrap_err().kind, ErrorKind::TooManyOps);
    }

    #[tokio::test(start_paused = true)]
    async fn a_watch_from_a_past_revision_replays_and_a_compacted_one_is_cancelled() {
        let mut m = Model::new();
        m.txn(txn(vec![put("/a", "1")])).await.unwrap();
        m.txn(txn(vec![put("/a", "2")])).await.unwrap();
        let mut w = m.clone();
        w.watch(&[Range::Prefix("/".into())], 2, false).await.unwrap();
        assert_eq!(w.watched().await.unwrap()[0].kv.value, "1");
        assert_eq!(w.watched().await.unwrap()[0].kv.value, "2");
        m.compact(3);
        w.watch(&[Range::Prefix("/".into())], 2, false).await.unwrap();
        assert_eq!(w.watched().await.unwrap_err().kind, ErrorKind::Compacted);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_expires_on_the_clock_and_a_watcher_hears_it() {
        let mut m = Model::new();
        let g = m.grant(Duration::from_secs(3), Some(LeaseId(7))).await.unwrap();
        assert_eq!(
            m.grant(Duration::from_secs(3), Some(LeaseId(7)))
                .await
                .unwrap_err()
                .kind,
            ErrorKind::LeaseExists
        );
        m.txn(txn(vec![Op::put("/k", "v", g.id.0)])).await.unwrap();
        let mut w = m.clone();
        w.watch(&[Range::Key("/k".into())], 0, true).await.unwrap();
        let gone = w.watched().await.unwrap();
        assert!(!gone[0].put);
        assert_eq!(m.get("/k"), None);
        assert_eq!(m.keep_alive(g.id).await.unwrap(), None);
        let e = m.txn(txn(vec![Op::put("/k", "v", g.id.0)])).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::LeaseNotFound);
    }

    #[tokio::test(start_paused = true)]
    async fn time_to_live_counts_down_in_whole_seconds_and_an_unknown_lease_has_none() {
        let mut m = Model::new();
        let g = m.grant(Duration::from_secs(10), None).await.unwrap();
        assert_eq!(m.time_to_live(g.id).await.unwrap(), Some(Duration::from_secs(10)));
        tokio::time::advance(Duration::from_millis(2500)).await;
        // 7.5s left: etcd says 7.
        assert_eq!(m.time_to_live(g.id).await.unwrap(), Some(Duration::from_secs(7)));
        tokio::time::advance(Duration::from_secs(8)).await;
        assert_eq!(m.time_to_live(g.id).await.unwrap(), None, "expired");
        assert_eq!(m.time_to_live(LeaseId(0x42)).await.unwrap(), None, "never granted");
        m.set_unreachable(true);
        assert_eq!(m.time_to_live(g.id).await.unwrap_err().kind, ErrorKind::Unavailable);
        assert_eq!(m.status().await.unwrap_err().kind, ErrorKind::Unavailable);
        m.set_unreachable(false);
        assert_eq!(m.status().await.unwrap().version, Model::VERSION);
    }
}
