//! What a job report holds: the shapes `runner-monitor report --format json` prints and every
//! other format renders.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::{
    engine::{Finding, Step},
    event::{JobInfo, JobKey},
};

/// One process of a job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessNode {
    pub pid: u32,
    /// The parent (by fork), 0 when not seen.
    pub ppid: u32,
    pub comm: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    /// The command line, cut at `ARGV_CHARS` characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv: Option<String>,
    pub start_ns: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_ns: Option<u64>,
    /// The status passed to `exit_group`; absent when killed or still running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The signal that killed it, when the kernel's layout is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Still alive after the job ended plus its grace period (`process-survived-job`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub survivor: bool,
    /// The step it runs in: its position in `JobReport::steps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<usize>,
    /// It set up an io_uring instance (requests submitted there make no syscall).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub io_uring: bool,
}

/// A step of the job: what started it (see `engine::step`), by which process, when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepNode {
    #[serde(flatten)]
    pub step: Step,
    /// The process that started it (the job root's direct child, or a named stage's shell).
    pub pid: u32,
    pub start_ns: u64,
}

/// How a credential was touched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// A credential file (by the policy's credential kinds).
    File,
    /// A secret socket connected to.
    Socket,
    /// Another process's `/proc/<pid>/{mem,environ,maps}`.
    Memory,
}

/// A credential object the job touched, and how often.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialUse {
    pub path: String,
    pub kind: String,
    pub access: Access,
    /// Successful reads (for sockets: connections).
    pub reads: u64,
    pub writes: u64,
    /// Attempts that failed.
    pub failed: u64,
    pub first_ns: u64,
    /// The first processes that touched it.
    pub pids: Vec<u32>,
    /// Some of it happened after the job ended.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub after_end: bool,
}

/// A destination the job connected to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Egress {
    pub ip: IpAddr,
    pub port: u16,
    /// The name the job resolved this address from, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_name: Option<String>,
    pub connections: u64,
    pub failed: u64,
    /// TLS server names (SNI) the job's connections here sent (the first few).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sni: Vec<String>,
    pub first_ns: u64,
    pub pids: Vec<u32>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub after_end: bool,
}

/// A process that outlived its job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Survivor {
    pub pid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// How it escaped (`re-parented`, `setsid`, `nohup`, ...).
    pub escape: Vec<String>,
}

/// What did not fit the report's bounds, counted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Omitted {
    pub processes: u64,
    pub credentials: u64,
    pub egress: u64,
    pub findings: u64,
    #[serde(default)]
    pub steps: u64,
}

impl Omitted {
    pub fn any(&self) -> bool {
        self.processes + self.credentials + self.egress + self.findings + self.steps > 0
    }
}

/// What one job did: the `--format json` of `runner-monitor report`, and what every other format
/// renders.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobReport {
    /// The kernel's key of the job (`/jobs/KEY` on the endpoint).
    pub key: JobKey,
    /// Who the job is: id, platform, repository, workflow, run, runner, ...
    pub job: JobInfo,
    /// The first event of the job the agent saw (CLOCK_MONOTONIC ns, as every `*_ns` here).
    pub start_ns: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_ns: Option<u64>,
    /// Every process, in the order they appeared; `ppid` makes the tree.
    pub processes: Vec<ProcessNode>,
    /// The job's steps, in the order they started.
    #[serde(default)]
    pub steps: Vec<StepNode>,
    pub credentials: Vec<CredentialUse>,
    pub egress: Vec<Egress>,
    pub survivors: Vec<Survivor>,
    /// In the order raised.
    pub findings: Vec<Finding>,
    #[serde(default)]
    pub omitted: Omitted,
    /// What the agent does not track yet, absent from the report: containers.
    pub not_tracked: Vec<String>,
}

/// A line of `/jobs`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSummary {
    pub key: JobKey,
    pub job: JobInfo,
    pub start_ns: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_ns: Option<u64>,
    pub processes: usize,
    pub findings: usize,
    /// The most severe finding's severity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worst: Option<crate::rule::Severity>,
}
