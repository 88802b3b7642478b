//! Simulated CI jobs through the real agent binary: a fake `Runner.Worker` running GitHub-style
//! steps with the runner's hooks, and a GitLab-style shell job with its pre/post build scripts.
//! The agent's alert stream must hold the expected findings, and no output may hold a secret.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use integration_tests::{CANARY, NetNs, TestEnv, job_step, output_of};
use serde_json::Value;

struct Agent {
    dir: PathBuf,
    socket: PathBuf,
    /// Where the agent serves /metrics.
    http: String,
    /// The Alertmanager port the agent delivers to (nothing listens until a test starts one).
    alertmanager_port: u16,
    _child: Child,
}

static AGENT: OnceLock<Agent> = OnceLock::new();

fn target_dir() -> PathBuf {
    job_step().parent().unwrap().to_path_buf()
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// One agent for this test binary, with a short grace period so survivors show quickly.
fn agent() -> &'static Agent {
    AGENT.get_or_init(|| {
        let binary = target_dir().join("runner-monitor");
        assert!(
            binary.exists(),
            "{} is missing: `cargo build -p runner-monitor` first",
            binary.display()
        );
        let dir = std::env::temp_dir().join(format!("rm-live-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let policy = dir.join("policy.toml");
        std::fs::write(
            &policy,
            runner_monitor::policy::DEFAULT_POLICY
                .replace("grace_period_seconds = 30", "grace_period_seconds = 2")
                .replace("stage_gap_seconds = 10", "stage_gap_seconds = 1"),
        )
        .unwrap();
        let socket = dir.join("control.sock");
        let alertmanager_port = free_port();
        let key = dir.join("fingerprint.key");
        std::fs::write(&key, [0x5a; 32]).unwrap();
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let log = std::fs::File::create(dir.join("agent.log")).unwrap();
        let mut command = Command::new(&binary);
        command
            .args(["run", "--status-interval", "2", "--policy"])
            .arg(&policy)
            .arg("--alerts-out")
            .arg(dir.join("alerts.jsonl"))
            .arg("--events-out")
            .arg(dir.join("events.jsonl"))
            .arg("--control-socket")
            .arg(&socket)
            .arg("--fingerprint-key")
            .arg(&key)
            .args(["--listen", "127.0.0.1:0"])
            .arg("--alertmanager")
            .arg(format!("http://127.0.0.1:{alertmanager_port}"))
            .arg("--spool-dir")
            .arg(dir.join("spool"))
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: prctl in the forked child before exec, async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                // The agent dies with the thread that started it, which lives as long as this
                // test binary (below): no agent is left running after the tests.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let child = command.spawn().expect("starting the agent");
            tx.send(child).unwrap();
            loop {
                std::thread::park();
            }
        });
        let child = rx.recv().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !std::fs::read_to_string(dir.join("agent.log"))
            .unwrap_or_default()
            .contains("control socket ready")
        {
            assert!(
                Instant::now() < deadline,
                "the agent did not start: {}",
                agent_log(&dir)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let log = agent_log(&dir);
        let http = log
            .split("address=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .expect("the agent logs its HTTP address")
            .trim_matches(|c: char| !c.is_ascii_digit() && c != '.' && c != ':')
            .to_owned();
        Agent {
            dir,
            socket,
            http,
            alertmanager_port,
            _child: child,
        }
    })
}

fn agent_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
}

fn alerts(agent: &Agent) -> Vec<Value> {
    std::fs::read_to_string(agent.dir.join("alerts.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("an alert is one JSON object"))
        .collect()
}

/// Waits for an alert of `rule` for the job whose id is `job_id`.
fn wait_alert(agent: &Agent, rule: &str, job_id: &str, extra: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(a) = alerts(agent)
            .into_iter()
            .find(|a| a["rule"] == rule && a["job"]["id"] == job_id && extra(a))
        {
            return a;
        }
        assert!(
            Instant::now() < deadline,
            "no {rule} alert for job {job_id}; alerts: {:#?}\nlog: {}",
            alerts(agent),
            agent_log(&agent.dir)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs a GitHub-style job: a `Runner.Worker` that runs the job-started hook, then `steps`, then
/// the job-completed hook.
fn github_job(env: &TestEnv, agent: &Agent, run_id: &str, repository: &str, steps: &str) {
    let worker = env.dir.join("Runner.Worker");
    std::fs::copy("/bin/sh", &worker).unwrap();
    let hooks = repo_root().join("hooks/github");
    let script = format!(
        "sh {started}\n{steps}\nsh {completed}\n",
        started = hooks.join("job-started.sh").display(),
        completed = hooks.join("job-completed.sh").display(),
    );
    let out = output_of(
        Command::new(&worker)
            .arg("-c")
            .arg(script)
            .env("HOME", &env.home)
            .env("PATH", format!("{}:/usr/bin:/bin", target_dir().display()))
            .env("RUNNER_MONITOR_SOCKET", &agent.socket)
            .env("JOB_STEP", job_step())
            .env("GITHUB_RUN_ID", run_id)
            .env("GITHUB_JOB", "build")
            .env("GITHUB_REPOSITORY", repository)
            .env("GITHUB_WORKFLOW", "CI")
            .env("RUNNER_NAME", "runner-test")
            .env("GITHUB_TOKEN", CANARY)
            .env("TOKEN", CANARY)
            .env("RUNNER_TRACKING_ID", format!("github_{run_id}")),
    );
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "job failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// No output of the agent (alerts, event trace, log) carries the canary secret planted in the
/// credential files and in the jobs' environment (`GITHUB_TOKEN`, `CI_JOB_TOKEN`).
fn assert_no_secret(agent: &Agent) {
    for file in ["alerts.jsonl", "events.jsonl", "agent.log"] {
        let text = std::fs::read_to_string(agent.dir.join(file)).unwrap_or_default();
        assert!(!text.is_empty(), "{file} is empty");
        assert!(!text.contains(CANARY), "the canary leaked into {file}");
    }
}

fn run_id(tag: u32) -> String {
    format!("{}{tag:02}", std::process::id())
}

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
    let out = Command::new("bash")
        .arg("-c")
        .arg(script)
        .env("HOME", &env.home)
        .env("PATH", format!("{}:/usr/bin:/bin", target_dir().display()))
        .env("RUNNER_MONITOR_SOCKET", &agent.socket)
        .env("JOB_STEP", job_step())
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
                "bash -c 'cat \"$HOME/.npmrc\" > /dev/null; ",
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

/// A free loopback port (bound and released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn curl(url: &str) -> String {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "5", url])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
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
    // SAFETY: prctl in the forked child before exec: Prometheus dies with this test's thread.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut prometheus = command
        .spawn()
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

/// Starts a real Alertmanager (Debian package) on `port`, dying with this test's thread.
fn start_alertmanager(dir: &Path, port: u16) -> Child {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("alertmanager.yml"),
        "route:\n  receiver: soc\nreceivers:\n  - name: soc\n",
    )
    .unwrap();
    let mut command = Command::new("prometheus-alertmanager");
    command
        .arg(format!(
            "--config.file={}",
            dir.join("alertmanager.yml").display()
        ))
        .arg(format!("--storage.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--cluster.listen-address=")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("alertmanager.log")).unwrap());
    // SAFETY: prctl in the forked child before exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let child = command
        .spawn()
        .expect("starting prometheus-alertmanager (Debian package)");
    let deadline = Instant::now() + Duration::from_secs(20);
    while curl(&format!("http://127.0.0.1:{port}/-/ready")).trim() != "OK" {
        assert!(Instant::now() < deadline, "alertmanager did not start");
        std::thread::sleep(Duration::from_millis(200));
    }
    child
}

/// The alerts Alertmanager holds for a job id.
fn alertmanager_has(port: u16, job_id: &str) -> bool {
    let answer = curl(&format!("http://127.0.0.1:{port}/api/v2/alerts"));
    serde_json::from_str::<Value>(&answer)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .any(|a| {
            a["labels"]["job_id"] == job_id && a["labels"]["alertname"] == "RunnerMonitorFinding"
        })
}

fn wait_until(what: &str, seconds: u64, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
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
                l.starts_with("runner_monitor_alert_delivery_failures_total{sink=\"alertmanager\"}")
                    && !l.ends_with(" 0")
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
