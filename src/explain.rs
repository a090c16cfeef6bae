//! `sidekick explain`: the worst-case reaction times a set of `run` flags gives, and warnings.
//!
//! Pure arithmetic over the validated timing. The formulas are the
//! "Guarantees" table of docs/guarantees.md; a unit test reads that table
//! and evaluates its formulas, so the two cannot drift, and
//! `tests/it/guarantees.rs` measures these figures against a real etcd.

use std::time::Duration;

use serde_json::{json, Value};

use crate::cli::ExplainArgs;
use crate::config::{self, Timing, UsageError};

/// What the figures are computed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inputs {
    /// Probe and lease timing.
    pub timing: Timing,
    /// Time limit of one probe; `None` without a probe, when `run` announces
    /// unconditionally.
    pub probe_timeout: Option<Duration>,
    /// The etcd dial timeout.
    pub dial_timeout: Duration,
}

/// The worst cases and rates of one set of flags. "At the latest" figures
/// leave out etcd's own round trips (milliseconds on a healthy cluster).
#[derive(Debug, Clone, PartialEq)]
pub struct Explanation {
    /// What it was computed from.
    pub inputs: Inputs,
    /// Instance fails → keys withdrawn: F × I + T; `None` without a probe
    /// (the keys stay while the sidekick runs).
    pub withdraw_after_failure: Option<Duration>,
    /// The same for a failure during `--grace`, counted from the start:
    /// G + F × I + T.
    pub withdraw_after_failure_in_grace: Option<Duration>,
    /// SIGTERM → keys withdrawn: D (if etcd never answers, the lease
    /// expires instead, within [`Self::stale_after_sigkill`]).
    pub withdraw_after_sigterm: Duration,
    /// SIGTERM → process exit: D + drain.
    pub exit_after_sigterm: Duration,
    /// SIGKILL → keys expired: L after the last keep-alive.
    pub stale_after_sigkill: Duration,
    /// What each etcd leader change during that time can add: L.
    pub stale_per_leader_change: Duration,
    /// Shared keys (`--shared`) outlive the last instance declaring them by
    /// at most L: their service lease's TTL, the largest `--ttl` among the
    /// instances that declared them (these flags' when they all run with
    /// them). An instance leaving never writes them.
    pub shared_keys_outlive_last_instance: Duration,
    /// Start with a healthy instance → keys put: (R − 1) × I + T, the first
    /// probe going at once; 0 without a probe.
    pub register_after_start: Duration,
    /// Instance recovers → keys put: R × I + T; `None` without a probe.
    pub register_after_recovery: Option<Duration>,
    /// etcd answers again → keys put, the instance healthy: I + min(D, L/3)
    /// (a call in flight gives up, then the backoff, capped at I).
    pub register_after_etcd_back: Duration,
    /// Time between keep-alives: L/3.
    pub keepalive_every: Duration,
    /// The bound on each etcd call while running: min(D, L/3).
    pub etcd_call_bound: Duration,
    /// A watch (render's, wait's, the agent's on its own keys) on a member
    /// that goes unreachable or freezes moves to another within
    /// max(D, 10 s) + D: the connection's HTTP/2 ping, sent that often
    /// while nothing arrives, unanswered for D.
    pub watch_leaves_lost_member: Duration,
    /// The shortest time between probe starts (jitter takes up to 10 % off
    /// the interval, never adds); `None` without a probe.
    pub probe_every_least: Option<Duration>,
    /// Risky combinations, one line each.
    pub warnings: Vec<String>,
}

/// `sidekick explain`: validates the flags as `run` does and returns what
/// to print on stdout.
pub fn command(args: &ExplainArgs) -> Result<String, UsageError> {
    let e = Explanation::new(inputs(args)?);
    Ok(if args.json { format!("{}\n", e.json()) } else { e.text() })
}

