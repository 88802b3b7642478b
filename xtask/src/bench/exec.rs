//! Exec latency outside any job: fork + execve + wait of a small static program with an
//! environment of 60 variables, agent off and on, interleaved rounds. Every exec on the host
//! outside a job pays the kernel's environment scan for job markers, so this is its cost.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use super::{Agent, Sizes, bench_workload, median, spread};

/// A static program that returns at once, compiled here (`cc` is the toolchain's linker).
fn noop(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    let source = dir.join("noop.c");
    let program = dir.join("noop");
    std::fs::write(&source, "int main(void) { return 0; }\n")?;
    let out = Command::new("cc")
        .args(["-static", "-O2", "-o"])
        .arg(&program)
        .arg(&source)
        .output()
        .context("running cc")?;
    if !out.status.success() {
        bail!(
            "cc -static failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(program)
}

/// ns per fork + exec + wait, run outside any job (not as a Runner.Worker job).
fn measure(program: &Path, n: u64) -> anyhow::Result<f64> {
    let out = Command::new(bench_workload())
        .arg("exec")
        .arg(program)
        .arg(n.to_string())
        .env_clear()
        .output()
        .context("bench-workload exec")?;
    if !out.status.success() {
        bail!(
            "bench-workload exec failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("bench-workload exec output")
}

pub(super) fn run(dir: &Path, sizes: &Sizes) -> anyhow::Result<Value> {
    let program = noop(dir)?;
    let n = if sizes.smoke { 300 } else { 5_000 };
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for _ in 0..sizes.rounds {
        off.push(measure(&program, n)?);
        let agent = Agent::start(dir)?;
        on.push(measure(&program, n)?);
        agent.stop()?;
    }
    let (off_spread, on_spread) = (spread(&off), spread(&on));
    let (off_m, on_m) = (median(&mut off), median(&mut on));
    Ok(json!({
        "off_ns": off_m,
        "on_ns": on_m,
        "on_ratio": on_m / off_m,
        "off_spread_ns": off_spread,
        "on_spread_ns": on_spread,
        "execs_per_round": n,
        "environment_variables": 60,
        "rounds": sizes.rounds,
    }))
}

pub(super) fn print(r: &Value) {
    println!(
        "exec outside a job, 60 env vars (median ns): off {:.0}, agent {:.0}, agent/off {:.3} \
         (spread off {:?}, agent {:?})",
        r["off_ns"].as_f64().unwrap_or(0.0),
        r["on_ns"].as_f64().unwrap_or(0.0),
        r["on_ratio"].as_f64().unwrap_or(0.0),
        r["off_spread_ns"],
        r["on_spread_ns"],
    );
}
