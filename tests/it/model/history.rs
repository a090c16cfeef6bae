//! Targeted sequences of leases, compaction and watches, compared as in
//! `txns.rs` and checked against what etcd is known to answer.

use std::time::Duration;

use etcd_sidekick::registry::{Compare, ErrorKind, LeaseId, Op, Target};

use super::*;

#[tokio::test]
async fn leases_with_chosen_ids() {
    let mut p = Pair::start().await;
    let ttl = Duration::from_secs(60);
    let g = p.grant(ttl, 0x10).await.unwrap();
    assert_eq!((g.id, g.ttl), (LeaseId(0x10), ttl));
    assert_eq!(p.grant(ttl, 0x10).await.unwrap_err(), ErrorKind::LeaseExists);
    assert_eq!(p.keep_alive(0x10).await.unwrap(), Some(ttl));
    assert_eq!(p.keep_alive(0x99).await.unwrap(), None);

    // A put on a lease etcd does not have refuses the whole transaction,
    // in the branch that runs only.
    let rev = p.revision().await;
    let missing = || Op::put("y", "1", 0x99);
    let refused = p.txn(txn(vec![put("x", "1"), missing()])).await;
    assert_eq!(refused.unwrap_err(), ErrorKind::LeaseNotFound);
    let refused = p.txn(txn(vec![put("x", "1"), nest(vec![missing()])])).await;
    assert_eq!(refused.unwrap_err(), ErrorKind::LeaseNotFound);
    let untaken = when(
        vec![Compare::new("x", Target::Version(5))],
        vec![missing()],
        vec![put("x", "1")],
    );
    assert!(!p.txn(untaken).await.unwrap().succeeded);
    assert_eq!(p.revision().await, rev + 1, "only the last one wrote");

    // A revoke deletes the keys still attached, in one revision.
    let attached = vec![Op::put("l/1", "a", 0x10), Op::put("l/2", "b", 0x10), put("l/3", "c")];
    p.txn(txn(attached)).await.unwrap();
    p.txn(txn(vec![put("l/2", "detached")])).await.unwrap();
    let mut w = p.watch(&[prefix("l/")], rev + 4, false).await;
    assert!(p.revoke(0x10).await.unwrap());
    assert_eq!(p.revision().await, rev + 4);
    let events = w.events().await;
    assert_eq!(events.len(), 1);
    assert_eq!(
        (events[0].put, events[0].kv.key.as_str(), events[0].kv.mod_revision),
        (false, "l/1", rev + 4)
    );
    let left = p.txn(txn(vec![Op::get(prefix("l/"))])).await.unwrap();
    assert_eq!(read(&left, 0).len(), 2);
    assert!(!p.revoke(0x10).await.unwrap());
    assert_eq!(p.keep_alive(0x10).await.unwrap(), None);

    // A revoke with no key attached changes nothing; the id is free again.
    p.grant(ttl, 0x11).await.unwrap();
    assert!(p.revoke(0x11).await.unwrap());
    assert_eq!(p.revision().await, rev + 4);
    p.grant(ttl, 0x10).await.unwrap();
}

#[tokio::test]
async fn lease_ttls_are_whole_seconds_from_etcds_minimum() {
    let mut p = Pair::start().await;
    let granted = |s: u64| Duration::from_secs(s);
    assert_eq!(p.grant(Duration::from_secs(1), 0x20).await.unwrap().ttl, granted(2));
    assert_eq!(p.grant(Duration::ZERO, 0x21).await.unwrap().ttl, granted(2));
    assert_eq!(
        p.grant(Duration::from_millis(3900), 0x22).await.unwrap().ttl,
        granted(3)
    );
    assert_eq!(p.keep_alive(0x20).await.unwrap(), Some(granted(2)));
    let too_long = p.grant(Duration::from_secs(9_000_000_001), 0x23).await;
    assert_eq!(too_long.unwrap_err(), ErrorKind::Other);
}

#[tokio::test]
async fn compaction_refuses_reads_below_it() {
    let mut p = Pair::start().await;
    p.txn(txn(vec![put("a", "1")])).await.unwrap();
    p.txn(txn(vec![put("a", "2")])).await.unwrap();
    p.txn(txn(vec![put("b", "1")])).await.unwrap();
    p.txn(txn(vec![del("a")])).await.unwrap();
    p.compact(4).await;
    let below = p.txn(txn(vec![get_at(key("a"), 3)])).await;
    assert_eq!(below.unwrap_err(), ErrorKind::Compacted);
    let nested = p.txn(txn(vec![nest(vec![get_at(key("a"), 3)])])).await;
    assert_eq!(nested.unwrap_err(), ErrorKind::Compacted);
    let at = p
        .txn(txn(vec![get_at(prefix(""), 4), get_at(prefix(""), 5)]))
        .await
        .unwrap();
    assert_eq!(read(&at, 0).len(), 2);
    assert_eq!(read(&at, 1).len(), 1);
    let untaken = when(
        vec![Compare::new("a", Target::Version(9))],
        vec![get_at(key("a"), 3)],
        vec![],
    );
    assert!(!p.txn(untaken).await.unwrap().succeeded);
    // The leases of the puts are checked before the revisions of the reads.
    let both = txn(vec![get_at(key("a"), 3), Op::put("c", "1", 0x99)]);
    assert_eq!(p.txn(both).await.unwrap_err(), ErrorKind::LeaseNotFound);
}

