//! Generates what the .deb ships besides the binary: shell completions
//! (bash, zsh, fish) and man pages from the clap definitions, and the unit
//! files with the packaged binary's path. It runs at packaging time
//! (`scripts/package`), so none of it is built into `sidekick`.
//!
//! ```sh
//! cargo run --example gen_docs -- target/deb-assets    # the default directory
//! ```
//!
//! Layout of the output, which `[package.metadata.deb]` in Cargo.toml maps
//! onto the package: `completions/` (`sidekick.bash`, `_sidekick`,
//! `sidekick.fish`), `man/` (`sidekick.1` and one page per command,
//! `sidekick-run.1`, ...), `units/` (the templates of `units/`, running
//! `/usr/bin/sidekick`).

use std::fs;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;
use etcd_sidekick::cli::Cli;

/// Where the unit templates run the binary from a manual install, and where
/// the package puts it.
const INSTALLED: &str = "/usr/local/bin/sidekick";
const PACKAGED: &str = "/usr/bin/sidekick";

fn main() -> std::io::Result<()> {
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "target/deb-assets".into()));
    // Start clean: a command that is gone must not leave its page behind.
    if out.exists() {
        fs::remove_dir_all(&out)?;
    }
    for dir in ["completions", "man", "units"] {
        fs::create_dir_all(out.join(dir))?;
    }

    let mut cmd = Cli::command();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, "sidekick", out.join("completions"))?;
    }
    clap_mangen::generate_to(Cli::command(), out.join("man"))?;

    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("units");
    for entry in fs::read_dir(&units)? {
        let path = entry?.path();
        let name = path.file_name().expect("a file name").to_string_lossy().into_owned();
        if name.ends_with(".service") || name.ends_with(".conf") {
            let text = fs::read_to_string(&path)?.replace(INSTALLED, PACKAGED);
            fs::write(out.join("units").join(&name), text)?;
        }
    }
    println!("{}", out.display());
    Ok(())
}
