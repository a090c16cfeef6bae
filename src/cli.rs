//! Raw command-line flags as clap sees them: names, env vars and help text.
//!
//! Nothing here is validated beyond what clap does by itself; `config` turns
//! these into settings and applies every cross-flag rule.

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Keep a service instance registered in etcd while it is healthy.
#[derive(Debug, Parser)]
#[command(name = "sidekick", version, about, propagate_version = true)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "SIDEKICK_LOG_FORMAT")]
    pub log_format: LogFormat,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line, for journald and log shippers.
    Json,
}

/// The subcommands. Parsed once at start, so the size of `run` does not matter.
#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Probe the instance and keep KEY=VALUE in etcd while it is healthy.
    Run(RunArgs),
    /// Probe the instance once; exit 0 when healthy, 1 when not.
    Check(CheckArgs),
    /// Put KEY=VALUE once: permanently, or under a lease with --ttl.
    Announce(AnnounceArgs),
    /// Delete KEY (or every key under it), optionally only if it still holds a value.
    Withdraw(WithdrawArgs),
    /// Print the etcd endpoints and the rule that chose them.
    Discover(DiscoverArgs),
    /// List keys under PREFIX with their values and remaining lease TTL.
    List(ListArgs),
    /// Many services in one process, under one lease, from a TOML file or a directory of them.
    Agent(AgentArgs),
    /// Wait until every KEY exists (or, with --gone, none does), or until enough keys exist under --prefix.
    Wait(WaitCmdArgs),
    /// Print the worst-case reaction times that run's probe and timing flags give, with warnings.
    Explain(ExplainArgs),
    /// Render templates from the keys under prefixes into files (HAProxy, nginx), check, install and reload, following etcd.
    Render(RenderArgs),
}

/// `sidekick run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The key to keep in etcd, e.g. /services/web/host1.
    pub key: String,
    /// Its value, e.g. 10.0.0.5:8080.
    pub value: String,
    /// Another KEY=VALUE to keep under the same lease (repeatable).
    #[arg(long = "extra", value_name = "KEY=VALUE", help_heading = "More keys")]
    pub extra: Vec<String>,
    /// A service-level KEY=VALUE that every instance declares (repeatable):
    /// held jointly, put when absent, never overwritten.
    #[arg(long = "shared", value_name = "KEY=VALUE", help_heading = "More keys")]
    pub shared: Vec<String>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub ops: OperabilityArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub probe: ProbeArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub timing: TimingArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub etcd: EtcdArgs,
}

/// `sidekick agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// A TOML file, or a directory of *.toml, with [services.NAME] tables (SIGHUP reloads it).
    #[arg(long, value_name = "PATH", env = "SIDEKICK_CONFIG")]
    pub config: String,
    /// TTL of the process's lease [default: 15s].
    #[arg(long, value_name = "D", env = "SIDEKICK_TTL")]
    pub ttl: Option<String>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub ops: OperabilityArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub etcd: EtcdArgs,
}

