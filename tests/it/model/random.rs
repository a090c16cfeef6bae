//! A seeded random walk over a few keys and leases, compared step by step,
//! with two watches open from the start compared as they go and watches
//! from random past revisions. `MODEL_SEED=n` walks another way; a failure
//! names its seed.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_sidekick::registry::{Compare, ErrorKind, KeyValue, Op, Range, Target, Txn};

use super::*;

const DEFAULT_SEED: u64 = 20_240_601;
const STEPS: usize = 400;
const KEYS: [&str; 8] = ["a", "a/x", "a/y", "ab", "b", "b/x", "b/y", "c"];
const PREFIXES: [&str; 4] = ["", "a", "a/", "b/"];
const VALUES: [&str; 3] = ["", "1", "2"];
/// The leases granted and revoked; 0x5f is never granted.
const LEASES: [i64; 3] = [0x51, 0x52, 0x53];
const UNKNOWN_LEASE: i64 = 0x5f;
/// Long enough that no lease expires during the walk.
const TTL: Duration = Duration::from_secs(600);

/// Names the seed of a failed walk.
struct Seed(u64);

impl Drop for Seed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("the random walk failed: run it again with MODEL_SEED={}", self.0);
        }
    }
}

struct Walk {
    rng: fastrand::Rng,
    /// The current relative revision.
    revision: i64,
    compacted: i64,
    /// The keys now, for compares that may hold.
    keys: Vec<KeyValue>,
}

impl Walk {
    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.rng.usize(..from.len())]
    }

    fn key(&mut self) -> String {
        self.pick(&KEYS).to_string()
    }

    fn range(&mut self) -> Range {
        if self.rng.u8(..3) > 0 {
            Range::Key(self.key())
        } else {
            Range::Prefix(self.pick(&PREFIXES).to_string())
        }
    }

    fn lease(&mut self) -> i64 {
        match self.rng.u8(..8) {
            0..=3 => 0,
            4..=6 => self.pick(&LEASES),
            _ => UNKNOWN_LEASE,
        }
    }

    /// Mostly now; else any revision from the first to the next one.
    fn read_revision(&mut self) -> i64 {
        if self.rng.u8(..4) == 0 {
            self.rng.i64(1..=self.revision + 1)
        } else {
            0
        }
    }

    fn op(&mut self, depth: usize) -> Op {
        match self.rng.u8(..10) {
            0..=3 => {
                let (key, value, lease) = (self.key(), self.pick(&VALUES), self.lease());
                Op::put(&key, value, lease)
            }
            4 | 5 => Op::Delete(self.range()),
            8 | 9 if depth < 2 => Op::Txn(self.txn(depth + 1)),
            _ => Op::Get {
                range: self.range(),
                revision: self.read_revision(),
                count_only: self.rng.u8(..4) == 0,
            },
        }
    }

    /// Half the time what the key really has, so that both branches run.
    fn compare(&mut self) -> Compare {
        let key = self.key();
        let now = self.keys.iter().find(|kv| kv.key == key).cloned().unwrap_or_default();
        let real = self.rng.bool();
        let target = match self.rng.u8(..5) {
            0 => Target::Version(if real { now.version } else { self.rng.i64(0..3) }),
            1 => Target::CreateRevision(if real {
                now.create_revision
            } else {
                self.rng.i64(0..=self.revision)
            }),
            2 => Target::ModRevision(if real {
                now.mod_revision
            } else {
                self.rng.i64(0..=self.revision)
            }),
            3 => Target::Lease(if real { now.lease } else { self.lease() }),
            _ => Target::Value(if real {
                now.value
            } else {
                self.pick(&VALUES).to_string()
            }),
        };
        Compare::new(&key, target)
    }

    fn txn(&mut self, depth: usize) -> Txn {
        let when = (0..self.rng.usize(..3)).map(|_| self.compare()).collect();
        let then = (0..self.rng.usize(..4)).map(|_| self.op(depth)).collect();
        let otherwise = (0..self.rng.usize(..3)).map(|_| self.op(depth)).collect();
        Txn { when, then, otherwise }
    }
}

/// What the walk did, so that a walk that tested nothing fails.
#[derive(Debug, Default)]
struct Tally {
    written: usize,
    refused: BTreeMap<String, usize>,
    branches: [usize; 2],
    leases: usize,
    compactions: usize,
    replays: usize,
    cancelled: usize,
    events: usize,
}

#[tokio::test]
async fn a_random_walk_answers_alike() {
    let seed = match std::env::var("MODEL_SEED") {
        Ok(s) => s.parse().expect("MODEL_SEED is a number"),
        Err(_) => DEFAULT_SEED,
    };
    let _seed = Seed(seed);
    let mut p = Pair::start().await;
    let mut walk = Walk {
        rng: fastrand::Rng::with_seed(seed),
        revision: 1,
        compacted: 0,
        keys: Vec::new(),
    };
    let mut t = Tally::default();
    let mut everything = p.watch(&[prefix("")], 2, false).await;
    let mut deletions = p.watch(&[prefix("a")], 2, true).await;
    for step in 0..STEPS {
        p.context = format!("(MODEL_SEED={seed}, step {step})");
        walk.revision = p.revision().await;
        walk.keys = p.model_keys();
        match walk.rng.u8(..100) {
            0..=69 => match p.txn(walk.txn(0)).await {
                Ok(r) => {
                    t.written += usize::from(r.revision > walk.revision);
                    t.branches[usize::from(r.succeeded)] += 1;
                }
                Err(kind) => *t.refused.entry(format!("{kind:?}")).or_default() += 1,
            },
            70..=77 => {
                let id = walk.pick(&LEASES);
                t.leases += usize::from(p.grant(TTL, id).await.is_ok());
            }
            78..=85 => {
                let id = if walk.rng.bool() {
                    walk.pick(&LEASES)
                } else {
                    UNKNOWN_LEASE
                };
                p.keep_alive(id).await.unwrap();
            }
            86..=93 => {
                let id = walk.pick(&LEASES);
                p.revoke(id).await.unwrap();
            }
            94..=96 if walk.revision > walk.compacted.max(1) => {
                // etcd's open watches must not fall behind a compaction.
                t.events += everything.events().await.len() + deletions.events().await.len();
                let at = walk.rng.i64(walk.compacted.max(1) + 1..=walk.revision);
                p.compact(at).await;
                walk.compacted = at;
                t.compactions += 1;
            }
            _ => {
                let from = walk.rng.i64((walk.compacted - 1).max(1)..=walk.revision + 1);
                let (range, deletes_only) = (walk.range(), walk.rng.bool());
                let mut w = p.watch(&[range], from, deletes_only).await;
                if from < walk.compacted {
                    assert_eq!(w.ended().await, ErrorKind::Compacted);
                    t.cancelled += 1;
                } else {
                    w.events().await;
                    t.replays += 1;
                }
            }
        }
        if step % 50 == 49 {
            t.events += everything.events().await.len() + deletions.events().await.len();
        }
    }
    t.events += everything.events().await.len() + deletions.events().await.len();
    let all = p.txn(Txn {
        then: vec![Op::get(prefix(""))],
        ..Txn::default()
    });
    all.await.unwrap();
    eprintln!("MODEL_SEED={seed}: {t:?}");
    assert!(
        t.written > 50 && t.refused.len() >= 3 && t.branches.iter().all(|&n| n > 20),
        "{t:?}"
    );
    assert!(t.leases > 3 && t.compactions > 1 && t.events > 100, "{t:?}");
    assert!(t.replays > 1 && t.replays + t.cancelled > 2, "{t:?}");
}
