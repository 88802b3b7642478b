//! The live tests' machinery: one real agent binary per test binary, simulated CI jobs, and the
//! real Prometheus and Alertmanager the tests start.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{CANARY, TestEnv, job_step, output_of};

pub struct Agent {
    pub dir: PathBuf,
    pub socket: PathBuf,
    /// Where the agent serves /metrics.
    pub http: String,
    /// The Alertmanager port the agent delivers to (nothing listens until a test starts one).
    pub alertmanager_port: u16,
    child: Child,
}

impl Agent {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts the agent on `dir` (keeping what an earlier agent left there: a restart; its
    /// pinned maps in `pin_dir_of(dir)`), delivering to Alertmanager on `alertmanager_port`, plus
    /// `extra` arguments; waits until it is ready. The agent gets SIGTERM when the calling thread
    /// ends.
    pub fn launch(dir: &Path, alertmanager_port: u16, extra: &[&str]) -> Agent {
        std::fs::create_dir_all(dir).unwrap();
        write_agent_files(dir);
        let mut command = agent_command(dir, &[]);
        command
            .arg("--alertmanager")
            .arg(format!("http://127.0.0.1:{alertmanager_port}"))
            .args(extra);
        let logged_before = agent_log(dir).len();
        let child = crate::spawn_with_parent_death(&mut command, libc::SIGTERM)
            .expect("starting the agent");
        let mut agent = wait_ready_after(dir, child, logged_before)
            .unwrap_or_else(|log| panic!("the agent did not start: {log}"));
        agent.alertmanager_port = alertmanager_port;
        agent
    }

    /// SIGTERM, and the agent's exit status once it stopped.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        self.child.wait().unwrap()
    }

    /// Sends `signal` to the agent.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// `signal` (SIGKILL: a crash; SIGUSR2: a hand-over), and the agent's exit status. Its
    /// probes stay attached, pinned: the next agent on the same directory takes them over, or
    /// removing the pin directory detaches them.
    pub fn end_with(mut self, signal: i32) -> std::process::ExitStatus {
        self.signal(signal);
        self.child.wait().unwrap()
    }
}

/// A test's own agent stops with it (the shared one is a static, never dropped: it dies with
/// the test binary, which sends it SIGTERM). SIGTERM: a killed agent would leave its probes
/// pinned and recording until its pin directory is removed.
impl Drop for Agent {
    fn drop(&mut self) {
        let took = crate::terminate(&mut self.child, Duration::from_secs(20));
        // A slow stop is a slow suite (and, for a user, a slow `systemctl stop`): say so.
        if took > Duration::from_secs(2) {
            eprintln!("the agent took {took:?} to stop after SIGTERM");
        }
    }
}

static AGENT: OnceLock<Agent> = OnceLock::new();

pub fn target_dir() -> PathBuf {
    job_step().parent().unwrap().to_path_buf()
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// One agent for this test binary, with a short grace period so survivors show quickly.
pub fn agent() -> &'static Agent {
    AGENT.get_or_init(|| {
        let dir = agent_dir("live");
        let alertmanager_port = free_port();
        let mut command = agent_command(&dir, &[]);
        command
            .arg("--alertmanager")
            .arg(format!("http://127.0.0.1:{alertmanager_port}"));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // The agent dies with this thread, which lives as long as the test binary.
            let child = crate::spawn_with_parent_death(&mut command, libc::SIGTERM)
                .expect("starting the agent");
            tx.send(child).unwrap();
            loop {
                std::thread::park();
            }
        });
        let mut agent = wait_ready(&dir, rx.recv().unwrap())
            .unwrap_or_else(|log| panic!("the agent did not start: {log}"));
        agent.alertmanager_port = alertmanager_port;
        agent
    })
}

/// A fresh directory for an agent's files: its policy (short grace period and stage gap), its
/// fingerprint key, and later its alerts, event trace, log, spool and control socket.
pub fn agent_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    write_agent_files(&dir);
    dir
}

/// The built-in policy with a short grace period and stage gap, so survivors show quickly.
pub fn test_policy() -> String {
    runner_monitor::policy::DEFAULT_POLICY
        .replace("grace_period_seconds = 30", "grace_period_seconds = 2")
        .replace("stage_gap_seconds = 10", "stage_gap_seconds = 1")
}

/// The test policy (unless the test wrote its own) and the fingerprint key.
fn write_agent_files(dir: &Path) {
    if !dir.join("policy.toml").exists() {
        std::fs::write(dir.join("policy.toml"), test_policy()).unwrap();
    }
    let key = dir.join("fingerprint.key");
    std::fs::write(&key, [0x5a; 32]).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
}

