//! Simulated CI jobs through the real agent binary: a fake `Runner.Worker` running GitHub-style
//! steps with the runner's hooks, and GitLab-style shell jobs with and without their hooks.
//! The agent's alert stream (and a real Prometheus and Alertmanager) must hold the expected
//! findings, and no output may hold a secret.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{
    CANARY, NetNs, TestEnv, job_step,
    live::{
        agent, alertmanager_has, alerts, assert_no_secret, curl, free_port, github_job,
        job_command, repo_root, run_id, start_alertmanager, target_dir, wait_alert, wait_until,
    },
    output_of, spawn_with_parent_death,
};
use serde_json::Value;

#[test]
fn github_survivor_reading_a_credential_after_the_job_ended() {
    let agent = agent();
    let env = TestEnv::new("live-survivor");
    let run = run_id(1);
    github_job(
        &env,
        agent,
        &run,
        "acme/app",
        "(setsid sh -c 'sleep 1; cat \"$HOME/.aws/credentials\" > /dev/null; sleep 4' &)",
    );
    let id = format!("{run}/build");
    let after = wait_alert(agent, "credential-after-job-end", &id, |_| true);
    assert_eq!(after["severity"], "critical");
    assert_eq!(after["credential"]["kind"], "aws");
    assert_eq!(after["job"]["repository"], "acme/app");
    assert_eq!(after["job"]["platform"], "github");
    assert!(after["time"].as_str().unwrap().ends_with('Z'));
    // The setsid'd shell was re-parented when its parent subshell exited; its `sleep` child
    // inherits the setsid escape.
    let survivor = wait_alert(agent, "process-survived-job", &id, |a| {
        a["escape"]
            .as_array()
            .is_some_and(|e| e.iter().any(|v| v == "re-parented"))
    });
    let escape: Vec<&str> = survivor["escape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(escape.contains(&"re-parented"), "{survivor}");
    assert!(escape.contains(&"setsid"), "{survivor}");
    assert_no_secret(agent);
}

#[test]
fn credential_written_by_one_repository_and_read_by_another() {
    let agent = agent();
    let env = TestEnv::new("live-reuse");
    let (first, second) = (run_id(2), run_id(3));
    github_job(
        &env,
        agent,
        &first,
        "acme/release",
        "printf '{\"auths\":{}}' > \"$HOME/.docker/config.json\"",
    );
    wait_alert(
        agent,
        "credential-left-behind",
        &format!("{first}/build"),
        |_| true,
    );
    github_job(
        &env,
        agent,
        &second,
        "someone/fork",
        "cat \"$HOME/.docker/config.json\" > /dev/null",
    );
    let reuse = wait_alert(
        agent,
        "cross-job-credential-reuse",
        &format!("{second}/build"),
        |_| true,
    );
    assert_eq!(reuse["severity"], "critical");
    assert_eq!(reuse["origin_job"]["repository"], "acme/release");
    assert_eq!(reuse["credential"]["path"], env.path(".docker/config.json"));
    assert_no_secret(agent);
}

#[test]
fn egress_to_a_namespace_host_outside_the_allowlist() {
    let agent = agent();
    let env = TestEnv::new("live-egress");
    let ns = NetNs::new(9);
    let mut server = ns.spawn(&job_step(), &["listen", &format!("{}:7070", ns.ns_ip)]);
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.take().unwrap()),
        &mut ready,
    )
    .unwrap();
    let run = run_id(4);
    github_job(
        &env,
        agent,
        &run,
        "acme/app",
        &format!("\"$JOB_STEP\" connect-tcp {}:7070", ns.ns_ip),
    );
    let egress = wait_alert(agent, "unexpected-egress", &format!("{run}/build"), |_| {
        true
    });
    assert_eq!(egress["destination"]["ip"], ns.ns_ip);
    assert_eq!(egress["destination"]["port"], 7070);
    let _ = server.wait();
}

#[test]
fn a_step_reading_the_runner_worker_environment() {
    let agent = agent();
    let env = TestEnv::new("live-memory");
    let run = run_id(5);
    // $PPID of the step shell is the Runner.Worker, which holds the job's secrets.
    github_job(
        &env,
        agent,
        &run,
        "acme/app",
        "sh -c 'cat /proc/$PPID/environ > /dev/null'",
    );
    let id = format!("{run}/build");
    let alert = wait_alert(agent, "process-memory-access", &id, |_| true);
    assert_eq!(alert["severity"], "critical");
    assert!(
        alert["target"]["access"]
            .as_str()
            .unwrap()
            .ends_with("/environ"),
        "{alert}"
    );
    assert!(
        alert["target"]["exe"]
            .as_str()
            .unwrap_or("")
            .ends_with("Runner.Worker"),
        "the target is named: {alert}"
    );
    assert_no_secret(agent);
}

