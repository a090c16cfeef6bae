//! Test parts: real etcd servers on free loopback ports, a controllable HTTP
//! backend, a builder for the `sidekick` binary, and every timing bound of
//! the tests ([`bounds`], [`Figures`]).

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use clap::{CommandFactory, FromArgMatches};
use etcd_client::{Client, ConnectOptions, KeyValue};
use etcd_sidekick::cli::{Cli, Command as Sub, ExplainArgs};
use etcd_sidekick::explain::{self, Explanation};
use tempfile::TempDir;

use self::bounds::*;

/// Every timing bound of the integration tests, in one place.
///
/// The machine the tests run on may be a loaded 2-core box with builds
/// beside them, so no bound here hopes for a quiet machine:
///
/// - a wait for something a sidekick's flags say comes within a figure
///   waits that figure plus [`SLACK`] (see [`Figures`]), and a wait for
///   something no flag governs waits [`SOON`]; both only cost time when
///   the test fails, so they are generous;
/// - an assertion that a measured reaction came in time allows its figure
///   plus [`LATE`] (a running sidekick) or [`ONE_SHOT_LATE`] (a command
///   started for the measurement), small enough that a broken bound, which
///   misses by a dial timeout, a TTL or a hang, still fails;
/// - an assertion that something did not come too soon allows [`EARLY`];
/// - a negative check ("nothing happened during X") lets a named window
///   pass with [`let_pass`](super::let_pass),
///   [`throughout`](super::throughout) or
///   [`Running::stays_running`](super::Running::stays_running): a window
///   of [`Figures`] when the sidekick's flags say how long, [`QUIET`] when
///   the reaction that must not come would come at once;
/// - a scenario that must reach a state no event shows (a call retried
///   silently after its backoff) lets time pass with
///   [`advance`](super::advance), and its assertions hold whether or not
///   it got there.
pub mod bounds {
    use std::time::Duration;

    /// Added to a figure the flags give, for a wait: a sidekick process
    /// starting, scheduling of the sidekick, etcd (whose writes wait for
    /// fsync on a busy disk) and the test on two busy cores, and etcd's
    /// round trips, which the figures leave out. Only a failing test waits
    /// it out.
    pub const SLACK: Duration = Duration::from_secs(10);

    /// A wait for what follows at once from an event already seen, with no
    /// flag to govern it: a log line written after the etcd call it
    /// reports, a metric after a state change, a watcher after a wait
    /// process has started, a key after a process that revoked it exited.
    pub const SOON: Duration = SLACK;

    /// How much later than its figure a running sidekick's reaction,
    /// measured from the test, may come and still count as within it:
    /// scheduling on two busy cores, an etcd write's fsync, and the test's
    /// own poll. Part of what is asserted, so well below what a broken
    /// bound adds (a dial timeout of 3 s, a TTL of 3 s in those tests).
    pub const LATE: Duration = Duration::from_millis(1500);

    /// [`LATE`] for a command started only to be timed (`check`,
    /// `announce`, `wait`, ...): it adds the process's start and exit, which
    /// a loaded machine can stretch to seconds. Below what the broken
    /// behaviour costs in those tests (a server that stalls for twice the
    /// bound, `sleep 300`, a wait's 30 s timeout).
    pub const ONE_SHOT_LATE: Duration = Duration::from_secs(5);

    /// How much sooner than a minimum its flags set a measured time may
    /// come out: the test reads its clock just after the event it times
    /// from (a signal sent, a key seen gone), and timers round.
    pub const EARLY: Duration = Duration::from_millis(100);

    /// How often a condition is polled.
    pub const POLL: Duration = Duration::from_millis(50);

    /// How often a measurement samples (a process's exit for its timing,
    /// its resident size for the peak): finer than [`POLL`].
    pub const SAMPLE: Duration = Duration::from_millis(10);

    /// etcd started (one member or three) until every member serves a
    /// linearizable read: a cold start, an election, fsyncs on a busy disk.
    pub const ETCD_READY: Duration = Duration::from_secs(60);

    /// One readiness read of an etcd member while it starts; a slower
    /// answer is just tried again, until [`ETCD_READY`].
    pub const ETCD_PING: Duration = Duration::from_secs(2);

    /// A stopped process's ports to be free again, before a restart on
    /// the same ports is tried again.
    pub const PORT_FREE: Duration = Duration::from_secs(10);

    /// A member cut off from its cluster until etcd cancels the watches
    /// that asked for a leader: it misses the leader after one election
    /// timeout (1 s at etcd's defaults), then cancels once three checks,
    /// one every election timeout, found none.
    pub const NO_LEADER: Duration = Duration::from_secs(5);

