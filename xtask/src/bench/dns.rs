//! A DNS lookup from a job, agent off, in audit mode and in block mode (where the kernel sends
//! it to the agent's resolver, which forwards it and admits the answer's addresses before
//! answering). The server is the tests' tiny zone on 127.0.0.2:53; each lookup is a new UDP
//! socket, as glibc's. Target: block mode at most +200 us at p50 over the agent off.

use std::{path::Path, process::Command};

use anyhow::bail;
use serde_json::{Value, json};

use super::{Agent, Sizes, bench_workload, job, median, spawn_ready};

const SERVER: &str = "127.0.0.2:53";

fn policy(mode: &str) -> String {
    format!(
        "[egress]\nmode = \"{mode}\"\ndns_upstream = [\"{SERVER}\"]\n\
         allow = [{{ cidr = \"127.0.0.0/8\" }}, {{ name = \"allowed.test\" }}]\n"
    )
}

/// What `bench-workload dns` printed for `n` lookups of `name` made by a job.
fn ask(dir: &Path, name: &str, n: u64) -> anyhow::Result<String> {
    let script = format!(
        "exec {} dns {SERVER} {name} {n}",
        bench_workload().display()
    );
    job(dir, &script)
}

/// p50 and p99 in microseconds of `n` lookups made by a job.
fn lookups(dir: &Path, n: u64) -> anyhow::Result<(f64, f64)> {
    let out = ask(dir, "allowed.test", n)?;
    let mut numbers = out.split_whitespace().map(str::parse::<f64>);
    match (numbers.next(), numbers.next()) {
        (Some(Ok(p50)), Some(Ok(p99))) => Ok((p50, p99)),
        _ => bail!("bench-workload dns printed {out:?}"),
    }
}

pub(crate) fn run(dir: &Path, sizes: &Sizes) -> anyhow::Result<Value> {
    let mut server = spawn_ready(
        Command::new(bench_workload()).args(["dns-serve", SERVER]),
        "listening",
    )?;
    let n = if sizes.smoke { 100 } else { 2_000 };
    let result = (|| -> anyhow::Result<Value> {
        let mut p50: [Vec<f64>; 3] = Default::default();
        let mut p99: [Vec<f64>; 3] = Default::default();
        for _ in 0..sizes.rounds.min(3) {
            for (i, mode) in [None, Some("audit"), Some("block")].into_iter().enumerate() {
                let agent = match mode {
                    Some(mode) => {
                        let file = dir.join("dns-policy.toml");
                        std::fs::write(&file, policy(mode))?;
                        // The policy names no job roots: the runner's is given here.
                        Some(Agent::start_with(
                            dir,
                            &[
                                "--policy".as_ref(),
                                file.as_os_str(),
                                "--job-root-exe".as_ref(),
                                "Runner.Worker".as_ref(),
                            ],
                        )?)
                    }
                    None => None,
                };
                let (a, b) = lookups(dir, n)?;
                // Proof that block mode's lookups went through the agent's resolver: it refuses
                // a name outside the allowlist, which the server itself answers.
                let denied = ask(dir, "denied.test", 1)?;
                let refused = denied.trim() == "rcode Refused";
                if refused != (mode == Some("block")) {
                    bail!("a lookup of denied.test in mode {mode:?} printed {denied:?}");
                }
                p50[i].push(a);
                p99[i].push(b);
                if let Some(agent) = agent {
                    agent.stop()?;
                }
            }
        }
        let [off, audit, block] = p50.map(|mut v| median(&mut v));
        let [off99, audit99, block99] = p99.map(|mut v| median(&mut v));
        Ok(json!({
            "lookups": n,
            "off_p50_us": off, "audit_p50_us": audit, "block_p50_us": block,
            "off_p99_us": off99, "audit_p99_us": audit99, "block_p99_us": block99,
            "block_added_p50_us": block - off,
        }))
    })();
    let _ = server.kill();
    let _ = server.wait();
    result
}

pub(crate) fn print(dns: &Value) {
    let f = |k: &str| dns[k].as_f64().unwrap_or(0.0);
    println!(
        "DNS lookup from a job ({} lookups): p50 off {:.0} us, audit {:.0} us, block (through the \
         agent's resolver) {:.0} us: +{:.0} us (target +200 us); p99 {:.0} / {:.0} / {:.0} us",
        dns["lookups"],
        f("off_p50_us"),
        f("audit_p50_us"),
        f("block_p50_us"),
        f("block_added_p50_us"),
        f("off_p99_us"),
        f("audit_p99_us"),
        f("block_p99_us"),
    );
}
