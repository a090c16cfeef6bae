//! `--exec CMD`: exit codes, the detail line, the timeout killing the whole
//! process group, chatty and stubborn commands; and `run --exec` against a
//! real etcd.

use std::path::Path;
use std::process::Output;
use std::time::Instant;

use crate::harness::bounds::*;
use crate::harness::*;

fn check(cmd: &str, timeout: &str) -> Output {
    sidekick(&["check", "--exec", cmd, "--timeout", timeout])
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The pid written to `dir/name` by the probed command.
fn pid_in(dir: &Path, name: &str) -> u32 {
    let text = std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    text.trim().parse().unwrap_or_else(|e| panic!("{name}: {text:?}: {e}"))
}

/// `None` when the process is gone, else its state letter (`Z` for a
/// zombie) and its command name.
fn process(pid: u32) -> Option<(char, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, tail) = stat.rsplit_once(") ")?;
    let comm = head.split_once(" (")?.1.to_string();
    Some((tail.chars().next()?, comm))
}

/// Asserts that the probed processes named in `dir` are gone: not running,
/// not a zombie. A pid the kernel already handed to an unrelated process
/// (another command name, not a zombie) counts as gone.
fn assert_gone(dir: &Path, names: &[&str], stale_comm: &[&str]) {
    for name in names {
        let pid = pid_in(dir, name);
        if let Some((state, comm)) = process(pid) {
            assert!(
                state != 'Z' && !stale_comm.contains(&comm.as_str()),
                "{name} (pid {pid}, {comm}) is still there in state {state}"
            );
        }
    }
}

#[test]
fn exit_codes_and_the_first_line_of_output() {
    for (cmd, code, want) in [
        ("echo ready; echo second line", 0, "healthy: exit 0: ready in "),
        ("echo 'disk full' >&2; exit 1", 1, "unhealthy: exit 1: disk full in "),
        ("exit 7", 1, "unhealthy: exit 7 in "),
        // stdout first, stderr when stdout has nothing to say.
        ("echo out; echo err >&2", 0, "healthy: exit 0: out in "),
        ("echo; echo only-stderr >&2", 0, "healthy: exit 0: only-stderr in "),
        ("kill -TERM $$", 1, "unhealthy: killed by signal 15 in "),
        // stdin is /dev/null: a command reading it ends at once.
        ("cat; echo read-nothing", 0, "healthy: exit 0: read-nothing in "),
    ] {
        let out = check(cmd, "5s");
        let text = stdout(&out);
        assert_eq!(out.status.code(), Some(code), "{cmd}: {text}");
        assert!(text.starts_with(want), "{cmd}: want {want:?}, got {text:?}");
        assert_eq!(text.lines().count(), 1, "{cmd}: one line: {text:?}");
    }
}

/// The shell, its child and its grandchild hang; at the timeout all three
/// are killed and reaped, none left running or as a zombie.
#[test]
fn a_command_that_forks_and_hangs_is_killed_with_its_whole_group() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let cmd = format!(
        "echo $$ > {d}/shell; \
         sh -c 'sleep 300 & echo $! > {d}/grandchild; wait' & echo $! > {d}/child; \
         echo started; wait"
    );
    let timeout = "1s";
    let start = Instant::now();
    let out = check(&cmd, timeout);
    let took = start.elapsed();
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.starts_with("unhealthy: timed out after 1s: started in "), "{text}");
    assert!(took < one_shot_within(flag(timeout)), "took {took:?}");
    assert_gone(dir.path(), &["shell", "child", "grandchild"], &["sh", "sleep"]);
}

/// A command that passes but leaves a process behind: the leftover goes
/// too, or a probe every few seconds would pile them up.
#[test]
fn what_a_passing_command_leaves_behind_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let out = check(&format!("sleep 300 & echo $! > {d}/left; echo fine"), "5s");
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.starts_with("healthy: exit 0: fine"), "{text}");
    assert_gone(dir.path(), &["left"], &["sleep"]);
}

/// Hundreds of megabytes of output: read and dropped as they come, so the
/// sidekick's memory stays small, and the exit code still decides.
#[tokio::test]
async fn megabytes_of_output_are_drained_and_the_exit_code_decides() {
    for (code, word) in [(0, "healthy"), (3, "unhealthy")] {
        let cmd = format!("echo first; head -c 300000000 /dev/zero; exit {code}");
        let timeout = "60s";
        let mut child = sidekick(&["check", "--exec", &cmd, "--timeout", timeout])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        // The peak resident size, as long as the process is there to ask.
        let mut peak_kib = 0u64;
        let deadline = Instant::now() + one_shot_within(flag(timeout));
        while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                if let Some(kib) = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                {
                    peak_kib = peak_kib.max(kib);
                }
            }
            tokio::time::sleep(SAMPLE).await;
        }
        let out = child.wait_with_output().unwrap();
        let text = stdout(&out);
        assert!(text.starts_with(&format!("{word}: exit {code}: first in ")), "{text}");
        assert!(peak_kib > 0, "the resident size was sampled");
        assert!(peak_kib < 64 * 1024, "peak RSS {peak_kib} KiB for 300 MB of output");
    }
}

/// A command that closes its stdout and stderr and keeps running is judged
/// by its exit, which never comes: the timeout applies and it is killed.
#[test]
fn a_command_that_closes_its_output_and_keeps_running_meets_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let timeout = "1s";
    let start = Instant::now();
    let out = check(&format!("echo $$ > {d}/pid; exec >&- 2>&-; exec sleep 300"), timeout);
    let took = start.elapsed();
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.starts_with("unhealthy: timed out after 1s in "), "{text}");
    assert!(took < one_shot_within(flag(timeout)), "took {took:?}");
    assert_gone(dir.path(), &["pid"], &["sleep"]);
}

/// `run --exec` registers while the command passes and withdraws when it
/// fails, with the command's own words in the log.
#[tokio::test]
async fn run_registers_while_the_command_passes_and_withdraws_when_it_fails() {
    let etcd = Etcd::start().await;
    let eps = etcd.endpoints();
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("ready");
    let cmd = format!(
        "test -e {0} && echo ready || {{ echo 'no flag file' >&2; exit 1; }}",
        flag.display()
    );
    let key = "/services/worker/1";
    let sk = Running::start(&[
        "run",
        key,
        "10.0.0.5",
        "--exec",
        &cmd,
        "--interval",
        "300ms",
        "--timeout",
        "250ms",
        "--ttl",
        "2s",
        "--rise",
        "1",
        "--fall",
        "1",
        "--dial-timeout",
        "1s",
        "--endpoints",
        &eps,
    ]);
    let f = sk.figures();
    let c = etcd.client(0).await;
    let mut c2 = c.clone();
    assert!(sk.logs("no flag file", f.probes(1)).await, "{}", sk.log());
    assert!(
        value(&mut c2, key).await.is_none(),
        "not registered while the command fails"
    );

    std::fs::write(&flag, "").unwrap();
    assert!(
        key_becomes(&c, key, Some("10.0.0.5"), f.reregistration()).await,
        "{}",
        sk.log()
    );
    assert!(sk.log().contains("exit 0: ready"), "{}", sk.log());

    std::fs::remove_file(&flag).unwrap();
    assert!(key_becomes(&c, key, None, f.withdrawal()).await, "{}", sk.log());
    assert!(sk.log().contains("instance is down"), "{}", sk.log());
}
