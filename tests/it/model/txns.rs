//! Targeted transactions: each answer is compared between etcd and the
//! model by [`Pair`], and checked against what etcd is known to answer, so
//! that a model and an etcd wrong alike still fail.

use etcd_sidekick::registry::{Compare, ErrorKind, Op, OpResult, Target, Txn};

use super::*;

#[tokio::test]
async fn revisions_versions_and_reads_at_a_past_revision() {
    let mut p = Pair::start().await;
    let r = p.txn(txn(vec![put("a/1", "x"), put("a/2", "y"), put("b", "z")])).await;
    assert_eq!(r.unwrap().revision, 2, "one revision for the whole transaction");
    assert_eq!(p.txn(txn(vec![put("a/1", "x2")])).await.unwrap().revision, 3);

    let r = p
        .txn(txn(vec![Op::get(prefix("a/")), Op::get(prefix(""))]))
        .await
        .unwrap();
    assert_eq!(r.revision, 3, "a read changes nothing");
    let a1 = &read(&r, 0)[0];
    assert_eq!((a1.create_revision, a1.mod_revision, a1.version), (2, 3, 2));
    assert_eq!(read(&r, 1).len(), 3);

    let past = p.txn(txn(vec![get_at(key("a/1"), 2)])).await.unwrap();
    assert_eq!((read(&past, 0)[0].value.as_str(), read(&past, 0)[0].version), ("x", 1));

    let r = p.txn(txn(vec![Op::Delete(key("nothing"))])).await.unwrap();
    assert_eq!(
        (r.revision, r.results),
        (3, vec![OpResult::Delete(0)]),
        "deleting nothing changes nothing"
    );
    let r = p.txn(txn(vec![Op::Delete(prefix("a/"))])).await.unwrap();
    assert_eq!((r.revision, r.results), (4, vec![OpResult::Delete(2)]));

    p.txn(txn(vec![put("a/1", "again")])).await.unwrap();
    let r = p
        .txn(txn(vec![Op::get(key("a/1")), get_at(prefix("a/"), 3)]))
        .await
        .unwrap();
    let again = &read(&r, 0)[0];
    assert_eq!(
        (again.create_revision, again.version),
        (5, 1),
        "a new life after the deletion"
    );
    assert_eq!(read(&r, 1).len(), 2, "the past still has both");

    let count = Op::Get {
        range: prefix(""),
        revision: 0,
        count_only: true,
    };
    let r = p.txn(txn(vec![count])).await.unwrap();
    assert_eq!(r.results, vec![OpResult::Get { kvs: vec![], count: 2 }]);
    let future = p.txn(txn(vec![get_at(key("b"), 6)])).await;
    assert_eq!(future.unwrap_err(), ErrorKind::FutureRevision);
}

#[tokio::test]
async fn a_read_sees_the_writes_before_it_and_compares_see_the_store_before() {
    let mut p = Pair::start().await;
    p.txn(txn(vec![put("k", "old")])).await.unwrap();
    let ops = vec![
        Op::get(key("k")),
        put("k", "new"),
        Op::get(key("k")),
        get_at(key("k"), 2),
        Op::Txn(txn(vec![put("n", "1")])),
        Op::get(prefix("")),
        Op::Txn(when(
            vec![Compare::new("n", Target::Version(0))],
            vec![Op::get(key("n"))],
            vec![],
        )),
    ];
    let r = p.txn(txn(ops)).await.unwrap();
    assert_eq!(read(&r, 0)[0].value, "old");
    let new = &read(&r, 2)[0];
    assert_eq!((new.value.as_str(), new.mod_revision, new.version), ("new", 3, 2));
    assert_eq!(read(&r, 3)[0].value, "old", "revision 2 is the past");
    assert_eq!(read(&r, 5).len(), 2, "the nested put is seen");
    let OpResult::Txn(nested) = &r.results[6] else {
        panic!("{r:?}")
    };
    assert!(nested.succeeded, "n did not exist before the transaction");
    assert_eq!(read(nested, 0).len(), 1, "but its read sees it");
}

