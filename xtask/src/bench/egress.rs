//! Egress with the agent off, with the floor (programs that do nothing on the agent's hooks:
//! `bench-workload floor-egress`, what the kernel charges for any program there), in audit mode
//! and in block mode (the connect goes through the cgroup programs' allowlist lookup),
//! interleaved rounds (each round runs the four modes, in an
//! order that rotates from round to round, so a busy host's noise hits all three): TCP connects
//! to a listener in a network namespace, and a workload of many short HTTP requests to a server
//! there. The job runs in the host's namespace; the servers' address is on the allowlist, so
//! block mode lets every connection through after its lookup. Traffic goes only to that
//! namespace.
//!
//! The connects go to a listener of their own: threads that only accept and close, with a
//! backlog of 4096. A client connecting in a loop outruns a single-threaded server that also
//! answers HTTP; its accept queue fills, SYNs are dropped and retransmitted after a second, and
//! the benchmark measured that instead of the agent. Each run reports its slowest connect and how
//! many took over 100 ms, and the namespace's `ListenDrops` counter is read around it, so a run
//! that hit a retransmission shows.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::common::{agent_binary, output, run_cmd};

use super::{Agent, Sizes, bench_workload, bpf_stats, job, median, spawn_ready, spread};

const SERVER: &str = "10.216.0.2";
const HOST_SIDE: &str = "10.216.0.1";
/// Ports inside the namespace, which is new and has nothing else listening.
const HTTP_PORT: u16 = 8080;
const ACCEPT_PORT: u16 = 8081;
/// Accepting threads: the client is one thread, the host has 2 CPUs.
const ACCEPT_THREADS: &str = "2";

/// A namespace with a veth pair to the host and the two servers in it; removed on drop.
struct Namespace {
    name: String,
    host_link: String,
    servers: Vec<Child>,
}

impl Namespace {
    fn new() -> anyhow::Result<Self> {
        let id = std::process::id() % 100_000;
        let mut ns = Namespace {
            name: format!("rmbench{id}"),
            host_link: format!("rmbh{id}"),
            servers: Vec::new(),
        };
        let _ = Command::new("ip").args(["netns", "del", &ns.name]).output();
        let _ = Command::new("ip")
            .args(["link", "del", &ns.host_link])
            .output();
        let (n, h) = (&ns.name, &ns.host_link);
        for step in [
            format!("ip netns add {n}"),
            format!("ip -n {n} link set lo up"),
            format!("ip link add {h} type veth peer name rmbs netns {n}"),
            format!("ip addr add {HOST_SIDE}/24 dev {h}"),
            format!("ip link set {h} up"),
            format!("ip -n {n} addr add {SERVER}/24 dev rmbs"),
            format!("ip -n {n} link set rmbs up"),
        ] {
            run_cmd(Command::new("sh").arg("-c").arg(&step))?;
        }
        let http = ns.spawn(&["serve-http", &format!("{SERVER}:{HTTP_PORT}")])?;
        ns.servers.push(http);
        let accept = ns.spawn(&[
            "serve-accept",
            &format!("{SERVER}:{ACCEPT_PORT}"),
            ACCEPT_THREADS,
        ])?;
        ns.servers.push(accept);
        Ok(ns)
    }

    /// `bench-workload ARGS` in the namespace, once it printed "listening".
    fn spawn(&self, args: &[&str]) -> anyhow::Result<Child> {
        spawn_ready(
            Command::new("ip")
                .args(["netns", "exec", &self.name])
                .arg(bench_workload())
                .args(args),
            "listening",
        )
    }

    /// The namespace's TcpExt ListenDrops: SYNs and handshakes its listeners dropped (a full
    /// accept queue among them).
    fn listen_drops(&self) -> anyhow::Result<u64> {
        let text = output(Command::new("ip").args([
            "netns",
            "exec",
            &self.name,
            "cat",
            "/proc/net/netstat",
        ]))
        .context("reading the namespace's /proc/net/netstat")?;
        let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
        let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
            bail!("no TcpExt in /proc/net/netstat");
        };
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(name, _)| *name == "ListenDrops")
            .and_then(|(_, v)| v.parse().ok())
            .context("ListenDrops")
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        for mut server in self.servers.drain(..) {
            let _ = server.kill();
            let _ = server.wait();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_link])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// One run of `bench-workload connect` or `http` as a job: ns per operation, the slowest in ns,
