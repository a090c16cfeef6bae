//! `sidekick wait`: blocks until named keys exist (or are gone), or until
//! enough keys exist under a prefix, following an etcd watch, not polling.
//!
//! The condition logic is pure: a [`Condition`] judges what was [`Seen`],
//! and [`Seen::apply`] folds in one [`Change`] from the watch. [`run_with`]
//! reads the state at one revision R and watches from R+1, so no change
//! falls between the read and the watch; a lost connection, a broken watch
//! or a compacted watch revision means reading again, until the condition
//! holds or the time is up. It asks etcd through [`Etcd`], so the unit
//! tests below run it against the model of etcd under paused time.

use std::collections::BTreeSet;
use std::time::Duration;

use tracing::debug;

use crate::cli::WaitCmdArgs;
use crate::config::{self, EtcdSettings, UsageError};
use crate::discover::Environment;
use crate::registry::{connect_options, ops, ErrorKind, Etcd, EtcdRegistry, Event, Range, RegistryError};

/// What the wait is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// Every key exists; with `gone`, none does.
    Keys {
        /// The keys, each once, in the order given.
        keys: Vec<String>,
        /// Wait for the keys to go instead.
        gone: bool,
    },
    /// At least `count` keys start with `prefix`; with `gone`, at most.
    Count {
        /// The raw prefix.
        prefix: String,
        /// The bound.
        count: u64,
        /// The bound is an upper one.
        gone: bool,
    },
}

/// What etcd holds of the keys a condition is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// For [`Condition::Keys`]: the named keys that exist.
    Keys(BTreeSet<String>),
    /// For [`Condition::Count`]: how many keys exist under the prefix.
    Count(u64),
}

/// One event of the watch, reduced to what the conditions need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The key was written; `created` when it did not exist before.
    Put {
        /// The key.
        key: String,
        /// Whether this put created the key (its version is 1).
        created: bool,
    },
    /// The key was deleted (or expired with its lease).
    Delete {
        /// The key.
        key: String,
    },
}

impl Seen {
    /// Folds in one change seen after the read.
    pub fn apply(&mut self, change: &Change) {
        match (self, change) {
            (Seen::Keys(present), Change::Put { key, .. }) => {
                present.insert(key.clone());
            }
            (Seen::Keys(present), Change::Delete { key }) => {
                present.remove(key);
            }
            (Seen::Count(n), Change::Put { created: true, .. }) => *n += 1,
            (Seen::Count(_), Change::Put { created: false, .. }) => {}
            (Seen::Count(n), Change::Delete { .. }) => *n = n.saturating_sub(1),
        }
    }
}

impl Condition {
    /// Whether `seen` satisfies the condition.
    pub fn holds(&self, seen: &Seen) -> bool {
        match (self, seen) {
            (Condition::Keys { keys, gone: false }, Seen::Keys(present)) => keys.iter().all(|k| present.contains(k)),
            (Condition::Keys { keys, gone: true }, Seen::Keys(present)) => !keys.iter().any(|k| present.contains(k)),
            (Condition::Count { count, gone: false, .. }, Seen::Count(n)) => n >= count,
            (Condition::Count { count, gone: true, .. }, Seen::Count(n)) => n <= count,
            _ => unreachable!("a condition is only judged on what was read for it"),
        }
    }

    /// What stands between `seen` and the condition, for the timeout line:
    /// the keys missing or still there, or the count seen and wanted.
    pub fn shortfall(&self, seen: &Seen) -> String {
        match (self, seen) {
            (Condition::Keys { keys, gone }, Seen::Keys(present)) => {
                let off: Vec<&str> = keys
                    .iter()
                    .filter(|k| present.contains(*k) == *gone)
                    .map(String::as_str)
                    .collect();
                match gone {
                    false => format!("missing {}", off.join(", ")),
                    true => format!("still there: {}", off.join(", ")),
                }
            }
            (Condition::Count { prefix, count, gone }, Seen::Count(n)) => {
                let bound = if *gone { "at most" } else { "at least" };
                let s = if *n == 1 { "" } else { "s" };
                format!("{n} key{s} under {prefix}, wanted {bound} {count}")
            }
            _ => unreachable!("a condition is only judged on what was read for it"),
        }
    }

    /// What the wait watches: each key, or the prefix.
    fn ranges(&self) -> Vec<Range> {
        match self {
            Condition::Keys { keys, .. } => keys.iter().map(|k| Range::Key(k.clone())).collect(),
            Condition::Count { prefix, .. } => vec![Range::Prefix(prefix.clone())],
        }
    }

