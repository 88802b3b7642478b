//! Container start latency: `docker run --rm --network none IMAGE true` issued from a job, agent
//! off and on, interleaved rounds whose order rotates. With the agent on, the job's start
//! requests go through the attribution path (the job's connect to the Docker socket, the start
//! request seen at `write`, the container's cgroup made the job's: `docs/containers.md`); each
//! run checks the agent saw every container (its `container` events), so the number is not that
//! of an agent that saw nothing. Also the syscalls of processes outside jobs (`outside.rs`): the
//! container probes run on every `write` and `sendto` on the host.
//!
//! The Docker engine is Debian's `docker.io`, started here with its own data root, exec root and
//! socket under the bench's directory, no bridge and no iptables rules; its image is imported
//! from a rootfs of Debian's static busybox (nothing is pulled). Dropping it removes the
//! containers, stops the daemon and removes its files, on error too.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use super::{Agent, Sizes, job, median, outside, spread};

/// Debian's docker CLI (another `docker` may come first on PATH).
const CLI: &str = "/usr/bin/docker";
const IMAGE: &str = "rm-busybox:bench";
const MODES: [&str; 2] = ["off", "on"];

struct Dockerd {
    child: Child,
    dir: PathBuf,
    /// `<dir>/.docker/run/docker.sock`: a path the built-in policy lists as the Docker socket.
    socket: PathBuf,
}