/// how many took over 100 ms.
fn timed(dir: &Path, args: &[&str]) -> anyhow::Result<[f64; 3]> {
    let script = format!("exec {} {}", bench_workload().display(), args.join(" "));
    let out = job(dir, &script)?;
    let numbers: Vec<f64> = out
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("bench-workload printed {out:?}"))?;
    numbers
        .try_into()
        .map_err(|_| anyhow::anyhow!("bench-workload printed {out:?}"))
}

/// The built-in policy with the server's address on the global allowlist, in `mode`.
fn policy(dir: &Path, mode: &str) -> anyhow::Result<std::path::PathBuf> {
    let default = output(Command::new(agent_binary()).args(["policy", "default"]))
        .context("runner-monitor policy default")?;
    let allow = "[egress]\n";
    if !default.contains(allow) {
        bail!("the built-in policy has no [egress] section");
    }
    let text = default.replacen(allow, &format!("[egress]\nmode = \"{mode}\"\n"), 1);
    let text = text.replacen(
        "allow = [\n",
        &format!("allow = [\n    {{ cidr = \"{SERVER}/32\" }},\n"),
        1,
    );
    let path = dir.join(format!("egress-{mode}.toml"));
    std::fs::write(&path, text)?;
    Ok(path)
}

const MODES: [&str; 4] = ["off", "floor", "audit", "block"];

/// Each mode's runs of one part, in round order.
#[derive(Default)]
struct Runs {
    ns: [Vec<f64>; 4],
    max_ns: [Vec<f64>; 4],
    over_100ms: [Vec<f64>; 4],
    listen_drops: [Vec<f64>; 4],
}

/// What runs beside the workload in one mode: nothing, the floor's programs, or the agent.
enum Beside {
    Nothing,
    Floor(Child),
    Agent(Agent),
}

impl Beside {
    fn start(dir: &Path, mode: usize, policies: &[std::path::PathBuf; 2]) -> anyhow::Result<Self> {
        Ok(match mode {
            0 => Self::Nothing,
            1 => {
                let floor = spawn_ready(
                    Command::new(bench_workload())
                        .arg("floor-egress")
                        .stdin(Stdio::piped()),
                    "attached",
                )?;
                Self::Floor(floor)
            }
            _ => Self::Agent(Agent::start_with(
                dir,
                &["--policy".as_ref(), policies[mode - 2].as_os_str()],
            )?),
        })
    }

    fn stop(self) -> anyhow::Result<()> {
        match self {
            Self::Nothing => Ok(()),
            Self::Floor(mut floor) => {
                // Closing its stdin detaches the programs.
                drop(floor.stdin.take());
                let status = floor.wait()?;
                anyhow::ensure!(status.success(), "bench-workload floor-egress: {status}");
                Ok(())
            }
            Self::Agent(agent) => agent.stop(),
        }
    }
}

impl Runs {
    fn push(&mut self, mode: usize, [ns, max, slow]: [f64; 3], drops: u64) {
        self.ns[mode].push(ns);
        self.max_ns[mode].push(max);
        self.over_100ms[mode].push(slow);
        self.listen_drops[mode].push(drops as f64);
    }

