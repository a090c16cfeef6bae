//! `sidekick`: parse → config → logging → signals → run → exit code.

use std::io::{IsTerminal, Write};
use std::process;

use clap::error::ErrorKind;
use clap::Parser;
use etcd_sidekick::agent;
use etcd_sidekick::cli::{
    AgentArgs, AnnounceArgs, CheckArgs, Cli, Command, DiscoverArgs, ListArgs, LogFormat, RenderArgs, RunArgs,
    WithdrawArgs,
};
use etcd_sidekick::config::{self, EtcdSettings, UsageError};
use etcd_sidekick::discover::SystemEnv;
use etcd_sidekick::exit::ExitCode;
use etcd_sidekick::hooks::Hooks;
use etcd_sidekick::oneshot::{self, Report};
use etcd_sidekick::probe::Probe;
use etcd_sidekick::registry::{connect_options, EtcdRegistry};
use etcd_sidekick::shutdown;
use etcd_sidekick::wait;
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
/// line naming the flag (with clap's "a similar argument exists" tip when it
/// has one), and exit 2. A missing argument adds clap's usage line.
fn clap_exit(e: clap::Error) -> ! {
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        e.exit();
    }
    eprintln!("sidekick: {}", clap_message(&e));
    process::exit(ExitCode::Usage.code());
}

/// clap's message as this command prints it (see [`clap_exit`]).
fn clap_message(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    // The first paragraph of clap's message, folded onto one line.
    let first = lines
        .iter()
        .skip_while(|l| l.is_empty())
        .take_while(|l| !l.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    let mut line = match e.kind() {
        ErrorKind::MissingSubcommand | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            return "a command is required: run, agent, render, check, announce, withdraw, discover, list, wait or explain (see --help)".into();
        }
        _ => first.trim_start_matches("error: ").to_string(),
    };
    for tip in lines.iter().filter(|l| l.starts_with("tip:")) {
        line.push_str(&format!("; {}", tip.trim_start_matches("tip:").trim()));
    }
    if e.kind() == ErrorKind::MissingRequiredArgument {
        if let Some(usage) = lines.iter().find(|l| l.starts_with("Usage:")) {
            line.push('\n');
            line.push_str(usage);
        }
    }
    line
}

fn init_logging(format: LogFormat) {
    // RUST_LOG as `level` or `target=level,...`; a plain target filter
    // rather than EnvFilter, whose regex engine would cost every sidekick
    // memory for a feature it does not need.
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse::<tracing_subscriber::filter::Targets>().ok())
        .unwrap_or_else(|| tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO));
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry.with(fmt.with_ansi(std::io::stderr().is_terminal())).init(),
        LogFormat::Json => registry.with(fmt.json().flatten_event(true)).init(),
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

/// Runs `f` to completion, then shuts the runtime down without waiting
/// for blocking work (a name lookup stuck in the resolver, say), so the
/// exit bound holds whatever is still in flight.
fn block_on<F: std::future::Future>(f: F) -> Result<F::Output, Failure> {
    let rt = runtime()?;
    let out = rt.block_on(f);
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    Ok(out)
}

fn dispatch(command: Command) -> Result<ExitCode, Failure> {
    match command {
        Command::Run(args) => run(args),
        Command::Agent(args) => agent(args),
        Command::Check(args) => check(args),
        Command::Announce(args) => announce(args),
        Command::Withdraw(args) => withdraw(args),
        Command::Discover(args) => discover(args),
        Command::List(args) => list(args),
        Command::Explain(args) => {
            print!("{}", etcd_sidekick::explain::command(&args)?);
            Ok(ExitCode::Success)
        }
        Command::Render(args) => render(args),
        Command::Wait(args) => match wait::run(&args, &SystemEnv) {
            Ok(()) => Ok(ExitCode::Success),
            Err(wait::Error::Usage(e)) => Err(e.into()),
            Err(e) => Err(Failure::Runtime(e.into())),
        },
    }
}

