//! The model of etcd (`registry::memory::Model`) against a real etcd: the
//! same requests go to both and must get the same answers. Revisions are
//! compared relative to each store's start (revision 1 of a fresh store is
//! relative 1), leases are granted with chosen ids so that they match, and
//! watch events are compared as one flat list (etcd batches revisions as it
//! likes). `txns` and `history` hold targeted sequences, `random` a seeded
//! random walk.

mod history;
mod random;
mod txns;

use std::time::Duration;

use etcd_client::{Client, CompactionOptions};
use etcd_sidekick::config::EtcdSettings;
use etcd_sidekick::discover::{Discovery, Rule};
use etcd_sidekick::registry::memory::Model;
use etcd_sidekick::registry::{
    connect_options, Compare, ErrorKind, Etcd, EtcdRegistry, Event, Granted, KeyValue, LeaseId, Op, OpResult, Range,
    RegistryError, Target, Txn, TxnResult,
};
use tokio::time::error::Elapsed;

use crate::harness::Etcd as Server;

/// Each request's time limit.
const TIMEOUT: Duration = Duration::from_secs(5);

/// One request of the trait, with revisions relative to the store's start.
#[derive(Debug, Clone)]
pub enum Request {
    Txn(Txn),
    Grant { ttl: Duration, id: i64 },
    KeepAlive(i64),
    Revoke(i64),
}

/// The answer to a [`Request`], revisions relative.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Txn(TxnResult),
    Granted(Granted),
    KeptAlive(Option<Duration>),
    Revoked(bool),
}

/// A real etcd and a fresh model, asked the same things.
pub struct Pair {
    server: Server,
    real: EtcdRegistry,
    model: Model,
    client: Client,
    /// How far each store's revisions are ahead of the relative ones.
    real_offset: i64,
    model_offset: i64,
    /// Said with every mismatch (the random walk's seed and step).
    pub context: String,
}

impl Pair {
    pub async fn start() -> Pair {
        let server = Server::start().await;
        let mut real = registry(&server);
        let client = server.client(0).await;
        let mut model = Model::new();
        let now = |r: Result<TxnResult, _>| r.expect("a read").revision;
        let real_offset = now(real.txn(Txn::default()).await) - 1;
        let model_offset = now(model.txn(Txn::default()).await) - 1;
        Pair {
            server,
            real,
            model,
            client,
            real_offset,
            model_offset,
            context: String::new(),
        }
    }

    /// Asks both; the answers must be equal. Returns etcd's.
    pub async fn ask(&mut self, req: Request) -> Result<Answer, ErrorKind> {
        let real = ask(&mut self.real, &req, self.real_offset).await;
        let model = ask(&mut self.model, &req, self.model_offset).await;
        assert_eq!(
            real,
            model,
            "etcd (left) and the model (right) differ {}\non {}",
            self.context,
            brief(&req)
        );
        real
    }

    pub async fn txn(&mut self, txn: Txn) -> Result<TxnResult, ErrorKind> {
        self.ask(Request::Txn(txn)).await.map(|a| match a {
            Answer::Txn(r) => r,
            other => unreachable!("{other:?}"),
        })
    }

    pub async fn grant(&mut self, ttl: Duration, id: i64) -> Result<Granted, ErrorKind> {
        self.ask(Request::Grant { ttl, id }).await.map(|a| match a {
            Answer::Granted(g) => g,
            other => unreachable!("{other:?}"),
        })
    }

    pub async fn keep_alive(&mut self, id: i64) -> Result<Option<Duration>, ErrorKind> {
        self.ask(Request::KeepAlive(id)).await.map(|a| match a {
            Answer::KeptAlive(ttl) => ttl,
            other => unreachable!("{other:?}"),
        })
    }

    pub async fn revoke(&mut self, id: i64) -> Result<bool, ErrorKind> {
        self.ask(Request::Revoke(id)).await.map(|a| match a {
            Answer::Revoked(r) => r,
            other => unreachable!("{other:?}"),
        })
    }

    /// The current relative revision, the same in both.
    pub async fn revision(&mut self) -> i64 {
        self.txn(Txn::default()).await.expect("a read").revision
    }

    /// Compacts both at relative `revision` (etcd physically, so that the
    /// history is gone when this returns).
    pub async fn compact(&mut self, revision: i64) {
        let physical = Some(CompactionOptions::new().with_physical());
        self.client
            .compact(revision + self.real_offset, physical)
            .await
            .unwrap_or_else(|e| panic!("etcd compacts at {revision}: {e} {}", self.context));
        self.model.compact(revision + self.model_offset);
    }

