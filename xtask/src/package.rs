//! `package`: the Debian package (cargo-deb over the release build; metadata in
//! runner-monitor/Cargo.toml `[package.metadata.deb]`), its path printed on stdout.

use std::{path::PathBuf, process::Command};

use anyhow::Context as _;

use crate::{build, common::say};

pub(crate) fn package() -> anyhow::Result<PathBuf> {
    build::build()?;
    // --no-build: the binary is the one `build` just made, the way `cargo xtask build` makes
    // it (cargo-deb's own build would pass its own flags).
    let out = Command::new("cargo")
        .args(["deb", "-p", "runner-monitor", "--no-build"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo deb (`cargo xtask setup` installs cargo-deb)")?;
    anyhow::ensure!(out.status.success(), "cargo deb failed: {}", out.status);
    // cargo-deb prints the package's path as its last line.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = stdout
        .lines()
        .rev()
        .find(|l| l.trim_end().ends_with(".deb"))
        .map(|l| PathBuf::from(l.trim()))
        .with_context(|| format!("no .deb path in cargo deb's output: {stdout}"))?;
    say(&format!("package: {}", path.display()));
    Ok(path)
}
