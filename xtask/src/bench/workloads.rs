//! Real CI work with the agent off and on: compiling a Rust crate from vendored source, and
//! extracting a tarball of many small files. Wall clock of each, and the agent's CPU time as a
//! share of the workload's.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::common::run_cmd;

use super::{Agent, Sizes, children_cpu_ns, job, median, spread};

/// The newest version of `name` in cargo's registry sources (the workspace depends on it, so
/// any machine that built the workspace has it).
fn registry_crate(name: &str) -> anyhow::Result<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .context("CARGO_HOME or HOME")?;
    let mut found: Vec<(Vec<u64>, PathBuf)> = Vec::new();
    for index in std::fs::read_dir(home.join("registry/src"))? {
        for entry in std::fs::read_dir(index?.path())? {
            let path = entry?.path();
            let file = path.file_name().unwrap_or_default().to_string_lossy();
            if let Some(version) = file.strip_prefix(&format!("{name}-"))
                && let Ok(v) = version
                    .split('.')
                    .map(|p| p.parse::<u64>())
                    .collect::<Result<Vec<_>, _>>()
            {
                found.push((v, path));
            }
        }
    }
    found.sort();
    found.pop().map(|(_, p)| p).with_context(|| {
        format!("{name} is not in cargo's registry sources; build the workspace first")
    })
}