#[test]
fn gitlab_shell_job_with_pre_and_post_build_scripts() {
    let agent = agent();
    let env = TestEnv::new("live-gitlab");
    // A secret socket the policy knows (**/.docker/run/docker.sock), served by the test.
    let sock_dir = env.home.join(".docker/run");
    std::fs::create_dir_all(&sock_dir).unwrap();
    let sock = sock_dir.join("docker.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let job_id = run_id(6);
    let hooks = repo_root().join("hooks/gitlab");
    let script = format!(
        ". {pre}\n\"$JOB_STEP\" connect-unix {sock}\n. {post}\n",
        pre = hooks.join("pre-build.sh").display(),
        post = hooks.join("post-build.sh").display(),
        sock = sock.display()
    );
    let out = job_command(std::path::Path::new("bash"), &env, agent)
        .arg("-c")
        .arg(script)
        .env("CI_JOB_ID", &job_id)
        .env("CI_PROJECT_PATH", "group/project")
        .env("CI_JOB_NAME", "test")
        .env("CI_PIPELINE_ID", "77")
        .env("CI_JOB_TOKEN", CANARY)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let alert = wait_alert(agent, "secret-socket-access", &job_id, |_| true);
    assert_eq!(alert["job"]["platform"], "gitlab");
    assert_eq!(alert["job"]["repository"], "group/project");
    assert_eq!(alert["socket"]["kind"], "docker");
    assert_no_secret(agent);
}

#[test]
fn control_socket_refuses_to_end_a_job_that_does_not_exist_and_malformed_input() {
    let agent = agent();
    let out = Command::new(target_dir().join("runner-monitor"))
        .args(["job", "end", "--id", "no-such-job"])
        .env("RUNNER_MONITOR_SOCKET", &agent.socket)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no job"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(target_dir().join("runner-monitor"))
        .args(["job", "start", "--id", "x", "--pid", "999999999"])
        .env("RUNNER_MONITOR_SOCKET", &agent.socket)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such process"));
}

/// The value of one series of the agent's /metrics.
fn metric(agent: &integration_tests::live::Agent, series: &str) -> u64 {
    let text = curl(&format!("http://{}/metrics", agent.http));
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        .parse()
        .unwrap()
}

#[test]
fn control_socket_refuses_replayed_and_cross_job_requests_and_counts_them() {
    let agent = agent();
    let client = |args: &[&str]| {
        Command::new(target_dir().join("runner-monitor"))
            .arg("job")
            .args(args)
            .env("RUNNER_MONITOR_SOCKET", &agent.socket)
            .output()
            .unwrap()
    };
    let refused = |out: std::process::Output, why: &str| {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(why),
            "{why}: {stderr}"
        );
    };
    let sleeper =
        || spawn_with_parent_death(Command::new("sleep").arg("30"), libc::SIGKILL).unwrap();
    let job_a = format!("replay-a-{}", std::process::id());
    let job_b = format!("replay-b-{}", std::process::id());
    let mut root_a = sleeper();
    let start_a = ["start", "--id", &job_a, "--pid", &root_a.id().to_string()];
    assert!(client(&start_a).status.success());
    // The same start again, and the same id for another process.
    refused(client(&start_a), "already started as");
    let mut other = sleeper();
    refused(
        client(&["start", "--id", &job_a, "--pid", &other.id().to_string()]),
        "already in use",
    );
    // A process of job B tries to end job A.
    let mut root_b = Command::new("sh")
        .arg("-c")
        .arg(format!("read _go; runner-monitor job end --id {job_a}"))
        .env("PATH", format!("{}:/usr/bin:/bin", target_dir().display()))
        .env("RUNNER_MONITOR_SOCKET", &agent.socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        client(&["start", "--id", &job_b, "--pid", &root_b.id().to_string()])
            .status
            .success()
    );
    std::io::Write::write_all(&mut root_b.stdin.take().unwrap(), b"go\n").unwrap();
    refused(root_b.wait_with_output().unwrap(), "cannot end another job");
    // A ends once.
    assert!(client(&["end", "--id", &job_a]).status.success());
    refused(client(&["end", "--id", &job_a]), "already ended");
    for p in [&mut root_a, &mut other] {
        let _ = p.kill();
        let _ = p.wait();
    }
    // No other test replays or crosses jobs: the counts are exactly this test's.
    let series = |request: &str, result: &str| {
        format!(
            "runner_monitor_control_requests_total{{request=\"{request}\",result=\"{result}\"}}"
        )
    };
    assert_eq!(metric(agent, &series("job_start", "replayed")), 2);
    assert_eq!(metric(agent, &series("job_end", "replayed")), 1);
    assert_eq!(metric(agent, &series("job_end", "cross_job")), 1);
    assert!(metric(agent, &series("job_start", "ok")) >= 2);
    assert!(metric(agent, &series("job_end", "ok")) >= 1);
}

