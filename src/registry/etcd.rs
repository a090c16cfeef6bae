//! [`Etcd`] over gRPC: one client at a time, rotating over the endpoints
//! when one stops answering, one keep-alive stream kept open per lease we
//! keep alive, and one watch stream.

use std::time::Duration;

use std::collections::HashMap;

use etcd_client::{
    Certificate, Client, CompareOp, ConnectOptions, DeleteOptions, Error, EventType, GetOptions, Identity,
    LeaseGrantOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, TlsOptions, TxnOp, TxnOpResponse,
    WatchFilterType, WatchOptions, WatchStream,
};
use tracing::debug;

use super::{
    ErrorKind, Etcd, Event, Granted, KeyValue, LeaseId, Op, OpResult, Range, RegistryError, Status, Target, TxnResult,
};
use crate::config::EtcdSettings;

/// The shortest time between HTTP/2 pings: twice etcd's default
/// `--grpc-keepalive-min-time`.
const KEEPALIVE_AT_LEAST: Duration = Duration::from_secs(10);

/// How often the connection pings etcd while nothing else arrives: the
/// dial timeout, never closer than [`KEEPALIVE_AT_LEAST`]. A ping
/// unanswered for the dial timeout gives the connection up, so a watch on a
/// member that went unreachable or froze moves to another within this plus
/// the dial timeout.
pub fn keepalive_interval(dial: Duration) -> Duration {
    dial.max(KEEPALIVE_AT_LEAST)
}

/// Builds the connection options, reading the TLS files now so that a
/// missing or unreadable file is a usage error before anything is written.
pub fn connect_options(settings: &EtcdSettings) -> Result<ConnectOptions, String> {
    let dial = settings.dial_timeout;
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(dial)
        // HTTP/2 pings find a frozen or vanished etcd on an idle connection
        // (a watch that hears nothing). etcd answers pings sent more often
        // than its --grpc-keepalive-min-time (5 s by default) with a GOAWAY
        // that breaks the watch: never closer than twice that.
        .with_keep_alive(keepalive_interval(dial), dial)
        .with_keep_alive_while_idle(true);
    if let Some((user, pass)) = &settings.auth {
        // etcd's simple tokens expire (--auth-token-ttl, 5 minutes by
        // default); without a refresh the first call after a quiet spell
        // (the withdrawal, typically) would fail once.
        opts = opts.with_user(user.clone(), pass.clone()).with_auto_token_refresh(true);
    }
    let https = settings.discovery.endpoints.iter().any(|e| e.starts_with("https://"));
    let cacert = settings.tls.as_ref().and_then(|t| t.cacert.as_ref());
    if settings.tls.is_some() || https {
        let read = |flag: &str, path: &str| std::fs::read(path).map_err(|e| format!("{flag}: cannot read {path}: {e}"));
        let mut t = TlsOptions::new();
        match cacert {
            Some(ca) => t = t.ca_certificate(Certificate::from_pem(read("--cacert", ca)?)),
            // As etcdctl: without --cacert, the system's trust roots.
            None => t = t.with_native_roots(),
        }
        if let Some((cert, key)) = settings.tls.as_ref().and_then(|t| t.identity.as_ref()) {
            t = t.identity(Identity::from_pem(read("--cert", cert)?, read("--key", key)?));
        }
        opts = opts.with_tls(t);
    }
    Ok(opts)
}

/// Turns an etcd-client error into a short cause: the gRPC code and message,
/// or the transport error with its sources, never a debug dump.
fn cause(err: &Error) -> String {
    use std::error::Error as _;
    let (mut text, mut source) = match err {
        Error::GRpcStatus(s) => {
            let msg = s.message().trim_start_matches("etcdserver: ");
            let text = if msg.is_empty() {
                s.code().description().to_string()
            } else {
                format!("{msg} ({})", s.code().description().to_lowercase())
            };
            (text, s.source())
        }
        other => (other.to_string(), other.source()),
    };
    // The innermost causes say what really happened: connection refused,
    // certificate unknown, ...
    while let Some(s) = source {
        let t = s.to_string();
        if !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        source = s.source();
    }
    text
}

