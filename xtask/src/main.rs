//! `cargo xtask setup|build|run|check|lint|bench|fuzz|test`: the front door for people and CI.
//!
//! Every command first makes sure the machine can build the kernel programs (`setup`, which is
//! idempotent and says what it does), so `cargo xtask run` works on a fresh machine.

mod bench;
mod fuzz;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need: nightly rust-src, bpf-linker, cargo-fuzz, Debian
    /// packages.
    Setup,
    /// Build the agent (release), kernel programs embedded.
    Build,
    /// Build and start the agent with the built-in default policy; arguments go to `run`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build and run `runner-monitor check`.
    Check,
    /// Clippy with warnings as errors, on the agent and on the kernel programs (bpf target).
    Lint,
    /// Measure the agent's cost (syscalls off/floor/on, engine throughput and memory).
    Bench {
        /// A short run of each benchmark (CI keeps them working with it).
        #[arg(long)]
        smoke: bool,
    },
    /// Fuzz the parsers of untrusted input (libFuzzer via cargo-fuzz, nightly) for a bounded
    /// time per target; fails on a crash and names the reproducer.
    Fuzz {
        /// How long each target runs.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Where the instrumented build goes (default: fuzz/target); CI keeps it between runs.
        #[arg(long)]
        target_dir: Option<PathBuf>,
        /// Targets to run (default: all): decode, dns, policy, paths, control.
        targets: Vec<String>,
    },
    /// Run every test: unit tests and the root-only integration tests with the real probes.
    Test {
        /// Extra arguments for the test binaries (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// bpf-linker version the build is known to work with.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// cargo-fuzz version `cargo xtask fuzz` is known to work with.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Debian packages the tests use: `ip` for network namespaces, `unshare`/`mount` for a private
/// resolv.conf, `getent` for glibc lookups, bpftool to inspect what is loaded, a real Prometheus
/// (and promtool) to scrape the agent and check the rules, a real Alertmanager to receive its
/// alerts, curl to query them, systemd for `systemd-analyze` and to boot a systemd that runs
/// the hardened unit (`unshare`/`nsenter` from util-linux).
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
];

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root).context("entering the workspace")?;
    match cli.command {
        Task::Setup => setup(),
        Task::Build => {
            setup()?;
            build()
        }
        Task::Run { args } => {
            setup()?;
            build()?;
            let mut cmd = Command::new(agent_binary());
            cmd.arg("run").args(args);
            run_cmd(&mut cmd)
        }
        Task::Check => {
            setup()?;
            build()?;
            run_cmd(Command::new(agent_binary()).arg("check"))
        }
        Task::Bench { smoke } => {
            setup()?;
            if !is_root() {
                bail!("the benchmarks load the agent and enable tracepoints: run them as root");
            }
            bench::bench(smoke)
        }
        Task::Lint => {
            setup()?;
            lint()
        }
        Task::Fuzz {
            seconds,
            target_dir,
            targets,
        } => {
            setup()?;
            fuzz::fuzz(seconds, &targets, target_dir.as_deref())
        }
        Task::Test { args } => {
            setup()?;
            test(&args)
        }
    }
}

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub(crate) fn agent_binary() -> PathBuf {
    workspace_root().join("target/release/runner-monitor")
}

fn say(what: &str) {
    eprintln!("xtask: {what}");
}

pub(crate) fn run_cmd(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

pub(crate) fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}

fn setup() -> anyhow::Result<()> {
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

fn build() -> anyhow::Result<()> {
    run_cmd(Command::new("cargo").args(["build", "--release", "-p", "runner-monitor"]))
}

fn lint() -> anyhow::Result<()> {
    run_cmd(Command::new("cargo").args([
        "clippy",
        "--workspace",
        "--exclude",
        "runner-monitor-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run_cmd(Command::new("cargo").args([
        "+nightly",
        "clippy",
        "-p",
        "runner-monitor-ebpf",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ]))
}

fn test(args: &[String]) -> anyhow::Result<()> {
    say("unit tests");
    run_cmd(
        Command::new("cargo")
            .args([
                "test",
                "-p",
                "runner-monitor",
                "-p",
                "runner-monitor-common",
                "-p",
                "xtask",
            ])
            .arg("--")
            .args(args),
    )?;
    if !is_root() {
        bail!(
            "the integration tests load eBPF programs and need root: run `sudo cargo xtask test`"
        );
    }
    say("integration tests (real probes, real processes, the real agent binary)");
    run_cmd(Command::new("cargo").args(["build", "-p", "runner-monitor"]))?;
    run_cmd(
        Command::new("cargo")
            .args(["test", "-p", "integration-tests", "--", "--nocapture"])
            .args(args),
    )
}