fn run(args: RunArgs) -> Result<ExitCode, Failure> {
    let cfg = config::run_config(&args, &SystemEnv)?;
    let options = connect_options(&cfg.etcd).map_err(Failure::Usage)?;
    // A probe that cannot be set up fails now, before anything is written;
    // the engine is handed this one rather than building it again.
    let probe = cfg
        .probe
        .as_ref()
        .map(Probe::new)
        .transpose()
        .map_err(|e| Failure::Runtime(e.into()))?;
    let probe = std::sync::Mutex::new(probe);
    let build = |_: &etcd_sidekick::engine::Service| Ok(probe.lock().expect("probe lock").take());
    let d = &cfg.etcd.discovery;
    let endpoints = d.endpoints.join(",");
    match &cfg.probe {
        None => info!(
            endpoints = %endpoints,
            rule = %d.rule,
            "no probe given: announcing unconditionally while running"
        ),
        Some(_) => {
            // An --exec command may carry a secret: its first word only,
            // the whole of it at debug.
            let target = match &args.probe.exec {
                Some(cmd) => {
                    tracing::debug!(command = %cmd, "the exec probe's command");
                    format!("with --exec {} ...", cmd.split_whitespace().next().unwrap_or_default())
                }
                None => [&args.probe.http, &args.probe.tcp, &args.probe.grpc]
                    .into_iter()
                    .find_map(|f| f.clone())
                    .unwrap_or_default(),
            };
            info!(endpoints = %endpoints, rule = %d.rule, "probing {target}")
        }
    }
    let service = etcd_sidekick::run::service(&cfg);
    let settings = etcd_sidekick::run::settings(&cfg);
    let registry = EtcdRegistry::new(d.endpoints.clone(), options, cfg.call_bound());
    block_on(async {
        let signals = |e| anyhow::Error::new(e).context("could not install signal handlers");
        // A closed terminal (SIGHUP) stops `run` like SIGTERM, withdrawing.
        let token = shutdown::on_signals(true, "withdrawing the keys").map_err(signals)?;
        let switch = shutdown::maintenance_switch().map_err(signals)?;
        let mut hooks = Hooks::new(&cfg.ops, &d.endpoints[0], true, Some(switch), token.clone())
            .await
            .map_err(|e| status_addr_error(e, &cfg.ops))?;
        hooks.etcd_hint = d.hint();
        etcd_sidekick::run::run(service, &settings, &build, registry, &hooks, token).await;
        Ok::<_, Failure>(())
    })??;
    Ok(ExitCode::Success)
}

fn agent(args: AgentArgs) -> Result<ExitCode, Failure> {
    let cfg = agent::agent_config(&args, &SystemEnv)?;
    let options = connect_options(&cfg.etcd).map_err(Failure::Usage)?;
    let d = &cfg.etcd.discovery;
    info!(endpoints = %d.endpoints.join(","), rule = %d.rule, config = %args.config, "agent");
    let registry = EtcdRegistry::new(d.endpoints.clone(), options, cfg.call_bound());
    block_on(async {
        let signals = |e| anyhow::Error::new(e).context("could not install signal handlers");
        let token = shutdown::on_signals(false, "withdrawing the keys").map_err(signals)?;
        let switch = shutdown::maintenance_switch().map_err(signals)?;
        let reload = shutdown::on_reload().map_err(signals)?;
        let mut hooks = Hooks::new(&cfg.ops, &d.endpoints[0], false, Some(switch), token.clone())
            .await
            .map_err(|e| status_addr_error(e, &cfg.ops))?;
        hooks.etcd_hint = d.hint();
        agent::run(&cfg, registry, &hooks, token, reload).await;
        Ok::<_, Failure>(())
    })??;
    Ok(ExitCode::Success)
}

