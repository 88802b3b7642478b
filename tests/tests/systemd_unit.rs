//! The hardened systemd unit (packaging/systemd/runner-monitor.service): systemd accepts it, its
//! exposure score stays low, it grants exactly the capabilities the agent checks for, and the
//! agent really loads and attaches every probe inside its sandbox: a real systemd boots as the
//! init of a private PID and mount namespace (this machine's PID 1 is not systemd; the machinery
//! is in `integration_tests::systemd`) and starts the unit, seccomp filter, capabilities,
//! read-only file system, ProtectProc and all.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use integration_tests::{
    live::{repo_root, target_dir},
    systemd::{Root, Systemd, test_agent_args, test_dropin},
};
use runner_monitor::privilege::{REQUIREMENTS, When};

/// The exposure `systemd-analyze security` gave the unit when it was written (2.7 on systemd
/// 252): a change that makes it worse fails.
const MAX_EXPOSURE: f64 = 2.7;

fn unit_text() -> String {
    std::fs::read_to_string(repo_root().join("packaging/systemd/runner-monitor.service")).unwrap()
}

/// The unit with ExecStart pointing at the binary the tests built (verify checks that it is
/// executable); nothing else changes.
fn unit_for_this_build(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let unit = dir.join("runner-monitor.service");
    let binary = target_dir().join("runner-monitor");
    let text = unit_text().replace("/usr/bin/runner-monitor", &binary.display().to_string());
    assert_ne!(text, unit_text(), "ExecStart names /usr/bin/runner-monitor");
    std::fs::write(&unit, text).unwrap();
    unit
}

fn systemd_analyze(args: &[&str]) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .args(args)
        .output()
        .expect("systemd-analyze (Debian package systemd, installed by `cargo xtask setup`)");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn systemd_accepts_the_unit_and_its_exposure_stays_low() {
    let dir = std::env::temp_dir().join(format!("rm-unit-{}", std::process::id()));
    let unit = unit_for_this_build(&dir);
    let unit = unit.to_str().unwrap();
    let (ok, text) = systemd_analyze(&["verify", unit]);
    assert!(ok && !text.contains("runner-monitor"), "verify: {text}");

    let (ok, text) = systemd_analyze(&["security", "--offline=true", "--no-pager", unit]);
    assert!(ok, "security: {text}");
    let score: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for runner-monitor.service:")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {text}"));
    eprintln!("systemd-analyze security: exposure {score} (at most {MAX_EXPOSURE})");
    for line in text.lines().filter(|l| l.starts_with('✗')) {
        eprintln!("  {}", line.trim_end());
    }
    assert!(score <= MAX_EXPOSURE, "exposure {score}: {text}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_unit_grants_exactly_the_capabilities_the_agent_checks_for() {
    let text = unit_text();
    let setting = |name: &str| -> BTreeSet<String> {
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name}="));
        line.split_whitespace().map(str::to_owned).collect()
    };
    // Everything but CAP_SYS_ADMIN, which only mounts tracefs: the unit requires
    // sys-kernel-tracing.mount instead.
    let expected: BTreeSet<String> = REQUIREMENTS
        .iter()
        .filter(|r| r.when != When::TracefsUnmounted)
        .map(|r| r.capability.to_string())
        .collect();
    assert_eq!(setting("CapabilityBoundingSet"), expected);
    assert_eq!(setting("AmbientCapabilities"), expected);
    assert!(text.contains("\nRequires=sys-kernel-tracing.mount\n"));
}

fn boot_systemd(dir: &Path) -> Systemd {
    boot_systemd_with(dir, "")
}

/// `boot_systemd`, with `extra` [Service] lines in the test's drop-in.
fn boot_systemd_with(dir: &Path, extra: &str) -> Systemd {
    std::fs::create_dir_all(dir).unwrap();
    // The unit runs this build's binary with the built-in policy, the text the package installs
    // as /etc/runner-monitor/policy.toml.
    let policy = dir.join("policy.toml");
    std::fs::write(&policy, runner_monitor::policy::DEFAULT_POLICY).unwrap();
    let binary = target_dir().join("runner-monitor");
    let unit = unit_text()
        .replace("/usr/bin/runner-monitor", &binary.display().to_string())
        .replace(
            "/etc/runner-monitor/policy.toml",
            &policy.display().to_string(),
        );
    // Besides the boot dependencies, log and pins: an existing user, and the agent's options
    // (the host has no /etc/default/runner-monitor).
    let pins = integration_tests::pin_dir_of(dir);
    let dropin = test_dropin(
        &pins,
        "nobody",
        "nogroup",
        &format!(
            "User=nobody\nGroup=nogroup\nEnvironment=\"RUNNER_MONITOR_ARGS={}\"\n{extra}",
            test_agent_args(&pins)
        ),
    );
    Systemd::boot(
        dir,
        &Root::Host,
        &[
            ("runner-monitor.service", unit),
            ("runner-monitor.service.d/test.conf", dropin),
        ],
    )
}

