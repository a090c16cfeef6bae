//! The repository as a new user meets it: the commands the README names run
//! from a clean clone, the prerequisite check finds what the build needs, and
//! `rust-version` is true of the locked dependencies.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The `scripts/...`, `bench/...` and `examples/.../render`-like paths the
/// README gives as commands: the first word of each line of its shell blocks,
/// and every `dir/name` in backticks that is a file without an extension.
fn readme_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let mut found = Vec::new();
    let mut in_block = false;
    for line in readme.lines() {
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
            if plain && !w.starts_with('/') && p.is_file() && !found.iter().any(|f| f == w) {
                found.push(w.to_string());
            }
        }
    }
    found
}

// Regression: bench/run was committed without its executable bit, so the
// README's command failed with "Permission denied" from a clean clone.
#[test]
fn every_command_the_readme_names_is_executable() {
    let commands = readme_commands();
    for must in ["scripts/demo", "scripts/demo-rollout", "scripts/test", "bench/run"] {
        assert!(commands.iter().any(|c| c == must), "README names {must}: {commands:?}");
    }
    for c in &commands {
        let mode = std::fs::metadata(root().join(c)).unwrap().permissions().mode();
        assert!(mode & 0o111 != 0, "{c} is not executable (mode {mode:o})");
        let first = std::fs::read_to_string(root().join(c)).unwrap();
        assert!(first.starts_with("#!"), "{c} has no #! line");
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
