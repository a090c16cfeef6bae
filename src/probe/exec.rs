//! The exec probe: `/bin/sh -c CMD` in a process group of its own; healthy
//! when it exits 0 within the timeout.
//!
//! The shell and everything it starts share one process group. At the
//! timeout the whole group gets SIGKILL; after the shell exits, whatever it
//! left behind in the group gets SIGKILL too, so a probe that runs every few
//! seconds cannot pile up processes. The process becomes a child subreaper
//! the first time an exec probe is built, so killed grandchildren are
//! re-parented to us and reaped here rather than left to an init that may
//! not reap (a container whose PID 1 is not an init). A process that leaves
//! the group (`setsid`) is not ours to kill.
//!
//! The probe is judged by the shell's exit, never by its pipes: a command
//! that closes its output and keeps running still meets the timeout. Of its
//! output the first 4 KiB of stdout and of stderr are kept for the detail;
//! the rest is read and dropped, so a chatty command neither blocks on a
//! full pipe nor grows our memory.
//!
//! Signals go through `rustix` (a safe `kill(-pgid)`, `waitpid(-pgid)` and
//! `prctl`), since the library forbids `unsafe`.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::sync::Once;
use std::time::Duration;

use rustix::process::{kill_process_group, waitpgid, Pid, Signal, WaitOptions};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::time::{sleep, sleep_until, timeout, Instant};

/// How much of stdout and of stderr is kept for the detail.
const KEEP: usize = 4 * 1024;
/// The longest detail line, in characters.
const DETAIL_CHARS: usize = 200;
/// After the shell is gone, how long the rest of its output may take to
/// arrive (the pipes close as soon as the group is dead).
const READ_GRACE: Duration = Duration::from_millis(100);
/// How long a killed group may take to be reaped before we stop waiting.
const REAP_LIMIT: Duration = Duration::from_secs(1);

/// Runs a shell command.
#[derive(Debug)]
pub struct ExecProbe {
    command: String,
    pub(super) timeout: Duration,
}

impl ExecProbe {
    /// A probe running `command` with `/bin/sh -c`.
    pub fn new(command: &str, timeout: Duration) -> Self {
        ExecProbe {
            command: command.to_string(),
            timeout,
        }
    }

    /// Runs the command once and judges its exit; bounds its own time, and
    /// leaves no process of the group behind.
    pub(super) async fn check(&self) -> Result<String, String> {
        let ran = run(&self.command, self.timeout, true).await?;
        let line = first_line(&ran.stdout).or_else(|| first_line(&ran.stderr));
        let with_line = |what: String| match &line {
            Some(l) => format!("{what}: {l}"),
            None => what,
        };
        match ran.status {
            None => Err(with_line(format!(
                "timed out after {}",
                humantime::format_duration(self.timeout)
            ))),
            Some(Err(e)) => Err(format!("could not wait for /bin/sh: {e}")),
            Some(Ok(s)) if s.success() => Ok(with_line(describe(s))),
            Some(Ok(s)) => Err(with_line(describe(s))),
        }
    }
}

/// What a shell command did.
pub(crate) struct Ran {
    /// Its exit; `None` when it timed out (and was killed).
    pub status: Option<io::Result<ExitStatus>>,
    /// The first [`KEEP`] bytes of its stdout.
    pub stdout: Vec<u8>,
    /// The first [`KEEP`] bytes of its stderr.
    pub stderr: Vec<u8>,
}

impl Ran {
    /// Whether it exited 0.
    pub fn success(&self) -> bool {
        matches!(&self.status, Some(Ok(s)) if s.success())
    }

    /// `exit N`, `killed by signal N` or `timed out after D`, then its
    /// output (stdout, then stderr) on the same line, lines joined by ` | `.
    pub fn summary(&self, limit: Duration) -> String {
        let what = match &self.status {
            None => format!("timed out after {}", humantime::format_duration(limit)),
            Some(Err(e)) => format!("could not wait for /bin/sh: {e}"),
            Some(Ok(s)) => describe(*s),
        };
        let mut lines = Vec::new();
        for bytes in [&self.stdout, &self.stderr] {
            let text = String::from_utf8_lossy(bytes);
            lines.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(|l| l.chars().flat_map(char::escape_default).collect::<String>()),
            );
        }
        if lines.is_empty() {
            what
        } else {
            format!("{what}: {}", lines.join(" | "))
        }
    }
}

