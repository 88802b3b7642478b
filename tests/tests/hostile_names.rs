//! Untrusted bytes through the real agent: a simulated GitHub job whose run id and repository
//! (its environment, passed on by the runner's hooks through the control socket) carry terminal
//! escapes and forged lines, which writes a credential into a directory whose name holds an OSC
//! sequence, a newline and a byte that is not UTF-8, with a program whose name (comm) starts with
//! "clear screen". The alert must carry every name exactly, and no output may carry a raw control
//! character: not the alert stream, the event trace, the log, nor the Prometheus exposition
//! (which must stay valid for promtool).

use std::{
    io::Write,
    process::{Command, Stdio},
};

use integration_tests::{
    TestEnv,
    live::{agent, agent_log, assert_no_secret, curl, github_job, run_id, wait_alert},
};

/// Panics when `text` holds a control character other than the newline ending each line.
fn assert_no_raw_controls(what: &str, text: &str) {
    let raw: Vec<char> = text
        .chars()
        .filter(|c| c.is_control() && *c != '\n')
        .collect();
    assert!(
        raw.is_empty(),
        "{what} holds raw control characters {raw:?}"
    );
}

#[test]
fn hostile_job_names_paths_and_comm_reach_alerts_logs_and_metrics_escaped() {
    let agent = agent();
    let env = TestEnv::new("live-hostile");
    let run = format!("{}\u{1b}]0;pwn\u{7}\u{9b}2J", run_id(1));
    let repository = "acme/\u{1b}[2Japp\nforged: repository line";
    // The credential's directory: "x", an OSC window-title sequence, a newline, "y", byte 0xff.
    let steps = r#"dir="$HOME/$(printf 'x\033]0;pwn\007\ny\377')"
mkdir -p "$dir/.aws"
evil="$HOME/$(printf '\033[2Jcp')"
cp /bin/cp "$evil"
"$evil" /etc/hostname "$dir/.aws/credentials""#;
    github_job(&env, agent, &run, repository, steps);
    let id = format!("{run}/build");
    let alert = wait_alert(agent, "credential-left-behind", &id, |_| true);
    assert_eq!(alert["job"]["repository"], repository, "{alert}");
    let path = alert["credential"]["path"].as_str().unwrap();
    assert!(
        path.ends_with("/home/x\u{1b}]0;pwn\u{7}\ny\u{fffd}/.aws/credentials"),
        "{path:?}"
    );

    let alerts = std::fs::read_to_string(agent.dir.join("alerts.jsonl")).unwrap();
    assert_no_raw_controls("alerts.jsonl", &alerts);
    let line = alerts
        .lines()
        .find(|l| l.contains("left-behind") && l.contains("pwn"))
        .expect("the alert's line");
    assert!(
        line.contains("x\\u001b]0;pwn\\u0007\\ny\u{fffd}/.aws"),
        "{line}"
    );
    assert!(line.contains(r"\u009b2J"), "C1 CSI escaped too: {line}");
    let events = std::fs::read_to_string(agent.dir.join("events.jsonl")).unwrap();
    assert_no_raw_controls("events.jsonl", &events);
    assert!(
        events.contains(r#""comm":"\u001b[2Jcp""#),
        "the writer's comm is in the trace, escaped"
    );

    let log = agent_log(&agent.dir);
    assert_no_raw_controls("the agent's log", &log);
    assert!(
        !log.lines().any(|l| l.starts_with("forged")),
        "a job forged a log line:\n{log}"
    );
    assert!(
        log.contains(r"\u{1b}]0;pwn\u{7}\u{9b}2J/build"),
        "the job id is logged, escaped:\n{log}"
    );

    // Job-supplied names are no metric label; the exposition stays valid.
    let metrics = curl(&format!("http://{}/metrics", agent.http));
    assert!(
        metrics.contains("runner_monitor_findings_total"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("pwn") && !metrics.contains("forged"),
        "{metrics}"
    );
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) is installed by `cargo xtask setup`");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_no_secret(agent);
}
