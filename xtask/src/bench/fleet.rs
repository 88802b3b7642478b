//! The fleet correlator's ledger: fingerprint messages per second and memory at 1M fingerprints
//! (`runner-monitor/examples/fleet_bench.rs`, no NATS: the ledger alone).

use std::process::Command;

use anyhow::{Context as _, bail};
use serde_json::Value;

use super::Sizes;
use crate::common::workspace_root;

pub(super) fn run(sizes: &Sizes) -> anyhow::Result<Value> {
    let bin = workspace_root().join("target/release/examples/fleet_bench");
    let out = Command::new(&bin)
        .arg(sizes.fleet_fingerprints.to_string())
        .output()
        .context("fleet_bench")?;
    if !out.status.success() {
        bail!(
            "fleet_bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

pub(super) fn print(r: &Value) {
    println!(
        "fleet ledger: {:.0} fingerprint messages/s ({:.0} ns each); {} fingerprints of {} jobs: \
         {:.1} MiB on the heap ({:.0} bytes per fingerprint), RSS +{:.1} MiB",
        r["messages_per_second"].as_f64().unwrap_or(0.0),
        r["ns_per_message"].as_f64().unwrap_or(0.0),
        r["fingerprints"],
        r["origin_jobs"],
        r["heap_bytes"].as_f64().unwrap_or(0.0) / 1048576.0,
        r["bytes_per_fingerprint"].as_f64().unwrap_or(0.0),
        (r["rss_after_bytes"].as_f64().unwrap_or(0.0)
            - r["rss_before_bytes"].as_f64().unwrap_or(0.0))
            / 1048576.0,
    );
}