#[test]
fn a_real_systemd_runs_the_agent_in_the_units_sandbox_and_it_raises_alerts() {
    runner_monitor::sensor::attach::ensure_tracefs().expect("tracefs (sys-kernel-tracing.mount)");
    let dir = std::env::temp_dir().join(format!("rm-systemd-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let systemd = boot_systemd(&dir);
    let log = systemd.wait_agent_ready();
    // The heartbeat that on_agent_failure needs works with the unit's capabilities.
    assert!(!log.contains("no heartbeat"), "{log}");
    let pins = integration_tests::pin_dir_of(&dir);
    assert!(pins.join("PROCESSES").exists() && pins.join("JOBS").exists());
    // The control socket got the runner user's group (CAP_CHOWN and fchownat past seccomp).
    let socket = systemd.in_namespace("stat", &["-c", "%G %a", "/run/runner-monitor/control.sock"]);
    assert_eq!(String::from_utf8_lossy(&socket.stdout).trim(), "daemon 660");
    systemd.expect_survivor_alert("systemd");
    drop(systemd);
    let _ = std::fs::remove_dir_all(pins);
    let _ = std::fs::remove_dir_all(dir);
}

/// Waits until the agent's log holds `text` `times` times.
fn wait_logged(systemd: &Systemd, text: &str, times: usize) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let log = systemd.read("/run/rm-agent.log");
        if log.matches(text).count() >= times {
            return log;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{text:?} not logged {times} times:\n{log}\n{}",
            systemd.status()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn systemctl_restart_keeps_the_probes_recording_and_systemctl_stop_detaches_them() {
    runner_monitor::sensor::attach::ensure_tracefs().expect("tracefs (sys-kernel-tracing.mount)");
    let dir = std::env::temp_dir().join(format!("rm-systemd-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // A slow start: a restart leaves seconds with no agent.
    let systemd = boot_systemd_with(&dir, "ExecStartPre=/bin/sleep 3\n");
    let log = systemd.wait_agent_ready();
    assert!(
        log.contains("probes kept in systemd's file descriptor store"),
        "{log}"
    );

    // A job's survivor reads a credential once told to: while no agent runs.
    let env = integration_tests::TestEnv::new("systemd-restart");
    let worker = env.dir.join("Runner.Worker");
    std::fs::copy("/bin/sh", &worker).unwrap();
    let go = env.dir.join("go");
    let read = env.dir.join("read");
    let out = integration_tests::output_of(
        Command::new(&worker)
            .arg("-c")
            .arg(format!(
                "(setsid sh -c 'while [ ! -e {go} ]; do sleep 0.1; done; \
                 cat \"$HOME/.aws/credentials\" > /dev/null; touch {read}; sleep 2' \
                 > /dev/null 2>&1 &); sleep 1",
                go = go.display(),
                read = read.display()
            ))
            .env("HOME", &env.home)
            .env("GITHUB_TOKEN", integration_tests::CANARY),
    );
    assert!(out.status.success(), "{out:?}");
    systemd.in_namespace(
        "systemctl",
        &["restart", "--no-block", "runner-monitor.service"],
    );
    wait_logged(&systemd, "stopped: every probe detached", 1);
    // The read comes once the stopped agent's process is gone (its descriptors closed) and
    // before the next one starts: only the store keeps the probes whole then.
    integration_tests::live::wait_until("the stopped agent exited", 20, || {
        let out = systemd.in_namespace(
            "systemctl",
            &["show", "-p", "SubState", "runner-monitor.service"],
        );
        String::from_utf8_lossy(&out.stdout).trim() == "SubState=start-pre"
    });
    std::fs::write(&go, "").unwrap();
    integration_tests::live::wait_until("the survivor read", 10, || read.exists());
    let log = wait_logged(&systemd, "control socket ready", 2);
    // Every stored descriptor comes back: systemd dropped the tail-call table's (a map polls
    // EPOLLERR) until the agent asked it not to watch them.
    let count_after = |text: &str| {
        log.lines().find_map(|l| {
            l.split_once(text)?
                .1
                .split_whitespace()
                .next()?
                .parse::<usize>()
                .ok()
        })
    };
    let stored = count_after("a restart keeps them attached stored=");
    assert!(stored.is_some_and(|n| n > 30), "{log}");
    assert_eq!(
        count_after("before the restart descriptors="),
        stored,
        "{log}"
    );
    assert!(
        log.contains("took over the probes an earlier agent left attached"),
        "{log}"
    );
    // The read made while no agent ran is judged by the next one.
    let path = env.path(".aws/credentials");
    let raised = || {
        systemd
            .read("/var/log/runner-monitor/alerts.jsonl")
            .lines()
            .any(|l| {
                serde_json::from_str::<serde_json::Value>(l).is_ok_and(|a| {
                    a["rule"] == "credential-after-job-end"
                        && a["credential"]["path"] == path.as_str()
                })
            })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !raised() {
        assert!(
            std::time::Instant::now() < deadline,
            "the read made while no agent ran is not raised; the agent's log:\n{}\nalerts:\n{}\n\
             saved state:\n{}",
            systemd.read("/run/rm-agent.log"),
            systemd.read("/var/log/runner-monitor/alerts.jsonl"),
            systemd.read("/var/lib/runner-monitor/state/state.json"),
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    // `systemctl stop`: systemd closes its store, the agent removed its pins: nothing stays.
    let pins = integration_tests::pin_dir_of(&dir);
    let links: Vec<String> = std::fs::read_dir(pins.join("links"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let out = Command::new("bpftool")
                .args(["link", "show", "pinned"])
                .arg(e.path())
                .output()
                .ok()?;
            String::from_utf8_lossy(&out.stdout)
                .split(':')
                .next()
                .map(|id| id.trim().to_owned())
        })
        .collect();
    assert!(links.len() > 30, "{links:?}");
    systemd.in_namespace("systemctl", &["stop", "runner-monitor.service"]);
    integration_tests::live::wait_until("every link detached", 10, || {
        links.iter().all(|id| {
            !Command::new("bpftool")
                .args(["link", "show", "id", id])
                .output()
                .unwrap()
                .status
                .success()
        })
    });
    drop(systemd);
    let _ = std::fs::remove_dir_all(pins);
    let _ = std::fs::remove_dir_all(dir);
}
