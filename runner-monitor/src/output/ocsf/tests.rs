use std::time::Duration;

use super::*;
use crate::{
    engine::finding::{Ancestor, CredentialRef, DestinationRef, SocketRef, TargetProcess},
    event::{JobInfo, JobKey},
};

fn job(id: &str, repository: &str) -> FindingJob {
    FindingJob {
        key: JobKey(7),
        info: JobInfo {
            id: id.into(),
            platform: Some("github".into()),
            repository: Some(repository.into()),
            workflow: Some("ci".into()),
            run: Some("4097".into()),
            runner: None,
            attempt: None,
            actor: None,
            git_ref: None,
            event: None,
            tracking_id: None,
        },
        ended: true,
        ended_ns: None,
        host: None,
    }
}

fn survivor() -> FindingProcess {
    FindingProcess {
        pid: 4242,
        exe: Some("/usr/bin/python3".into()),
        cmdline: Some("python3 exfil.py".into()),
        comm: "python3".into(),
        uid: 1001,
        ancestry: vec![
            Ancestor {
                pid: 4200,
                exe: Some("/usr/bin/bash".into()),
            },
            Ancestor {
                pid: 100,
                exe: Some("/home/runner/bin/Runner.Worker".into()),
            },
        ],
    }
}

fn at() -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(1_795_000_000_123)
}

fn render(f: &Finding) -> Value {
    let native = serde_json::to_value(f).unwrap();
    detection_finding(f, &native, at(), "runner-1")
}

#[test]
fn credential_after_job_end_is_a_critical_detection_finding_with_job_process_and_file() {
    let mut f = Finding::new(
        RuleId::CredentialAfterJobEnd,
        5_000,
        "python3 read aws credentials after its job ended".into(),
    );
    f.job = Some(job("run-4097", "acme/app"));
    f.process = Some(survivor());
    f.credential = Some(CredentialRef {
        path: "/home/runner/.aws/credentials".into(),
        kind: "aws".into(),
        fingerprint: Some("k1:0123abcd".into()),
        used_path: None,
    });
    let o = render(&f);
    assert_eq!(o["class_uid"], 2004);
    assert_eq!(o["category_uid"], 2);
    assert_eq!(o["type_uid"], 200401);
    assert_eq!(o["activity_id"], 1);
    assert_eq!(o["severity_id"], 5);
    assert_eq!(o["time"], 1_795_000_000_123u64);
    assert_eq!(o["metadata"]["version"], OCSF_VERSION);
    assert_eq!(o["metadata"]["product"]["name"], "runner-monitor");
    assert_eq!(
        o["finding_info"]["types"],
        json!(["credential-after-job-end"])
    );
    assert_eq!(
        o["finding_info"]["attacks"][0],
        json!({"technique": {"uid": "T1552", "name": "Unsecured Credentials"},
               "sub_technique": {"uid": "T1552.001", "name": "Credentials In Files"},
               "tactic": {"uid": "TA0006", "name": "Credential Access"}})
    );
    let ev = &o["evidences"][0];
    assert_eq!(ev["file"]["path"], "/home/runner/.aws/credentials");
    assert_eq!(ev["file"]["name"], "credentials");
    assert_eq!(ev["process"]["pid"], 4242);
    assert_eq!(ev["process"]["cmd_line"], "python3 exfil.py");
    assert_eq!(ev["process"]["parent_process"]["pid"], 4200);
    assert_eq!(
        ev["process"]["parent_process"]["parent_process"]["file"]["path"],
        "/home/runner/bin/Runner.Worker"
    );
    assert_eq!(
        ev["process"]["lineage"][1],
        "/home/runner/bin/Runner.Worker"
    );
    let resources = o["resources"].as_array().unwrap();
    assert_eq!(resources[0]["type"], "ci-job");
    assert_eq!(resources[0]["uid"], "run-4097");
    assert_eq!(resources[0]["group"]["name"], "acme/app");
    assert!(
        resources[0]["labels"]
            .as_array()
            .unwrap()
            .contains(&json!("repository:acme/app"))
    );
    assert_eq!(resources[1]["type"], "credential");
    assert_eq!(resources[1]["data"]["fingerprint"], "k1:0123abcd");
    assert_eq!(o["unmapped"]["rule"], "credential-after-job-end");
    assert_eq!(o["device"]["hostname"], "runner-1");
}