    /// What the wait is for, when nothing could be read.
    fn describe(&self) -> String {
        match self {
            Condition::Keys { keys, gone: false } => format!("waiting for {}", keys.join(", ")),
            Condition::Keys { keys, gone: true } => format!("waiting for {} to go", keys.join(", ")),
            Condition::Count { prefix, count, gone } => {
                let bound = if *gone { "at most" } else { "at least" };
                format!("waiting for {bound} {count} keys under {prefix}")
            }
        }
    }
}

/// Everything `sidekick wait` needs, validated.
#[derive(Debug, Clone)]
pub struct WaitConfig {
    /// What to wait for.
    pub condition: Condition,
    /// When to give up.
    pub timeout: Duration,
    /// Where etcd is and how to reach it.
    pub etcd: EtcdSettings,
}

/// Checks the flags of `sidekick wait`; every rule fails with one line
/// naming the flag, before etcd is contacted.
pub fn wait_config(args: &WaitCmdArgs, env: &dyn Environment) -> Result<WaitConfig, UsageError> {
    let condition = match (&args.prefix, args.keys.is_empty()) {
        (None, true) => return Err(UsageError::new("wait needs KEY... or --prefix P")),
        (Some(_), false) => {
            return Err(UsageError::new(
                "KEY and --prefix cannot be used together: name the keys, or count them under a prefix",
            ))
        }
        (None, false) => {
            if args.count.is_some() {
                return Err(UsageError::new("--count needs --prefix P"));
            }
            let mut keys: Vec<String> = Vec::new();
            for k in &args.keys {
                if k.is_empty() {
                    return Err(UsageError::new("KEY must not be empty"));
                }
                if !keys.contains(k) {
                    keys.push(k.clone());
                }
            }
            Condition::Keys { keys, gone: args.gone }
        }
        (Some(prefix), true) => {
            if prefix.is_empty() {
                return Err(UsageError::new(
                    "--prefix must not be empty (to count every key, say so with a prefix such as /)",
                ));
            }
            let count = match &args.count {
                None => u64::from(!args.gone),
                Some(raw) => raw
                    .trim()
                    .parse::<u64>()
                    .map_err(|_| UsageError::new(format!("--count: '{raw}' must be a whole number, 0 or more")))?,
            };
            Condition::Count {
                prefix: prefix.clone(),
                count,
                gone: args.gone,
            }
        }
    };
    let timeout = crate::parse::duration("--timeout", &args.timeout, Duration::from_secs(60))?;
    if timeout.is_zero() {
        return Err(UsageError::new("--timeout must be more than 0s"));
    }
    let etcd = config::etcd_settings(&args.etcd, env)?;
    Ok(WaitConfig {
        condition,
        timeout,
        etcd,
    })
}