#[test]
fn a_token_copied_outside_any_job_is_recognised_by_its_fingerprint() {
    let agent = agent();
    let env = TestEnv::new("live-fingerprint");
    let (first, second) = (run_id(7), run_id(8));
    // The writer is a child that exits: the agent hashes what it wrote.
    github_job(
        &env,
        agent,
        &first,
        "acme/release",
        "sh -c 'printf %s \"$TOKEN\" > \"$HOME/.npmrc\"'",
    );
    wait_alert(
        agent,
        "credential-left-behind",
        &format!("{first}/build"),
        |_| true,
    );
    // Copied by someone outside any job, to a path no job wrote.
    let loot = env.dir.join("loot");
    std::fs::create_dir_all(&loot).unwrap();
    std::fs::copy(env.home.join(".npmrc"), loot.join(".npmrc")).unwrap();
    github_job(
        &env,
        agent,
        &second,
        "someone/fork",
        &format!("cat {}/.npmrc > /dev/null", loot.display()),
    );
    let reuse = wait_alert(
        agent,
        "cross-job-credential-reuse",
        &format!("{second}/build"),
        |_| true,
    );
    assert_eq!(
        reuse["credential"]["path"],
        format!("{}/.npmrc", loot.display())
    );
    assert!(
        reuse["credential"]["fingerprint"]
            .as_str()
            .unwrap()
            .starts_with("hmac-sha256:"),
        "{reuse}"
    );
    assert_eq!(reuse["origin_job"]["repository"], "acme/release");
    assert_no_secret(agent);
}

#[test]
fn a_survivor_that_changed_runner_tracking_id_is_named_so() {
    let agent = agent();
    let env = TestEnv::new("live-tracking");
    let run = run_id(9);
    github_job(
        &env,
        agent,
        &run,
        "acme/app",
        "(setsid env RUNNER_TRACKING_ID=0 sh -c 'sleep 5' &)",
    );
    let survivor = wait_alert(
        agent,
        "process-survived-job",
        &format!("{run}/build"),
        |a| {
            a["escape"]
                .as_array()
                .is_some_and(|e| e.iter().any(|v| v == "RUNNER_TRACKING_ID changed"))
        },
    );
    assert!(
        survivor["summary"]
            .as_str()
            .unwrap()
            .contains("RUNNER_TRACKING_ID"),
        "{survivor}"
    );
    assert_no_secret(agent);
}