#[tokio::test]
async fn compares_on_a_missing_and_on_an_existing_key() {
    let mut p = Pair::start().await;
    p.txn(txn(vec![put("empty", "")])).await.unwrap();
    let cases = [
        ("missing", Target::Version(0), true),
        ("missing", Target::CreateRevision(0), true),
        ("missing", Target::ModRevision(0), true),
        ("missing", Target::Lease(0), true),
        ("missing", Target::Value(String::new()), false),
        ("missing", Target::Version(1), false),
        ("empty", Target::Value(String::new()), true),
        ("empty", Target::Version(1), true),
        ("empty", Target::CreateRevision(2), true),
        ("empty", Target::ModRevision(2), true),
        ("empty", Target::Lease(0), true),
        ("empty", Target::Version(0), false),
        ("empty", Target::Value("x".into()), false),
    ];
    for (k, target, holds) in cases {
        let r = p.txn(when(vec![Compare::new(k, target.clone())], vec![], vec![])).await;
        assert_eq!(r.unwrap().succeeded, holds, "{k} {target:?}");
    }
}

/// A nested transaction of one compare and one put of its own key.
fn guarded(k: &str) -> Op {
    Op::Txn(when(
        vec![Compare::new(k, Target::Version(0))],
        vec![put(k, "v")],
        vec![],
    ))
}

fn puts(tag: &str, n: usize) -> Vec<Op> {
    (0..n).map(|i| put(&format!("{tag}{i}"), "v")).collect()
}

/// The largest `n` for which `build(n)` is accepted, found by bisection
/// (every attempt compared with the model); more than 512 fails.
async fn largest_accepted(p: &mut Pair, build: impl Fn(usize) -> Txn) -> usize {
    let (mut ok, mut refused) = (0, 512);
    assert!(p.txn(build(ok)).await.is_ok());
    assert_eq!(p.txn(build(refused)).await.unwrap_err(), ErrorKind::TooManyOps);
    while refused - ok > 1 {
        let mid = (ok + refused) / 2;
        match p.txn(build(mid)).await {
            Ok(_) => ok = mid,
            Err(ErrorKind::TooManyOps) => refused = mid,
            Err(other) => panic!("{mid}: {other:?}"),
        }
    }
    ok
}

#[tokio::test]
async fn the_operation_limit_counts_nested_transactions_against_their_parent() {
    let mut p = Pair::start().await;
    assert!(p.txn(txn(puts("f", 128))).await.is_ok());
    assert_eq!(p.txn(txn(puts("f", 129))).await.unwrap_err(), ErrorKind::TooManyOps);
    let nested = |n: usize| txn((0..n).map(|i| guarded(&format!("n{i}"))).collect());
    assert!(p.txn(nested(127)).await.is_ok());
    assert_eq!(p.txn(nested(128)).await.unwrap_err(), ErrorKind::TooManyOps);

    // A parent of `size` operations, one of them a nested transaction:
    // how many may the nested one have, puts or compares?
    for size in [1, 2, 64, 100, 127] {
        let with_puts = |n: usize| {
            let mut ops = puts("p", size - 1);
            ops.push(Op::Txn(txn(puts("q", n))));
            txn(ops)
        };
        let with_compares = |n: usize| {
            let mut ops = puts("p", size - 1);
            let compares = (0..n)
                .map(|i| Compare::new(&format!("c{i}"), Target::Version(0)))
                .collect();
            ops.push(Op::Txn(when(compares, vec![put("q", "v")], vec![])));
            txn(ops)
        };
        let n = largest_accepted(&mut p, with_puts).await;
        eprintln!("a parent of {size} operations leaves {n} to a nested transaction");
        assert_eq!(n, 128 - size, "puts under a parent of {size}");
        let n = largest_accepted(&mut p, with_compares).await;
        assert_eq!(n, (128 - size).max(1), "compares under a parent of {size}");
    }

    // Three levels: 64 at the top leave 64 to the middle, which leaves
    // 64 - 32 to the bottom.
    let deep = |n: usize| {
        let mut middle = puts("m", 31);
        middle.push(Op::Txn(txn(puts("b", n))));
        let mut top = puts("t", 63);
        top.push(Op::Txn(txn(middle)));
        txn(top)
    };
    assert_eq!(largest_accepted(&mut p, deep).await, 32);

    // The branches are counted apart: 128 each is fine.
    let both = when(vec![], puts("t", 128), puts("e", 128));
    assert!(p.txn(both).await.is_ok());
}

