//! The in-toto Statement about one job, built from its report (`crate::report::JobReport`) plus
//! what only the live agent knows (executable hashes, whether a credential left behind is still
//! there). Pure: no I/O, so the tests build statements from reports directly.
//!
//! The predicate is in-toto's runtime trace (v0.2): the standard fields where they fit (`monitor`,
//! `monitoredProcess`, `monitorLog.process|network|fileAccess`, `metadata`), and what they have
//! no place for under the extension field `runnerMonitor` (docs/attestations.md lists it all).

use std::{
    collections::HashMap,
    time::{Duration, SystemTime},
};

use serde::Serialize;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::{
    engine::Finding,
    event::JobKey,
    report::{Access, JobReport, Omitted, Survivor},
    rule::RuleId,
};

pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
pub const PREDICATE_TYPE: &str = "https://in-toto.io/attestation/runtime-trace/v0.2";
/// `predicate.monitor.type`.
pub const MONITOR_TYPE: &str = "urn:runner-monitor:monitor:v1";

/// What hashing an executable gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExeDigest {
    Sha256(String),
    /// Not hashed, and why (`unreadable: ...`, `larger than N bytes`).
    Unhashed(String),
}

/// What the live agent adds to a report.
pub struct Context<'a> {
    /// The host's name.
    pub host: &'a str,
    /// Wall-clock time at CLOCK_MONOTONIC 0 (to date the report's `*_ns`).
    pub epoch: SystemTime,
    /// When the statement is made (CLOCK_MONOTONIC ns).
    pub now_ns: u64,
    /// Executable path -> its digest when the job ran it.
    pub executables: &'a HashMap<String, ExeDigest>,
    /// Credential path left behind -> still there when the statement is made.
    pub still_present: &'a HashMap<String, bool>,
}

impl Context<'_> {
    fn time(&self, ns: u64) -> String {
        humantime::format_rfc3339_millis(self.epoch + Duration::from_nanos(ns)).to_string()
    }
}

/// Who the job is, as hashed into the subject's digest: the compact JSON of this object, fields
/// in this order, unknown ones empty.
#[derive(Clone, Debug, Serialize)]
pub struct JobIdentity {
    pub platform: String,
    pub repository: String,
    pub workflow: String,
    pub run: String,
    pub attempt: String,
    pub job: String,
    pub runner: String,
    pub host: String,
}

impl JobIdentity {
    pub fn of(report: &JobReport, host: &str) -> Self {
        let j = &report.job;
        let s = |v: &Option<String>| v.clone().unwrap_or_default();
        Self {
            platform: s(&j.platform),
            repository: s(&j.repository),
            workflow: s(&j.workflow),
            run: s(&j.run),
            attempt: s(&j.attempt),
            job: j.id.clone(),
            runner: s(&j.runner),
            host: host.to_owned(),
        }
    }

    pub fn canonical(&self) -> String {
        serde_json::to_string(self).expect("strings serialise")
    }

    pub fn sha256(&self) -> String {
        super::dsse::hex(&Sha256::digest(self.canonical().as_bytes()))
    }

    /// The subject's name: `PLATFORM/REPOSITORY/run/RUN/attempt/ATTEMPT/job/ID@HOST`, `-` for what
    /// is unknown.
    pub fn name(&self) -> String {
        let d = |s: &str| {
            if s.is_empty() {
                "-".to_owned()
            } else {
                s.to_owned()
            }
        };
        format!(
            "{}/{}/run/{}/attempt/{}/job/{}@{}",
            d(&self.platform),
            d(&self.repository),
            d(&self.run),
            d(&self.attempt),
            d(&self.job),
            d(&self.host)
        )
    }
}

/// A `file://` URI for a path (bytes outside the unreserved set and `/` percent-encoded).
pub fn file_uri(path: &str) -> String {
    let mut out = String::from("file://");
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The statement about `report`'s job, as JSON.
pub fn statement(report: &JobReport, cx: &Context<'_>) -> Value {
    let identity = JobIdentity::of(report, cx.host);
    json!({
        "_type": STATEMENT_TYPE,
        "subject": [{
            "name": identity.name(),
            "digest": { "sha256": identity.sha256() },
        }],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "monitor": {
                "type": MONITOR_TYPE,
                "version": env!("CARGO_PKG_VERSION"),
            },
            "monitoredProcess": monitored_process(report, &identity),
            "monitorLog": {
                "process": processes(report, cx),
                "network": network(report, cx),
                "fileAccess": file_access(report, cx),
            },
            "metadata": metadata(report, cx),
            "runnerMonitor": extension(report, cx, &identity),
        },
    })
}

