//! `cargo xtask setup|build|package|run|check|lint|bench|fuzz|test`: the front door for people and CI.
//!
//! Every command first makes sure the machine can build the kernel programs (`setup`, which is
//! idempotent and says what it does), so `cargo xtask run` works on a fresh machine.

mod bench;
mod build;
mod common;
mod fuzz;
mod lint;
mod package;
mod setup;
mod test;

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

use crate::{common::is_root, setup::setup};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need: nightly rust-src, bpf-linker, cargo-fuzz, cargo-deb,
    /// Debian packages.
    Setup,
    /// Build the agent (release), kernel programs embedded.
    Build,
    /// Build the Debian package (release agent, unit, sysusers file, hooks, policy, maintainer
    /// scripts) with cargo-deb and print its path.
    Package,
    /// Build and start the agent with the built-in default policy; arguments go to `run`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build and run `runner-monitor check`.
    Check,
    /// Clippy with warnings as errors, on the agent and on the kernel programs (bpf target).
    ///
    /// Without the nightly and bpf-linker, `RUNNER_MONITOR_SKIP_EBPF=1 cargo clippy -p
    /// runner-monitor --all-targets -- -D warnings` lints the agent alone (an empty object stands
    /// in for the kernel programs).
    Lint,
    /// Measure the agent's cost (syscalls off/floor/on, engine throughput and memory).
    Bench {
        /// A short run of each benchmark (CI keeps them working with it).
        #[arg(long)]
        smoke: bool,
        /// Only these benchmarks (comma-separated): syscalls, exec, workloads, pipeline, memory,
        /// engine, nats, fleet, dns. All by default.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
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
    ///
    /// Without the nightly and bpf-linker, `RUNNER_MONITOR_SKIP_EBPF=1 cargo test -p
    /// runner-monitor` runs the agent's unit tests alone (an empty object stands in for the
    /// kernel programs; an agent built so refuses to load its sensors).
    Test {
        /// Extra arguments for the test binaries (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = common::workspace_root();
    std::env::set_current_dir(&root).context("entering the workspace")?;
    match cli.command {
        Task::Setup => setup(),
        Task::Build => {
            setup()?;
            build::build()
        }
        Task::Package => {
            setup()?;
            let path = package::package()?;
            println!("{}", path.display());
            Ok(())
        }
        Task::Run { args } => {
            setup()?;
            build::run(args)
        }
        Task::Check => {
            setup()?;
            build::check()
        }
        Task::Bench { smoke, only } => {
            setup()?;
            if !is_root() {
                bail!("the benchmarks load the agent and enable tracepoints: run them as root");
            }
            bench::bench(smoke, &only)
        }
        Task::Lint => {
            setup()?;
            lint::lint()
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
            test::test(&args)
        }
    }
}
