//! The fleet stream through the real agent binary and a real nats-server (Debian's, with
//! JetStream): what the agent publishes (findings, credential fingerprints), that a broker crash
//! or an agent restart loses and duplicates nothing, and TLS with a CA the test generates.
//!
//! One live agent at a time (`one_agent`): a second host is a recorded trace replayed with
//! `replay --nats --host` (two agents on one kernel would both see every job's processes).

use std::{path::Path, process::Command, time::Duration};

use integration_tests::{
    CANARY, TestEnv,
    live::{
        Agent, agent_dir, agent_log, alerts, free_port, github_job, run_id, target_dir,
        test_policy, wait_alert, wait_until,
    },
    nats::{Broker, NatsAuth, StreamMessage, TestPki},
};
use serde_json::Value;

const STREAM: &str = "RUNNER_MONITOR";

/// One live agent at a time: every agent sees every job's processes on this kernel, so agents
/// of tests running side by side would raise findings for each other's jobs.
fn one_agent() -> std::sync::MutexGuard<'static, ()> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An agent directory whose policy has `fleet` (TOML lines) in its `[fleet]` section.
fn fleet_dir(name: &str, fleet: &str) -> std::path::PathBuf {
    let dir = agent_dir(name);
    std::fs::write(
        dir.join("policy.toml"),
        format!("{}\n[fleet]\nhost = \"runner-a\"\n{fleet}\n", test_policy()),
    )
    .unwrap();
    dir
}

fn findings(messages: &[StreamMessage]) -> Vec<&StreamMessage> {
    messages
        .iter()
        .filter(|m| m.subject.contains(".findings."))
        .collect()
}

fn fingerprints(messages: &[StreamMessage]) -> Vec<&StreamMessage> {
    messages
        .iter()
        .filter(|m| m.subject.contains(".fingerprints."))
        .collect()
}

/// Every finding in the alert stream is in the fleet stream exactly once (and nothing else is).
fn assert_findings_published_once(alerts: &[Value], messages: &[StreamMessage]) {
    let mut published: Vec<String> = findings(messages)
        .iter()
        .map(|m| m.payload.to_string())
        .collect();
    let mut written: Vec<String> = alerts.iter().map(Value::to_string).collect();
    published.sort();
    written.sort();
    assert_eq!(
        published, written,
        "the stream's findings are not the alert stream's"
    );
    let mut ids: Vec<&str> = messages.iter().map(|m| m.msg_id.as_str()).collect();
    ids.sort();
    let before = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), before, "a message id is in the stream twice");
}

fn assert_no_canary_in(messages: &[StreamMessage]) {
    for m in messages {
        assert!(
            !m.payload.to_string().contains(CANARY),
            "the canary leaked into {}",
            m.subject
        );
    }
}