/// Whether etcd accepts each transaction, as `(what, txn, accepted)`.
async fn accepted(p: &mut Pair, cases: Vec<(&str, Txn, bool)>) {
    for (what, t, ok) in cases {
        match p.txn(t).await {
            Ok(_) => assert!(ok, "{what}: accepted"),
            Err(kind) => assert!(!ok && kind == ErrorKind::DuplicateKey, "{what}: {kind:?}"),
        }
    }
}

#[tokio::test]
async fn duplicate_keys_in_one_transaction() {
    let mut p = Pair::start().await;
    p.txn(txn(vec![put("k", "0"), put("d/k", "0")])).await.unwrap();
    let whole = Op::Delete(prefix(""));
    let cases = vec![
        ("a put twice", txn(vec![put("k", "1"), put("k", "2")]), false),
        ("a put and a delete", txn(vec![put("k", "1"), del("k")]), false),
        ("a delete and a put", txn(vec![del("k"), put("k", "1")]), false),
        (
            "a put in a deleted prefix",
            txn(vec![Op::Delete(prefix("d/")), put("d/k", "1")]),
            false,
        ),
        (
            "a prefix deleted after a put in it",
            txn(vec![put("d/k", "1"), Op::Delete(prefix("d/"))]),
            false,
        ),
        (
            "two overlapping deletes",
            txn(vec![Op::Delete(prefix("d/")), del("d/k")]),
            true,
        ),
        (
            "every key deleted and a put",
            txn(vec![whole.clone(), put("k", "1")]),
            true,
        ),
        ("a put and every key deleted", txn(vec![put("k", "1"), whole]), true),
        (
            "sibling nested puts",
            txn(vec![nest(vec![put("k", "1")]), nest(vec![put("k", "2")])]),
            false,
        ),
        (
            "a nested put, then a sibling's delete",
            txn(vec![nest(vec![put("k", "1")]), nest(vec![del("k")])]),
            true,
        ),
        (
            "a nested delete, then a sibling's put",
            txn(vec![nest(vec![del("k")]), nest(vec![put("k", "1")])]),
            false,
        ),
        (
            "a nested put and a put beside it",
            txn(vec![nest(vec![put("k", "1")]), put("k", "2")]),
            false,
        ),
        (
            "a put and a nested put after it",
            txn(vec![put("k", "2"), nest(vec![put("k", "1")])]),
            false,
        ),
        (
            "a nested put and a delete beside it",
            txn(vec![nest(vec![put("k", "1")]), del("k")]),
            false,
        ),
        (
            "a nested delete and a put beside it",
            txn(vec![nest(vec![del("k")]), put("k", "1")]),
            false,
        ),
        (
            "a put in both branches of a nested txn",
            txn(vec![Op::Txn(when(vec![], vec![put("k", "1")], vec![put("k", "2")]))]),
            true,
        ),
        (
            "a put in both branches",
            when(vec![], vec![put("k", "1")], vec![put("k", "2")]),
            true,
        ),
        (
            "a nested else put and a sibling's then put",
            txn(vec![
                Op::Txn(when(vec![], vec![], vec![put("k", "1")])),
                nest(vec![put("k", "2")]),
            ]),
            false,
        ),
    ];
    accepted(&mut p, cases).await;

    // A put then a delete of the same key in one revision: the key is gone.
    let r = p
        .txn(txn(vec![
            nest(vec![put("g", "1")]),
            nest(vec![del("g")]),
            Op::get(key("g")),
        ]))
        .await
        .unwrap();
    assert_eq!(
        r.results[1],
        OpResult::Txn(TxnResult {
            succeeded: true,
            revision: r.revision,
            results: vec![OpResult::Delete(1)]
        })
    );
    assert!(read(&r, 2).is_empty());
    let later = p.txn(txn(vec![put("g", "2"), Op::get(key("g"))])).await.unwrap();
    assert_eq!(read(&later, 1)[0].version, 1);
}

