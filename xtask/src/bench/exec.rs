//! Exec latency outside any job: fork + execve + wait of a small static program with an
//! environment of 60 variables, agent off and on, interleaved rounds. Every exec on the host
//! outside a job pays the kernel's environment scan for job markers, so this is its cost.

use std::{collections::BTreeMap, path::Path, process::Command};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use super::{Agent, Sizes, bench_workload, median, spread};

/// A static program that returns at once, compiled here (`cc` is the toolchain's linker).
pub(super) fn noop(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
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

/// Wall-clock and CPU ns per fork + exec + wait, run outside any job (not as a Runner.Worker
/// job).
fn measure(program: &Path, n: u64) -> anyhow::Result<(f64, f64)> {
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
    let text = String::from_utf8_lossy(&out.stdout);
    let mut numbers = text.split_whitespace().map(str::parse::<f64>);
    match (numbers.next(), numbers.next()) {
        (Some(Ok(wall)), Some(Ok(cpu))) => Ok((wall, cpu)),
        _ => bail!("bench-workload exec printed {text:?}, not two numbers"),
    }
}

/// Run time and run count so far (kernel.bpf_stats_enabled) of the agent's programs whose name
/// `wanted` accepts, by program name (as the kernel keeps it: 15 characters), from the agent's
/// program fds.
pub(super) fn program_stats(
    agent: &Agent,
    wanted: impl Fn(&str) -> bool,
) -> BTreeMap<String, (u64, u64)> {
    let mut stats = BTreeMap::new();
    let dir = format!("/proc/{}/fdinfo", agent.pid());
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let info = std::fs::read_to_string(entry.path()).unwrap_or_default();
        let field = |name: &str| -> Option<u64> {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
        };
        let (Some(id), Some(time), Some(count)) =
            (field("prog_id:"), field("run_time_ns:"), field("run_cnt:"))
        else {
            continue;
        };
        let Ok(out) = Command::new("bpftool")
            .args(["prog", "show", "id", &id.to_string(), "--json"])
            .output()
        else {
            continue;
        };
        let name = serde_json::from_slice::<Value>(&out.stdout)
            .ok()
            .and_then(|v| v["name"].as_str().map(str::to_owned));
        if let Some(name) = name.filter(|n| wanted(n)) {
            let e = stats.entry(name).or_insert((0, 0));
            // A program attached to two tracepoints has one fd per attachment's program.
            e.0 = e.0.max(time);
            e.1 = e.1.max(count);
        }
    }
    stats
}

/// Turns kernel.bpf_stats_enabled on while held.
pub(super) struct BpfStats(String);

impl BpfStats {
    pub(super) fn enable() -> anyhow::Result<Self> {
        let path = "/proc/sys/kernel/bpf_stats_enabled";
        let old = std::fs::read_to_string(path)?;
        std::fs::write(path, "1")?;
        Ok(Self(old))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", self.0.trim());
    }
}

fn is_exec(name: &str) -> bool {
    name.contains("exec")
}

pub(super) fn run(dir: &Path, sizes: &Sizes) -> anyhow::Result<Value> {
    let program = noop(dir)?;
    let n = if sizes.smoke { 300 } else { 5_000 };
    let (mut off, mut on) = (Vec::new(), Vec::new());
    let (mut off_cpu, mut on_cpu) = (Vec::new(), Vec::new());
    // In-kernel time per exec of the exec programs (all execs on the host while measuring, so
    // other processes' environments count too): the scan's cost without scheduling noise.
    let mut kernel_ns: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for _ in 0..sizes.rounds {
        let (wall, cpu) = measure(&program, n)?;
        off.push(wall);
        off_cpu.push(cpu);
        let agent = Agent::start(dir)?;
        let stats = BpfStats::enable()?;
        let before = program_stats(&agent, is_exec);
        let (wall, cpu) = measure(&program, n)?;
        on.push(wall);
        on_cpu.push(cpu);
        let after = program_stats(&agent, is_exec);
        drop(stats);
        agent.stop()?;
        for (name, (time, count)) in after {
            let (t0, c0) = before.get(&name).copied().unwrap_or((0, 0));
            if count > c0 {
                kernel_ns
                    .entry(name)
                    .or_default()
                    .push((time - t0) as f64 / (count - c0) as f64);
            }
        }
    }
    let kernel: serde_json::Map<String, Value> = kernel_ns
        .into_iter()
        .map(|(name, mut v)| (name, json!(median(&mut v))))
        .collect();
    let (off_spread, on_spread) = (spread(&off), spread(&on));
    let (off_m, on_m) = (median(&mut off), median(&mut on));
    let (off_cpu_m, on_cpu_m) = (median(&mut off_cpu), median(&mut on_cpu));
    Ok(json!({
        "off_ns": off_m,
        "on_ns": on_m,
        "on_ratio": on_m / off_m,
        "off_cpu_ns": off_cpu_m,
        "on_cpu_ns": on_cpu_m,
        "on_cpu_ratio": on_cpu_m / off_cpu_m,
        "kernel_ns_per_run": kernel,
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
    println!(
        "  CPU ns per exec (median; the scan runs on the exec'ing CPU, waits do not count): \
         off {:.0}, agent {:.0}, agent/off {:.3}",
        r["off_cpu_ns"].as_f64().unwrap_or(0.0),
        r["on_cpu_ns"].as_f64().unwrap_or(0.0),
        r["on_cpu_ratio"].as_f64().unwrap_or(0.0),
    );
    if let Some(kernel) = r["kernel_ns_per_run"].as_object() {
        let parts: Vec<String> = kernel
            .iter()
            .map(|(name, ns)| format!("{name} {:.0}", ns.as_f64().unwrap_or(0.0)))
            .collect();
        println!("  in-kernel ns per run (median): {}", parts.join(", "));
    }
}