/// The flags validated by `run`'s rules; nothing is contacted. Probe
/// timing flags without a probe flag are explained as for an HTTP or TCP
/// probe (the SPEC): only the probe's kind is left open.
pub fn inputs(args: &ExplainArgs) -> Result<Inputs, UsageError> {
    let t = &args.timing;
    let timing_alone = [&t.interval, &t.rise, &t.fall, &t.grace, &args.probe.options.timeout]
        .iter()
        .any(|f| f.is_some());
    let p = &args.probe;
    let no_probe_flag = [&p.http, &p.tcp, &p.exec, &p.grpc].iter().all(|f| f.is_none());
    let probe = if no_probe_flag && timing_alone {
        let mut tcp = p.clone();
        tcp.tcp = Some("explain.invalid:1".into());
        config::probe_spec(&tcp)?
    } else {
        config::probe_spec(p)?
    };
    let timing = config::timing(&args.timing, probe.as_ref(), &args.probe.options.timeout)?;
    let dial_timeout = config::dial_timeout(&args.dial_timeout)?;
    Ok(Inputs {
        timing,
        probe_timeout: probe.map(|p| p.timeout),
        dial_timeout,
    })
}

impl Explanation {
    /// The figures for `inputs`.
    pub fn new(inputs: Inputs) -> Explanation {
        let t = &inputs.timing;
        let (i, l, d) = (t.interval, t.ttl, inputs.dial_timeout);
        let failure = inputs.probe_timeout.map(|timeout| t.fall * i + timeout);
        let etcd_call_bound = config::etcd_call_bound(l, d);
        Explanation {
            withdraw_after_failure: failure,
            withdraw_after_failure_in_grace: failure.map(|f| t.grace + f),
            withdraw_after_sigterm: d,
            exit_after_sigterm: d + t.drain,
            stale_after_sigkill: l,
            stale_per_leader_change: l,
            shared_keys_outlive_last_instance: l,
            register_after_start: inputs
                .probe_timeout
                .map_or(Duration::ZERO, |timeout| (t.rise - 1) * i + timeout),
            register_after_recovery: inputs.probe_timeout.map(|timeout| t.rise * i + timeout),
            register_after_etcd_back: i + etcd_call_bound,
            keepalive_every: l / 3,
            etcd_call_bound,
            watch_leaves_lost_member: crate::registry::keepalive_interval(d) + d,
            probe_every_least: inputs.probe_timeout.map(|_| i.mul_f64(0.9)),
            warnings: warnings(&inputs),
            inputs,
        }
    }

    /// The text form: the settings, one line per figure with its formula,
    /// the rates, then one `warning:` line per risky combination.
    pub fn text(&self) -> String {
        let t = &self.inputs.timing;
        let mut out = String::new();
        // Without a probe, only the flags that mode takes are shown.
        let mut settings = Vec::new();
        if let Some(timeout) = self.inputs.probe_timeout {
            settings.extend([
                ("--interval", show(t.interval)),
                ("--timeout", show(timeout)),
                ("--rise", t.rise.to_string()),
                ("--fall", t.fall.to_string()),
            ]);
        }
        settings.push(("--ttl", show(t.ttl)));
        if self.inputs.probe_timeout.is_some() {
            settings.push(("--grace", show(t.grace)));
        }
        settings.extend([
            ("--drain", show(t.drain)),
            ("--dial-timeout", show(self.inputs.dial_timeout)),
        ]);
        let settings: Vec<String> = settings.into_iter().map(|(f, v)| format!("{f} {v}")).collect();
        let probe = if self.inputs.probe_timeout.is_some() {
            ""
        } else {
            " (no probe: the keys stay while the sidekick runs)"
        };
        out.push_str(&format!("sidekick run with {}{probe}\n\n", settings.join(" ")));
        out.push_str("worst case, before etcd's own round trips:\n");
        let never = || "never".to_string();
        let mut rows: Vec<(&str, String, String)> = vec![(
            "withdrawn after the instance fails",
            self.withdraw_after_failure.map_or_else(never, secs),
            match self.withdraw_after_failure {
                Some(_) => "fall × interval + timeout after the failure".into(),
                None => "no probe: a failure is not seen".into(),
            },
        )];
        if let (Some(g), false) = (self.withdraw_after_failure_in_grace, t.grace.is_zero()) {
            rows.push((
                "  (a failure during --grace)",
                secs(g),
                "grace + fall × interval + timeout after the start".into(),
            ));
        }
        rows.extend([
            (
                "withdrawn after SIGTERM/SIGINT",
                secs(self.withdraw_after_sigterm),
                format!(
                    "dial timeout (the TTL if etcd never answers); the process exits within {} with the drain",
                    secs(self.exit_after_sigterm)
                ),
            ),
            (
                "stale after SIGKILL or a crash",
                secs(self.stale_after_sigkill),
                format!(
                    "TTL after the last keep-alive, plus up to {} per etcd leader change meanwhile",
                    secs(self.stale_per_leader_change)
                ),
            ),
            (
                "registered after start",
                secs(self.register_after_start),
                match self.register_after_recovery {
                    Some(_) => "(rise − 1) × interval + timeout: the first probe goes at once".into(),
                    None => "no probe: at once".into(),
                },
            ),
            (
                "registered after recovery",
                self.register_after_recovery.map_or_else(|| "-".into(), secs),
                match self.register_after_recovery {
                    Some(_) => "rise × interval + timeout after the instance recovers".into(),
                    None => "no probe: registered all along".into(),
                },
            ),
            (
                "registered after etcd returns",
                secs(self.register_after_etcd_back),
                "interval + min(dial timeout, TTL/3), the instance healthy".into(),
            ),
        ]);
        for (label, value, how) in rows {
            out.push_str(&format!("  {label:<36}{value:>9}   {how}\n"));
        }
        out.push_str(&format!(
            "  shared keys (--shared) outlive the last instance declaring them by at most {} \
             (the largest --ttl of those instances); an instance leaving never writes them\n",
            secs(self.shared_keys_outlive_last_instance)
        ));
        out.push_str(&format!(
            "  a watch (render, wait) on a member that goes unreachable or freezes moves to another \
             within {}: max(dial timeout, 10s) + dial timeout\n",
            secs(self.watch_leaves_lost_member)
        ));
        out.push_str("\nrequests:\n");
        out.push_str(&format!(
            "  a keep-alive every {} ({} a minute), each etcd call bounded by {}\n",
            secs(self.keepalive_every),
            rate(per_minute(self.keepalive_every)),
            secs(self.etcd_call_bound),
        ));
        match self.probe_every_least {
            Some(least) => out.push_str(&format!(
                "  a probe every {} to {} ({} to {} a minute)\n",
                secs(least),
                secs(t.interval),
                rate(per_minute(t.interval)),
                rate(per_minute(least)),
            )),
            None => out.push_str("  no probes\n"),
        }
        if !self.warnings.is_empty() {
            out.push('\n');
        }
        for w in &self.warnings {
            out.push_str(&format!("warning: {w}\n"));
        }
        out
    }