/// Waits until the stream holds as many findings as the agent's alert stream (and at least
/// `min`).
fn wait_published(broker: &Broker, agent: &Agent, min: usize, tls: Option<&TestPki>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let messages = broker.messages(STREAM, tls);
        let (published, raised) = (findings(&messages), alerts(agent));
        if published.len() >= min && published.len() == raised.len() {
            return;
        }
        if std::time::Instant::now() > deadline {
            let rule = |v: &Value| format!("{} {}", v["rule"], v["job"]["id"]);
            panic!(
                "timed out waiting for the findings in the fleet stream: published {:?}, \
                 raised {:?}\nlog: {}",
                published
                    .iter()
                    .map(|m| rule(&m.payload))
                    .collect::<Vec<_>>(),
                raised.iter().map(rule).collect::<Vec<_>>(),
                agent_log(&agent.dir)
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A job of acme/release writes ~/.npmrc (the writer exits: the agent hashes it); a job of
/// someone/fork reads it.
fn write_then_read(env: &TestEnv, agent: &Agent, tag: u32) -> (String, String) {
    let (first, second) = (run_id(tag), run_id(tag + 1));
    github_job(
        env,
        agent,
        &first,
        "acme/release",
        "sh -c 'printf %s \"$TOKEN\" > \"$HOME/.npmrc\"'",
    );
    github_job(
        env,
        agent,
        &second,
        "someone/fork",
        "cat \"$HOME/.npmrc\" > /dev/null",
    );
    (format!("{first}/build"), format!("{second}/build"))
}

#[test]
fn agent_publishes_findings_and_fingerprints_of_a_credential_written_and_read() {
    let _one = one_agent();
    let root = std::env::temp_dir().join(format!("rm-broker-publish-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let broker = Broker::start(&root.join("broker"));
    let dir = fleet_dir("fleet-publish", "");
    let key = dir.join("attestation.key");
    let keygen = Command::new(target_dir().join("runner-monitor"))
        .args(["attest", "keygen"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(keygen.status.success(), "{keygen:?}");
    let agent = Agent::launch(
        &dir,
        free_port(),
        &[
            "--nats",
            &broker.url(),
            "--attestation-key",
            key.to_str().unwrap(),
        ],
    );
    let env = TestEnv::new("fleet-publish");
    let (writer, reader) = write_then_read(&env, &agent, 41);
    wait_alert(&agent, "cross-job-credential-reuse", &reader, |_| true);
    wait_published(&broker, &agent, 2, None);
    let messages = broker.messages(STREAM, None);
    assert_findings_published_once(&alerts(&agent), &messages);
    assert!(
        findings(&messages)
            .iter()
            .all(|m| m.subject == "runner-monitor.findings.runner-a"),
        "{messages:#?}"
    );
    // The written credential (materialised by the writer's job) and its read by the other job:
    // one fingerprint, with the key id it was made with.
    wait_until("both fingerprints in the stream", 30, || {
        let messages = broker.messages(STREAM, None);
        let prints = fingerprints(&messages);
        prints
            .iter()
            .any(|m| m.payload["job"]["id"] == writer.as_str())
            && prints
                .iter()
                .any(|m| m.payload["job"]["id"] == reader.as_str())
    });
    let messages = broker.messages(STREAM, None);
    let npmrc = env.path(".npmrc");
    let of = |job: &str| -> Value {
        fingerprints(&messages)
            .into_iter()
            .find(|m| m.payload["job"]["id"] == job && m.payload["path"] == npmrc.as_str())
            .unwrap_or_else(|| panic!("no fingerprint of {npmrc} for {job}: {messages:#?}"))
            .payload
            .clone()
    };
    let (made, read) = (of(&writer), of(&reader));
    assert_eq!(made["use"], "materialised");
    assert_eq!(read["use"], "read");
    assert_eq!(made["fingerprint"], read["fingerprint"]);
    assert_eq!(made["host"], "runner-a");
    assert_eq!(made["job"]["repository"], "acme/release");
    assert_eq!(read["job"]["repository"], "someone/fork");
    let key_id = made["key_id"].as_str().unwrap();
    assert_eq!(key_id.len(), 12, "{made}");
    assert!(
        made["fingerprint"]
            .as_str()
            .unwrap()
            .starts_with(&format!("hmac-sha256:{key_id}:"))
    );
    assert!(made["time"].as_str().unwrap().ends_with('Z'));
    assert!(
        fingerprints(&messages)
            .iter()
            .all(|m| m.subject == "runner-monitor.fingerprints.runner-a")
    );
    assert_no_canary_in(&messages);
    assert!(!agent_log(&dir).contains(CANARY));

    // Each job's signed attestation, published as written to the state directory, verifiable
    // from the stream alone.
    let mut published = Vec::new();
    wait_until("both jobs' attestations in the stream", 60, || {
        published = broker
            .messages(STREAM, None)
            .into_iter()
            .filter(|m| m.subject == "runner-monitor.attestations.runner-a")
            .collect();
        published.len() >= 2
    });
    for job in [&writer, &reader] {
        let wanted = format!("-{}.intoto.json", job.replace('/', "_"));
        let file = std::fs::read_dir(dir.join("state/attestations"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().ends_with(&wanted))
            .unwrap_or_else(|| panic!("no attestation file for {job}"));
        let written: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        let message = published
            .iter()
            .find(|m| m.payload == written)
            .unwrap_or_else(|| panic!("{job}'s attestation is not in the stream: {published:#?}"));
        let copy = root.join(format!("{}.intoto.json", job.replace('/', "_")));
        std::fs::write(&copy, message.payload.to_string()).unwrap();
        let verify = Command::new(target_dir().join("runner-monitor"))
            .args(["attest", "verify"])
            .arg(&copy)
            .arg("--public-key")
            .arg(dir.join("attestation.key.pub"))
            .output()
            .unwrap();
        assert!(verify.status.success(), "{verify:?}");
    }
    assert_eq!(published.len(), 2, "one message per job: {published:#?}");
    assert_no_canary_in(&broker.messages(STREAM, None));
    drop(agent);

    // A second host: this agent's recorded trace, replayed under another name.
    let out = Command::new(target_dir().join("runner-monitor"))
        .arg("replay")
        .arg(dir.join("events.jsonl"))
        .arg("--policy")
        .arg(dir.join("policy.toml"))
        .arg("--alerts-out")
        .arg(root.join("replayed.jsonl"))
        .args(["--nats", &broker.url(), "--host", "runner-b"])
        .arg("--spool-dir")
        .arg(root.join("replay-spool"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "replay failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let messages = broker.messages(STREAM, None);
    let replayed: Vec<&StreamMessage> = messages
        .iter()
        .filter(|m| m.subject.ends_with(".runner-b"))
        .collect();
    assert!(
        replayed
            .iter()
            .any(|m| m.subject == "runner-monitor.fingerprints.runner-b"
                && m.payload["fingerprint"] == made["fingerprint"]
                && m.payload["use"] == "read"),
        "{replayed:#?}"
    );
    assert!(
        replayed
            .iter()
            .any(|m| m.subject == "runner-monitor.findings.runner-b"
                && m.payload["rule"] == "cross-job-credential-reuse")
    );
    assert_no_canary_in(&messages);
    let _ = std::fs::remove_dir_all(root);
}

#[test]
fn a_broker_killed_mid_run_and_restarted_loses_and_duplicates_nothing() {
    let _one = one_agent();
    let root = std::env::temp_dir().join(format!("rm-broker-outage-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let broker = Broker::start(&root.join("broker"));
    let dir = fleet_dir("fleet-outage", "");
    let agent = Agent::launch(&dir, free_port(), &["--nats", &broker.url()]);
    let env = TestEnv::new("fleet-outage");
    let (_, reader) = write_then_read(&env, &agent, 51);
    wait_alert(&agent, "cross-job-credential-reuse", &reader, |_| true);
    wait_published(&broker, &agent, 2, None);
    // The broker crashes; jobs go on and their findings are spooled.
    let stopped = broker.kill();
    let before = alerts(&agent).len();
    let (_, reader) = write_then_read(&env, &agent, 53);
    wait_alert(&agent, "cross-job-credential-reuse", &reader, |_| true);
    assert!(alerts(&agent).len() > before);
    wait_until("a failed delivery in the log", 30, || {
        agent_log(&dir).contains("fleet stream delivery failed")
    });
    // It restarts on its store: everything arrives, once.
    let broker = Broker::restart(stopped);
    wait_published(&broker, &agent, before + 1, None);
    std::thread::sleep(Duration::from_secs(2));
    let messages = broker.messages(STREAM, None);
    assert_findings_published_once(&alerts(&agent), &messages);
    assert_no_canary_in(&messages);
    let _ = std::fs::remove_dir_all(root);
}

/// Makes `to` a copy of the spool directory `from` (files `from` lacks are removed).
fn copy_spool(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn an_agent_restarted_with_an_undelivered_spool_resumes_without_duplicates() {
    let _one = one_agent();
    let root = std::env::temp_dir().join(format!("rm-broker-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let port = free_port();
    let dir = fleet_dir("fleet-restart", "");
    let url = format!("nats://127.0.0.1:{port}");
    // No broker yet: everything the agent finds waits in its spool.
    let agent = Agent::launch(&dir, free_port(), &["--nats", &url]);
    let env = TestEnv::new("fleet-restart");
    let (_, reader) = write_then_read(&env, &agent, 61);
    wait_alert(&agent, "cross-job-credential-reuse", &reader, |_| true);
    assert!(agent.stop().success());
    let spooled = std::fs::read_to_string(dir.join("spool/nats.jsonl")).unwrap();
    assert!(spooled.lines().count() >= 2, "{spooled}");
    // As it is now: published by the next agent but, here, as if its cursor never moved.
    copy_spool(&dir.join("spool"), &root.join("spool-copy"));
    let broker = Broker::start_on(&root.join("broker"), port, None);
    let agent = Agent::launch(&dir, free_port(), &["--nats", &url]);
    wait_published(&broker, &agent, 2, None);
    let published = broker.messages(STREAM, None);
    assert!(agent.stop().success());
    assert_eq!(
        std::fs::read_to_string(dir.join("spool/nats.jsonl")).unwrap(),
        "",
        "the spool is delivered and emptied"
    );
    // A crash after the publish, before the cursor was saved: the next agent sends it all
    // again, with the same message ids, and the stream keeps one of each.
    copy_spool(&root.join("spool-copy"), &dir.join("spool"));
    let agent = Agent::launch(&dir, free_port(), &["--nats", &url]);
    wait_until("the resent spool delivered", 30, || {
        std::fs::read_to_string(dir.join("spool/nats.jsonl")).is_ok_and(|s| s.is_empty())
    });
    wait_published(&broker, &agent, findings(&published).len(), None);
    let messages = broker.messages(STREAM, None);
    assert_findings_published_once(&alerts(&agent), &messages);
    let mut prints: Vec<String> = fingerprints(&messages)
        .iter()
        .map(|m| m.payload.to_string())
        .collect();
    let before = prints.len();
    prints.sort();
    prints.dedup();
    assert_eq!(
        prints.len(),
        before,
        "a resent fingerprint was stored again"
    );
    assert!(messages.len() >= published.len());
    drop(agent);
    let _ = std::fs::remove_dir_all(root);
}

#[test]
fn tls_with_a_test_ca_delivers_and_an_unverifiable_server_keeps_findings_spooled() {
    let _one = one_agent();
    let root = std::env::temp_dir().join(format!("rm-broker-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let pki = TestPki::generate(&root.join("pki"));
    let broker = Broker::start_on(&root.join("broker"), free_port(), Some(pki.server_block()));
    let fleet = format!(
        "tls_ca = {:?}\ntls_cert = {:?}\ntls_key = {:?}\n",
        pki.ca.display(),
        pki.client_cert.display(),
        pki.client_key.display()
    );
    let dir = fleet_dir("fleet-tls", &fleet);
    let agent = Agent::launch(&dir, free_port(), &["--nats", &broker.url()]);
    let env = TestEnv::new("fleet-tls");
    let (_, reader) = write_then_read(&env, &agent, 71);
    wait_alert(&agent, "cross-job-credential-reuse", &reader, |_| true);
    wait_published(&broker, &agent, 2, Some(&pki));
    assert_findings_published_once(&alerts(&agent), &broker.messages(STREAM, Some(&pki)));
    drop(agent);

    // Another agent trusts another CA: the server's certificate does not verify.
    let other = TestPki::generate(&root.join("other-pki"));
    let fleet = format!(
        "tls_ca = {:?}\ntls_cert = {:?}\ntls_key = {:?}\n",
        other.ca.display(),
        pki.client_cert.display(),
        pki.client_key.display()
    );
    let dir = fleet_dir("fleet-tls-bad", &fleet);
    let agent = Agent::launch(&dir, free_port(), &["--nats", &broker.url()]);
    let before = broker.messages(STREAM, Some(&pki)).len();
    let (_, reader) = write_then_read(&env, &agent, 73);
    wait_alert(&agent, "cross-job-credential-reuse", &reader, |_| true);
    wait_until("the certificate error in the log", 30, || {
        agent_log(&dir).contains("fleet stream delivery failed")
    });
    let log = agent_log(&dir);
    let line = log
        .lines()
        .find(|l| l.contains("fleet stream delivery failed"))
        .unwrap();
    assert!(
        line.contains(&broker.url()) && line.to_lowercase().contains("certificate"),
        "not a clear certificate error: {line}"
    );
    let spooled = std::fs::read_to_string(dir.join("spool/nats.jsonl")).unwrap();
    assert!(
        spooled
            .lines()
            .filter(|l| l.starts_with("findings\t"))
            .count()
            >= alerts(&agent).len(),
        "findings not kept in the spool: {spooled}"
    );
    assert_eq!(broker.messages(STREAM, Some(&pki)).len(), before);
    drop(agent);
    let _ = std::fs::remove_dir_all(root);
}

#[test]
fn a_credentials_file_authenticates_and_a_user_of_another_operator_stays_spooled() {
    let _one = one_agent();
    let root = std::env::temp_dir().join(format!("rm-broker-creds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let auth = NatsAuth::generate("rm-test");
    let broker = Broker::start_authenticated(&root.join("broker"), &auth);
    let creds = root.join("agent.creds");
    std::fs::write(&creds, &auth.creds).unwrap();
    let dir = fleet_dir(
        "fleet-creds",
        &format!("credentials = {:?}\n", creds.display()),
    );
    let agent = Agent::launch(&dir, free_port(), &["--nats", &broker.url()]);
    let env = TestEnv::new("fleet-creds");
    let (_, reader) = write_then_read(&env, &agent, 81);
    wait_alert(&agent, "cross-job-credential-reuse", &reader, |_| true);
    wait_published(&broker, &agent, 2, None);
    assert_findings_published_once(&alerts(&agent), &broker.messages(STREAM, None));
    drop(agent);

    // A user of an operator the broker does not trust: refused, said so, findings kept.
    let stranger = root.join("stranger.creds");
    std::fs::write(&stranger, NatsAuth::generate("stranger").creds).unwrap();
    let dir = fleet_dir(
        "fleet-creds-bad",
        &format!("credentials = {:?}\n", stranger.display()),
    );
    let agent = Agent::launch(&dir, free_port(), &["--nats", &broker.url()]);
    let before = broker.messages(STREAM, None).len();
    let (_, reader) = write_then_read(&env, &agent, 83);
    wait_alert(&agent, "cross-job-credential-reuse", &reader, |_| true);
    wait_until("the authorization error in the log", 30, || {
        agent_log(&dir).contains("fleet stream delivery failed")
    });
    let log = agent_log(&dir);
    let line = log
        .lines()
        .find(|l| l.contains("fleet stream delivery failed"))
        .unwrap();
    assert!(
        line.contains(&broker.url()) && line.to_lowercase().contains("authori"),
        "not a clear authorization error: {line}"
    );
    let spooled = std::fs::read_to_string(dir.join("spool/nats.jsonl")).unwrap();
    assert!(
        spooled.lines().any(|l| l.starts_with("findings\t")),
        "findings not kept in the spool: {spooled}"
    );
    assert_eq!(broker.messages(STREAM, None).len(), before);
    // The seed in the credentials file never reaches the log.
    let seed = auth.creds.lines().find(|l| l.starts_with("SU")).unwrap();
    assert!(!log.contains(seed) && !agent_log(&dir).contains(seed));
    drop(agent);
    let _ = std::fs::remove_dir_all(root);
}
