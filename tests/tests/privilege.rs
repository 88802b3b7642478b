//! Least privilege: the real agent binary runs as an unprivileged user (`nobody`) holding only the
//! capabilities packaging/README.md lists, under `setpriv` with no-new-privs, and still does its job: a
//! simulated GitHub job run by root, identified from its environment, leaves a survivor that
//! reads a root-only credential by a relative path after the job ended, and the alert names the
//! job, the resolved path and the credential's fingerprint. Without any one required capability
//! the agent refuses to start and names it; without the optional one it starts and says which
//! sensor is off.

use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{
    TestEnv,
    live::{
        Agent, agent_command, agent_dir, agent_log, alerts, assert_no_secret, curl, github_worker,
        run_github_worker, run_id, target_dir, wait_alert, wait_ready,
    },
};
use runner_monitor::privilege::Capability;

/// The agent's user: `nobody`, which owns nothing the agent reads.
const AGENT_UID: u32 = 65534;
/// The runner user given to `--runner-user`: the control socket gets its group.
const RUNNER_USER: &str = "daemon";

/// What the table in packaging/README.md grants (setpriv's names): required ones first.
const REQUIRED: &[&str] = &["bpf", "perfmon", "dac_read_search", "sys_ptrace", "chown"];
/// Without it the DNS sensor is off, and the agent says so.
const OPTIONAL: &str = "net_admin";

/// `setpriv` as `nobody` with exactly `caps` (inheritable, ambient and bounding), no-new-privs.
fn setpriv(caps: &[&str]) -> Vec<String> {
    let set = std::iter::once("-all".to_owned())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    vec![
        "setpriv".into(),
        format!("--reuid={AGENT_UID}"),
        format!("--regid={AGENT_UID}"),
        "--clear-groups".into(),
        "--no-new-privs".into(),
        format!("--inh-caps={set}"),
        format!("--ambient-caps={set}"),
        format!("--bounding-set={set}"),
    ]
}

fn granted() -> Vec<&'static str> {
    REQUIRED.iter().copied().chain([OPTIONAL]).collect()
}

fn without(cap: &str) -> Vec<&'static str> {
    granted().into_iter().filter(|c| *c != cap).collect()
}

/// The capability as the agent names it.
fn cap_name(setpriv_name: &str) -> String {
    format!("CAP_{}", setpriv_name.to_uppercase())
}

/// An agent directory `nobody` owns (it writes its alerts, trace, spool and socket there).
/// tracefs is mounted first, as the systemd unit's dependency on sys-kernel-tracing.mount does.
fn unprivileged_agent_dir(name: &str) -> std::path::PathBuf {
    runner_monitor::sensor::attach::ensure_tracefs().expect("mounting tracefs as root");
    let dir = agent_dir(name);
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        std::os::unix::fs::chown(entry.path(), Some(AGENT_UID), Some(AGENT_UID)).unwrap();
    }
    std::os::unix::fs::chown(&dir, Some(AGENT_UID), Some(AGENT_UID)).unwrap();
    dir
}

fn start_unprivileged(dir: &Path, caps: &[&str]) -> Agent {
    let mut command = agent_command(dir, &setpriv(caps));
    command.args(["--runner-user", RUNNER_USER]);
    let child = command.spawn().expect("starting the agent under setpriv");
    wait_ready(dir, child).unwrap_or_else(|log| panic!("the agent did not start: {log}"))
}

/// `Name:\tvalue` from /proc/<pid>/status.
fn status_field(pid: u32, name: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{name}:"))
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
}

fn mask(caps: &[&str]) -> u64 {
    caps.iter()
        .map(|c| {
            cap_name(c)
                .parse::<Capability>()
                .unwrap_or_else(|_| panic!("{c} is not a capability"))
                .bitmask()
        })
        .fold(0, |m, b| m | b)
}