    /// The JSON form: durations in seconds (`null` where there is no
    /// probe), rates per minute, and the warnings.
    pub fn json(&self) -> Value {
        let s = |d: Duration| Value::from(round3(d.as_secs_f64()));
        let opt = |d: Option<Duration>| d.map_or(Value::Null, s);
        json!({
            "withdraw_after_failure_s": opt(self.withdraw_after_failure),
            "withdraw_after_failure_in_grace_s": opt(self.withdraw_after_failure_in_grace),
            "withdraw_after_sigterm_s": s(self.withdraw_after_sigterm),
            "exit_after_sigterm_s": s(self.exit_after_sigterm),
            "stale_after_sigkill_s": s(self.stale_after_sigkill),
            "stale_per_leader_change_s": s(self.stale_per_leader_change),
            "shared_keys_outlive_last_instance_s": s(self.shared_keys_outlive_last_instance),
            "register_after_start_s": s(self.register_after_start),
            "register_after_recovery_s": opt(self.register_after_recovery),
            "register_after_etcd_back_s": s(self.register_after_etcd_back),
            "keepalive_every_s": s(self.keepalive_every),
            "keepalives_per_minute": round3(per_minute(self.keepalive_every)),
            "etcd_call_bound_s": s(self.etcd_call_bound),
            "watch_leaves_lost_member_s": s(self.watch_leaves_lost_member),
            "probes_per_minute_max": self.probe_every_least.map_or(Value::Null, |d| Value::from(round3(per_minute(d)))),
            "warnings": self.warnings,
        })
    }
}

