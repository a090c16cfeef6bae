//! Templates: MiniJinja (Jinja2 syntax) with confd's functions, over the
//! keys one consistent read gave.
//!
//! Undefined values are errors, the template's text is kept exactly (its
//! trailing newline too), and keys are always whole etcd keys. Values from
//! etcd are untrusted: a printed value that carries a key's value holding
//! a control character fails the rendering, naming the key, so whoever may
//! write a key cannot write lines into the file; the `addr` filter lets
//! only `HOST:PORT` through.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::{Arc, Mutex};

use minijinja::value::{Enumerator, Object, ObjectExt, ObjectRepr, Value};
use minijinja::{Environment, Error, ErrorKind, UndefinedBehavior};

/// The keys of one rendering, by key.
pub type Keys = BTreeMap<String, String>;

/// What the functions and the output check of one rendering look at.
#[derive(Default)]
struct Data {
    keys: Arc<Keys>,
    /// The keys that hold a control character in their name or value, with
    /// the text that holds it.
    tainted: Vec<(String, String)>,
}

type Cell = Arc<Mutex<Arc<Data>>>;

fn data(cell: &Cell) -> Arc<Data> {
    cell.lock().expect("template data lock").clone()
}

/// `keys` in a template: a map over the read's keys, in key order, that
/// shares them rather than copying 10,000 strings for each rendering.
#[derive(Debug)]
struct KeyMap(Arc<Keys>);

impl Object for KeyMap {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.0.get(key.as_str()?).map(|v| Value::from(v.as_str()))
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        self.mapped_enumerator(|this| Box::new(this.0.keys().map(|k| Value::from(k.as_str()))))
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        Some(self.0.len())
    }
}

/// One template, compiled, ready to render any number of times.
pub struct Template {
    env: Environment<'static>,
    name: String,
    text: String,
    cell: Cell,
}

impl std::fmt::Debug for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Template")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn fail(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidOperation, msg.into())
}

/// One line for a MiniJinja error: what, and where (template and line).
fn one_line(e: &Error) -> String {
    let mut text = match e.detail() {
        Some(d) => d.to_string(),
        None => e.kind().to_string(),
    };
    if let (Some(name), Some(line)) = (e.name(), e.line()) {
        text = format!("{name}:{line}: {text}");
    }
    text
}

impl Template {
    /// Reads and compiles the template at `src`; an error is one line
    /// naming the file (and the line of a syntax error).
    pub fn load(src: &Path) -> Result<Template, String> {
        let text = std::fs::read_to_string(src).map_err(|e| format!("{}: cannot read it: {e}", src.display()))?;
        Template::compile(&src.display().to_string(), text)
    }

    /// Compiles `text`, named `name` in errors.
    pub fn compile(name: &str, text: String) -> Result<Template, String> {
        let cell: Cell = Arc::default();
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .keep_trailing_newline(true)
                .build()
                .expect("the default delimiters"),
        );
        add_functions(&mut env, &cell);
        let check = cell.clone();
        env.set_formatter(move |out, state, value| {
            if let Some(s) = value.as_str() {
                if let Some(c) = s.chars().find(|c| c.is_control()) {
                    let d = data(&check);
                    if !d.tainted.is_empty() {
                        return Err(fail(format!(
                            "{} holds a control character and a printed value holds one (U+{:04X}); \
                             nothing from etcd may write lines into the file",
                            culprit(&d.tainted, s),
                            c as u32
                        )));
                    }
                }
            }
            minijinja::escape_formatter(out, state, value)
        });
        env.add_template_owned(name.to_string(), text.clone())
            .map_err(|e| format!("syntax error: {}", one_line(&e)))?;
        Ok(Template {
            env,
            name: name.to_string(),
            text,
            cell,
        })
    }

    /// The template's text, as read.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Renders over `keys`; an error is one line naming the template, its
    /// line and, for a refused value, the key.
    pub fn render(&self, keys: Arc<Keys>) -> Result<String, String> {
        let control = |t: &str| t.chars().any(char::is_control);
        let tainted = keys
            .iter()
            .filter(|(k, v)| control(k) || control(v))
            .map(|(k, v)| (k.clone(), if control(k) { k.clone() } else { v.clone() }))
            .collect();
        let map = Value::from_object(KeyMap(keys.clone()));
        *self.cell.lock().expect("template data lock") = Arc::new(Data { keys, tainted });
        let out = self
            .env
            .get_template(&self.name)
            .and_then(|t| t.render(minijinja::context! { keys => map }))
            .map_err(|e| one_line(&e));
        // Let go of the keys, so the caller's next change need not copy them.
        *self.cell.lock().expect("template data lock") = Arc::default();
        out
    }
}