/// `sidekick render`.
#[derive(Debug, Args)]
pub struct RenderArgs {
    /// The template (MiniJinja), unless --config.
    pub src: Option<String>,
    /// The file it is installed as, unless --config.
    pub dest: Option<String>,
    /// A TOML file, or a directory of *.toml, with [templates.NAME] tables (SIGHUP reloads it).
    #[arg(long, value_name = "PATH", env = "SIDEKICK_RENDER_CONFIG")]
    pub config: Option<String>,
    /// A prefix whose keys the template sees (repeatable).
    #[arg(long = "prefix", value_name = "P", help_heading = "Template")]
    pub prefixes: Vec<String>,
    /// Run on the staged file before it replaces DEST ({{src}} is its path); failing keeps DEST.
    #[arg(long, value_name = "CMD", help_heading = "Template")]
    pub check_cmd: Option<String>,
    /// Run after DEST was replaced, e.g. `systemctl reload haproxy`.
    #[arg(long, value_name = "CMD", help_heading = "Template")]
    pub reload_cmd: Option<String>,
    /// DEST's mode, octal [default: the installed file's, else 0644].
    #[arg(long, value_name = "OCTAL", help_heading = "Template")]
    pub mode: Option<String>,
    /// After a change, render once none came for MIN, at the latest MAX (4×MIN) after the first.
    #[arg(long, value_name = "MIN[:MAX]", help_heading = "Template")]
    pub wait: Option<String>,
    /// Render every template once and exit: 0 installed or unchanged, 1 on any failure.
    #[arg(long)]
    pub once: bool,
    /// Print the renderings to stdout and install or run nothing (implies --once).
    #[arg(long)]
    pub dry_run: bool,
    /// After etcd lost its data, wait this long for the sidekicks to register again before rendering [default: 15s].
    #[arg(long, value_name = "D", env = "SIDEKICK_SETTLE")]
    pub settle: Option<String>,
    /// Serve /healthz, /status (JSON) and /metrics (Prometheus) on HOST:PORT [default: off].
    #[arg(
        long,
        value_name = "HOST:PORT",
        env = "SIDEKICK_STATUS_ADDR",
        help_heading = "Operability"
    )]
    pub status_addr: Option<String>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub etcd: EtcdArgs,
}

/// What operators see and switch: `run` and `agent`.
#[derive(Debug, Args, Default, Clone)]
#[command(next_help_heading = "Operability")]
pub struct OperabilityArgs {
    /// Serve /healthz, /status (JSON) and /metrics (Prometheus) on HOST:PORT [default: off].
    #[arg(long, value_name = "HOST:PORT", env = "SIDEKICK_STATUS_ADDR")]
    pub status_addr: Option<String>,
    /// While PATH exists the keys are withdrawn and probing goes on (also SIGUSR1 enters, SIGUSR2 leaves).
    #[arg(long, value_name = "PATH", env = "SIDEKICK_MAINTENANCE_FILE")]
    pub maintenance_file: Option<String>,
}

/// `sidekick check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub probe: ProbeArgs,
}

/// `sidekick announce`.
#[derive(Debug, Args)]
pub struct AnnounceArgs {
    /// The key to put, e.g. /services/web/host1.
    pub key: String,
    /// Its value, e.g. 10.0.0.5:8080.
    pub value: String,
    /// Another KEY=VALUE to put with it (repeatable).
    #[arg(long = "extra", value_name = "KEY=VALUE", help_heading = "More keys")]
    pub extra: Vec<String>,
    /// Put the keys under a lease of this TTL and print the lease id; without it the keys are permanent.
    #[arg(long, value_name = "D")]
    pub ttl: Option<String>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub wait: WaitArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub etcd: EtcdArgs,
}

/// `sidekick withdraw`.
#[derive(Debug, Args)]
pub struct WithdrawArgs {
    /// The key to delete.
    pub key: String,
    /// Delete only if the key still holds this value (one etcd transaction).
    #[arg(long, value_name = "V", conflicts_with = "prefix")]
    pub if_value: Option<String>,
    /// Delete every key that starts with KEY.
    #[arg(long)]
    pub prefix: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub etcd: EtcdArgs,
}

/// `sidekick list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only keys starting with this; every key when left out.
    pub prefix: Option<String>,
    /// One JSON object a line: key, value, lease (hex or null), ttl (seconds or null).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub etcd: EtcdArgs,
}

/// `sidekick wait`.
#[derive(Debug, Args)]
pub struct WaitCmdArgs {
    /// Keys that must all exist; with --gone, that must all be absent.
    #[arg(value_name = "KEY")]
    pub keys: Vec<String>,
    /// Count the keys that start with P (a raw prefix) instead of naming them.
    #[arg(long, value_name = "P")]
    pub prefix: Option<String>,
    /// With --prefix: at least N keys; with --gone, at most N [default: 1, or 0 with --gone].
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub count: Option<String>,
    /// Wait for the keys to go instead.
    #[arg(long)]
    pub gone: bool,
    /// Give up after this long and exit 1 [default: 60s].
    #[arg(long, value_name = "D")]
    pub timeout: Option<String>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub etcd: EtcdArgs,
}

