//! Egress with the agent off, in audit mode and in block mode (the connect goes through the
//! cgroup programs' allowlist lookup), interleaved rounds: TCP connects to a listener in a
//! network namespace, and a workload of many short HTTP requests to a server there. The job
//! runs in the host's namespace; the server's address is on the allowlist, so block mode lets
//! every connection through after its lookup. Traffic goes only to that namespace.

use std::{
    io::BufRead as _,
    path::Path,
    process::{Child, Command, Stdio},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::common::{agent_binary, output, run_cmd};

use super::{Agent, Sizes, bench_workload, median, spread, workload};

const SERVER: &str = "10.216.0.2";
const HOST_SIDE: &str = "10.216.0.1";

/// A namespace with a veth pair to the host and an HTTP server in it; removed on drop.
struct Namespace {
    name: String,
    host_link: String,
    server: Option<Child>,
}

impl Namespace {
    fn new(port: u16) -> anyhow::Result<Self> {
        let id = std::process::id() % 100_000;
        let mut ns = Namespace {
            name: format!("rmbench{id}"),
            host_link: format!("rmbh{id}"),
            server: None,
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
        let mut server = Command::new("ip")
            .args(["netns", "exec", n])
            .arg(bench_workload())
            .args(["serve-http", &format!("{SERVER}:{port}")])
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the HTTP server")?;
        let mut ready = String::new();
        std::io::BufReader::new(server.stdout.take().context("server stdout")?)
            .read_line(&mut ready)?;
        if ready.trim() != "listening" {
            let _ = server.kill();
            bail!("the HTTP server in {n} did not start");
        }
        ns.server = Some(server);
        Ok(ns)
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        if let Some(mut server) = self.server.take() {
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

pub(super) fn run(dir: &Path, sizes: &Sizes) -> anyhow::Result<Value> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let _ns = Namespace::new(port)?;
    let target = format!("{SERVER}:{port}");
    let (connects, requests) = if sizes.smoke {
        (200, 50)
    } else {
        (20_000, 2_000)
    };
    let modes = ["off", "audit", "block"];
    let policies = [policy(dir, "audit")?, policy(dir, "block")?];
    // Unmeasured: the first connects resolve the neighbour and warm the server.
    workload(dir, &["connect".into(), target.clone(), "100".into()])?;
    workload(dir, &["http".into(), target.clone(), "20".into()])?;
    let mut connect: [Vec<f64>; 3] = Default::default();
    let mut http: [Vec<f64>; 3] = Default::default();
    for _ in 0..sizes.rounds {
        for (i, _) in modes.iter().enumerate() {
            let agent = match i {
                0 => None,
                _ => Some(Agent::start_with(
                    dir,
                    &["--policy".as_ref(), policies[i - 1].as_os_str()],
                )?),
            };
            connect[i].push(workload(
                dir,
                &["connect".into(), target.clone(), connects.to_string()],
            )?);
            http[i].push(workload(
                dir,
                &["http".into(), target.clone(), requests.to_string()],
            )?);
            if let Some(agent) = agent {
                agent.stop()?;
            }
        }
    }
    let summary = |runs: &mut [Vec<f64>; 3]| {
        let off = median(&mut runs[0]);
        let mut out = serde_json::Map::new();
        for (i, mode) in modes.iter().enumerate() {
            let m = median(&mut runs[i]);
            out.insert(
                (*mode).into(),
                json!({ "ns": m, "spread": spread(&runs[i]), "ratio": m / off }),
            );
        }
        Value::Object(out)
    };
    Ok(json!({
        "connects": connects,
        "requests": requests,
        "connect": summary(&mut connect),
        "http": summary(&mut http),
    }))
}

pub(super) fn print(v: &Value) {
    println!(
        "\negress (connect: {} TCP connects to a namespace listener; http: {} requests of 16 KiB, \
         a connection each; median of rounds, ratio to agent off):",
        v["connects"], v["requests"]
    );
    for part in ["connect", "http"] {
        let line: Vec<String> = ["off", "audit", "block"]
            .iter()
            .map(|mode| {
                let m = &v[part][mode];
                format!(
                    "{mode} {:.1} µs ({:.3}x)",
                    m["ns"].as_f64().unwrap_or(0.0) / 1000.0,
                    m["ratio"].as_f64().unwrap_or(0.0)
                )
            })
            .collect();
        println!("  {part:<8} {}", line.join(", "));
    }
}
