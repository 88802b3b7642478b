//! `runner-monitor baseline learn`: the command line around `runner_monitor::baseline`.

use std::{path::PathBuf, sync::Arc};

use anyhow::Context as _;
use clap::Subcommand;
use runner_monitor::{
    baseline::{Learner, read_trace},
    policy::Policy,
};

#[derive(Subcommand)]
pub enum BaselineCommand {
    /// Learn per repository and workflow what recorded normal jobs used (destinations, secret
    /// sockets, credential kinds) and write it as policy rules (`baseline = true`); with
    /// `--policy`, also list the entitlements of that policy no recorded job used.
    Learn {
        /// Recorded event traces (`run --events-out`) of normal jobs.
        #[arg(required = true)]
        traces: Vec<PathBuf>,
        /// Where to write the learned rules; `-` is stdout.
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
        /// The policy in force: what counts as a credential or a secret socket, and whose unused
        /// entitlements to report. Without it, the built-in policy.
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
    },
}

pub fn command(command: BaselineCommand) -> anyhow::Result<()> {
    let BaselineCommand::Learn {
        traces,
        output,
        policy,
    } = command;
    let in_force = Arc::new(match &policy {
        Some(path) => Policy::load(path)?,
        None => Policy::builtin(),
    });
    let mut learner = Learner::new(in_force);
    for trace in &traces {
        let name = trace.file_name().map_or_else(
            || trace.display().to_string(),
            |n| n.to_string_lossy().into(),
        );
        learner.learn(&name, read_trace(trace)?);
    }
    let rules = learner.rules();
    if output.as_os_str() == "-" {
        print!("{rules}");
    } else {
        std::fs::write(&output, rules).with_context(|| format!("writing {}", output.display()))?;
    }
    tracing::info!(
        traces = traces.len(),
        jobs = learner.jobs().len(),
        unidentified = learner.unidentified,
        "baseline learned"
    );
    if let Some(path) = policy {
        let unused = learner.unused();
        println!(
            "{}: {} entitlement(s) no recorded job used",
            path.display(),
            unused.len()
        );
        for line in unused {
            println!("  {line}");
        }
    }
    Ok(())
}
