//! `cargo xtask bench`: what the agent costs, measured with the agent off and on in the same run.
//! Prints a table and writes JSON (`target/bench/results.json`). Benchmarks, not tests: nothing
//! here asserts a timing; `--smoke` runs each one briefly so CI keeps them working.

mod bpf_stats;
mod containers;
mod dns;
mod egress;
mod exec;
mod fleet;
mod guest;
mod memory;
mod nats;
mod outside;
mod pipeline;
mod syscalls;
mod workloads;

use std::{
    io::BufRead as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::common::{agent_binary, output, run_cmd, workspace_root};

/// How much of each benchmark to run.
pub(crate) struct Sizes {
    smoke: bool,
    rounds: usize,
    getppid: u64,
    open: u64,
    engine_events: u64,
    /// Seconds of the pipeline flood.
    flood_secs: u64,
    /// Tracked-process counts for the memory benchmark.
    held: &'static [u64],
    tar_files: usize,
    /// Fingerprints in the fleet correlator's ledger.
    fleet_fingerprints: u64,
}

pub(crate) fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

pub(crate) fn spread(values: &[f64]) -> [f64; 2] {
    let min = values.iter().cloned().fold(f64::MAX, f64::min);
    let max = values.iter().cloned().fold(0.0, f64::max);
    [min, max]
}

pub(crate) fn bench_workload() -> PathBuf {
    workspace_root().join("target/release/bench-workload")
}

/// Starts `command` with its standard output piped and waits for its first line to be `ready`
/// (a server listening, programs attached).
pub(crate) fn spawn_ready(command: &mut Command, ready: &str) -> anyhow::Result<Child> {
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {command:?}"))?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    if line.trim() != ready {
        let _ = child.kill();
        let _ = child.wait();
        bail!("{command:?} did not print {ready:?}");
    }
    Ok(child)
}

/// A shell command run as a `Runner.Worker` job (so the agent tracks it when it is on); returns
/// its standard output.
pub(crate) fn job(dir: &Path, script: &str) -> anyhow::Result<String> {
    let out = Command::new(dir.join("Runner.Worker"))
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .stderr(Stdio::piped())
        .output()
        .context("running the workload")?;
    if !out.status.success() {
        bail!(
            "workload `{script}` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `bench-workload ARGS` as a job; its output parsed as a number.
pub(crate) fn workload(dir: &Path, args: &[String]) -> anyhow::Result<f64> {
    let script = format!("exec {} {}", bench_workload().display(), args.join(" "));
    job(dir, &script)?.trim().parse().context("workload output")
}

/// CPU time (user + system) of process `pid` so far, from /proc/PID/schedstat.
pub(crate) fn cpu_ns(pid: u32) -> anyhow::Result<u64> {
    // `/proc/PID/schedstat` is the main thread's alone: every thread's, summed.
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let Ok(text) = std::fs::read_to_string(task?.path().join("schedstat")) else {
            continue; // the thread exited
        };
        total += text
            .split_whitespace()
            .next()
            .and_then(|s| s.parse::<u64>().ok())
            .context("parsing schedstat")?;
    }
    Ok(total)
}

/// CPU time of this process's waited-for children so far, in nanoseconds.
pub(crate) fn children_cpu_ns() -> u64 {
    // SAFETY: getrusage fills the struct.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let ns = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1_000;
    ns(usage.ru_utime) + ns(usage.ru_stime)
}

/// The agent, started with its built-in policy and stopped with SIGTERM.
pub(crate) struct Agent {
    child: Child,
    listen: String,
    pub alerts: PathBuf,
}

impl Agent {
    pub(crate) fn start(dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(dir, &[])
    }

    /// `start`, with more arguments for the agent.
    pub(crate) fn start_with(dir: &Path, extra: &[&std::ffi::OsStr]) -> anyhow::Result<Self> {
        let log = dir.join("agent.log");
        let alerts = dir.join("alerts.jsonl");
        let _ = std::fs::remove_file(&alerts);
        // A free port, released just before the agent binds it.
        let listen = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .to_string();
        let child = Command::new(agent_binary())
            .args(["run", "--listen", &listen])
            .arg("--alerts-out")
            .arg(&alerts)
            .arg("--control-socket")
            .arg(dir.join("control.sock"))
            .arg("--spool-dir")
            .arg(dir.join("spool"))
            // Each start is a fresh agent: no state carried over from the previous round.
            .arg("--fresh-state")
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--pin-dir")
            .arg(bench_pin_dir())
            .args(extra)
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
        Ok(Self {
            child,
            listen,
            alerts,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn cpu_ns(&self) -> anyhow::Result<u64> {
        cpu_ns(self.pid())
    }

    /// Resident set size, in bytes.
    pub(crate) fn rss_bytes(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .context("VmRSS")
    }

    /// Resident bytes of the agent's mappings of BPF maps: the event ring buffer, whose kernel
    /// pages user space maps (its data twice, so records can be read across the wrap).
    pub(crate) fn bpf_map_rss_bytes(&self) -> anyhow::Result<u64> {
        let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", self.pid()))?;
        let mut in_map = false;
        let mut kb = 0;
        for line in smaps.lines() {
            if line.split_whitespace().nth(1).is_some_and(|p| p.len() == 4)
                && line
                    .split('-')
                    .next()
                    .is_some_and(|a| a.chars().all(|c| c.is_ascii_hexdigit()))
            {
                in_map = line.ends_with("anon_inode:bpf-map");
            } else if in_map && let Some(v) = line.strip_prefix("Rss:") {
                kb += v
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0);
            }
        }
        Ok(kb * 1024)
    }

    /// The agent's Prometheus metrics.
    pub(crate) fn metrics(&self) -> anyhow::Result<Metrics> {
        let text = output(Command::new("curl").args([
            "-sf",
            "--max-time",
            "5",
            &format!("http://{}/metrics", self.listen),
        ]))
        .context("scraping the agent's metrics")?;
        Ok(Metrics(text))
    }

    pub(crate) fn stop(mut self) -> anyhow::Result<()> {
        // SAFETY: kill(2) on our child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait()?;
        let _ = std::fs::remove_dir_all(bench_pin_dir());
        Ok(())
    }
}

fn bench_pin_dir() -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/rm-bench-{}", std::process::id()))
}

/// One scrape of the Prometheus text format.
pub(crate) struct Metrics(String);

impl Metrics {
    /// Sum of every series of `name` whose labels contain `labels` (e.g. `kind="file_open"`).
    pub(crate) fn sum(&self, name: &str, labels: &str) -> f64 {
        self.0
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let rest = series.strip_prefix(name)?;
                (rest.is_empty() || rest.starts_with('{') && rest.contains(labels))
                    .then(|| value.parse::<f64>().ok())?
            })
            .sum()
    }

    /// Cumulative buckets `(le, count)` of histogram `name`.
    pub(crate) fn buckets(&self, name: &str) -> Vec<(f64, f64)> {
        let prefix = format!("{name}_bucket{{le=\"");
        self.0
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(&prefix)?;
                let (le, rest) = rest.split_once('"')?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, rest.rsplit_once(' ')?.1.parse().ok()?))
            })
            .collect()
    }
}

