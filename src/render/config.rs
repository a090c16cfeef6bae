//! What `sidekick render` renders: `[templates.NAME]` tables in a TOML file
//! or a directory of them, or one template given by flags. Everything is
//! checked here, templates compiled included, so bad input exits 2 before
//! anything is written; an error names the file, the template and the
//! field.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::template::Template;
use crate::agent::config::{files, one_line};
use crate::cli::RenderArgs;
use crate::parse::{duration, UsageError};

/// One template, checked and compiled.
#[derive(Debug)]
pub struct Spec {
    /// Its name: the table's, or DEST's file name for the flag form.
    pub name: String,
    /// The template file.
    pub src: PathBuf,
    /// The file it is installed as.
    pub dest: PathBuf,
    /// The prefixes whose keys it sees.
    pub prefixes: Vec<String>,
    /// Run on the staged file, `{{src}}` replaced by its path.
    pub check_cmd: Option<String>,
    /// Run after the file is installed.
    pub reload_cmd: Option<String>,
    /// The file's mode; `None`: the installed file's, else 0644.
    pub mode: Option<u32>,
    /// `wait MIN:MAX`: the debounce after a change.
    pub wait: Option<(Duration, Duration)>,
    /// The compiled template.
    pub template: Template,
}

impl Spec {
    /// Whether `other` is this template unchanged (its text included): a
    /// reload keeps such a template running untouched.
    pub fn same_as(&self, other: &Spec) -> bool {
        self.template.text() == other.template.text()
            && self.name == other.name
            && self.src == other.src
            && self.dest == other.dest
            && self.prefixes == other.prefixes
            && self.check_cmd == other.check_cmd
            && self.reload_cmd == other.reload_cmd
            && self.mode == other.mode
            && self.wait == other.wait
    }
}

/// One `[templates.NAME]` table as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTemplate {
    src: String,
    dest: String,
    #[serde(default)]
    prefixes: Vec<String>,
    check_cmd: Option<String>,
    reload_cmd: Option<String>,
    mode: Option<String>,
    wait: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    templates: BTreeMap<String, toml::Table>,
}

fn error(file: Option<&Path>, template: Option<&str>, msg: impl std::fmt::Display) -> UsageError {
    let mut text = String::new();
    if let Some(f) = file {
        text.push_str(&format!("{}: ", f.display()));
    }
    if let Some(t) = template {
        text.push_str(&format!("template {t}: "));
    }
    UsageError::new(format!("{text}{msg}"))
}

/// Parses an octal mode such as `0644` or `640`.
pub fn parse_mode(field: &str, raw: &str) -> Result<u32, String> {
    let digits = raw.strip_prefix("0o").unwrap_or(raw);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if !digits.is_empty() && m <= 0o7777 => Ok(m),
        _ => Err(format!("{field}: '{raw}' is not an octal file mode such as 0644")),
    }
}

/// Parses `MIN` or `MIN:MAX` (MAX defaults to 4×MIN, and may not be less).
pub fn parse_wait(field: &str, raw: &str) -> Result<(Duration, Duration), String> {
    let (min, max) = match raw.split_once(':') {
        Some((a, b)) => (a, Some(b)),
        None => (raw, None),
    };
    let d = |s: &str| duration(field, &Some(s.to_string()), Duration::ZERO).map_err(|e| e.0);
    let min = d(min)?;
    let max = match max {
        Some(m) => d(m)?,
        None => min * 4,
    };
    if max < min {
        return Err(format!("{field}: MAX ({raw}) may not be less than MIN"));
    }
    Ok((min, max))
}

/// The fields of one template, from a table or from flags, checked.
struct Fields<'a> {
    src: &'a str,
    dest: &'a str,
    prefixes: &'a [String],
    check_cmd: Option<&'a str>,
    reload_cmd: Option<&'a str>,
    mode: Option<&'a str>,
    wait: Option<&'a str>,
}

/// How a field is called where it was given: `prefixes` or `--prefix`.
struct Names {
    prefixes: &'static str,
    mode: &'static str,
    wait: &'static str,
    src: &'static str,
    dest: &'static str,
    check_cmd: &'static str,
    reload_cmd: &'static str,
}

const TOML_NAMES: Names = Names {
    prefixes: "prefixes",
    mode: "mode",
    wait: "wait",
    src: "src",
    dest: "dest",
    check_cmd: "check_cmd",
    reload_cmd: "reload_cmd",
};

const FLAG_NAMES: Names = Names {
    prefixes: "--prefix",
    mode: "--mode",
    wait: "--wait",
    src: "SRC",
    dest: "DEST",
    check_cmd: "--check-cmd",
    reload_cmd: "--reload-cmd",
};