/// The risky combinations in `inputs`, one line each: nothing `run`
/// refuses, but each costs something an operator would not choose knowingly.
fn warnings(inputs: &Inputs) -> Vec<String> {
    let t = &inputs.timing;
    let mut out = Vec::new();
    let Some(timeout) = inputs.probe_timeout else {
        return out;
    };
    let least = t.interval + timeout;
    // Under 1.5 × (interval + timeout): within a third of the rule's limit.
    if t.ttl.as_secs_f64() < 1.5 * least.as_secs_f64() {
        let roomy = Duration::from_secs((1.5 * least.as_secs_f64()).ceil() as u64).max(Duration::from_secs(2));
        out.push(format!(
            "--ttl {} is barely above --interval + --timeout ({} + {} = {}), the least run accepts: \
             a small rise in either makes run refuse to start; --ttl {} or more leaves room",
            show(t.ttl),
            show(t.interval),
            show(timeout),
            show(least),
            show(roomy)
        ));
    }
    if timeout.as_secs_f64() >= 0.8 * t.interval.as_secs_f64() {
        out.push(format!(
            "--timeout {} is close to --interval {}: while the instance hangs, probes run almost back to back \
             (jitter shortens the interval to as little as {}); keep --timeout under {}",
            show(timeout),
            show(t.interval),
            show(t.interval.mul_f64(0.9)),
            show(t.interval.mul_f64(0.8))
        ));
    }
    if t.fall == 1 && t.interval < Duration::from_secs(1) {
        out.push(format!(
            "--fall 1 with a sub-second --interval ({}): one slow or lost probe withdraws the keys, \
             so a brief hiccup makes them flap; --fall 2 or more",
            show(t.interval)
        ));
    }
    out
}

/// A duration as the flags take it: `5s`, `4s 500ms`.
fn show(d: Duration) -> String {
    humantime::format_duration(Duration::from_millis(d.as_millis() as u64)).to_string()
}

/// A duration in seconds with up to three decimals: `12 s`, `0.667 s`.
fn secs(d: Duration) -> String {
    format!("{} s", trim(format!("{:.3}", d.as_secs_f64())))
}

/// A rate with up to one decimal: `12`, `13.3`.
fn rate(r: f64) -> String {
    trim(format!("{r:.1}"))
}

fn trim(s: String) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

