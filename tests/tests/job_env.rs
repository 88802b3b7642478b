//! Jobs found by their environment, in the kernel, through the real agent: a process outside any
//! job executed with a CI system's job marker becomes the root of a job named from that same
//! exec's environment (no special parent, no hook, no /proc read), and no other variable's value
//! ever leaves the kernel.

use std::{process::Command, time::Duration};

use integration_tests::{
    CANARY, TestEnv,
    live::{
        agent, agent_log, alerts, assert_no_secret, job_command, run_id, wait_alert, wait_until,
    },
    output_of,
};

/// Variables every job here also carries: secrets of several CI systems, an unrelated one, and
/// names that share their first 15 bytes with an identity variable (they pass the kernel's
/// prefix filter and must be refused by the exact name lookup).
fn secrets(command: &mut Command) -> &mut Command {
    command
        .env("GITHUB_TOKEN", CANARY)
        .env("CI_JOB_TOKEN", CANARY)
        .env("ACTIONS_RUNTIME_TOKEN", CANARY)
        .env("BUILDKITE_AGENT_ACCESS_TOKEN", CANARY)
        .env("BUILDKITE_JOB_ID_SECRET", CANARY)
        .env("JOB_NAME_TOKEN", CANARY)
        .env("DEPLOY_KEY", CANARY)
}

/// A job step that sweeps three kinds of credentials (a secret scanner at work).
const SWEEP: &str = "cat \"$HOME/.aws/credentials\" \"$HOME/.docker/config.json\" \
                     \"$HOME/.ssh/id_ed25519\" > /dev/null";

/// `program` as a CI system starts a job's process: an environment of its own (the test's could
/// hold a real CI's variables), the test's home, the agent's socket.
fn job(program: &str, env: &TestEnv) -> Command {
    let mut command = job_command(std::path::Path::new(program), env, agent());
    command.env_clear();
    command
        .env("HOME", &env.home)
        .env("PATH", "/usr/bin:/bin")
        .env("LANG", "C.UTF-8");
    command
}

