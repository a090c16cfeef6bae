//! The repository as a new user meets it: the commands the README and the
//! guide under `docs/` name run from a clean clone, every relative link of
//! the docs leads somewhere, the prerequisite check finds what the build
//! needs, and `rust-version` is true of the locked dependencies.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The Markdown pages of the repository: the README, the guide under
/// `docs/`, and the READMEs of `examples/`, `units/` and `bench/`.
fn markdown_pages() -> Vec<String> {
    let mut pages = vec!["README.md".to_string(), "units/README.md".to_string()];
    for dir in ["docs", "examples", "bench"] {
        let mut stack = vec![root().join(dir)];
        while let Some(d) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else { continue };
            for e in entries.map(Result::unwrap) {
                let path = e.path();
                let name = e.file_name().to_string_lossy().into_owned();
                if path.is_dir() {
                    if dir == "examples" {
                        stack.push(path);
                    }
                } else if (dir == "docs" && name.ends_with(".md")) || name == "README.md" {
                    pages.push(path.strip_prefix(root()).unwrap().to_string_lossy().into_owned());
                }
            }
        }
    }
    pages.sort();
    pages.dedup();
    pages
}

/// The README and the guide under `docs/`: the pages that name commands.
fn guide_pages() -> Vec<String> {
    markdown_pages()
        .into_iter()
        .filter(|p| p == "README.md" || p == "bench/README.md" || p.starts_with("docs/"))
        .collect()
}

/// The `scripts/...`, `bench/...` and `examples/.../render`-like paths a
/// page gives as commands: the first word of each line of its shell blocks,
/// and every `dir/name` in backticks that is a file without an extension.
fn commands_in(page: &str) -> Vec<String> {
    let text = std::fs::read_to_string(root().join(page)).unwrap();
    let mut found = Vec::new();
    let mut in_block = false;
    for line in text.lines() {
        if line.starts_with("```") {
            in_block = !in_block;
            continue;
        }
        let words: Vec<&str> = if in_block {
            line.split_whitespace().take(1).collect()
        } else {
            line.split('`')
                .skip(1)
                .step_by(2)
                .filter_map(|w| w.split_whitespace().next())
                .collect()
        };
        for w in words {
            let p = root().join(w);
            let plain = Path::new(w).extension().is_none() && w.contains('/') && !w.ends_with('/');
            // Build output (`target/...`) is no command of the repository's.
            let ours = !w.starts_with('/') && !w.starts_with("target/");
            if plain && ours && p.is_file() && !found.iter().any(|f| f == w) {
                found.push(w.to_string());
            }
        }
    }
    found
}

// Regression: bench/run was committed without its executable bit, so the
// README's command failed with "Permission denied" from a clean clone.
#[test]
fn every_command_the_guide_names_is_executable() {
    let mut commands: Vec<String> = Vec::new();
    for page in guide_pages() {
        let named = commands_in(&page);
        let must: &[&str] = match page.as_str() {
            "README.md" => &["scripts/demo", "scripts/demo-rollout", "scripts/test"],
            "bench/README.md" => &["bench/run", "bench/agent", "bench/render", "scripts/soak"],
            "docs/reliability.md" => &["scripts/campaign"],
            _ => &[],
        };
        for m in must {
            assert!(named.iter().any(|c| c == m), "{page} names {m}: {named:?}");
        }
        for c in named {
            if !commands.contains(&c) {
                commands.push(c);
            }
        }
    }
    for c in &commands {
        let mode = std::fs::metadata(root().join(c)).unwrap().permissions().mode();
        assert!(mode & 0o111 != 0, "{c} is not executable (mode {mode:o})");
        let first = std::fs::read(root().join(c)).unwrap();
        assert!(first.starts_with(b"#!"), "{c} has no #! line");
    }
    // git records the bit too: a clean clone takes it from there.
    let out = Command::new("git")
        .args(["ls-files", "-s", "--"])
        .args(&commands)
        .current_dir(root())
        .output();
    if let Some(out) = out.ok().filter(|o| o.status.success() && !o.stdout.is_empty()) {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            assert!(line.starts_with("100755"), "git records {line} as not executable");
        }
    }
}

/// GitHub's anchor for a heading: lowercase, punctuation dropped (`-` and
/// `_` kept), each space a `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            '-' | '_' => Some(c),
            c if c.is_alphanumeric() => Some(c),
            _ => None,
        })
        .flat_map(char::to_lowercase)
        .collect()
}

/// The anchors of a Markdown page's headings, a repeated one with `-1`,
/// `-2`, ... as GitHub numbers them.
fn anchors(text: &str) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    let mut in_block = false;
    for line in text.lines() {
        if line.starts_with("```") {
            in_block = !in_block;
            continue;
        }
        let hashes = line.len() - line.trim_start_matches('#').len();
        if in_block || !(1..=6).contains(&hashes) || !line[hashes..].starts_with(' ') {
            continue;
        }
        let base = slug(&line[hashes..]);
        let mut s = base.clone();
        let mut n = 0;
        while found.contains(&s) {
            n += 1;
            s = format!("{base}-{n}");
        }
        found.push(s);
    }
    found
}

/// The targets of a page's inline links `[text](target)`, outside code
/// blocks and code spans.
fn links(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut in_block = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if in_block {
            continue;
        }
        let prose: String = line.split('`').step_by(2).collect::<Vec<_>>().join("");
        // Code spans are dropped, so a link whose text is code, [`x`](y),
        // reads as [](y).
        let mut rest = prose.as_str();
        while let Some(i) = rest.find("](") {
            let after = &rest[i + 2..];
            if let Some(end) = after.find(')') {
                let target = after[..end].split_whitespace().next().unwrap_or("");
                found.push(target.to_string());
            }
            rest = after;
        }
    }
    found
}