fn spec(name: String, base: Option<&Path>, f: Fields<'_>, n: &Names) -> Result<Spec, String> {
    let resolve = |p: &str| match base {
        Some(dir) if Path::new(p).is_relative() => dir.join(p),
        _ => PathBuf::from(p),
    };
    if f.src.is_empty() {
        return Err(format!("{} must not be empty", n.src));
    }
    if f.dest.is_empty() {
        return Err(format!("{} must not be empty", n.dest));
    }
    let src = resolve(f.src);
    let dest = resolve(f.dest);
    if f.prefixes.is_empty() {
        return Err(format!(
            "{}: give at least one prefix whose keys the template sees",
            n.prefixes
        ));
    }
    let dir = match dest.parent() {
        Some(d) if d.as_os_str().is_empty() => Path::new("."),
        Some(d) => d,
        None => return Err(format!("{}: {} is not a file path", n.dest, dest.display())),
    };
    if dest.file_name().is_none() {
        return Err(format!("{}: {} is not a file path", n.dest, dest.display()));
    }
    if !dir.is_dir() {
        return Err(format!(
            "{}: the directory of {} does not exist (or is not a directory)",
            n.dest,
            dest.display()
        ));
    }
    if dest.is_dir() {
        return Err(format!("{}: {} is a directory", n.dest, dest.display()));
    }
    for (field, cmd) in [(n.check_cmd, f.check_cmd), (n.reload_cmd, f.reload_cmd)] {
        if cmd.is_some_and(|c| c.trim().is_empty()) {
            return Err(format!("{field} must not be empty"));
        }
    }
    let mode = f.mode.map(|m| parse_mode(n.mode, m)).transpose()?;
    let wait = f.wait.map(|w| parse_wait(n.wait, w)).transpose()?;
    let template = Template::load(&src).map_err(|e| format!("{}: {e}", n.src))?;
    Ok(Spec {
        name,
        src,
        dest,
        prefixes: f.prefixes.to_vec(),
        check_cmd: f.check_cmd.map(str::to_string),
        reload_cmd: f.reload_cmd.map(str::to_string),
        mode,
        wait,
        template,
    })
}

/// The templates of `path` (a TOML file or a directory of `*.toml`), each
/// checked and compiled; relative paths are relative to the TOML file.
pub fn load(path: &Path) -> Result<Vec<Spec>, UsageError> {
    let mut specs: Vec<(Spec, PathBuf)> = Vec::new();
    for file in files(path).map_err(|e| UsageError(e.0))? {
        let text =
            std::fs::read_to_string(&file).map_err(|e| error(Some(&file), None, format!("cannot read it: {e}")))?;
        let raw: RawFile = toml::from_str(&text).map_err(|e| error(Some(&file), None, one_line(e)))?;
        let base = file.parent().map(Path::to_path_buf);
        for (name, table) in raw.templates {
            let r: RawTemplate = table
                .try_into()
                .map_err(|e| error(Some(&file), Some(&name), one_line(e)))?;
            if let Some((_, other)) = specs.iter().find(|(s, _)| s.name == name) {
                return Err(error(
                    Some(&file),
                    Some(&name),
                    format!("is defined in {} already", other.display()),
                ));
            }
            let fields = Fields {
                src: &r.src,
                dest: &r.dest,
                prefixes: &r.prefixes,
                check_cmd: r.check_cmd.as_deref(),
                reload_cmd: r.reload_cmd.as_deref(),
                mode: r.mode.as_deref(),
                wait: r.wait.as_deref(),
            };
            let s = spec(name.clone(), base.as_deref(), fields, &TOML_NAMES)
                .map_err(|e| error(Some(&file), Some(&name), e))?;
            specs.push((s, file.clone()));
        }
    }
    if specs.is_empty() {
        return Err(error(Some(path), None, "no [templates.NAME] table: nothing to render"));
    }
    let specs: Vec<Spec> = specs.into_iter().map(|(s, _)| s).collect();
    one_dest_each(&specs)?;
    Ok(specs)
}