    /// The model's keys now, revisions relative.
    pub fn model_keys(&self) -> Vec<KeyValue> {
        let mut kvs = self.model.keys("");
        kvs.iter_mut().for_each(|kv| shift_kv(kv, -self.model_offset));
        kvs
    }

    /// A watch of `ranges` from relative revision `from` on both.
    pub async fn watch(&self, ranges: &[Range], from: i64, deletes_only: bool) -> Watch {
        let mut real = registry(&self.server);
        let mut model = self.model.clone();
        real.watch(ranges, from + self.real_offset, deletes_only).await.unwrap();
        model
            .watch(ranges, from + self.model_offset, deletes_only)
            .await
            .unwrap();
        Watch {
            real,
            model,
            real_offset: self.real_offset,
            model_offset: self.model_offset,
            context: format!(
                "{} watching {ranges:?} from {from} (deletes only: {deletes_only})",
                self.context
            ),
        }
    }
}

/// A registry on the server, built as the sidekick builds its own.
fn registry(server: &Server) -> EtcdRegistry {
    let endpoints: Vec<String> = server.endpoints().split(',').map(String::from).collect();
    let settings = EtcdSettings {
        discovery: Discovery {
            endpoints: endpoints.clone(),
            rule: Rule::Flag,
        },
        auth: None,
        tls: None,
        dial_timeout: TIMEOUT,
    };
    EtcdRegistry::new(endpoints, connect_options(&settings).unwrap(), TIMEOUT)
}

async fn ask<E: Etcd>(store: &mut E, req: &Request, offset: i64) -> Result<Answer, ErrorKind> {
    let answer = match req {
        Request::Txn(t) => {
            let mut r = store.txn(shift_txn(t, offset)).await.map_err(|e| e.kind)?;
            shift_result(&mut r, -offset);
            Answer::Txn(r)
        }
        Request::Grant { ttl, id } => Answer::Granted(store.grant(*ttl, Some(LeaseId(*id))).await.map_err(|e| e.kind)?),
        Request::KeepAlive(id) => Answer::KeptAlive(store.keep_alive(LeaseId(*id)).await.map_err(|e| e.kind)?),
        Request::Revoke(id) => Answer::Revoked(store.revoke(LeaseId(*id)).await.map_err(|e| e.kind)?),
    };
    Ok(answer)
}

/// A request for a failure message: long transactions cut short.
fn brief(req: &Request) -> String {
    let text = format!("{req:?}");
    match text.char_indices().nth(1500) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text,
    }
}

/// A revision moved by `by`; 0 (none) stays 0.
fn shift(revision: i64, by: i64) -> i64 {
    if revision == 0 {
        0
    } else {
        revision + by
    }
}

fn shift_kv(kv: &mut KeyValue, by: i64) {
    kv.create_revision = shift(kv.create_revision, by);
    kv.mod_revision = shift(kv.mod_revision, by);
}

fn shift_txn(t: &Txn, by: i64) -> Txn {
    let when = t
        .when
        .iter()
        .map(|c| {
            let target = match &c.target {
                Target::CreateRevision(r) => Target::CreateRevision(shift(*r, by)),
                Target::ModRevision(r) => Target::ModRevision(shift(*r, by)),
                other => other.clone(),
            };
            Compare::new(&c.key, target)
        })
        .collect();
    let ops = |ops: &[Op]| -> Vec<Op> {
        ops.iter()
            .map(|op| match op {
                Op::Get {
                    range,
                    revision,
                    count_only,
                } => Op::Get {
                    range: range.clone(),
                    revision: shift(*revision, by),
                    count_only: *count_only,
                },
                Op::Txn(t) => Op::Txn(shift_txn(t, by)),
                other => other.clone(),
            })
            .collect()
    };
    Txn {
        when,
        then: ops(&t.then),
        otherwise: ops(&t.otherwise),
    }
}

fn shift_result(r: &mut TxnResult, by: i64) {
    r.revision = shift(r.revision, by);
    for result in &mut r.results {
        match result {
            OpResult::Get { kvs, .. } => kvs.iter_mut().for_each(|kv| shift_kv(kv, by)),
            OpResult::Txn(t) => shift_result(t, by),
            OpResult::Put | OpResult::Delete(_) => {}
        }
    }
}

/// The same watch on both stores.
pub struct Watch {
    real: EtcdRegistry,
    model: Model,
    real_offset: i64,
    model_offset: i64,
    context: String,
}