// The README became a short entry page with a guide under docs/: every
// relative link between them (and the examples' pages) must lead somewhere,
// and every #anchor to a heading that exists.
#[test]
fn every_relative_link_in_the_docs_resolves() {
    let pages = markdown_pages();
    assert!(pages.iter().any(|p| p == "docs/README.md"), "{pages:?}");
    let mut broken = Vec::new();
    let mut checked = 0;
    for page in &pages {
        let text = std::fs::read_to_string(root().join(page)).unwrap();
        let dir = Path::new(page).parent().unwrap();
        for target in links(&text) {
            if target.is_empty()
                || target.starts_with("http://")
                || target.starts_with("https://")
                || target.starts_with("mailto:")
            {
                continue;
            }
            checked += 1;
            let (path, anchor) = match target.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (target.as_str(), None),
            };
            let file = if path.is_empty() {
                Path::new(page).to_path_buf()
            } else {
                normalize(&dir.join(path))
            };
            let rel = file.to_string_lossy().into_owned();
            if !root().join(&file).exists() {
                broken.push(format!("{page}: {target}: no {rel}"));
                continue;
            }
            if let Some(anchor) = anchor {
                let ok = rel.ends_with(".md")
                    && anchors(&std::fs::read_to_string(root().join(&file)).unwrap())
                        .iter()
                        .any(|a| a == anchor);
                if !ok {
                    broken.push(format!("{page}: {target}: no heading #{anchor} in {rel}"));
                }
            }
        }
    }
    assert!(checked > 50, "only {checked} relative links found");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// `a/b/../c` as `a/c`, without touching the file system.
fn normalize(path: &Path) -> std::path::PathBuf {
    let mut out = std::path::PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::ParentDir => {
                assert!(out.pop(), "{} leaves the repository", path.display());
            }
            std::path::Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

#[test]
fn heading_anchors_are_githubs() {
    for (heading, anchor) in [
        ("Where etcd is", "where-etcd-is"),
        (
            "How fast will it react? `sidekick explain`",
            "how-fast-will-it-react-sidekick-explain",
        ),
        (
            "sidekick-render.service: root, without capabilities",
            "sidekick-renderservice-root-without-capabilities",
        ),
        ("The .deb's units", "the-debs-units"),
        (
            "Waiting for keys (rolling updates, scripts)",
            "waiting-for-keys-rolling-updates-scripts",
        ),
    ] {
        assert_eq!(slug(heading), anchor);
    }
    assert_eq!(anchors("# A\n```\n# not a heading\n```\n## A\n#no\n"), ["a", "a-1"]);
    assert_eq!(
        links("[x](a.md#b) `[y](no.md)` [`z`](c/)\n```\n[w](no)\n```\n"),
        ["a.md#b", "c/"]
    );
}

/// Runs `missing_prereqs` from scripts/prereqs.sh with the protobuf include
/// directory pointed at `include`.
fn missing_with_include(include: &Path) -> String {
    let out = Command::new("bash")
        .args(["-c", ". scripts/prereqs.sh && missing_prereqs"])
        .env("PROTOBUF_INCLUDE", include)
        .current_dir(root())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

// Regression: the check looked for `protoc` only, and a fresh machine with
// protobuf-compiler but without libprotobuf-dev failed in etcd-client's build
// with "google/protobuf/descriptor.proto: File not found".
#[test]
fn the_prerequisite_check_wants_the_protobuf_include_files() {
    let empty = tempfile::tempdir().unwrap();
    let missing = missing_with_include(empty.path());
    assert!(missing.lines().any(|l| l == "libprotobuf-dev"), "{missing:?}");

    std::fs::create_dir_all(empty.path().join("google/protobuf")).unwrap();
    std::fs::write(
        empty.path().join("google/protobuf/descriptor.proto"),
        "syntax = \"proto2\";\n",
    )
    .unwrap();
    let missing = missing_with_include(empty.path());
    assert!(!missing.lines().any(|l| l == "libprotobuf-dev"), "{missing:?}");

    // Without root rights to install (or told not to), it names the package
    // and fails, rather than letting the build fail later.
    let out = Command::new("bash")
        .args(["-c", ". scripts/prereqs.sh && ensure_prereqs"])
        .env("PROTOBUF_INCLUDE", tempfile::tempdir().unwrap().path())
        .env("PREREQS_NO_INSTALL", "1")
        .current_dir(root())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("libprotobuf-dev"), "{err}");
}

fn version(v: &str) -> Vec<u64> {
    v.split('.').map(|p| p.parse().unwrap()).collect()
}

// Regression: rust-version said 1.85 while the locked tonic and time need
// 1.88; this keeps the claim at least as high as any locked dependency's.
#[test]
fn rust_version_covers_every_locked_dependency() {
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--locked", "--format-version", "1"])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ours = version(env!("CARGO_PKG_RUST_VERSION"));
    let mut highest = (vec![0], String::new());
    for p in meta["packages"].as_array().unwrap() {
        if let Some(v) = p["rust_version"].as_str() {
            let v = version(v);
            if v > highest.0 {
                highest = (v, p["name"].as_str().unwrap().to_string());
            }
        }
    }
    assert!(highest.0.len() > 1, "no dependency declares a rust-version");
    let pad = |mut v: Vec<u64>| {
        v.resize(3, 0);
        v
    };
    assert!(
        pad(ours.clone()) >= pad(highest.0.clone()),
        "rust-version {ours:?} is below {} ({:?})",
        highest.1,
        highest.0
    );
}
