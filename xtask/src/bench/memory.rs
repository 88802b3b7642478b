//! The agent's memory with 0, 1k and 10k tracked processes: one job holds that many children
//! while the agent follows them; the agent's RSS is read at each step. The ring buffer's kernel
//! pages, mapped into the agent (twice: 32 MiB for 16 MiB of data), are a fixed cost that does not
//! grow with processes; they are reported apart from the agent's own memory.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use super::{Agent, Sizes, bench_workload};

pub(super) fn run(dir: &Path, sizes: &Sizes) -> anyhow::Result<Value> {
    let agent = Agent::start(dir)?;
    let mut points = Vec::new();
    for &n in sizes.held {
        let holder = (n > 0)
            .then(|| -> anyhow::Result<_> {
                let mut child = Command::new(dir.join("Runner.Worker"))
                    .arg("-c")
                    .arg(format!("exec {} hold {n}", bench_workload().display()))
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()?;
                let mut line = String::new();
                BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
                if line.trim() != "ready" {
                    bail!("the holder did not start: {line:?}");
                }
                Ok(child)
            })
            .transpose()?;
        // Wait until the agent follows all of them (and its gauges say so).
        let deadline = Instant::now() + Duration::from_secs(120);
        let tracked = loop {
            std::thread::sleep(Duration::from_millis(1500));
            let tracked = agent.metrics()?.sum("runner_monitor_tracked_processes", "");
            if tracked >= n as f64 || Instant::now() > deadline {
                break tracked;
            }
        };
        let (rss, ring) = (agent.rss_bytes()?, agent.bpf_map_rss_bytes()?);
        points.push(json!({
            "held": n, "tracked": tracked, "rss_bytes": rss,
            "ring_buffer_mapped_bytes": ring,
            "own_bytes": rss.saturating_sub(ring),
        }));
        if let Some(mut child) = holder {
            drop(child.stdin.take());
            child.wait()?;
        }
    }
    agent.stop()?;
    let rss = |i: usize| points[i]["own_bytes"].as_f64().unwrap_or(0.0);
    let held = |i: usize| points[i]["held"].as_f64().unwrap_or(0.0);
    let last = points.len() - 1;
    let slope = (rss(last) - rss(0)) / held(last).max(1.0);
    Ok(json!({
        "points": points,
        "bytes_per_process": slope,
        "own_bytes_at_most": rss(last),
    }))
}

pub(super) fn print(r: &Value) {
    let points: Vec<String> = r["points"]
        .as_array()
        .map(|p| {
            p.iter()
                .map(|p| {
                    format!(
                        "{} held ({} tracked): {:.1} MiB own + {:.0} MiB ring buffer mapped",
                        p["held"],
                        p["tracked"],
                        p["own_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
                        p["ring_buffer_mapped_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    println!(
        "agent memory: {}; {:.0} bytes per tracked process",
        points.join(", "),
        r["bytes_per_process"].as_f64().unwrap_or(0.0)
    );
}