fn per_minute(every: Duration) -> f64 {
    60.0 / every.as_secs_f64()
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Inputs from interval, timeout (None: no probe), rise, fall, TTL,
    /// dial timeout and grace, durations in milliseconds.
    fn inputs(i: u64, t: Option<u64>, r: u32, f: u32, l: u64, d: u64, g: u64) -> Inputs {
        Inputs {
            timing: Timing {
                interval: ms(i),
                rise: r,
                fall: f,
                ttl: ms(l),
                grace: ms(g),
                drain: Duration::ZERO,
            },
            probe_timeout: t.map(ms),
            dial_timeout: ms(d),
        }
    }

    fn defaults() -> Inputs {
        let args = ExplainArgs {
            json: false,
            probe: crate::cli::ProbeArgs {
                http: Some("http://127.0.0.1:8080/health".into()),
                ..Default::default()
            },
            timing: Default::default(),
            dial_timeout: None,
        };
        super::inputs(&args).unwrap()
    }

    #[test]
    fn figures_table() {
        // (inputs, failure, sigterm, sigkill, start, recovery, etcd back), in ms.
        type Row = (Inputs, Option<u64>, u64, u64, u64, Option<u64>, u64);
        let rows: Vec<Row> = vec![
            (defaults(), Some(12_000), 5_000, 15_000, 7_000, Some(12_000), 10_000),
            // The short timings of the integration tests: L/3 bounds each call.
            (
                inputs(200, Some(100), 1, 1, 2_000, 1_000, 0),
                Some(300),
                1_000,
                2_000,
                100,
                Some(300),
                866,
            ),
            (
                inputs(300, Some(100), 3, 3, 3_000, 1_000, 0),
                Some(1_000),
                1_000,
                3_000,
                700,
                Some(1_000),
                1_300,
            ),
            // A dial timeout under L/3 bounds each call instead.
            (
                inputs(1_000, Some(500), 4, 2, 30_000, 2_000, 0),
                Some(2_500),
                2_000,
                30_000,
                3_500,
                Some(4_500),
                3_000,
            ),
            // No probe: no failure seen, registered at once.
            (
                inputs(5_000, None, 2, 2, 15_000, 5_000, 0),
                None,
                5_000,
                15_000,
                0,
                None,
                10_000,
            ),
        ];
        for (inp, failure, sigterm, sigkill, start, recovery, etcd_back) in rows {
            let e = Explanation::new(inp.clone());
            let got = (
                e.withdraw_after_failure,
                e.withdraw_after_sigterm,
                e.stale_after_sigkill,
                e.register_after_start,
                e.register_after_recovery,
                e.register_after_etcd_back,
            );
            let want = (
                failure.map(ms),
                ms(sigterm),
                ms(sigkill),
                ms(start),
                recovery.map(ms),
                ms(etcd_back),
            );
            assert_eq!(got, want, "{inp:?}");
        }
    }

    #[test]
    fn grace_drain_and_rates() {
        let mut inp = inputs(1_000, Some(200), 2, 3, 9_000, 5_000, 10_000);
        inp.timing.drain = ms(4_000);
        let e = Explanation::new(inp);
        assert_eq!(e.withdraw_after_failure, Some(ms(3_200)));
        assert_eq!(e.withdraw_after_failure_in_grace, Some(ms(13_200)));
        assert_eq!(e.exit_after_sigterm, ms(9_000));
        assert_eq!(e.keepalive_every, ms(3_000));
        assert_eq!(e.etcd_call_bound, ms(3_000));
        assert_eq!(e.probe_every_least, Some(ms(900)));
        assert_eq!(e.shared_keys_outlive_last_instance, ms(9_000), "the TTL");
        let j = e.json();
        assert_eq!(j["keepalives_per_minute"], 20.0);
        assert_eq!(j["shared_keys_outlive_last_instance_s"], 9.0);
        assert_eq!(j["probes_per_minute_max"], 66.667);
        assert_eq!(j["withdraw_after_failure_in_grace_s"], 13.2);
    }

    #[test]
    fn warnings_table() {
        // (inputs, the start of each warning expected, in order).
        let rows: Vec<(Inputs, &[&str])> = vec![
            (defaults(), &[]),
            (inputs(5_000, None, 1, 1, 2_000, 5_000, 0), &[]),
            // 7s over 5s + 2s: 1.4 times.
            (
                inputs(5_000, Some(2_000), 2, 2, 8_000, 5_000, 0),
                &["--ttl 8s is barely above"],
            ),
            // 11s: 1.57 times, enough.
            (inputs(5_000, Some(2_000), 2, 2, 11_000, 5_000, 0), &[]),
            (
                inputs(5_000, Some(4_000), 2, 2, 30_000, 5_000, 0),
                &["--timeout 4s is close to --interval 5s"],
            ),
            (inputs(5_000, Some(3_900), 2, 2, 30_000, 5_000, 0), &[]),
            (
                inputs(500, Some(100), 2, 1, 2_000, 5_000, 0),
                &["--fall 1 with a sub-second --interval (500ms)"],
            ),
            (inputs(1_000, Some(100), 2, 1, 2_000, 5_000, 0), &[]),
            (inputs(500, Some(100), 2, 2, 2_000, 5_000, 0), &[]),
            (
                inputs(900, Some(800), 1, 1, 2_000, 5_000, 0),
                &["--ttl 2s is barely above", "--timeout 800ms is close", "--fall 1 with"],
            ),
        ];
        for (inp, want) in rows {
            let got = Explanation::new(inp.clone()).warnings;
            assert_eq!(got.len(), want.len(), "{inp:?}: {got:?}");
            for (g, w) in got.iter().zip(want) {
                assert!(g.starts_with(w), "{inp:?}: want {w:?}, got {g:?}");
                assert!(!g.contains('\n'));
            }
        }
    }

    #[test]
    fn text_names_every_figure_and_json_has_every_field() {
        let e = Explanation::new(inputs(900, Some(800), 1, 1, 2_000, 5_000, 0));
        let text = e.text();
        for want in [
            "sidekick run with --interval 900ms --timeout 800ms --rise 1 --fall 1 --ttl 2s",
            "withdrawn after the instance fails",
            "1.7 s",
            "withdrawn after SIGTERM/SIGINT",
            "stale after SIGKILL",
            "registered after start",
            "registered after recovery",
            "registered after etcd returns",
            "a keep-alive every 0.667 s (90 a minute)",
            "a probe every 0.81 s to 0.9 s (66.7 to 74.1 a minute)",
            "shared keys (--shared) outlive the last instance declaring them by at most 2 s (the largest --ttl",
            "warning: --fall 1",
        ] {
            assert!(text.contains(want), "{want:?} in:\n{text}");
        }
        let j = e.json();
        for field in [
            "withdraw_after_failure_s",
            "withdraw_after_sigterm_s",
            "stale_after_sigkill_s",
            "register_after_start_s",
            "register_after_recovery_s",
            "register_after_etcd_back_s",
            "shared_keys_outlive_last_instance_s",
            "keepalives_per_minute",
            "probes_per_minute_max",
        ] {
            assert!(j[field].is_number(), "{field}: {j}");
        }
        assert_eq!(j["warnings"].as_array().map(Vec::len), Some(3), "{j}");

        let none = Explanation::new(inputs(5_000, None, 2, 2, 15_000, 5_000, 0));
        assert!(none.text().contains("no probe"), "{}", none.text());
        assert!(none.json()["withdraw_after_failure_s"].is_null());
        // Without a probe the shared keys are held all the same.
        assert!(
            none.text()
                .contains("outlive the last instance declaring them by at most 15 s"),
            "{}",
            none.text()
        );
        assert_eq!(none.json()["shared_keys_outlive_last_instance_s"], 15.0);
    }

    // The "Guarantees" table of docs/guarantees.md is the other half of this
    // module: its formula column and its defaults column are checked against
    // the code.

    const README: &str = include_str!("../docs/guarantees.md");

    type Figure = fn(&Explanation) -> Option<Duration>;

    /// Each row of the table, by its event, and the figure it states.
    const ROWS: &[(&str, Figure)] = &[
        ("the instance fails", |e| e.withdraw_after_failure),
        ("SIGTERM/SIGINT", |e| Some(e.withdraw_after_sigterm)),
        ("SIGKILL, machine crash", |e| Some(e.stale_after_sigkill)),
        ("etcd back after an outage", |e| Some(e.register_after_etcd_back)),
        ("the sidekick starts, the instance healthy", |e| {
            Some(e.register_after_start)
        }),
        ("the instance recovers", |e| e.register_after_recovery),
    ];

    /// The table's rows: event, bound, defaults.
    fn readme_rows() -> Vec<(String, String, String)> {
        let section = README
            .split("\n## Guarantees\n")
            .nth(1)
            .expect("README has a Guarantees section");
        section
            .lines()
            .skip_while(|l| !l.starts_with('|'))
            .take_while(|l| l.starts_with('|'))
            .skip(2) // the header and the |---| line
            .map(|l| {
                let cells: Vec<String> = l.trim_matches('|').split('|').map(|c| c.trim().to_string()).collect();
                assert_eq!(cells.len(), 3, "three cells: {l}");
                (cells[0].clone(), cells[1].clone(), cells[2].clone())
            })
            .collect()
    }

    fn figure(event: &str) -> Figure {
        ROWS.iter()
            .find(|(e, _)| *e == event)
            .unwrap_or_else(|| panic!("README row {event:?} has no figure in explain"))
            .1
    }

    #[test]
    fn readme_guarantees_rows_are_the_figures_of_explain() {
        let events: Vec<String> = readme_rows().into_iter().map(|r| r.0).collect();
        let ours: Vec<&str> = ROWS.iter().map(|r| r.0).collect();
        assert_eq!(events, ours);
    }

    /// The paragraph of the Guarantees section holding `words`, on one line.
    fn guarantees_paragraph(words: &str) -> String {
        let section = README.split("\n## Guarantees\n").nth(1).unwrap();
        let section = section.split("\n## ").next().unwrap();
        section
            .split("\n\n")
            .map(|p| p.replace('\n', " "))
            .find(|p| p.contains(words))
            .unwrap_or_else(|| panic!("a paragraph of the Guarantees saying {words:?}"))
    }

    /// The Guarantees section states the shared keys' bound in a sentence
    /// under the table, with explain's JSON field for it.
    #[test]
    fn readme_guarantees_state_the_shared_keys_bound_of_explain() {
        let sentence = guarantees_paragraph("outlive the last instance declaring them by at most");
        let bound = sentence
            .split("by at most ")
            .nth(1)
            .map(formula::leading)
            .expect("the bound");
        assert_eq!(bound, [formula::Tok::Var('L')], "{sentence}");
        assert!(sentence.contains("`shared_keys_outlive_last_instance_s`"), "{sentence}");
        let e = Explanation::new(defaults());
        assert_eq!(e.shared_keys_outlive_last_instance, e.inputs.timing.ttl);
    }

    /// The Guarantees section states how soon a watch leaves a lost member,
    /// with explain's JSON field for it, and the figure follows the dial
    /// timeout above the ping floor.
    #[test]
    fn readme_guarantees_state_the_lost_member_bound_of_explain() {
        let sentence = guarantees_paragraph("moves to another member within max(*D*, 10 s) + *D*");
        assert!(sentence.contains("`watch_leaves_lost_member_s`"), "{sentence}");
        let mut e = defaults();
        assert_eq!(Explanation::new(e.clone()).watch_leaves_lost_member, ms(15_000));
        e.dial_timeout = ms(1_000);
        assert_eq!(Explanation::new(e.clone()).watch_leaves_lost_member, ms(11_000));
        e.dial_timeout = ms(12_000);
        assert_eq!(Explanation::new(e).watch_leaves_lost_member, ms(24_000));
    }

    /// The README's `sidekick explain` section names every JSON field.
    #[test]
    fn readme_lists_every_json_field_of_explain() {
        let section = README
            .split("### How fast will it react? `sidekick explain`")
            .nth(1)
            .expect("README has the explain section");
        let section = section.split("\n### ").next().unwrap();
        let j = Explanation::new(defaults()).json();
        for field in j.as_object().unwrap().keys() {
            assert!(section.contains(&format!("`{field}`")), "README names `{field}`");
        }
    }

    #[test]
    fn readme_guarantees_defaults_column_is_explain_on_default_flags() {
        let e = Explanation::new(defaults());
        for (event, _, cell) in readme_rows() {
            // The last number in the cell, in seconds: `12 s`, `≤ 5 s`.
            let number = cell
                .split(|c: char| !(c.is_ascii_digit() || c == '.'))
                .rfind(|w| !w.is_empty())
                .unwrap_or_else(|| panic!("{event}: no number in {cell:?}"));
            assert!(cell.ends_with(" s"), "{event}: seconds: {cell:?}");
            let readme: f64 = number.parse().unwrap();
            let ours = figure(&event)(&e).expect("a figure with the defaults").as_secs_f64();
            assert!(
                (readme - ours).abs() < 1e-9,
                "{event}: README {readme} s, explain {ours} s"
            );
        }
    }

    #[test]
    fn readme_guarantees_formulas_are_explain() {
        let cases = [
            defaults(),
            inputs(200, Some(100), 1, 1, 2_000, 1_000, 0),
            inputs(300, Some(100), 3, 3, 3_000, 1_000, 500),
            inputs(1_000, Some(500), 4, 2, 30_000, 2_000, 0),
            inputs(2_500, Some(2_400), 7, 5, 60_000, 45_000, 7_000),
        ];
        for inp in cases {
            let e = Explanation::new(inp.clone());
            let t = &inp.timing;
            let var = |name: char| -> f64 {
                match name {
                    'I' => t.interval.as_secs_f64(),
                    'T' => inp.probe_timeout.unwrap().as_secs_f64(),
                    'F' => t.fall.into(),
                    'R' => t.rise.into(),
                    'L' => t.ttl.as_secs_f64(),
                    'D' => inp.dial_timeout.as_secs_f64(),
                    'G' => t.grace.as_secs_f64(),
                    other => panic!("unknown symbol *{other}*"),
                }
            };
            for (event, bound, _) in readme_rows() {
                let formula = formula::leading(&bound);
                let readme = formula::eval(&formula, &var);
                let ours = figure(&event)(&e).unwrap().as_secs_f64();
                // 1 ms: the code bounds each call in whole milliseconds.
                assert!(
                    (readme - ours).abs() <= 0.001,
                    "{event}: README {bound:?} gives {readme} s, explain {ours} s for {inp:?}"
                );
            }
        }
    }

    #[test]
    fn the_formula_reader_reads_what_the_table_writes() {
        let cases: &[(&str, f64)] = &[
            ("*F* × *I* + *T* after the failure", 2.0 * 5.0 + 2.0),
            ("(*R* − 1) × *I* + *T*, then", 1.0 * 5.0 + 2.0),
            ("*R* × *I* + *T* (the first probe)", 2.0 * 5.0 + 2.0),
            ("*I* + min(*D*, *L*/3) after etcd answers", 5.0 + 3.0),
            ("*D*: one round trip", 4.0),
            ("*L* after the last keep-alive; **plus** more", 9.0),
        ];
        let var = |c: char| match c {
            'F' | 'R' => 2.0,
            'I' => 5.0,
            'T' => 2.0,
            'D' => 4.0,
            'L' => 9.0,
            _ => panic!("{c}"),
        };
        for (text, want) in cases {
            let got = formula::eval(&formula::leading(text), &var);
            assert!((got - want).abs() < 1e-9, "{text}: {got} != {want}");
        }
        assert!(formula::leading("about a second").is_empty());
    }

    /// The formulas of the README's table: `*X*` symbols, numbers, `×`, `/`,
    /// `+`, `−`, parentheses and `min(a, b)`, at the start of a cell.
    mod formula {
        #[derive(Debug, Clone, PartialEq)]
        pub enum Tok {
            Var(char),
            Num(f64),
            Op(char),
            Min,
        }

        /// The tokens of the formula that opens `text`, up to the first
        /// word that is not part of one.
        pub fn leading(text: &str) -> Vec<Tok> {
            let mut toks = Vec::new();
            let mut rest = text.trim_start();
            loop {
                let mut chars = rest.chars();
                let tok = match chars.next() {
                    Some('*') => {
                        let (Some(name), Some('*')) = (chars.next(), chars.next()) else {
                            break;
                        };
                        if !name.is_ascii_uppercase() {
                            break;
                        }
                        rest = &rest[3..];
                        Tok::Var(name)
                    }
                    Some(c @ ('×' | '/' | '+' | '−' | '(' | ')' | ',')) => {
                        rest = &rest[c.len_utf8()..];
                        Tok::Op(c)
                    }
                    Some(c) if c.is_ascii_digit() => {
                        let end = rest
                            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                            .unwrap_or(rest.len());
                        let n = rest[..end].parse().unwrap();
                        rest = &rest[end..];
                        Tok::Num(n)
                    }
                    Some('m') if rest.starts_with("min(") => {
                        rest = &rest[3..];
                        Tok::Min
                    }
                    _ => break,
                };
                toks.push(tok);
                rest = rest.trim_start();
            }
            // A trailing comma or an opening parenthesis belongs to the prose.
            while matches!(toks.last(), Some(Tok::Op(',' | '('))) {
                toks.pop();
            }
            toks
        }

        /// Evaluates the tokens; panics on a malformed formula.
        pub fn eval(toks: &[Tok], var: &dyn Fn(char) -> f64) -> f64 {
            assert!(!toks.is_empty(), "no formula");
            let mut p = Parser { toks, at: 0, var };
            let v = p.sum();
            assert_eq!(p.at, toks.len(), "formula ends early: {toks:?}");
            v
        }

        struct Parser<'a> {
            toks: &'a [Tok],
            at: usize,
            var: &'a dyn Fn(char) -> f64,
        }

        impl Parser<'_> {
            fn peek(&self) -> Option<&Tok> {
                self.toks.get(self.at)
            }

            fn eat(&mut self, op: char) {
                assert_eq!(self.peek(), Some(&Tok::Op(op)), "expected {op} in {:?}", self.toks);
                self.at += 1;
            }

            fn sum(&mut self) -> f64 {
                let mut v = self.product();
                while let Some(Tok::Op(op @ ('+' | '−'))) = self.peek().cloned() {
                    self.at += 1;
                    let rhs = self.product();
                    v = if op == '+' { v + rhs } else { v - rhs };
                }
                v
            }

            fn product(&mut self) -> f64 {
                let mut v = self.atom();
                while let Some(Tok::Op(op @ ('×' | '/'))) = self.peek().cloned() {
                    self.at += 1;
                    let rhs = self.atom();
                    v = if op == '×' { v * rhs } else { v / rhs };
                }
                v
            }

            fn atom(&mut self) -> f64 {
                let tok = self.peek().cloned();
                self.at += 1;
                match tok {
                    Some(Tok::Var(c)) => (self.var)(c),
                    Some(Tok::Num(n)) => n,
                    Some(Tok::Op('(')) => {
                        let v = self.sum();
                        self.eat(')');
                        v
                    }
                    Some(Tok::Min) => {
                        self.eat('(');
                        let a = self.sum();
                        self.eat(',');
                        let b = self.sum();
                        self.eat(')');
                        a.min(b)
                    }
                    other => panic!("unexpected {other:?} in {:?}", self.toks),
                }
            }
        }
    }
}
