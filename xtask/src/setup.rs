//! `setup`: make the machine ready to build and test, idempotently, saying what it installs:
//! nightly rust-src, bpf-linker, cargo-fuzz, the Debian packages the tests use.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use crate::common::{is_root, output, run_cmd, say};

/// bpf-linker version the build is known to work with.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// cargo-fuzz version `cargo xtask fuzz` is known to work with.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Debian packages the tests use: `ip` for network namespaces, `unshare`/`mount` for a private
/// resolv.conf, `getent` for glibc lookups, bpftool to inspect what is loaded, a real Prometheus
/// (and promtool) to scrape the agent and check the rules, a real Alertmanager to receive its
/// alerts, curl to query them, systemd for `systemd-analyze` and to boot a systemd that runs
/// the hardened unit (`unshare`/`nsenter` from util-linux), and a headless Chromium to render
/// the agent's `/jobs` pages (`tests/tests/job_report.rs`).
const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "util-linux",
    "systemd",
    "mount",
    "libc-bin",
    "bpftool",
    "prometheus",
    "prometheus-alertmanager",
    "curl",
    "chromium",
];

pub(crate) fn setup() -> anyhow::Result<()> {
    // 1. The nightly toolchain builds the kernel programs (-Z build-std needs rust-src).
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .map(|s| PathBuf::from(s.trim()))
        .context(
            "no nightly Rust toolchain: install it with `rustup toolchain install nightly` \
             (the kernel programs need it)",
        )?;
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        say("adding rust-src to the nightly toolchain");
        run_cmd(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    // 2. bpf-linker, built against the nightly's own LLVM (no LLVM download needed).
    // Under `rustup run nightly`, as aya-build runs it: that puts the nightly's libLLVM on the
    // library path.
    let linker_ok =
        output(Command::new("rustup").args(["run", "nightly", "bpf-linker", "--version"]))
            .is_some_and(|v| v.contains(BPF_LINKER_VERSION));
    if !linker_ok {
        install_bpf_linker(&sysroot)?;
    }

    // 3. cargo-fuzz, for `cargo xtask fuzz`, built from crates.io like bpf-linker.
    let fuzz_ok = output(Command::new("cargo").args(["fuzz", "--version"]))
        .is_some_and(|v| v.contains(CARGO_FUZZ_VERSION));
    if !fuzz_ok {
        say(&format!(
            "installing cargo-fuzz {CARGO_FUZZ_VERSION} (about two minutes, once)"
        ));
        run_cmd(Command::new("cargo").args([
            "install",
            "cargo-fuzz",
            "--version",
            CARGO_FUZZ_VERSION,
            "--locked",
        ]))?;
    }

    // 4. Debian packages the tests use.
    if is_root() && Path::new("/usr/bin/apt-get").exists() {
        let missing: Vec<&str> = DEBIAN_PACKAGES
            .iter()
            .copied()
            .filter(|p| {
                !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                    .is_some_and(|s| s.contains("install ok installed"))
            })
            .collect();
        if !missing.is_empty() {
            say(&format!(
                "installing Debian packages: {}",
                missing.join(" ")
            ));
            run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
            run_cmd(
                Command::new("apt-get")
                    .args(["install", "-y", "-qq", "--no-install-recommends"])
                    .args(&missing)
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )?;
        }
    }
    Ok(())
}

fn install_bpf_linker(sysroot: &Path) -> anyhow::Result<()> {
    let lib = sysroot.join("lib");
    let libllvm = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
        })
        .with_context(|| format!("no libLLVM.so.*-rust-* in {}", lib.display()))?;
    // A prefix that looks like an LLVM install to llvm-sys: an empty llvm-config and the
    // nightly's libLLVM under the name it links against.
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or("/root".into());
    let prefix = home.join(".cache/runner-monitor/llvm-prefix");
    std::fs::create_dir_all(prefix.join("bin"))?;
    std::fs::create_dir_all(prefix.join("lib"))?;
    let config = prefix.join("bin/llvm-config");
    std::fs::write(&config, "#!/bin/sh\n")?;
    run_cmd(Command::new("chmod").arg("+x").arg(&config))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)?;
    say(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against {} (about a minute)",
        libllvm.display()
    ));
    run_cmd(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
            ])
            .env("LLVM_PREFIX", &prefix),
    )
}
