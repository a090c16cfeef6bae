//! The template loop on the model of etcd, on tokio's paused clock: what
//! it renders, when, and from which revision, through the faults etcd has
//! (a broken watch, compaction, an outage, lost data). The real etcd's
//! side of the same is tested in `tests/it/render.rs`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::board::Card;
use super::config::Spec;
use super::template::Template;
use super::{follow, Shared};
use crate::registry::memory::Model;
use crate::registry::{Etcd, Op, Txn};

const SETTLE: Duration = Duration::from_secs(15);

struct Loop {
    card: Arc<Card>,
    stop: CancellationToken,
    first: tokio::sync::mpsc::UnboundedReceiver<()>,
    dest: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Loop {
    fn start(model: &Model, prefixes: &[&str], text: &str, wait: Option<(Duration, Duration)>) -> Loop {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.cfg");
        let spec = Arc::new(Spec {
            name: "t".into(),
            src: "t.j2".into(),
            dest: dest.clone(),
            prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
            check_cmd: None,
            reload_cmd: None,
            mode: None,
            wait,
            template: Template::compile("t.j2", text.to_string()).unwrap(),
        });
        let card = Arc::new(Card::new("t", "out.cfg", Duration::ZERO));
        let shared = Arc::new(Shared {
            reloading: tokio::sync::Mutex::new(()),
            settle: SETTLE,
            call_bound: Duration::from_secs(1),
            hint: String::new(),
        });
        let stop = CancellationToken::new();
        let (tx, first) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(follow(spec, card.clone(), model.clone(), shared, stop.clone(), tx));
        Loop {
            card,
            stop,
            first,
            dest,
            _dir: dir,
        }
    }

    fn file(&self) -> Option<String> {
        std::fs::read_to_string(&self.dest).ok()
    }

    fn renders(&self) -> u64 {
        self.card.figures().renders
    }

    /// Lets the loop run until `cond` holds, at most `limit` of model time.
    async fn until(&self, limit: Duration, cond: impl Fn(&Loop) -> bool) -> bool {
        let end = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < end {
            if cond(self) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        cond(self)
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

const LIST: &str = "{% for k, v in keys|items %}{{ k }}={{ v }}\n{% endfor %}";

fn exists(p: &Path) -> bool {
    p.exists()
}

async fn put_together(model: &mut Model, pairs: &[(&str, &str)]) {
    let then = pairs.iter().map(|(k, v)| Op::put(k, v, 0)).collect();
    model.txn(Txn { then, ..Txn::default() }).await.unwrap();
}

const SOON: Duration = Duration::from_secs(1);

#[tokio::test(start_paused = true)]
async fn renders_at_start_then_follows_changes_of_its_prefixes_only() {
    let mut model = Model::new();
    model.put_foreign("/web/1", "a:1", 0);
    model.put_foreign("/db/1", "x", 0);
    let mut l = Loop::start(&model, &["/web/", "/api/"], LIST, None);
    assert!(l.until(SOON, |l| l.file().as_deref() == Some("/web/1=a:1\n")).await);
    assert_eq!(l.first.recv().await, Some(()));
    put_together(&mut model, &[("/api/1", "b:1"), ("/web/2", "c:1")]).await;
    assert!(
        l.until(SOON, |l| l.file().as_deref()
            == Some("/api/1=b:1\n/web/1=a:1\n/web/2=c:1\n"))
            .await
    );
    let revision = model.revision();
    assert!(l.until(SOON, |l| l.card.figures().revision == Some(revision)).await);
    // A key in the watched span but under no prefix changes nothing.
    let before = l.renders();
    model.put_foreign("/db/2", "y", 0);
    model.delete("/web/1");
    assert!(
        l.until(SOON, |l| l.file().as_deref() == Some("/api/1=b:1\n/web/2=c:1\n"))
            .await
    );
    assert_eq!(
        l.renders(),
        before + 1,
        "one rendering for the deletion, none for /db/2"
    );
}

#[tokio::test(start_paused = true)]
async fn a_broken_watch_is_followed_by_a_fresh_read() {
    let model = Model::new();
    model.put_foreign("/web/1", "a:1", 0);
    let l = Loop::start(&model, &["/web/"], LIST, None);
    assert!(l.until(SOON, |l| l.file().is_some()).await);
    // etcd restarts (the watch breaks) and a change lands meanwhile.
    model.set_unreachable(true);
    model.put_foreign("/web/2", "b:1", 0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(l.file().as_deref(), Some("/web/1=a:1\n"), "kept while etcd is away");
    model.set_unreachable(false);
    assert!(
        l.until(super::READ_BACKOFF_CAP * 2, |l| l.file().as_deref()
            == Some("/web/1=a:1\n/web/2=b:1\n"))
            .await
    );
}

#[tokio::test(start_paused = true)]
async fn compaction_past_the_watch_reads_afresh() {
    let model = Model::new();
    model.put_foreign("/web/1", "a:1", 0);
    let l = Loop::start(&model, &["/web/"], LIST, None);
    assert!(l.until(SOON, |l| l.file().is_some()).await);
    model.set_unreachable(true);
    for i in 2..6 {
        model.put_foreign(&format!("/web/{i}"), "b:1", 0);
    }
    model.delete("/web/1");
    model.compact(model.revision());
    model.set_unreachable(false);
    assert!(
        l.until(super::READ_BACKOFF_CAP * 2, |l| l.file().as_deref()
            == Some("/web/2=b:1\n/web/3=b:1\n/web/4=b:1\n/web/5=b:1\n"))
            .await
    );
}

#[tokio::test(start_paused = true)]
async fn etcd_down_at_start_keeps_the_file_and_reports_once() {
    let model = Model::new();
    model.set_unreachable(true);
    model.put_foreign("/web/1", "a:1", 0);
    let mut l = Loop::start(&model, &["/web/"], LIST, None);
    assert_eq!(l.first.recv().await, Some(()), "READY counts a failed first read");
    assert!(l.card.figures().last_error.unwrap().contains("connection refused"));
    assert!(!exists(&l.dest));
    model.set_unreachable(false);
    assert!(l.until(super::READ_BACKOFF_CAP * 2, |l| l.file().is_some()).await);
    assert!(l.card.figures().last_error.is_none());
    tokio::time::sleep(SOON).await;
    assert!(l.first.try_recv().is_err(), "the first outcome is reported once");
}

/// A loop that has rendered two instances, at a revision above what a
/// wiped store reaches at once.
async fn rendering_two_instances() -> (Model, Loop) {
    let model = Model::new();
    for i in 0..5 {
        model.put_foreign(&format!("/other/{i}"), "x", 0);
    }
    model.put_foreign("/web/1", "a:1", 0);
    model.put_foreign("/web/2", "b:1", 0);
    let l = Loop::start(&model, &["/web/"], LIST, None);
    let whole = "/web/1=a:1\n/web/2=b:1\n";
    assert!(l.until(SOON, |l| l.file().as_deref() == Some(whole)).await);
    (model, l)
}

#[tokio::test(start_paused = true)]
async fn after_etcd_lost_its_data_renders_wait_for_the_settle_time() {
    let (model, l) = rendering_two_instances().await;
    model.set_unreachable(true);
    model.wipe();
    model.set_unreachable(false);
    let wiped_at = tokio::time::Instant::now();
    // One instance registers again within the settle time; the other
    // does not. Until the settle time is over the file stays whole.
    tokio::time::sleep(Duration::from_secs(2)).await;
    model.put_foreign("/web/1", "a:1", 0);
    let settled = l
        .until(SETTLE + super::READ_BACKOFF_CAP * 2, |l| {
            l.file().as_deref() == Some("/web/1=a:1\n")
        })
        .await;
    assert!(settled);
    assert!(wiped_at.elapsed() >= SETTLE, "rewritten after {:?}", wiped_at.elapsed());
}

#[tokio::test(start_paused = true)]
async fn wait_coalesces_a_burst_into_one_rendering() {
    let model = Model::new();
    model.put_foreign("/web/0", "a:1", 0);
    let min = Duration::from_millis(100);
    let max = Duration::from_millis(400);
    let l = Loop::start(&model, &["/web/"], LIST, Some((min, max)));
    assert!(l.until(SOON, |l| l.renders() == 1).await);
    // Ten changes 50 ms apart: never quiet for MIN, so MAX after the first.
    let first = tokio::time::Instant::now();
    let burst = model.clone();
    tokio::spawn(async move {
        for i in 1..=10 {
            burst.put_foreign(&format!("/web/{i}"), "a:1", 0);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    assert!(l.until(SOON, |l| l.renders() >= 2).await);
    let rendered_at = first.elapsed();
    assert!(
        rendered_at >= max && rendered_at < max + Duration::from_millis(60),
        "{rendered_at:?}"
    );
    assert!(
        l.until(SOON, |l| l.file().is_some_and(|f| f.contains("/web/10=")))
            .await
    );
    assert_eq!(l.renders(), 3, "MAX, then once after the rest of the burst");
}

// Found by the fault campaign: etcd went away during the settle time, the
// time ran out meanwhile, and render rendered the new cluster before the
// instances (which could not write either) had registered again.
#[tokio::test(start_paused = true)]
async fn an_outage_during_the_settle_time_starts_it_again() {
    let (model, l) = rendering_two_instances().await;
    model.set_unreachable(true);
    model.wipe();
    model.set_unreachable(false);
    // Read, lower revision: the settle time begins; then etcd goes away
    // for most of it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    model.set_unreachable(true);
    tokio::time::sleep(SETTLE).await;
    model.set_unreachable(false);
    let back = tokio::time::Instant::now();
    model.put_foreign("/web/1", "a:1", 0);
    let settled = l
        .until(SETTLE + super::READ_BACKOFF_CAP * 2, |l| {
            l.file().as_deref() == Some("/web/1=a:1\n")
        })
        .await;
    assert!(settled);
    assert!(
        back.elapsed() >= SETTLE,
        "rewritten {:?} after etcd came back",
        back.elapsed()
    );
}

// Found by the fault campaign: render restarted after etcd lost its data
// had no revision to compare with, and rendered the empty cluster at once
// over a full DEST.
#[tokio::test(start_paused = true)]
async fn a_render_starting_on_an_empty_cluster_over_a_rendering_waits_the_settle_time() {
    let model = Model::new();
    let mut l = Loop::start(&model, &["/web/"], LIST, None);
    // DEST from before (the loop has not run yet: paused clock, one thread).
    std::fs::write(&l.dest, "/web/1=a:1\n/web/2=b:1\n").unwrap();
    let started = tokio::time::Instant::now();
    assert_eq!(
        l.first.recv().await,
        Some(()),
        "READY does not wait for the settle time"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    model.put_foreign("/web/1", "a:1", 0);
    let settled = l
        .until(SETTLE + SOON, |l| l.file().as_deref() == Some("/web/1=a:1\n"))
        .await;
    assert!(settled);
    assert!(started.elapsed() >= SETTLE, "rewritten after {:?}", started.elapsed());
}

#[tokio::test(start_paused = true)]
async fn a_render_starting_on_an_empty_cluster_without_a_rendering_renders_at_once() {
    let model = Model::new();
    let l = Loop::start(&model, &["/web/"], LIST, None);
    assert!(l.until(SOON, |l| l.file().as_deref() == Some("")).await);
}

// Regression (the flaky compaction test): events and then the end of the
// watch arrived together. The end, met while draining whatever else had
// arrived, was dropped, the watch was gone, and render waited for ever on
// a watch it no longer had: no change was rendered again.
#[tokio::test(start_paused = true)]
async fn a_watch_ending_right_behind_its_events_is_followed_by_a_fresh_read() {
    let model = Model::new();
    model.put_foreign("/web/1", "a:1", 0);
    let l = Loop::start(&model, &["/web/"], LIST, None);
    assert!(l.until(SOON, |l| l.file().is_some()).await);
    // One event queued, then the watch ends behind it (etcd restarts),
    // before render runs again.
    model.put_foreign("/web/2", "b:1", 0);
    model.restart();
    model.put_foreign("/web/3", "c:1", 0);
    assert!(
        l.until(super::READ_BACKOFF_CAP * 2, |l| l.file().as_deref()
            == Some("/web/1=a:1\n/web/2=b:1\n/web/3=c:1\n"))
            .await,
        "{:?}",
        l.file()
    );
}
