//! Syscall cost inside a tracked job: agent off, a bare tracefs tracepoint (the floor every
//! tracepoint sensor pays), agent on; interleaved rounds.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde_json::{Value, json};

use super::{Agent, Sizes, bpf_stats, median, spread, workload};

/// Enables one syscall tracepoint through tracefs with no program: the floor every tracepoint
/// sensor pays.
pub(super) struct BareTracepoint(PathBuf);

impl BareTracepoint {
    pub(super) fn enable(event: &str) -> anyhow::Result<Self> {
        let path = PathBuf::from(format!(
            "/sys/kernel/tracing/events/syscalls/{event}/enable"
        ));
        std::fs::write(&path, "1").with_context(|| format!("enabling {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for BareTracepoint {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.0, "0");
    }
}

pub(super) fn run(dir: &Path, sizes: &Sizes) -> anyhow::Result<Value> {
    let credential = dir.join("home/.aws/credentials");
    std::fs::create_dir_all(credential.parent().unwrap())?;
    std::fs::write(&credential, "[default]\n")?;
    let cases: [(&str, &str, Vec<String>); 2] = [
        (
            "getppid",
            "sys_enter_getppid",
            vec!["getppid".into(), sizes.getppid.to_string()],
        ),
        (
            "open_close_reported",
            "sys_enter_openat",
            vec![
                "open".into(),
                credential.display().to_string(),
                sizes.open.to_string(),
            ],
        ),
    ];
    let mut results = serde_json::Map::new();
    for (name, tracepoint, args) in &cases {
        let (mut off, mut floor, mut on) = (Vec::new(), Vec::new(), Vec::new());
        // Interleaved: each round measures all three, so drift hits them alike.
        for _ in 0..sizes.rounds {
            off.push(workload(dir, args)?);
            {
                let _tp = BareTracepoint::enable(tracepoint)?;
                floor.push(workload(dir, args)?);
            }
            let agent = Agent::start(dir)?;
            on.push(workload(dir, args)?);
            agent.stop()?;
        }
        // Where the agent's part goes: its programs' in-kernel time per operation.
        let ops: u64 = args.last().and_then(|n| n.parse().ok()).unwrap_or(1);
        let agent = Agent::start(dir)?;
        let bpf = bpf_stats::per_op(agent.pid(), ops, || workload(dir, args).map(drop))?;
        agent.stop()?;
        let (off_spread, on_spread) = (spread(&off), spread(&on));
        let (off_m, floor_m, on_m) = (median(&mut off), median(&mut floor), median(&mut on));
        results.insert(
            (*name).to_owned(),
            json!({
                "off_ns": off_m, "floor_ns": floor_m, "on_ns": on_m,
                "floor_ratio": floor_m / off_m, "on_ratio": on_m / off_m,
                "on_minus_floor": on_m / off_m - floor_m / off_m,
                "off_spread_ns": off_spread,
                "on_spread_ns": on_spread,
                "rounds": sizes.rounds,
                "bpf": bpf,
            }),
        );
    }
    Ok(Value::Object(results))
}

pub(super) fn print(r: &Value) {
    println!(
        "{:<22} {:>9} {:>9} {:>9} {:>8} {:>8} {:>10}",
        "syscall (median ns)", "off", "floor", "agent", "floor/x", "agent/x", "agent-flr"
    );
    for name in ["getppid", "open_close_reported"] {
        let r = &r[name];
        println!(
            "{:<22} {:>9.1} {:>9.1} {:>9.1} {:>8.3} {:>8.3} {:>10.3}",
            name,
            r["off_ns"].as_f64().unwrap_or(0.0),
            r["floor_ns"].as_f64().unwrap_or(0.0),
            r["on_ns"].as_f64().unwrap_or(0.0),
            r["floor_ratio"].as_f64().unwrap_or(0.0),
            r["on_ratio"].as_f64().unwrap_or(0.0),
            r["on_minus_floor"].as_f64().unwrap_or(0.0),
        );
    }
    for name in ["getppid", "open_close_reported"] {
        bpf_stats::print(
            &format!("{name}, the agent's programs (bpf_stats)"),
            &r[name]["bpf"],
        );
    }
}
