//! The agent itself under restarts, reloads and shutdown: each test runs its own agent binary
//! (with its own state directory and pinned maps), stops and starts it, and checks what it
//! judged.

use std::{path::Path, process::Command, time::Duration};

use integration_tests::{
    CANARY, TestEnv,
    live::{
        Agent, agent_log, assert_no_secret_in, curl, free_port, job_command, json_lines,
        test_policy, wait_alert, wait_until,
    },
    pin_dir_of,
};

/// The flood test keeps both CPUs busy, and every agent on the host sees every job: agents of
/// the tests beside it would spend the CPU on the flood too, its own agent would fall behind,
/// and its ring buffer would drop what it must show arrives. It runs alone; the others may run
/// side by side.
static MACHINE: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn beside_others() -> std::sync::RwLockReadGuard<'static, ()> {
    MACHINE
        .read()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn alone() -> std::sync::RwLockWriteGuard<'static, ()> {
    MACHINE
        .write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn worker(env: &TestEnv) -> std::path::PathBuf {
    let worker = env.dir.join("Runner.Worker");
    if !worker.exists() {
        std::fs::copy("/bin/sh", &worker).unwrap();
    }
    worker
}

/// The value of one series in the agent's /metrics (0 when absent).
fn metric(agent: &Agent, series: &str) -> f64 {
    curl(&format!("http://{}/metrics", agent.http))
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Files a test's job and survivor wait for, made when the test ends however it ends: a test
/// that fails before it lets them go must not leave a job looping on the host (its `sleep`s
/// would be job roots for every later test's agent).
struct Release(Vec<std::path::PathBuf>);

impl Drop for Release {
    fn drop(&mut self) {
        for file in &self.0 {
            let _ = std::fs::write(file, "");
        }
        // Seen by the shells' 0.1 s polls before the test's directory, and the files, go.
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// A GitHub-style job named by its hook (`repository`, run `run`) whose root leaves a setsid'd
/// survivor running `survivor` (a shell script) and exits once `down` exists; returns the root
/// once the agent has named the job.
fn named_job_with_survivor(
    env: &TestEnv,
    agent: &Agent,
    repository: &str,
    run: &str,
    survivor: &str,
    down: &Path,
    hook: bool,
) -> std::process::Child {
    let hooks = integration_tests::live::repo_root().join("hooks/github");
    let path = env.dir.join("survivor.sh");
    std::fs::write(&path, survivor).unwrap();
    let hooked = env.dir.join("hooked");
    let state = env.dir.join("agent/state/state.json");
    let saved = |name: &str| {
        std::fs::read_to_string(&state)
            .unwrap_or_default()
            .contains(name)
    };
    if !hook {
        // A first job, so that the snapshot the agent writes at its first events is behind us:
        // the next one on the 10 s tick would come well after the 3 s allowed below.
        let primer = job_command(&worker(env), env, agent)
            .args(["-c", "true"])
            .env("GITHUB_RUN_ID", format!("{run}0"))
            .env("GITHUB_JOB", "prime")
            .env("GITHUB_REPOSITORY", "acme/primer")
            .status()
            .unwrap();
        assert!(primer.success());
        wait_until("the first job's name saved", 15, || saved("acme/primer"));
    }
    let started = if hook {
        format!(
            "sh {} && touch {}\n",
            hooks.join("job-started.sh").display(),
            hooked.display()
        )
    } else {
        String::new()
    };
    let script = format!(
        "{started}(setsid sh {survivor} &)\nwhile [ ! -e {down} ]; do sleep 0.1; done\n",
        survivor = path.display(),
        down = down.display(),
    );
    let job = job_command(&worker(env), env, agent)
        .arg("-c")
        .arg(script)
        .env("GITHUB_RUN_ID", run)
        .env("GITHUB_JOB", "build")
        .env("GITHUB_REPOSITORY", repository)
        .env("GITHUB_TOKEN", CANARY)
        .spawn()
        .unwrap();
    let id = format!("\"id\":\"{run}/build\"");
    let events = env.dir.join("agent/events.jsonl");
    wait_until("the agent names the job", 20, || {
        std::fs::read_to_string(&events)
            .unwrap_or_default()
            .contains(&id)
    });
    if hook {
        // The hook has returned: the agent saved the job's name before answering it.
        wait_until("the job-started hook", 20, || hooked.exists());
    } else {
        // Named by its environment alone: saved at once, well before the next snapshot tick.
        wait_until("the job's name saved", 3, || saved(repository));
    }
    job
}

#[test]
fn a_restarted_agent_keeps_its_jobs_and_judges_one_that_ended_while_it_was_down() {
    let _machine = beside_others();
    let env = TestEnv::new("restart");
    let dir = env.dir.join("agent");
    let pins = pin_dir_of(&dir);
    let port = free_port();
    let agent = Agent::launch(&dir, port, &[]);
    let run = format!("{}41", std::process::id());
    let id = format!("{run}/build");
    let (down, gate) = (env.dir.join("agent-down"), env.dir.join("gate"));
    let _release = Release(vec![down.clone(), gate.clone()]);
    // The job names itself through the runner's hook, leaves a setsid'd shell behind, and its
    // root exits only once the agent is down. The shell starts a new process while the agent is
    // down; that one reads a credential after the agent is back.
    let survivor = format!(
        "while [ ! -e {down} ]; do sleep 0.1; done\n\
         sh -c 'while [ ! -e {gate} ]; do sleep 0.1; done; \
         cat \"$HOME/.aws/credentials\" > /dev/null; sleep 5' &\n\
         wait\n",
        down = down.display(),
        gate = gate.display(),
    );
    let mut job =
        named_job_with_survivor(&env, &agent, "acme/restart", &run, &survivor, &down, true);

    let status = agent.stop();
    assert!(status.success(), "the agent stopped with {status}");
    assert!(
        agent_log(&dir).contains("stopped: every probe detached"),
        "{}",
        agent_log(&dir)
    );
    // While no agent runs: the job's root exits (the job ends) and its survivor starts a process
    // (in the background, so it is a new process and not the shell exec'ing itself).
    std::fs::write(&down, "").unwrap();
    assert!(job.wait().unwrap().success());
    std::thread::sleep(Duration::from_millis(500));

    let agent = Agent::launch(&dir, port, &[]);
    let log = agent_log(&dir);
    assert!(log.contains("resumed from the saved state"), "{log}");
    let resumed = log
        .lines()
        .find(|l| l.contains("resumed the pinned kernel maps"))
        .unwrap_or_else(|| panic!("no resume line: {log}"));
    // Host-wide counts: every agent's probes see every `Runner.Worker` on the host, so the jobs
    // of tests running beside this one (the flood test's, say) can end while this agent is down
    // too. This job's own end is proven by its alerts below.
    let count = |name: &str| -> u64 {
        let at = resumed
            .find(&format!("{name}="))
            .unwrap_or_else(|| panic!("no {name} in {resumed}"));
        resumed[at + name.len() + 1..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{name} is no number in {resumed}"))
    };
    assert!(count("jobs_ended") >= 1, "{resumed}");
    assert!(count("born") >= 1, "{resumed}");

    std::fs::write(&gate, "").unwrap();
    // Named as before the restart, ended while the agent was down, judged now.
    let read = wait_alert(&agent, "credential-after-job-end", &id, |_| true);
    assert_eq!(read["job"]["repository"], "acme/restart");
    assert_eq!(read["job"]["ended"], true);
    wait_alert(&agent, "process-survived-job", &id, |_| true);
    assert!(agent.stop().success());
    assert_no_secret_in(&dir);
    let _ = std::fs::remove_dir_all(&pins);
}

/// The agent ends with `signal` (SIGKILL: a crash; SIGUSR2: a hand-over) while a job runs; while
/// no agent runs, the job's root exits and its survivor reads a credential. The probes stayed
/// attached (pinned) and recorded it: the next agent judges the read as after the job's end.
fn probes_record_while_no_agent_runs(signal: i32, name: &str, hook: bool) {
    let _machine = beside_others();
    let env = TestEnv::new(name);
    let dir = env.dir.join("agent");
    let pins = pin_dir_of(&dir);
    let port = free_port();
    let agent = Agent::launch(&dir, port, &[]);
    let run = format!("{}{}", std::process::id(), signal);
    let id = format!("{run}/build");
    let down = env.dir.join("agent-down");
    let read = env.dir.join("read");
    let _release = Release(vec![down.clone()]);
    let survivor = format!(
        "while [ ! -e {down} ]; do sleep 0.1; done; sleep 1\n\
         cat \"$HOME/.aws/credentials\" > /dev/null; touch {read}; sleep 5\n",
        down = down.display(),
        read = read.display(),
    );
    let mut job =
        named_job_with_survivor(&env, &agent, "acme/handover", &run, &survivor, &down, hook);
    let status = agent.end_with(signal);
    if signal == libc::SIGUSR2 {
        assert_eq!(status.code(), Some(75), "a hand-over exits 75: {status}");
        assert!(
            agent_log(&dir).contains("probes stay attached"),
            "{}",
            agent_log(&dir)
        );
    }
    // No agent: the job ends, its survivor reads a credential after the end.
    std::fs::write(&down, "").unwrap();
    assert!(job.wait().unwrap().success());
    wait_until("the survivor read", 10, || read.exists());

    let agent = Agent::launch(&dir, port, &[]);
    assert!(
        agent_log(&dir).contains("took over the probes an earlier agent left attached"),
        "{}",
        agent_log(&dir)
    );
    let alert = wait_alert(&agent, "credential-after-job-end", &id, |_| true);
    assert_eq!(alert["job"]["repository"], "acme/handover");
    assert!(agent.stop().success());
    // A clean stop leaves nothing attached.
    assert_eq!(std::fs::read_dir(pins.join("links")).unwrap().count(), 0);
    assert_no_secret_in(&dir);
    let _ = std::fs::remove_dir_all(&pins);
}

#[test]
fn a_crashed_agents_probes_record_until_the_next_agent_reads_them() {
    probes_record_while_no_agent_runs(libc::SIGKILL, "crash", true);
}

/// The same for a job no hook names: its name comes from its environment alone, and is saved
/// at once (before, only at the next 10 s tick: a crash in between lost it).
#[test]
fn a_crashed_agent_hands_on_a_job_named_by_its_environment_alone() {
    probes_record_while_no_agent_runs(libc::SIGKILL, "crash-env", false);
}

#[test]
fn an_agent_hands_over_with_sigusr2_and_the_next_reads_what_happened_between() {
    probes_record_while_no_agent_runs(libc::SIGUSR2, "handover", true);
}

#[test]
fn sighup_reloads_the_policy_and_a_bad_one_is_rejected_keeping_the_old() {
    let _machine = beside_others();
    let env = TestEnv::new("reload");
    let dir = env.dir.join("agent");
    let pins = pin_dir_of(&dir);
    let agent = Agent::launch(&dir, free_port(), &[]);
    let token = env.home.join(".reload-test-token");
    std::fs::write(&token, CANARY).unwrap();
    let series = "runner_monitor_credential_accesses_total{kind=\"reload-test\"}";
    let read_token = || {
        let out = job_command(&worker(&env), &env, &agent)
            .arg("-c")
            .arg("cat \"$HOME/.reload-test-token\" > /dev/null")
            .output()
            .unwrap();
        assert!(out.status.success());
    };
    read_token();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(metric(&agent, series), 0.0, "not a credential yet");

    let policy = dir.join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "{}\n[[credentials]]\nkind = \"reload-test\"\npaths = [\"**/.reload-test-token\"]\n",
            test_policy()
        ),
    )
    .unwrap();
    agent.signal(libc::SIGHUP);
    wait_until("the reload", 10, || {
        agent_log(&dir).contains("policy reloaded")
    });
    read_token();
    wait_until("the new credential kind counted", 10, || {
        metric(&agent, series) >= 1.0
    });

    // A broken policy: rejected with its file and line, and the reloaded one stays.
    std::fs::write(&policy, "[agent]\ngrace_period_seconds = \"soon\"\n").unwrap();
    agent.signal(libc::SIGHUP);
    wait_until("the rejection", 10, || {
        agent_log(&dir).contains("new policy rejected")
    });
    let log = agent_log(&dir);
    let rejected = log
        .lines()
        .find(|l| l.contains("new policy rejected"))
        .unwrap();
    assert!(
        rejected.contains(&format!("{}:2:", policy.display()))
            && rejected.contains("agent.grace_period_seconds"),
        "{rejected}"
    );
    assert_eq!(
        metric(
            &agent,
            "runner_monitor_policy_reloads_total{result=\"rejected\"}"
        ),
        1.0
    );
    read_token();
    wait_until("the old policy still in force", 10, || {
        metric(&agent, series) >= 2.0
    });
    assert!(agent.stop().success());
    let _ = std::fs::remove_dir_all(&pins);
}

/// Ids of the BPF programs process `pid` holds (its fds' `prog_id` in /proc/PID/fdinfo).
fn programs_of(pid: u32) -> Vec<u64> {
    let mut ids: Vec<u64> = std::fs::read_dir(format!("/proc/{pid}/fdinfo"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

fn program_exists(id: u64) -> bool {
    Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .output()
        .unwrap()
        .status
        .success()
}

#[test]
fn clean_shutdown_writes_what_is_pending_and_detaches_every_probe() {
    let _machine = beside_others();
    let env = TestEnv::new("shutdown");
    let dir = env.dir.join("agent");
    let pins = pin_dir_of(&dir);
    let agent = Agent::launch(&dir, free_port(), &[]);
    let programs = programs_of(agent.pid());
    // 48 attachments of 36 programs (one exit program serves many syscalls).
    assert!(programs.len() >= 30, "{programs:?}");
    // A job reads its parent's environment, and the agent is told to stop at once.
    let mut job = job_command(&worker(&env), &env, &agent)
        .arg("-c")
        .arg("sh -c 'cat /proc/$PPID/environ > /dev/null'")
        .spawn()
        .unwrap();
    let root = job.id();
    assert!(job.wait().unwrap().success());
    let status = agent.stop();
    assert!(status.success(), "{status}");
    assert!(
        alerts_in(&dir)
            .iter()
            .any(|a| a["rule"] == "process-memory-access" && a["target"]["pid"] == root),
        "the alert raised just before the stop was not written: {:#?}",
        alerts_in(&dir)
    );
    let left: Vec<u64> = programs
        .into_iter()
        .filter(|id| program_exists(*id))
        .collect();
    assert!(left.is_empty(), "programs left after the stop: {left:?}");
    let _ = std::fs::remove_dir_all(&pins);
}

fn alerts_in(dir: &Path) -> Vec<serde_json::Value> {
    json_lines(&dir.join("alerts.jsonl"))
}

#[test]
fn a_second_agent_on_the_same_state_refuses_to_start() {
    let _machine = beside_others();
    let env = TestEnv::new("second");
    let dir = env.dir.join("agent");
    let pins = pin_dir_of(&dir);
    let agent = Agent::launch(&dir, free_port(), &[]);
    let out = Command::new(integration_tests::live::target_dir().join("runner-monitor"))
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--alerts-out",
            "/dev/null",
        ])
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--control-socket")
        .arg(env.dir.join("second.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("another runner-monitor is running with state directory"),
        "{stderr}"
    );
    assert!(agent.stop().success());
    let _ = std::fs::remove_dir_all(&pins);
}

#[test]
fn a_flooding_job_is_held_to_its_budget_and_another_jobs_read_still_arrives() {
    let _machine = alone();
    let env = TestEnv::new("flood");
    let dir = env.dir.join("agent");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("policy.toml"),
        test_policy().replace(
            "job_events_per_second = 200000",
            "job_events_per_second = 20000",
        ),
    )
    .unwrap();
    let pins = pin_dir_of(&dir);
    let agent = Agent::launch(&dir, free_port(), &[]);
    // Job A opens a credential path as fast as two processes can, for 3 s.
    let flood = integration_tests::live::target_dir().join("bench-workload");
    let mut flooding = job_command(&worker(&env), &env, &agent)
        .arg("-c")
        .arg(format!(
            "exec {} flood {}/nope/.aws/credentials 3 2",
            flood.display(),
            env.home.display()
        ))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // Job B, meanwhile: its survivor reads a credential after the job ended.
    let run = format!("{}51", std::process::id());
    let hooks = integration_tests::live::repo_root().join("hooks/github");
    let out = job_command(&worker(&env), &env, &agent)
        .arg("-c")
        .arg(format!(
            "sh {}\n(setsid sh -c 'sleep 1; cat \"$HOME/.aws/credentials\" > /dev/null' &)\nsh {}\n",
            hooks.join("job-started.sh").display(),
            hooks.join("job-completed.sh").display()
        ))
        .env("GITHUB_RUN_ID", &run)
        .env("GITHUB_JOB", "build")
        .env("GITHUB_REPOSITORY", "acme/quiet")
        .output()
        .unwrap();
    assert!(out.status.success());
    wait_alert(
        &agent,
        "credential-after-job-end",
        &format!("{run}/build"),
        |_| true,
    );
    assert!(flooding.wait().unwrap().success());
    // The flood itself is counted and raised, naming the job.
    wait_until("the flood raised as sensor-degraded", 10, || {
        alerts_in(&dir).iter().any(|a| {
            a["rule"] == "sensor-degraded"
                && a["summary"]
                    .as_str()
                    .is_some_and(|s| s.contains("over its event budget"))
        })
    });
    assert!(
        metric(
            &agent,
            "runner_monitor_events_lost_total{kind=\"file_open\"}"
        ) > 0.0
    );
    assert!(agent.stop().success());
    let _ = std::fs::remove_dir_all(&pins);
}
