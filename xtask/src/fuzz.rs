//! `cargo xtask fuzz [--seconds N] [TARGET...]`: builds the fuzz targets in `fuzz/` (cargo-fuzz,
//! libFuzzer, nightly) and runs each for a bounded time from its checked-in seeds
//! (`fuzz/seeds/TARGET`) and its local working corpus (`fuzz/corpus/TARGET`, not checked in,
//! grows from run to run). Fails when a target crashes, naming the reproducer.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::common::{run_cmd, say, workspace_root};

/// Every fuzz target (`fuzz/fuzz_targets/NAME.rs`).
pub const TARGETS: &[&str] = &["decode", "dns", "policy", "paths", "control", "tls"];

/// What libFuzzer reported at the end of a run (`-print_final_stats=1`).
#[derive(Debug, Default, PartialEq)]
pub struct Stats {
    pub execs: u64,
    pub execs_per_sec: u64,
    pub corpus: Option<u64>,
    pub coverage: Option<u64>,
}

/// Reads the final stats and the last status line out of libFuzzer's stderr.
pub fn parse_stats(log: &str) -> Stats {
    let mut stats = Stats::default();
    for line in log.lines() {
        let stat = |name: &str| {
            line.strip_prefix(name)
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let Some(v) = stat("stat::number_of_executed_units:") {
            stats.execs = v;
        } else if let Some(v) = stat("stat::average_exec_per_sec:") {
            stats.execs_per_sec = v;
        }
        // "#123456	DONE   cov: 812 ft: 2466 corp: 301/40Kb ..." (and INITED, NEW, REDUCE, pulse).
        if line.starts_with('#') {
            let mut words = line.split_whitespace();
            while let Some(w) = words.next() {
                match w {
                    "cov:" => stats.coverage = words.next().and_then(|v| v.parse().ok()),
                    "corp:" => {
                        stats.corpus = words
                            .next()
                            .and_then(|v| v.split('/').next())
                            .and_then(|v| v.parse().ok())
                    }
                    _ => {}
                }
            }
        }
    }
    stats
}

fn artifacts(dir: &Path) -> BTreeSet<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                        ["crash-", "leak-", "oom-", "timeout-"]
                            .iter()
                            .any(|prefix| n.starts_with(prefix))
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

pub fn fuzz(seconds: u64, targets: &[String], target_dir: Option<&Path>) -> anyhow::Result<()> {
    let targets: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        for t in targets {
            if !TARGETS.contains(&t.as_str()) {
                bail!("no fuzz target {t:?} (targets: {})", TARGETS.join(", "));
            }
        }
        targets.iter().map(String::as_str).collect()
    };
    let fuzz_dir = workspace_root().join("fuzz");
    let target_dir_args: Vec<String> = target_dir
        .map(|d| vec!["--target-dir".to_owned(), d.display().to_string()])
        .unwrap_or_default();

    let started = Instant::now();
    say("building the fuzz targets (cargo +nightly fuzz build)");
    run_cmd(
        Command::new("cargo")
            .args(["+nightly", "fuzz", "build"])
            .args(&target_dir_args)
            .current_dir(workspace_root()),
    )?;
    say(&format!(
        "fuzz targets built in {:.0} s",
        started.elapsed().as_secs_f64()
    ));

    let mut crashed = Vec::new();
    let logs = fuzz_dir.join("artifacts");
    std::fs::create_dir_all(&logs)?;
    for target in targets {
        let corpus = fuzz_dir.join("corpus").join(target);
        let seeds = fuzz_dir.join("seeds").join(target);
        let artifact_dir = fuzz_dir.join("artifacts").join(target);
        std::fs::create_dir_all(&corpus)?;
        std::fs::create_dir_all(&artifact_dir)?;
        let before = artifacts(&artifact_dir);
        let log_path = logs.join(format!("{target}.log"));
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        say(&format!(
            "fuzzing {target} for {seconds} s (log: {})",
            log_path.display()
        ));
        // New inputs go to the first corpus directory only: the seeds stay as checked in.
        let mut libfuzzer_args = vec![
            format!("-max_total_time={seconds}"),
            "-timeout=10".to_owned(),
            "-print_final_stats=1".to_owned(),
        ];
        let dict = fuzz_dir.join("dicts").join(format!("{target}.dict"));
        if dict.exists() {
            libfuzzer_args.push(format!("-dict={}", dict.display()));
        }
        let status = Command::new("cargo")
            .args(["+nightly", "fuzz", "run"])
            .args(&target_dir_args)
            .arg(target)
            .arg(&corpus)
            .arg(&seeds)
            .arg("--")
            .args(&libfuzzer_args)
            .current_dir(workspace_root())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .status()
            .context("running cargo fuzz")?;
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let stats = parse_stats(&text);
        let found: Vec<PathBuf> = artifacts(&artifact_dir)
            .difference(&before)
            .cloned()
            .collect();
        println!(
            "fuzz {target:8} {:>10} execs  {:>7} execs/s  corpus {:>5}  coverage {:>5}  {}",
            stats.execs,
            stats.execs_per_sec,
            stats.corpus.map_or("?".into(), |c| c.to_string()),
            stats.coverage.map_or("?".into(), |c| c.to_string()),
            if status.success() && found.is_empty() {
                "no crash"
            } else {
                "CRASH"
            }
        );
        if !status.success() || !found.is_empty() {
            // The panic message and where it came from, without the sanitizer's stack dump.
            for line in text
                .lines()
                .filter(|l| {
                    l.contains("panicked at") || l.starts_with("==") || l.contains("SUMMARY")
                })
                .take(6)
            {
                println!("    {line}");
            }
            for path in &found {
                println!(
                    "    reproducer: {}\n    run it (from the repository root): cargo +nightly fuzz run {target} {}",
                    path.display(),
                    path.display()
                );
            }
            if found.is_empty() {
                println!(
                    "    cargo fuzz failed without a reproducer: see {}",
                    log_path.display()
                );
            }
            crashed.push(target);
        }
    }
    println!(
        "fuzzing took {:.0} s in all (build included)",
        started.elapsed().as_secs_f64()
    );
    if !crashed.is_empty() {
        bail!("fuzz targets crashed: {}", crashed.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fuzz_target_is_declared_and_has_seeds() {
        let fuzz = workspace_root().join("fuzz");
        let manifest = std::fs::read_to_string(fuzz.join("Cargo.toml")).unwrap();
        for target in TARGETS {
            assert!(
                manifest.contains(&format!("path = \"fuzz_targets/{target}.rs\"")),
                "{target} is not a [[bin]] of fuzz/Cargo.toml"
            );
            assert!(fuzz.join(format!("fuzz_targets/{target}.rs")).exists());
            let seeds = std::fs::read_dir(fuzz.join("seeds").join(target))
                .unwrap_or_else(|e| panic!("fuzz/seeds/{target}: {e}"))
                .count();
            assert!(seeds > 0, "fuzz/seeds/{target} is empty");
        }
        assert_eq!(manifest.matches("[[bin]]").count(), TARGETS.len());
    }

    #[test]
    fn final_stats_and_last_status_line_are_read_from_libfuzzer_output() {
        let log = "INFO: Seed: 1\n\
                   #2\tINITED cov: 100 ft: 120 corp: 12/3Kb exec/s: 0 rss: 40Mb\n\
                   #4096\tpulse  cov: 180 ft: 300 corp: 40/9Kb lim: 43 exec/s: 2048 rss: 45Mb\n\
                   #52001\tDONE   cov: 201 ft: 420 corp: 57/11Kb lim: 88 exec/s: 1733 rss: 46Mb\n\
                   Done 52001 runs in 30 second(s)\n\
                   stat::number_of_executed_units: 52001\n\
                   stat::average_exec_per_sec:     1733\n\
                   stat::new_units_added:          45\n";
        assert_eq!(
            parse_stats(log),
            Stats {
                execs: 52001,
                execs_per_sec: 1733,
                corpus: Some(57),
                coverage: Some(201),
            }
        );
        assert_eq!(parse_stats("error: no such command"), Stats::default());
    }
}
