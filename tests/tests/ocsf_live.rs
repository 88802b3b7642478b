//! The live agent with `--alerts-format ocsf`: a simulated GitHub job reads the runner's
//! registration credentials; the alert stream holds an OCSF Detection Finding for it, which the
//! independent validator (`runner-monitor/tests/ocsf/validate.py`, PyPI's ocsf-json-schema and
//! jsonschema from `cargo xtask setup`) accepts, with real wall-clock time, and no output carries
//! the canary.

use std::{path::PathBuf, process::Command};

use integration_tests::{
    TestEnv,
    live::{
        Agent, assert_no_secret_in, free_port, github_job, json_lines, repo_root, run_id,
        wait_until,
    },
};
use runner_monitor::output::ocsf::OCSF_VERSION;
use serde_json::Value;

fn ocsf_alerts(agent: &Agent) -> Vec<Value> {
    json_lines(&agent.dir.join("alerts.jsonl"))
}

#[test]
fn the_live_agent_writes_valid_ocsf_findings_without_secrets() {
    let env = TestEnv::new("ocsf-live");
    let dir = env.dir.join("agent");
    let agent = Agent::launch(&dir, free_port(), &["--alerts-format", "ocsf"]);
    let runner_dir = env.dir.join("actions-runner");
    std::fs::create_dir_all(&runner_dir).unwrap();
    std::fs::write(runner_dir.join(".credentials_rsaparams"), "{}").unwrap();
    let read = format!(
        "cat {}/.credentials_rsaparams > /dev/null; cat \"$HOME/.aws/credentials\" > /dev/null",
        runner_dir.display()
    );
    let run = run_id(61);
    let job_id = format!("{run}/build");
    let started = std::time::SystemTime::now();
    github_job(&env, &agent, &run, "acme/ocsf", &read);
    wait_until("an OCSF finding for the job", 20, || {
        ocsf_alerts(&agent).iter().any(|a| {
            a["finding_info"]["types"][0] == "runner-credential-access"
                && a["resources"][0]["uid"] == job_id.as_str()
        })
    });
    let alerts = ocsf_alerts(&agent);
    let finding = alerts
        .iter()
        .find(|a| a["finding_info"]["types"][0] == "runner-credential-access")
        .unwrap();
    assert_eq!(finding["class_uid"], 2004);
    assert_eq!(finding["severity_id"], 5, "critical");
    assert!(
        finding["evidences"][0]["file"]["path"]
            .as_str()
            .unwrap()
            .ends_with(".credentials_rsaparams")
    );
    assert_eq!(finding["resources"][0]["group"]["name"], "acme/ocsf");
    // Wall-clock time of the event, not the monotonic clock.
    let since_epoch = started
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let time = finding["time"].as_u64().unwrap();
    assert!(
        time + 5_000 >= since_epoch && time < since_epoch + 60_000,
        "time {time} vs test start {since_epoch}"
    );

    let home = std::env::var_os("HOME").map_or("/root".into(), PathBuf::from);
    let out = Command::new(home.join(".cache/runner-monitor/ocsf-json-schema/bin/python"))
        .arg(repo_root().join("runner-monitor/tests/ocsf/validate.py"))
        .arg(OCSF_VERSION)
        .arg(dir.join("alerts.jsonl"))
        .output()
        .expect("the OCSF validator (cargo xtask setup installs it)");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the validator rejected:\n{report}");
    assert_no_secret_in(&dir);
}