fn render(args: RenderArgs) -> Result<ExitCode, Failure> {
    use etcd_sidekick::render::{self, board::Board, Outside, Shared};
    let plan = render::config::plan(&args)?;
    let settings = config::etcd_settings(&args.etcd, &SystemEnv)?;
    let settle = plan.settle;
    let status_addr = args
        .status_addr
        .as_deref()
        .map(|a| config::parse_host_port("--status-addr", a))
        .transpose()?;
    // Without a leader a member may answer from stale data; with this,
    // reads and the watch fail over to a member that has one.
    let options = connect_options(&settings)
        .map_err(Failure::Usage)?
        .with_require_leader(true);
    let d = &settings.discovery;
    let call_bound = settings.dial_timeout;
    if args.once || args.dry_run {
        let mut reg = EtcdRegistry::one_shot(d.endpoints.clone(), options, call_bound);
        let ok = runtime()?.block_on(render::once(&plan.specs, &mut reg, call_bound, args.dry_run, &d.hint()));
        return Ok(if ok { ExitCode::Success } else { ExitCode::Failure });
    }
    info!(
        endpoints = %d.endpoints.join(","),
        rule = %d.rule,
        templates = plan.specs.len(),
        "render"
    );
    block_on(async {
        let signals = |e| anyhow::Error::new(e).context("could not install signal handlers");
        let token = shutdown::on_signals(false, "the installed files stay").map_err(signals)?;
        let reload = shutdown::on_reload().map_err(signals)?;
        let board = match &status_addr {
            None => None,
            Some(addr) => {
                let board = std::sync::Arc::new(Board::default());
                etcd_sidekick::status::bind_and_serve(
                    addr,
                    etcd_sidekick::status::View::Other(board.clone()),
                    token.clone(),
                )
                .await
                .map_err(|e| {
                    anyhow::Error::new(e).context(format!("could not serve --status-addr {}:{}", addr.0, addr.1))
                })?;
                Some(board)
            }
        };
        let notifier = etcd_sidekick::notify::Systemd::from_env();
        let hooks = Hooks {
            watchdog: notifier
                .as_ref()
                .and_then(|_| etcd_sidekick::notify::Systemd::watchdog_period()),
            notifier: notifier.map(|n| std::sync::Arc::new(n) as std::sync::Arc<dyn etcd_sidekick::notify::Notifier>),
            ..Hooks::default()
        };
        let outside = Outside {
            config: plan.config.clone(),
            board,
            hooks,
            reload,
        };
        let shared = std::sync::Arc::new(Shared {
            reloading: tokio::sync::Mutex::new(()),
            settle,
            call_bound,
            hint: d.hint(),
        });
        let endpoints = d.endpoints.clone();
        let make = || EtcdRegistry::new(endpoints.clone(), options.clone(), call_bound);
        tokio::task::LocalSet::new()
            .run_until(render::run(plan.specs, make, shared, outside, token))
            .await;
        Ok::<_, Failure>(())
    })??;
    Ok(ExitCode::Success)
}

/// A one-shot command's etcd failure; when etcd did not answer, with how
/// its endpoint was chosen and how to choose another.
fn etcd_failure(e: etcd_sidekick::registry::RegistryError, d: &etcd_sidekick::discover::Discovery) -> Failure {
    if e.kind == etcd_sidekick::registry::ErrorKind::Unavailable {
        Failure::Runtime(anyhow::anyhow!("{e} ({})", d.hint()))
    } else {
        Failure::Runtime(e.into())
    }
}

/// A `--status-addr` that could not be bound, named with its address.
fn status_addr_error(e: std::io::Error, ops: &config::Operability) -> anyhow::Error {
    let addr = ops
        .status_addr
        .as_ref()
        .map(|(h, p)| {
            if h.contains(':') {
                format!(" [{h}]:{p}")
            } else {
                format!(" {h}:{p}")
            }
        })
        .unwrap_or_default();
    anyhow::Error::new(e).context(format!("could not serve --status-addr{addr}"))
}

