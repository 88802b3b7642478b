//! `cargo xtask bench`: what the agent costs, measured with the agent off and on in the same run.
//! Prints a table and writes JSON (`target/bench/results.json`). Benchmarks, not tests: nothing
//! here asserts a timing; `--smoke` runs each one briefly so CI keeps them working.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

struct Sizes {
    rounds: usize,
    getppid: u64,
    open: u64,
    engine_events: u64,
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

/// A syscall workload run as a `Runner.Worker` job (so the agent tracks it when it is on).
fn workload(dir: &Path, args: &[String]) -> anyhow::Result<f64> {
    let worker = dir.join("Runner.Worker");
    let step = crate::workspace_root().join("target/release/bench-workload");
    let script = format!("exec {} {}", step.display(), args.join(" "));
    let out = Command::new(&worker)
        .arg("-c")
        .arg(script)
        .output()
        .context("running the workload")?;
    if !out.status.success() {
        bail!("workload failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("workload output")
}

struct Agent {
    child: Child,
}

impl Agent {
    fn start(dir: &Path) -> anyhow::Result<Self> {
        let log = dir.join("agent.log");
        let child = Command::new(crate::agent_binary())
            .args([
                "run",
                "--alerts-out",
                "/dev/null",
                "--listen",
                "127.0.0.1:0",
            ])
            .arg("--control-socket")
            .arg(dir.join("control.sock"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting the agent")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("control socket ready")
        {
            if Instant::now() > deadline {
                bail!(
                    "the agent did not start: {}",
                    std::fs::read_to_string(&log)?
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Self { child })
    }

    fn stop(mut self) -> anyhow::Result<()> {
        // SAFETY: kill(2) on our child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait()?;
        Ok(())
    }
}

/// Enables one syscall tracepoint through tracefs with no program: the floor every tracepoint
/// sensor pays.
struct BareTracepoint(PathBuf);

impl BareTracepoint {
    fn enable(event: &str) -> anyhow::Result<Self> {
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

fn syscalls(dir: &Path, sizes: &Sizes) -> anyhow::Result<Value> {
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
        let spread = |v: &[f64]| {
            let min = v.iter().cloned().fold(f64::MAX, f64::min);
            let max = v.iter().cloned().fold(0.0, f64::max);
            (min, max)
        };
        let (off_spread, on_spread) = (spread(&off), spread(&on));
        let (off_m, floor_m, on_m) = (median(&mut off), median(&mut floor), median(&mut on));
        results.insert(
            (*name).to_owned(),
            json!({
                "off_ns": off_m, "floor_ns": floor_m, "on_ns": on_m,
                "floor_ratio": floor_m / off_m, "on_ratio": on_m / off_m,
                "on_minus_floor": on_m / off_m - floor_m / off_m,
                "off_spread_ns": [off_spread.0, off_spread.1],
                "on_spread_ns": [on_spread.0, on_spread.1],
                "rounds": sizes.rounds,
            }),
        );
    }
    Ok(Value::Object(results))
}

fn engine(sizes: &Sizes) -> anyhow::Result<Value> {
    let bin = crate::workspace_root().join("target/release/examples/engine_bench");
    let run = |args: &[&str]| -> anyhow::Result<Value> {
        let out = Command::new(&bin)
            .args(args)
            .output()
            .context("engine_bench")?;
        if !out.status.success() {
            bail!(
                "engine_bench failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    Ok(json!({
        "throughput": run(&["throughput", &sizes.engine_events.to_string()])?,
        "memory": run(&["memory"])?,
    }))
}

pub fn bench(smoke: bool) -> anyhow::Result<()> {
    let sizes = if smoke {
        Sizes {
            rounds: 1,
            getppid: 20_000,
            open: 2_000,
            engine_events: 20_000,
        }
    } else {
        Sizes {
            rounds: 5,
            getppid: 2_000_000,
            open: 200_000,
            engine_events: 1_000_000,
        }
    };
    crate::run_cmd(Command::new("cargo").args(["build", "--release", "-p", "runner-monitor"]))?;
    crate::run_cmd(Command::new("cargo").args([
        "build",
        "--release",
        "-p",
        "runner-monitor",
        "--example",
        "engine_bench",
    ]))?;
    crate::run_cmd(Command::new("cargo").args([
        "build",
        "--release",
        "-p",
        "integration-tests",
        "--bin",
        "bench-workload",
    ]))?;
    let dir = std::env::temp_dir().join(format!("rm-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    std::fs::copy("/bin/sh", dir.join("Runner.Worker"))?;

    let syscalls = syscalls(&dir, &sizes)?;
    let engine = engine(&sizes)?;
    let machine = crate::output(Command::new("uname").arg("-srm")).unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let results = json!({
        "smoke": smoke,
        "machine": machine.trim(),
        "cpus": cpus,
        "syscalls": syscalls,
        "engine": engine,
    });

    println!(
        "\nrunner-monitor benchmarks ({}; {} CPUs){}",
        machine.trim(),
        cpus,
        if smoke { " [smoke]" } else { "" }
    );
    println!(
        "{:<22} {:>9} {:>9} {:>9} {:>8} {:>8} {:>10}",
        "syscall (median ns)", "off", "floor", "agent", "floor/x", "agent/x", "agent-flr"
    );
    for name in ["getppid", "open_close_reported"] {
        let r = &results["syscalls"][name];
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
    let t = &results["engine"]["throughput"];
    println!(
        "engine: {:.0} events/s ({:.0} ns/event) over {} synthetic events",
        t["events_per_second"].as_f64().unwrap_or(0.0),
        t["ns_per_event"].as_f64().unwrap_or(0.0),
        t["events"]
    );
    let m = &results["engine"]["memory"];
    println!(
        "engine memory: {:.0} bytes per tracked process (RSS {} )",
        m["bytes_per_process"].as_f64().unwrap_or(0.0),
        m["rss_bytes"]
    );
    let out = crate::workspace_root().join("target/bench");
    std::fs::create_dir_all(&out)?;
    let file = out.join(if smoke {
        "results-smoke.json"
    } else {
        "results.json"
    });
    std::fs::write(&file, serde_json::to_string_pretty(&results)?)?;
    println!("written to {}", file.display());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
