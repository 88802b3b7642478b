//! Findings per second through the NATS sink, against a real nats-server (Debian's, JetStream
//! on, its store in a temporary directory): the `nats_bench` example, which prints JSON.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::common::workspace_root;

pub(super) fn run(dir: &Path, smoke: bool) -> anyhow::Result<Value> {
    let dir = dir.join("nats");
    std::fs::create_dir_all(&dir)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut server = Command::new("nats-server")
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(dir.join("store"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting nats-server (`cargo xtask setup` installs it)")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            let _ = server.kill();
            bail!("nats-server did not listen on {port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let findings = if smoke { 500 } else { 20_000 };
    let out = Command::new(workspace_root().join("target/release/examples/nats_bench"))
        .arg(format!("nats://127.0.0.1:{port}"))
        .arg(findings.to_string())
        .arg(dir.join("spool"))
        .output()
        .context("nats_bench");
    let _ = server.kill();
    let _ = server.wait();
    let out = out?;
    if !out.status.success() {
        bail!(
            "nats_bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

pub(super) fn print(r: &Value) {
    let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
    println!(
        "NATS sink ({} findings of {} bytes, local nats-server): publish from a full spool {:.0}/s; \
         spooling (fsync each) {:.0}/s; end to end {:.0}/s",
        r["findings"],
        r["finding_bytes"],
        f("publish_findings_per_second"),
        f("spool_findings_per_second"),
        f("end_to_end_findings_per_second"),
    );
}
