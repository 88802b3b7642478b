//! Findings: what the engine raises, one JSON object each in the alert stream. Never a secret
//! value: paths, addresses, names and process identities only.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::{
    event::{ContainerInfo, JobInfo, JobKey},
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
    /// When the job ended (CLOCK_MONOTONIC nanoseconds), for a finding about an ended job. For
    /// an end the engine inferred (a staged job's last stage exited and no stage followed), the
    /// true end: the last stage's exit, not the moment the end was inferred.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ns: Option<u64>,
    /// The host the job ran on: set by the fleet correlator, whose findings span hosts (an
    /// agent's own findings are all of its host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// The step of the job a process belongs to: the job root's direct child that it descends from
/// (or, for a GitLab stage named on its shell's command line, the stage). Fields are absent when
/// unknown.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// The step's order among the job's steps, from 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u32>,
    /// `action` (GitHub JavaScript, composite or docker action), `run` (a GitHub `run:` script),
    /// `stage` (a GitLab stage) or `command` (anything else: the command the root ran).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// For an action: `owner/repo@ref` or `owner/repo/path@ref`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// The `run:` script's file, the stage's name, or the command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
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
    /// The path the process opened, when it is not `path` (a symlink, hard link or renamed
    /// copy of the credential: `identity`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_path: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationRef {
    pub ip: IpAddr,
    pub port: u16,
    /// The name the job resolved this address from, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_name: Option<String>,
    /// The server name (SNI) of the TLS ClientHello the connection sent, when the finding is
    /// about it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketRef {
    pub path: String,
    pub kind: String,
    /// The path the process connected to, when it is not `path` (a symlink to the socket, or
    /// the same socket under another name: `identity`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used_path: Option<String>,
}

/// A path something outside the job will run or read later, and its persistence kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistenceRef {
    pub path: String,
    /// The `[[persistence]]` kind: `cron`, `systemd`, `ld-preload`, `runner`, ...
    pub kind: String,
    /// How it was planted: `created or changed` (open for writing), `renamed onto`, `linked onto`.
    pub how: String,
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
    /// The step of the job the process was running in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<Step>,
    /// The job's container the process runs in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerInfo>,
    /// The Kubernetes pod of that container (its `pod`, moved up here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<crate::event::PodInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<CredentialRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<DestinationRef>,
    /// Block mode refused the connection in the kernel (`unexpected-egress`,
    /// `metadata-endpoint-access`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub blocked: bool,
    /// The raw, packet or ICMP socket a job process created (`unexpected-egress`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_socket: Option<crate::event::RawSocket>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<SocketRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<TargetProcess>,
    /// For persistence-planted: the path planted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistence: Option<PersistenceRef>,
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
            step: None,
            container: None,
            pod: None,
            credential: None,
            destination: None,
            blocked: false,
            raw_socket: None,
            socket: None,
            target: None,
            persistence: None,
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
            match &d.sni {
                // Each server name to one address is a finding of its own.
                Some(sni) => format!("{}:{} {sni}", d.ip, d.port),
                None => format!("{}:{}", d.ip, d.port),
            }
        } else if let Some(s) = &self.socket {
            s.path.clone()
        } else if let Some(t) = &self.target {
            format!("{}:{}", t.pid, t.access)
        } else if let Some(p) = &self.persistence {
            p.path.clone()
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