/// Which tainted key to name for a printed `s`: the one whose text shares
/// a control character and its neighbours with `s`, else the first.
fn culprit(tainted: &[(String, String)], s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    let windows: Vec<String> = (0..chars.len())
        .filter(|&i| chars[i].is_control())
        .map(|i| chars[i.saturating_sub(1)..(i + 2).min(chars.len())].iter().collect())
        .collect();
    let (key, text) = tainted
        .iter()
        .find(|(_, t)| windows.iter().any(|w| t.contains(w.as_str())))
        .unwrap_or(&tainted[0]);
    let what = if key == text { "the key" } else { "the value of" };
    format!("{what} {}", key.escape_debug())
}

/// The key and its parts: `/services/web/3` → `["", "services", "web", "3"]`.
fn segments(s: &str) -> Vec<&str> {
    s.split('/').collect()
}

/// Whether one path segment matches a pattern segment, where `*` matches
/// any run of characters (within the segment).
fn segment_matches(pattern: &str, segment: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == segment;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !segment.starts_with(first) || segment.len() < first.len() + last.len() || !segment.ends_with(last) {
        return false;
    }
    let mut rest = &segment[first.len()..segment.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// The keys matching `pattern`, in key order.
fn matching<'a>(keys: &'a Keys, pattern: &str) -> impl Iterator<Item = (&'a String, &'a String)> {
    let literal = pattern.split('*').next().unwrap_or_default().to_string();
    let want = pattern.split('/').map(str::to_string).collect::<Vec<_>>();
    keys.range(literal.clone()..)
        .take_while(move |(k, _)| k.starts_with(literal.as_str()))
        .filter(move |(k, _)| {
            let got = segments(k);
            got.len() == want.len() && want.iter().zip(&got).all(|(p, s)| segment_matches(p, s))
        })
}

/// The names of `dir`'s children: `(name, has children of its own)`.
fn children(keys: &Keys, dir: &str) -> Vec<(String, bool)> {
    let dir = format!("{}/", dir.trim_end_matches('/'));
    let mut out: Vec<(String, bool)> = Vec::new();
    for k in keys
        .range(dir.clone()..)
        .map(|(k, _)| k)
        .take_while(|k| k.starts_with(&dir))
    {
        let rest = &k[dir.len()..];
        let (name, deeper) = match rest.split_once('/') {
            Some((name, _)) => (name, true),
            None => (rest, false),
        };
        if name.is_empty() {
            continue;
        }
        match out.last_mut() {
            Some((last, d)) if last == name => *d |= deeper,
            _ => out.push((name.to_string(), deeper)),
        }
    }
    out
}

/// The last element of a path, as Go's `path.Base`.
fn base(path: &str) -> String {
    if path.is_empty() {
        return ".".into();
    }
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        return "/".into();
    }
    trimmed.rsplit('/').next().unwrap_or(trimmed).to_string()
}

/// Everything but the last element, as Go's `path.Dir`.
fn dirname(path: &str) -> String {
    match path.trim_end_matches('/').rsplit_once('/') {
        Some(("", _)) => "/".into(),
        Some((dir, _)) => dir.trim_end_matches('/').to_string(),
        None if path.starts_with('/') => "/".into(),
        None => ".".into(),
    }
}

/// Whether `host` is a DNS name: labels of letters, digits and hyphens,
/// none starting or ending with a hyphen.
fn dns_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// `HOST:PORT` (a DNS name or IPv4 address) or `[IPv6]:PORT`, the port
/// 1-65535; `None` for anything else.
pub fn address(value: &str) -> Option<&str> {
    let (host, port) = value.rsplit_once(':')?;
    let port_ok = !port.is_empty()
        && port.len() <= 5
        && port.chars().all(|c| c.is_ascii_digit())
        && port.parse::<u32>().is_ok_and(|p| (1..=65535).contains(&p));
    if !port_ok {
        return None;
    }
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<Ipv6Addr>().is_ok(),
        None if host.chars().all(|c| c.is_ascii_digit() || c == '.') => host.parse::<Ipv4Addr>().is_ok(),
        None => dns_name(host),
    };
    host_ok.then_some(value)
}