    /// Read and write timeouts of the test's own sockets (its HTTP
    /// backends, clients and control sockets): a peer that never answers
    /// fails the exchange instead of hanging the test.
    pub const IO: Duration = Duration::from_secs(5);

    /// A process that is expected to end by itself, and how long the test
    /// gives it before it fails (instead of hanging) on a process that
    /// does not.
    pub const HANG: Duration = Duration::from_secs(60);

    /// A process of the test's own (HAProxy) given SIGTERM, before it gets
    /// SIGKILL.
    pub const STOP: Duration = Duration::from_secs(10);

    /// HAProxy started until a worker serves, or reloaded until only new
    /// workers remain: a process start and a configuration parse on a busy
    /// machine.
    pub const HAPROXY: Duration = Duration::from_secs(30);

    /// nginx started until its worker serves, or signalled to reload until
    /// only workers on the new configuration remain: as [`HAPROXY`].
    pub const NGINX: Duration = Duration::from_secs(30);

    /// A change in etcd until `sidekick render` (without `wait`) has
    /// installed the new file and run its reload command: a watch event, a
    /// rendering, the check command (a proxy parsing its configuration, a
    /// process started on a busy machine) and the reload command.
    pub const RENDER_REACTS: Duration = Duration::from_secs(30);

    /// A cluster that lost its leader elects another: a few election
    /// timeouts (1 s each, etcd's default) on a loaded machine.
    pub const ELECTION: Duration = Duration::from_secs(20);

    /// Window of a negative check that an idle process does nothing (a
    /// `wait` that watches reads nothing): longer than any poll period it
    /// could have instead, and than the dial timeouts of these tests.
    pub const IDLE: Duration = Duration::from_secs(2);

    /// The longest the rollout tests' load generators run (each sends at
    /// least a thousand requests through HAProxy, one after the other).
    pub const LOAD: Duration = Duration::from_secs(120);

    /// Window of a negative check where the reaction that must not come
    /// would come at once (a `wait` ending on a change that does not
    /// satisfy it: one watch event, milliseconds): nothing in it means
    /// nothing happened.
    pub const QUIET: Duration = Duration::from_secs(1);

    /// etcd drops expired simple auth tokens once a second (etcd's
    /// `simpleTokenTTLResolution`, not a flag).
    pub const ETCD_TOKEN_SWEEP: Duration = Duration::from_secs(1);

    /// `sidekick wait`'s backoff between reads while etcd is away, at most
    /// (src/wait.rs, not a flag).
    pub const WAIT_BACKOFF_CAP: Duration = Duration::from_secs(2);

    /// `announce --wait-http` probes once a second (src/oneshot.rs, not a
    /// flag).
    pub const ANNOUNCE_PROBE_EVERY: Duration = Duration::from_secs(1);

    /// `sidekick render`'s backoff between reads while etcd is away, at
    /// most (the contract's figure, not a flag).
    pub const RENDER_READ_BACKOFF_CAP: Duration = Duration::from_secs(5);

    /// `sidekick render`'s backoff between tries of a failing reload
    /// command, at most (the contract's figure, not a flag).
    pub const RENDER_RELOAD_BACKOFF_CAP: Duration = Duration::from_secs(30);

    /// A render catching up with a burst of a few hundred changes, or with
    /// a megabyte of them held back, until its file shows the last one:
    /// no flag governs it, and each revision may be rendered and checked
    /// (a shell started) on its own, on two busy cores. Longer than
    /// [`SOON`], which is for one reaction.
    pub const CATCH_UP: Duration = Duration::from_secs(60);

    /// The duration a flag's value gives (`300ms`, `2s`), as the sidekick
    /// reads it.
    pub fn flag(value: &str) -> Duration {
        humantime::parse_duration(value).unwrap_or_else(|e| panic!("{value:?}: {e}"))
    }

    /// `sidekick wait` with `--dial-timeout dial` sees a change that
    /// satisfies it: at once through its watch, or at its next read when
    /// etcd was away (a backoff, then a read bounded by `dial`).
    pub fn wait_reacts(dial: Duration) -> Duration {
        WAIT_BACKOFF_CAP + dial + SLACK
    }

    /// Window of a negative check that a `sidekick wait` whose etcd is away
    /// keeps waiting: a read or two fail meanwhile (each bounded by `dial`).
    pub fn wait_retrying(dial: Duration) -> Duration {
        2 * dial
    }

    /// Long enough for an etcd simple token of `ttl` (`--auth-token-ttl`)
    /// to have expired: its TTL, and two of etcd's sweeps for expired
    /// tokens.
    pub fn token_expired(ttl: Duration) -> Duration {
        ttl + 2 * ETCD_TOKEN_SWEEP
    }

    /// The most a running sidekick's measured reaction may take when its
    /// flags give `figure`.
    pub fn within(figure: Duration) -> Duration {
        figure + LATE
    }

