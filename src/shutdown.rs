//! Signals → cancellation: the first SIGTERM/SIGINT (and SIGHUP for `run`) cancels the token, which
//! every loop watches; a second one exits at once. SIGUSR1/SIGUSR2 are the
//! maintenance switch, SIGHUP the agent's reload.

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::exit::ExitCode;

/// Installs the handlers and returns the token they cancel; with `hangup`
/// SIGHUP stops too (`run`: a closed terminal), else it is left to the
/// agent's reload. `stopping` is what the log line says is done next.
/// Must be called inside a tokio runtime.
pub fn on_signals(hangup: bool, stopping: &'static str) -> std::io::Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = if hangup {
        Some(signal(SignalKind::hangup())?)
    } else {
        None
    };
    let cancel = token.clone();
    tokio::spawn(async move {
        let mut next = async || {
            tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                _ = async { hup.as_mut().expect("checked").recv().await }, if hup.is_some() => "SIGHUP",
            }
        };
        let name = next().await;
        info!(signal = name, "stopping: {stopping}");
        cancel.cancel();
        let name = next().await;
        warn!(signal = name, "second signal: exiting at once");
        std::process::exit(ExitCode::Success.code());
    });
    Ok(token)
}

/// SIGUSR1 (enter) and SIGUSR2 (leave) as a maintenance switch. Must be
/// called inside a tokio runtime.
pub fn maintenance_switch() -> std::io::Result<tokio::sync::watch::Receiver<bool>> {
    let mut enter = signal(SignalKind::user_defined1())?;
    let mut leave = signal(SignalKind::user_defined2())?;
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        loop {
            let on = tokio::select! {
                _ = enter.recv() => true,
                _ = leave.recv() => false,
            };
            info!(signal = if on { "SIGUSR1" } else { "SIGUSR2" }, "maintenance switch");
            if tx.send(on).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

/// SIGHUP as a counter that goes up on every signal: the agent reloads its
/// configuration when it changes. Must be called inside a tokio runtime.
pub fn on_reload() -> std::io::Result<tokio::sync::watch::Receiver<u64>> {
    let mut hup = signal(SignalKind::hangup())?;
    let (tx, rx) = tokio::sync::watch::channel(0u64);
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            info!(signal = "SIGHUP", "reloading the configuration");
            tx.send_modify(|n| *n += 1);
            if tx.is_closed() {
                return;
            }
        }
    });
    Ok(rx)
}
