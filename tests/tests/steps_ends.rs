//! Ends that cannot be gamed and the step that did it, through the real agent binary: a GitLab
//! shell-executor survivor that acts inside the stage gap is judged after the job's true end; a
//! next stage inside the gap keeps the job going; a JavaScript action laid out as the runner does
//! is named in the finding, live and in replay of the agent's trace.

use std::{
    process::Command,
    sync::OnceLock,
    time::{Duration, Instant},
};

use integration_tests::{
    CANARY, TestEnv,
    live::{
        Agent, agent_dir, alerts, assert_no_secret, free_port, github_job, json_lines,
        replay_alerts, run_id, test_policy, wait_alert,
    },
    output_of,
};
use serde_json::Value;

/// The stage gap of this binary's agent: longer than the survivor's 4 s wait and the 3 s pause
/// between stages.
const STAGE_GAP_SECONDS: u64 = 8;

static AGENT: OnceLock<Agent> = OnceLock::new();

/// One agent for this test binary, with an 8 s stage gap.
fn agent() -> &'static Agent {
    AGENT.get_or_init(|| {
        let dir = agent_dir("steps-ends");
        std::fs::write(
            dir.join("policy.toml"),
            test_policy().replace(
                "stage_gap_seconds = 1",
                &format!("stage_gap_seconds = {STAGE_GAP_SECONDS}"),
            ),
        )
        .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // The agent dies with this thread, which lives as long as the test binary.
            tx.send(Agent::launch(&dir, free_port(), &[])).unwrap();
            loop {
                std::thread::park();
            }
        });
        rx.recv().unwrap()
    })
}

/// Runs `script` as GitLab Runner's shell executor would: each line a stage shell, a child of
/// `gitlab-runner`, with the job's CI variables and no hooks.
fn gitlab_job(env: &TestEnv, job_id: &str, script: &str) {
    let runner = env.dir.join("gitlab-runner");
    std::fs::copy("/bin/sh", &runner).unwrap();
    let out = output_of(
        Command::new(&runner)
            .arg("-c")
            .arg(script)
            .env("HOME", &env.home)
            .env("CI_JOB_ID", job_id)
            .env("CI_PROJECT_PATH", "group/gap")
            .env("CI_JOB_NAME", "build")
            .env("CI_PIPELINE_ID", "91")
            .env("CI_JOB_TOKEN", CANARY),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn events_of(agent: &Agent) -> Vec<Value> {
    json_lines(&agent.dir.join("events.jsonl"))
}

#[test]
fn a_stage_gap_survivor_reading_credentials_is_after_the_true_end() {
    let agent = agent();
    let env = TestEnv::new("gap-survivor");
    let job_id = run_id(1);
    // The last (only) stage leaves a survivor and exits; the read comes 4 s later, inside the
    // stage gap, before the agent can know the job is over.
    gitlab_job(
        &env,
        &job_id,
        "bash -c 'sleep 0.3; setsid nohup bash -c \"sleep 4; cat ~/.aws/credentials\" \
         > /dev/null 2>&1 < /dev/null &'\n",
    );
    let stage_exited = Instant::now();
    let after = wait_alert(agent, "credential-after-job-end", &job_id, |_| true);
    assert!(
        stage_exited.elapsed() >= Duration::from_secs(STAGE_GAP_SECONDS - 1),
        "raised before the end could be inferred: {after}"
    );
    assert_eq!(after["severity"], "critical");
    assert_eq!(after["credential"]["kind"], "aws");
    assert_eq!(after["job"]["platform"], "gitlab");
    assert_eq!(after["job"]["repository"], "group/gap");
    assert_eq!(after["job"]["ended"], true);
    // The true end: the last stage's exit, about 4 s before the read; not the inferred end
    // (8 s after the stage), which comes after it.
    let ended = after["job"]["ended_ns"]
        .as_u64()
        .expect("the true end time");
    let read = after["time_ns"].as_u64().unwrap();
    let since = read.saturating_sub(ended);
    assert!(
        read > ended && (3_500_000_000..6_000_000_000).contains(&since),
        "read {since} ns after the end: {after}"
    );
    assert!(
        after["summary"]
            .as_str()
            .unwrap()
            .contains("s after the job ended"),
        "{after}"
    );
    // The step that left it: the stage shell's child, named by its first command line.
    assert!(
        after["step"]["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("setsid nohup bash -c")),
        "{after}"
    );
    assert_no_secret(agent);
}

#[test]
fn a_next_stage_inside_the_gap_keeps_the_job_and_raises_nothing() {
    let agent = agent();
    let env = TestEnv::new("gap-next-stage");
    let job_id = run_id(2);
    // The first stage leaves a reader behind; the second stage starts 3 s later.
    gitlab_job(
        &env,
        &job_id,
        "bash -c 'sleep 0.3; (sleep 1; cat ~/.aws/credentials) > /dev/null 2>&1 < /dev/null &'\n\
         sleep 3\n\
         bash -c 'sleep 0.3; true'\n",
    );
    // The job ends a stage gap after its second stage; survivors are looked for a grace
    // period (2 s) later.
    std::thread::sleep(Duration::from_secs(STAGE_GAP_SECONDS + 5));
    let events = events_of(agent);
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "job_start" && e["id"] == job_id.as_str()),
        "the agent never named the job"
    );
    let aws = env.path(".aws/credentials");
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "file_open" && e["path"] == aws.as_str()),
        "the agent never saw the read inside the gap"
    );
    let raised: Vec<Value> = alerts(agent)
        .into_iter()
        .filter(|a| a["job"]["id"] == job_id.as_str())
        .collect();
    assert!(raised.is_empty(), "{raised:#?}");
}

#[test]
fn a_javascript_action_reading_the_worker_environ_is_named_live_and_in_replay() {
    let agent = agent();
    let env = TestEnv::new("js-action");
    let action = env
        .dir
        .join("runner/_work/_actions/evil-org/changed-files/v45/dist");
    std::fs::create_dir_all(&action).unwrap();
    let index = action.join("index.js");
    // The runner starts a JavaScript action as a direct child of Runner.Worker: `node <main>`.
    std::fs::write(
        &index,
        "require('fs').readFileSync('/proc/' + process.ppid + '/environ');\n",
    )
    .unwrap();
    let run = run_id(3);
    github_job(
        &env,
        agent,
        &run,
        "acme/app",
        &format!("node {}", index.display()),
    );
    let id = format!("{run}/build");
    let dump = wait_alert(agent, "process-memory-access", &id, |_| true);
    assert_eq!(
        dump["step"]["action"], "evil-org/changed-files@v45",
        "{dump}"
    );
    assert_eq!(dump["step"]["kind"], "action");
    // The job-started hook is the job's first step, the action its second.
    assert_eq!(dump["step"]["index"], 2, "{dump}");
    assert!(
        dump["target"]["access"]
            .as_str()
            .unwrap()
            .ends_with("/environ")
    );

    // The agent's trace carries what replay needs to name the same step.
    let again = replay_alerts(&agent.dir)
        .into_iter()
        .find(|a| a["rule"] == "process-memory-access" && a["job"]["id"] == id.as_str())
        .expect("replay raises the finding");
    assert_eq!(again["step"], dump["step"]);
    assert_no_secret(agent);
}