    /// The most a command started to be timed may take when its flags give
    /// `figure`.
    pub fn one_shot_within(figure: Duration) -> Duration {
        figure + ONE_SHOT_LATE
    }

    /// The least a measured time may come out when the flags make
    /// `figure` its minimum.
    pub fn at_least(figure: Duration) -> Duration {
        figure.saturating_sub(EARLY)
    }
}

/// What a `sidekick run` command line's flags make of its timing: the
/// figures of `sidekick explain` for the same flags (its arithmetic is
/// checked against docs/guarantees.md by a unit test), and the waits and windows
/// of the tests derived from them. Dereferences to the [`Explanation`].
#[derive(Debug, Clone)]
pub struct Figures(Explanation);

impl std::ops::Deref for Figures {
    type Target = Explanation;
    fn deref(&self) -> &Explanation {
        &self.0
    }
}

impl Figures {
    /// The figures of `args`, a `sidekick` argument list with `run` (global
    /// flags may come first), as [`Running::start`] takes it. Like the
    /// [`sidekick`] it starts, it reads no `SIDEKICK_*` variable.
    pub fn of<S: AsRef<str>>(args: &[S]) -> Figures {
        let argv = std::iter::once("sidekick").chain(args.iter().map(AsRef::as_ref));
        let hermetic = Cli::command().mut_subcommand("run", |run| run.mut_args(|a| a.env(None)));
        let cli = hermetic
            .try_get_matches_from(argv)
            .and_then(|m| Cli::from_arg_matches(&m))
            .unwrap_or_else(|e| panic!("not a valid command line: {e}"));
        let Sub::Run(run) = cli.command else {
            panic!("figures are for `run`")
        };
        let a = ExplainArgs {
            json: false,
            probe: run.probe,
            timing: run.timing,
            dial_timeout: run.etcd.dial_timeout,
        };
        Figures(Explanation::new(explain::inputs(&a).expect("flags `run` accepts")))
    }

    /// `--interval`.
    pub fn interval(&self) -> Duration {
        self.inputs.timing.interval
    }

    /// `--timeout` (zero without a probe).
    pub fn timeout(&self) -> Duration {
        self.inputs.probe_timeout.unwrap_or_default()
    }

    /// `--ttl`.
    pub fn ttl(&self) -> Duration {
        self.inputs.timing.ttl
    }

    /// `--drain`.
    pub fn drain(&self) -> Duration {
        self.inputs.timing.drain
    }

    // Waits: the figure plus SLACK.

    /// Started with a healthy instance → registered: (R − 1) × I + T.
    pub fn registration(&self) -> Duration {
        self.register_after_start + SLACK
    }

    /// Instance healthy again (or maintenance over) → registered again:
    /// R × I + T.
    pub fn reregistration(&self) -> Duration {
        self.register_after_recovery.unwrap_or_default() + SLACK
    }

    /// Instance failing (or in maintenance) → withdrawn: F × I + T.
    pub fn withdrawal(&self) -> Duration {
        self.withdraw_after_failure.unwrap_or_default() + SLACK
    }

    /// SIGTERM → withdrawn (before the drain): D.
    pub fn stop_withdrawal(&self) -> Duration {
        self.withdraw_after_sigterm + SLACK
    }

    /// SIGTERM → exited: D + drain.
    pub fn exit(&self) -> Duration {
        self.exit_after_sigterm + SLACK
    }

    /// SIGKILL, or etcd gone → the keys expired with the lease: L.
    pub fn expiry(&self) -> Duration {
        self.stale_after_sigkill + SLACK
    }

    /// etcd answers again → registered: I + min(D, L/3).
    pub fn etcd_back(&self) -> Duration {
        self.register_after_etcd_back + SLACK
    }

    /// `n` more probes started: n × I + T.
    pub fn probes(&self, n: u32) -> Duration {
        n * self.interval() + self.timeout() + SLACK
    }

    /// `n` more etcd calls that leave the keys out (failed calls, puts of
    /// a key held elsewhere), each bounded by min(D, L/3), the next one at
    /// most an interval later (the backoff's cap, the retry of a held key):
    /// n × (min(D, L/3) + I).
    pub fn etcd_attempts(&self, n: u32) -> Duration {
        n * (self.etcd_call_bound + self.interval()) + SLACK
    }

    // Windows: how long a scenario lets time pass, by the flags.

    /// `n` probe intervals: about `n` probes come in it.
    pub fn intervals(&self, n: u32) -> Duration {
        n * self.interval()
    }

    /// `n` keep-alive periods (L/3 each).
    pub fn keepalives(&self, n: u32) -> Duration {
        n * self.keepalive_every
    }

