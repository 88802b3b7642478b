//! `runner-monitor report --trace`: the real binary, offline, on traces of the scenario corpus
//! (`tests/scenarios/`), in each format.

use std::{path::PathBuf, process::Command};

fn scenario(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../tests/scenarios/{name}.jsonl"))
}

/// Runs `runner-monitor report ARGS`; (success, stdout, stderr).
fn report(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_runner-monitor"))
        .arg("report")
        .args(args)
        .output()
        .expect("running runner-monitor");
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn memory_dump_trace_reports_the_tree_the_memory_read_the_named_egress_and_findings() {
    let trace = scenario("runner-memory-dump-then-egress");
    let (ok, text, err) = report(&["--trace", trace.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        text.starts_with("Job run-4097 (key 0000000000001001)"),
        "{text}"
    );
    assert!(text.contains("repository: acme/app"), "{text}");
    assert!(
        text.contains(
            "  Runner.Worker (pid 100) /home/runner/bin/Runner.Worker spawnclient 113 116"
        ) && text.contains(
            "  └─ python3 (pid 101) python3 memdump.py  \
             [starts step 1: command python3 memdump.py; exit 0 at +4.000s]"
        ),
        "the tree: {text}"
    );
    assert!(text.contains("pid 100  memory /proc/100/mem"), "{text}");
    assert!(
        text.contains("paste.exfil.example 203.0.113.50:443  1 connections (pids 101)"),
        "{text}"
    );
    assert!(text.contains("Findings (3)"), "{text}");
    assert!(text.contains("critical process-memory-access"), "{text}");
    assert!(text.contains("medium   unexpected-egress"), "{text}");
    assert!(
        text.contains("Steps (1)\n  step 1: command python3 memdump.py (pid 101) from +1.000s"),
        "{text}"
    );
    assert!(text.contains("not in this report: containers"), "{text}");

    let (ok, json, err) = report(&["--trace", trace.to_str().unwrap(), "--format", "json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&json).expect("one JSON object");
    assert_eq!(v["job"]["id"], "run-4097");
    assert_eq!(v["egress"][0]["dns_name"], "paste.exfil.example");
    assert_eq!(v["findings"].as_array().unwrap().len(), 3);
    assert_eq!(v["steps"][0]["kind"], "command");
    assert_eq!(v["steps"][0]["pid"], 101);
    assert!(v.get("containers").is_none());

    let (ok, md, err) = report(&["--trace", trace.to_str().unwrap(), "--format", "markdown"]);
    assert!(ok, "{err}");
    assert!(md.starts_with("## runner-monitor: job run\\-4097"), "{md}");
    assert!(
        md.contains("| paste\\.exfil\\.example | 203.0.113.50 | 443 |"),
        "{md}"
    );
    assert!(
        md.contains("| **critical** | `process-memory-access` |"),
        "{md}"
    );
}

#[test]
fn survivor_trace_marks_the_survivors_and_the_read_after_the_end() {
    let trace = scenario("nohup-reads-aws-after-job-end");
    let (ok, text, err) = report(&["--trace", trace.to_str().unwrap(), "--job", "run-4097"]);
    assert!(ok, "{err}");
    assert!(text.contains("ended at +9.000s"), "{text}");
    assert!(
        text.contains("aws      file   /home/ci/.aws/credentials  1 reads, after the job ended"),
        "{text}"
    );
    assert!(text.contains("Survivors (2)"), "{text}");
    assert!(text.contains("SURVIVED THE JOB"), "{text}");
    assert!(text.contains("critical credential-after-job-end"), "{text}");
}

#[test]
fn a_trace_of_several_jobs_needs_a_job_and_names_them() {
    let trace = scenario("docker-login-cross-repo");
    let (ok, _, err) = report(&["--trace", trace.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("holds 2 jobs; name one with --job"), "{err}");
    let (ok, _, err) = report(&["--trace", trace.to_str().unwrap(), "--job", "nope"]);
    assert!(!ok);
    assert!(err.contains("no job \"nope\""), "{err}");
    let (ok, text, err) = report(&["--trace", trace.to_str().unwrap(), "--job", "run-77"]);
    assert!(ok, "{err}");
    assert!(text.starts_with("Job run-77 "), "{text}");
}
