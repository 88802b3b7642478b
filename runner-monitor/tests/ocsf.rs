//! OCSF findings (`--alerts-format ocsf`, `output/ocsf.rs`), checked by an independent
//! implementation of the schema: every trace of the scenario corpus (`tests/scenarios/`, which
//! raises every rule) is replayed through the real binary, and every finding it writes is
//! validated against the OCSF 1.5.0 Detection Finding class by `ocsf-json-schema` and
//! `jsonschema` (PyPI), strictly: an unknown field, a missing required one or a wrong enum value
//! fails (`tests/ocsf/validate.py`).
//!
//! The validator comes from `cargo xtask setup`, in a virtualenv under `~/.cache/runner-monitor/`.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
};

use runner_monitor::{output::ocsf::OCSF_VERSION, rule::RuleId};
use serde_json::Value;

/// Where `cargo xtask setup` puts the validator's virtualenv (xtask/src/setup.rs).
fn python() -> PathBuf {
    let home = std::env::var_os("HOME").map_or("/root".into(), PathBuf::from);
    let path = home.join(".cache/runner-monitor/ocsf-json-schema/bin/python");
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask setup` (it installs ocsf-json-schema and jsonschema)",
        path.display()
    );
    path
}

/// A fresh file name in this run's scratch directory (the tests run in parallel).
fn scratch(name: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!("rm-ocsf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("creating a scratch directory");
    dir.join(format!("{}-{name}", NEXT.fetch_add(1, Ordering::Relaxed)))
}

/// `runner-monitor replay` of every scenario trace, as `format`: the alert lines, all traces.
fn replay_corpus(format: &str) -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/scenarios");
    let mut traces: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("reading tests/scenarios")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    traces.sort();
    assert!(traces.len() >= 8, "the scenario corpus: {traces:?}");
    let mut lines = Vec::new();
    for trace in traces {
        let out = scratch(&format!(
            "{}.{format}.jsonl",
            trace.file_stem().unwrap().to_string_lossy()
        ));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_runner-monitor"));
        cmd.arg("replay")
            .arg(&trace)
            .args(["--alerts-format", format, "--alerts-out"])
            .arg(&out);
        let policy = trace.with_extension("policy.toml");
        if policy.exists() {
            cmd.arg("--policy").arg(policy);
        }
        let status = cmd.status().expect("running runner-monitor replay");
        assert!(status.success(), "replay of {} failed", trace.display());
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        lines.extend(text.lines().map(str::to_owned));
    }
    lines
}

/// Runs the validator on `lines`; its exit status and output.
fn validate(lines: &[String], name: &str) -> (bool, String) {
    let file = scratch(name);
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ocsf/validate.py");
    let out = Command::new(python())
        .arg(script)
        .arg(OCSF_VERSION)
        .arg(&file)
        .output()
        .expect("running the OCSF validator");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn every_finding_of_the_scenario_corpus_is_a_valid_ocsf_detection_finding() {
    let ocsf = replay_corpus("ocsf");
    let native = replay_corpus("json");
    assert_eq!(ocsf.len(), native.len(), "one OCSF finding per finding");
    let findings: Vec<Value> = ocsf
        .iter()
        .map(|l| serde_json::from_str(l).expect("an OCSF line is JSON"))
        .collect();
    // The corpus raises every rule, so every rule's mapping is validated.
    for rule in RuleId::ALL {
        assert!(
            findings
                .iter()
                .any(|f| f["finding_info"]["types"][0] == rule.as_str()),
            "no OCSF finding of {rule:?} in the corpus"
        );
    }
    for f in &findings {
        assert_eq!(f["class_uid"], 2004);
        assert_eq!(f["type_uid"], 200401);
        assert_eq!(f["metadata"]["version"], OCSF_VERSION);
    }
    // The native findings ride along unchanged (findings of one instant may come in another
    // order from run to run).
    let mut unmapped: Vec<String> = findings.iter().map(|f| f["unmapped"].to_string()).collect();
    let mut native: Vec<String> = native
        .iter()
        .map(|n| serde_json::from_str::<Value>(n).unwrap().to_string())
        .collect();
    unmapped.sort();
    native.sort();
    assert_eq!(unmapped, native, "unmapped is the native finding");
    let (ok, report) = validate(&ocsf, "corpus.ocsf.jsonl");
    assert!(ok, "the OCSF validator rejected findings:\n{report}");
    assert!(
        report.contains(&format!("{} events, 0 errors", ocsf.len())),
        "{report}"
    );
}

#[test]
fn the_validator_rejects_a_finding_that_breaks_the_schema() {
    let ocsf = replay_corpus("ocsf");
    let mut finding: Value = serde_json::from_str(&ocsf[0]).unwrap();
    finding["finding_info"]
        .as_object_mut()
        .unwrap()
        .remove("uid");
    finding["severity_id"] = 42.into();
    finding["evidences"][0]["process"]["runner_job"] = "x".into();
    let (ok, report) = validate(&[finding.to_string()], "broken.ocsf.jsonl");
    assert!(!ok, "a broken finding passed:\n{report}");
    for expected in ["'uid' is a required property", "severity_id", "runner_job"] {
        assert!(report.contains(expected), "{expected:?} not in:\n{report}");
    }
}