    /// 1.5 TTLs: longer than a TTL, so a lease nobody kept alive would
    /// have expired in it.
    pub fn past_ttl(&self) -> Duration {
        self.ttl() * 3 / 2
    }

    /// Three TTLs: nine keep-alives and 3L/I probes, in which a steady
    /// sidekick must write nothing and lose nothing.
    pub fn steady(&self) -> Duration {
        3 * self.ttl()
    }

    /// An outage of two TTLs and a dial timeout: the lease surely expires
    /// in it, and several keep-alives fail one after the other.
    pub fn long_outage(&self) -> Duration {
        2 * self.ttl() + self.inputs.dial_timeout
    }
}

/// A loopback port nobody listens on, never handed out twice in this run.
///
/// The port is free when this returns, not when its user binds it. It comes
/// from outside the kernel's ephemeral range (`ip_local_port_range`), so no
/// outgoing connection and no `bind(:0)` of another process is given it in
/// between; only another process picking the same port on purpose can take
/// it, which [`Etcd`] survives by starting again. A server of the test's own
/// binds port 0 and keeps its listener instead (see [`Backend::start`]).
pub fn free_port() -> u16 {
    static TAKEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let taken = TAKEN.get_or_init(Default::default);
    let (lo, hi) = spare_ports();
    for _ in 0..10_000 {
        let port = lo + (random() % u64::from(hi - lo)) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() && taken.lock().unwrap().insert(port) {
            return port;
        }
    }
    panic!("no free loopback port in {lo}..{hi}");
}

/// Ports the kernel never hands out by itself: below its ephemeral range,
/// or above it when there is no room below.
fn spare_ports() -> (u16, u16) {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut bounds = range.split_whitespace().filter_map(|p| p.parse::<u16>().ok());
    let (first, last) = (bounds.next().unwrap_or(32768), bounds.next().unwrap_or(60999));
    if first > 12_000 {
        (10_000, first)
    } else if last < 63_000 {
        (last + 1, u16::MAX)
    } else {
        panic!("the ephemeral range {first}-{last} leaves no spare ports for the tests");
    }
}

/// A random number, different at every call.
fn random() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    RandomState::new().hash_one(CALLS.fetch_add(1, Ordering::Relaxed))
}

/// Sends `sig` (e.g. "TERM", "KILL", "STOP") to a process we started.
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(ok.success(), "kill -{sig} {pid}");
}

/// Polls `cond` every [`POLL`] until it holds or `limit` passes; returns
/// whether it held.
pub async fn eventually<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// [`eventually`] for a test without a runtime: polls `cond` every
/// [`POLL`] until it holds or `limit` passes.
pub fn eventually_sync(limit: Duration, cond: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !cond() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
    true
}

/// Lets `window` pass, for a negative check only: what must not happen has
/// had that long to happen. Never use it to wait for something to happen;
/// wait for the event with [`eventually`] instead.
pub async fn let_pass(window: Duration) {
    tokio::time::sleep(window).await;
}

/// Lets `window` pass so that a scenario reaches a state no event shows
/// (a call tried again, silently, after its backoff). Only what the test
/// covers depends on it: its assertions hold whichever state was reached.
pub async fn advance(window: Duration) {
    tokio::time::sleep(window).await;
}