/// `sidekick explain`: the probe and timing flags of `run`, without KEY VALUE.
#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub probe: ProbeArgs,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub timing: TimingArgs,
    /// Time limit for connecting to etcd and for each request [default: 5s].
    #[arg(long, value_name = "D", env = "SIDEKICK_DIAL_TIMEOUT", help_heading = "etcd")]
    pub dial_timeout: Option<String>,
}

/// `sidekick discover`.
#[derive(Debug, Args)]
pub struct DiscoverArgs {
    /// Also ask etcd whether it answers; exit 1 if it does not.
    #[arg(long)]
    pub check: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub etcd: EtcdArgs,
}

/// How the instance is probed by `run` and `check`.
#[derive(Debug, Args, Default, Clone)]
#[command(next_help_heading = "Probe")]
pub struct ProbeArgs {
    /// Probe with an HTTP(S) request to URL.
    #[arg(long, value_name = "URL", env = "SIDEKICK_HTTP")]
    pub http: Option<String>,
    /// Probe by opening a TCP connection to HOST:PORT.
    #[arg(long, value_name = "HOST:PORT", env = "SIDEKICK_TCP")]
    pub tcp: Option<String>,
    /// Probe by running CMD with /bin/sh -c: healthy when it exits 0 within
    /// --timeout; the first line of its output is shown.
    #[arg(long, value_name = "CMD", env = "SIDEKICK_EXEC")]
    pub exec: Option<String>,
    /// Probe with the gRPC health checking protocol at HOST:PORT: healthy
    /// when grpc.health.v1.Health/Check answers SERVING.
    #[arg(long, value_name = "HOST:PORT", env = "SIDEKICK_GRPC")]
    pub grpc: Option<String>,
    /// The service name --grpc asks about [default: empty, the whole server].
    #[arg(long, value_name = "NAME", env = "SIDEKICK_GRPC_SERVICE")]
    pub grpc_service: Option<String>,
    /// Connect --grpc over TLS, verified against the system's roots unless --insecure.
    #[arg(long, env = "SIDEKICK_GRPC_TLS")]
    pub grpc_tls: bool,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub options: ProbeOptions,
}

/// What `announce` waits for before it writes.
#[derive(Debug, Args, Default)]
#[command(next_help_heading = "Wait")]
pub struct WaitArgs {
    /// Before writing, wait until an HTTP(S) request to URL passes.
    #[arg(long, value_name = "URL", conflicts_with = "wait_tcp")]
    pub wait_http: Option<String>,
    /// Before writing, wait until a TCP connection to HOST:PORT opens.
    #[arg(long, value_name = "HOST:PORT")]
    pub wait_tcp: Option<String>,
    /// How long to wait for the instance to be healthy [default: 60s].
    #[arg(long, value_name = "D")]
    pub wait_timeout: Option<String>,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub options: ProbeOptions,
}

/// Options shared by every probe.
#[derive(Debug, Args, Default, Clone)]
#[command(next_help_heading = "Probe")]
pub struct ProbeOptions {
    /// Healthy status codes: a comma list of codes and ranges [default: 200-399].
    #[arg(long, value_name = "LIST", env = "SIDEKICK_EXPECT_STATUS")]
    pub expect_status: Option<String>,
    /// Text the response body must contain (first 64 KiB read).
    #[arg(long, value_name = "TEXT", env = "SIDEKICK_EXPECT_BODY")]
    pub expect_body: Option<String>,
    /// Request header 'Name: value' (repeatable); Host: is honoured.
    #[arg(long = "header", value_name = "NAME: VALUE")]
    pub headers: Vec<String>,
    /// HTTP method [default: GET].
    #[arg(long, value_name = "M", env = "SIDEKICK_METHOD")]
    pub method: Option<String>,
    /// Skip TLS certificate verification for https:// and --grpc-tls probes.
    #[arg(long, env = "SIDEKICK_INSECURE")]
    pub insecure: bool,
    /// Time limit of one probe; must be smaller than --interval [default: 2s].
    #[arg(long, value_name = "D", env = "SIDEKICK_TIMEOUT")]
    pub timeout: Option<String>,
}

