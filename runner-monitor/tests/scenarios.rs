//! The scenario corpus (`tests/scenarios/`): each trace, replayed through the pipeline exactly as
//! `runner-monitor replay` runs it (the live agent's stages without the host's), must produce
//! exactly the findings its `.expect.json` lists — no more, no fewer. A `.policy.toml` beside a
//! trace replaces the built-in policy for it.

use std::{path::PathBuf, sync::Arc};

use runner_monitor::{
    engine::{Finding, Step},
    event::Event,
    output::{Outputs, alerts::AlertWriter},
    pipeline::Pipeline,
    policy::Policy,
};
use serde::Deserialize;

#[derive(Deserialize)]
struct Expectation {
    description: String,
    findings: Vec<Expected>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct Expected {
    rule: String,
    job: Option<String>,
    pid: Option<u32>,
    /// Credential, socket or persistence path, `ip:port`, or `pid:<pid>:<access>`.
    object: Option<String>,
    severity: Option<String>,
    dns_name: Option<String>,
    escape: Option<Vec<String>>,
    /// When the job ended (`job.ended_ns`): for an inferred end, the true one.
    ended_ns: Option<u64>,
    /// The job step the finding names, exactly.
    step: Option<Step>,
}

fn object_of(f: &Finding) -> Option<String> {
    if let Some(c) = &f.credential {
        return Some(c.path.clone());
    }
    if let Some(d) = &f.destination {
        return Some(format!("{}:{}", d.ip, d.port));
    }
    if let Some(s) = &f.socket {
        return Some(s.path.clone());
    }
    if let Some(p) = &f.persistence {
        return Some(p.path.clone());
    }
    f.target
        .as_ref()
        .map(|t| format!("pid:{}:{}", t.pid, t.access))
}

impl Expected {
    fn matches(&self, f: &Finding) -> bool {
        self.rule == f.rule.as_str()
            && self
                .job
                .as_ref()
                .is_none_or(|j| f.job.as_ref().is_some_and(|fj| &fj.info.id == j))
            && self
                .pid
                .is_none_or(|p| f.process.as_ref().is_some_and(|fp| fp.pid == p))
            && self
                .object
                .as_ref()
                .is_none_or(|o| object_of(f).as_ref() == Some(o))
            && self
                .severity
                .as_ref()
                .is_none_or(|s| s == f.severity.as_str())
            && self
                .dns_name
                .as_ref()
                .is_none_or(|n| f.destination.as_ref().and_then(|d| d.dns_name.as_ref()) == Some(n))
            && self.escape.as_ref().is_none_or(|e| e == &f.escape)
            && self
                .ended_ns
                .is_none_or(|t| f.job.as_ref().and_then(|j| j.ended_ns) == Some(t))
            && self
                .step
                .as_ref()
                .is_none_or(|s| f.step.as_ref() == Some(s))
    }
}

fn scenario_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/scenarios")
}

fn replay(trace: &std::path::Path, policy: Policy) -> Vec<Finding> {
    let alerts = AlertWriter::to_writer(Box::new(std::io::sink()), None);
    let outputs = Outputs::new(alerts, None).unwrap();
    let mut pipeline = Pipeline::new(Arc::new(policy), None, outputs);
    let text = std::fs::read_to_string(trace).unwrap();
    let mut findings = Vec::new();
    let mut last = 0;
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let event: Event = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{}:{}: {e}", trace.display(), n + 1));
        last = last.max(event.time_ns);
        findings.extend(pipeline.run([event]).unwrap());
    }
    findings.extend(pipeline.advance(last).unwrap());
    findings
}