/// What etcd's answer means for the caller.
fn kind(err: &Error) -> ErrorKind {
    let msg = match err {
        Error::GRpcStatus(s) => {
            use tonic::Code;
            match s.code() {
                Code::PermissionDenied | Code::Unauthenticated => return ErrorKind::Denied,
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
                    if !s.message().contains("etcdserver: ") && !s.message().contains("mvcc: ") =>
                {
                    return ErrorKind::Unavailable
                }
                _ => s.message().to_string(),
            }
        }
        Error::LeaseKeepAliveError(m) => m.clone(),
        Error::TransportError(_) | Error::IoError(_) => return ErrorKind::Unavailable,
        other => other.to_string(),
    };
    classify(&msg)
}

/// The kind of an etcd error message.
fn classify(msg: &str) -> ErrorKind {
    let table = [
        ("requested lease not found", ErrorKind::LeaseNotFound),
        ("lease not found", ErrorKind::LeaseNotFound),
        ("lease already exists", ErrorKind::LeaseExists),
        ("too many operations in txn request", ErrorKind::TooManyOps),
        ("duplicate key given in txn request", ErrorKind::DuplicateKey),
        ("required revision has been compacted", ErrorKind::Compacted),
        ("required revision is a future revision", ErrorKind::FutureRevision),
        ("permission denied", ErrorKind::Denied),
        ("invalid auth token", ErrorKind::Denied),
        ("authentication failed", ErrorKind::Denied),
        ("user name not found", ErrorKind::Denied),
        ("no leader", ErrorKind::Unavailable),
        ("leader changed", ErrorKind::Unavailable),
        ("timed out", ErrorKind::Unavailable),
        ("too many requests", ErrorKind::Unavailable),
    ];
    table
        .iter()
        .find(|(text, _)| msg.contains(text))
        .map_or(ErrorKind::Other, |(_, k)| *k)
}

/// etcd v3 over gRPC.
pub struct EtcdRegistry {
    endpoints: Vec<String>,
    current: usize,
    options: ConnectOptions,
    timeout: Duration,
    client: Option<Client>,
    keepers: HashMap<i64, (LeaseKeeper, LeaseKeepAliveStream)>,
    /// The open watch, with the endpoint it was opened on.
    watch: Option<(WatchStream, String)>,
    /// Each request tries every endpoint once within `timeout` in all,
    /// rather than one endpoint within `timeout`.
    one_shot: bool,
}

impl std::fmt::Debug for EtcdRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdRegistry")
            .field("endpoints", &self.endpoints)
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

impl EtcdRegistry {
    /// A registry over `endpoints`; nothing is contacted until the first
    /// operation. Each operation is bounded by `timeout`.
    pub fn new(endpoints: Vec<String>, options: ConnectOptions, timeout: Duration) -> Self {
        assert!(!endpoints.is_empty(), "at least one endpoint");
        EtcdRegistry {
            endpoints,
            current: 0,
            options,
            timeout,
            client: None,
            keepers: HashMap::new(),
            watch: None,
            one_shot: false,
        }
    }

    /// A registry for a command that makes a few requests and exits
    /// (`announce`, `withdraw`, `list`, `discover --check`, `wait`): each
    /// request tries the endpoints in turn until one answers or `limit`
    /// (the dial timeout) has passed in all, so an unreachable etcd costs
    /// a request at most `limit`, however many endpoints there are.
    pub fn one_shot(endpoints: Vec<String>, options: ConnectOptions, limit: Duration) -> Self {
        EtcdRegistry {
            one_shot: true,
            ..Self::new(endpoints, options, limit)
        }
    }

    fn fail(&mut self, op: &'static str, cause: String, kind: ErrorKind) -> RegistryError {
        let endpoint = self.endpoints[self.current].clone();
        // etcd answered, and said no: the connection is fine.
        let answered = !matches!(kind, ErrorKind::Unavailable | ErrorKind::Denied | ErrorKind::Other);
        if !answered {
            // Drop the connection and move on: the next attempt goes to the
            // next endpoint, so a dead member costs one attempt, not all.
            self.client = None;
            self.keepers.clear();
            if self.endpoints.len() > 1 {
                self.current = (self.current + 1) % self.endpoints.len();
                debug!(from = %endpoint, to = %self.endpoints[self.current], "switching etcd endpoint");
            }
        }
        let cause = scheme_hint(&endpoint, cause, kind);
        RegistryError {
            op,
            endpoint,
            cause,
            kind,
        }
    }