fn add_functions(env: &mut Environment<'static>, cell: &Cell) {
    let c = cell.clone();
    env.add_function(
        "getv",
        move |key: &str, default: Option<Value>| -> Result<Value, Error> {
            match (data(&c).keys.get(key), default) {
                (Some(v), _) => Ok(Value::from(v.as_str())),
                (None, Some(d)) => Ok(d),
                (None, None) => Err(fail(format!(
                    "getv: no key {key} (give a default: getv(\"{key}\", \"...\"))"
                ))),
            }
        },
    );
    let c = cell.clone();
    env.add_function("exists", move |key: &str| data(&c).keys.contains_key(key));
    let c = cell.clone();
    env.add_function("ls", move |dir: &str| {
        children(&data(&c).keys, dir)
            .into_iter()
            .map(|(n, _)| Value::from(n))
            .collect::<Vec<_>>()
    });
    let c = cell.clone();
    env.add_function("lsdir", move |dir: &str| {
        children(&data(&c).keys, dir)
            .into_iter()
            .filter(|(_, deeper)| *deeper)
            .map(|(n, _)| Value::from(n))
            .collect::<Vec<_>>()
    });
    let c = cell.clone();
    env.add_function("getvs", move |pattern: &str| {
        let d = data(&c);
        matching(&d.keys, pattern)
            .map(|(_, v)| Value::from(v.as_str()))
            .collect::<Vec<_>>()
    });
    let c = cell.clone();
    env.add_function("gets", move |pattern: &str| {
        let d = data(&c);
        matching(&d.keys, pattern)
            .map(|(k, v)| {
                let mut m = BTreeMap::new();
                m.insert("key", Value::from(k.as_str()));
                m.insert("value", Value::from(v.as_str()));
                Value::from(m)
            })
            .collect::<Vec<_>>()
    });
    env.add_filter("base", |path: &str| base(path));
    env.add_filter("dirname", |path: &str| dirname(path));
    env.add_filter("split", |s: &str, sep: &str| -> Result<Vec<String>, Error> {
        if sep.is_empty() {
            return Err(fail("split: the separator is empty"));
        }
        Ok(s.split(sep).map(str::to_string).collect())
    });
    env.add_filter("json", |s: &str| -> Result<Value, Error> {
        let parsed: serde_json::Value =
            serde_json::from_str(s).map_err(|e| fail(format!("json: not JSON ({e}): {}", s.escape_debug())))?;
        Ok(Value::from(minijinja::value::Serde(parsed)))
    });
    let c = cell.clone();
    env.add_filter("addr", move |v: &str| -> Result<String, Error> {
        if let Some(a) = address(v) {
            return Ok(a.to_string());
        }
        let d = data(&c);
        let whose = d
            .keys
            .iter()
            .find(|(_, value)| value.as_str() == v)
            .map(|(k, _)| format!(" (the value of {k})"))
            .unwrap_or_default();
        Err(fail(format!(
            "addr: \"{}\"{whose} is not HOST:PORT (a DNS name or IPv4 address, or [IPv6], and a port 1-65535)",
            v.escape_debug()
        )))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(pairs: &[(&str, &str)]) -> Arc<Keys> {
        Arc::new(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    fn render(text: &str, pairs: &[(&str, &str)]) -> Result<String, String> {
        Template::compile("t", text.to_string()).unwrap().render(keys(pairs))
    }

    const WEB: &[(&str, &str)] = &[
        ("/services/web/1", "10.0.0.1:80"),
        ("/services/web/2", "10.0.0.2:80"),
        ("/services/web/hosts/3", "10.0.0.3:80"),
        ("/services/web/scheme", "http"),
        ("/services/webx/1", "10.9.9.9:80"),
    ];

    #[test]
    fn the_text_is_kept_exactly_with_its_trailing_newline() {
        assert_eq!(render("a\n{% if true %}\nb\n{% endif %}\n", &[]).unwrap(), "a\n\nb\n\n");
        assert_eq!(render("a\n{%- if true %}b{% endif -%}\n", &[]).unwrap(), "ab");
    }

    #[test]
    fn undefined_values_are_errors() {
        let e = render("{{ nothing }}", &[]).unwrap_err();
        assert!(e.contains("t:1") && e.contains("undefined"), "{e}");
        assert!(render("{{ keys['/nope'] }}", WEB).is_err());
        let e = render("{{ getv('/nope') }}", WEB).unwrap_err();
        assert!(e.contains("no key /nope"), "{e}");
        assert_eq!(render("{{ getv('/nope', 'd') }}", WEB).unwrap(), "d");
    }

    #[test]
    fn confd_functions_over_whole_keys() {
        assert_eq!(render("{{ getv('/services/web/scheme') }}", WEB).unwrap(), "http");
        assert_eq!(
            render("{{ exists('/services/web/1') }} {{ exists('/services/web') }}", WEB).unwrap(),
            "True False"
        );
        assert_eq!(
            render("{{ getvs('/services/web/*') | join(',') }}", WEB).unwrap(),
            "10.0.0.1:80,10.0.0.2:80,http"
        );
        assert_eq!(
            render(
                "{% for kv in gets('/services/*/1') %}{{ kv.key }}={{ kv.value }};{% endfor %}",
                WEB
            )
            .unwrap(),
            "/services/web/1=10.0.0.1:80;/services/webx/1=10.9.9.9:80;"
        );
        assert_eq!(render("{{ gets('/services/web/h*/*') | length }}", WEB).unwrap(), "1");
        assert_eq!(
            render("{{ ls('/services/web') | join(',') }}", WEB).unwrap(),
            "1,2,hosts,scheme"
        );
        assert_eq!(
            render("{{ lsdir('/services/web/') | join(',') }}", WEB).unwrap(),
            "hosts"
        );
        assert_eq!(render("{{ ls('/services') | join(',') }}", WEB).unwrap(), "web,webx");
        assert_eq!(
            render("{% for k, v in keys|items %}{{ k|base }}{% endfor %}", WEB).unwrap(),
            "123scheme1"
        );
        assert_eq!(render("{{ keys | length }}", WEB).unwrap(), "5");
    }

    #[test]
    fn filters() {
        assert_eq!(
            render(
                "{{ '/a/b/c' | base }} {{ '/a/b/c' | dirname }} {{ '/a' | dirname }}",
                &[]
            )
            .unwrap(),
            "c /a/b /"
        );
        assert_eq!(base("/a/b/"), "b");
        assert_eq!(base(""), ".");
        assert_eq!(dirname("a"), ".");
        assert_eq!(render("{{ ('a:b:c' | split(':'))[1] }}", &[]).unwrap(), "b");
        assert_eq!(
            render("{{ (getv('/j') | json).port }}", &[("/j", "{\n \"port\": 8080\n}")]).unwrap(),
            "8080"
        );
        assert!(render("{{ 'x' | json }}", &[]).unwrap_err().contains("not JSON"));
    }

    #[test]
    fn addr_lets_only_host_port_through() {
        for ok in [
            "10.0.0.1:80",
            "web-1.example.com:8080",
            "[::1]:443",
            "[2001:db8::1]:1",
            "h:65535",
        ] {
            assert_eq!(address(ok), Some(ok), "{ok}");
        }
        for bad in [
            "10.0.0.1:80 backup",
            "10.0.0.1:80\n    server evil 6.6.6.6:80",
            "10.0.0.1:80; include /etc/passwd",
            "10.0.0.1",
            "10.0.0.1:0",
            "10.0.0.1:65536",
            "10.0.0.1:+80",
            "300.0.0.1:80",
            "::1:80",
            "[::1]80",
            "-h:80",
            ":80",
            "a..b:80",
            "h_1:80",
        ] {
            assert_eq!(address(bad), None, "{bad:?}");
        }
        let e = render("{{ getv('/k') | addr }}", &[("/k", "1.2.3.4:80 backup")]).unwrap_err();
        assert!(e.contains("the value of /k") && e.contains("not HOST:PORT"), "{e}");
    }

    #[test]
    fn a_value_with_a_control_character_is_not_printed() {
        let evil = &[("/services/web/1", "10.0.0.1:80\n    server evil 6.6.6.6:80")];
        for t in [
            "{{ getv('/services/web/1') }}",
            "{{ keys['/services/web/1'] }}",
            "{% for v in getvs('/services/web/*') %}server {{ v }}{% endfor %}",
            "{{ 'server a ' ~ getv('/services/web/1') ~ ' check' }}",
        ] {
            let e = render(t, evil).unwrap_err();
            assert!(e.contains("/services/web/1") && e.contains("U+000A"), "{t}: {e}");
        }
        // Through a filter that keeps the newline: still refused.
        let e = render("{{ 'a/' ~ getv('/services/web/1') | base }}", evil).unwrap_err();
        assert!(e.contains("/services/web/1"), "{e}");
        // Used but not printed, or with the control character taken out: fine.
        assert_eq!(render("{{ getv('/services/web/1') | length }}", evil).unwrap(), "38");
        assert_eq!(
            render("{{ getv('/services/web/1') | replace('\n', ' ') | trim }}", evil).unwrap(),
            "10.0.0.1:80     server evil 6.6.6.6:80"
        );
        // A JSON value spread over lines, read through `json`: fine.
        assert_eq!(
            render("{{ (getv('/j') | json).port }}", &[("/j", "{\n \"port\": 8080\n}")]).unwrap(),
            "8080"
        );
        // A key holding a newline is refused too, however it is printed.
        let key = &[("/services/web/1\n    server evil 6.6.6.6:80 #", "10.0.0.1:80")];
        for t in [
            "{% for kv in gets('/services/web/*') %}server web-{{ kv.key | base }} {{ kv.value | addr }}{% endfor %}",
            "{{ keys | list | first }}",
        ] {
            let e = render(t, key).unwrap_err();
            assert!(e.contains("the key /services/web/1\\n"), "{t}: {e}");
        }
        // The template's own newlines are the template's business while no
        // key or value holds a control character.
        assert_eq!(render("{{ 'a\nb' }}", &[("/x", "y")]).unwrap(), "a\nb");
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let e = Template::compile("f.j2", "a\n{% if %}".into()).unwrap_err();
        assert!(e.starts_with("syntax error: f.j2:2:"), "{e}");
    }
}