/// `runner-monitor run` with its files in `dir` (see `agent_dir`), started through `launcher`
/// (e.g. `setpriv ...`) when one is given; its log goes to `dir/agent.log`.
pub fn agent_command(dir: &Path, launcher: &[String]) -> Command {
    let binary = target_dir().join("runner-monitor");
    assert!(
        binary.exists(),
        "{} is missing: `cargo build -p runner-monitor` first",
        binary.display()
    );
    let mut command = match launcher.split_first() {
        Some((program, args)) => {
            let mut command = Command::new(program);
            command.args(args).arg(&binary);
            command
        }
        None => Command::new(&binary),
    };
    command
        .args(["run", "--status-interval", "2", "--policy"])
        .arg(dir.join("policy.toml"))
        .arg("--alerts-out")
        .arg(dir.join("alerts.jsonl"))
        .arg("--events-out")
        .arg(dir.join("events.jsonl"))
        .arg("--control-socket")
        .arg(dir.join("control.sock"))
        .arg("--fingerprint-key")
        .arg(dir.join("fingerprint.key"))
        .args(["--listen", "127.0.0.1:0"])
        .arg("--spool-dir")
        .arg(dir.join("spool"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--pin-dir")
        .arg(crate::pin_dir_of(dir))
        .stdout(Stdio::null())
        // Appended: a restarted agent adds to the log of the one before.
        .stderr(
            std::fs::File::options()
                .create(true)
                .append(true)
                .open(dir.join("agent.log"))
                .unwrap(),
        );
    command
}

/// Waits until the agent started from `agent_command(dir, ..)` has its control socket ready.
/// `Err` holds its log when it exits first or is not ready within 60 s.
pub fn wait_ready(dir: &Path, child: Child) -> Result<Agent, String> {
    wait_ready_after(dir, child, 0)
}

/// `wait_ready`, reading the log from byte `from` on (what this agent wrote, after the agents
/// before it on `dir`).
fn wait_ready_after(dir: &Path, mut child: Child, from: usize) -> Result<Agent, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let log = || agent_log(dir).get(from..).unwrap_or("").to_owned();
    while !log().contains("control socket ready") {
        let exited = child.try_wait().ok().flatten();
        if exited.is_some() || Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{exited:?}\n{}", log()));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = log();
    let http = log
        .split("address=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the agent logs its HTTP address")
        .trim_matches(|c: char| !c.is_ascii_digit() && c != '.' && c != ':')
        .to_owned();
    Ok(Agent {
        dir: dir.to_path_buf(),
        socket: dir.join("control.sock"),
        http,
        alertmanager_port: 0,
        child,
    })
}

pub fn agent_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default()
}

/// The complete lines of the JSON-lines file at `path` (none if it does not exist), each parsed.
/// The agent may be appending while this reads: a last line without its newline is still being
/// written and is left for the next read. A complete line that is not one JSON value fails.
pub fn json_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("a line of {} is not JSON ({e}): {l}", path.display()))
        })
        .collect()
}

pub fn alerts(agent: &Agent) -> Vec<Value> {
    json_lines(&agent.dir.join("alerts.jsonl"))
}

