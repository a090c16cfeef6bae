//! Installing a rendering: nothing when it equals the installed file;
//! otherwise a temporary file beside DEST (DEST's mode, or the template's),
//! the check command on it, an atomic rename over DEST. The temporary file
//! never outlives the attempt, whatever fails (a guard removes it, on
//! cancellation too). Reloading is the caller's: it may be retried alone.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::probe::exec;

/// How long a check or reload command may run.
pub const COMMAND_LIMIT: Duration = Duration::from_secs(30);

/// What an install did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The rendering equals the installed file: nothing was written.
    Unchanged,
    /// DEST was replaced; `check` is how long the check command took.
    Installed {
        /// The check command's time, when there is one.
        check: Option<Duration>,
    },
}

/// Removes the staged file unless it was renamed into place.
struct Staged(Option<PathBuf>);

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// `cmd` with every `{{src}}` (spaces inside the braces allowed) replaced
/// by `path`, quoted for `sh`.
pub fn with_src(cmd: &str, path: &Path) -> String {
    let quoted = format!("'{}'", path.display().to_string().replace('\'', "'\\''"));
    let mut out = String::with_capacity(cmd.len() + quoted.len());
    let mut rest = cmd;
    while let Some(i) = rest.find("{{") {
        let after = &rest[i + 2..];
        match after.find("}}") {
            Some(j) if after[..j].trim() == "src" => {
                out.push_str(&rest[..i]);
                out.push_str(&quoted);
                rest = &after[j + 2..];
            }
            _ => {
                out.push_str(&rest[..i + 2]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Runs `cmd` with `sh -c` within [`COMMAND_LIMIT`]: `Ok(time taken)`, or
/// the exit and output on one line.
pub async fn command(cmd: &str) -> Result<Duration, String> {
    let start = Instant::now();
    let ran = exec::run(cmd, COMMAND_LIMIT, false).await?;
    if ran.success() {
        Ok(start.elapsed())
    } else {
        Err(ran.summary(COMMAND_LIMIT))
    }
}

/// Installs `text` as `dest`, checked by `check_cmd`; an error is one line.
pub async fn install(dest: &Path, mode: Option<u32>, check_cmd: Option<&str>, text: &str) -> Result<Outcome, String> {
    let installed = std::fs::metadata(dest).ok();
    if installed.is_some() {
        if let Ok(now) = std::fs::read(dest) {
            if now == text.as_bytes() {
                return Ok(Outcome::Unchanged);
            }
        }
    }
    let mode = mode
        .or_else(|| installed.as_ref().map(|m| m.permissions().mode() & 0o7777))
        .unwrap_or(0o644);
    let mut staged = Staged(Some(stage(dest, mode, text)?));
    let path = staged.0.clone().expect("staged above");
    let check = match check_cmd {
        None => None,
        Some(cmd) => Some(
            command(&with_src(cmd, &path))
                .await
                .map_err(|e| format!("check_cmd failed, {} kept as it was: {e}", dest.display()))?,
        ),
    };
    std::fs::rename(&path, dest).map_err(|e| format!("could not move the new file over {}: {e}", dest.display()))?;
    staged.0 = None;
    Ok(Outcome::Installed { check })
}

/// Writes `text` to a new file beside `dest`, with `mode`, synced.
fn stage(dest: &Path, mode: u32, text: &str) -> Result<PathBuf, String> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let path = dir.join(format!(
        ".{name}.sidekick-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let fail = |e: std::io::Error| format!("could not write {}: {e}", path.display());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&path)
        .map_err(fail)?;
    let mut staged = Staged(Some(path.clone()));
    // The umask may have taken bits off at creation.
    f.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(fail)?;
    f.write_all(text.as_bytes()).map_err(fail)?;
    f.sync_all().map_err(fail)?;
    staged.0 = None;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leftovers(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".sidekick-"))
            .collect()
    }

    #[test]
    fn src_is_replaced_and_quoted() {
        let p = Path::new("/tmp/a b/.x'y");
        assert_eq!(
            with_src("haproxy -c -f {{src}}", p),
            "haproxy -c -f '/tmp/a b/.x'\\''y'"
        );
        assert_eq!(
            with_src("t {{ src }} {{other}} {{", p),
            "t '/tmp/a b/.x'\\''y' {{other}} {{"
        );
    }

    #[tokio::test]
    async fn installs_keeps_mode_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.cfg");
        assert_eq!(
            install(&dest, None, None, "a\n").await,
            Ok(Outcome::Installed { check: None })
        );
        assert_eq!(std::fs::metadata(&dest).unwrap().permissions().mode() & 0o7777, 0o644);
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o640)).unwrap();
        let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
        let before = ino(&dest);
        assert_eq!(
            install(&dest, None, Some("exit 1"), "a\n").await,
            Ok(Outcome::Unchanged)
        );
        assert_eq!(ino(&dest), before, "an unchanged rendering writes nothing");
        assert!(matches!(
            install(&dest, None, Some("grep -q b {{src}}"), "b\n").await,
            Ok(Outcome::Installed { check: Some(_) })
        ));
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "b\n");
        assert_eq!(std::fs::metadata(&dest).unwrap().permissions().mode() & 0o7777, 0o640);
        install(&dest, Some(0o600), None, "c\n").await.unwrap();
        assert_eq!(std::fs::metadata(&dest).unwrap().permissions().mode() & 0o7777, 0o600);
        assert!(leftovers(dir.path()).is_empty());
    }

    #[tokio::test]
    async fn a_failed_check_keeps_the_file_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.cfg");
        std::fs::write(&dest, "old\n").unwrap();
        let e = install(&dest, None, Some("echo bad line 3 >&2; exit 3"), "new\n")
            .await
            .unwrap_err();
        assert!(
            e.contains("check_cmd failed") && e.contains("exit 3: bad line 3"),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "old\n");
        assert!(leftovers(dir.path()).is_empty());
    }
}
