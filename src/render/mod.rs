//! `sidekick render`: the confd role, following an etcd watch.
//!
//! Each template has a loop of its own ([`follow`]): one read of all its
//! prefixes in one transaction at revision R, a rendering, then one watch
//! over the smallest range covering the prefixes from R+1, whose events of
//! a revision are applied together, so a rendering never mixes revisions.
//! A watch that breaks, is compacted past or cancelled is followed by a
//! fresh read, never resumed. While nothing changes the loop waits on the
//! watch and costs nothing. Installing is [`install`]'s; reload commands of
//! one process never overlap (one lock for all templates).

pub mod board;
pub mod config;
pub mod install;
pub mod template;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::registry::ops::{read_prefixes, within};
use crate::registry::{ErrorKind, Etcd, Event, Range};
use board::Card;
use config::Spec;
use install::Outcome;
use template::Keys;

/// The longest wait between two reads of an unreachable etcd.
pub const READ_BACKOFF_CAP: Duration = Duration::from_secs(5);
/// The first wait before a read is tried again.
const READ_BACKOFF_FIRST: Duration = Duration::from_millis(200);
/// The first wait before a failed reload command is run again.
const RELOAD_BACKOFF_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between two runs of a failing reload command.
pub const RELOAD_BACKOFF_CAP: Duration = Duration::from_secs(30);

/// What every template loop of one process shares.
pub struct Shared {
    /// Held while a reload command runs: reloads never overlap.
    pub reloading: tokio::sync::Mutex<()>,
    /// `--settle`.
    pub settle: Duration,
    /// Bound on each etcd call.
    pub call_bound: Duration,
    /// How etcd's endpoints were chosen, said the first time etcd does not
    /// answer.
    pub hint: String,
}

/// A template loop's first outcome: rendered, unchanged, or failed and
/// logged; `READY=1` waits for every template's.
pub type First = tokio::sync::mpsc::UnboundedSender<()>;

/// Whether a key is under one of the prefixes.
fn wanted(prefixes: &[String], key: &str) -> bool {
    prefixes.iter().any(|p| key.starts_with(p.as_str()))
}

/// Renders `spec` over `keys` and installs it (check, rename, reload):
/// `Ok(true)` when DEST was replaced.
async fn render_and_install(spec: &Spec, card: &Card, keys: Arc<Keys>, revision: i64) -> Result<bool, String> {
    let started = std::time::Instant::now();
    let rendered = spec.template.render(keys);
    let took = started.elapsed();
    card.update(|f| f.render = Some(took));
    let text = rendered.map_err(|e| format!("could not render {}: {e}", spec.src.display()))?;
    let outcome = install::install(&spec.dest, spec.mode, spec.check_cmd.as_deref(), &text).await?;
    card.update(|f| {
        f.renders += 1;
        f.revision = Some(revision);
        f.last_render = Some(SystemTime::now());
        if let Outcome::Installed { check } = outcome {
            f.check = check;
        }
    });
    match outcome {
        Outcome::Unchanged => {
            debug!(template = %spec.name, revision, "rendering unchanged");
            Ok(false)
        }
        Outcome::Installed { .. } => {
            info!(template = %spec.name, dest = %spec.dest.display(), revision, "installed");
            Ok(true)
        }
    }
}

/// Runs `reload_cmd`, alone among this process's reloads.
async fn reload(spec: &Spec, card: &Card, shared: &Shared) -> Result<(), String> {
    let Some(cmd) = &spec.reload_cmd else { return Ok(()) };
    let _alone = shared.reloading.lock().await;
    match install::command(cmd).await {
        Ok(took) => {
            info!(template = %spec.name, took = ?took, "reloaded");
            card.update(|f| {
                f.reloads += 1;
                f.reload = Some(took);
            });
            Ok(())
        }
        Err(e) => {
            card.update(|f| f.reload_failures += 1);
            Err(format!("reload_cmd failed: {e}"))
        }
    }
}