/// When to probe, and how the lease is timed.
#[derive(Debug, Args, Default)]
#[command(next_help_heading = "Timing")]
pub struct TimingArgs {
    /// Time between probe starts, jittered by up to 10 % [default: 5s].
    #[arg(long, value_name = "D", env = "SIDEKICK_INTERVAL")]
    pub interval: Option<String>,
    /// Consecutive successes before the keys are put [default: 2].
    #[arg(long, value_name = "N", env = "SIDEKICK_RISE")]
    pub rise: Option<String>,
    /// Consecutive failures before the keys are removed [default: 2].
    #[arg(long, value_name = "N", env = "SIDEKICK_FALL")]
    pub fall: Option<String>,
    /// Lease TTL; at least 2s and more than --interval + --timeout [default: 15s].
    #[arg(long, value_name = "D", env = "SIDEKICK_TTL")]
    pub ttl: Option<String>,
    /// Failures this long after start do not count [default: 0s].
    #[arg(long, value_name = "D", env = "SIDEKICK_GRACE")]
    pub grace: Option<String>,
    /// On SIGTERM/SIGINT remove the keys, then wait this long [default: 0s].
    #[arg(long, value_name = "D", env = "SIDEKICK_DRAIN")]
    pub drain: Option<String>,
}

/// Where etcd is and how to talk to it.
#[derive(Debug, Args, Default)]
#[command(next_help_heading = "etcd")]
pub struct EtcdArgs {
    /// etcd client URLs, comma-separated; else the variables, the env file, the default gateway, 127.0.0.1 [env: SIDEKICK_ENDPOINTS, ETCDCTL_ENDPOINTS]
    #[arg(long, value_name = "URL[,URL]")]
    pub endpoints: Option<String>,
    /// File read for ETCD_ENDPOINT/ETCD_ENDPOINTS/ETCDCTL_ENDPOINTS [default: /etc/etcd.environment].
    #[arg(long, value_name = "PATH", env = "SIDEKICK_ENV_FILE")]
    pub env_file: Option<String>,
    /// etcd user, NAME or NAME:PASS.
    #[arg(long, value_name = "NAME[:PASS]", env = "ETCDCTL_USER", hide_env_values = true)]
    pub user: Option<String>,
    /// etcd password; prefer SIDEKICK_PASSWORD, which stays out of the process list.
    #[arg(long, value_name = "PASS")]
    pub password: Option<String>,
    /// CA bundle that verifies etcd's certificate.
    #[arg(long, value_name = "PATH", env = "ETCDCTL_CACERT")]
    pub cacert: Option<String>,
    /// Client certificate for etcd.
    #[arg(long, value_name = "PATH", env = "ETCDCTL_CERT")]
    pub cert: Option<String>,
    /// Private key of the client certificate.
    #[arg(long = "key", id = "tls_key", value_name = "PATH", env = "ETCDCTL_KEY")]
    pub tls_key: Option<String>,
    /// Time limit for connecting to etcd and for each request [default: 5s].
    #[arg(long, value_name = "D", env = "SIDEKICK_DIAL_TIMEOUT")]
    pub dial_timeout: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn log_format_goes_before_or_after_the_subcommand() {
        for argv in [
            &["sidekick", "--log-format", "json", "check", "--tcp", "h:1"][..],
            &["sidekick", "check", "--tcp", "h:1", "--log-format", "json"][..],
        ] {
            let cli = Cli::try_parse_from(argv).unwrap();
            assert_eq!(cli.log_format, LogFormat::Json);
        }
    }
}
