//! One service's probe loop: probes every interval, feeds the outcomes to
//! the rise/fall machine and publishes the state it settles on. It never
//! waits on etcd, so probing keeps its rhythm while etcd is slow or gone.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::Timing;
use crate::health::{Health, State};
use crate::notify::{Notice, Notifier};
use crate::probe::{Outcome, Probe};
use crate::status::{Board, Pulse};

/// Something that can check the instance once.
pub trait Check: Send + Sync + 'static {
    /// One probe, bounded in time.
    fn check(&self) -> impl Future<Output = Outcome> + Send;
}

impl Check for Probe {
    async fn check(&self) -> Outcome {
        Probe::check(self).await
    }
}

/// What a probe loop reports to and is told by, besides its state.
#[derive(Clone, Default)]
pub(crate) struct Context {
    pub(crate) board: Option<Arc<Board>>,
    pub(crate) pulse: Option<Arc<Pulse>>,
    /// systemd's status line, for a process of one service.
    pub(crate) notifier: Option<Arc<dyn Notifier>>,
    pub(crate) maintenance_file: Option<PathBuf>,
    pub(crate) maintenance_switch: Option<watch::Receiver<bool>>,
    /// How long after the start the first probe comes.
    pub(crate) phase: Duration,
    /// Probes in flight at once, across the services sharing it.
    pub(crate) permits: Option<Arc<Semaphore>>,
}

impl Context {
    fn in_maintenance(&self) -> bool {
        self.maintenance_switch.as_ref().is_some_and(|s| *s.borrow())
            || self.maintenance_file.as_ref().is_some_and(|f| f.exists())
    }

    fn state(&self, state: State, line: &str) {
        if let Some(b) = &self.board {
            b.state(state.as_str());
        }
        if let Some(n) = &self.notifier {
            n.send(Notice::Status(line));
        }
    }

    fn beat(&self) {
        if let Some(p) = &self.pulse {
            p.beat();
        }
    }
}

/// Where the loop publishes its state: a watch the engine reads, and a
/// nudge that wakes the engine.
pub(crate) struct Publish {
    pub(crate) tx: watch::Sender<State>,
    pub(crate) wake: Arc<Notify>,
}

impl Publish {
    fn publish(&self, state: State) {
        if self.tx.send_if_modified(|s| std::mem::replace(s, state) != state) {
            self.wake.notify_one();
        }
    }
}

/// A duration shortened by a random 0–10 %, so that many sidekicks started
/// together spread out, and the TTL rule (TTL > interval + timeout) holds.
pub(crate) fn jitter(d: Duration) -> Duration {
    d.mul_f64(1.0 - fastrand::f64() * 0.1)
}

/// Probes every interval and publishes the health state, until `stop`.
/// Without a probe the service is up unless in maintenance, and the loop
/// only follows the maintenance switch (and the file, each interval).
pub(crate) async fn probe_loop<P: Check>(
    probe: Option<Arc<P>>,
    timing: Timing,
    out: Publish,
    cx: Context,
    stop: CancellationToken,
) {
    let start = Instant::now();
    let mut health = Health::new(timing.rise, timing.fall, timing.grace);
    let mut next = start + cx.phase;
    let idle = probe.is_none() && cx.maintenance_file.is_none();
    let mut switch = cx.maintenance_switch.clone();
    let mut maintenance = false;
    loop {
        let probe_due = tokio::select! {
            _ = stop.cancelled() => return,
            _ = sleep_until(next), if !idle => true,
            _ = changed(&mut switch) => false,
        };
        cx.beat();
        let now = cx.in_maintenance();
        if now != maintenance {
            maintenance = now;
            if maintenance {
                info!("entering maintenance: withdrawing the keys; probing goes on");
                cx.state(State::Maintenance, "maintenance, withdrawn");
                out.publish(State::Maintenance);
            } else {
                info!(
                    rise = timing.rise,
                    "leaving maintenance: registering again after rise successes"
                );
                health = Health::new(timing.rise, timing.fall, Duration::ZERO);
                if probe.is_some() {
                    cx.state(State::Starting, "leaving maintenance, probing");
                    out.publish(State::Starting);
                } else {
                    cx.state(State::Up, "left maintenance");
                    out.publish(State::Up);
                }
            }
        }
        if !probe_due {
            continue;
        }
        let began = Instant::now();
        next = began + jitter(timing.interval);
        let Some(probe) = &probe else {
            continue;
        };
        let outcome = tokio::select! {
            _ = stop.cancelled() => return,
            o = async {
                // Bounded: an agent's thousand services never probe all at
                // once. Waiting for a slot is not a stall.
                let _permit = match &cx.permits {
                    Some(p) => {
                        if let Some(pulse) = &cx.pulse { pulse.waiting(true); }
                        let permit = p.acquire().await.ok();
                        if let Some(pulse) = &cx.pulse { pulse.waiting(false); }
                        permit
                    }
                    None => None,
                };
                probe.check().await
            } => o,
        };
        cx.beat();
        if maintenance {
            if let Some(b) = &cx.board {
                b.probe(&outcome, 0);
            }
            debug!(probe = %outcome, "probe (in maintenance)");
            continue;
        }
        let was = health.state();
        let changed_to = health.observe(outcome.ok, began - start);
        if let Some(b) = &cx.board {
            let failing = if health.state() == State::Up {
                health.failures()
            } else {
                0
            };
            b.probe(&outcome, failing);
        }
        match changed_to {
            Some(State::Up) => {
                info!(probe = %outcome, "instance is up");
                cx.state(State::Up, &format!("instance healthy: {}", outcome.detail));
            }
            Some(State::Down) => {
                warn!(probe = %outcome, "instance is down");
                cx.state(
                    State::Down,
                    &format!("instance unhealthy: {}, withdrawn", outcome.detail),
                );
            }
            Some(_) => {}
            None if !outcome.ok && was == State::Up && health.failures() > 0 => info!(
                probe = %outcome,
                "probe failed ({} of {} before withdrawal)",
                health.failures(),
                timing.fall
            ),
            None => debug!(probe = %outcome, state = health.state().as_str(), "probe"),
        }
        out.publish(health.state());
    }
}

/// Waits for the maintenance switch to flip; never returns without one.
async fn changed(switch: &mut Option<watch::Receiver<bool>>) {
    match switch {
        Some(rx) => {
            if rx.changed().await.is_err() {
                *switch = None;
            }
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_ten_percent_below() {
        let d = Duration::from_secs(10);
        for _ in 0..1000 {
            let j = jitter(d);
            assert!(j <= d && j >= Duration::from_secs(9), "{j:?}");
        }
    }
}