/// Why `sidekick wait` did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad flags: exit 2.
    #[error(transparent)]
    Usage(#[from] UsageError),
    /// The condition did not hold in time: exit 1. The text is one line.
    #[error("{0}")]
    TimedOut(String),
    /// The async runtime could not start: exit 1.
    #[error("could not start the async runtime: {0}")]
    Runtime(#[from] std::io::Error),
}

/// The whole command: checks the flags, then waits on a one-thread runtime.
pub fn run(args: &WaitCmdArgs, env: &dyn Environment) -> Result<(), Error> {
    let cfg = wait_config(args, env)?;
    // A member cut off from its cluster answers a watch without a leader
    // by never sending anything: asked for a leader, it refuses instead,
    // and the next read goes to the next endpoint.
    let options = connect_options(&cfg.etcd)
        .map_err(UsageError::new)?
        .with_require_leader(true);
    let limit = cfg.etcd.dial_timeout;
    let mut reg = EtcdRegistry::one_shot(cfg.etcd.discovery.endpoints.clone(), options, limit);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(run_with(&mut reg, &cfg.condition, limit, cfg.timeout))
        .map_err(|e| match e {
            // etcd never answered: say how its endpoint was chosen.
            Error::TimedOut(text) if text.ends_with("etcd never answered") || text.contains("could not ") => {
                Error::TimedOut(format!("{text} ({})", cfg.etcd.discovery.hint()))
            }
            other => other,
        })
}

/// Why one read-then-watch round ended before the condition held.
enum Interrupted {
    /// etcd stopped answering or refused: back off, then read again.
    Lost(String),
    /// The revision read at was compacted away: read again at once.
    Compacted,
}

impl From<RegistryError> for Interrupted {
    fn from(e: RegistryError) -> Self {
        match e.kind {
            ErrorKind::Compacted => Interrupted::Compacted,
            _ => Interrupted::Lost(e.to_string()),
        }
    }
}

/// Waits until `condition` holds (`Ok`) or `timeout` passes. Each etcd
/// request is bounded by `limit`; etcd being away only means reading again
/// later (over the next endpoint, as `reg` rotates), with a capped backoff.
pub async fn run_with<R: Etcd>(
    reg: &mut R,
    condition: &Condition,
    limit: Duration,
    timeout: Duration,
) -> Result<(), Error> {
    let mut seen: Option<Seen> = None;
    let mut trouble: Option<String> = None;
    let rounds = async {
        let mut failures = 0u32;
        loop {
            match round(condition, reg, limit, &mut seen, &mut trouble).await {
                Ok(()) => return,
                Err(Interrupted::Compacted) => {
                    debug!("the watch revision was compacted; reading the keys again");
                    failures = 0;
                }
                Err(Interrupted::Lost(cause)) => {
                    if trouble.as_deref() != Some(cause.as_str()) {
                        debug!(%cause, "etcd is not answering; still waiting");
                    }
                    trouble = Some(cause);
                    tokio::time::sleep(backoff(failures)).await;
                    failures = failures.saturating_add(1);
                }
            }
        }
    };
    let done = tokio::time::timeout(timeout, rounds).await.is_ok();
    reg.unwatch();
    if done {
        return Ok(());
    }
    let after = format!("timed out after {}", humantime::format_duration(timeout));
    let text = match (&seen, &trouble) {
        (Some(s), None) => format!("{after}: {}", condition.shortfall(s)),
        (Some(s), Some(t)) => format!("{after}: {} as last read; since then: {t}", condition.shortfall(s)),
        (None, Some(t)) => format!("{after} {}: {t}", condition.describe()),
        (None, None) => format!("{after} {}: etcd never answered", condition.describe()),
    };
    Err(Error::TimedOut(one_line(&text)))
}

/// The pause before the next read after `failures` failed rounds: from
/// 100ms doubling up to 2s, less a random part of up to a half so that many
/// waiting scripts do not come back to a restarted etcd all at once.
fn backoff(failures: u32) -> Duration {
    let full = Duration::from_millis(100)
        .saturating_mul(1 << failures.min(5))
        .min(Duration::from_secs(2));
    full.mul_f64(1.0 - fastrand::f64() / 2.0)
}

/// Reads the state at one revision, returns if it satisfies the condition,
/// else watches from the next revision until it does or the watch breaks.
async fn round<R: Etcd>(
    condition: &Condition,
    reg: &mut R,
    limit: Duration,
    seen: &mut Option<Seen>,
    trouble: &mut Option<String>,
) -> Result<(), Interrupted> {
    let (now, revision) = ops::within(reg, limit, "read the keys", async |r| read(r, condition).await).await?;
    if trouble.take().is_some() {
        debug!(endpoint = %reg.endpoint(), "etcd answers again");
    }
    let now = seen.insert(now);
    if condition.holds(now) {
        return Ok(());
    }
    let ranges = condition.ranges();
    ops::within(reg, limit, "watch the keys", async |r| {
        r.watch(&ranges, revision + 1, false).await
    })
    .await?;
    debug!(endpoint = %reg.endpoint(), from = revision + 1, "watching");
    loop {
        for event in reg.watched().await? {
            now.apply(&change(&event));
        }
        if condition.holds(now) {
            return Ok(());
        }
    }
}

/// What etcd holds now, and the revision it was read at.
async fn read<R: Etcd>(reg: &mut R, condition: &Condition) -> Result<(Seen, i64), RegistryError> {
    match condition {
        Condition::Keys { keys, .. } => {
            let (present, revision) = ops::read_keys(reg, keys).await?;
            Ok((Seen::Keys(present.into_iter().map(|kv| kv.key).collect()), revision))
        }
        Condition::Count { prefix, .. } => {
            let (count, revision) = ops::count_prefix(reg, prefix).await?;
            Ok((Seen::Count(count), revision))
        }
    }
}

/// A watch event as a [`Change`].
fn change(event: &Event) -> Change {
    let key = event.kv.key.clone();
    if event.put {
        Change::Put {
            key,
            created: event.kv.version == 1,
        }
    } else {
        Change::Delete { key }
    }
}

/// Escapes control characters (a newline in a key, say) so the message
/// stays one line.
fn one_line(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::EtcdArgs;
    use crate::discover::MapEnv;

    fn keys(ks: &[&str], gone: bool) -> Condition {
        Condition::Keys {
            keys: ks.iter().map(|k| k.to_string()).collect(),
            gone,
        }
    }

    fn count(count: u64, gone: bool) -> Condition {
        Condition::Count {
            prefix: "/services/web/".into(),
            count,
            gone,
        }
    }

    fn present(ks: &[&str]) -> Seen {
        Seen::Keys(ks.iter().map(|k| k.to_string()).collect())
    }

    #[test]
    fn conditions_and_what_they_lack() {
        // (condition, seen, holds, the timeout line's detail)
        let cases = [
            (keys(&["/a", "/b"], false), present(&["/a", "/b"]), true, "missing "),
            (keys(&["/a", "/b"], false), present(&["/b"]), false, "missing /a"),
            (
                keys(&["/a", "/b", "/c"], false),
                present(&[]),
                false,
                "missing /a, /b, /c",
            ),
            (keys(&["/a", "/b"], true), present(&[]), true, "still there: "),
            (keys(&["/a", "/b"], true), present(&["/b"]), false, "still there: /b"),
            (keys(&["/a"], true), present(&["/a"]), false, "still there: /a"),
            (
                count(3, false),
                Seen::Count(3),
                true,
                "3 keys under /services/web/, wanted at least 3",
            ),
            (
                count(3, false),
                Seen::Count(4),
                true,
                "4 keys under /services/web/, wanted at least 3",
            ),
            (
                count(3, false),
                Seen::Count(2),
                false,
                "2 keys under /services/web/, wanted at least 3",
            ),
            (
                count(0, false),
                Seen::Count(0),
                true,
                "0 keys under /services/web/, wanted at least 0",
            ),
            (
                count(1, true),
                Seen::Count(1),
                true,
                "1 key under /services/web/, wanted at most 1",
            ),
            (
                count(1, true),
                Seen::Count(2),
                false,
                "2 keys under /services/web/, wanted at most 1",
            ),
            (
                count(0, true),
                Seen::Count(1),
                false,
                "1 key under /services/web/, wanted at most 0",
            ),
            (
                count(0, true),
                Seen::Count(0),
                true,
                "0 keys under /services/web/, wanted at most 0",
            ),
        ];
        for (cond, seen, holds, line) in cases {
            assert_eq!(cond.holds(&seen), holds, "{cond:?} on {seen:?}");
            assert_eq!(cond.shortfall(&seen), line, "{cond:?} on {seen:?}");
        }
    }

    #[test]
    fn changes_fold_into_what_was_seen() {
        let put = |k: &str, created| Change::Put { key: k.into(), created };
        let del = |k: &str| Change::Delete { key: k.into() };
        // (before, change, after)
        let cases = [
            (present(&[]), put("/a", true), present(&["/a"])),
            (present(&["/a"]), put("/a", false), present(&["/a"])),
            (present(&["/a"]), del("/a"), present(&[])),
            (present(&[]), del("/a"), present(&[])),
            (Seen::Count(2), put("/p/3", true), Seen::Count(3)),
            // An update does not add a key.
            (Seen::Count(2), put("/p/1", false), Seen::Count(2)),
            (Seen::Count(2), del("/p/1"), Seen::Count(1)),
            (Seen::Count(0), del("/p/1"), Seen::Count(0)),
        ];
        for (mut seen, change, after) in cases {
            let before = seen.clone();
            seen.apply(&change);
            assert_eq!(seen, after, "{before:?} + {change:?}");
        }
    }

    fn args(f: impl FnOnce(&mut WaitCmdArgs)) -> WaitCmdArgs {
        let mut a = WaitCmdArgs {
            keys: vec![],
            prefix: None,
            count: None,
            gone: false,
            timeout: None,
            etcd: EtcdArgs {
                endpoints: Some("http://127.0.0.1:2379".into()),
                ..EtcdArgs::default()
            },
        };
        f(&mut a);
        a
    }

    #[test]
    fn flags_become_a_condition() {
        let s = |v: &str| Some(v.to_string());
        type Case = (Box<dyn Fn(&mut WaitCmdArgs)>, Condition);
        let cases: Vec<Case> = vec![
            (
                Box::new(|a| a.keys = vec!["/a".into(), "/b".into(), "/a".into()]),
                keys(&["/a", "/b"], false),
            ),
            (
                Box::new(|a| {
                    a.keys = vec!["/a".into()];
                    a.gone = true
                }),
                keys(&["/a"], true),
            ),
            (Box::new(move |a| a.prefix = s("/services/web/")), count(1, false)),
            (
                Box::new(move |a| {
                    a.prefix = s("/services/web/");
                    a.gone = true
                }),
                count(0, true),
            ),
            (
                Box::new(move |a| {
                    a.prefix = s("/services/web/");
                    a.count = s("3")
                }),
                count(3, false),
            ),
            (
                Box::new(move |a| {
                    a.prefix = s("/services/web/");
                    a.count = s("1");
                    a.gone = true
                }),
                count(1, true),
            ),
        ];
        for (f, want) in cases {
            let cfg = wait_config(&args(f), &MapEnv::default()).unwrap();
            assert_eq!(cfg.condition, want);
            assert_eq!(cfg.timeout, Duration::from_secs(60));
        }
    }

    #[test]
    fn each_bad_flag_names_the_flag_and_the_rule() {
        let s = |v: &str| Some(v.to_string());
        type Case = (&'static str, Box<dyn Fn(&mut WaitCmdArgs)>);
        let cases: Vec<Case> = vec![
            ("wait needs KEY... or --prefix P", Box::new(|_| {})),
            (
                "KEY and --prefix cannot be used together",
                Box::new(move |a| {
                    a.keys = vec!["/a".into()];
                    a.prefix = s("/p/")
                }),
            ),
            (
                "--count needs --prefix P",
                Box::new(move |a| {
                    a.keys = vec!["/a".into()];
                    a.count = s("2")
                }),
            ),
            (
                "--count: '-1' must be a whole number, 0 or more",
                Box::new(move |a| {
                    a.prefix = s("/p/");
                    a.count = s("-1")
                }),
            ),
            (
                "--count: 'three' must be a whole number",
                Box::new(move |a| {
                    a.prefix = s("/p/");
                    a.count = s("three")
                }),
            ),
            ("KEY must not be empty", Box::new(|a| a.keys = vec!["".into()])),
            ("--prefix must not be empty", Box::new(move |a| a.prefix = s(""))),
            (
                "--timeout: 'soon' is not a duration",
                Box::new(move |a| {
                    a.keys = vec!["/a".into()];
                    a.timeout = s("soon")
                }),
            ),
            (
                "--timeout must be more than 0s",
                Box::new(move |a| {
                    a.keys = vec!["/a".into()];
                    a.timeout = s("0s")
                }),
            ),
            (
                "--dial-timeout must be more than 0s",
                Box::new(move |a| {
                    a.keys = vec!["/a".into()];
                    a.etcd.dial_timeout = s("0s")
                }),
            ),
        ];
        for (want, f) in cases {
            let msg = wait_config(&args(f), &MapEnv::default()).unwrap_err().0;
            assert!(msg.starts_with(want), "{msg:?} should start with {want:?}");
        }
    }

    #[test]
    fn backoff_doubles_up_to_a_cap() {
        for (failures, lo, hi) in [
            (0, 50, 100),
            (1, 100, 200),
            (4, 800, 1600),
            (5, 1000, 2000),
            (40, 1000, 2000),
        ] {
            let d = backoff(failures).as_millis();
            assert!((lo..=hi).contains(&d), "{failures} failures: {d}ms");
        }
    }

    #[test]
    fn the_timeout_line_stays_one_line() {
        assert_eq!(one_line("missing /a\n/b"), "missing /a\\n/b");
    }

    // Against the model of etcd, under paused time: the wait's rhythm.

    use crate::registry::memory::Model;
    use crate::registry::{Granted, LeaseId, Status, Txn, TxnResult};
    use tokio::task::JoinHandle;

    /// Each request's bound.
    const LIMIT: Duration = Duration::from_secs(1);

    /// Starts `run_with` on a client of `model`, in a task of its own.
    fn start(model: &Model, condition: Condition, timeout_s: u64) -> JoinHandle<Result<(), Error>> {
        let mut reg = model.clone();
        tokio::spawn(async move { run_with(&mut reg, &condition, LIMIT, Duration::from_secs(timeout_s)).await })
    }

    /// The wait's result if it ends within `d`; paused time passes only
    /// while nothing else can run, so a small `d` means "without waiting".
    async fn ended_within(task: &mut JoinHandle<Result<(), Error>>, d: Duration) -> Option<Result<(), String>> {
        let r = tokio::time::timeout(d, task).await.ok()?;
        Some(r.expect("the wait does not panic").map_err(|e| e.to_string()))
    }

    const AT_ONCE: Duration = Duration::from_millis(1);

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    async fn still_waiting(task: &mut JoinHandle<Result<(), Error>>, d: Duration, what: &str) {
        assert_eq!(ended_within(task, d).await, None, "{what}");
    }

    #[tokio::test(start_paused = true)]
    async fn keys_put_later_end_the_wait_with_one_read_and_one_watch() {
        let m = Model::new();
        let mut w = start(&m, keys(&["/svc/a", "/svc/b"], false), 60);
        still_waiting(&mut w, secs(5), "no key yet").await;
        m.put_foreign("/svc/a", "1", 0);
        still_waiting(&mut w, secs(5), "one key of two").await;
        m.put_foreign("/svc/b", "1", 0);
        assert_eq!(ended_within(&mut w, AT_ONCE).await, Some(Ok(())));
        assert_eq!((m.calls("txn"), m.calls("watch")), (1, 1), "one read, then the watch");
    }

    #[tokio::test(start_paused = true)]
    async fn gone_ends_when_the_last_key_is_deleted_or_expires() {
        let m = Model::new();
        let lease = m.clone().grant(secs(30), None).await.unwrap().id;
        m.put_foreign("/svc/a", "1", 0);
        m.put_foreign("/svc/b", "1", lease.0);
        let mut w = start(&m, keys(&["/svc/a", "/svc/b"], true), 60);
        still_waiting(&mut w, secs(1), "both keys there").await;
        m.delete("/svc/a");
        still_waiting(&mut w, secs(1), "one key still there").await;
        // The key goes with its lease, as a crashed instance's key does.
        assert_eq!(ended_within(&mut w, secs(40)).await, Some(Ok(())));
        assert_eq!(m.get("/svc/b"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_prefix_count_is_reached_as_keys_are_added_and_left_as_they_go() {
        let m = Model::new();
        m.put_foreign("/services/web/1", "a", 0);
        let mut w = start(&m, count(3, false), 60);
        still_waiting(&mut w, secs(1), "one key of three").await;
        // Neither an update, nor a key beside the raw prefix, nor a key that
        // comes and goes adds to the count.
        m.put_foreign("/services/web/1", "b", 0);
        m.put_foreign("/services/webx", "a", 0);
        m.put_foreign("/services/web/9", "a", 0);
        m.delete("/services/web/9");
        m.put_foreign("/services/web/2", "a", 0);
        still_waiting(&mut w, secs(1), "two keys of three").await;
        m.put_foreign("/services/web/3", "a", 0);
        assert_eq!(ended_within(&mut w, AT_ONCE).await, Some(Ok(())));

        let mut w = start(&m, count(1, true), 60);
        m.delete("/services/web/1");
        still_waiting(&mut w, secs(1), "two keys left, at most one wanted").await;
        m.delete("/services/web/2");
        assert_eq!(ended_within(&mut w, AT_ONCE).await, Some(Ok(())));
    }

    #[tokio::test(start_paused = true)]
    async fn a_condition_already_true_returns_at_once_without_a_watch() {
        let m = Model::new();
        for k in ["/a", "/b", "/services/web/1", "/services/web/2", "/services/web/3"] {
            m.put_foreign(k, "x", 0);
        }
        for condition in [
            keys(&["/a", "/b"], false),
            keys(&["/nothing", "/none"], true),
            count(1, false),
            count(3, false),
            count(3, true),
            Condition::Count {
                prefix: "/q/".into(),
                count: 0,
                gone: true,
            },
        ] {
            let mut w = start(&m, condition.clone(), 60);
            assert_eq!(ended_within(&mut w, AT_ONCE).await, Some(Ok(())), "{condition:?}");
        }
        assert_eq!(m.calls("watch"), 0);
    }

    /// A watch, not polling: an idle wait asks etcd nothing.
    #[tokio::test(start_paused = true)]
    async fn an_idle_wait_reads_nothing_while_it_waits() {
        let m = Model::new();
        let mut w = start(&m, keys(&["/svc/a"], false), 600);
        still_waiting(&mut w, secs(1), "nothing yet").await;
        let asked = (m.calls("txn"), m.calls("watch"));
        still_waiting(&mut w, secs(300), "nothing yet").await;
        assert_eq!((m.calls("txn"), m.calls("watch")), asked, "requests while idle");
        m.put_foreign("/svc/a", "1", 0);
        assert_eq!(ended_within(&mut w, AT_ONCE).await, Some(Ok(())));
    }

    #[tokio::test(start_paused = true)]
    async fn a_timeout_names_what_is_missing_and_why_etcd_did_not_say() {
        let m = Model::new();
        m.put_foreign("/a", "x", 0);
        m.put_foreign("/services/web/1", "x", 0);
        let cases = [
            (keys(&["/a", "/b", "/c"], false), "timed out after 2s: missing /b, /c"),
            (keys(&["/a", "/b"], true), "timed out after 2s: still there: /a"),
            (
                count(2, false),
                "timed out after 2s: 1 key under /services/web/, wanted at least 2",
            ),
            (
                count(0, true),
                "timed out after 2s: 1 key under /services/web/, wanted at most 0",
            ),
        ];
        for (condition, line) in cases {
            let mut w = start(&m, condition, 2);
            still_waiting(&mut w, Duration::from_millis(1990), line).await;
            assert_eq!(ended_within(&mut w, secs(1)).await, Some(Err(line.to_string())));
        }

        // etcd away from the start, or frozen: the cause, each request
        // bounded.
        m.set_unreachable(true);
        let mut w = start(&m, keys(&["/b"], false), 5);
        let line = "timed out after 5s waiting for /b: could not read the keys at model: connection refused";
        assert_eq!(ended_within(&mut w, secs(6)).await, Some(Err(line.to_string())));
        m.set_unreachable(false);
        m.set_hung(true);
        let mut w = start(&m, keys(&["/b"], false), 5);
        let line = "timed out after 5s waiting for /b: could not read the keys at model: no answer within 1s";
        assert_eq!(ended_within(&mut w, secs(6)).await, Some(Err(line.to_string())));
    }

    #[tokio::test(start_paused = true)]
    async fn etcd_away_for_a_while_does_not_end_the_wait_and_a_key_put_meanwhile_is_found() {
        let m = Model::new();
        let mut w = start(&m, keys(&["/svc/a"], false), 60);
        still_waiting(&mut w, secs(1), "watching").await;
        let reads = m.calls("txn");
        m.set_unreachable(true);
        still_waiting(&mut w, secs(30), "etcd away").await;
        // Retried with a capped backoff: neither given up nor a busy loop.
        let retries = m.calls("txn") - reads;
        assert!((10..=40).contains(&retries), "{retries} reads in 30s");
        // Put through another member while this one is away: only a read
        // can find it.
        m.put_foreign("/svc/a", "1", 0);
        still_waiting(&mut w, secs(1), "etcd still away").await;
        m.set_unreachable(false);
        assert_eq!(ended_within(&mut w, secs(3)).await, Some(Ok(())));

        // A restart breaks the watch: read again, then watch again.
        let mut w = start(&m, keys(&["/svc/b"], false), 60);
        still_waiting(&mut w, secs(1), "watching").await;
        let watches = m.calls("watch");
        m.restart();
        still_waiting(&mut w, secs(5), "after a restart").await;
        assert_eq!(m.calls("watch"), watches + 1, "watching again");
        m.put_foreign("/svc/b", "1", 0);
        assert_eq!(ended_within(&mut w, AT_ONCE).await, Some(Ok(())));
    }

    // A wiped etcd starts again at revision 1: a wait that watched on from
    // its old revision would miss every key put since.
    #[tokio::test(start_paused = true)]
    async fn a_wipe_is_followed_by_a_fresh_read_that_misses_nothing() {
        let m = Model::new();
        for i in 0..5 {
            m.put_foreign(&format!("/other/{i}"), "x", 0);
        }
        let mut w = start(&m, keys(&["/svc/a"], false), 60);
        still_waiting(&mut w, secs(1), "watching").await;
        m.wipe();
        m.put_foreign("/svc/a", "1", 0);
        assert_eq!(m.revision(), 2);
        assert_eq!(ended_within(&mut w, secs(3)).await, Some(Ok(())));
        assert_eq!(m.calls("txn"), 2, "read again after the wipe");
    }

    /// The model, with something done to it just before the first watch
    /// opens: what other clients do between the wait's read and its watch.
    struct BeforeWatch {
        model: Model,
        then: Option<Meddling>,
    }

    type Meddling = Box<dyn FnOnce(&Model) + Send>;

    impl Etcd for BeforeWatch {
        async fn grant(&mut self, ttl: Duration, id: Option<LeaseId>) -> Result<Granted, RegistryError> {
            self.model.grant(ttl, id).await
        }
        async fn keep_alive(&mut self, lease: LeaseId) -> Result<Option<Duration>, RegistryError> {
            self.model.keep_alive(lease).await
        }
        async fn revoke(&mut self, lease: LeaseId) -> Result<bool, RegistryError> {
            self.model.revoke(lease).await
        }
        async fn time_to_live(&mut self, lease: LeaseId) -> Result<Option<Duration>, RegistryError> {
            self.model.time_to_live(lease).await
        }
        async fn txn(&mut self, txn: Txn) -> Result<TxnResult, RegistryError> {
            self.model.txn(txn).await
        }
        async fn watch(&mut self, ranges: &[Range], from: i64, deletes_only: bool) -> Result<(), RegistryError> {
            if let Some(f) = self.then.take() {
                f(&self.model);
            }
            self.model.watch(ranges, from, deletes_only).await
        }
        async fn watched(&mut self) -> Result<Vec<Event>, RegistryError> {
            self.model.watched().await
        }
        async fn status(&mut self) -> Result<Status, RegistryError> {
            self.model.status().await
        }
        fn unwatch(&mut self) {
            self.model.unwatch()
        }
        fn forget(&mut self, lease: LeaseId) {
            self.model.forget(lease)
        }
        fn endpoint(&self) -> &str {
            self.model.endpoint()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_compacted_watch_revision_means_reading_again_at_once() {
        let m = Model::new();
        m.put_foreign("/other", "x", 0);
        // The key comes, and the revisions since the read are compacted,
        // before the watch opens: it can only start later, so only a
        // fresh read finds the key.
        let mut reg = BeforeWatch {
            model: m.clone(),
            then: Some(Box::new(|m: &Model| {
                m.put_foreign("/svc/a", "1", 0);
                m.put_foreign("/other", "y", 0);
                m.compact(m.revision());
            })),
        };
        let condition = keys(&["/svc/a"], false);
        let mut w = tokio::spawn(async move { run_with(&mut reg, &condition, LIMIT, secs(60)).await });
        assert_eq!(ended_within(&mut w, AT_ONCE).await, Some(Ok(())), "no backoff either");
        assert_eq!(
            (m.calls("txn"), m.calls("watch")),
            (2, 1),
            "the second read found the key"
        );

        // A compaction under an open watch changes nothing for it.
        let mut w = start(&m, keys(&["/svc/b"], false), 60);
        still_waiting(&mut w, secs(1), "watching").await;
        m.put_foreign("/other", "z", 0);
        m.compact(m.revision());
        still_waiting(&mut w, secs(1), "after the compaction").await;
        m.put_foreign("/svc/b", "1", 0);
        assert_eq!(ended_within(&mut w, AT_ONCE).await, Some(Ok(())));
        assert_eq!(m.calls("txn"), 3, "one read for the second wait");
    }

    // etcd refuses a transaction of more than 128 operations: the keys are
    // read in several, all at the revision of the first.
    #[tokio::test(start_paused = true)]
    async fn more_keys_than_one_transaction_holds() {
        let m = Model::new();
        let names: Vec<String> = (0..300).map(|i| format!("/many/{i:03}")).collect();
        for k in &names[..299] {
            m.put_foreign(k, "x", 0);
        }
        let all = Condition::Keys {
            keys: names.clone(),
            gone: false,
        };
        let mut w = start(&m, all.clone(), 2);
        let line = "timed out after 2s: missing /many/299".to_string();
        assert_eq!(ended_within(&mut w, secs(3)).await, Some(Err(line)));
        assert_eq!(m.calls("txn"), 3, "300 keys in three reads");
        let mut w = start(&m, all, 60);
        still_waiting(&mut w, secs(1), "one key missing").await;
        m.put_foreign(&names[299], "x", 0);
        assert_eq!(ended_within(&mut w, AT_ONCE).await, Some(Ok(())));
    }
}
