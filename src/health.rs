//! The rise/fall state machine: probe outcomes in, up/down out. Pure, no I/O.

use std::time::Duration;

/// What the sidekick believes about the instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Not yet settled: fewer than `rise` successes and fewer than `fall`
    /// failures so far.
    Starting,
    /// Healthy: the keys belong in etcd.
    Up,
    /// Unhealthy: the keys must not be in etcd.
    Down,
    /// Taken out on purpose (`--maintenance-file`, SIGUSR1): the keys must
    /// not be in etcd, whatever the probes say. Set from outside the
    /// machine, which never enters it.
    Maintenance,
}

impl State {
    /// The lowercase name used in logs and status output.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Up => "up",
            State::Down => "down",
            State::Maintenance => "maintenance",
        }
    }
}

/// Rise/fall hysteresis with a start-up grace period.
#[derive(Debug, Clone)]
pub struct Health {
    rise: u32,
    fall: u32,
    grace: Duration,
    state: State,
    successes: u32,
    failures: u32,
}

impl Health {
    /// A machine that needs `rise` successes to go up and `fall` failures to
    /// go down; failures within `grace` of the start do not count.
    pub fn new(rise: u32, fall: u32, grace: Duration) -> Self {
        Health {
            rise: rise.max(1),
            fall: fall.max(1),
            grace,
            state: State::Starting,
            successes: 0,
            failures: 0,
        }
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Consecutive failures counted so far (0 while the last probe passed).
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Feeds one probe outcome, `since_start` after the sidekick started.
    /// Returns the new state when it changed.
    pub fn observe(&mut self, ok: bool, since_start: Duration) -> Option<State> {
        let before = self.state;
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if self.state != State::Up && self.successes >= self.rise {
                self.state = State::Up;
            }
        } else {
            // A failure always breaks a run of successes; within the grace
            // period it just does not count towards `fall`.
            self.successes = 0;
            if since_start < self.grace {
                return None;
            }
            self.failures = self.failures.saturating_add(1);
            if self.state != State::Down && self.failures >= self.fall {
                self.state = State::Down;
            }
        }
        (self.state != before).then_some(self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use State::*;

    const T: Duration = Duration::from_secs(100);

    /// Runs `outcomes` ('+' pass, '-' fail) and returns the state after each.
    fn trace(rise: u32, fall: u32, outcomes: &str) -> Vec<State> {
        let mut h = Health::new(rise, fall, Duration::ZERO);
        outcomes
            .chars()
            .map(|c| {
                h.observe(c == '+', T);
                h.state()
            })
            .collect()
    }

    #[test]
    fn rise_and_fall_table() {
        let cases: &[(u32, u32, &str, &[State])] = &[
            (1, 1, "+-+", &[Up, Down, Up]),
            (2, 2, "++", &[Starting, Up]),
            (2, 2, "+-+", &[Starting, Starting, Starting]),
            (2, 2, "--", &[Starting, Down]),
            (2, 2, "++-+--", &[Starting, Up, Up, Up, Up, Down]),
            (2, 3, "++--+--", &[Starting, Up, Up, Up, Up, Up, Up]),
            (2, 3, "++---", &[Starting, Up, Up, Up, Down]),
            (
                3,
                1,
                "+++-++-+++",
                &[Starting, Starting, Up, Down, Down, Down, Down, Down, Down, Up],
            ),
        ];
        for (rise, fall, outcomes, want) in cases {
            assert_eq!(
                trace(*rise, *fall, outcomes),
                *want,
                "rise {rise} fall {fall} {outcomes}"
            );
        }
    }

    #[test]
    fn observe_reports_only_changes() {
        let mut h = Health::new(1, 2, Duration::ZERO);
        assert_eq!(h.observe(true, T), Some(Up));
        assert_eq!(h.observe(true, T), None);
        assert_eq!(h.observe(false, T), None);
        assert_eq!(h.failures(), 1);
        assert_eq!(h.observe(false, T), Some(Down));
        assert_eq!(h.observe(false, T), None);
    }

    #[test]
    fn grace_ignores_early_failures_only() {
        let grace = Duration::from_secs(10);
        let mut h = Health::new(1, 1, grace);
        assert_eq!(h.observe(false, Duration::from_secs(1)), None);
        assert_eq!(h.state(), Starting);
        assert_eq!(h.observe(true, Duration::from_secs(2)), Some(Up));
        assert_eq!(h.observe(false, Duration::from_secs(9)), None);
        assert_eq!(h.state(), Up);
        assert_eq!(h.observe(false, Duration::from_secs(10)), Some(Down));
    }

    #[test]
    fn grace_failure_breaks_a_rise_streak() {
        let mut h = Health::new(2, 1, Duration::from_secs(10));
        h.observe(true, Duration::from_secs(1));
        h.observe(false, Duration::from_secs(2));
        assert_eq!(h.observe(true, Duration::from_secs(3)), None);
        assert_eq!(h.observe(true, Duration::from_secs(4)), Some(Up));
    }
}