#[test]
fn every_scenario_produces_exactly_its_expected_findings() {
    let mut traces: Vec<PathBuf> = std::fs::read_dir(scenario_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    traces.sort();
    assert!(traces.len() >= 7, "the corpus is missing: {traces:?}");
    let mut rules_seen = std::collections::BTreeSet::new();
    let mut failures = Vec::new();
    for trace in &traces {
        let stem = trace.file_stem().unwrap().to_str().unwrap().to_owned();
        let expect_path = trace.with_file_name(format!("{stem}.expect.json"));
        let expectation: Expectation =
            serde_json::from_str(&std::fs::read_to_string(&expect_path).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", expect_path.display()));
        let policy_path = trace.with_file_name(format!("{stem}.policy.toml"));
        let policy = if policy_path.exists() {
            Policy::load(&policy_path).unwrap()
        } else {
            Policy::builtin()
        };
        let mut found = replay(trace, policy);
        let mut missing = Vec::new();
        for want in &expectation.findings {
            match found.iter().position(|f| want.matches(f)) {
                Some(i) => {
                    rules_seen.insert(found.remove(i).rule);
                }
                None => missing.push(want),
            }
        }
        if !missing.is_empty() || !found.is_empty() {
            failures.push(format!(
                "{stem} ({}):\n  missing: {missing:#?}\n  unexpected: {:#?}",
                expectation.description,
                found
                    .iter()
                    .map(|f| (&f.rule, object_of(f), &f.summary))
                    .collect::<Vec<_>>()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The corpus covers every rule.
    for rule in runner_monitor::rule::RuleId::ALL {
        assert!(rules_seen.contains(&rule), "no scenario raises {rule}");
    }
}

/// The recorded normal jobs: the corpus's clean job and `clean-jobs/`, in that order.
fn clean_traces() -> Vec<PathBuf> {
    let mut more: Vec<PathBuf> = std::fs::read_dir(scenario_dir().join("clean-jobs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    more.sort();
    let mut traces = vec![scenario_dir().join("clean-job.jsonl")];
    traces.extend(more);
    traces
}

/// The rules `baseline learn` writes for the clean traces, under the built-in policy.
fn learned_from_clean_jobs() -> String {
    let mut learner = runner_monitor::baseline::Learner::new(Arc::new(Policy::builtin()));
    for trace in clean_traces() {
        let name = trace.file_name().unwrap().to_str().unwrap().to_owned();
        learner.learn(&name, runner_monitor::baseline::read_trace(&trace).unwrap());
    }
    learner.rules()
}

#[test]
fn the_scenario_baseline_is_what_learning_the_clean_jobs_gives() {
    let checked_in = scenario_dir().join("baseline-deviation.baseline.toml");
    assert_eq!(
        std::fs::read_to_string(&checked_in).unwrap(),
        learned_from_clean_jobs(),
        "{} is stale: `runner-monitor baseline learn tests/scenarios/clean-job.jsonl \
         tests/scenarios/clean-jobs/*.jsonl -o {}` writes it again",
        checked_in.display(),
        checked_in.display()
    );
}

#[test]
fn under_the_baseline_learned_from_clean_jobs_they_raise_nothing_and_attacks_still_raise() {
    let learned = learned_from_clean_jobs();
    let with_learned = |policy_text: &str| {
        Policy::parse(&format!("{policy_text}\n{learned}"), "learned.toml")
            .unwrap_or_else(|e| panic!("{e}\n{learned}"))
    };
    for trace in clean_traces() {
        let found = replay(&trace, with_learned(runner_monitor::policy::DEFAULT_POLICY));
        assert!(
            found.is_empty(),
            "{}: {:#?}",
            trace.display(),
            found.iter().map(|f| &f.summary).collect::<Vec<_>>()
        );
    }
    let mut attacks = 0;
    for entry in std::fs::read_dir(scenario_dir()).unwrap() {
        let trace = entry.unwrap().path();
        let stem = trace.file_stem().unwrap().to_str().unwrap().to_owned();
        // The clean job is above; baseline-deviation's own policy already holds this baseline.
        if trace.extension().is_none_or(|x| x != "jsonl")
            || stem == "clean-job"
            || stem == "baseline-deviation"
        {
            continue;
        }
        let policy_path = trace.with_file_name(format!("{stem}.policy.toml"));
        let policy_text = std::fs::read_to_string(&policy_path)
            .unwrap_or_else(|_| runner_monitor::policy::DEFAULT_POLICY.to_owned());
        let expectation: Expectation = serde_json::from_str(
            &std::fs::read_to_string(trace.with_file_name(format!("{stem}.expect.json"))).unwrap(),
        )
        .unwrap();
        // A quiet scenario (a job the rules must leave alone) is not an attack.
        if expectation.findings.is_empty() {
            continue;
        }
        let mut found = replay(&trace, with_learned(&policy_text));
        for want in &expectation.findings {
            let i = found
                .iter()
                .position(|f| want.matches(f))
                .unwrap_or_else(|| panic!("{stem}: no longer raises {want:?}"));
            found.remove(i);
        }
        attacks += 1;
    }
    assert!(attacks >= 6, "only {attacks} attack scenarios");
}