fn check(args: CheckArgs) -> Result<ExitCode, Failure> {
    let spec = config::check_probe(&args)?;
    let probe = Probe::new(&spec).map_err(|e| Failure::Runtime(e.into()))?;
    let outcome = runtime()?.block_on(probe.check());
    println!("{outcome}");
    Ok(if outcome.ok {
        ExitCode::Success
    } else {
        ExitCode::Failure
    })
}

/// The registry of a one-shot command (each request tries the endpoints
/// in turn within the dial timeout), checked before anything is sent.
fn one_shot_registry(settings: &EtcdSettings) -> Result<EtcdRegistry, Failure> {
    let options = connect_options(settings).map_err(Failure::Usage)?;
    Ok(EtcdRegistry::one_shot(
        settings.discovery.endpoints.clone(),
        options,
        settings.dial_timeout,
    ))
}

fn announce(args: AnnounceArgs) -> Result<ExitCode, Failure> {
    let cfg = config::announce_config(&args, &SystemEnv)?;
    let mut reg = one_shot_registry(&cfg.etcd)?;
    let wait = match &cfg.wait {
        Some((spec, limit)) => Some((Probe::new(spec).map_err(|e| Failure::Runtime(e.into()))?, *limit)),
        None => None,
    };
    let wait = wait.as_ref().map(|(p, limit)| (p, *limit));
    let lease = runtime()?
        .block_on(oneshot::announce_when_healthy(
            &mut reg,
            cfg.etcd.dial_timeout,
            &cfg.keys,
            cfg.ttl,
            wait,
        ))
        .map_err(|e| match e {
            oneshot::AnnounceError::Etcd(e) => etcd_failure(e, &cfg.etcd.discovery),
            other => Failure::Runtime(other.into()),
        })?;
    if let Some(lease) = lease {
        println!("{lease}");
    }
    Ok(ExitCode::Success)
}

fn withdraw(args: WithdrawArgs) -> Result<ExitCode, Failure> {
    let settings = config::withdraw_settings(&args, &SystemEnv)?;
    let mut reg = one_shot_registry(&settings)?;
    let if_value = args.if_value.as_deref();
    let done = runtime()?
        .block_on(oneshot::withdraw(
            &mut reg,
            settings.dial_timeout,
            &args.key,
            if_value,
            args.prefix,
        ))
        .map_err(|e| etcd_failure(e, &settings.discovery))?;
    match done.report(&args.key, if_value) {
        Report::Stdout(line) => println!("{line}"),
        Report::Stderr(note) => eprintln!("sidekick: {note}"),
    }
    Ok(ExitCode::Success)
}

fn list(args: ListArgs) -> Result<ExitCode, Failure> {
    let settings = config::etcd_settings(&args.etcd, &SystemEnv)?;
    let mut reg = one_shot_registry(&settings)?;
    let entries = runtime()?
        .block_on(oneshot::list(&mut reg, settings.dial_timeout, args.prefix.as_deref()))
        .map_err(|e| etcd_failure(e, &settings.discovery))?;
    let mut out = std::io::stdout().lock();
    for e in entries {
        if writeln!(out, "{}", e.line(args.json)).is_err() {
            // stdout closed (e.g. piped into head): nothing more to say.
            break;
        }
    }
    Ok(ExitCode::Success)
}

fn discover(args: DiscoverArgs) -> Result<ExitCode, Failure> {
    let settings = config::etcd_settings(&args.etcd, &SystemEnv)?;
    let mut reg = one_shot_registry(&settings)?;
    let d = &settings.discovery;
    println!("{} ({})", d.endpoints.join(","), d.rule);
    if !args.check {
        return Ok(ExitCode::Success);
    }
    let (endpoint, version) = runtime()?
        .block_on(oneshot::status(&mut reg, settings.dial_timeout))
        .map_err(|e| match etcd_failure(e, &settings.discovery) {
            Failure::Runtime(e) => Failure::Runtime(e.context("etcd does not answer")),
            other => other,
        })?;
    println!("etcd {version} answers at {endpoint}");
    Ok(ExitCode::Success)
}