#[test]
fn gitlab_runner_stages_are_found_and_joined_without_hooks() {
    let agent = agent();
    let env = TestEnv::new("live-gitlab-stages");
    // GitLab Runner's shell executor runs each stage as a child shell of `gitlab-runner`.
    let runner = env.dir.join("gitlab-runner");
    std::fs::copy("/bin/sh", &runner).unwrap();
    let job_id = run_id(10);
    let out = output_of(
        Command::new(&runner)
            .arg("-c")
            .arg(concat!(
                // A stage lives as long as its script; this one is a few hundred milliseconds, so
                // the agent reads its identity from /proc even when the machine is busy.
                "bash -c 'printf %s \"$TOKEN\" > \"$HOME/.npmrc\"; sleep 0.3'\n",
                "bash -c 'sleep 0.3; cat \"$HOME/.npmrc\" > /dev/null; ",
                "(setsid sh -c \"sleep 2; cat $HOME/.aws/credentials > /dev/null; sleep 4\" &)'\n",
            ))
            .env("HOME", &env.home)
            .env("TOKEN", CANARY)
            .env("CI_JOB_ID", &job_id)
            .env("CI_PROJECT_PATH", "group/staged")
            .env("CI_JOB_NAME", "build")
            .env("CI_PIPELINE_ID", "88")
            .env("CI_JOB_TOKEN", CANARY),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The second stage reading what the first wrote is the same job: no reuse. The job ends
    // after its last stage: the credential is left behind, the survivor's read is after the end.
    let after = wait_alert(agent, "credential-after-job-end", &job_id, |_| true);
    assert_eq!(after["job"]["platform"], "gitlab");
    assert_eq!(after["job"]["repository"], "group/staged");
    wait_alert(agent, "credential-left-behind", &job_id, |_| true);
    wait_alert(agent, "process-survived-job", &job_id, |_| true);
    let reuse: Vec<Value> = alerts(agent)
        .into_iter()
        .filter(|a| a["rule"] == "cross-job-credential-reuse" && a["job"]["id"] == job_id.as_str())
        .collect();
    assert!(
        reuse.is_empty(),
        "stages of one job are not reuse: {reuse:#?}"
    );
    assert_no_secret(agent);
}

#[test]
fn a_real_prometheus_scrapes_the_finding_counter_a_job_raised() {
    let agent = agent();
    assert_eq!(
        curl(&format!("http://{}/readyz", agent.http)).trim(),
        "ready"
    );
    let dir = agent.dir.join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: runner-monitor\n    static_configs:\n      - targets: ['{}']\n",
            agent.http
        ),
    )
    .unwrap();
    let mut command = Command::new("prometheus");
    command
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap());
    let mut prometheus = spawn_with_parent_death(&mut command, libc::SIGKILL)
        .expect("starting prometheus (Debian package)");

    // The only job in this test binary that touches three kinds of credentials.
    let env = TestEnv::new("live-prometheus");
    let run = run_id(11);
    github_job(
        &env,
        agent,
        &run,
        "acme/app",
        "cat $HOME/.aws/credentials $HOME/.git-credentials $HOME/.ssh/id_ed25519 > /dev/null",
    );
    wait_alert(
        agent,
        "credential-harvesting",
        &format!("{run}/build"),
        |_| true,
    );

    let query = format!(
        "http://127.0.0.1:{port}/api/v1/query?query=sum(runner_monitor_findings_total%7Brule%3D%22credential-harvesting%22%7D)"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let value = loop {
        let answer = curl(&query);
        if let Ok(v) = serde_json::from_str::<Value>(&answer)
            && let Some(value) = v["data"]["result"][0]["value"][1].as_str()
            && value != "0"
        {
            break value.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "prometheus never saw the finding: {answer}\n{}",
            std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(value, "1");
    let _ = prometheus.kill();
    let _ = prometheus.wait();
}

#[test]
fn alerts_reach_a_real_alertmanager_through_an_outage() {
    let agent = agent();
    let port = agent.alertmanager_port;
    let dir = agent.dir.join("alertmanager");
    let env = TestEnv::new("live-alertmanager");
    let runner_dir = env.dir.join("actions-runner");
    std::fs::create_dir_all(&runner_dir).unwrap();
    std::fs::write(runner_dir.join(".credentials_rsaparams"), "{}").unwrap();
    let read = format!(
        "cat {}/.credentials_rsaparams > /dev/null",
        runner_dir.display()
    );

    let mut alertmanager = start_alertmanager(&dir, port);
    let before = run_id(12);
    github_job(&env, agent, &before, "acme/app", &read);
    let before_id = format!("{before}/build");
    wait_until("the first alert in Alertmanager", 30, || {
        alertmanager_has(port, &before_id)
    });

    // Outage: the receiver is gone while the next finding is raised.
    alertmanager.kill().unwrap();
    alertmanager.wait().unwrap();
    let during = run_id(13);
    github_job(&env, agent, &during, "acme/app", &read);
    let during_id = format!("{during}/build");
    wait_alert(agent, "runner-credential-access", &during_id, |_| true);
    wait_until("a counted delivery failure", 30, || {
        curl(&format!("http://{}/metrics", agent.http))
            .lines()
            .any(|l| {
                // Alertmanager is down: refused connections.
                l.starts_with(
                    "runner_monitor_alert_delivery_failures_total{reason=\"connect\",sink=\"alertmanager\"}",
                ) && !l.ends_with(" 0")
            })
    });
    assert!(
        std::fs::metadata(agent.dir.join("spool/alertmanager.jsonl"))
            .unwrap()
            .len()
            > 0,
        "the undelivered alert waits in the spool"
    );

    // The receiver returns (empty: a restarted Alertmanager keeps no alerts) and gets it.
    let mut alertmanager = start_alertmanager(&dir, port);
    wait_until("the alert raised during the outage", 90, || {
        alertmanager_has(port, &during_id)
    });
    let _ = alertmanager.kill();
    let _ = alertmanager.wait();
    assert_no_secret(agent);
}