#[tokio::test]
async fn empty_keys_are_refused() {
    let mut p = Pair::start().await;
    let refused = [
        txn(vec![put("", "v")]),
        txn(vec![Op::get(key(""))]),
        txn(vec![del("")]),
        txn(vec![nest(vec![put("", "v")])]),
        when(vec![Compare::new("", Target::Version(0))], vec![], vec![]),
    ];
    for t in refused {
        assert_eq!(p.txn(t.clone()).await.unwrap_err(), ErrorKind::Other, "{t:?}");
    }
    // The empty prefix is every key.
    p.txn(txn(vec![put("k", "v"), put("l", "v")])).await.unwrap();
    let all = p
        .txn(txn(vec![Op::get(prefix("")), Op::Delete(prefix(""))]))
        .await
        .unwrap();
    assert_eq!((read(&all, 0).len(), &all.results[1]), (2, &OpResult::Delete(2)));
}

/// The agent's registration and withdrawal steps, as `ops` builds them,
/// on one store: each answer, revisions relative to the store's start.
async fn registration_steps<E: Etcd>(store: &mut E, lease: LeaseId, offset: i64) -> Vec<(Vec<i64>, usize)> {
    use etcd_sidekick::registry::ops::{put_keys, withdraw_keys};
    use std::collections::BTreeMap;
    let keys: Vec<(String, String)> = (0..300).map(|i| (format!("/services/web/{i}"), "v".into())).collect();
    let revs = |ours: &[(String, i64)]| {
        let mut r: Vec<i64> = ours.iter().map(|(_, r)| r - offset).collect();
        r.dedup();
        r
    };
    let first = put_keys(store, lease, &keys, &BTreeMap::new(), false).await.unwrap();
    let (withdrawn, _) = withdraw_keys(store, lease, &first.ours).await.unwrap();
    let again = put_keys(store, lease, &keys, &BTreeMap::new(), false).await.unwrap();
    let rewritten = put_keys(store, lease, &keys, &BTreeMap::new(), false).await.unwrap();
    // Retried with what it wrote known: nothing is written.
    let known: BTreeMap<String, i64> = rewritten.ours.iter().cloned().collect();
    let retried = put_keys(store, lease, &keys, &known, false).await.unwrap();
    assert_eq!(retried.ours, rewritten.ours);
    // The first withdrawal delivered late, then one of the second
    // registration: neither may delete the third.
    let (late, _) = withdraw_keys(store, lease, &first.ours).await.unwrap();
    let (stale, _) = withdraw_keys(store, lease, &again.ours).await.unwrap();
    let (last, _) = withdraw_keys(store, lease, &rewritten.ours).await.unwrap();
    vec![
        (revs(&first.ours), first.held.len()),
        (vec![], withdrawn),
        (revs(&again.ours), again.held.len()),
        (revs(&rewritten.ours), rewritten.held.len()),
        (vec![], late),
        (vec![], stale),
        (vec![], last),
    ]
}

/// A late withdrawal of an earlier registration deletes nothing, a
/// registration again under our lease writes the keys again (unless it
/// knows their revision), and 300 keys fit within the limit: etcd answers as the model does, and as expected.
#[tokio::test]
async fn registrations_and_late_withdrawals_run_alike_on_both() {
    let mut p = Pair::start().await;
    let lease = p.grant(Duration::from_secs(60), 0x5eed).await.unwrap().id;
    let real = registration_steps(&mut p.real, lease, p.real_offset).await;
    let model = registration_steps(&mut p.model, lease, p.model_offset).await;
    assert_eq!(real, model, "etcd (left) and the model (right) differ");
    // 125 keys a transaction: three revisions a registration.
    let expected = vec![
        (vec![2, 3, 4], 0),
        (vec![], 300),
        (vec![8, 9, 10], 0),
        (vec![11, 12, 13], 0),
        (vec![], 0),
        (vec![], 0),
        (vec![], 300),
    ];
    assert_eq!(real, expected);
}
