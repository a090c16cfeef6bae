//! The engine's small helpers: backoff, the logging of etcd trouble and of
//! keys held elsewhere, and the bounded revoke on stop.

use std::time::Duration;

use tokio::time::{sleep_until, Instant};
use tracing::{debug, info, warn};

use crate::registry::ops::{HeldElsewhere, SharedPresent};
use crate::registry::{ErrorKind, Etcd, LeaseId, RegistryError};

/// Exponential backoff with jitter, capped.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    next: Duration,
    first: Duration,
    cap: Duration,
}

impl Backoff {
    pub(crate) fn new(cap: Duration) -> Self {
        let first = Duration::from_millis(100).min(cap);
        Backoff {
            next: first,
            first,
            cap,
        }
    }

    /// The wait before the next attempt: random in [next/2, next].
    pub(crate) fn fail(&mut self) -> Duration {
        let wait = self.next.mul_f64(0.5 + fastrand::f64() * 0.5);
        self.next = (self.next * 2).min(self.cap);
        wait
    }

    pub(crate) fn reset(&mut self) {
        self.next = self.first;
    }
}

/// One step's retry state: when it may run again, and its backoff.
#[derive(Debug, Clone)]
pub(crate) struct Step {
    pub(crate) not_before: Instant,
    backoff: Backoff,
}

impl Step {
    pub(crate) fn new(cap: Duration) -> Self {
        Step {
            not_before: Instant::now(),
            backoff: Backoff::new(cap),
        }
    }

    pub(crate) fn failed(&mut self) {
        self.not_before = Instant::now() + self.backoff.fail();
    }

    pub(crate) fn done(&mut self) {
        self.backoff.reset();
        self.not_before = Instant::now();
    }

    /// When something scheduled at `at` may run.
    pub(crate) fn due(&self, at: Instant) -> Instant {
        at.max(self.not_before)
    }
}

/// Sleeps until the action is due; never returns when there is none.
pub(crate) async fn wait_for<A>(next: Option<(A, Instant)>) -> A {
    match next {
        Some((action, at)) => {
            sleep_until(at).await;
            action
        }
        None => std::future::pending().await,
    }
}

/// The etcd failures of one outage: each distinct cause is logged once as a
/// warning, whichever endpoint gave it, and repeats go to debug, so a
/// partitioned cluster tried over and over does not fill the journal.
#[derive(Debug, Default)]
pub(crate) struct Trouble {
    seen: Vec<(&'static str, String)>,
    /// etcd did not answer (as opposed to answering no).
    outage: bool,
    /// How etcd's endpoints were chosen, logged at the first time etcd
    /// does not answer; then `None`.
    hint: Option<String>,
}

impl Trouble {
    /// Logs `hint` (how the endpoints were chosen) the first time etcd
    /// does not answer.
    pub(crate) fn with_hint(hint: &str) -> Trouble {
        Trouble {
            hint: (!hint.is_empty()).then(|| hint.to_string()),
            ..Trouble::default()
        }
    }

    /// Logs `e`; true when its cause is new in this outage.
    pub(crate) fn note(&mut self, e: &RegistryError) -> bool {
        if e.kind == ErrorKind::Unavailable {
            self.outage = true;
            if let Some(hint) = self.hint.take() {
                warn!("etcd does not answer: {hint}");
            }
        }
        let cause = (e.op, e.cause.replace(&e.endpoint, "ENDPOINT"));
        if self.seen.contains(&cause) {
            debug!(endpoint = %e.endpoint, "{e}; retrying");
            false
        } else {
            warn!(endpoint = %e.endpoint, "{e}; retrying");
            self.seen.push(cause);
            true
        }
    }

    /// A call succeeded: ends an outage (etcd not answering), and returns
    /// true when there was one. A refusal (etcd answered no) is not an
    /// outage: another call succeeding does not end it, so a step that
    /// keeps being refused is warned about once, not once per retry.
    pub(crate) fn clear(&mut self) -> bool {
        let was = self.outage;
        if was {
            self.seen.clear();
            self.outage = false;
        }
        was
    }
}

fn holder(l: Option<LeaseId>) -> String {
    l.map_or("no lease".to_string(), |id| format!("lease {id}"))
}

/// What the shared keys were found holding: a value other than ours is
/// warned about once per value seen, then left alone.
#[derive(Debug, Default)]
pub(crate) struct SharedNotes {
    warned: Vec<(String, String)>,
}

impl SharedNotes {
    pub(crate) fn found(&mut self, present: &[SharedPresent], ours: impl Fn(&str) -> Option<String>) {
        for p in present {
            let Some(mine) = ours(&p.key) else {
                continue;
            };
            if p.value == mine {
                debug!(key = %p.key, holder = %holder(p.holder), "shared key present");
            } else if !self.warned.contains(&(p.key.clone(), p.value.clone())) {
                warn!(
                    key = %p.key,
                    theirs = %p.value,
                    ours = %mine,
                    holder = %holder(p.holder),
                    "shared key holds another value; leaving it as it is"
                );
                self.warned.push((p.key.clone(), p.value.clone()));
            }
        }
    }
}

/// Keys another writer holds: warned about once, retried quietly, and a
/// line when each comes back to us.
#[derive(Debug, Default, Clone)]
pub(crate) struct Held {
    keys: Vec<String>,
}

impl Held {
    /// After a put of `tried`, of which `elsewhere` were left alone.
    pub(crate) fn update(&mut self, service: &str, tried: &[(String, String)], elsewhere: &[HeldElsewhere]) {
        for h in elsewhere {
            if self.keys.contains(&h.key) {
                debug!(service, key = %h.key, "key is still held elsewhere");
            } else {
                warn!(service, key = %h.key, holder = %holder(h.holder), "key is held elsewhere; not overwriting it, will try again each interval");
                self.keys.push(h.key.clone());
            }
        }
        self.keys.retain(|k| {
            let resolved = tried.iter().any(|(t, _)| t == k) && !elsewhere.iter().any(|h| &h.key == k);
            if resolved {
                info!(service, key = %k, "key is free again and ours");
            }
            !resolved
        });
    }
}

/// The final revoke on shutdown: retried over the endpoints until `bound`.
pub(crate) async fn stop_revoke<R: Etcd>(reg: &mut R, id: LeaseId, bound: Duration) {
    let deadline = Instant::now() + bound;
    let attempts = async {
        loop {
            match reg.revoke(id).await {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() + Duration::from_millis(50) >= deadline => return Err(e),
                Err(e) => {
                    debug!(error = %e, "revoke on stop failed; trying again");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    };
    match tokio::time::timeout_at(deadline, attempts).await {
        Ok(Ok(())) => info!(lease = %id, "withdrawn: lease revoked on stop"),
        Ok(Err(e)) => warn!(lease = %id, "{e}; the keys expire with the lease"),
        Err(_) => warn!(lease = %id, "etcd did not answer the revoke in time; the keys expire with the lease"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap() {
        let mut b = Backoff::new(Duration::from_secs(1));
        let waits: Vec<Duration> = (0..8).map(|_| b.fail()).collect();
        for (i, w) in waits.iter().enumerate() {
            let step = Duration::from_millis(100 * (1 << i.min(10))).min(Duration::from_secs(1));
            assert!(*w >= step / 2 && *w <= step, "attempt {i}: {w:?} vs {step:?}");
        }
        b.reset();
        assert!(b.fail() <= Duration::from_millis(100));
    }
}
