//! Findings in the SOC's format: each finding as an OCSF Detection Finding (class 2004, OCSF
//! 1.5.0), for `--alerts-format ocsf` and per-sink `--webhook-format ocsf`.
//!
//! Where our finding goes (docs/ocsf.md has the table and a real example):
//! - the rule: `finding_info` (`uid` stable per finding, `title`, `types` = [rule id],
//!   `analytic` = the rule), the ATT&CK technique in `finding_info.attacks`;
//! - the acting process: `evidences[0].process` (pid, name, cmd_line, executable as `file`, user
//!   id, and the ancestry as nested `parent_process` plus `lineage`);
//! - the credential file or secret socket: `evidences[0].file` (a socket is `type_id` 5, Local
//!   Socket); the destination: `evidences[0].dst_endpoint`; a process whose memory was read:
//!   a second evidence named `target-process`;
//! - the CI job (and for cross-job reuse the job that materialised the credential): `resources`
//!   of type `ci-job`, the job's identity in `labels` and `data`; the credential's kind and
//!   fingerprint (a keyed hash, never the value): a resource of type `credential`;
//! - the host: `device`; the whole native finding: `unmapped` (it holds no secret either).

use std::{
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::{
    engine::{
        Finding,
        finding::{FindingJob, FindingProcess},
    },
    rule::{RuleId, Severity},
};

/// The OCSF version the findings declare (`metadata.version`) and are validated against.
pub const OCSF_VERSION: &str = "1.5.0";
pub const CLASS_UID: u32 = 2004;
pub const CATEGORY_UID: u32 = 2;
/// `activity_id` 1 (Create): a new finding; we never update or close one.
pub const ACTIVITY_ID: u32 = 1;
pub const TYPE_UID: u32 = CLASS_UID * 100 + ACTIVITY_ID;

/// How findings are written: our own JSON lines, or OCSF Detection Findings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AlertFormat {
    /// One JSON object per finding, as documented in docs/commands.md (the default).
    #[default]
    Json,
    /// One OCSF 1.5.0 Detection Finding per finding.
    Ocsf,
}

/// `severity_id` and its caption.
fn severity(s: Severity) -> (u8, &'static str) {
    match s {
        Severity::Info => (1, "Informational"),
        Severity::Low => (2, "Low"),
        Severity::Medium => (3, "Medium"),
        Severity::High => (4, "High"),
        Severity::Critical => (5, "Critical"),
    }
}

/// What a finding of `rule` is, in a few words (`finding_info.title`).
fn title(rule: RuleId) -> &'static str {
    match rule {
        RuleId::CredentialAfterJobEnd => "Credential used after its job ended",
        RuleId::ProcessSurvivedJob => "Process survived its CI job",
        RuleId::CredentialLeftBehind => "Credential left behind by a CI job",
        RuleId::CrossJobCredentialReuse => "Credential reused by another CI job",
        RuleId::UnexpectedEgress => "Unexpected egress from a CI job",
        RuleId::ProcessMemoryAccess => "CI job read another process's memory",
        RuleId::SecretSocketAccess => "CI job used a secret socket it is not entitled to",
        RuleId::MetadataEndpointAccess => "CI job reached a cloud metadata endpoint",
        RuleId::RunnerCredentialAccess => "CI job read the runner's registration credentials",
        RuleId::CredentialHarvesting => "Credential harvesting in a CI job",
        RuleId::AgentTamper => "CI job tampered with the runtime monitor",
        RuleId::SensorDegraded => "Runtime monitor sensor degraded",
        RuleId::BaselineDeviation => "CI job deviated from its repository's baseline",
        RuleId::PersistencePlanted => "CI job planted persistence for something outside it to run",
    }
}

/// The ATT&CK tactic of the techniques our rules name (by technique id, without sub-technique).
fn tactic(technique: &str) -> Option<(&'static str, &'static str)> {
    Some(match technique {
        "T1552" | "T1003" => ("TA0006", "Credential Access"),
        "T1543" | "T1053" | "T1546" | "T1574" | "T1098" => ("TA0003", "Persistence"),
        "T1550" => ("TA0008", "Lateral Movement"),
        "T1041" => ("TA0010", "Exfiltration"),
        "T1562" => ("TA0005", "Defense Evasion"),
        _ => return None,
    })
}