    /// Runs `f` on a connected client within the time limit; in one-shot
    /// mode, on each endpoint in turn until one answers or the limit has
    /// passed in all.
    async fn call<T, F>(&mut self, op: &'static str, f: F) -> Result<T, RegistryError>
    where
        F: AsyncFn(&mut Client) -> Result<T, Error>,
    {
        if !self.one_shot {
            return self.call_within(op, self.timeout, f).await;
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut tries = self.endpoints.len();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.call_within(op, left, async |c| f(c).await).await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    tries -= 1;
                    if tries == 0 || tokio::time::Instant::now() >= deadline || e.kind != ErrorKind::Unavailable {
                        return Err(e);
                    }
                }
            }
        }
    }

    async fn call_within<T, F>(&mut self, op: &'static str, timeout: Duration, f: F) -> Result<T, RegistryError>
    where
        F: AsyncFnOnce(&mut Client) -> Result<T, Error>,
    {
        let endpoint = self.endpoints[self.current].clone();
        let attempt = async {
            if self.client.is_none() {
                let c = Client::connect([endpoint.as_str()], Some(self.options.clone())).await?;
                self.client = Some(c);
            }
            let client = self.client.as_mut().expect("connected above");
            f(client).await
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.fail(op, cause(&e), kind(&e))),
            Err(_) => Err(self.fail(
                op,
                format!("no answer within {}", humantime::format_duration(timeout)),
                ErrorKind::Unavailable,
            )),
        }
    }
}

/// A transport failure that a scheme not matching the server explains
/// (`https://` to a plain etcd, `http://` to a TLS one) says so.
fn scheme_hint(endpoint: &str, cause: String, kind: ErrorKind) -> String {
    if !matches!(kind, ErrorKind::Unavailable | ErrorKind::Other) {
        return cause;
    }
    let lower = cause.to_lowercase();
    let tls_to_plain = [
        "handshake eof",
        "connection reset by peer",
        "corrupt message",
        "invalidcontenttype",
        "tls handshake",
    ];
    // A TLS server answers a plain HTTP/2 preface with an HTTP/1.0 400 and
    // closes: the client sees one of these, depending on timing.
    let plain_to_tls = [
        "frame with invalid size",
        "invalid http version",
        "h2 protocol error",
        "connection reset by peer",
        "broken pipe",
        "connection closed",
    ];
    if endpoint.starts_with("https://") && tls_to_plain.iter().any(|p| lower.contains(p)) {
        format!("{cause}; the endpoint does not seem to speak TLS: for a plain-HTTP etcd use http://")
    } else if endpoint.starts_with("http://") && plain_to_tls.iter().any(|p| lower.contains(p)) {
        format!("{cause}; the endpoint may speak TLS: then use https:// (with --cacert as needed)")
    } else {
        cause
    }
}

fn range_key(range: &Range) -> &str {
    match range {
        Range::Key(k) | Range::Prefix(k) | Range::Span { start: k, .. } => k,
    }
}

fn to_txn(txn: super::Txn) -> etcd_client::Txn {
    use etcd_client::Compare as C;
    let compares: Vec<C> = txn
        .when
        .into_iter()
        .map(|c| match c.target {
            Target::Version(v) => C::version(c.key, CompareOp::Equal, v),
            Target::CreateRevision(r) => C::create_revision(c.key, CompareOp::Equal, r),
            Target::ModRevision(r) => C::mod_revision(c.key, CompareOp::Equal, r),
            Target::Lease(l) => C::lease(c.key, CompareOp::Equal, l),
            Target::Value(v) => C::value(c.key, CompareOp::Equal, v),
        })
        .collect();
    let ops = |ops: Vec<Op>| -> Vec<TxnOp> { ops.into_iter().map(to_op).collect() };
    etcd_client::Txn::new()
        .when(compares)
        .and_then(ops(txn.then))
        .or_else(ops(txn.otherwise))
}

