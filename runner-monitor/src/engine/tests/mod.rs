//! The engine, driven with event sequences and timestamps.

mod baseline;
mod containers;
mod credentials;
mod ends;
mod jobs;
mod network;
mod persistence;
mod steps;

use std::sync::Arc;

use super::*;
use crate::{
    event::{
        Connect, Dns, FileAccess, JobOverBudget, JobRef, ProcessRef, SensorStatus, SocketFamily,
    },
    rule::{RuleId, Severity},
};

pub(super) const S: u64 = 1_000_000_000;

/// Builds events of jobs: `t` in seconds.
pub(super) struct Trace {
    pub(super) engine: Engine,
    pub(super) findings: Vec<Finding>,
    pub(super) ended: BTreeSet<u64>,
    /// The cgroup id of the events fed from now on.
    pub(super) cgroup: u64,
}

impl Trace {
    pub(super) fn new() -> Self {
        Self::with_policy(Policy::builtin())
    }

    pub(super) fn with_policy(policy: Policy) -> Self {
        Self {
            engine: Engine::new(Arc::new(policy)),
            findings: Vec::new(),
            ended: BTreeSet::new(),
            cgroup: 1,
        }
    }

    pub(super) fn feed(
        &mut self,
        t: u64,
        job: u64,
        pid: u32,
        ppid: u32,
        comm: &str,
        detail: EventDetail,
    ) {
        self.feed_as(t, job, false, pid, ppid, comm, detail);
    }

    /// `feed`, saying whether the process is its (kernel) job's root.
    #[expect(
        clippy::too_many_arguments,
        reason = "a test helper that reads like the event"
    )]
    pub(super) fn feed_as(
        &mut self,
        t: u64,
        job: u64,
        root: bool,
        pid: u32,
        ppid: u32,
        comm: &str,
        detail: EventDetail,
    ) {
        let event = Event {
            time_ns: t * S,
            job: (job != 0).then(|| JobRef {
                key: JobKey(job),
                ended: self.ended.contains(&job),
                root,
            }),
            process: ProcessRef {
                pid,
                tid: pid,
                ppid,
                uid: 1001,
                comm: comm.into(),
                cgroup_id: self.cgroup,
            },
            truncated: false,
            detail,
        };
        let found = self.engine.handle(&event);
        self.findings.extend(found);
    }

    pub(super) fn start(&mut self, t: u64, job: u64, root: u32, repository: &str) {
        self.feed(
            t,
            job,
            root,
            1,
            "Runner.Worker",
            EventDetail::JobStart(JobInfo {
                id: format!("run-{job}"),
                platform: Some("github".into()),
                repository: Some(repository.into()),
                workflow: Some("ci".into()),
                run: Some(job.to_string()),
                runner: Some("runner-1".into()),
                ..JobInfo::default()
            }),
        );
    }

    /// The job-completed hook, then the root's exit.
    pub(super) fn end(&mut self, t: u64, job: u64, root: u32) {
        self.feed(t, job, root, 1, "Runner.Worker", EventDetail::JobEnd);
        self.ended.insert(job);
        self.feed(
            t,
            job,
            root,
            1,
            "Runner.Worker",
            EventDetail::Exit {
                exit_code: Some(0),
                signal: None,
            },
        );
    }

    pub(super) fn fork(&mut self, t: u64, job: u64, parent: u32, child: u32) {
        self.feed(
            t,
            job,
            parent,
            0,
            "sh",
            EventDetail::Fork { child_pid: child },
        );
    }

    pub(super) fn exec(&mut self, t: u64, job: u64, pid: u32, ppid: u32, argv: &[&str]) {
        self.feed(
            t,
            job,
            pid,
            ppid,
            argv[0],
            EventDetail::Exec {
                filename: format!("/usr/bin/{}", argv[0]),
                argv: argv.iter().map(|s| s.to_string()).collect(),
                argc: argv.len() as u32,
            },
        );
    }

    pub(super) fn open(&mut self, t: u64, job: u64, pid: u32, path: &str, write: bool) {
        self.feed(
            t,
            job,
            pid,
            0,
            "cat",
            EventDetail::FileOpen(FileAccess {
                flags: if write { 0o1101 } else { 0 },
                write,
                result: 3,
                matched: vec!["basename".into()],
                ..FileAccess::at(path)
            }),
        );
    }

    pub(super) fn connect(&mut self, t: u64, job: u64, pid: u32, ip: &str, port: u16) {
        self.feed(
            t,
            job,
            pid,
            0,
            "curl",
            EventDetail::Connect(Connect::inet(ip.parse().unwrap(), port)),
        );
    }

    pub(super) fn rules(&self) -> Vec<RuleId> {
        self.findings.iter().map(|f| f.rule).collect()
    }

    pub(super) fn only(&self, rule: RuleId) -> &Finding {
        let matching: Vec<&Finding> = self.findings.iter().filter(|f| f.rule == rule).collect();
        assert_eq!(
            matching.len(),
            1,
            "one {rule} finding expected, got {:#?}",
            self.findings
        );
        matching[0]
    }
}
