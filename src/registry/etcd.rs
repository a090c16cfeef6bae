//! The etcd v3 registry: one client at a time, rotating over the endpoints
//! when one stops answering, and one keep-alive stream kept open per lease.

use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, Error, EventType, Identity, LeaseKeepAliveStream,
    LeaseKeeper, PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchFilterType, WatchOptions, WatchStream,
};
use tracing::{debug, info};

use super::{HeldElsewhere, LeaseId, Registry, RegistryError, SharedPresent};
use crate::config::EtcdSettings;

/// Builds the connection options, reading the TLS files now so that a
/// missing or unreadable file is a usage error before anything is written.
pub fn connect_options(settings: &EtcdSettings) -> Result<ConnectOptions, String> {
    let dial = settings.dial_timeout;
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(dial)
        // HTTP/2 pings find a frozen or vanished etcd on an idle connection.
        .with_keep_alive(dial.max(Duration::from_secs(1)), dial)
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

fn is_lease_not_found(err: &Error) -> bool {
    match err {
        Error::GRpcStatus(s) => s.message().contains("requested lease not found"),
        Error::LeaseKeepAliveError(m) => m.contains("lease not found"),
        _ => false,
    }
}

/// etcd v3 over gRPC.
pub struct EtcdRegistry {
    endpoints: Vec<String>,
    current: usize,
    options: ConnectOptions,
    timeout: Duration,
    client: Option<Client>,
    keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
    /// The watch on the shared keys, with the endpoint it was opened on.
    watch: Option<(WatchStream, String)>,
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
            keeper: None,
            watch: None,
        }
    }

    fn fail(&mut self, op: &'static str, cause: String) -> RegistryError {
        let endpoint = self.endpoints[self.current].clone();
        // Drop the connection and move on: the next attempt goes to the next
        // endpoint, so a dead member costs one attempt, not all of them.
        self.client = None;
        self.keeper = None;
        if self.endpoints.len() > 1 {
            self.current = (self.current + 1) % self.endpoints.len();
            debug!(from = %endpoint, to = %self.endpoints[self.current], "switching etcd endpoint");
        }
        RegistryError { op, endpoint, cause }
    }

    /// Runs `f` on a connected client within the time limit.
    async fn call<T, F>(&mut self, op: &'static str, f: F) -> Result<T, RegistryError>
    where
        F: AsyncFnOnce(&mut Client) -> Result<T, Error>,
    {
        self.call_within(op, self.timeout, f).await
    }

    /// Runs `f` once, trying the endpoints in turn until one answers or
    /// `limit` has passed in all: the one-shot commands use this, so an
    /// unreachable etcd costs them at most the dial timeout.
    pub async fn once<T, F>(&mut self, op: &'static str, limit: Duration, f: F) -> Result<T, RegistryError>
    where
        F: AsyncFn(&mut Client) -> Result<T, Error>,
    {
        let deadline = tokio::time::Instant::now() + limit;
        let mut tries = self.endpoints.len();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.call_within(op, left, async |c| f(c).await).await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    tries -= 1;
                    if tries == 0 || tokio::time::Instant::now() >= deadline {
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
            Ok(Err(e)) => Err(self.fail(op, cause(&e))),
            Err(_) => Err(self.fail(op, format!("no answer within {}", humantime::format_duration(timeout)))),
        }
    }
}

impl Registry for EtcdRegistry {
    async fn grant(&mut self, ttl: Duration) -> Result<LeaseId, RegistryError> {
        let secs = ttl.as_secs() as i64;
        self.call("grant a lease", async |c| c.lease_grant(secs, None).await)
            .await
            .map(|r| LeaseId(r.id()))
    }

    async fn keep_alive(&mut self, lease: LeaseId) -> Result<bool, RegistryError> {
        if self.keeper.as_ref().is_some_and(|(k, _)| k.id() != lease.0) {
            self.keeper = None;
        }
        if self.keeper.is_none() {
            // Opening the stream sends the first keep-alive and waits for
            // its answer; a lease etcd no longer has is reported here.
            return match self
                .call("keep the lease alive", async |c| c.lease_keep_alive(lease.0).await)
                .await
            {
                Ok(pair) => {
                    self.keeper = Some(pair);
                    Ok(true)
                }
                Err(e) if e.cause.contains("lease not found") => Ok(false),
                Err(e) => Err(e),
            };
        }
        let (keeper, stream) = self.keeper.as_mut().expect("checked above");
        let round = async {
            keeper.keep_alive().await?;
            stream.message().await
        };
        match tokio::time::timeout(self.timeout, round).await {
            Ok(Ok(Some(resp))) => Ok(resp.ttl() > 0),
            Ok(Ok(None)) => Err(self.fail("keep the lease alive", "etcd closed the keep-alive stream".into())),
            Ok(Err(e)) => Err(self.fail("keep the lease alive", cause(&e))),
            Err(_) => Err(self.fail(
                "keep the lease alive",
                format!("no answer within {}", humantime::format_duration(self.timeout)),
            )),
        }
    }

    async fn put(
        &mut self,
        lease: LeaseId,
        keys: &[(String, String)],
        takeover: bool,
    ) -> Result<Vec<HeldElsewhere>, RegistryError> {
        let put = |k: &str, v: &str| TxnOp::put(k, v, Some(PutOptions::new().with_lease(lease.0)));
        if takeover {
            // One transaction: every key appears in the same revision.
            let ops: Vec<TxnOp> = keys.iter().map(|(k, v)| put(k, v)).collect();
            self.call("put the keys", async |c| c.txn(Txn::new().and_then(ops)).await)
                .await
                .map_err(|e| e.writing(keys))?;
            return Ok(Vec::new());
        }
        let mut held = Vec::new();
        for (k, v) in keys {
            // Put only where nobody is: a key that exists and is not on our
            // lease belongs to someone else now.
            let txn = Txn::new()
                .when([Compare::version(k.as_str(), CompareOp::Equal, 0)])
                .and_then([put(k, v)])
                .or_else([TxnOp::get(k.as_str(), None)]);
            let resp = self
                .call("put the keys", async |c| c.txn(txn).await)
                .await
                .map_err(|e| e.writing(std::slice::from_ref(&(k.clone(), v.clone()))))?;
            if resp.succeeded() {
                continue;
            }
            let holder = resp.op_responses().into_iter().find_map(|r| match r {
                TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.lease()),
                _ => None,
            });
            match holder {
                Some(id) if id == lease.0 => {}
                Some(0) => held.push(HeldElsewhere {
                    key: k.clone(),
                    holder: None,
                }),
                Some(id) => held.push(HeldElsewhere {
                    key: k.clone(),
                    holder: Some(LeaseId(id)),
                }),
                // Deleted between the compare and the read: try again later.
                None => held.push(HeldElsewhere {
                    key: k.clone(),
                    holder: None,
                }),
            }
        }
        Ok(held)
    }

    async fn revoke(&mut self, lease: LeaseId) -> Result<(), RegistryError> {
        self.keeper = None;
        let result = self
            .call("revoke the lease", async |c| match c.lease_revoke(lease.0).await {
                Ok(_) => Ok(true),
                Err(e) if is_lease_not_found(&e) => Ok(false),
                Err(e) => Err(e),
            })
            .await?;
        if !result {
            info!(lease = %lease, "lease was already gone");
        }
        Ok(())
    }

    async fn withdraw_keys(&mut self, lease: LeaseId, keys: &[String]) -> Result<usize, RegistryError> {
        if keys.is_empty() {
            return Ok(0);
        }
        // A transaction of transactions: each key is deleted only where it
        // is still on our lease, and all of it lands in one revision.
        let ops: Vec<TxnOp> = keys
            .iter()
            .map(|k| {
                TxnOp::txn(
                    Txn::new()
                        .when([Compare::lease(k.as_str(), CompareOp::Equal, lease.0)])
                        .and_then([TxnOp::delete(k.as_str(), None)]),
                )
            })
            .collect();
        let resp = self
            .call("withdraw the keys", async |c| c.txn(Txn::new().and_then(ops)).await)
            .await?;
        let deleted = resp
            .op_responses()
            .into_iter()
            .filter_map(|r| match r {
                TxnOpResponse::Txn(t) if t.succeeded() => Some(()),
                _ => None,
            })
            .count();
        Ok(deleted)
    }

    async fn put_shared(
        &mut self,
        lease: LeaseId,
        keys: &[(String, String)],
    ) -> Result<(Vec<SharedPresent>, i64), RegistryError> {
        let mut present = Vec::new();
        let mut revision = 0;
        for (k, v) in keys {
            let txn = Txn::new()
                .when([Compare::create_revision(k.as_str(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(
                    k.as_str(),
                    v.as_str(),
                    Some(PutOptions::new().with_lease(lease.0)),
                )])
                .or_else([TxnOp::get(k.as_str(), None)]);
            let resp = self
                .call("put a shared key", async |c| c.txn(txn).await)
                .await
                .map_err(|e| e.writing(std::slice::from_ref(&(k.clone(), v.clone()))))?;
            revision = revision.max(resp.header().map_or(0, |h| h.revision()));
            if resp.succeeded() {
                continue;
            }
            let found = resp.op_responses().into_iter().find_map(|r| match r {
                TxnOpResponse::Get(g) => g.kvs().first().cloned(),
                _ => None,
            });
            // Gone between the compare and the read: the watch, which
            // starts at this revision, sees the deletion.
            if let Some(kv) = found {
                present.push(SharedPresent {
                    key: k.clone(),
                    value: String::from_utf8_lossy(kv.value()).into_owned(),
                    holder: (kv.lease() != 0).then_some(LeaseId(kv.lease())),
                });
            }
        }
        Ok((present, revision))
    }

    async fn watch_deleted(&mut self, keys: &[String], from: i64) -> Result<(), RegistryError> {
        self.watch = None;
        let Some((first, rest)) = keys.split_first() else {
            return Ok(());
        };
        // Deletions only: the puts of other instances wake nobody.
        let options = || {
            WatchOptions::new()
                .with_start_revision(from)
                .with_filters([WatchFilterType::NoPut])
        };
        let stream = self
            .call("watch the shared keys", async |c| {
                let mut stream = c.watch(first.as_str(), Some(options())).await?;
                for k in rest {
                    stream.watch(k.as_str(), Some(options())).await?;
                }
                Ok(stream)
            })
            .await?;
        self.watch = Some((stream, self.endpoint().to_string()));
        Ok(())
    }

    async fn deleted(&mut self) -> Result<Vec<String>, RegistryError> {
        let Some((stream, endpoint)) = self.watch.as_mut() else {
            return std::future::pending().await;
        };
        let broke = |cause: String, endpoint: &str| RegistryError {
            op: "watch the shared keys",
            endpoint: endpoint.to_string(),
            cause,
        };
        loop {
            let resp = match stream.message().await {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    let e = broke("etcd closed the watch".into(), endpoint);
                    self.watch = None;
                    return Err(e);
                }
                Err(err) => {
                    let e = broke(cause(&err), endpoint);
                    self.watch = None;
                    return Err(e);
                }
            };
            if resp.canceled() {
                let e = broke(format!("etcd cancelled the watch: {}", resp.cancel_reason()), endpoint);
                self.watch = None;
                return Err(e);
            }
            let gone: Vec<String> = resp
                .events()
                .iter()
                .filter(|e| e.event_type() == EventType::Delete)
                .filter_map(|e| e.kv().map(|kv| String::from_utf8_lossy(kv.key()).into_owned()))
                .collect();
            if !gone.is_empty() {
                return Ok(gone);
            }
        }
    }

    fn unwatch(&mut self) {
        self.watch = None;
    }

    fn endpoint(&self) -> &str {
        &self.endpoints[self.current]
    }
}
