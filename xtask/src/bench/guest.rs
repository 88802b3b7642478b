//! open+close inside a job in QEMU guests booting Debian's kernels, where the fast file-open hooks
//! (BPF LSM `file_open`, fentry) load: agent off, with the fast set (`--hooks fast`) and with the
//! tracepoint set (`--hooks tracepoint`), interleaved rounds of `guest_open_close.sh`, for a
//! watched credential (reported) and an ordinary file (not reported). Software-emulated guests
//! (single-threaded TCG: the agent and the workload share one host thread): the ratios are a
//! guest's, not a runner's, and say how the two hook sets compare on one kernel.

use serde_json::{Value, json};

use crate::{common::workspace_root, guest};

use super::{Sizes, median};

/// The kernels whose hooks are compared: Debian 12's and its backports' (both have BPF LSM).
const KERNELS: [&str; 2] = guest::MATRIX;

pub(super) fn run(sizes: &Sizes) -> anyhow::Result<Value> {
    let root = workspace_root();
    let (opens, rounds) = if sizes.smoke { (500, 1) } else { (20_000, 5) };
    let mut out = serde_json::Map::new();
    for spec in KERNELS {
        let kernel = guest::resolve(spec)?;
        let dir = root.join("target/guest").join(format!("bench-{spec}"));
        let script = format!(
            "cd '{root}' && export N={opens} ROUNDS={rounds} && \
             echo '== reported' && bash xtask/src/bench/guest_open_close.sh && \
             echo '== ordinary' && FILE=/tmp/rmb/home/notes.txt \
             bash xtask/src/bench/guest_open_close.sh\n",
            root = root.display(),
        );
        let run = guest::run(&kernel, &dir, &script, std::time::Duration::from_secs(1800))?;
        if run.status != Some(0) {
            anyhow::bail!(
                "the open+close benchmark in the {spec} guest failed ({:?}):\n{}\n{}",
                run.status,
                run.output,
                run.console
            );
        }
        let mut result = parse(&run.output)?;
        result["kernel"] = json!(kernel.release);
        out.insert(spec.to_owned(), result);
    }
    Ok(Value::Object(out))
}

/// The script's rounds (`round N off X fast Y tracepoint Z`, ns per open+close) under each
/// `== case` header, and the hook sets the agent reported (`file opens hooks=...`).
fn parse(output: &str) -> anyhow::Result<Value> {
    let mut cases = serde_json::Map::new();
    let mut case = String::new();
    let mut rounds: Vec<[f64; 3]> = Vec::new();
    let mut hooks: Vec<String> = Vec::new();
    let mut finish = |case: &str, rounds: &mut Vec<[f64; 3]>| {
        if !case.is_empty() && !rounds.is_empty() {
            let col = |i: usize| median(&mut rounds.iter().map(|r| r[i]).collect::<Vec<_>>());
            let (off, fast, tp) = (col(0), col(1), col(2));
            cases.insert(
                case.to_owned(),
                json!({
                    "rounds": rounds.len(),
                    "off_ns": off, "fast_ns": fast, "tracepoint_ns": tp,
                    "fast_ratio": fast / off, "tracepoint_ratio": tp / off,
                }),
            );
        }
        rounds.clear();
    };
    for line in output.lines() {
        if let Some(name) = line.strip_prefix("== ") {
            finish(&case, &mut rounds);
            case = name.trim().to_owned();
        } else if let Some(rest) = line.strip_prefix("round ") {
            let words: Vec<&str> = rest.split_whitespace().collect();
            let value = |key: &str| -> anyhow::Result<f64> {
                let at = words
                    .iter()
                    .position(|w| *w == key)
                    .ok_or_else(|| anyhow::anyhow!("no {key} in {line:?}"))?;
                Ok(words.get(at + 1).unwrap_or(&"").parse()?)
            };
            rounds.push([value("off")?, value("fast")?, value("tracepoint")?]);
        } else if let Some(set) = line.strip_prefix("file opens hooks=") {
            let set = set.trim().to_owned();
            if !hooks.contains(&set) {
                hooks.push(set);
            }
        }
    }
    finish(&case, &mut rounds);
    if cases.is_empty() {
        anyhow::bail!("no rounds in the guest's output:\n{output}");
    }
    Ok(json!({ "cases": cases, "hooks": hooks }))
}

pub(super) fn print(r: &Value) {
    let Some(kernels) = r.as_object() else {
        return;
    };
    println!("open+close in QEMU guests (TCG: a guest's ratios, not a runner's; median ns):");
    for (spec, k) in kernels {
        println!(
            "  {} ({}), hook sets: {}",
            spec,
            k["kernel"].as_str().unwrap_or("?"),
            k["hooks"]
                .as_array()
                .map(|h| h
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(" / "))
                .unwrap_or_default()
        );
        for (case, c) in k["cases"].as_object().into_iter().flatten() {
            let f = |key: &str| c[key].as_f64().unwrap_or(f64::NAN);
            println!(
                "    {case:<9} off {:>9.0}  fast {:>9.0} {:.2}x  tracepoint {:>9.0} {:.2}x  ({} rounds)",
                f("off_ns"),
                f("fast_ns"),
                f("fast_ratio"),
                f("tracepoint_ns"),
                f("tracepoint_ratio"),
                c["rounds"]
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_and_hook_sets_are_read_per_case() {
        let out = "== reported\nfile opens hooks=lsm file_open \nfile opens hooks=tracepoints openat\n\
                   round 1 off 100 fast 150 tracepoint 300\nround 2 off 110 fast 160 tracepoint 290\n\
                   round 3 off 90 fast 140 tracepoint 310\n== ordinary\n\
                   round 1 off 100 fast 120 tracepoint 130\n";
        let r = parse(out).unwrap();
        let rep = &r["cases"]["reported"];
        assert_eq!(rep["rounds"], 3);
        assert_eq!(rep["off_ns"], 100.0);
        assert_eq!(rep["fast_ratio"], 1.5);
        assert_eq!(rep["tracepoint_ratio"], 3.0);
        assert_eq!(r["cases"]["ordinary"]["fast_ns"], 120.0);
        assert_eq!(r["hooks"], json!(["lsm file_open", "tracepoints openat"]));
        assert!(parse("nothing\n").is_err());
    }
}