/// Checks `cond` every [`POLL`] for the whole of `window`, a negative check
/// that it never fails meanwhile; returns false at the first failure.
pub async fn throughout<F, Fut>(window: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + window;
    while Instant::now() < end {
        if !cond().await {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
    cond().await
}

/// One etcd member's ports and data dir.
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
    /// Where in its log the current run of the member starts.
    log_from: usize,
}

/// What etcd logs (and then exits) when a port it should listen on is taken.
const PORT_TAKEN: &str = "address already in use";
/// How many times a start is tried again after a port was taken.
const PORT_RETRIES: usize = 5;

/// A real etcd cluster (one or three members) on loopback, with its data in
/// a temp dir; every member is killed when it is dropped.
pub struct Etcd {
    members: Vec<Member>,
    dir: TempDir,
    token: String,
    /// `http` or `https` for the client URLs.
    scheme: &'static str,
    /// More etcd flags (TLS files, ...), given to every member.
    extra: Vec<String>,
    /// How the test's own clients connect (TLS material).
    options: Option<ConnectOptions>,
}

impl Etcd {
    /// One member.
    pub async fn start() -> Etcd {
        Self::cluster(1).await
    }

    /// `n` members on loopback.
    pub async fn cluster(n: usize) -> Etcd {
        Self::launch(n, "http", Vec::new(), None).await
    }

    /// One member serving clients over TLS: `extra` carries etcd's TLS
    /// flags, `options` the test's own client certificates.
    pub async fn start_tls(extra: Vec<String>, options: ConnectOptions) -> Etcd {
        Self::launch(1, "https", extra, Some(options)).await
    }

    /// One member with more etcd flags (`--auth-token-ttl=2`, say).
    pub async fn start_with(extra: &[&str]) -> Etcd {
        Self::launch(1, "http", extra.iter().map(|s| s.to_string()).collect(), None).await
    }

    /// The process id of member `i` (to freeze it with SIGSTOP, say).
    pub fn pid(&self, i: usize) -> u32 {
        self.members[i].child.as_ref().expect("member is running").id()
    }

    /// Starts `n` members on fresh ports, and all of them again on other
    /// fresh ports when one of theirs was taken before etcd bound it.
    async fn launch(n: usize, scheme: &'static str, extra: Vec<String>, options: Option<ConnectOptions>) -> Etcd {
        for attempt in 1..=PORT_RETRIES {
            let members = (0..n)
                .map(|i| Member {
                    name: format!("m{i}"),
                    client_port: free_port(),
                    peer_port: free_port(),
                    child: None,
                    log_from: 0,
                })
                .collect();
            let mut etcd = Etcd {
                members,
                dir: tempfile::tempdir().unwrap(),
                token: format!("t{:x}", random()),
                scheme,
                extra: extra.clone(),
                options: options.clone(),
            };
            for i in 0..n {
                etcd.spawn(i);
            }
            match etcd.started().await {
                Ok(()) => return etcd,
                // Dropping it stops the other members and removes the data.
                Err(log) => eprintln!("etcd start {attempt}: a port was taken, trying fresh ones:\n{log}"),
            }
        }
        panic!("etcd found a port taken {PORT_RETRIES} times in a row");
    }

    /// Starts member `i` again on its own ports, which the sidekick under
    /// test knows: a port taken by another process meanwhile is waited for.
    async fn start_again(&mut self, i: usize) {
        for attempt in 1..=PORT_RETRIES {
            self.spawn(i);
            match self.started().await {
                Ok(()) => return,
                Err(log) => {
                    eprintln!("etcd member {i} restart {attempt}: a port is taken:\n{log}");
                    let ports = [self.members[i].client_port, self.members[i].peer_port];
                    let free = || async { ports.iter().all(|&p| TcpListener::bind(("127.0.0.1", p)).is_ok()) };
                    eventually(PORT_FREE, free).await;
                }
            }
        }
        panic!("etcd member {i} found its ports taken {PORT_RETRIES} times in a row");
    }

    fn spawn(&mut self, i: usize) {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect();
        let m = &mut self.members[i];
        let data = self.dir.path().join(&m.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", m.name)))
            .unwrap();
        m.log_from = log.metadata().unwrap().len() as usize;
        let m = &self.members[i];
        let client = format!("{}://127.0.0.1:{}", self.scheme, m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let child = Command::new("etcd")
            .args(["--name", &m.name, "--data-dir"])
            .arg(&data)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args([
                "--initial-cluster",
                &initial.join(","),
                "--initial-cluster-token",
                &self.token,
            ])
            .args(["--initial-cluster-state", "new"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd starts (is etcd-server installed?)");
        self.members[i].child = Some(child);
    }

    /// Waits ([`ETCD_READY`] at most) until every running member serves a
    /// linearizable read. `Err` with the log of a member that exited because
    /// a port was taken; a member that exits for another reason fails the
    /// test.
    async fn started(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + ETCD_READY;
        let mut ready = vec![false; self.members.len()];
        loop {
            for (i, up) in ready.iter_mut().enumerate() {
                let Some(child) = self.members[i].child.as_mut() else {
                    *up = true;
                    continue;
                };
                if let Some(status) = child.try_wait().unwrap() {
                    self.members[i].child = None;
                    let log = self.log(i);
                    let log = log.get(self.members[i].log_from..).unwrap_or(&log).to_string();
                    if log.contains(PORT_TAKEN) {
                        return Err(log);
                    }
                    panic!("etcd member {i} exited ({status}):\n{log}");
                }
                if !*up {
                    *up = self.answers(i).await;
                }
            }
            if ready.iter().all(|&r| r) {
                return Ok(());
            }
            let late = ready.iter().position(|&r| !r).unwrap();
            assert!(
                Instant::now() < deadline,
                "etcd member {late} did not become ready:\n{}",
                self.log(late)
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Whether member `i` serves a linearizable read within [`ETCD_PING`].
    async fn answers(&self, i: usize) -> bool {
        let url = self.url(i);
        let attempt = async {
            let mut c = Client::connect([url.as_str()], self.options.clone()).await.ok()?;
            c.get("ready-check", None).await.ok()
        };
        matches!(tokio::time::timeout(ETCD_PING, attempt).await, Ok(Some(_)))
    }

    /// The client URL of member `i`.
    pub fn url(&self, i: usize) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.members[i].client_port)
    }

    /// Every client URL, comma-separated, for `--endpoints`.
    pub fn endpoints(&self) -> String {
        (0..self.members.len())
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The log of member `i`.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("m{i}.log"))).unwrap_or_default()
    }

    /// Kills member `i` (SIGKILL) and waits for it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops member `i` with SIGTERM and waits for it.
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            signal(c.id(), "TERM");
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on the same ports and data dir.
    pub async fn restart(&mut self, i: usize) {
        self.stop(i);
        self.start_again(i).await;
    }

    /// Starts a stopped single member again with an empty data dir: etcd
    /// has forgotten every key and lease.
    pub async fn wipe_and_start(&mut self) {
        assert_eq!(self.members.len(), 1, "wipe is for a single member");
        self.stop(0);
        std::fs::remove_dir_all(self.dir.path().join(&self.members[0].name)).unwrap();
        self.start_again(0).await;
    }

    /// A client of member `i`.
    pub async fn client(&self, i: usize) -> Client {
        Client::connect([self.url(i)], self.options.clone()).await.unwrap()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// Reads `key`, or `None` when it does not exist.
pub async fn get(c: &mut Client, key: &str) -> Option<KeyValue> {
    c.get(key, None).await.unwrap().kvs().first().cloned()
}

/// The value of `key` as text.
pub async fn value(c: &mut Client, key: &str) -> Option<String> {
    get(c, key).await.map(|kv| kv.value_str().unwrap().to_string())
}

/// The store's current revision.
pub async fn revision(c: &mut Client) -> i64 {
    c.get("revision-probe", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision()
}

/// Waits until `key` has `want` (`None`: absent); returns whether it did.
pub async fn key_becomes(c: &Client, key: &str, want: Option<&str>, limit: Duration) -> bool {
    eventually(limit, || {
        let mut c = c.clone();
        async move {
            match c.get(key, None).await {
                Ok(r) => r.kvs().first().map(|kv| kv.value_str().unwrap().to_string()).as_deref() == want,
                Err(_) => false,
            }
        }
    })
    .await
}

/// An HTTP backend on loopback whose health the test switches.
pub struct Backend {
    /// Where it listens.
    pub addr: SocketAddr,
    healthy: Arc<AtomicBool>,
    fail_next: Arc<AtomicU32>,
    hits: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Backend {
    /// Starts a healthy backend on a free port.
    pub fn start() -> Backend {
        Self::answering("ok\n")
    }

    /// Starts a healthy backend on a free port whose 200 answers carry
    /// `body` (its identity, say).
    pub fn answering(body: &str) -> Backend {
        let body = body.to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let b = Backend {
            addr,
            healthy: Arc::new(AtomicBool::new(true)),
            fail_next: Arc::new(AtomicU32::new(0)),
            hits: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (healthy, fail_next, hits, stop) = (b.healthy.clone(), b.fail_next.clone(), b.hits.clone(), b.stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(mut conn) = conn else { continue };
                hits.fetch_add(1, Ordering::SeqCst);
                let failing = fail_next
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                let ok = healthy.load(Ordering::SeqCst) && !failing;
                let body = body.clone();
                std::thread::spawn(move || answer_http(&mut conn, ok, &body));
            }
        });
        b
    }

    /// `http://ADDR/health`.
    pub fn url(&self) -> String {
        format!("http://{}/health", self.addr)
    }

    /// Switches health.
    pub fn set_healthy(&self, ok: bool) {
        self.healthy.store(ok, Ordering::SeqCst);
    }

    /// Makes the next `n` requests fail.
    pub fn fail_next(&self, n: u32) {
        self.fail_next.store(n, Ordering::SeqCst);
    }

    /// Requests served so far.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }
}

/// Reads one request head from `conn` and answers 200 with `body`, or 503
/// when not `ok`, then closes.
pub fn answer_http(conn: &mut TcpStream, ok: bool, body: &str) {
    conn.set_read_timeout(Some(IO)).ok();
    let mut buf = [0u8; 4096];
    let mut seen = Vec::new();
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") && seen.len() < 16 * 1024 {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
    let (status, body) = if ok {
        ("200 OK", body)
    } else {
        ("503 Service Unavailable", "down\n")
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = conn.write_all(resp.as_bytes());
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so its thread ends.
        let _ = TcpStream::connect(self.addr);
    }
}

/// `run KEY VALUE` probing `url` with the short timings an operator tries
/// first: 200ms interval, 100ms timeout, 2s TTL, 1s dial timeout.
pub fn fast_run<'a>(
    key: &'a str,
    value: &'a str,
    url: &'a str,
    etcd: &'a str,
    rise: &'a str,
    fall: &'a str,
) -> Vec<&'a str> {
    vec![
        "run",
        key,
        value,
        "--http",
        url,
        "--interval",
        "200ms",
        "--timeout",
        "100ms",
        "--ttl",
        "2s",
        "--rise",
        rise,
        "--fall",
        fall,
        "--dial-timeout",
        "1s",
        "--endpoints",
        etcd,
    ]
}

/// `run KEY VALUE` without a probe (announced unconditionally while it
/// runs), with a 2s TTL and a 1s dial timeout.
pub fn plain_run<'a>(key: &'a str, value: &'a str, etcd: &'a str) -> Vec<&'a str> {
    vec![
        "run",
        key,
        value,
        "--ttl",
        "2s",
        "--dial-timeout",
        "1s",
        "--endpoints",
        etcd,
    ]
}

/// Changes to a `sidekick` argument list, so that a test states only what
/// differs from [`fast_run`] or [`plain_run`].
pub trait Flags<'a> {
    /// `flag value`: replaces the value when `flag` is there already,
    /// appends both otherwise.
    fn with(self, flag: &'a str, value: &'a str) -> Self;
    /// More arguments, appended as they are (flags given more than once,
    /// such as `--extra`).
    fn and(self, more: &[&'a str]) -> Self;
}

impl<'a> Flags<'a> for Vec<&'a str> {
    fn with(mut self, flag: &'a str, value: &'a str) -> Self {
        match self.iter().position(|a| *a == flag) {
            Some(i) if i + 1 < self.len() => self[i + 1] = value,
            _ => self.extend([flag, value]),
        }
        self
    }

    fn and(mut self, more: &[&'a str]) -> Self {
        self.extend_from_slice(more);
        self
    }
}

/// Starts `sidekick ARGS` and waits (its [`Figures::registration`] at
/// most) until the KEY after `run` holds its VALUE in `etcd` (read through
/// member 0).
pub async fn start_registered(etcd: &Etcd, args: &[&str]) -> (Running, Client) {
    let at = args.iter().position(|a| *a == "run").expect("a `run` command");
    let (key, value) = (args[at + 1], args[at + 2]);
    let sk = Running::start(args);
    let c = etcd.client(0).await;
    assert!(
        key_becomes(&c, key, Some(value), sk.figures().registration()).await,
        "{key} never held {value}:\n{}",
        sk.log()
    );
    (sk, c)
}

/// A real etcd, a healthy backend, and `sidekick run KEY VALUE` with the
/// short timings of [`fast_run`], waited on until it has registered.
pub async fn registered(key: &str, value: &str, rise: &str, fall: &str) -> (Etcd, Backend, Running, Client) {
    registered_with(key, value, rise, fall, |args| args).await
}

/// [`registered`], with the arguments changed by `edit` first (see
/// [`Flags`]).
pub async fn registered_with(
    key: &str,
    value: &str,
    rise: &str,
    fall: &str,
    edit: impl for<'b> FnOnce(Vec<&'b str>) -> Vec<&'b str>,
) -> (Etcd, Backend, Running, Client) {
    let etcd = Etcd::start().await;
    let backend = Backend::start();
    let (url, eps) = (backend.url(), etcd.endpoints());
    let (sk, c) = start_registered(&etcd, &edit(fast_run(key, value, &url, &eps, rise, fall))).await;
    (etcd, backend, sk, c)
}

/// A `sidekick` command with a clean environment: no inherited SIDEKICK_*
/// or ETCDCTL_* variable, and an env file that does not exist, so discovery
/// never falls through to the machine's default gateway.
pub fn sidekick(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sidekick"));
    for (k, _) in std::env::vars() {
        if k.starts_with("SIDEKICK_") || k.starts_with("ETCDCTL_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd.env("SIDEKICK_ENV_FILE", "/nonexistent/etcd.environment");
    cmd.args(args);
    cmd
}

/// Runs a one-shot command with a deadline; kills it and fails when it hangs.
pub async fn output_within(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "no exit within {limit:?}: stdout {:?} stderr {:?}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // Waits on the exit, sampled; bounded by `limit`.
        tokio::time::sleep(SAMPLE).await;
    }
    child.wait_with_output().unwrap()
}

/// Stops a child we started: SIGTERM, its exit awaited (sampled, bounded
/// by [`STOP`]), SIGKILL if it is still there, then reaped.
pub fn stop_child(c: &mut Child) {
    if c.try_wait().ok().flatten().is_none() {
        signal(c.id(), "TERM");
        let deadline = Instant::now() + STOP;
        while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(SAMPLE);
        }
        let _ = c.kill();
    }
    let _ = c.wait();
}

/// A system program the tests run for real (`haproxy`, `nginx`), from
/// PATH or the sbin directories, or a failure saying how to get it and
/// `why` this test needs it.
pub fn system_bin(name: &str, why: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into(), "/usr/local/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{name} is not installed, and {why}: apt-get install {name} (scripts/prereqs.sh installs it when run as root)")
        })
}