/// `finding_info.attacks`: technique, sub-technique and tactic from `T1552.001` and
/// `Unsecured Credentials: Credentials In Files`.
fn attack(id: &str, name: &str) -> Value {
    let (technique_id, sub) = match id.split_once('.') {
        Some((t, _)) => (t, true),
        None => (id, false),
    };
    let (technique_name, sub_name) = match name.split_once(": ") {
        Some((t, s)) if sub => (t, Some(s)),
        _ => (name, None),
    };
    let mut attack = json!({"technique": {"uid": technique_id, "name": technique_name}});
    if let Some(sub_name) = sub_name {
        attack["sub_technique"] = json!({"uid": id, "name": sub_name});
    }
    if let Some((uid, name)) = tactic(technique_id) {
        attack["tactic"] = json!({"uid": uid, "name": name});
    }
    attack
}

fn basename(path: &str) -> &str {
    Path::new(path)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(path)
}

/// An OCSF `file`: `type_id` 1 is Regular File, 5 Local Socket.
fn file(path: &str, type_id: u8) -> Value {
    let caption = if type_id == 5 {
        "Local Socket"
    } else {
        "Regular File"
    };
    json!({"name": basename(path), "path": path, "type_id": type_id, "type": caption})
}

/// The acting process, its ancestors (parent first) as nested `parent_process`.
fn process(p: &FindingProcess) -> Value {
    let mut parent: Option<Value> = None;
    for a in p.ancestry.iter().rev() {
        let mut obj = json!({"pid": a.pid});
        if let Some(exe) = &a.exe {
            obj["file"] = file(exe, 1);
            obj["name"] = json!(basename(exe));
        }
        if let Some(child) = parent.take() {
            obj["parent_process"] = child;
        }
        parent = Some(obj);
    }
    let mut obj = json!({
        "pid": p.pid,
        "name": p.comm,
        "user": {"uid": p.uid.to_string()},
    });
    if let Some(exe) = &p.exe {
        obj["file"] = file(exe, 1);
    }
    if let Some(cmd) = &p.cmdline {
        obj["cmd_line"] = json!(cmd);
    }
    if let Some(parent) = parent {
        obj["parent_process"] = parent;
    }
    let lineage: Vec<&str> = p.ancestry.iter().filter_map(|a| a.exe.as_deref()).collect();
    if !lineage.is_empty() {
        obj["lineage"] = json!(lineage);
    }
    obj
}

/// A CI job as an OCSF resource: its id as `uid`, who it is in `labels` (`key:value`) and `data`.
fn job_resource(job: &FindingJob, role: &str) -> Value {
    let info = &job.info;
    let mut labels = vec![format!("role:{role}"), format!("ended:{}", job.ended)];
    for (name, value) in [
        ("platform", &info.platform),
        ("repository", &info.repository),
        ("workflow", &info.workflow),
        ("run", &info.run),
        ("attempt", &info.attempt),
        ("runner", &info.runner),
        ("actor", &info.actor),
        ("ref", &info.git_ref),
        ("event", &info.event),
    ] {
        if let Some(v) = value {
            labels.push(format!("{name}:{v}"));
        }
    }
    let mut resource = json!({
        "type": "ci-job",
        "uid": info.id,
        "name": info.id,
        "labels": labels,
        "data": serde_json::to_value(job).unwrap_or(Value::Null),
    });
    if let Some(repo) = &info.repository {
        resource["group"] = json!({"name": repo});
    }
    resource
}