/// Copies a registry crate to `to` as a standalone crate without dependencies: only its
/// package, library and the features that need no optional dependency are kept.
fn vendor(from: &Path, to: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(to);
    run_cmd(Command::new("cp").arg("-r").arg(from).arg(to))?;
    let manifest: toml::Table = std::fs::read_to_string(from.join("Cargo.toml"))?.parse()?;
    let mut out = toml::Table::new();
    let package = manifest
        .get("package")
        .and_then(|p| p.as_table())
        .context("[package]")?;
    let mut kept = toml::Table::new();
    for key in ["name", "version", "edition"] {
        if let Some(v) = package.get(key) {
            kept.insert(key.into(), v.clone());
        }
    }
    out.insert("package".into(), kept.into());
    if let Some(lib) = manifest.get("lib") {
        out.insert("lib".into(), lib.clone());
    }
    let optional: Vec<String> = manifest
        .get("dependencies")
        .and_then(|d| d.as_table())
        .map(|d| d.keys().cloned().collect())
        .unwrap_or_default();
    if let Some(features) = manifest.get("features").and_then(|f| f.as_table()) {
        let needs_dependency = |v: &toml::Value| {
            v.as_array().is_some_and(|items| {
                items.iter().filter_map(|i| i.as_str()).any(|i| {
                    let name = i
                        .trim_start_matches("dep:")
                        .split(['/', '?'])
                        .next()
                        .unwrap_or("");
                    i.starts_with("dep:") || optional.iter().any(|d| d == name)
                })
            })
        };
        let features: toml::Table = features
            .iter()
            .filter(|(_, v)| !needs_dependency(v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        out.insert("features".into(), features.into());
    }
    out.insert("workspace".into(), toml::Table::new().into());
    std::fs::write(to.join("Cargo.toml"), toml::to_string(&out)?)?;
    let _ = std::fs::remove_file(to.join("Cargo.lock"));
    Ok(())
}

/// `count` small files in `dir`, in directories of 100, with varied content.
fn generate_files(dir: &Path, count: usize) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    for i in 0..count {
        let sub = dir.join(format!("d{:03}", i / 100));
        if i % 100 == 0 {
            std::fs::create_dir_all(&sub)?;
        }
        let body: String = (0..(64 + i % 512))
            .map(|j| char::from(b'a' + ((i * 31 + j * 7) % 26) as u8))
            .collect();
        std::fs::write(sub.join(format!("f{i:05}.txt")), body)?;
    }
    Ok(())
}

/// One measured run of `script` as a job: wall seconds, workload CPU ns, agent CPU ns.
fn measure(dir: &Path, script: &str, agent: Option<&Agent>) -> anyhow::Result<(f64, u64, u64)> {
    let agent_before = agent.map(|a| a.cpu_ns()).transpose()?.unwrap_or(0);
    let cpu_before = children_cpu_ns();
    let start = Instant::now();
    job(dir, script)?;
    let wall = start.elapsed().as_secs_f64();
    let cpu = children_cpu_ns() - cpu_before;
    let agent_cpu = agent.map(|a| a.cpu_ns()).transpose()?.unwrap_or(0) - agent_before;
    Ok((wall, cpu, agent_cpu))
}

pub(super) fn run(dir: &Path, sizes: &Sizes) -> anyhow::Result<Value> {
    // A small crate: `itoa` for the smoke run, `regex-syntax` (~58k lines) for the real one.
    let name = if sizes.smoke { "itoa" } else { "regex-syntax" };
    let crate_dir = dir.join("crate");
    vendor(&registry_crate(name)?, &crate_dir)?;
    let files = dir.join("files");
    generate_files(&files, sizes.tar_files)?;
    let tarball = dir.join("files.tar");
    run_cmd(
        Command::new("tar")
            .arg("-cf")
            .arg(&tarball)
            .arg("-C")
            .arg(&files)
            .arg("."),
    )?;
    std::fs::remove_dir_all(&files)?;

    let shm = Path::new("/dev/shm");
    let scratch = if shm.is_dir() {
        shm.join(format!("rm-bench-{}", std::process::id()))
    } else {
        dir.to_path_buf()
    };
    std::fs::create_dir_all(&scratch)?;
    let rounds = sizes.rounds.min(3);
    let mut runs: [[Vec<(f64, u64, u64)>; 2]; 2] = Default::default();
    let mut n = 0;
    for _ in 0..rounds {
        for on in [false, true] {
            let agent = if on { Some(Agent::start(dir)?) } else { None };
            n += 1;
            let target = dir.join(format!("target-{n}"));
            let build = format!(
                "cd {} && CARGO_TARGET_DIR={} exec cargo build --release --offline --quiet",
                crate_dir.display(),
                target.display()
            );
            runs[0][on as usize].push(measure(dir, &build, agent.as_ref())?);
            std::fs::remove_dir_all(&target)?;
            // Extracted to tmpfs when there is one: on this VM's disk, write-back made the same
            // extraction take 8 to 18 s, swamping what the agent adds.
            let out = scratch.join(format!("out-{n}"));
            let extract = format!(
                "mkdir {0} && exec tar -xf {1} -C {0}",
                out.display(),
                tarball.display()
            );
            runs[1][on as usize].push(measure(dir, &extract, agent.as_ref())?);
            let extracted = walk_count(&out)?;
            if extracted != sizes.tar_files {
                bail!("extracted {extracted} files, expected {}", sizes.tar_files);
            }
            std::fs::remove_dir_all(&out)?;
            if let Some(agent) = agent {
                agent.stop()?;
            }
        }
    }
    let summary = |runs: &[Vec<(f64, u64, u64)>; 2]| {
        let wall = |i: usize| runs[i].iter().map(|r| r.0).collect::<Vec<_>>();
        let (mut off, mut on) = (wall(0), wall(1));
        let (off_spread, on_spread) = (spread(&off), spread(&on));
        let (off_m, on_m) = (median(&mut off), median(&mut on));
        let mut shares: Vec<f64> = runs[1]
            .iter()
            .map(|r| r.2 as f64 / r.1.max(1) as f64)
            .collect();
        let workload_cpu = runs[1].iter().map(|r| r.1).sum::<u64>() as f64 / 1e9;
        let agent_cpu = runs[1].iter().map(|r| r.2).sum::<u64>() as f64 / 1e9;
        json!({
            "off_s": off_m, "on_s": on_m, "ratio": on_m / off_m,
            "off_spread_s": off_spread, "on_spread_s": on_spread,
            "agent_cpu_share": median(&mut shares),
            "workload_cpu_s": workload_cpu, "agent_cpu_s": agent_cpu,
            "rounds": rounds,
        })
    };
    if scratch != dir {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    Ok(json!({
        "crate_build": { "crate": name, "measured": summary(&runs[0]) },
        "tar_extract": {
            "files": sizes.tar_files,
            "into": scratch.display().to_string(),
            "measured": summary(&runs[1]),
        },
    }))
}

fn walk_count(dir: &Path) -> anyhow::Result<usize> {
    let mut n = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            n += walk_count(&entry.path())?;
        } else {
            n += 1;
        }
    }
    Ok(n)
}

pub(super) fn print(r: &Value) {
    println!(
        "{:<22} {:>9} {:>9} {:>8} {:>14}",
        "workload (median s)", "off", "agent", "agent/x", "agent CPU/wkld"
    );
    for (label, key) in [
        (
            format!(
                "build {}",
                r["crate_build"]["crate"].as_str().unwrap_or("?")
            ),
            "crate_build",
        ),
        (
            format!("untar {} files", r["tar_extract"]["files"]),
            "tar_extract",
        ),
    ] {
        let m = &r[key]["measured"];
        println!(
            "{:<22} {:>9.3} {:>9.3} {:>8.3} {:>13.3}%",
            label,
            m["off_s"].as_f64().unwrap_or(0.0),
            m["on_s"].as_f64().unwrap_or(0.0),
            m["ratio"].as_f64().unwrap_or(0.0),
            m["agent_cpu_share"].as_f64().unwrap_or(0.0) * 100.0,
        );
    }
}