    fn summary(&self) -> Value {
        let off = median(&mut self.ns[0].clone());
        let mut out = serde_json::Map::new();
        for (i, mode) in MODES.iter().enumerate() {
            let m = median(&mut self.ns[i].clone());
            // Each round's ratio to the same round's off: the modes of a round run one after
            // the other, so what drifts between rounds (the host's load) falls out.
            let mut paired: Vec<f64> = self.ns[i]
                .iter()
                .zip(&self.ns[0])
                .map(|(mode, off)| mode / off)
                .collect();
            out.insert(
                (*mode).into(),
                json!({
                    "ns": m,
                    "spread": spread(&self.ns[i]),
                    "ratio": m / off,
                    "paired_ratio": median(&mut paired),
                    "paired_spread": spread(&paired),
                    "rounds": self.ns[i],
                    "max_ns": self.max_ns[i].iter().cloned().fold(0.0, f64::max),
                    "over_100ms": self.over_100ms[i].iter().sum::<f64>(),
                    "listen_drops": self.listen_drops[i].iter().sum::<f64>(),
                }),
            );
        }
        Value::Object(out)
    }
}

pub(super) fn run(dir: &Path, sizes: &Sizes) -> anyhow::Result<Value> {
    let ns = Namespace::new()?;
    let accept = format!("{SERVER}:{ACCEPT_PORT}");
    let http_target = format!("{SERVER}:{HTTP_PORT}");
    let (connects, requests) = if sizes.smoke {
        (200, 50)
    } else {
        (20_000, 2_000)
    };
    let (connects_arg, requests_arg) = (connects.to_string(), requests.to_string());
    let policies = [policy(dir, "audit")?, policy(dir, "block")?];
    // Unmeasured: the first connects resolve the neighbour and warm the servers.
    timed(dir, &["connect", &accept, "100"])?;
    timed(dir, &["http", &http_target, "20"])?;
    let mut connect = Runs::default();
    let mut http = Runs::default();
    for round in 0..sizes.rounds {
        for step in 0..MODES.len() {
            let i = (round + step) % MODES.len();
            let beside = Beside::start(dir, i, &policies)?;
            let drops = ns.listen_drops()?;
            let c = timed(dir, &["connect", &accept, &connects_arg])?;
            let after = ns.listen_drops()?;
            connect.push(i, c, after - drops);
            let h = timed(dir, &["http", &http_target, &requests_arg])?;
            http.push(i, h, ns.listen_drops()? - after);
            beside.stop()?;
        }
    }
    let kernel = kernel_time(dir, &policies, connects, requests)?;
    Ok(json!({
        "connects": connects,
        "requests": requests,
        "rounds": sizes.rounds,
        "connect": connect.summary(),
        "http": http.summary(),
        "bpf": kernel,
    }))
}

/// `egress-bpf`: only the agent's in-kernel time per connect and per request
/// (`kernel_time`), the quick measure while changing the programs.
pub(super) fn run_bpf(dir: &Path, sizes: &Sizes) -> anyhow::Result<Value> {
    let _ns = Namespace::new()?;
    let (connects, requests) = if sizes.smoke {
        (2_000, 200)
    } else {
        (20_000, 2_000)
    };
    let policies = [policy(dir, "audit")?, policy(dir, "block")?];
    timed(dir, &["connect", &format!("{SERVER}:{ACCEPT_PORT}"), "100"])?;
    Ok(json!({ "bpf": kernel_time(dir, &policies, connects, requests)? }))
}

/// The agent's programs' run time per connect and per request (`bpf_stats`), in audit and in
/// block mode: one agent per mode, the same workloads as the rounds.
fn kernel_time(
    dir: &Path,
    policies: &[std::path::PathBuf; 2],
    connects: u64,
    requests: u64,
) -> anyhow::Result<Value> {
    let accept = format!("{SERVER}:{ACCEPT_PORT}");
    let http_target = format!("{SERVER}:{HTTP_PORT}");
    let mut out = serde_json::Map::new();
    for (mode, policy) in ["audit", "block"].iter().zip(policies) {
        let agent = Agent::start_with(dir, &["--policy".as_ref(), policy.as_os_str()])?;
        let connect = bpf_stats::per_op(agent.pid(), connects, || {
            timed(dir, &["connect", &accept, &connects.to_string()]).map(drop)
        })?;
        let http = bpf_stats::per_op(agent.pid(), requests, || {
            timed(dir, &["http", &http_target, &requests.to_string()]).map(drop)
        })?;
        let exec = execs_in_job(dir, &agent, requests)?;
        agent.stop()?;
        out.insert(
            (*mode).into(),
            json!({ "connect": connect, "http": http, "exec": exec }),
        );
    }
    Ok(Value::Object(out))
}