#[test]
fn the_agent_as_nobody_with_only_the_listed_capabilities_raises_the_survivor_alert() {
    let dir = unprivileged_agent_dir("priv-ok");
    let started = Instant::now();
    let agent = start_unprivileged(&dir, &granted());
    eprintln!(
        "privilege: agent ready as nobody in {:?}",
        started.elapsed()
    );

    // It really runs as nobody with exactly these capabilities and no way to gain more.
    let pid = agent.pid();
    assert!(
        status_field(pid, "Uid")
            .split_whitespace()
            .all(|u| u == AGENT_UID.to_string()),
        "{}",
        status_field(pid, "Uid")
    );
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(
            u64::from_str_radix(&status_field(pid, set), 16).unwrap(),
            mask(&granted()),
            "{set} of the agent"
        );
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    // The control socket belongs to the runner user's group (CAP_CHOWN), rw for the group only.
    let socket = std::fs::metadata(&agent.socket).unwrap();
    let runner_gid = runner_monitor::job::control::user_ids(RUNNER_USER)
        .unwrap()
        .1;
    assert_eq!(socket.gid(), runner_gid);
    assert_eq!(socket.permissions().mode() & 0o777, 0o660);

    // The credentials are root's alone: fingerprinting them needs CAP_DAC_READ_SEARCH.
    let env = TestEnv::new("priv");
    for (path, mode) in [(".aws/credentials", 0o600), (".aws", 0o700), ("", 0o700)] {
        std::fs::set_permissions(env.home.join(path), std::fs::Permissions::from_mode(mode))
            .unwrap();
    }
    // Root runs the job from ~/.aws; its survivor opens `credentials` by a relative path after
    // the job's root exited: resolving it needs the root's /proc/<pid>/cwd (CAP_SYS_PTRACE).
    // No hook names the job: its identity comes from /proc/<pid>/environ (mode 0400, root's).
    let run = run_id(40);
    let mut worker = github_worker(
        &env,
        &agent,
        &run,
        "acme/app",
        "(setsid sh -c 'sleep 2; cat credentials > /dev/null; sleep 1' &); sleep 1",
    );
    worker.current_dir(env.home.join(".aws"));
    run_github_worker(&mut worker);
    let alert = wait_alert(
        &agent,
        "credential-after-job-end",
        &format!("{run}/build"),
        |_| true,
    );
    assert_eq!(alert["severity"], "critical");
    assert_eq!(alert["job"]["repository"], "acme/app", "{alert}");
    assert_eq!(
        alert["credential"]["path"],
        env.path(".aws/credentials"),
        "{alert}"
    );
    assert!(
        alert["credential"]["fingerprint"]
            .as_str()
            .is_some_and(|f| f.starts_with("hmac-sha256:")),
        "{alert}"
    );

    // Root (the hooks' user here) is admitted on the socket and can start and end a job.
    let mut process = Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("spawning a job root");
    let id = format!("priv-{}", std::process::id());
    for args in [
        vec!["start", "--id", &id, "--pid", &process.id().to_string()],
        vec!["end", "--id", &id],
    ] {
        let out = Command::new(target_dir().join("runner-monitor"))
            .arg("job")
            .args(&args)
            .env("RUNNER_MONITOR_SOCKET", &agent.socket)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "job {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = process.kill();
    let _ = process.wait();
    // Someone else who can open the socket (here nobody, its owner) is refused and counted.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(target_dir().join("runner-monitor"))
        .args(["job", "end", "--id", &id])
        .env("RUNNER_MONITOR_SOCKET", &agent.socket)
        .output()
        .unwrap();
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not allowed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metrics = curl(&format!("http://{}/metrics", agent.http));
    for series in [
        r#"runner_monitor_control_requests_total{request="unknown",result="forbidden_peer"} 1"#,
        r#"runner_monitor_control_requests_total{request="job_start",result="ok"} 1"#,
        r#"runner_monitor_control_requests_total{request="job_end",result="ok"} 1"#,
    ] {
        assert!(
            metrics.lines().any(|l| l == series),
            "{series} in\n{metrics}"
        );
    }
    assert_no_secret(&agent);
    assert!(
        !agent_log(&dir).contains("missing capabilit"),
        "{}",
        agent_log(&dir)
    );
}

/// Runs the agent as nobody with `caps` through `wrapper` and expects a refusal naming `cap`.
fn assert_refused_naming(dir: &Path, wrapper: &[&str], caps: &[&str], cap: &str) {
    let launcher: Vec<String> = wrapper
        .iter()
        .map(|s| s.to_string())
        .chain(setpriv(caps))
        .collect();
    let mut command = agent_command(dir, &launcher);
    command.args(["--runner-user", RUNNER_USER]);
    let started = Instant::now();
    let status = command
        .stdin(Stdio::null())
        .status()
        .expect("running the agent");
    let log = agent_log(dir);
    assert!(!status.success(), "started without {cap}: {log}");
    let expected = format!(
        "runner-monitor: error: missing capability: {} is needed to ",
        cap_name(cap)
    );
    assert!(log.contains(&expected), "without {cap}: {log}");
    // Refused before loading anything (a load takes seconds).
    assert!(
        !log.contains("probes attached") && started.elapsed() < Duration::from_secs(3),
        "without {cap} it got as far as: {log}"
    );
}

#[test]
fn without_any_one_required_capability_the_agent_refuses_to_start_and_names_it() {
    let dir = unprivileged_agent_dir("priv-refused");
    for cap in REQUIRED {
        assert_refused_naming(&dir, &[], &without(cap), cap);
    }
    // CAP_SYS_ADMIN only mounts tracefs: needed only where nothing has mounted it (here, a
    // private mount namespace without it).
    assert_refused_naming(
        &dir,
        &[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            "umount /sys/kernel/tracing && exec \"$@\"",
            "sh",
        ],
        &granted(),
        "sys_admin",
    );
}

#[test]
fn without_cap_net_admin_the_agent_starts_and_reports_the_dns_sensor_off() {
    let dir = unprivileged_agent_dir("priv-no-net-admin");
    let agent = start_unprivileged(&dir, &without(OPTIONAL));
    assert!(
        agent_log(&dir).contains("sensor degraded: missing capability CAP_NET_ADMIN"),
        "{}",
        agent_log(&dir)
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let degraded = alerts(&agent)
            .into_iter()
            .find(|a| a["rule"] == "sensor-degraded" && a.to_string().contains("dns_connect4"));
        if degraded.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no sensor-degraded alert for the DNS probes: {:#?}",
            alerts(&agent)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