/// How long a watch must stay silent to be done.
const QUIET: Duration = Duration::from_millis(300);

impl Watch {
    /// Every event delivered so far, the same on both.
    pub async fn events(&mut self) -> Vec<Event> {
        let (real, model) = self.delivered().await;
        assert_eq!(
            real, model,
            "etcd's events (left) and the model's (right) differ {}",
            self.context
        );
        real
    }

    /// Every event delivered so far, range by range, the same on both:
    /// etcd orders the events of several ranges only within each.
    pub async fn events_by_range(&mut self, ranges: &[Range]) -> Vec<Vec<Event>> {
        let (real, model) = self.delivered().await;
        let split = |events: &[Event]| -> Vec<Vec<Event>> {
            let of = |r: &Range| events.iter().filter(|e| r.contains(&e.kv.key)).cloned().collect();
            ranges.iter().map(of).collect()
        };
        let (real, model) = (split(&real), split(&model));
        assert_eq!(
            real, model,
            "etcd's events (left) and the model's (right) differ {}",
            self.context
        );
        real
    }

    /// The events delivered by etcd and by the model so far. The model
    /// delivers at once; etcd is waited for until it has as many, then for
    /// a quiet spell in which nothing more may come.
    async fn delivered(&mut self) -> (Vec<Event>, Vec<Event>) {
        let model = collect(
            &mut self.model,
            self.model_offset,
            usize::MAX,
            Duration::from_millis(20),
        )
        .await;
        let mut real = collect(&mut self.real, self.real_offset, model.len(), TIMEOUT).await;
        real.extend(collect(&mut self.real, self.real_offset, usize::MAX, QUIET).await);
        (real, model)
    }

    /// The kind of the error that ends the watch, the same on both.
    pub async fn ended(&mut self) -> ErrorKind {
        let real = tokio::time::timeout(TIMEOUT, self.real.watched()).await;
        let model = tokio::time::timeout(TIMEOUT, self.model.watched()).await;
        let kind = |r: Result<Result<Vec<Event>, RegistryError>, Elapsed>| match r {
            Ok(Err(e)) => Ok(e.kind),
            Ok(Ok(events)) => Err(format!("events {events:?}")),
            Err(_) => Err("nothing".to_string()),
        };
        let (real, model) = (kind(real), kind(model));
        assert_eq!(real, model, "the watch ended differently {}", self.context);
        real.unwrap_or_else(|e| panic!("the watch did not end but gave {e} {}", self.context))
    }
}

/// Events until there are `want`, or until none came within `wait`.
async fn collect<E: Etcd>(w: &mut E, offset: i64, want: usize, wait: Duration) -> Vec<Event> {
    let mut events = Vec::new();
    while events.len() < want {
        match tokio::time::timeout(wait, w.watched()).await {
            Ok(Ok(batch)) => events.extend(batch),
            Ok(Err(e)) => panic!("the watch ended: {e} (after {events:?})"),
            Err(_) => break,
        }
    }
    events.iter_mut().for_each(|e| shift_kv(&mut e.kv, -offset));
    events
}

/// Puts `key` = `value`, no lease.
pub fn put(key: &str, value: &str) -> Op {
    Op::put(key, value, 0)
}

/// A transaction without compares.
pub fn txn(then: Vec<Op>) -> Txn {
    Txn { then, ..Txn::default() }
}

/// A transaction with compares and both branches.
pub fn when(when: Vec<Compare>, then: Vec<Op>, otherwise: Vec<Op>) -> Txn {
    Txn { when, then, otherwise }
}

pub fn key(k: &str) -> Range {
    Range::Key(k.to_string())
}

pub fn prefix(p: &str) -> Range {
    Range::Prefix(p.to_string())
}

pub fn del(k: &str) -> Op {
    Op::Delete(key(k))
}

/// A nested transaction without compares.
pub fn nest(ops: Vec<Op>) -> Op {
    Op::Txn(txn(ops))
}

/// Reads `range` at relative `revision` (0: now).
pub fn get_at(range: Range, revision: i64) -> Op {
    Op::Get {
        range,
        revision,
        count_only: false,
    }
}

/// The keys read by `result`'s `i`-th operation.
pub fn read(result: &TxnResult, i: usize) -> Vec<KeyValue> {
    match &result.results[i] {
        OpResult::Get { kvs, .. } => kvs.clone(),
        other => panic!("operation {i} is no read: {other:?}"),
    }
}
