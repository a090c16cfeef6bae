//! Property tests: every parser of user input returns a value or an error,
//! and never panics, whatever it is given.

use proptest::prelude::*;

use crate::cli::{EtcdArgs, ProbeArgs, ProbeOptions, RunArgs, TimingArgs};
use crate::config::{self, StatusSet};
use crate::discover::{self, MapEnv};

/// Printable text with the characters the parsers split on made likely.
fn texty() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[0-9a-z:=,\\-\\[\\]/ .\"'#]{0,40}",
        "(http|https|ftp)://[a-z0-9.:\\[\\]@/%-]{0,30}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn status_lists(s in texty()) {
        if let Ok(set) = s.parse::<StatusSet>() {
            // Whatever parsed holds only real status codes.
            prop_assert!(!set.contains(99) && !set.contains(600));
        }
    }

    #[test]
    fn status_ranges_round_trip(a in 100u16..=599, b in 100u16..=599) {
        let (lo, hi) = (a.min(b), a.max(b));
        let set: StatusSet = format!("{lo}-{hi}").parse().unwrap();
        prop_assert!(set.contains(lo) && set.contains(hi));
        prop_assert!(lo == 100 || !set.contains(lo - 1));
    }

    #[test]
    fn usage_errors_stay_one_line(s in any::<String>()) {
        let e = config::UsageError::new(format!("--x: '{s}' is bad"));
        prop_assert!(!e.0.contains('\n') && !e.0.contains('\r'));
    }

    #[test]
    fn extras_headers_addresses(s in texty()) {
        if let Ok((k, v)) = config::parse_extra(&s) {
            prop_assert_eq!(format!("{k}={v}"), s.clone());
        }
        let _ = config::parse_header(&s);
        if let Ok((host, port)) = config::parse_host_port("--tcp", &s) {
            prop_assert!(port > 0 && !host.is_empty());
        }
    }

    #[test]
    fn endpoints_env_files_routes(s in texty()) {
        if let Ok(eps) = discover::parse_endpoints("--endpoints", &s) {
            prop_assert!(eps.iter().all(|e| e.starts_with("http://") || e.starts_with("https://")));
        }
        let _ = discover::parse_env_file(&s);
        let _ = discover::parse_default_gateway(&s);
        let route = format!("Iface\tDestination\tGateway\nx\t00000000\t{s}\t0003\t0\t0\t0\t00000000\n");
        let _ = discover::parse_default_gateway(&route);
    }

    #[test]
    fn whole_run_configs(
        interval in texty(), timeout in texty(), ttl in texty(), rise in texty(),
        http in texty(), endpoints in texty(), status in texty(),
    ) {
        let args = RunArgs {
            key: "/k".into(),
            value: "v".into(),
            extra: vec![],
            shared: vec![],
            probe: ProbeArgs {
                http: Some(http),
                options: ProbeOptions { timeout: Some(timeout), expect_status: Some(status), ..Default::default() },
                ..Default::default()
            },
            timing: TimingArgs { interval: Some(interval), ttl: Some(ttl), rise: Some(rise), ..Default::default() },
            etcd: EtcdArgs { endpoints: Some(endpoints), ..Default::default() },
        };
        match config::run_config(&args, &MapEnv::default()) {
            // Accepted settings obey the contract's rules.
            Ok(c) => {
                let p = c.probe.unwrap();
                prop_assert!(p.timeout < c.timing.interval);
                prop_assert!(c.timing.ttl > c.timing.interval + p.timeout);
                prop_assert!(c.timing.ttl >= std::time::Duration::from_secs(2));
            }
            // Refusals are one line that names a flag.
            Err(e) => prop_assert!(!e.0.contains('\n') && (e.0.contains("--") || e.0.starts_with("KEY"))),
        }
    }
}