fn monitored_process(report: &JobReport, id: &JobIdentity) -> Value {
    if id.platform == "github" && !id.repository.is_empty() && !id.run.is_empty() {
        let attempt = if id.attempt.is_empty() {
            "1"
        } else {
            &id.attempt
        };
        return json!({
            "hostID": "https://github.com",
            "type": "https://actions.github.io/buildtypes/workflow/v1",
            "event": format!(
                "https://github.com/{}/actions/runs/{}/attempts/{attempt}",
                id.repository, id.run
            ),
        });
    }
    let platform = report.job.platform.as_deref().unwrap_or("manual");
    json!({
        "hostID": format!("urn:runner-monitor:platform:{platform}"),
        "type": format!("urn:runner-monitor:job:{platform}"),
        "event": id.name(),
    })
}

fn processes(report: &JobReport, cx: &Context<'_>) -> Vec<Value> {
    report
        .processes
        .iter()
        .map(|p| {
            let mut o = Map::new();
            o.insert("pid".into(), p.pid.into());
            o.insert("ppid".into(), p.ppid.into());
            o.insert("comm".into(), p.comm.clone().into());
            if let Some(exe) = &p.exe {
                o.insert("processBinary".into(), exe.clone().into());
                if let Some(ExeDigest::Sha256(d)) = cx.executables.get(exe) {
                    o.insert("digest".into(), json!({ "sha256": d }));
                }
            }
            if let Some(argv) = &p.argv {
                o.insert("commandLine".into(), argv.clone().into());
            }
            o.insert("startedOn".into(), cx.time(p.start_ns).into());
            if let Some(t) = p.exit_ns {
                o.insert("exitedOn".into(), cx.time(t).into());
            }
            if let Some(code) = p.exit_code {
                o.insert("exitCode".into(), code.into());
            }
            if let Some(signal) = p.signal {
                o.insert("exitSignal".into(), signal.into());
            }
            if p.survivor {
                o.insert("survivor".into(), true.into());
            }
            Value::Object(o)
        })
        .collect()
}

/// How the engine judged a destination: from the findings about it. `blocked`: block mode
/// refused it in the kernel.
fn verdict(findings: &[Finding], ip: std::net::IpAddr, port: u16) -> &'static str {
    let mut verdict = "allowed";
    for f in findings {
        let Some(d) = &f.destination else { continue };
        if d.ip != ip || d.port != port {
            continue;
        }
        if f.blocked {
            return "blocked";
        }
        match f.rule {
            RuleId::MetadataEndpointAccess => return "metadata",
            RuleId::UnexpectedEgress => verdict = "unexpected",
            _ => {}
        }
    }
    verdict
}

fn network(report: &JobReport, cx: &Context<'_>) -> Vec<Value> {
    report
        .egress
        .iter()
        .map(|e| {
            let mut o = Map::new();
            o.insert("ip".into(), e.ip.to_string().into());
            if let Some(name) = &e.dns_name {
                o.insert("hostname".into(), name.clone().into());
            }
            o.insert("port".into(), e.port.into());
            o.insert("connections".into(), e.connections.into());
            o.insert("failed".into(), e.failed.into());
            o.insert("firstOn".into(), cx.time(e.first_ns).into());
            o.insert("afterJobEnd".into(), e.after_end.into());
            o.insert(
                "verdict".into(),
                verdict(&report.findings, e.ip, e.port).into(),
            );
            o.insert("invokingProcess".into(), json!({ "pids": e.pids }));
            Value::Object(o)
        })
        .collect()
}

