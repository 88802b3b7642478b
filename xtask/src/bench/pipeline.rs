//! The whole pipeline under load: processes of one job open a credential path, through the real
//! probes and ring buffer into the agent's engine, while another process of the job raises an
//! alert every few milliseconds: first at a paced 500k opens a second (the targets' load), then
//! as fast as they can. Reports events/s, lost events, the agent's CPU per event, and
//! event-to-alert latency, for each.

use std::{path::Path, process::Command, time::Duration};

use anyhow::Context as _;

use serde_json::{Value, json};

use crate::common::{agent_binary, output};

use super::{Agent, Sizes, bench_workload, job, quantile};

/// The sustained load the pipeline targets are stated for: reported opens per second in all.
const SUSTAINED_RATE: u64 = 500_000;

pub(super) fn run(dir: &Path, sizes: &Sizes) -> anyhow::Result<Value> {
    // The built-in policy without the per-job event budget: this measures what the pipeline
    // carries, not the budget (which would drop most of one job's flood by design).
    let default = output(Command::new(agent_binary()).args(["policy", "default"]))
        .context("runner-monitor policy default")?;
    let policy = dir.join("pipeline-policy.toml");
    std::fs::write(
        &policy,
        default.replace(
            "job_events_per_second = 200000",
            "job_events_per_second = 0",
        ),
    )?;
    let agent = Agent::start_with(dir, &["--policy".as_ref(), policy.as_os_str()])?;
    // First the load the targets are for (500k reported opens a second, paced), then as fast as
    // the producers can go: what the pipeline carries at most, and what it loses beyond that.
    let sustained = phase(dir, &agent, sizes, Some(SUSTAINED_RATE))?;
    let flood = phase(dir, &agent, sizes, None)?;
    agent.stop()?;
    Ok(json!({ "sustained": sustained, "flood": flood }))
}

/// One flood of `sizes.flood_secs`, at `rate` opens per second in all or unpaced.
fn phase(dir: &Path, agent: &Agent, sizes: &Sizes, rate: Option<u64>) -> anyhow::Result<Value> {
    // A credential path that does not exist: a failed open is still reported (with its errno),
    // and is the cheapest reported syscall, so the producers push the pipeline hardest. One path
    // per producer: a shared one makes the producers contend for its dentry across CPUs.
    let target = dir.join("flood-{}/.aws/credentials");
    let producers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let before = agent.metrics()?;
    let cpu_before = agent.cpu_ns()?;
    let alerts_before = process_memory_alerts(agent)?;
    let w = bench_workload();
    let script = format!(
        "{w} flood {target} {secs} {producers} {rate} > flood.out & \
         {w} alerts {secs} 2000 > alerts.out; wait",
        w = w.display(),
        target = target.display(),
        secs = sizes.flood_secs,
        rate = rate.map(|r| r.to_string()).unwrap_or_default(),
    );
    job(dir, &script)?;
    let opens: u64 = std::fs::read_to_string(dir.join("flood.out"))?
        .trim()
        .parse()?;
    let alerts_raised: u64 = std::fs::read_to_string(dir.join("alerts.out"))?
        .trim()
        .parse()?;
    // Let the agent finish what is queued: the counters stop moving.
    let mut after = agent.metrics()?;
    for _ in 0..30 {
        std::thread::sleep(Duration::from_millis(500));
        let next = agent.metrics()?;
        let settled = next.sum("runner_monitor_events_total", "")
            == after.sum("runner_monitor_events_total", "");
        after = next;
        if settled {
            break;
        }
    }
    let agent_cpu = agent.cpu_ns()? - cpu_before;
    let delta = |name: &str, labels: &str| after.sum(name, labels) - before.sum(name, labels);
    let opens_seen = delta("runner_monitor_events_total", "kind=\"file_open\"");
    let events = delta("runner_monitor_events_total", "");
    let lost = delta("runner_monitor_events_lost_total", "");
    let alert_lat = (
        before.buckets("runner_monitor_alert_latency_seconds"),
        after.buckets("runner_monitor_alert_latency_seconds"),
    );
    let engine_lat = (
        before.buckets("runner_monitor_engine_latency_seconds"),
        after.buckets("runner_monitor_engine_latency_seconds"),
    );
    let alerts_written = process_memory_alerts(agent)? - alerts_before;
    let ms = |q: Option<f64>| q.map(|s| s * 1e3);
    Ok(json!({
        "rate": rate,
        "producers": producers,
        "seconds": sizes.flood_secs,
        "opens": opens,
        "open_events_seen": opens_seen,
        "events": events,
        "events_per_second": events / sizes.flood_secs as f64,
        "lost": lost,
        "agent_cpu_ns_per_event": agent_cpu as f64 / events.max(1.0),
        "alerts_raised": alerts_raised,
        "alerts_written": alerts_written,
        "alert_latency_ms": {
            "p50": ms(quantile(&alert_lat.0, &alert_lat.1, 0.5)),
            "p99": ms(quantile(&alert_lat.0, &alert_lat.1, 0.99)),
        },
        "engine_latency_ms": {
            "p50": ms(quantile(&engine_lat.0, &engine_lat.1, 0.5)),
            "p99": ms(quantile(&engine_lat.0, &engine_lat.1, 0.99)),
        },
    }))
}

fn process_memory_alerts(agent: &Agent) -> anyhow::Result<usize> {
    Ok(std::fs::read_to_string(&agent.alerts)
        .or_else(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Ok(String::new()),
            _ => Err(e),
        })?
        .lines()
        .filter(|l| l.contains("process-memory-access"))
        .count())
}

pub(super) fn print(r: &Value) {
    for (phase, title) in [
        ("sustained", "pipeline at a paced 500k opens/s"),
        ("flood", "pipeline flooded (unpaced)"),
    ] {
        print_phase(&r[phase], title);
    }
}

fn print_phase(r: &Value, title: &str) {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    println!(
        "{title}: {:.0} events/s for {} s from {} producers; opens {} seen {} lost {}; \
         agent {:.0} ns CPU/event",
        f(&r["events_per_second"]),
        r["seconds"],
        r["producers"],
        r["opens"],
        r["open_events_seen"],
        r["lost"],
        f(&r["agent_cpu_ns_per_event"]),
    );
    println!(
        "  event-to-alert under that load: p50 {:.2} ms, p99 {:.2} ms over {} alerts \
         ({} raised); engine p50 {:.3} ms, p99 {:.3} ms",
        f(&r["alert_latency_ms"]["p50"]),
        f(&r["alert_latency_ms"]["p99"]),
        r["alerts_written"],
        r["alerts_raised"],
        f(&r["engine_latency_ms"]["p50"]),
        f(&r["engine_latency_ms"]["p99"]),
    );
}