#[test]
fn memory_access_names_the_target_process_in_a_second_evidence() {
    let mut f = Finding::new(RuleId::ProcessMemoryAccess, 1, "s".into());
    f.process = Some(survivor());
    f.target = Some(TargetProcess {
        pid: 100,
        exe: Some("/home/runner/bin/Runner.Worker".into()),
        access: "/proc/<pid>/mem".into(),
    });
    let o = render(&f);
    assert_eq!(o["evidences"][1]["name"], "target-process");
    assert_eq!(o["evidences"][1]["process"]["pid"], 100);
    assert_eq!(o["evidences"][1]["data"]["access"], "/proc/<pid>/mem");
    assert_eq!(
        o["finding_info"]["attacks"][0]["sub_technique"]["uid"],
        "T1003.007"
    );
}

#[test]
fn egress_and_sockets_go_to_dst_endpoint_and_a_local_socket_file() {
    let mut f = Finding::new(RuleId::UnexpectedEgress, 1, "s".into());
    f.destination = Some(DestinationRef {
        ip: "203.0.113.9".parse().unwrap(),
        port: 443,
        dns_name: Some("exfil.example".into()),
        sni: Some("exfil.example".into()),
    });
    let o = render(&f);
    assert_eq!(
        o["evidences"][0]["dst_endpoint"],
        json!({"ip": "203.0.113.9", "port": 443, "hostname": "exfil.example"})
    );
    assert_eq!(o["evidences"][0]["data"], json!({"sni": "exfil.example"}));
    assert_eq!(o["severity_id"], 3);
    assert_eq!(
        o["finding_info"]["attacks"][0],
        json!({"technique": {"uid": "T1041", "name": "Exfiltration Over C2 Channel"},
               "tactic": {"uid": "TA0010", "name": "Exfiltration"}})
    );

    let mut f = Finding::new(RuleId::SecretSocketAccess, 1, "s".into());
    f.socket = Some(SocketRef {
        path: "/var/run/docker.sock".into(),
        kind: "docker".into(),
        used_path: None,
    });
    let o = render(&f);
    assert_eq!(o["evidences"][0]["file"]["type_id"], 5);
    assert_eq!(o["resources"][0]["type"], "secret-socket");
}

#[test]
fn a_sensor_finding_without_objects_has_no_empty_evidence() {
    let o = render(&Finding::new(
        RuleId::SensorDegraded,
        1,
        "lost events".into(),
    ));
    assert!(o.get("evidences").is_none());
    assert!(o.get("resources").is_none());
    assert_eq!(o["severity_id"], 4);
}

#[test]
fn finding_uid_is_stable_per_finding_and_differs_between_findings() {
    let mut f = Finding::new(RuleId::AgentTamper, 1, "s".into());
    f.process = Some(survivor());
    let a = finding_uid(&f, "runner-1");
    assert_eq!(a, finding_uid(&f.clone(), "runner-1"));
    assert_eq!(a.len(), 32);
    assert_ne!(a, finding_uid(&f, "runner-2"));
    let mut later = f.clone();
    later.time_ns = 2;
    assert_ne!(a, finding_uid(&later, "runner-1"));
}

#[test]
fn a_spooled_alert_keeps_its_own_time() {
    let mut f = Finding::new(RuleId::AgentTamper, 1, "s".into());
    f.process = Some(survivor());
    let mut alert = serde_json::to_value(&f).unwrap();
    alert["time"] = json!("2026-11-22T08:00:00.250Z");
    let o = from_alert(&alert, "runner-1").unwrap();
    assert_eq!(o["time"], 1_795_334_400_250u64);
    assert_eq!(o["unmapped"]["time"], "2026-11-22T08:00:00.250Z");
    assert!(from_alert(&json!({"not": "a finding"}), "h").is_none());
}

#[test]
fn the_alert_stream_and_a_webhook_give_a_finding_the_same_uid() {
    let mut f = Finding::new(RuleId::CredentialLeftBehind, 9, "s".into());
    f.job = Some(job("run-1", "acme/app"));
    let direct = render(&f);
    let spooled = from_alert(&serde_json::to_value(&f).unwrap(), "runner-1").unwrap();
    assert_eq!(
        direct["finding_info"]["uid"],
        spooled["finding_info"]["uid"]
    );
}
