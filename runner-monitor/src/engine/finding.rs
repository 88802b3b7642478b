//! Findings: what the engine raises, one JSON object each in the alert stream. Never a secret
//! value: paths, addresses, names and process identities only.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::{
    event::{JobInfo, JobKey},
    rule::{RuleId, Severity},
};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mitre {
    pub id: String,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FindingJob {
    pub key: JobKey,
    /// Who the job is: id, platform, repository, workflow, run, runner, ...
    #[serde(flatten)]
    pub info: JobInfo,
    /// The job had ended when this happened.
    pub ended: bool,
    /// The host the job ran on: set by the fleet correlator, whose findings span hosts (an
    /// agent's own findings are all of its host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ancestor {
    pub pid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FindingProcess {
    pub pid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    pub comm: String,
    pub uid: u32,
    /// Parent first, up to the job's root.
    pub ancestry: Vec<Ancestor>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialRef {
    pub path: String,
    pub kind: String,
    /// Keyed hash of the content (when fingerprints are on): the same token under another path
    /// or on another host has the same fingerprint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationRef {
    pub ip: IpAddr,
    pub port: u16,
    /// The name the job resolved this address from, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketRef {
    pub path: String,
    pub kind: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetProcess {
    pub pid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    /// How it was accessed: `/proc/<pid>/mem`, `ptrace attach`, `process_vm_readv`, `signal 15`.
    pub access: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub rule: RuleId,
    pub severity: Severity,
    pub mitre: Mitre,
    /// CLOCK_MONOTONIC nanoseconds of the event that raised it.
    pub time_ns: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<FindingJob>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<FindingProcess>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<CredentialRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<DestinationRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<SocketRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<TargetProcess>,
    /// For cross-job reuse: the job that materialised the credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin_job: Option<FindingJob>,
    /// For survivors: how the process escaped the job (`re-parented`, `setsid`, `nohup`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub escape: Vec<String>,
    /// For harvesting: the credential kinds touched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kinds: Vec<String>,
    pub summary: String,
}

impl Finding {
    /// A finding of `rule` with its default severity and technique, and nothing attached yet.
    pub fn new(rule: RuleId, time_ns: u64, summary: String) -> Self {
        let technique = rule.technique();
        Self {
            rule,
            severity: rule.default_severity(),
            mitre: Mitre {
                id: technique.id.to_owned(),
                name: technique.name.to_owned(),
            },
            time_ns,
            job: None,
            process: None,
            credential: None,
            destination: None,
            socket: None,
            target: None,
            origin_job: None,
            escape: Vec::new(),
            kinds: Vec::new(),
            summary,
        }
    }

    /// What identifies "the same finding" for deduplication.
    pub fn dedup_key(&self) -> String {
        let object = if let Some(c) = &self.credential {
            c.path.clone()
        } else if let Some(d) = &self.destination {
            format!("{}:{}", d.ip, d.port)
        } else if let Some(s) = &self.socket {
            s.path.clone()
        } else if let Some(t) = &self.target {
            format!("{}:{}", t.pid, t.access)
        } else {
            String::new()
        };
        format!(
            "{}|{}|{}|{}",
            self.rule,
            self.job.as_ref().map_or(0, |j| j.key.0),
            self.process.as_ref().map_or(0, |p| p.pid),
            object
        )
    }
}