fn run(command: &mut Command) {
    let out = output_of(command);
    assert!(
        out.status.success(),
        "job failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn jenkins_and_buildkite_jobs_are_found_and_named_by_their_environment() {
    let agent = agent();
    let env = TestEnv::new("job-env-ci");

    // Jenkins: a build step as the agent (java) starts it, here started by the test itself.
    let build = run_id(1);
    let mut jenkins = job("/bin/sh", &env);
    jenkins
        .arg("-c")
        .arg(SWEEP)
        .env("JENKINS_SERVER_COOKIE", "c0ffee")
        .env("JENKINS_URL", "https://jenkins.example.test/")
        .env("JOB_NAME", "acme/app")
        .env("BUILD_NUMBER", &build)
        .env("NODE_NAME", "agent-3")
        .env("GIT_BRANCH", "origin/main");
    run(secrets(&mut jenkins));

    // Buildkite: the bootstrap of one job and its command.
    let bk_job = format!("0190c0de-{}", run_id(2));
    let mut buildkite = job("/bin/sh", &env);
    buildkite
        .arg("-c")
        .arg(SWEEP)
        .env("BUILDKITE", "true")
        .env("BUILDKITE_JOB_ID", &bk_job)
        .env("BUILDKITE_PIPELINE_SLUG", "widgets")
        .env("BUILDKITE_BUILD_NUMBER", "77")
        .env("BUILDKITE_AGENT_NAME", "bk-agent-1")
        .env("BUILDKITE_BRANCH", "main");
    run(secrets(&mut buildkite));

    let jenkins_id = format!("acme/app/{build}");
    let alert = wait_alert(agent, "credential-harvesting", &jenkins_id, |_| true);
    assert_eq!(alert["job"]["platform"], "jenkins", "{alert:#}");
    assert_eq!(alert["job"]["repository"], "acme/app", "{alert:#}");
    assert_eq!(alert["job"]["runner"], "agent-3", "{alert:#}");

    let alert = wait_alert(agent, "credential-harvesting", &bk_job, |_| true);
    assert_eq!(alert["job"]["platform"], "buildkite", "{alert:#}");
    assert_eq!(alert["job"]["repository"], "widgets", "{alert:#}");
    assert_eq!(alert["job"]["run"], "77", "{alert:#}");

    // Named from the kernel's copy of the exec's environment, not from /proc.
    let log = agent_log(&agent.dir);
    assert!(
        !log.contains("stays unnamed"),
        "a job was left unnamed: {log}"
    );
    assert_no_secret(agent);
}

#[test]
fn azure_circleci_drone_and_woodpecker_jobs_are_found_and_named_by_their_environment() {
    let agent = agent();
    let env = TestEnv::new("job-env-more");
    let n = run_id(3);
    // (platform, the job's identity variables, the job id and repository the finding must name)
    type System<'a> = (&'a str, Vec<(&'a str, String)>, String, &'a str);
    let systems: [System; 4] = [
        (
            "azure",
            vec![
                ("TF_BUILD", "True".into()),
                ("SYSTEM_JOBID", format!("9b2c-{n}")),
                ("BUILD_REPOSITORY_NAME", "acme/azure-app".into()),
                ("BUILD_BUILDID", n.clone()),
                ("AGENT_NAME", "azure-agent-1".into()),
                ("SYSTEM_ACCESSTOKEN", CANARY.into()),
            ],
            format!("9b2c-{n}"),
            "acme/azure-app",
        ),
        (
            "circleci",
            vec![
                ("CIRCLECI", "true".into()),
                ("CIRCLE_WORKFLOW_JOB_ID", format!("c1rc-{n}")),
                ("CIRCLE_PROJECT_REPONAME", "circle-app".into()),
                ("CIRCLE_JOB", "build".into()),
                ("CIRCLE_WORKFLOW_ID", format!("wf-{n}")),
                ("CIRCLE_OIDC_TOKEN", CANARY.into()),
            ],
            format!("c1rc-{n}"),
            "circle-app",
        ),
        (
            "drone",
            vec![
                ("DRONE", "true".into()),
                ("DRONE_BUILD_NUMBER", n.clone()),
                ("DRONE_REPO", "acme/drone-app".into()),
                ("DRONE_STAGE_NAME", "default".into()),
                ("DRONE_STAGE_MACHINE", "drone-runner-2".into()),
                ("DRONE_NETRC_PASSWORD", CANARY.into()),
            ],
            format!("acme/drone-app/{n}/default"),
            "acme/drone-app",
        ),
        (
            "woodpecker",
            vec![
                // Woodpecker sets CI_* variables as GitLab does: its entry comes first.
                ("CI", "woodpecker".into()),
                ("CI_PIPELINE_NUMBER", n.clone()),
                ("CI_REPO", "acme/wood-app".into()),
                ("CI_WORKFLOW_NAME", "build".into()),
                ("CI_COMMIT_SHA", "0123abcd".into()),
                ("CI_NETRC_PASSWORD", CANARY.into()),
            ],
            format!("acme/wood-app/{n}/build"),
            "acme/wood-app",
        ),
    ];
    for (_, vars, _, _) in &systems {
        let mut command = job("/bin/sh", &env);
        command.arg("-c").arg(SWEEP);
        for (name, value) in vars {
            command.env(name, value);
        }
        run(secrets(&mut command));
    }
    for (platform, _, id, repository) in &systems {
        let alert = wait_alert(agent, "credential-harvesting", id, |_| true);
        assert_eq!(alert["job"]["platform"], *platform, "{alert:#}");
        assert_eq!(alert["job"]["repository"], *repository, "{alert:#}");
    }
    assert_no_secret(agent);
}

#[test]
fn a_job_whose_only_process_exits_at_once_is_still_named() {
    // The "unnamed job" case of /proc discovery: the stage is gone before its environment could
    // be read. Its identity comes with its exec.
    let agent = agent();
    let env = TestEnv::new("job-env-quick");
    let job_id = run_id(3);
    let mut stage = job("/bin/cat", &env);
    stage
        .arg(env.home.join(".aws/credentials"))
        .stdout(std::process::Stdio::null())
        .env("CI_JOB_ID", &job_id)
        .env("CI_PROJECT_PATH", "group/quick")
        .env("CI_JOB_NAME", "lint")
        .env("CI_PIPELINE_ID", "5");
    run(secrets(&mut stage));
    let events = agent.dir.join("events.jsonl");
    let mut start = None;
    wait_until("the quick job's job_start", 15, || {
        start = std::fs::read_to_string(&events)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|e| e["kind"] == "job_start" && e["id"] == job_id.as_str());
        start.is_some()
    });
    let start = start.unwrap();
    assert_eq!(start["platform"], "gitlab", "{start:#}");
    assert_eq!(start["repository"], "group/quick", "{start:#}");
    assert_eq!(start["workflow"], "lint", "{start:#}");
    // Its credential read is the named job's.
    let key = start["job"]["key"].clone();
    wait_until("the quick job's credential read", 15, || {
        std::fs::read_to_string(&events)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .any(|e| e["kind"] == "file_open" && e["job"]["key"] == key)
    });
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        alerts(agent).iter().all(|a| a["job"]["id"] != job_id.as_str()
            || a["rule"] != "cross-job-credential-reuse"),
        "{:#?}",
        alerts(agent)
    );
    assert_no_secret(agent);
}
