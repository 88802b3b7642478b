//! `cargo xtask setup|build|package|run|check|lint|bench|fuzz|test`: the front door for people and CI.
//!
//! Every command first makes sure the machine can build the kernel programs (`setup`, which is
//! idempotent and says what it does), so `cargo xtask run` works on a fresh machine.

mod bench;
mod build;
mod common;
mod fuzz;
mod guest;
mod kernels;
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
        /// Only these benchmarks (comma-separated): syscalls, exec, egress, workloads, pipeline,
        /// memory, engine, nats, fleet, dns, containers. All by default.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Interleaved rounds of the benchmarks that compare modes round by round (5; `--smoke`:
        /// 1; dns and workloads run at most 3). More rounds narrow the medians on a noisy host.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        rounds: Option<u16>,
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
        /// Only the sensor tests (tests/tests/sensors.rs, io_uring.rs), in a QEMU guest booting
        /// this kernel: `6.1`, `6.12` (Debian's, installed by setup), `host`, a release or a
        /// path to a vmlinuz-RELEASE. Repeatable.
        #[arg(long)]
        kernel: Vec<String>,
        /// Only the sensor tests, on the kernel matrix: host, Debian's 6.1 and 6.12.
        #[arg(long)]
        kernels: bool,
        /// Extra arguments for the test binaries (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Boot a kernel of the matrix under QEMU with the host's files and run a shell command there
    /// (e.g. `cargo xtask guest 6.1 target/release/runner-monitor check`).
    Guest {
        /// `6.1`, `6.12`, a release or a path to a vmlinuz-RELEASE.
        kernel: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
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
        Task::Bench {
            smoke,
            only,
            rounds,
        } => {
            setup()?;
            if !is_root() {
                bail!("the benchmarks load the agent and enable tracepoints: run them as root");
            }
            bench::bench(smoke, &only, rounds.map(usize::from))
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
        Task::Test {
            kernel,
            kernels,
            args,
        } => {
            setup()?;
            if kernels {
                let mut all = vec!["host".to_owned()];
                all.extend(guest::MATRIX.map(str::to_owned));
                kernels::test(&all, &args)
            } else if !kernel.is_empty() {
                kernels::test(&kernel, &args)
            } else {
                test::test(&args)
            }
        }
        Task::Guest { kernel, command } => guest_command(&kernel, &command),
    }
}

/// `cargo xtask guest KERNEL COMMAND...`: the command's output, and its exit status as ours.
fn guest_command(kernel: &str, command: &[String]) -> anyhow::Result<()> {
    let kernel = guest::resolve(kernel)?;
    let dir = common::workspace_root()
        .join("target/guest")
        .join(format!("command-{}", kernel.release));
    let cwd = std::env::current_dir()?;
    let script = format!("cd '{}' && {}\n", cwd.display(), command.join(" "));
    let run = guest::run(&kernel, &dir, &script, std::time::Duration::from_secs(900))?;
    print!("{}", run.output);
    common::say(&format!(
        "{} guest: {:.1} s boot to power-off",
        kernel.release,
        run.elapsed.as_secs_f64()
    ));
    match run.status {
        Some(0) => Ok(()),
        Some(rc) => bail!("exit status {rc}"),
        None => bail!("the guest died:\n{}", run.console),
    }
}
