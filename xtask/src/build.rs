//! `build`, `run`, `check`: the release agent, kernel programs embedded, and running it.

use std::process::Command;

use crate::common::{agent_binary, run_cmd};

pub(crate) fn build() -> anyhow::Result<()> {
    run_cmd(Command::new("cargo").args(["build", "--release", "-p", "runner-monitor"]))
}

/// Builds the agent and starts it with the built-in default policy; `args` go to `run`.
pub(crate) fn run(args: Vec<String>) -> anyhow::Result<()> {
    build()?;
    let mut cmd = Command::new(agent_binary());
    cmd.arg("run").args(args);
    run_cmd(&mut cmd)
}

/// Builds the agent and runs `runner-monitor check`.
pub(crate) fn check() -> anyhow::Result<()> {
    build()?;
    run_cmd(Command::new(agent_binary()).arg("check"))
}