/// The state of one template between renderings.
struct Follow {
    keys: Arc<Keys>,
    revision: i64,
    /// The highest revision any read or event showed.
    seen: i64,
    /// A rendering is due.
    dirty: bool,
    /// The first and the last change since the last rendering.
    changes: Option<(Instant, Instant)>,
    /// No rendering before this (etcd lost its data).
    settle_until: Option<Instant>,
    /// A failed reload, tried again at this time, with the next backoff.
    reload_retry: Option<(Instant, Duration)>,
    /// The first outcome was reported.
    reported: bool,
}

impl Follow {
    /// When the due rendering may run.
    fn render_at(&self, wait: Option<(Duration, Duration)>) -> Option<Instant> {
        if !self.dirty {
            return None;
        }
        let debounced = match (self.changes, wait) {
            (Some((first, last)), Some((min, max))) => (last + min).min(first + max),
            _ => Instant::now(),
        };
        Some(self.settle_until.map_or(debounced, |s| s.max(debounced)))
    }
}

/// Follows one template until `stop`: read, render, watch, re-render.
pub async fn follow<E: Etcd>(
    spec: Arc<Spec>,
    card: Arc<Card>,
    mut reg: E,
    shared: Arc<Shared>,
    stop: CancellationToken,
    first: First,
) {
    let range = Range::covering(&spec.prefixes);
    let mut st = Follow {
        keys: Arc::new(BTreeMap::new()),
        revision: 0,
        seen: 0,
        dirty: false,
        changes: None,
        settle_until: None,
        reload_retry: None,
        reported: false,
    };
    let mut backoff = READ_BACKOFF_FIRST;
    let mut outage = false;
    let mut hinted = shared.hint.is_empty();
    let report = |st: &mut Follow| {
        if !st.reported {
            st.reported = true;
            let _ = first.send(());
        }
    };
    'read: loop {
        // One consistent read of every prefix, at one revision.
        let started = std::time::Instant::now();
        let read = tokio::select! {
            _ = stop.cancelled() => return,
            r = within(&mut reg, shared.call_bound, "read the keys", async |r| read_prefixes(r, &spec.prefixes).await) => r,
        };
        let watching = match read {
            Ok((kvs, revision)) => {
                card.update(|f| {
                    f.read = Some(started.elapsed());
                    f.endpoint = Some(reg.endpoint().to_string());
                });
                if outage {
                    info!(template = %spec.name, endpoint = %reg.endpoint(), "etcd answers again");
                    outage = false;
                    if st.settle_until.is_some() {
                        // The settle time is for the instances to register
                        // again, which they could not while etcd was away.
                        info!(template = %spec.name, "etcd was away during --settle: waiting it again from now");
                        st.settle_until = Some(Instant::now() + shared.settle);
                    }
                }
                let first_read = st.seen == 0;
                if revision < st.seen {
                    warn!(
                        template = %spec.name,
                        revision,
                        seen = st.seen,
                        settle = %humantime::format_duration(shared.settle),
                        "etcd's revision went back (it lost its data): waiting --settle before rendering, so the instances can register again"
                    );
                    st.settle_until = Some(Instant::now() + shared.settle);
                    // The new store's history starts here: a later read
                    // (a restart) is measured against it, not the old one.
                    st.seen = revision;
                }
                st.seen = st.seen.max(revision);
                st.keys = Arc::new(
                    kvs.into_iter()
                        .filter(|kv| wanted(&spec.prefixes, &kv.key))
                        .map(|kv| (kv.key, kv.value))
                        .collect(),
                );
                if first_read && st.keys.is_empty() && holds_a_rendering(&spec.dest) {
                    // A process has no revision seen before to compare
                    // with: an empty cluster where DEST holds a rendering
                    // may be one that lost its data while render was down.
                    warn!(
                        template = %spec.name,
                        dest = %spec.dest.display(),
                        settle = %humantime::format_duration(shared.settle),
                        "no key under the prefixes, and DEST holds a rendering: waiting --settle before rendering, in case etcd lost its data and the instances are registering again"
                    );
                    st.settle_until = Some(Instant::now() + shared.settle);
                    report(&mut st);
                }
                st.revision = revision;
                st.dirty = true;
                st.changes = None;
                within(&mut reg, shared.call_bound, "watch the keys", async |r| {
                    r.watch(std::slice::from_ref(&range), revision + 1, false).await
                })
                .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = watching {
            if !outage {
                warn!(template = %spec.name, error = %e, "etcd does not answer; the installed file stays as it is, trying again");
                if !hinted && e.kind == ErrorKind::Unavailable {
                    warn!(template = %spec.name, "etcd does not answer: {}", shared.hint);
                    hinted = true;
                }
                outage = true;
            } else {
                debug!(template = %spec.name, error = %e, "etcd still does not answer");
            }
            card.update(|f| f.last_error = Some(e.to_string()));
            report(&mut st);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(READ_BACKOFF_CAP);
            continue 'read;
        }
        backoff = READ_BACKOFF_FIRST;
        loop {
            let render_at = st.render_at(spec.wait);
            let retry_at = st.reload_retry.map(|(at, _)| at);
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                events = reg.watched() => {
                    // Whatever else has arrived goes into the same
                    // rendering; the watch's end may be among it.
                    let mut next = Some(events);
                    let mut batch = Vec::new();
                    while let Some(events) = next {
                        match events {
                            Ok(more) => batch.extend(more),
                            Err(e) => {
                                let how = if e.kind == ErrorKind::Compacted { "was compacted past" } else { "broke" };
                                warn!(template = %spec.name, error = %e, "the watch {how}: reading afresh");
                                continue 'read;
                            }
                        }
                        next = futures_now(reg.watched());
                    }
                    apply(&spec, &mut st, batch);
                }
                _ = until(render_at.unwrap_or_else(Instant::now)), if render_at.is_some() => {
                    st.dirty = false;
                    st.changes = None;
                    st.settle_until = None;
                    match render_and_install(&spec, &card, st.keys.clone(), st.revision).await {
                        Ok(replaced) => {
                            card.update(|f| f.last_error = None);
                            if replaced && spec.reload_cmd.is_some() {
                                st.reload_retry = None;
                                if let Err(e) = reload(&spec, &card, &shared).await {
                                    warn!(template = %spec.name, error = %e, "trying the reload again in {}", humantime::format_duration(RELOAD_BACKOFF_FIRST));
                                    card.update(|f| f.last_error = Some(e));
                                    st.reload_retry = Some((Instant::now() + RELOAD_BACKOFF_FIRST, RELOAD_BACKOFF_FIRST));
                                }
                            }
                        }
                        Err(e) => {
                            warn!(template = %spec.name, error = %e, "rendering failed; the installed file stays");
                            card.update(|f| {
                                f.render_errors += 1;
                                f.last_error = Some(e);
                            });
                        }
                    }
                    report(&mut st);
                }
                _ = until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => {
                    let (_, wait) = st.reload_retry.take().expect("a retry is due");
                    match reload(&spec, &card, &shared).await {
                        Ok(()) => card.update(|f| f.last_error = None),
                        Err(e) => {
                            let next = (wait * 2).min(RELOAD_BACKOFF_CAP);
                            warn!(template = %spec.name, error = %e, "trying the reload again in {}", humantime::format_duration(next));
                            card.update(|f| f.last_error = Some(e));
                            st.reload_retry = Some((Instant::now() + next, next));
                        }
                    }
                }
            }
        }
    }
}

