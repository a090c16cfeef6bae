//! `sidekick`: parse → config → logging → signals → run → exit code.

use std::io::IsTerminal;
use std::process;

use clap::error::ErrorKind;
use clap::Parser;
use etcd_sidekick::cli::{CheckArgs, Cli, Command, DiscoverArgs, LogFormat, RunArgs};
use etcd_sidekick::config::{self, UsageError};
use etcd_sidekick::discover::SystemEnv;
use etcd_sidekick::exit::ExitCode;
use etcd_sidekick::probe::Probe;
use etcd_sidekick::registry::{connect_options, EtcdRegistry};
use etcd_sidekick::shutdown;
use etcd_sidekick::sidekick::{self, Plan};
use tracing::info;

/// How a command failed.
enum Failure {
    /// Bad flags: exit 2.
    Usage(String),
    /// Something at run time: exit 1.
    Runtime(anyhow::Error),
}

impl From<UsageError> for Failure {
    fn from(e: UsageError) -> Self {
        Failure::Usage(e.0)
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Runtime(e)
    }
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => clap_exit(e),
    };
    init_logging(cli.log_format);
    let code = match dispatch(cli.command) {
        Ok(code) => code,
        Err(Failure::Usage(msg)) => {
            eprintln!("sidekick: {msg}");
            ExitCode::Usage
        }
        Err(Failure::Runtime(err)) => {
            eprintln!("sidekick: {err:#}");
            ExitCode::Failure
        }
    };
    process::exit(code.code());
}

/// Help and version print as clap does; every other parse error becomes one
/// line naming the flag, and exit 2.
fn clap_exit(e: clap::Error) -> ! {
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        e.exit();
    }
    // The first paragraph of clap's message, folded onto one line.
    let text = e.render().to_string();
    let line = text
        .lines()
        .map(str::trim)
        .skip_while(|l| l.is_empty())
        .take_while(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    let line = match e.kind() {
        ErrorKind::MissingSubcommand | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            "a command is required: run, check or discover (see --help)"
        }
        _ => line.trim_start_matches("error: "),
    };
    eprintln!("sidekick: {line}");
    process::exit(ExitCode::Usage.code());
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    // One thread is plenty for one probe and one lease, and keeps the
    // footprint small on every node.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Runtime(anyhow::Error::new(e).context("could not start the async runtime")))
}

fn dispatch(command: Command) -> Result<ExitCode, Failure> {
    match command {
        Command::Run(args) => run(args),
        Command::Check(args) => check(args),
        Command::Discover(args) => discover(args),
    }
}

fn run(args: RunArgs) -> Result<ExitCode, Failure> {
    let cfg = config::run_config(&args, &SystemEnv)?;
    let options = connect_options(&cfg.etcd).map_err(Failure::Usage)?;
    let probe = cfg
        .probe
        .as_ref()
        .map(Probe::new)
        .transpose()
        .map_err(|e| Failure::Runtime(e.into()))?;
    let d = &cfg.etcd.discovery;
    let endpoints = d.endpoints.join(",");
    match &args.probe {
        _ if probe.is_none() => info!(
            endpoints = %endpoints,
            rule = %d.rule,
            "no probe given: announcing unconditionally while running; etcd at {endpoints} (chosen by {})",
            d.rule
        ),
        p => info!(
            endpoints = %endpoints,
            rule = %d.rule,
            "probing {}; etcd at {endpoints} (chosen by {})",
            p.http.as_deref().or(p.tcp.as_deref()).unwrap_or_default(),
            d.rule
        ),
    }
    let plan = Plan {
        keys: cfg.keys.clone(),
        timing: cfg.timing.clone(),
        stop_timeout: cfg.etcd.dial_timeout,
    };
    let registry = EtcdRegistry::new(d.endpoints.clone(), options, cfg.etcd.dial_timeout);
    runtime()?.block_on(async {
        let token =
            shutdown::on_signals().map_err(|e| anyhow::Error::new(e).context("could not install signal handlers"))?;
        sidekick::run(&plan, probe, registry, token).await;
        Ok::<_, Failure>(())
    })?;
    Ok(ExitCode::Success)
}

fn check(args: CheckArgs) -> Result<ExitCode, Failure> {
    let Some(spec) = config::probe_spec(&args.probe)? else {
        return Err(Failure::Usage("check needs --http URL or --tcp HOST:PORT".into()));
    };
    let probe = Probe::new(&spec).map_err(|e| Failure::Runtime(e.into()))?;
    let outcome = runtime()?.block_on(probe.check());
    println!("{outcome}");
    Ok(if outcome.ok {
        ExitCode::Success
    } else {
        ExitCode::Failure
    })
}

fn discover(args: DiscoverArgs) -> Result<ExitCode, Failure> {
    let settings = config::etcd_settings(&args.etcd, &SystemEnv)?;
    let options = connect_options(&settings).map_err(Failure::Usage)?;
    let d = &settings.discovery;
    println!("{} ({})", d.endpoints.join(","), d.rule);
    if !args.check {
        return Ok(ExitCode::Success);
    }
    let timeout = settings.dial_timeout;
    let answer = runtime()?.block_on(async {
        let mut last = None;
        for ep in &d.endpoints {
            let attempt = async {
                let mut c = etcd_client::Client::connect([ep.as_str()], Some(options.clone())).await?;
                c.status().await
            };
            match tokio::time::timeout(timeout, attempt).await {
                Ok(Ok(status)) => return Ok((ep.clone(), status.version().to_string())),
                Ok(Err(e)) => last = Some(format!("{ep}: {e}")),
                Err(_) => {
                    last = Some(format!(
                        "{ep}: no answer within {}",
                        humantime::format_duration(timeout)
                    ))
                }
            }
        }
        Err(last.unwrap_or_default())
    });
    match answer {
        Ok((ep, version)) => {
            println!("etcd {version} answers at {ep}");
            Ok(ExitCode::Success)
        }
        Err(why) => Err(Failure::Runtime(anyhow::anyhow!("etcd does not answer: {why}"))),
    }
}
