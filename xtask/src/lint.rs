//! `lint`: clippy with warnings as errors, on the agent (host) and on the kernel programs (bpf).

use std::process::Command;

use crate::common::run_cmd;

pub(crate) fn lint() -> anyhow::Result<()> {
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