/// Resumes a frozen etcd member when the test ends, however it ends, so the
/// harness can stop it.
pub struct Frozen(u32);

impl Frozen {
    /// SIGSTOP to `pid`, SIGCONT when dropped.
    pub fn freeze(pid: u32) -> Frozen {
        signal(pid, "STOP");
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        signal(self.0, "CONT");
    }
}

/// A running `sidekick`, its stderr captured to a file.
pub struct Running {
    child: Option<Child>,
    log: PathBuf,
    /// Its arguments, for [`Running::figures`].
    args: Vec<String>,
    _dir: TempDir,
}

impl Running {
    /// Starts `sidekick ARGS` with `RUST_LOG=debug`.
    pub fn start(args: &[&str]) -> Running {
        Self::start_with_env(args, &[])
    }

    /// Starts `sidekick ARGS` with `RUST_LOG=debug` and more variables.
    pub fn start_with_env(args: &[&str], vars: &[(&str, &str)]) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("sidekick.log");
        let child = sidekick(args)
            .envs(vars.iter().copied())
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Running {
            child: Some(child),
            log,
            args: args.iter().map(|a| a.to_string()).collect(),
            _dir: dir,
        }
    }

    /// The timing figures of its flags (a `run` only).
    pub fn figures(&self) -> Figures {
        Figures::of(&self.args)
    }

    /// Its PID.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends a signal.
    pub fn signal(&self, sig: &str) {
        signal(self.pid(), sig);
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    /// Waits up to `limit` for it to exit (checked every [`SAMPLE`], so
    /// that the exit can be timed).
    pub async fn exit_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(SAMPLE).await;
        }
    }

    /// A negative check: lets `window` pass and says whether it is still
    /// running at the end of it (an exit meanwhile ends the check early).
    pub async fn stays_running(&mut self, window: Duration) -> bool {
        self.exit_within(window).await.is_none()
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many lines of its log contain `pat`.
    pub fn log_count(&self, pat: &str) -> usize {
        self.log().lines().filter(|l| l.contains(pat)).count()
    }

    /// Waits up to `limit` until at least `n` lines of its log contain
    /// `pat`; returns whether they did.
    pub async fn logs_n(&self, pat: &str, n: usize, limit: Duration) -> bool {
        eventually(limit, || async { self.log_count(pat) >= n }).await
    }

    /// Waits up to `limit` until its log contains `pat`.
    pub async fn logs(&self, pat: &str, limit: Duration) -> bool {
        eventually(limit, || async { self.log().contains(pat) }).await
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Bounds of the tests that put a real Traefik in front of the sidekicks
/// (tests/it/traefik.rs). Each is a wait that only a failing test waits
/// out, so each leaves room for a loaded 2-core machine.
pub mod proxy {
    use std::time::Duration;

    /// Traefik started until it answers its ping: a 180 MB binary loaded
    /// from disk and started on two busy cores.
    pub const START: Duration = Duration::from_secs(30);

    /// A change in etcd until Traefik serves it: its etcd provider applies
    /// changes at most every `providers.providersThrottleDuration` (2 s, as
    /// in the recipe), plus a rebuild of its routing on a busy machine.
    pub const SYNC: Duration = Duration::from_secs(20);

    /// A sidekick started until its keys are in etcd, or stopped (SIGTERM)
    /// until they are gone, or killed (SIGKILL) until its lease (2 s TTL in
    /// the recipes' tests) has expired: process start, fsyncs, scheduling.
    pub const KEYS: Duration = Duration::from_secs(15);

    /// A sidekick given SIGTERM until it has exited.
    pub const EXIT: Duration = Duration::from_secs(15);

    /// Requests sent to see every registered instance answer, at most.
    pub const ROUND: usize = 200;

    /// Bounds of a client sending requests without pause: it stops by
    /// itself after this long or this many requests, whichever is first.
    pub const LOAD_TIME: Duration = Duration::from_secs(300);
    pub const LOAD_REQUESTS: usize = 2_000_000;
}

/// One HTTP/1.0 GET to `127.0.0.1:port` with `Host: host`, as a client of
/// a load balancer sends it: the status code and the body, or what went
/// wrong.
pub fn http_get(port: u16, host: &str, path: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(bounds::IO)).unwrap();
    s.set_write_timeout(Some(bounds::IO)).unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no header end: {text:?}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status: {head:?}"))?;
    Ok((code, body.to_string()))
}