/// Quantile `q` of the observations between two scrapes of a histogram, interpolated inside
/// its bucket the way Prometheus's `histogram_quantile` does.
pub(crate) fn quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let counts: Vec<(f64, f64)> = after
        .iter()
        .map(|&(le, n)| {
            let old = before.iter().find(|b| b.0 == le).map_or(0.0, |b| b.1);
            (le, n - old)
        })
        .collect();
    let total = counts.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, n) in &counts {
        if n >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let in_bucket = n - lower.1;
            let frac = if in_bucket > 0.0 {
                (rank - lower.1) / in_bucket
            } else {
                1.0
            };
            return Some(lower.0 + (le - lower.0) * frac);
        }
        lower = (le, n);
    }
    None
}

fn engine(sizes: &Sizes) -> anyhow::Result<Value> {
    let bin = workspace_root().join("target/release/examples/engine_bench");
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

/// The benchmarks, in the order they run and print.
const NAMES: [&str; 13] = [
    "exec",
    "egress",
    "egress-bpf",
    "syscalls",
    "workloads",
    "pipeline",
    "memory",
    "engine",
    "nats",
    "fleet",
    "dns",
    "containers",
    "guest",
];

pub fn bench(smoke: bool, only: &[String], rounds: Option<usize>) -> anyhow::Result<()> {
    if let Some(unknown) = only.iter().find(|n| !NAMES.contains(&n.as_str())) {
        anyhow::bail!(
            "no benchmark named {unknown:?}; there are {}",
            NAMES.join(", ")
        );
    }
    let want = |name: &str| only.is_empty() || only.iter().any(|n| n == name);
    let mut sizes = if smoke {
        Sizes {
            smoke,
            rounds: 1,
            getppid: 20_000,
            open: 2_000,
            engine_events: 20_000,
            flood_secs: 1,
            held: &[0, 100],
            tar_files: 500,
            fleet_fingerprints: 20_000,
        }
    } else {
        Sizes {
            smoke,
            rounds: 5,
            getppid: 2_000_000,
            open: 200_000,
            engine_events: 1_000_000,
            flood_secs: 5,
            held: &[0, 1_000, 10_000],
            tar_files: 20_000,
            fleet_fingerprints: 1_000_000,
        }
    };
    if let Some(rounds) = rounds {
        sizes.rounds = rounds;
    }
    run_cmd(Command::new("cargo").args(["build", "--release", "-p", "runner-monitor"]))?;
    run_cmd(Command::new("cargo").args([
        "build",
        "--release",
        "-p",
        "runner-monitor",
        "--example",
        "engine_bench",
        "--example",
        "nats_bench",
        "--example",
        "fleet_bench",
    ]))?;
    run_cmd(Command::new("cargo").args([
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

    let skipped = || Ok(Value::Null);
    let exec = if want("exec") {
        exec::run(&dir, &sizes)
    } else {
        skipped()
    }?;
    let egress = if want("egress") {
        egress::run(&dir, &sizes)
    } else {
        skipped()
    }?;
    // Part of `egress` already: run alone only when asked by name.
    let egress_bpf = if only.iter().any(|n| n == "egress-bpf") {
        egress::run_bpf(&dir, &sizes)
    } else {
        skipped()
    }?;
    let syscalls = if want("syscalls") {
        syscalls::run(&dir, &sizes)
    } else {
        skipped()
    }?;
    let workloads = if want("workloads") {
        workloads::run(&dir, &sizes)
    } else {
        skipped()
    }?;
    let pipeline = if want("pipeline") {
        pipeline::run(&dir, &sizes)
    } else {
        skipped()
    }?;
    let memory = if want("memory") {
        memory::run(&dir, &sizes)
    } else {
        skipped()
    }?;
    let engine = if want("engine") {
        engine(&sizes)
    } else {
        skipped()
    }?;
    let nats = if want("nats") {
        nats::run(&dir, smoke)
    } else {
        skipped()
    }?;
    let fleet = if want("fleet") {
        fleet::run(&sizes)
    } else {
        skipped()
    }?;
    let dns = if want("dns") {
        dns::run(&dir, &sizes)
    } else {
        skipped()
    }?;
    let containers = if want("containers") {
        containers::run(&dir, &sizes)
    } else {
        skipped()
    }?;
    // QEMU guests take minutes: in a full run and by name, not in the smoke run.
    let guest = if only.iter().any(|n| n == "guest") || (only.is_empty() && !smoke) {
        guest::run(&sizes)
    } else {
        skipped()
    }?;
    let machine = output(Command::new("uname").arg("-srm")).unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let results = json!({
        "smoke": smoke,
        "machine": machine.trim(),
        "cpus": cpus,
        "syscalls": syscalls,
        "exec": exec,
        "egress": egress,
        "egress_bpf": egress_bpf,
        "workloads": workloads,
        "pipeline": pipeline,
        "memory": memory,
        "engine": engine,
        "nats": nats,
        "fleet": fleet,
        "dns": dns,
        "containers": containers,
        "guest": guest,
    });

    println!(
        "\nrunner-monitor benchmarks ({}; {} CPUs){}",
        machine.trim(),
        cpus,
        if smoke { " [smoke]" } else { "" }
    );
    let ran = |name: &str| !results[name].is_null();
    if ran("syscalls") {
        syscalls::print(&results["syscalls"]);
    }
    if ran("exec") {
        exec::print(&results["exec"]);
    }
    if ran("egress") {
        egress::print(&results["egress"]);
    }
    if ran("egress_bpf") {
        egress::print_bpf(&results["egress_bpf"]["bpf"]);
    }
    if ran("workloads") {
        workloads::print(&results["workloads"]);
    }
    if ran("pipeline") {
        pipeline::print(&results["pipeline"]);
    }
    if ran("memory") {
        memory::print(&results["memory"]);
    }
    if ran("engine") {
        print_engine(&results["engine"]);
    }
    if ran("nats") {
        nats::print(&results["nats"]);
    }
    if ran("fleet") {
        fleet::print(&results["fleet"]);
    }
    if ran("dns") {
        dns::print(&results["dns"]);
    }
    if ran("containers") {
        containers::print(&results["containers"]);
    }
    if ran("guest") {
        guest::print(&results["guest"]);
    }
    let out = workspace_root().join("target/bench");
    std::fs::create_dir_all(&out)?;
    let file = out.join(match (smoke, only.is_empty()) {
        (true, _) => "results-smoke.json",
        (false, true) => "results.json",
        (false, false) => "results-partial.json",
    });
    std::fs::write(&file, serde_json::to_string_pretty(&results)?)?;
    println!("written to {}", file.display());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn print_engine(engine: &Value) {
    let t = &engine["throughput"];
    println!(
        "engine alone: {:.0} events/s ({:.0} ns/event) over {} synthetic events",
        t["events_per_second"].as_f64().unwrap_or(0.0),
        t["ns_per_event"].as_f64().unwrap_or(0.0),
        t["events"]
    );
    let m = &engine["memory"];
    println!(
        "engine memory: {:.0} bytes per tracked process (RSS {} )",
        m["bytes_per_process"].as_f64().unwrap_or(0.0),
        m["rss_bytes"]
    );
}