#[tokio::test]
async fn watches_replay_wait_filter_and_end_at_compaction() {
    let mut p = Pair::start().await;
    p.txn(txn(vec![put("w/a", "1")])).await.unwrap(); // 2
    p.txn(txn(vec![put("w/b", "1")])).await.unwrap(); // 3
    p.txn(txn(vec![del("w/a")])).await.unwrap(); // 4
    p.txn(txn(vec![put("x", "1")])).await.unwrap(); // 5
    p.txn(txn(vec![put("w/a", "2"), put("w/c", "1")])).await.unwrap(); // 6

    let mut replay = p.watch(&[prefix("w/")], 3, false).await;
    let revs = |events: &[Event]| events.iter().map(|e| (e.kv.mod_revision, e.put)).collect::<Vec<_>>();
    assert_eq!(
        revs(&replay.events().await),
        [(3, true), (4, false), (6, true), (6, true)]
    );
    let mut deletes = p.watch(&[prefix("w/")], 2, true).await;
    assert_eq!(revs(&deletes.events().await), [(4, false)]);
    let mut one = p.watch(&[key("w/a")], 1, false).await;
    assert_eq!(revs(&one.events().await), [(2, true), (4, false), (6, true)]);

    let mut future = p.watch(&[prefix("w/")], 8, false).await;
    p.txn(txn(vec![put("w/d", "1")])).await.unwrap(); // 7
    assert!(future.events().await.is_empty(), "7 is before the start");
    p.txn(txn(vec![del("w/b")])).await.unwrap(); // 8
    assert_eq!(revs(&future.events().await), [(8, false)]);
    assert_eq!(revs(&replay.events().await), [(7, true), (8, false)]);

    // Two ranges on one stream: etcd replays each range apart, and orders
    // the ranges' events of one revision as it likes; each range's events
    // come in order.
    let ranges = [key("w/a"), key("w/b")];
    let mut two = p.watch(&ranges, 2, false).await;
    let each: Vec<_> = two.events_by_range(&ranges).await.iter().map(|e| revs(e)).collect();
    assert_eq!(
        each,
        [vec![(2, true), (4, false), (6, true)], vec![(3, true), (8, false)]]
    );

    // Compacted at 6: a watch from 5 is cancelled; one from 6 replays the
    // puts at 6.
    p.compact(6).await;
    let mut cancelled = p.watch(&[prefix("w/")], 5, false).await;
    assert_eq!(cancelled.ended().await, ErrorKind::Compacted);
    let mut at = p.watch(&[prefix("w/")], 6, false).await;
    assert_eq!(revs(&at.events().await), [(6, true), (6, true), (7, true), (8, false)]);
}

#[tokio::test]
async fn a_watch_from_the_compaction_point_has_no_deletions_of_it() {
    let mut p = Pair::start().await;
    p.txn(txn(vec![put("k", "1"), put("j", "1")])).await.unwrap(); // 2
    p.txn(txn(vec![del("k"), put("j", "2"), put("i", "1")])).await.unwrap(); // 3
    p.txn(txn(vec![put("k", "2")])).await.unwrap(); // 4
    p.compact(3).await;
    let mut w = p.watch(&[prefix("")], 3, false).await;
    let events = w.events().await;
    let seen: Vec<(&str, i64, bool)> = events
        .iter()
        .map(|e| (e.kv.key.as_str(), e.kv.mod_revision, e.put))
        .collect();
    assert_eq!(
        seen,
        [("j", 3, true), ("i", 3, true), ("k", 4, true)],
        "in the order written"
    );
}

/// The span over several prefixes that `render` watches: reads, deletes
/// and a watch from a revision see the same keys in etcd and the model,
/// the span's end excluded.
#[tokio::test]
async fn a_span_reads_deletes_and_watches_alike() {
    let mut p = Pair::start().await;
    let span = Range::covering(&["s/web/".to_string(), "s/api/".to_string()]);
    p.txn(txn(vec![put("s/api/1", "a")])).await.unwrap(); // 2
    p.txn(txn(vec![put("s/db/1", "d"), put("s/web/1", "w")])).await.unwrap(); // 3
    p.txn(txn(vec![put("s/web0", "past the end"), put("s/ap", "before")]))
        .await
        .unwrap(); // 4
    let r = p.txn(txn(vec![Op::get(span.clone())])).await.unwrap();
    let got: Vec<String> = match &r.results[0] {
        etcd_sidekick::registry::OpResult::Get { kvs, .. } => kvs.iter().map(|kv| kv.key.clone()).collect(),
        other => panic!("{other:?}"),
    };
    assert_eq!(got, ["s/api/1", "s/db/1", "s/web/1"]);
    let mut w = p.watch(std::slice::from_ref(&span), 2, false).await;
    let revs = |events: &[Event]| {
        events
            .iter()
            .map(|e| (e.kv.key.clone(), e.kv.mod_revision))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        revs(&w.events().await),
        [
            ("s/api/1".to_string(), 2),
            ("s/db/1".to_string(), 3),
            ("s/web/1".to_string(), 3)
        ]
    );
    p.txn(txn(vec![Op::Delete(span.clone())])).await.unwrap(); // 5
    let dels: Vec<(String, bool)> = w.events().await.iter().map(|e| (e.kv.key.clone(), e.put)).collect();
    assert_eq!(dels.len(), 3, "{dels:?}");
    assert!(dels.iter().all(|(_, put)| !put));
    assert_eq!(
        p.model_keys().iter().map(|k| k.key.as_str()).collect::<Vec<_>>(),
        ["s/ap", "s/web0"]
    );
}