/// Whether `dest` exists and is not empty.
fn holds_a_rendering(dest: &std::path::Path) -> bool {
    std::fs::metadata(dest).is_ok_and(|m| m.len() > 0)
}

/// Waits until `at`. A time already come costs no timer: tokio's would
/// wait for its next millisecond tick, a millisecond added to every change.
async fn until(at: Instant) {
    if at > Instant::now() {
        sleep_until(at).await;
    }
}

/// The value of `f` if it is ready now, without waiting.
fn futures_now<F: std::future::Future>(f: F) -> Option<F::Output> {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

/// Applies a watch's events (whole revisions, in order) to the keys.
fn apply(spec: &Spec, st: &mut Follow, events: Vec<Event>) {
    let mut changed = false;
    let keys = Arc::make_mut(&mut st.keys);
    for e in events {
        st.revision = st.revision.max(e.kv.mod_revision);
        st.seen = st.seen.max(e.kv.mod_revision);
        if !wanted(&spec.prefixes, &e.kv.key) {
            continue;
        }
        changed = true;
        if e.put {
            keys.insert(e.kv.key, e.kv.value);
        } else {
            keys.remove(&e.kv.key);
        }
    }
    if changed {
        let now = Instant::now();
        st.changes = Some(match st.changes {
            Some((first, _)) => (first, now),
            None => (now, now),
        });
        st.dirty = true;
    }
}

/// `--once` and `--dry-run`: each template read, rendered and installed
/// (or printed) once. Returns whether every one succeeded.
/// `hint` says how etcd's endpoint was chosen, for when it does not answer.
pub async fn once<E: Etcd>(specs: &[Spec], reg: &mut E, call_bound: Duration, dry_run: bool, hint: &str) -> bool {
    let shared = Shared {
        reloading: tokio::sync::Mutex::new(()),
        settle: Duration::ZERO,
        call_bound,
        hint: String::new(),
    };
    let mut ok = true;
    for spec in specs {
        let read = within(reg, call_bound, "read the keys", async |r| {
            read_prefixes(r, &spec.prefixes).await
        })
        .await;
        let (kvs, revision) = match read {
            Ok(r) => r,
            Err(e) => {
                error!(template = %spec.name, error = %e, "etcd does not answer ({hint})");
                ok = false;
                continue;
            }
        };
        let keys: Arc<Keys> = Arc::new(kvs.into_iter().map(|kv| (kv.key, kv.value)).collect());
        if dry_run {
            match spec.template.render(keys) {
                Ok(text) => {
                    if specs.len() > 1 {
                        println!("# {} -> {}", spec.name, spec.dest.display());
                    }
                    print!("{text}");
                }
                Err(e) => {
                    error!(template = %spec.name, error = %e, "could not render");
                    ok = false;
                }
            }
            continue;
        }
        let card = Card::new(&spec.name, &spec.dest.display().to_string(), Duration::ZERO);
        match render_and_install(spec, &card, keys, revision).await {
            Ok(true) => {
                if let Err(e) = reload(spec, &card, &shared).await {
                    error!(template = %spec.name, error = %e, "reload failed");
                    ok = false;
                }
            }
            Ok(false) => {}
            Err(e) => {
                error!(template = %spec.name, error = %e, "rendering failed; the installed file stays");
                ok = false;
            }
        }
    }
    ok
}

/// What the long-running `render` is told and tells: systemd, the status
/// board, SIGHUP.
pub struct Outside {
    /// `--config`, re-read on SIGHUP; `None` for the flag form.
    pub config: Option<std::path::PathBuf>,
    /// The cards `--status-addr` serves.
    pub board: Option<Arc<board::Board>>,
    /// systemd, when `NOTIFY_SOCKET` is set, and its watchdog period.
    pub hooks: crate::hooks::Hooks,
    /// Bumped by each SIGHUP.
    pub reload: tokio::sync::watch::Receiver<u64>,
}

/// One running template loop.
struct Running {
    spec: Arc<Spec>,
    card: Arc<Card>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// Follows every template until `stop`, re-reading the configuration on
/// SIGHUP (an invalid one is refused and the running set kept). Must run
/// inside a [`tokio::task::LocalSet`].
pub async fn run<E, M>(specs: Vec<Spec>, make: M, shared: Arc<Shared>, mut outside: Outside, stop: CancellationToken)
where
    E: Etcd + 'static,
    M: Fn() -> E,
{
    use crate::notify::Notice;
    let (first_tx, mut first_rx) = tokio::sync::mpsc::unbounded_channel();
    let start = |spec: Arc<Spec>, first: First| -> Running {
        let wait_max = spec.wait.map_or(Duration::ZERO, |(_, max)| max);
        let card = Arc::new(Card::new(&spec.name, &spec.dest.display().to_string(), wait_max));
        if let Some(b) = &outside.board {
            b.add(card.clone());
        }
        let token = stop.child_token();
        let task = tokio::task::spawn_local(follow(
            spec.clone(),
            card.clone(),
            make(),
            shared.clone(),
            token.clone(),
            first,
        ));
        Running {
            spec,
            card,
            stop: token,
            task,
        }
    };
    let mut running: Vec<Running> = specs
        .into_iter()
        .map(|s| start(Arc::new(s), first_tx.clone()))
        .collect();
    let mut waiting_for = running.len();
    let mut ready = waiting_for == 0;
    if ready {
        outside.hooks.notify(Notice::Ready);
    }
    let watchdog = outside.hooks.watchdog;
    let mut ping = watchdog.map(|p| tokio::time::interval_at(Instant::now() + p, p));
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            Some(()) = first_rx.recv(), if !ready => {
                waiting_for -= 1;
                if waiting_for == 0 {
                    ready = true;
                    info!(templates = running.len(), "every template rendered (or failed and logged) once");
                    outside.hooks.notify(Notice::Ready);
                }
            }
            _ = async { ping.as_mut().expect("a watchdog").tick().await }, if ping.is_some() => {
                outside.hooks.notify(Notice::Watchdog);
            }
            Ok(()) = outside.reload.changed() => {
                let Some(path) = &outside.config else {
                    info!("SIGHUP: re-reading the template");
                    let specs: Vec<Result<Spec, String>> = running.iter().map(|r| reread(&r.spec)).collect();
                    apply_reload(&mut running, specs.into_iter().collect(), &start, outside.board.as_deref()).await;
                    continue;
                };
                info!(config = %path.display(), "SIGHUP: re-reading the configuration");
                let loaded = config::load(path).map_err(|e| e.0);
                apply_reload(&mut running, loaded, &start, outside.board.as_deref()).await;
            }
        }
    }
    outside.hooks.notify(Notice::Stopping);
    for r in &running {
        r.stop.cancel();
    }
    for r in running {
        let _ = r.task.await;
    }
}