fn to_op(op: Op) -> TxnOp {
    match op {
        Op::Put { key, value, lease } => {
            let opts = (lease != 0).then(|| PutOptions::new().with_lease(lease));
            TxnOp::put(key, value, opts)
        }
        Op::Delete(range) => {
            let opts = match &range {
                Range::Key(_) => None,
                Range::Prefix(_) => Some(DeleteOptions::new().with_prefix()),
                Range::Span { end, .. } => Some(DeleteOptions::new().with_range(end.clone())),
            };
            TxnOp::delete(range_key(&range), opts)
        }
        Op::Get {
            range,
            revision,
            count_only,
        } => {
            let mut opts = GetOptions::new().with_revision(revision);
            match &range {
                Range::Key(_) => {}
                Range::Prefix(_) => opts = opts.with_prefix(),
                Range::Span { end, .. } => opts = opts.with_range(end.clone()),
            }
            if count_only {
                opts = opts.with_count_only();
            }
            TxnOp::get(range_key(&range), Some(opts))
        }
        Op::Txn(t) => TxnOp::txn(to_txn(t)),
    }
}

fn from_kv(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: String::from_utf8_lossy(kv.value()).into_owned(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
        lease: kv.lease(),
    }
}

fn from_txn(resp: &etcd_client::TxnResponse, revision: i64) -> TxnResult {
    let results = resp
        .op_responses()
        .iter()
        .map(|r| match r {
            TxnOpResponse::Put(_) => OpResult::Put,
            TxnOpResponse::Delete(d) => OpResult::Delete(d.deleted()),
            TxnOpResponse::Get(g) => OpResult::Get {
                kvs: g.kvs().iter().map(from_kv).collect(),
                count: g.count(),
            },
            TxnOpResponse::Txn(t) => OpResult::Txn(from_txn(t, revision)),
        })
        .collect();
    TxnResult {
        succeeded: resp.succeeded(),
        revision,
        results,
    }
}

impl Etcd for EtcdRegistry {
    async fn grant(&mut self, ttl: Duration, id: Option<LeaseId>) -> Result<Granted, RegistryError> {
        let secs = ttl.as_secs() as i64;
        let opts = id.map(|id| LeaseGrantOptions::new().with_id(id.0));
        let r = self
            .call("grant a lease", async |c| c.lease_grant(secs, opts.clone()).await)
            .await?;
        Ok(Granted {
            id: LeaseId(r.id()),
            ttl: Duration::from_secs(r.ttl().max(0) as u64),
        })
    }

    async fn keep_alive(&mut self, lease: LeaseId) -> Result<Option<Duration>, RegistryError> {
        const OP: &str = "keep the lease alive";
        if !self.keepers.contains_key(&lease.0) {
            // Opening the stream sends the first keep-alive and waits for
            // its answer (a lease etcd no longer has is reported here), but
            // keeps the TTL to itself: the round below asks again.
            match self.call(OP, async |c| c.lease_keep_alive(lease.0).await).await {
                Ok(pair) => {
                    self.keepers.insert(lease.0, pair);
                }
                Err(e) if e.kind == ErrorKind::LeaseNotFound => return Ok(None),
                Err(e) => return Err(e),
            }
        }
        let (keeper, stream) = self.keepers.get_mut(&lease.0).expect("checked above");
        let round = async {
            keeper.keep_alive().await?;
            stream.message().await
        };
        match tokio::time::timeout(self.timeout, round).await {
            Ok(Ok(Some(resp))) if resp.ttl() > 0 => Ok(Some(Duration::from_secs(resp.ttl() as u64))),
            Ok(Ok(Some(_))) => {
                self.keepers.remove(&lease.0);
                Ok(None)
            }
            Ok(Ok(None)) => Err(self.fail(OP, "etcd closed the keep-alive stream".into(), ErrorKind::Unavailable)),
            Ok(Err(e)) => Err(self.fail(OP, cause(&e), ErrorKind::Unavailable)),
            Err(_) => Err(self.fail(
                OP,
                format!("no answer within {}", humantime::format_duration(self.timeout)),
                ErrorKind::Unavailable,
            )),
        }
    }

