//! Syscalls of a process outside any job, agent off, a bare tracefs tracepoint (the floor) and
//! agent on, interleaved rounds whose mode order rotates: `getppid` (no program of the agent
//! runs on it: the cost every syscall pays once the agent's syscall tracepoints are enabled),
//! `write` of 1 byte to /dev/null (too short to be a Docker API request: the probes' first test),
//! of 64 bytes (long enough: the probes look the fd up), `sendto`, `sendmsg` and `sendmmsg` of 1
//! byte on a unix datagram socket (received by its peer), `writev` of one 64-byte buffer,
//! io_uring `WRITE` requests of 64 bytes (16 per submission), and `sendfile` of 1 byte of a file
//! to /dev/null. The container probes (`sys_enter_write`, `sys_enter_sendto`, `enter_writev`,
//! `enter_sendmsg`, `enter_sendmmsg`, `enter_sendfile`, and on io_uring's request tracepoint `io_uring_send_req` beside `io_uring_submit_req`) run on
//! every such call on the host, looking for a job's Docker API requests; this is what they cost
//! everyone else. Then, with `kernel.bpf_stats_enabled`, the probes' own run time per call. The
//! floor enables syscall tracepoints only: for io_uring it shows what they cost the submission
//! syscall.

use std::{collections::BTreeMap, process::Command};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use super::{
    Agent, Sizes, bench_workload,
    exec::{BpfStats, program_stats},
    median, spread,
    syscalls::BareTracepoint,
};

const MODES: [&str; 3] = ["off", "floor", "on"];
const CASES: [&str; 9] = [
    "getppid", "write", "write64", "sendto", "writev", "sendmsg", "sendmmsg", "uring", "sendfile",
];
/// The cases a container probe runs on (all but `getppid`).
const SENDS: [&str; 8] = [
    "write", "write64", "sendto", "writev", "sendmsg", "sendmmsg", "uring", "sendfile",
];
/// The tracepoints the floor enables.
const FLOOR: [&str; 7] = [
    "sys_enter_getppid",
    "sys_enter_write",
    "sys_enter_sendto",
    "sys_enter_writev",
    "sys_enter_sendmsg",
    "sys_enter_sendmmsg",
    "sys_enter_sendfile64",
];

/// `bench-workload ARGS` run directly, not as a job: ns per operation.
fn outside(args: &[String]) -> anyhow::Result<f64> {
    let out = Command::new(bench_workload())
        .args(args)
        .output()
        .context("bench-workload")?;
    if !out.status.success() {
        bail!(
            "bench-workload {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .with_context(|| format!("bench-workload printed {text:?}"))
}

/// The container probes, as bpftool names them (the kernel's name is cut at 15 characters),
/// and io_uring's two request programs (`io_uring_submit`, `io_uring_send_r`).
fn is_send_probe(name: &str) -> bool {
    matches!(
        name,
        "sys_enter_write" | "enter_writev" | "enter_sendmsg" | "enter_sendmmsg" | "enter_sendfile"
    ) || name.starts_with("sys_enter_sendt")
        || name.starts_with("io_uring_s")
}

pub(super) fn run(dir: &std::path::Path, sizes: &Sizes) -> anyhow::Result<Value> {
    let n = sizes.getppid;
    let args = |case: &str| -> Vec<String> {
        // A send and its receive cost about ten 1-byte writes: a quarter as many.
        match case {
            "sendto" | "sendmsg" | "sendmmsg" => {
                vec![case.to_owned(), (n / 4).max(1).to_string()]
            }
            "write64" => vec!["write".to_owned(), n.to_string(), "64".to_owned()],
            _ => vec![case.to_owned(), n.to_string()],
        }
    };
    // ns[case][mode], one per round.
    let mut ns: [[Vec<f64>; 3]; CASES.len()] = Default::default();
    for round in 0..sizes.rounds {
        for step in 0..MODES.len() {
            let mode = (round + step) % MODES.len();
            let agent = (mode == 2).then(|| Agent::start(dir)).transpose()?;
            let floor = if mode == 1 {
                FLOOR
                    .iter()
                    .map(|tp| BareTracepoint::enable(tp))
                    .collect::<anyhow::Result<Vec<_>>>()?
            } else {
                Vec::new()
            };
            let measured: anyhow::Result<Vec<f64>> =
                CASES.iter().map(|case| outside(&args(case))).collect();
            drop(floor);
            // Stopped before any error is returned.
            if let Some(agent) = agent {
                agent.stop()?;
            }
            for (c, v) in measured?.into_iter().enumerate() {
                ns[c][mode].push(v);
            }
        }
    }
    // The probes' in-kernel time per call, on the same workloads (other processes' writes on
    // the host meanwhile count too; nearly all of them outside jobs as well).
    let agent = Agent::start(dir)?;
    let mut probes = serde_json::Map::new();
    for case in SENDS {
        let stats = BpfStats::enable()?;
        let before = program_stats(&agent, is_send_probe);
        if let Err(e) = outside(&args(case)) {
            drop(stats);
            agent.stop()?;
            return Err(e);
        }
        let after = program_stats(&agent, is_send_probe);
        drop(stats);
        let per_run: BTreeMap<String, Value> = after
            .into_iter()
            .filter_map(|(name, (time, count))| {
                let (t0, c0) = before.get(&name).copied().unwrap_or((0, 0));
                (count > c0).then(|| {
                    let runs = count - c0;
                    (
                        name,
                        json!({"ns_per_run": (time - t0) as f64 / runs as f64, "runs": runs}),
                    )
                })
            })
            .collect();
        probes.insert(case.into(), json!(per_run));
    }
    agent.stop()?;
    let mut results = serde_json::Map::new();
    for (c, case) in CASES.iter().enumerate() {
        let off = median(&mut ns[c][0].clone());
        let mut per_mode = serde_json::Map::new();
        for (m, mode) in MODES.iter().enumerate() {
            let v = median(&mut ns[c][m].clone());
            per_mode.insert(
                (*mode).into(),
                json!({"ns": v, "ratio": v / off, "spread_ns": spread(&ns[c][m]),
                       "rounds": ns[c][m]}),
            );
        }
        results.insert((*case).into(), Value::Object(per_mode));
    }
    results.insert("operations".into(), json!(n));
    results.insert("probe_ns_per_call".into(), Value::Object(probes));
    Ok(Value::Object(results))
}

pub(super) fn print(r: &Value) {
    println!(
        "syscalls outside any job ({} operations, sends (+recv) a quarter as many; median ns of the \
         rounds, their spread, ratio to off):",
        r["operations"]
    );
    for case in CASES {
        let parts: Vec<String> = MODES
            .iter()
            .map(|mode| {
                let m = &r[case][mode];
                let f = |v: &Value| v.as_f64().unwrap_or(0.0);
                format!(
                    "{mode} {:.1} ({:.1}-{:.1}) {:.3}x",
                    f(&m["ns"]),
                    f(&m["spread_ns"][0]),
                    f(&m["spread_ns"][1]),
                    f(&m["ratio"])
                )
            })
            .collect();
        println!("  {case:<8} {}", parts.join(", "));
    }
    for case in SENDS {
        if let Some(probes) = r["probe_ns_per_call"][case].as_object() {
            let parts: Vec<String> = probes
                .iter()
                .map(|(name, p)| {
                    format!(
                        "{name} {:.1} ns x {}",
                        p["ns_per_run"].as_f64().unwrap_or(0.0),
                        p["runs"]
                    )
                })
                .collect();
            println!(
                "  in-kernel per call during {case} (bpf_stats): {}",
                parts.join(", ")
            );
        }
    }
}