/// A flag-form template with its file read again.
fn reread(spec: &Spec) -> Result<Spec, String> {
    let template = template::Template::load(&spec.src).map_err(|e| format!("SRC: {e}"))?;
    Ok(Spec {
        name: spec.name.clone(),
        src: spec.src.clone(),
        dest: spec.dest.clone(),
        prefixes: spec.prefixes.clone(),
        check_cmd: spec.check_cmd.clone(),
        reload_cmd: spec.reload_cmd.clone(),
        mode: spec.mode,
        wait: spec.wait,
        template,
    })
}

/// Swaps the running set for `loaded`: unchanged templates go on
/// untouched; changed and removed ones stop (after the step they are in,
/// and before anything replaces them, so two loops never write one DEST);
/// added and changed ones start. An error keeps everything as it is.
async fn apply_reload<S>(
    running: &mut Vec<Running>,
    loaded: Result<Vec<Spec>, String>,
    start: &S,
    board: Option<&board::Board>,
) where
    S: Fn(Arc<Spec>, First) -> Running,
{
    let specs = match loaded {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "configuration refused; the running templates go on as they were");
            return;
        }
    };
    let mut old: Vec<Running> = std::mem::take(running);
    let mut kept = Vec::with_capacity(specs.len());
    let mut new = Vec::new();
    for spec in specs {
        match old.iter().position(|r| r.spec.same_as(&spec)) {
            Some(i) => kept.push(old.swap_remove(i)),
            None => new.push(spec),
        }
    }
    for r in old {
        info!(template = %r.spec.name, "stopping (removed or changed)");
        r.stop.cancel();
        let _ = r.task.await;
        if let Some(b) = board {
            b.remove(&r.card);
        }
    }
    // Their first outcome counts for nothing: READY=1 was sent long ago.
    let (unused, _) = tokio::sync::mpsc::unbounded_channel();
    for spec in new {
        info!(template = %spec.name, "starting (new or changed)");
        kept.push(start(Arc::new(spec), unused.clone()));
    }
    *running = kept;
}
#[cfg(test)]
mod tests;
