//! GitLab's docker executor with the agent following the runner's Docker socket: the job starts
//! at its first container's create, and a container with the runner's labels but no `CI_*`
//! variable (a service) is the job from its first instruction. The runner is emulated from the
//! test process (outside any job) through the Docker API, with its labels and the job's CI
//! variables (a canary `CI_JOB_TOKEN`).

use std::time::Duration;

use integration_tests::{
    TestEnv,
    docker::{Docker, IMAGE, api_gitlab_build, gitlab_container, read_three_kinds},
    live::{
        Agent, agent_dir, agent_log, alerts, assert_no_secret, free_port, github_job, json_lines,
        run_id, test_policy, wait_alert, wait_until,
    },
    output_of,
};

/// CLOCK_MONOTONIC, the clock of the agent's times.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The job's report over the control socket, as JSON.
fn report(agent: &Agent, id: &str) -> serde_json::Value {
    let out = output_of(
        std::process::Command::new(integration_tests::live::target_dir().join("runner-monitor"))
            .args(["report", "--job", id, "--format", "json"])
            .env("RUNNER_MONITOR_SOCKET", &agent.socket),
    );
    assert!(
        out.status.success(),
        "report failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the JSON report")
}

fn trace(agent: &Agent) -> Vec<serde_json::Value> {
    json_lines(&agent.dir.join("events.jsonl"))
}

/// An agent following `docker`'s events (its socket is a `docker` secret socket of the policy),
/// with a long stage gap: jobs end when their containers are removed.
fn agent_following(docker: &Docker, name: &str) -> Agent {
    let dir = agent_dir(name);
    std::fs::write(
        dir.join("policy.toml"),
        format!(
            "{}\n[[secret_sockets]]\nkind = \"docker\"\npaths = [\"{}\"]\n",
            test_policy().replace("stage_gap_seconds = 1", "stage_gap_seconds = 300"),
            docker.socket.display()
        ),
    )
    .unwrap();
    let agent = Agent::launch(&dir, free_port(), &[]);
    wait_until("the agent follows the daemon's events", 10, || {
        agent_log(&dir).contains("following Docker's events")
    });
    agent
}