/// Runs `/bin/sh -c command` in a process group of its own, killing the
/// group at `limit`. With `kill_leftovers`, whatever the shell left in its
/// group is killed when it exits too (a probe); without, it stays (a
/// reload command may start a proxy in the background).
pub(crate) async fn run(command: &str, limit: Duration, kill_leftovers: bool) -> Result<Ran, String> {
    become_subreaper();
    let deadline = Instant::now() + limit;
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("could not start /bin/sh: {e}"))?;
    // Declared after `child`, so dropped before it: a command cancelled
    // mid-way (shutdown) still kills the whole group.
    let mut group = Group::of(child.id());
    let (pipe_out, pipe_err) = (child.stdout.take(), child.stderr.take());
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let status = {
        let reading = async { tokio::join!(keep_head(pipe_out, &mut out), keep_head(pipe_err, &mut err)) };
        tokio::pin!(reading);
        let mut pipes_closed = false;
        let status = loop {
            tokio::select! {
                s = child.wait() => break Some(s),
                _ = sleep_until(deadline) => break None,
                _ = &mut reading, if !pipes_closed => pipes_closed = true,
            }
        };
        // Timed out: the whole group goes, then the shell is reaped.
        // Exited: whatever it left in the group goes (a probe's leftovers),
        // which also closes the pipes those leftovers held.
        if status.is_none() || kill_leftovers {
            group.kill();
        }
        let status = match status {
            Some(s) => Some(s),
            None => {
                let _ = timeout(REAP_LIMIT, child.wait()).await;
                None
            }
        };
        if !pipes_closed {
            let _ = timeout(READ_GRACE, &mut reading).await;
        }
        status
    };
    if status.is_none() || kill_leftovers {
        group.reap().await;
    } else {
        group.reaped = true;
    }
    Ok(Ran {
        status,
        stdout: out,
        stderr: err,
    })
}

/// `exit N`, or the signal that ended the shell.
fn describe(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(code), _) => format!("exit {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => format!("ended: {s}"),
    }
}

/// Reads `pipe` to its end, keeping the first [`KEEP`] bytes in `kept`.
async fn keep_head(pipe: Option<impl AsyncRead + Unpin>, kept: &mut Vec<u8>) {
    let Some(mut pipe) = pipe else { return };
    let mut buf = [0u8; 2048];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let room = KEEP.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

/// The first line with any text in it, trimmed, control characters escaped
/// (it goes into one log line), at most [`DETAIL_CHARS`] characters.
fn first_line(bytes: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(bytes);
    let line = text.lines().map(str::trim).find(|l| !l.is_empty())?;
    let mut out = String::new();
    for (i, c) in line.chars().enumerate() {
        if i == DETAIL_CHARS {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Some(out)
}

/// The shell's process group.
struct Group {
    pgid: Option<Pid>,
    reaped: bool,
}

impl Group {
    /// The group led by `pid` (the shell, which `process_group(0)` made a
    /// leader); `None` when the child already went.
    fn of(pid: Option<u32>) -> Group {
        Group {
            pgid: pid.and_then(|p| i32::try_from(p).ok()).and_then(Pid::from_raw),
            reaped: false,
        }
    }

    /// SIGKILL to every process in the group; a group already empty is fine.
    fn kill(&self) {
        if let Some(pgid) = self.pgid {
            let _ = kill_process_group(pgid, Signal::KILL);
        }
    }

    /// Reaps the killed members re-parented to us, until none is left (or
    /// [`REAP_LIMIT`], for a process stuck in the kernel). Called after the
    /// shell itself was reaped, so its status is not taken from under tokio.
    async fn reap(&mut self) {
        self.reaped = true;
        let Some(pgid) = self.pgid else { return };
        let deadline = Instant::now() + REAP_LIMIT;
        loop {
            match waitpgid(pgid, WaitOptions::NOHANG) {
                Ok(Some(_)) => continue,
                // Members left, none dead yet: they have SIGKILL pending.
                Ok(None) if Instant::now() < deadline => sleep(Duration::from_millis(2)).await,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // ECHILD: no child of ours is left in the group.
                _ => return,
            }
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if !self.reaped {
            self.kill();
        }
    }
}

/// Makes this process the reaper of its orphaned descendants, once.
fn become_subreaper() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = rustix::process::set_child_subreaper(Some(rustix::process::getpid())) {
            tracing::debug!(%e, "could not become a child subreaper; the init process reaps exec probe leftovers");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_detail_is_the_first_line_with_text() {
        for (out, want) in [
            (&b"ready\nmore\n"[..], Some("ready")),
            (b"\n  \n  up 3 days  \nx", Some("up 3 days")),
            (b"", None),
            (b" \n\t\n", None),
            (b"a\x1b[31mred", Some("a\\u{1b}[31mred")),
            (b"caf\xc3\xa9 \xff", Some("café \u{fffd}")),
        ] {
            assert_eq!(first_line(out).as_deref(), want, "{out:?}");
        }
        let long = "x".repeat(1000);
        let got = first_line(long.as_bytes()).unwrap();
        assert_eq!(got.chars().count(), DETAIL_CHARS + 1);
        assert!(got.ends_with('…'));
    }

    #[tokio::test]
    async fn output_past_the_kept_head_is_read_and_dropped() {
        let data = vec![b'y'; 3 * KEEP + 17];
        let mut kept = Vec::new();
        keep_head(Some(&data[..]), &mut kept).await;
        assert_eq!(kept.len(), KEEP);
        let mut kept = Vec::new();
        keep_head(None::<&[u8]>, &mut kept).await;
        assert!(kept.is_empty());
    }
}