impl Dockerd {
    fn start(parent: &Path) -> anyhow::Result<Self> {
        let dir = parent.join("docker");
        let socket = dir.join(".docker/run/docker.sock");
        std::fs::create_dir_all(socket.parent().unwrap())?;
        let log = std::fs::File::create(dir.join("dockerd.log"))?;
        let mut command = Command::new("dockerd");
        command
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(dir.join("exec"))
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", socket.display()))
            .args(["--bridge=none", "--iptables=false", "--ip6tables=false"])
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: prctl in the forked child before exec is async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = command
            .spawn()
            .context("starting dockerd (Debian's docker.io: `cargo xtask setup`)")?;
        let docker = Self { child, dir, socket };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !docker
            .cli()
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            if Instant::now() > deadline {
                bail!("dockerd did not answer: {}", docker.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        docker.import_busybox()?;
        Ok(docker)
    }

    fn cli(&self) -> Command {
        let mut command = Command::new(CLI);
        command
            .env("DOCKER_CONFIG", self.dir.join("cli"))
            .arg("-H")
            .arg(format!("unix://{}", self.socket.display()));
        command
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
    }

    fn run(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = self.cli().args(args).output()?;
        if !out.status.success() {
            bail!(
                "docker {args:?}: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.log()
            );
        }
        Ok(())
    }

    /// A rootfs of Debian's static busybox, imported as `IMAGE`.
    fn import_busybox(&self) -> anyhow::Result<()> {
        let root = self.dir.join("rootfs");
        for sub in ["bin", "proc", "sys", "dev", "etc", "tmp"] {
            std::fs::create_dir_all(root.join(sub))?;
        }
        std::fs::copy("/bin/busybox", root.join("bin/busybox"))
            .context("Debian's busybox-static (`cargo xtask setup`)")?;
        for applet in ["sh", "true"] {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
        }
        let tar = self.dir.join("rootfs.tar");
        crate::common::run_cmd(
            Command::new("tar")
                .arg("-C")
                .arg(&root)
                .arg("-cf")
                .arg(&tar)
                .arg("."),
        )?;
        self.run(&["import", &tar.display().to_string(), IMAGE])
    }

    /// A job step's shell lines that run `n` containers, printing a timestamp (ns) before the
    /// first and after each.
    fn script(&self, n: usize) -> String {
        format!(
            "export DOCKER_CONFIG={config}\ndate +%s%N\nfor i in $(seq {n}); do\n  \
             {CLI} -H unix://{socket} run --rm --network none {IMAGE} true || exit 1\n  \
             date +%s%N\ndone\n",
            config = self.dir.join("cli").display(),
            socket = self.socket.display(),
        )
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if let Ok(out) = self.cli().args(["ps", "-aq"]).output() {
            let ids = String::from_utf8_lossy(&out.stdout).to_string();
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let _ = self.cli().args(["rm", "-f"]).args(&ids).output();
            }
        }
        // SAFETY: kill(2) of our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Whatever the daemon left mounted under its roots goes before its files.
        for root in ["exec", "data"] {
            let _ = Command::new("umount")
                .args(["-R", "-l"])
                .arg(self.dir.join(root))
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The job's per-start times in ns, from the timestamps its script printed.
fn starts(out: &str, n: usize) -> anyhow::Result<Vec<f64>> {
    let stamps: Vec<u64> = out
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("the job printed {out:?}"))?;
    if stamps.len() != n + 1 {
        bail!("the job printed {} timestamps, not {}", stamps.len(), n + 1);
    }
    Ok(stamps.windows(2).map(|w| (w[1] - w[0]) as f64).collect())
}

/// The agent's count of container events (each a container cgroup made the job's).
fn containers_seen(agent: &Agent) -> anyhow::Result<f64> {
    Ok(agent
        .metrics()?
        .sum("runner_monitor_events_total", "kind=\"container\""))
}

/// How many containers the agent saw since `before`, once it saw `n` or after 5 s (it reads its
/// ring buffer every 2 ms).
fn wait_seen(agent: &Agent, before: f64, n: usize) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let seen = containers_seen(agent)? - before;
        if seen >= n as f64 || Instant::now() > deadline {
            return Ok(seen);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn start_latency(dir: &Path, sizes: &Sizes) -> anyhow::Result<Value> {
    let docker = Dockerd::start(dir)?;
    let n = if sizes.smoke { 3 } else { 10 };
    let rounds = if sizes.smoke { 1 } else { sizes.rounds };
    // Unmeasured: the first start after the daemon's own start is slower.
    docker.run(&["run", "--rm", "--network", "none", IMAGE, "true"])?;
    let script = docker.script(n);
    // Every start, and each round's median, per mode.
    let mut all: [Vec<f64>; 2] = Default::default();
    let mut round_medians: [Vec<f64>; 2] = Default::default();
    let mut attributed = 0.0;
    for round in 0..rounds {
        for step in 0..MODES.len() {
            let mode = (round + step) % MODES.len();
            let agent = (mode == 1).then(|| Agent::start(dir)).transpose()?;
            let before = agent.as_ref().map(containers_seen).transpose()?;
            let ran = job(dir, &script);
            let seen = match (&agent, before) {
                (Some(agent), Some(before)) if ran.is_ok() => Some(wait_seen(agent, before, n)),
                _ => None,
            };
            // Stopped before any error is returned.
            if let Some(agent) = agent {
                agent.stop()?;
            }
            let mut times = starts(&ran?, n)?;
            if let Some(seen) = seen {
                let seen = seen?;
                if seen < n as f64 {
                    bail!("the agent saw {seen} of the job's {n} containers");
                }
                attributed += seen;
            }
            all[mode].extend(&times);
            round_medians[mode].push(median(&mut times));
        }
    }
    let off = median(&mut all[0].clone());
    let mut out = serde_json::Map::new();
    for (m, mode) in MODES.iter().enumerate() {
        let v = median(&mut all[m].clone());
        out.insert(
            (*mode).into(),
            json!({
                "ms": v / 1e6,
                "ratio": v / off,
                "spread_ms": spread(&all[m]).map(|x| x / 1e6),
                "round_medians_ms": round_medians[m].iter().map(|x| x / 1e6).collect::<Vec<_>>(),
            }),
        );
    }
    out.insert("starts_per_round".into(), json!(n));
    out.insert("rounds".into(), json!(rounds));
    out.insert("containers_attributed".into(), json!(attributed));
    Ok(Value::Object(out))
}

pub(super) fn run(dir: &Path, sizes: &Sizes) -> anyhow::Result<Value> {
    Ok(json!({
        "start": start_latency(dir, sizes)?,
        "outside_jobs": outside::run(dir, sizes)?,
    }))
}

pub(super) fn print(r: &Value) {
    let s = &r["start"];
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let parts: Vec<String> = MODES
        .iter()
        .map(|mode| {
            let m = &s[mode];
            format!(
                "{mode} {:.1} ms ({:.1}-{:.1}) {:.3}x",
                f(&m["ms"]),
                f(&m["spread_ms"][0]),
                f(&m["spread_ms"][1]),
                f(&m["ratio"])
            )
        })
        .collect();
    println!(
        "container start from a job (`docker run --rm --network none IMAGE true`, {} per mode in \
         each of {} rounds; median of every start, their range; target 1.05x): {}; the agent \
         attributed {} containers",
        s["starts_per_round"],
        s["rounds"],
        parts.join(", "),
        s["containers_attributed"]
    );
    outside::print(&r["outside_jobs"]);
}