/// Two templates writing one file would overwrite each other for ever.
fn one_dest_each(specs: &[Spec]) -> Result<(), UsageError> {
    for (i, a) in specs.iter().enumerate() {
        if let Some(b) = specs[..i].iter().find(|b| same_file(&b.dest, &a.dest)) {
            return Err(error(
                None,
                Some(&a.name),
                format!("dest {} is template {}'s dest too", a.dest.display(), b.name),
            ));
        }
    }
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> bool {
    let canon = |p: &Path| {
        let dir = p
            .parent()
            .and_then(|d| std::fs::canonicalize(if d.as_os_str().is_empty() { Path::new(".") } else { d }).ok());
        (dir, p.file_name().map(|n| n.to_os_string()))
    };
    a == b || canon(a) == canon(b)
}

/// What `sidekick render` was asked to do.
#[derive(Debug)]
pub struct Plan {
    /// The templates.
    pub specs: Vec<Spec>,
    /// `--config`, re-read on SIGHUP; `None` for the flag form.
    pub config: Option<PathBuf>,
    /// `--settle`: how long renders wait after etcd lost its data.
    pub settle: Duration,
}

/// Checks the flags and loads the templates they name.
pub fn plan(args: &RenderArgs) -> Result<Plan, UsageError> {
    let settle = duration("--settle", &args.settle, Duration::from_secs(15))?;
    if let Some(path) = &args.config {
        let given = [
            (args.src.is_some(), "SRC"),
            (args.dest.is_some(), "DEST"),
            (!args.prefixes.is_empty(), "--prefix"),
            (args.check_cmd.is_some(), "--check-cmd"),
            (args.reload_cmd.is_some(), "--reload-cmd"),
            (args.mode.is_some(), "--mode"),
            (args.wait.is_some(), "--wait"),
        ];
        if let Some((_, what)) = given.iter().find(|(set, _)| *set) {
            return Err(UsageError::new(format!(
                "--config {path}: {what} cannot be given with --config; put it in the [templates.NAME] table"
            )));
        }
        if path.is_empty() {
            return Err(UsageError::new("--config: the path must not be empty"));
        }
        let specs = load(Path::new(path))?;
        return Ok(Plan {
            specs,
            config: Some(PathBuf::from(path)),
            settle,
        });
    }
    let (Some(src), Some(dest)) = (&args.src, &args.dest) else {
        return Err(UsageError::new(
            "render needs SRC DEST --prefix P (one template) or --config PATH (see --help)",
        ));
    };
    let name = Path::new(dest)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dest.clone());
    let fields = Fields {
        src,
        dest,
        prefixes: &args.prefixes,
        check_cmd: args.check_cmd.as_deref(),
        reload_cmd: args.reload_cmd.as_deref(),
        mode: args.mode.as_deref(),
        wait: args.wait.as_deref(),
    };
    let spec = spec(name, None, fields, &FLAG_NAMES).map_err(UsageError::new)?;
    Ok(Plan {
        specs: vec![spec],
        config: None,
        settle,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn modes_and_waits() {
        assert_eq!(parse_mode("mode", "0644"), Ok(0o644));
        assert_eq!(parse_mode("mode", "600"), Ok(0o600));
        assert!(parse_mode("mode", "0844").is_err());
        assert!(parse_mode("mode", "").is_err());
        assert!(parse_mode("mode", "17777").is_err());
        let ms = Duration::from_millis;
        assert_eq!(parse_wait("wait", "500ms"), Ok((ms(500), ms(2000))));
        assert_eq!(parse_wait("wait", "100ms:1s"), Ok((ms(100), ms(1000))));
        let e = parse_wait("--wait", "1s:100ms").unwrap_err();
        assert!(e.starts_with("--wait: MAX"), "{e}");
        assert!(parse_wait("--wait", "soon").unwrap_err().starts_with("--wait: 'soon'"));
    }

    #[test]
    fn a_config_names_file_template_and_field() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "t.j2", "{{ keys | length }}\n");
        let good = "[templates.web]\nsrc = \"t.j2\"\ndest = \"out.cfg\"\nprefixes = [\"/s/\"]\nwait = \"1s\"\n";
        let f = write(dir.path(), "a.toml", good);
        let specs = load(&f).unwrap();
        assert_eq!(specs[0].dest, dir.path().join("out.cfg"));
        assert_eq!(specs[0].wait, Some((Duration::from_secs(1), Duration::from_secs(4))));

        for (text, want) in [
            (good.replace("wait", "wiat"), "template web: unknown field `wiat`"),
            (good.replace("t.j2", "missing.j2"), "template web: src: "),
            (
                good.replace("out.cfg", "nodir/out.cfg"),
                "template web: dest: the directory of",
            ),
            (
                good.replace("[\"/s/\"]", "[]"),
                "template web: prefixes: give at least one",
            ),
            (good.replace("wait = \"1s\"", "mode = \"9\""), "template web: mode: '9'"),
            (
                "[templates.web]\nsrc = \"t.j2\"\n".to_string(),
                "template web: missing field `dest`",
            ),
            ("[template.web]\n".to_string(), "unknown field `template`"),
            (String::new(), "no [templates.NAME] table"),
        ] {
            let f = write(dir.path(), "a.toml", &text);
            let e = load(&f).unwrap_err().0;
            assert!(e.starts_with(&f.display().to_string()), "{e}");
            assert!(e.contains(want), "{text:?}: {e}");
            assert!(!e.contains('\n'));
        }
        write(dir.path(), "bad.j2", "{% for %}");
        let f = write(dir.path(), "a.toml", &good.replace("t.j2", "bad.j2"));
        let e = load(&f).unwrap_err().0;
        assert!(
            e.contains("template web: src: syntax error:") && e.contains("bad.j2:1"),
            "{e}"
        );
    }

    #[test]
    fn two_templates_may_not_share_a_dest() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "t.j2", "x\n");
        let one = "[templates.a]\nsrc = \"t.j2\"\ndest = \"out\"\nprefixes = [\"/a/\"]\n";
        write(dir.path(), "1.toml", one);
        write(
            dir.path(),
            "2.toml",
            &one.replace("templates.a", "templates.b")
                .replace("\"out\"", "\"./out\""),
        );
        let e = load(dir.path()).unwrap_err().0;
        assert!(
            e.contains("template b: dest") && e.contains("template a's dest too"),
            "{e}"
        );
        write(dir.path(), "2.toml", one);
        let e = load(dir.path()).unwrap_err().0;
        assert!(e.contains("template a: is defined in"), "{e}");
    }
}