/// `n` fork + exec + wait of a static program in a job: in block mode the kernel names a job
/// process to the agent at its exec unless its network namespace is served already
/// (`want_netns_unless_served`). The programs' time per exec, wall ns per exec, and the agent's CPU
/// per exec (all its threads).
fn execs_in_job(dir: &Path, agent: &Agent, n: u64) -> anyhow::Result<Value> {
    let program = super::exec::noop(dir)?;
    let script = format!(
        "exec {} exec {} {n}",
        bench_workload().display(),
        program.display()
    );
    let cpu = agent.cpu_ns()?;
    let mut wall = 0.0;
    let mut kernel = bpf_stats::per_op(agent.pid(), n, || {
        let out = job(dir, &script)?;
        wall = out
            .split_whitespace()
            .next()
            .and_then(|w| w.parse().ok())
            .with_context(|| format!("bench-workload exec printed {out:?}"))?;
        Ok(())
    })?;
    let agent_cpu = agent.cpu_ns()?.saturating_sub(cpu) as f64 / n as f64;
    kernel["wall_ns"] = json!(wall);
    kernel["agent_cpu_ns"] = json!(agent_cpu);
    Ok(kernel)
}

/// The `kernel_time` tables.
pub(super) fn print_bpf(v: &Value) {
    println!("\negress, the agent's programs' in-kernel time (bpf_stats):");
    for mode in ["audit", "block"] {
        bpf_stats::print(&format!("{mode}, per connect"), &v[mode]["connect"]);
        bpf_stats::print(
            &format!("{mode}, per HTTP request (a connection each)"),
            &v[mode]["http"],
        );
        let exec = &v[mode]["exec"];
        bpf_stats::print(&format!("{mode}, per exec in a job"), exec);
        println!(
            "    {mode}, per exec in a job: {:.0} ns wall, the agent's CPU {:.0} ns",
            exec["wall_ns"].as_f64().unwrap_or(0.0),
            exec["agent_cpu_ns"].as_f64().unwrap_or(0.0)
        );
    }
}

pub(super) fn print(v: &Value) {
    println!(
        "\negress (connect: {} TCP connects to a namespace listener that accepts and closes; http: \
         {} requests of 16 KiB, a connection each; median of {} interleaved rounds, spread, ratio \
         of the medians to agent off, and the median of each round's ratio to its own off):",
        v["connects"], v["requests"], v["rounds"]
    );
    for part in ["connect", "http"] {
        let line: Vec<String> = MODES
            .iter()
            .map(|mode| {
                let m = &v[part][mode];
                let us = |x: &Value| x.as_f64().unwrap_or(0.0) / 1000.0;
                let x = |v: &Value| v.as_f64().unwrap_or(0.0);
                format!(
                    "{mode} {:.1} us ({:.1}-{:.1}) {:.3}x, paired {:.3}x ({:.3}-{:.3})",
                    us(&m["ns"]),
                    us(&m["spread"][0]),
                    us(&m["spread"][1]),
                    x(&m["ratio"]),
                    x(&m["paired_ratio"]),
                    x(&m["paired_spread"][0]),
                    x(&m["paired_spread"][1])
                )
            })
            .collect();
        println!("  {part:<8} {}", line.join(", "));
        let slow: Vec<String> = MODES
            .iter()
            .map(|mode| {
                let m = &v[part][mode];
                format!(
                    "{mode} slowest {:.1} ms, {} over 100 ms, {} listen drops",
                    m["max_ns"].as_f64().unwrap_or(0.0) / 1e6,
                    m["over_100ms"],
                    m["listen_drops"]
                )
            })
            .collect();
        println!("  {:<8} {}", "", slow.join("; "));
    }
    print_bpf(&v["bpf"]);
}