#[test]
fn a_gitlab_job_starts_at_its_first_create_and_its_labelled_service_without_ci_variables_is_it() {
    let docker = Docker::start("gitlabcreate");
    let agent = agent_following(&docker, "containers-gitlabcreate");
    let dir = agent.dir.clone();
    let env = TestEnv::new("containers-gitlabcreate");
    let job_id = run_id(28);
    let service = format!("rm-svc-{job_id}");
    let build = format!("rm-build-{job_id}");

    // The service first, as the runner makes it: labels, no CI variable; it reads credentials
    // at once (its first instructions) and lives on.
    let before_create = monotonic_ns();
    gitlab_container(
        &docker,
        &env,
        &job_id,
        "service",
        &service,
        false,
        &format!("{} > /dev/null; sleep 60", read_three_kinds("/builds/h")),
    );
    let after_create = monotonic_ns();
    docker.run(&["start", &service]);
    let harvest = wait_alert(&agent, "credential-harvesting", &job_id, |_| true);
    assert_eq!(harvest["job"]["platform"], "gitlab", "{harvest}");
    // The project's id from the runner's label: the service's environment has no path.
    assert_eq!(harvest["job"]["repository"], "42", "{harvest}");
    assert_eq!(harvest["job"]["run"], "77", "{harvest}");
    assert_eq!(harvest["container"]["name"], service.as_str(), "{harvest}");
    assert_eq!(
        harvest["container"]["labels"]["com.gitlab.gitlab-runner.type"], "service",
        "{harvest}"
    );
    assert!(
        harvest["process"]["cmdline"]
            .as_str()
            .is_some_and(|c| c.starts_with("cat /builds/h/")),
        "{harvest}"
    );
    let key = harvest["job"]["key"].clone();

    // The job started at the service's create: before the create returned, not at an exec.
    let started = report(&agent, &job_id);
    let start = started["start_ns"].as_u64().expect("the report's start");
    assert!(
        (before_create..=after_create).contains(&start),
        "start {start} not within the create [{before_create}, {after_create}]"
    );
    assert_eq!(started["key"], key, "{started}");

    // The build container, with the job's CI variables: the same job, now named by its path.
    // Made and started over the API at once, as the runner does: the tightest race there is
    // between the agent's registration and the cgroup's creation.
    let build_sent = monotonic_ns();
    let build_id = api_gitlab_build(
        &docker,
        &env,
        &job_id,
        &build,
        "cat /builds/h/.ssh/id_ed25519 > /dev/null",
    );
    // The build's read, told from the service's reads of the same file by its cgroup. Its path
    // as the build gave it: `path` is the host's file only when the agent read the container's
    // mount table in time (`mounts.rs`), which a `cat` already gone does not allow.
    let mut build_made = None;
    wait_until("the build's container event", 10, || {
        build_made = trace(&agent)
            .into_iter()
            .find(|e| e["kind"] == "container" && e["id"] == build_id.as_str());
        build_made.is_some()
    });
    let build_made = build_made.expect("waited for");
    // Its cgroup is the job's.
    assert_eq!(build_made["job"]["key"], key, "{build_made}");
    let build_cgroup = build_made["cgroup_id"].as_u64();
    wait_until("the build's read, in the job", 10, || {
        trace(&agent).iter().any(|e| {
            e["kind"] == "file_open"
                && e["process"]["cgroup_id"].as_u64() == build_cgroup
                && e["raw_path"] == "/builds/h/.ssh/id_ed25519"
                && e["job"]["key"] == key
        })
    });
    let named = report(&agent, &job_id);
    assert_eq!(named["key"], key, "one job: {named}");
    assert_eq!(named["job"]["repository"], "group/with-service", "{named}");
    assert_eq!(named["start_ns"].as_u64(), Some(start), "{named}");
    // Every start of the job is the one job's.
    let starts: Vec<_> = trace(&agent)
        .into_iter()
        .filter(|e| e["kind"] == "job_start" && e["id"] == job_id.as_str())
        .collect();
    assert!(!starts.is_empty());
    for s in &starts {
        assert_eq!(s["job"]["key"], key, "a second job for {job_id}: {s}");
    }

    // The margin: the create, the agent's registration, the cgroup's creation (the service's
    // `docker start` came from a new CLI process, as the runner's start request would).
    let made = trace(&agent)
        .into_iter()
        .find(|e| e["kind"] == "container" && e["name"] == service.as_str())
        .expect("the service's container event");
    let log = agent_log(&dir);
    let registered: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("GitLab container registered") && l.contains(job_id.as_str()))
        .collect();
    eprintln!(
        "service: cgroup made {} us after its create; build: cgroup made {} us after its \
         create request was sent; agent: {registered:#?}",
        made["time_ns"].as_u64().unwrap_or(0).saturating_sub(start) / 1000,
        build_made["time_ns"]
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(build_sent)
            / 1000,
    );

    // The runner removes both: the job ends then, and nothing of it survives.
    docker.run(&["rm", "-f", &service, &build]);
    wait_until("the job's end once its containers are removed", 10, || {
        trace(&agent)
            .iter()
            .any(|e| e["kind"] == "job_end" && e["job"]["key"] == key)
    });
    std::thread::sleep(Duration::from_secs(3));
    let after: Vec<_> = alerts(&agent)
        .into_iter()
        .filter(|a| {
            (a["rule"] == "process-survived-job" || a["rule"] == "credential-after-job-end")
                && a["job"]["id"] == job_id
        })
        .collect();
    assert!(after.is_empty(), "after the end: {after:#?}");
    assert_no_secret(&agent);
    drop(docker);
    assert!(agent.stop().success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A job's own container that claims to be a GitLab job's (the runner's labels, another job
/// id): the job asked for its start, so its processes are the job's, not the claimed job's.
#[test]
fn a_jobs_container_with_gitlab_labels_stays_the_jobs() {
    let docker = Docker::start("gitlabclaim");
    let agent = agent_following(&docker, "containers-gitlabclaim");
    let env = TestEnv::new("containers-gitlabclaim");
    let run = run_id(29);
    let claimed = run_id(30);
    let cli = docker.shell_cli();
    let step = format!(
        "cid=$({cli} create --network none -v {home}:/h \\
         --label com.gitlab.gitlab-runner.job.id={claimed} \\
         --label com.gitlab.gitlab-runner.project.id=42 {IMAGE} sh -c '{read} > /dev/null')\n\
         {cli} start -a $cid\n{cli} rm $cid > /dev/null",
        home = env.home.display(),
        read = read_three_kinds("/h"),
    );
    github_job(&env, &agent, &run, "acme/claims", &step);
    let id = format!("{run}/build");
    let harvest = wait_alert(&agent, "credential-harvesting", &id, |_| true);
    assert_eq!(harvest["job"]["repository"], "acme/claims", "{harvest}");
    assert_eq!(
        harvest["container"]["labels"]["com.gitlab.gitlab-runner.job.id"],
        claimed.as_str(),
        "{harvest}"
    );
    std::thread::sleep(Duration::from_secs(2));
    let claimed_findings: Vec<_> = alerts(&agent)
        .into_iter()
        .filter(|a| a["job"]["id"] == claimed.as_str())
        .collect();
    assert!(claimed_findings.is_empty(), "{claimed_findings:#?}");
    assert_no_secret(&agent);
    let dir = agent.dir.clone();
    drop(docker);
    assert!(agent.stop().success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A labelled container that was running before the agent followed the daemon (an agent
/// started, or restarted without its pins, during the job): the agent maps its cgroup and takes
/// in its processes when it subscribes, so what it does from then on is the job's.
#[test]
fn a_running_gitlab_container_is_adopted_when_the_agent_subscribes() {
    let docker = Docker::start("gitlabadopt");
    let env = TestEnv::new("containers-gitlabadopt");
    let job_id = run_id(31);
    let service = format!("rm-svc-{job_id}");
    // It waits for the test's go-ahead, then reads credentials (no CI variable: labels only).
    gitlab_container(
        &docker,
        &env,
        &job_id,
        "service",
        &service,
        false,
        &format!(
            "until [ -e /builds/h/go-{job_id} ]; do sleep 0.1; done; {} > /dev/null; sleep 60",
            read_three_kinds("/builds/h")
        ),
    );
    docker.run(&["start", &service]);
    let agent = agent_following(&docker, "containers-gitlabadopt");
    wait_until("the running service adopted", 10, || {
        agent_log(&agent.dir).contains("container adopted into its job")
    });
    let go = env.home.join(format!("go-{job_id}"));
    std::fs::write(&go, "").unwrap();
    let harvest = wait_alert(&agent, "credential-harvesting", &job_id, |_| true);
    let _ = std::fs::remove_file(&go);
    assert_eq!(harvest["job"]["repository"], "42", "{harvest}");
    assert!(
        harvest["process"]["cmdline"]
            .as_str()
            .is_some_and(|c| c.starts_with("cat /builds/h/")),
        "{harvest}"
    );
    assert_eq!(harvest["container"]["name"], service.as_str(), "{harvest}");
    docker.run(&["rm", "-f", &service]);
    assert_no_secret(&agent);
    let dir = agent.dir.clone();
    drop(docker);
    assert!(agent.stop().success());
    let _ = std::fs::remove_dir_all(&dir);
}