/// Executables (with their digests) and credentials (kind and use; never a digest of a secret).
fn file_access(report: &JobReport, cx: &Context<'_>) -> Vec<Value> {
    let mut out = Vec::new();
    let mut runs: Vec<(&str, u64)> = Vec::new();
    for p in &report.processes {
        let Some(exe) = p.exe.as_deref() else {
            continue;
        };
        match runs.iter_mut().find(|(e, _)| *e == exe) {
            Some((_, n)) => *n += 1,
            None => runs.push((exe, 1)),
        }
    }
    for (exe, n) in runs {
        let mut o = Map::new();
        o.insert("name".into(), exe.into());
        o.insert("uri".into(), file_uri(exe).into());
        let mut annotations = json!({ "access": "exec", "execs": n });
        match cx.executables.get(exe) {
            Some(ExeDigest::Sha256(d)) => {
                o.insert("digest".into(), json!({ "sha256": d }));
            }
            Some(ExeDigest::Unhashed(why)) => annotations["unhashed"] = why.clone().into(),
            None => annotations["unhashed"] = "not seen by the agent's hasher".into(),
        }
        o.insert("annotations".into(), annotations);
        out.push(Value::Object(o));
    }
    for c in &report.credentials {
        let access = match c.access {
            Access::File => "credential-file",
            Access::Socket => "secret-socket",
            Access::Memory => "process-memory",
        };
        out.push(json!({
            "name": c.path,
            "uri": file_uri(&c.path),
            "annotations": {
                "access": access,
                "kind": c.kind,
                "reads": c.reads,
                "writes": c.writes,
                "failed": c.failed,
                "firstOn": cx.time(c.first_ns),
                "afterJobEnd": c.after_end,
                "pids": c.pids,
            },
        }));
    }
    out
}

fn metadata(report: &JobReport, cx: &Context<'_>) -> Value {
    let mut o = json!({ "buildStartedOn": cx.time(report.start_ns) });
    if let Some(end) = report.end_ns {
        o["buildFinishedOn"] = cx.time(end).into();
    }
    o
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LeftBehind<'a> {
    path: &'a str,
    kind: &'a str,
    /// Still there when the job ended.
    left_on: String,
    /// Gone when the statement was made (at `checked_on`).
    removed: bool,
    checked_on: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Extension<'a> {
    job_key: JobKey,
    job: &'a crate::event::JobInfo,
    /// The object the subject's digest is the SHA-256 of.
    identity: &'a JobIdentity,
    attested_on: String,
    survivors: &'a [Survivor],
    credentials_left_behind: Vec<LeftBehind<'a>>,
    findings: Vec<Value>,
    omitted: &'a Omitted,
    not_tracked: &'a [String],
}

fn extension(report: &JobReport, cx: &Context<'_>, identity: &JobIdentity) -> Value {
    let left = report
        .findings
        .iter()
        .filter(|f| f.rule == RuleId::CredentialLeftBehind)
        .filter_map(|f| {
            let c = f.credential.as_ref()?;
            Some(LeftBehind {
                path: &c.path,
                kind: &c.kind,
                left_on: cx.time(f.time_ns),
                removed: !cx.still_present.get(&c.path).copied().unwrap_or(true),
                checked_on: cx.time(cx.now_ns),
            })
        })
        .collect();
    let findings = report
        .findings
        .iter()
        .map(|f| {
            let mut v = serde_json::to_value(f).expect("findings serialise");
            v["time"] = cx.time(f.time_ns).into();
            v
        })
        .collect();
    serde_json::to_value(Extension {
        job_key: report.key,
        job: &report.job,
        identity,
        attested_on: cx.time(cx.now_ns),
        survivors: &report.survivors,
        credentials_left_behind: left,
        findings,
        omitted: &report.omitted,
        not_tracked: &report.not_tracked,
    })
    .expect("the extension serialises")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::finding::DestinationRef;

    #[test]
    fn a_destination_block_mode_refused_is_blocked_whatever_else_was_said_of_it() {
        let ip: std::net::IpAddr = "203.0.113.9".parse().unwrap();
        let about = |rule, blocked| {
            let mut f = Finding::new(rule, 1, String::new());
            f.destination = Some(DestinationRef {
                ip,
                port: 443,
                dns_name: None,
                sni: None,
            });
            f.blocked = blocked;
            f
        };
        let unexpected = about(RuleId::UnexpectedEgress, false);
        let refused = about(RuleId::UnexpectedEgress, true);
        assert_eq!(
            verdict(std::slice::from_ref(&unexpected), ip, 443),
            "unexpected"
        );
        assert_eq!(verdict(&[unexpected, refused], ip, 443), "blocked");
        assert_eq!(verdict(&[], ip, 443), "allowed");
    }
}