/// The alerts `runner-monitor replay` raises from the event trace the agent in `dir` recorded,
/// under that agent's policy.
pub fn replay_alerts(dir: &Path) -> Vec<Value> {
    let replayed = dir.join("replayed-alerts.jsonl");
    let _ = std::fs::remove_file(&replayed);
    let out = output_of(
        Command::new(target_dir().join("runner-monitor"))
            .arg("replay")
            .arg(dir.join("events.jsonl"))
            .arg("--policy")
            .arg(dir.join("policy.toml"))
            .arg("--alerts-out")
            .arg(&replayed),
    );
    assert!(
        out.status.success(),
        "replay: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    json_lines(&replayed)
}

/// Waits for an alert of `rule` for the job whose id is `job_id`.
pub fn wait_alert(
    agent: &Agent,
    rule: &str,
    job_id: &str,
    extra: impl Fn(&Value) -> bool,
) -> Value {
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
pub fn github_job(env: &TestEnv, agent: &Agent, run_id: &str, repository: &str, steps: &str) {
    let hooks = repo_root().join("hooks/github");
    let script = format!(
        "sh {started}\n{steps}\nsh {completed}\n",
        started = hooks.join("job-started.sh").display(),
        completed = hooks.join("job-completed.sh").display(),
    );
    run_github_worker(&mut github_worker(env, agent, run_id, repository, &script));
}

/// Runs a GitHub-style job of `repository` with the runner's hooks around `steps`: script lines
/// that each print `NAME=ANSWER`. Returns name -> answer; the job must succeed.
pub fn job_answers(
    env: &TestEnv,
    agent: &Agent,
    run_id: &str,
    repository: &str,
    steps: &str,
) -> std::collections::BTreeMap<String, String> {
    let hooks = repo_root().join("hooks/github");
    let script = format!(
        "sh {}\n{steps}sh {}\n",
        hooks.join("job-started.sh").display(),
        hooks.join("job-completed.sh").display()
    );
    let out = output_of(&mut github_worker(env, agent, run_id, repository, &script));
    assert!(
        out.status.success(),
        "job failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(name, answer)| (name.to_owned(), answer.trim().to_owned()))
        .collect()
}

/// A `Runner.Worker` (a copy of `sh`) that runs `script` with a GitHub job's environment.
pub fn github_worker(
    env: &TestEnv,
    agent: &Agent,
    run_id: &str,
    repository: &str,
    script: &str,
) -> Command {
    let worker = env.dir.join("Runner.Worker");
    std::fs::copy("/bin/sh", &worker).unwrap();
    let mut command = job_command(&worker, env, agent);
    command
        .arg("-c")
        .arg(script)
        .env("GITHUB_RUN_ID", run_id)
        .env("GITHUB_JOB", "build")
        .env("GITHUB_REPOSITORY", repository)
        .env("GITHUB_WORKFLOW", "CI")
        .env("RUNNER_NAME", "runner-test")
        .env("GITHUB_TOKEN", CANARY)
        .env("TOKEN", CANARY)
        .env("RUNNER_TRACKING_ID", format!("github_{run_id}"));
    command
}

/// Runs a `github_worker` and checks that it succeeded quietly.
pub fn run_github_worker(worker: &mut Command) {
    let out = output_of(worker);
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "job failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A command as a CI job runs it here: the test's home, the agent's CLI (for the hooks) and
/// the `job-step` helper on hand, and the agent's control socket.
pub fn job_command(program: &Path, env: &TestEnv, agent: &Agent) -> Command {
    let mut command = Command::new(program);
    command
        .env("HOME", &env.home)
        .env("PATH", format!("{}:/usr/bin:/bin", target_dir().display()))
        .env("RUNNER_MONITOR_SOCKET", &agent.socket)
        .env("JOB_STEP", job_step());
    command
}

/// Neither an alert nor the event trace of `agent` mentions `marker` (a path only something that
/// must stay nobody's used): `what` it would be, for the failure.
pub fn assert_nothing_of(agent: &Agent, marker: &str, what: &str) {
    let seen: Vec<_> = alerts(agent)
        .into_iter()
        .filter(|a| a.to_string().contains(marker))
        .collect();
    assert!(seen.is_empty(), "alerts for {what}: {seen:#?}");
    let events = std::fs::read_to_string(agent.dir.join("events.jsonl")).unwrap_or_default();
    assert!(!events.contains(marker), "the event trace holds {what}");
}

/// No output of the agent (alerts, event trace, log) carries the canary secret planted in the
/// credential files and in the jobs' environment (`GITHUB_TOKEN`, `CI_JOB_TOKEN`).
pub fn assert_no_secret(agent: &Agent) {
    assert_no_secret_in(&agent.dir);
    let metrics = curl(&format!("http://{}/metrics", agent.http));
    assert!(
        metrics.contains("runner_monitor_events_total"),
        "no metrics: {metrics}"
    );
    assert!(!metrics.contains(CANARY), "the canary leaked into /metrics");
}

/// `assert_no_secret` for the agent files in `dir`, and also its saved state and alert spools.
pub fn assert_no_secret_in(dir: &Path) {
    for file in ["alerts.jsonl", "events.jsonl", "agent.log"] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        assert!(!text.is_empty(), "{file} is empty");
        assert!(!text.contains(CANARY), "the canary leaked into {file}");
    }
    let spooled = std::fs::read_dir(dir.join("spool"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path());
    for file in spooled.chain([dir.join("state/state.json")]) {
        let bytes = std::fs::read(&file).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(CANARY),
            "the canary leaked into {}",
            file.display()
        );
    }
}

pub fn run_id(tag: u32) -> String {
    format!("{}{tag:02}", std::process::id())
}

/// A free loopback port (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn curl(url: &str) -> String {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "5", url])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts a real Alertmanager (Debian package) on `port`, dying with this test's thread.
pub fn start_alertmanager(dir: &Path, port: u16) -> Child {
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
    let child = crate::spawn_with_parent_death(&mut command, libc::SIGKILL)
        .expect("starting prometheus-alertmanager (Debian package)");
    let deadline = Instant::now() + Duration::from_secs(20);
    while curl(&format!("http://127.0.0.1:{port}/-/ready")).trim() != "OK" {
        assert!(Instant::now() < deadline, "alertmanager did not start");
        std::thread::sleep(Duration::from_millis(200));
    }
    child
}

/// The alerts Alertmanager holds for a job id.
pub fn alertmanager_has(port: u16, job_id: &str) -> bool {
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

/// Waits up to `seconds` for `done`, polled every 250 ms; panics naming `what` at the deadline.
pub fn wait_until(what: &str, seconds: u64, done: impl FnMut() -> bool) {
    let within = Duration::from_secs(seconds);
    let every = Duration::from_millis(250);
    assert!(
        poll_until(within, every, done),
        "timed out waiting for {what}"
    );
}

/// Polls `done` every `every` until it holds (true) or `within` has passed (false): for a test
/// whose own assertions, after the wait, say better what went wrong.
pub fn poll_until(within: Duration, every: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(every);
    }
}