/// `finding_info.uid`: the same finding (host, rule, job, process, object, time) always gets the
/// same id, so a finding delivered twice (a resend after a crash) is recognisably one.
pub fn finding_uid(finding: &Finding, host: &str) -> String {
    let identity = format!("{host}|{}|{}", finding.dedup_key(), finding.time_ns);
    let digest = Sha256::digest(identity.as_bytes());
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// Milliseconds since the epoch.
fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `finding` (as the alert stream writes it: `native`) as an OCSF Detection Finding, at wall
/// time `time`, raised on `host`.
pub fn detection_finding(finding: &Finding, native: &Value, time: SystemTime, host: &str) -> Value {
    let (severity_id, severity_name) = severity(finding.severity);
    let time_ms = millis(time);
    let rule = finding.rule.as_str();
    let mut evidence = Map::new();
    evidence.insert("name".into(), json!(rule));
    if let Some(p) = &finding.process {
        evidence.insert("process".into(), process(p));
    }
    if let Some(c) = &finding.credential {
        evidence.insert("file".into(), file(&c.path, 1));
    } else if let Some(s) = &finding.socket {
        evidence.insert("file".into(), file(&s.path, 5));
    }
    if let Some(d) = &finding.destination {
        let mut endpoint = json!({"ip": d.ip.to_string(), "port": d.port});
        if let Some(name) = &d.dns_name {
            endpoint["hostname"] = json!(name);
        }
        evidence.insert("dst_endpoint".into(), endpoint);
        if let Some(sni) = &d.sni {
            // The TLS server name the connection sent (OCSF's `tls.sni` has no place here).
            evidence.insert("data".into(), json!({"sni": sni}));
        }
    }
    let mut evidences = Vec::new();
    // An evidence needs at least one of its objects; a sensor finding may have none.
    if evidence.len() > 1 {
        evidences.push(Value::Object(evidence));
    }
    if let Some(t) = &finding.target {
        let mut target = json!({"pid": t.pid});
        if let Some(exe) = &t.exe {
            target["file"] = file(exe, 1);
            target["name"] = json!(basename(exe));
        }
        evidences.push(
            json!({"name": "target-process", "process": target, "data": {"access": t.access}}),
        );
    }
    let mut resources = Vec::new();
    if let Some(job) = &finding.job {
        resources.push(job_resource(job, "job"));
    }
    if let Some(job) = &finding.origin_job {
        resources.push(job_resource(job, "credential-origin"));
    }
    if let Some(c) = &finding.credential {
        let mut data = json!({"kind": c.kind, "path": c.path});
        if let Some(fp) = &c.fingerprint {
            data["fingerprint"] = json!(fp);
        }
        resources.push(json!({"type": "credential", "uid": c.path, "name": c.kind, "data": data}));
    } else if let Some(s) = &finding.socket {
        resources.push(json!({"type": "secret-socket", "uid": s.path, "name": s.kind}));
    }
    let mut out = json!({
        "class_uid": CLASS_UID,
        "class_name": "Detection Finding",
        "category_uid": CATEGORY_UID,
        "category_name": "Findings",
        "activity_id": ACTIVITY_ID,
        "activity_name": "Create",
        "type_uid": TYPE_UID,
        "type_name": "Detection Finding: Create",
        "severity_id": severity_id,
        "severity": severity_name,
        "status_id": 1,
        "status": "New",
        "is_alert": true,
        "time": time_ms,
        "message": finding.summary,
        "metadata": {
            "version": OCSF_VERSION,
            "product": {
                "name": "runner-monitor",
                "vendor_name": "runner-monitor",
                "version": env!("CARGO_PKG_VERSION"),
            },
            "log_name": "findings",
        },
        "finding_info": {
            "uid": finding_uid(finding, host),
            "title": title(finding.rule),
            "desc": finding.summary,
            "types": [rule],
            "created_time": time_ms,
            "analytic": {"uid": rule, "name": rule, "type_id": 1, "type": "Rule"},
            "attacks": [attack(&finding.mitre.id, &finding.mitre.name)],
        },
        "device": {"hostname": host, "type_id": 1, "type": "Server"},
        "unmapped": native,
    });
    if !evidences.is_empty() {
        out["evidences"] = json!(evidences);
    }
    if !resources.is_empty() {
        out["resources"] = json!(resources);
    }
    out
}

/// An alert as spooled (our JSON, with its RFC 3339 `time` when the agent knew it) in OCSF; the
/// time of delivery stands in for a missing `time`. `None` if it is not a finding.
pub fn from_alert(alert: &Value, host: &str) -> Option<Value> {
    let finding: Finding = serde_json::from_value(alert.clone()).ok()?;
    let time = alert["time"]
        .as_str()
        .and_then(|t| humantime::parse_rfc3339(t).ok())
        .unwrap_or_else(SystemTime::now);
    Some(detection_finding(&finding, alert, time, host))
}

#[cfg(test)]
mod tests;
