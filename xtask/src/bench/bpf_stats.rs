//! Where the agent's cost is spent in the kernel: each of its programs' run time and run count
//! (`kernel.bpf_stats_enabled=1` for the measurement, then its old value again) around a
//! workload, per operation of the workload. Far steadier than a wall-clock ratio on a busy host:
//! a program's run time is its own, whatever else the CPU does between runs (bpf_stats adds two
//! clock reads per run: the times are upper bounds).
//!
//! The programs are the agent's, found by the `prog_id` of its file descriptors
//! (`/proc/PID/fdinfo`), named by `bpftool prog show`. Programs attached at the cgroup root
//! (`cgroup_skb`, `sock_release`) also run for everything else on the host while the workload
//! runs: on an idle host that is noise, on a busy one an overcount.

use std::{collections::BTreeMap, process::Command};

use anyhow::Context as _;
use serde_json::{Value, json};

use crate::common::output;

const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Run time and count of each of a process's programs, by program id.
struct Snapshot(BTreeMap<u32, (u64, u64)>);

impl Snapshot {
    fn of(pid: u32) -> anyhow::Result<Self> {
        let mut programs = BTreeMap::new();
        for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
            let Ok(text) = std::fs::read_to_string(entry?.path()) else {
                continue;
            };
            let field = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            };
            if let (Some(id), Some(time), Some(count)) =
                (field("prog_id:"), field("run_time_ns:"), field("run_cnt:"))
            {
                programs.insert(id as u32, (time, count));
            }
        }
        Ok(Self(programs))
    }
}

/// Program id -> name, from `bpftool prog show`.
fn names() -> anyhow::Result<BTreeMap<u32, String>> {
    let text = output(Command::new("bpftool").args(["-j", "prog", "show"]))
        .context("bpftool -j prog show")?;
    let list: Value = serde_json::from_str(&text).context("bpftool's JSON")?;
    Ok(list
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some((
                p["id"].as_u64()? as u32,
                p["name"].as_str().unwrap_or("?").to_owned(),
            ))
        })
        .collect())
}

/// `kernel.bpf_stats_enabled=1` while alive, its old value again on drop.
struct StatsOn(String);

impl StatsOn {
    fn new() -> anyhow::Result<Self> {
        let old = std::fs::read_to_string(SYSCTL).context("reading bpf_stats_enabled")?;
        std::fs::write(SYSCTL, "1").context("enabling bpf_stats")?;
        Ok(Self(old.trim().to_owned()))
    }
}

impl Drop for StatsOn {
    fn drop(&mut self) {
        let _ = std::fs::write(SYSCTL, &self.0);
    }
}

/// Runs `workload` (which performs `ops` operations) with bpf_stats on and returns, for each of
/// process `pid`'s programs that ran, its runs and run time, per run and per operation, and the
/// total per operation.
pub(super) fn per_op(
    pid: u32,
    ops: u64,
    workload: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<Value> {
    let stats = StatsOn::new()?;
    let before = Snapshot::of(pid)?;
    workload()?;
    let after = Snapshot::of(pid)?;
    drop(stats);
    let names = names()?;
    let mut programs = Vec::new();
    let mut total = 0.0;
    for (id, (time, count)) in &after.0 {
        let (t0, c0) = before.0.get(id).copied().unwrap_or((0, 0));
        let (time, runs) = (time.saturating_sub(t0), count.saturating_sub(c0));
        if runs == 0 {
            continue;
        }
        let per_op = time as f64 / ops as f64;
        total += per_op;
        programs.push(json!({
            "name": names.get(id).cloned().unwrap_or_else(|| format!("id {id}")),
            "runs_per_op": runs as f64 / ops as f64,
            "ns_per_run": time as f64 / runs as f64,
            "ns_per_op": per_op,
        }));
    }
    let ns = |p: &Value| p["ns_per_op"].as_f64().unwrap_or(0.0);
    programs.sort_by(|a, b| ns(b).total_cmp(&ns(a)));
    Ok(json!({ "ops": ops, "ns_per_op": total, "programs": programs }))
}

/// The table of one `per_op` result.
pub(super) fn print(title: &str, v: &Value) {
    println!(
        "  {title}: {:.0} ns of BPF per operation ({} operations)",
        v["ns_per_op"].as_f64().unwrap_or(0.0),
        v["ops"]
    );
    for p in v["programs"].as_array().into_iter().flatten() {
        println!(
            "    {:<24} {:>6.2} runs/op {:>7.0} ns/run {:>7.0} ns/op",
            p["name"].as_str().unwrap_or("?"),
            p["runs_per_op"].as_f64().unwrap_or(0.0),
            p["ns_per_run"].as_f64().unwrap_or(0.0),
            p["ns_per_op"].as_f64().unwrap_or(0.0),
        );
    }
}
