//! `sidekick wait`: blocks until named keys exist (or are gone), or until
//! enough keys exist under a prefix, following an etcd watch, not polling.
//!
//! The condition logic is pure: a [`Condition`] judges what was [`Seen`],
//! and [`Seen::apply`] folds in one [`Change`] from the watch. [`wait`]
//! reads the state at one revision R and watches from R+1, so no change
//! falls between the read and the watch; a lost connection or a compacted
//! watch revision means reading again, until the condition holds or the
//! time is up.

use std::collections::BTreeSet;
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, Txn, TxnOp, TxnOpResponse, WatchOptions, WatchStream};
use tracing::debug;

use crate::cli::WaitCmdArgs;
use crate::config::{self, EtcdSettings, UsageError};
use crate::discover::Environment;
use crate::registry::{connect_options, Etcd, EtcdRegistry};

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
    let options = connect_options(&cfg.etcd).map_err(UsageError::new)?;
    let mut reg = EtcdRegistry::new(cfg.etcd.discovery.endpoints.clone(), options, cfg.etcd.dial_timeout);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(wait(&cfg.condition, &mut reg, cfg.etcd.dial_timeout, cfg.timeout))
}

/// Why one read-then-watch round ended before the condition held.
enum Interrupted {
    /// etcd stopped answering or refused: back off, then read again.
    Lost(String),
    /// The watch's start revision was compacted away: read again at once.
    Compacted,
}

/// Waits until `condition` holds (`Ok`) or `timeout` passes. Each etcd
/// request is bounded by `limit`; etcd being away only means reading again
/// later, over the next endpoint, with a capped backoff.
pub async fn wait(
    condition: &Condition,
    reg: &mut EtcdRegistry,
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
    if tokio::time::timeout(timeout, rounds).await.is_ok() {
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
async fn round(
    condition: &Condition,
    reg: &mut EtcdRegistry,
    limit: Duration,
    seen: &mut Option<Seen>,
    trouble: &mut Option<String>,
) -> Result<(), Interrupted> {
    let lost = |e: crate::registry::RegistryError| Interrupted::Lost(e.to_string());
    let (now, revision) = reg
        .once("read the keys", limit, async |c| read(c, condition).await)
        .await
        .map_err(lost)?;
    if trouble.take().is_some() {
        debug!(endpoint = %reg.endpoint(), "etcd answers again");
    }
    let now = seen.insert(now);
    if condition.holds(now) {
        return Ok(());
    }
    let mut stream = reg
        .once("watch the keys", limit, async |c| {
            watch(c, condition, revision + 1).await
        })
        .await
        .map_err(lost)?;
    let endpoint = reg.endpoint().to_string();
    loop {
        let resp = match stream.message().await {
            Ok(Some(resp)) => resp,
            Ok(None) => return Err(Interrupted::Lost(format!("etcd at {endpoint} closed the watch"))),
            Err(e) => {
                return Err(Interrupted::Lost(format!(
                    "could not watch the keys at {endpoint}: {}",
                    short(&e)
                )))
            }
        };
        if resp.canceled() {
            if resp.compact_revision() > 0 {
                return Err(Interrupted::Compacted);
            }
            return Err(Interrupted::Lost(format!(
                "etcd at {endpoint} cancelled the watch: {}",
                resp.cancel_reason().trim_start_matches("etcdserver: ")
            )));
        }
        for event in resp.events() {
            if let Some(change) = change(event) {
                now.apply(&change);
            }
        }
        if condition.holds(now) {
            return Ok(());
        }
    }
}

/// etcd's default limit on the operations of one transaction.
const MAX_TXN_OPS: usize = 128;

/// What etcd holds now, and the revision it was read at.
async fn read(c: &mut Client, condition: &Condition) -> Result<(Seen, i64), etcd_client::Error> {
    let count_only = || Some(GetOptions::new().with_count_only());
    match condition {
        Condition::Keys { keys, .. } => {
            // Transactions of at most etcd's default --max-txn-ops gets; the
            // first fixes the revision, the others read at it, so every key
            // is read at one revision.
            let mut revision = 0;
            let mut present = BTreeSet::new();
            for chunk in keys.chunks(MAX_TXN_OPS) {
                let opts = || match revision {
                    0 => count_only(),
                    r => count_only().map(|o| o.with_revision(r)),
                };
                let ops: Vec<TxnOp> = chunk.iter().map(|k| TxnOp::get(k.as_str(), opts())).collect();
                let resp = c.txn(Txn::new().and_then(ops)).await?;
                if revision == 0 {
                    revision = resp.header().map_or(0, |h| h.revision());
                }
                present.extend(
                    chunk
                        .iter()
                        .zip(resp.op_responses())
                        .filter(|(_, r)| matches!(r, TxnOpResponse::Get(g) if g.count() > 0))
                        .map(|(k, _)| k.clone()),
                );
            }
            Ok((Seen::Keys(present), revision))
        }
        Condition::Count { prefix, .. } => {
            let resp = c
                .get(prefix.as_str(), Some(GetOptions::new().with_prefix().with_count_only()))
                .await?;
            let revision = resp.header().map_or(0, |h| h.revision());
            Ok((Seen::Count(resp.count().max(0) as u64), revision))
        }
    }
}

/// Opens one watch stream from `start`: one watch per key, or one over the
/// prefix.
async fn watch(c: &mut Client, condition: &Condition, start: i64) -> Result<WatchStream, etcd_client::Error> {
    let from = || WatchOptions::new().with_start_revision(start);
    match condition {
        Condition::Keys { keys, .. } => {
            let mut stream = c.watch(keys[0].as_str(), Some(from())).await?;
            for k in &keys[1..] {
                stream.watch(k.as_str(), Some(from())).await?;
            }
            Ok(stream)
        }
        Condition::Count { prefix, .. } => c.watch(prefix.as_str(), Some(from().with_prefix())).await,
    }
}

/// A watch event as a [`Change`]; `None` for an event without its key.
fn change(event: &etcd_client::Event) -> Option<Change> {
    let kv = event.kv()?;
    let key = String::from_utf8_lossy(kv.key()).into_owned();
    Some(match event.event_type() {
        EventType::Put => Change::Put {
            key,
            created: kv.version() == 1,
        },
        EventType::Delete => Change::Delete { key },
    })
}

/// An etcd-client error in a few words: the gRPC message, or the error's
/// own text.
fn short(err: &etcd_client::Error) -> String {
    match err {
        etcd_client::Error::GRpcStatus(s) if !s.message().is_empty() => {
            s.message().trim_start_matches("etcdserver: ").to_string()
        }
        etcd_client::Error::GRpcStatus(s) => s.code().description().to_string(),
        other => other.to_string(),
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
}