    async fn revoke(&mut self, lease: LeaseId) -> Result<bool, RegistryError> {
        self.keepers.remove(&lease.0);
        match self
            .call("revoke the lease", async |c| c.lease_revoke(lease.0).await)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.kind == ErrorKind::LeaseNotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn time_to_live(&mut self, lease: LeaseId) -> Result<Option<Duration>, RegistryError> {
        let r = self
            .call("read a lease", async |c| c.lease_time_to_live(lease.0, None).await)
            .await?;
        // etcd answers -1 for a lease it does not have.
        Ok((r.ttl() >= 0).then(|| Duration::from_secs(r.ttl() as u64)))
    }

    async fn txn(&mut self, txn: super::Txn) -> Result<TxnResult, RegistryError> {
        let txn = to_txn(txn);
        let resp = self
            .call("run a transaction", async |c| c.txn(txn.clone()).await)
            .await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        Ok(from_txn(&resp, revision))
    }

    async fn watch(&mut self, ranges: &[Range], from: i64, deletes_only: bool) -> Result<(), RegistryError> {
        self.watch = None;
        let Some((first, rest)) = ranges.split_first() else {
            return Ok(());
        };
        let options = |r: &Range| {
            let mut o = WatchOptions::new().with_start_revision(from);
            match r {
                Range::Key(_) => {}
                Range::Prefix(_) => o = o.with_prefix(),
                Range::Span { end, .. } => o = o.with_range(end.clone()),
            }
            if deletes_only {
                o = o.with_filters([WatchFilterType::NoPut]);
            }
            o
        };
        let stream = self
            .call("watch the keys", async |c| {
                let mut stream = c.watch(range_key(first), Some(options(first))).await?;
                for r in rest {
                    stream.watch(range_key(r), Some(options(r))).await?;
                }
                Ok(stream)
            })
            .await?;
        self.watch = Some((stream, self.endpoint().to_string()));
        Ok(())
    }

    async fn watched(&mut self) -> Result<Vec<Event>, RegistryError> {
        let Some((stream, endpoint)) = self.watch.as_mut() else {
            return std::future::pending().await;
        };
        let broke = |cause: String, kind: ErrorKind, endpoint: &str| RegistryError {
            op: "watch the keys",
            endpoint: endpoint.to_string(),
            cause,
            kind,
        };
        loop {
            let resp = match stream.message().await {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    let e = broke("etcd closed the watch".into(), ErrorKind::Unavailable, endpoint);
                    self.watch = None;
                    return Err(e);
                }
                Err(err) => {
                    let e = broke(cause(&err), kind(&err), endpoint);
                    self.watch = None;
                    return Err(e);
                }
            };
            if resp.canceled() {
                let reason = resp.cancel_reason().trim_start_matches("etcdserver: ").to_string();
                let k = if resp.compact_revision() > 0 {
                    ErrorKind::Compacted
                } else {
                    classify(&reason)
                };
                let e = broke(format!("etcd cancelled the watch: {reason}"), k, endpoint);
                self.watch = None;
                return Err(e);
            }
            let events: Vec<Event> = resp
                .events()
                .iter()
                .filter_map(|e| {
                    e.kv().map(|kv| Event {
                        put: e.event_type() == EventType::Put,
                        kv: from_kv(kv),
                    })
                })
                .collect();
            if !events.is_empty() {
                return Ok(events);
            }
        }
    }

    async fn status(&mut self) -> Result<Status, RegistryError> {
        let r = self.call("read etcd's status", async |c| c.status().await).await?;
        Ok(Status {
            version: r.version().to_string(),
        })
    }

    fn unwatch(&mut self) {
        self.watch = None;
    }

    fn forget(&mut self, lease: LeaseId) {
        self.keepers.remove(&lease.0);
    }

    fn endpoint(&self) -> &str {
        &self.endpoints[self.current]
    }
}
