//! The correlation engine: a pure state machine. Events (with their kernel timestamps) go in,
//! findings come out. No I/O, no clock, no aya: the live agent, `replay` and the tests run the
//! very same code.
//!
//! Time only moves with the events: every event's timestamp is "now", and timers (survivors
//! after the grace period) fire when an event or an explicit `advance` passes them.

mod detect;
pub mod finding;
mod names;
pub mod snapshot;
mod stages;
pub mod step;
pub mod usage;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use crate::bounded::BoundedMap;
pub use finding::{Finding, Step};

use crate::{
    event::{Event, EventDetail, JobInfo, JobKey},
    policy::{JobSelector, Policy},
};

/// A process the engine follows (alive, or recently exited for ancestry).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Process {
    pid: u32,
    ppid: u32,
    job: Option<JobKey>,
    exe: Option<String>,
    cmdline: Option<String>,
    comm: String,
    uid: u32,
    /// Programs this process or its ancestors ran that detach from a job (setsid, nohup, ...).
    detached_via: BTreeSet<String>,
    /// Credential kinds this process touched.
    kinds: BTreeSet<String>,
    harvesting_reported: bool,
    /// The job step it runs in: inherited at fork, set when a direct child of the job's root
    /// execs (see `step`).
    #[serde(default)]
    step: Option<Step>,
    /// It is the process that started its step: a later exec of it renames the step.
    #[serde(default)]
    starts_step: bool,
    /// It is its (kernel) job's root: a job root or a stage's shell.
    #[serde(default)]
    is_root: bool,
    /// A subshell of a step-less job root: a fork of it (or of such a fork) that has not exec'd.
    /// What it execs starts steps as the root's own children do (a shell root running its
    /// script's lines in subshells, as gitlab-ci-local's does).
    #[serde(default)]
    root_fork: bool,
    /// Its cgroup (v2 id) at its last exec: a job's container's, or another.
    #[serde(default)]
    cgroup_id: u64,
}

/// Events of a staged job's processes held while the job waits for its next stage, at most this
/// many a job: if no stage follows, they happened after the job's true end.
const MAX_GAP_EVENTS: usize = 64;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Job {
    key: JobKey,
    info: JobInfo,
    root_pid: u32,
    ended_ns: Option<u64>,
    /// Survivors were looked for (after the grace period).
    survivors_checked: bool,
    /// Runs as several process trees (stages) sharing its id (GitLab): ends `stage_gap` after
    /// its last stage's root exited, unless a stage starts again.
    staged: bool,
    /// A stage's root exited at this time; the job ends when no stage follows.
    last_stage_exit: Option<u64>,
    /// Credentials this job wrote (path -> kind); removed when unlinked or renamed away.
    written: BTreeMap<String, String>,
    kinds: BTreeSet<String>,
    harvesting_reported: bool,
    /// What this job used outside its baseline, each reported once (`Used::object`).
    #[serde(default)]
    deviations: BTreeSet<String>,
    /// Steps started so far (the next one is `steps + 1`).
    #[serde(default)]
    steps: u32,
    /// While a staged job waits for its next stage (`last_stage_exit` set): what its surviving
    /// processes did that an ended job is judged for (credentials, secret sockets, egress),
    /// at most `MAX_GAP_EVENTS`. Judged as after the end if no stage follows; dropped if one does.
    #[serde(default)]
    gap: Vec<Event>,
}

/// Which job made a credential object.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct LedgerEntry {
    materialised_by: Option<JobKey>,
}

/// Counters of the engine itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EngineStats {
    pub events: u64,
    pub findings: u64,
    /// Repeats of a finding inside the dedup window (counted, not re-raised).
    pub duplicates: u64,
    /// Findings dropped by a suppression in policy.
    pub suppressed: u64,
    pub evicted_processes: u64,
    pub evicted_jobs: u64,
    pub evicted_credentials: u64,
    pub evicted_dns: u64,
    pub jobs_started: u64,
    pub jobs_ended: u64,
    /// Processes found alive after their job's grace period.
    pub survivors: u64,
    /// Successful credential reads and writes by credential kind.
    pub credential_accesses: BTreeMap<String, u64>,
    /// Outbound connections by verdict: allowed, unexpected, metadata, blocked (refused by block
    /// mode; counted there only).
    pub egress: BTreeMap<String, u64>,
}

pub struct Engine {
    policy: Arc<Policy>,
    processes: BoundedMap<u32, Process>,
    /// Exited processes, for the ancestry of their descendants.
    exited: BoundedMap<u32, Process>,
    jobs: BoundedMap<JobKey, Job>,
    ledger: BoundedMap<String, LedgerEntry>,
    /// credential fingerprint -> the job that wrote it (when fingerprints are on).
    fingerprints: BoundedMap<String, JobKey>,
    /// (job, address) -> names the job resolved to that address.
    dns: BoundedMap<(JobKey, IpAddr), Vec<String>>,
    /// Stage job key -> the job it is a stage of.
    stages: BoundedMap<JobKey, JobKey>,
    /// dedup key -> (first time, repeats).
    dedup: BoundedMap<String, (u64, u64)>,
    /// cgroup id -> the job's container it is (not in snapshots).
    containers: BoundedMap<u64, crate::event::ContainerInfo>,
    now_ns: u64,
    /// The earliest time a timer (stage gap, survivor grace) is due; the job table is only
    /// scanned when time passes it, not at every event.
    next_timer_ns: u64,
    stats: EngineStats,
    /// What jobs used, when recording (learning a baseline); `None` otherwise: the live agent
    /// keeps nothing.
    usage: Option<Vec<usage::Usage>>,
    /// Jobs named again (a hook or the environment naming a job already known): counted for
    /// `job_changes`, not kept in snapshots.
    renames: u64,
}

impl Engine {
    pub fn new(policy: Arc<Policy>) -> Self {
        Self {
            processes: BoundedMap::new(policy.max_processes),
            exited: BoundedMap::new(4096),
            jobs: BoundedMap::new(policy.max_jobs),
            ledger: BoundedMap::new(policy.max_credentials),
            fingerprints: BoundedMap::new(policy.max_credentials),
            dns: BoundedMap::new(policy.max_dns_addresses),
            dedup: BoundedMap::new(policy.max_credentials * 4),
            stages: BoundedMap::new(policy.max_jobs),
            containers: BoundedMap::new(policy.max_jobs),
            policy,
            now_ns: 0,
            next_timer_ns: u64::MAX,
            stats: EngineStats::default(),
            usage: None,
            renames: 0,
        }
    }

    /// From now on, records what jobs use, for `take_usage`.
    pub fn record_usage(&mut self) {
        self.usage.get_or_insert_with(Vec::new);
    }

    /// What jobs used since the last call (empty unless `record_usage` was called).
    pub fn take_usage(&mut self) -> Vec<usage::Usage> {
        self.usage.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// The jobs the engine knows (started, or ended and not yet evicted), with who they are.
    pub fn jobs(&self) -> impl Iterator<Item = (JobKey, &JobInfo)> {
        self.jobs.iter().map(|(k, j)| (*k, &j.info))
    }

    /// Who the job `key` is, if the engine knows it.
    pub fn job(&self, key: JobKey) -> Option<&JobInfo> {
        self.jobs.get(&key).map(|j| &j.info)
    }

    /// Replaces the policy; every table is kept.
    pub fn set_policy(&mut self, policy: Arc<Policy>) {
        self.policy = policy;
    }

    pub fn stats(&self) -> EngineStats {
        let mut s = self.stats.clone();
        s.evicted_processes = self.processes.evicted();
        s.evicted_jobs = self.jobs.evicted();
        s.evicted_credentials = self.ledger.evicted();
        s.evicted_dns = self.dns.evicted();
        s
    }

    /// Changes whenever a job starts or is named (again), ends, is forgotten, or gains a stage:
    /// a cheap "look again" for whoever mirrors the job table (block mode's per-job plans).
    pub fn job_changes(&self) -> u64 {
        self.stats
            .jobs_started
            .wrapping_add(self.stats.jobs_ended)
            .wrapping_add(self.jobs.evicted())
            .wrapping_add(self.stages.len() as u64)
            .wrapping_add(self.stages.evicted())
            .wrapping_add(self.renames)
    }

    /// Stages (their own kernel job keys) and the job each is a stage of.
    pub fn stages(&self) -> impl Iterator<Item = (JobKey, JobKey)> + '_ {
        self.stages.iter().map(|(stage, job)| (*stage, *job))
    }

    /// Live processes followed.
    pub fn tracked_processes(&self) -> usize {
        self.processes.len()
    }

    /// Jobs that have started and not ended.
    pub fn active_jobs(&self) -> usize {
        self.jobs
            .iter()
            .filter(|(_, j)| j.ended_ns.is_none())
            .count()
    }

    /// Feeds one event; returns the findings it raises (and any timers it passed).
    pub fn handle(&mut self, event: &Event) -> Vec<Finding> {
        self.stats.events += 1;
        let mut out = Vec::new();
        self.advance_into(event.time_ns, &mut out);
        let staged = self.as_stage_of_its_job(event);
        let event = staged.as_ref().unwrap_or(event);
        self.track(event, &mut out);
        self.hold_if_in_stage_gap(event);
        detect::event(self, event, &mut out);
        self.finish(out)
    }

    /// Live processes of a job.
    fn pids_of(&self, job: JobKey) -> Vec<u32> {
        self.processes
            .iter()
            .filter(|(_, p)| p.job == Some(job))
            .map(|(pid, _)| *pid)
            .collect()
    }

    /// Moves time forward without an event (the live agent calls this every second).
    pub fn advance(&mut self, now_ns: u64) -> Vec<Finding> {
        let mut out = Vec::new();
        self.advance_into(now_ns, &mut out);
        self.finish(out)
    }

    fn advance_into(&mut self, now_ns: u64, out: &mut Vec<Finding>) {
        if now_ns > self.now_ns {
            self.now_ns = now_ns;
        }
        if self.now_ns >= self.next_timer_ns {
            detect::timers(self, out);
        }
    }

    /// Applies severity overrides and suppressions of the job's rules, and deduplicates.
    fn finish(&mut self, findings: Vec<Finding>) -> Vec<Finding> {
        let mut kept = Vec::with_capacity(findings.len());
        let window = self
            .policy
            .dedup_window_seconds
            .saturating_mul(1_000_000_000);
        for mut f in findings {
            let selector = JobSelector {
                repository: f.job.as_ref().and_then(|j| j.info.repository.as_deref()),
                workflow: f.job.as_ref().and_then(|j| j.info.workflow.as_deref()),
            };
            let mut suppressed = false;
            if f.job.is_some() {
                for rule in self.policy.rules_for(selector) {
                    if let Some(level) = rule.severity.get(&f.rule) {
                        f.severity = *level;
                    }
                    suppressed |= rule.suppress.contains_key(&f.rule);
                }
            }
            if suppressed {
                self.stats.suppressed += 1;
                continue;
            }
            let key = f.dedup_key();
            match self.dedup.get_mut(&key) {
                Some((first, repeats)) if f.time_ns.saturating_sub(*first) < window => {
                    *repeats += 1;
                    self.stats.duplicates += 1;
                    continue;
                }
                _ => {
                    self.dedup.insert(key, (f.time_ns, 0));
                }
            }
            self.stats.findings += 1;
            f.container = f.process.as_ref().and_then(|p| self.container_of(p.pid));
            f.pod = f.container.as_mut().and_then(|c| c.pod.take());
            kept.push(f);
        }
        kept
    }

    /// Keeps the process and job tables in step with the event.
    fn track(&mut self, event: &Event, out: &mut Vec<Finding>) {
        let pid = event.process.pid;
        let job = event.job.as_ref().map(|j| j.key);
        self.track_unseen_job(event, out);
        // A fingerprint is the agent's event about what a process wrote, made after it exited:
        // it must not bring the process back (it would be a survivor at the job's end).
        // A container event's process is the runtime that made the cgroup, not a job's; pid 0
        // is the agent's own (a job it ended when the runner removed the job's containers).
        let after_exit = matches!(
            event.detail,
            EventDetail::CredentialFingerprint { .. } | EventDetail::Container(_)
        );
        if job.is_some() && !after_exit && pid != 0 && !self.processes.contains_key(&pid) {
            let known = self.exited.remove(&pid);
            self.processes
                .insert(pid, known.unwrap_or_else(|| self.new_process(event)));
        }
        if event.job.as_ref().is_some_and(|j| j.root)
            && let Some(p) = self.processes.get_mut(&pid)
        {
            p.is_root = true;
        }
        match &event.detail {
            EventDetail::Fork { child_pid } => self.track_fork(event, *child_pid),
            EventDetail::Exec { filename, argv, .. } => self.track_exec(event, filename, argv),
            EventDetail::Exit { .. } => self.track_exit(event, out),
            EventDetail::JobStart(info) => {
                if let Some(key) = job {
                    self.track_job_start(key, info, pid);
                }
            }
            EventDetail::CredentialFingerprint { fingerprint, .. } => {
                if let Some(key) = job {
                    self.fingerprints.insert(fingerprint.clone(), key);
                }
            }
            EventDetail::JobEnd => {
                if let Some(key) = job {
                    self.end_job(key, event.time_ns, out);
                }
            }
            EventDetail::DnsAnswer(dns) => {
                if let Some(key) = job {
                    self.track_dns_answer(key, dns);
                }
            }
            EventDetail::Container(c) => self.track_container(c),
            _ => {}
        }
    }

    /// A job the engine has not seen yet: the kernel knows it (root recognised at exec, or a
    /// root registered before the engine started).
    fn track_unseen_job(&mut self, event: &Event, out: &mut Vec<Finding>) {
        if let Some(j) = &event.job
            && !self.jobs.contains_key(&j.key)
        {
            let root_pid = if j.root { event.process.pid } else { 0 };
            self.start_job(j.key, JobInfo::default(), root_pid);
            if j.ended {
                self.end_job(j.key, event.time_ns, out);
            }
        }
    }

    /// A fork: the child starts as a copy of its parent, without the parent's credential kinds.
    fn track_fork(&mut self, event: &Event, child_pid: u32) {
        let pid = event.process.pid;
        let root_fork = self
            .processes
            .get(&pid)
            .is_some_and(|parent| self.starts_steps(parent));
        let mut child = self
            .processes
            .get(&pid)
            .cloned()
            .unwrap_or_else(|| self.new_process(event));
        child.root_fork = root_fork;
        child.pid = child_pid;
        child.ppid = pid;
        child.kinds.clear();
        child.harvesting_reported = false;
        child.starts_step = false;
        child.is_root = false;
        // A reused pid starts afresh.
        self.exited.remove(&child_pid);
        self.processes.insert(child_pid, child);
    }

    /// An exec: the process's new program, whether it is one that detaches from a job, and the
    /// step it starts.
    fn track_exec(&mut self, event: &Event, filename: &str, argv: &[String]) {
        self.track_step(event, filename, argv);
        if let Some(p) = self.processes.get_mut(&event.process.pid) {
            p.cgroup_id = event.process.cgroup_id;
            p.root_fork = false;
            p.exe = Some(filename.to_owned());
            p.cmdline = Some(argv.join(" "));
            p.comm = event.process.comm.clone();
            let base = filename.rsplit('/').next().unwrap_or(filename);
            if matches!(
                base,
                "setsid" | "nohup" | "daemonize" | "disown" | "start-stop-daemon"
            ) {
                p.detached_via.insert(base.to_owned());
            }
        }
    }

    /// An exit: the process moves to the exited table; a job root's exit ends its job, or, for a
    /// staged job, its stage.
    fn track_exit(&mut self, event: &Event, out: &mut Vec<Finding>) {
        let pid = event.process.pid;
        if let Some(p) = self.processes.remove(&pid) {
            self.exited.insert(pid, p);
        }
        if let Some(j) = &event.job
            && j.root
        {
            match self.jobs.get_mut(&j.key) {
                // A stage ended; the job waits for the next one (see detect::timers).
                Some(job) if job.staged && job.ended_ns.is_none() => {
                    job.last_stage_exit = Some(event.time_ns);
                    let gap = self.policy.stage_gap_seconds.saturating_mul(1_000_000_000);
                    self.next_timer_ns = self.next_timer_ns.min(event.time_ns.saturating_add(gap));
                }
                _ => self.end_job(j.key, event.time_ns, out),
            }
        }
    }

    /// The agent identified job `key`, whose root is `pid`: it starts (or takes the identity), or
    /// joins the running job it is another stage of.
    fn track_job_start(&mut self, key: JobKey, info: &JobInfo, pid: u32) {
        let staged = self.policy.has_stages(info.platform.as_deref());
        // Another stage of a running job with this id: it joins that job.
        let running = self
            .jobs
            .iter()
            .find(|(k, j)| {
                **k != key
                    && j.staged
                    && j.ended_ns.is_none()
                    && j.info.id == info.id
                    && j.info.platform == info.platform
            })
            .map(|(k, _)| *k);
        if staged && let Some(job) = running {
            self.join_stage(key, job);
            return;
        }
        match self.jobs.get_mut(&key) {
            Some(existing) => {
                existing.info = info.clone();
                self.renames += 1;
            }
            None => self.start_job(key, info.clone(), pid),
        }
        if let Some(j) = self.jobs.get_mut(&key) {
            j.staged = staged;
        }
        if let Some(j) = self.jobs.get_mut(&key)
            && j.root_pid == 0
        {
            j.root_pid = pid;
        }
    }

    fn new_process(&self, event: &Event) -> Process {
        Process {
            pid: event.process.pid,
            ppid: event.process.ppid,
            job: event.job.as_ref().map(|j| j.key),
            exe: None,
            cmdline: None,
            comm: event.process.comm.clone(),
            uid: event.process.uid,
            detached_via: self
                .processes
                .get(&event.process.ppid)
                .map(|p| p.detached_via.clone())
                .unwrap_or_default(),
            kinds: BTreeSet::new(),
            harvesting_reported: false,
            step: self
                .processes
                .get(&event.process.ppid)
                .and_then(|p| p.step.clone()),
            starts_step: false,
            is_root: event.job.as_ref().is_some_and(|j| j.root),
            root_fork: false,
            cgroup_id: event.process.cgroup_id,
        }
    }

    fn start_job(&mut self, key: JobKey, info: JobInfo, root_pid: u32) {
        self.stats.jobs_started += 1;
        let info = if info.id.is_empty() {
            JobInfo {
                id: key.to_string(),
                ..info
            }
        } else {
            info
        };
        self.jobs.insert(
            key,
            Job {
                key,
                info,
                root_pid,
                ended_ns: None,
                staged: false,
                last_stage_exit: None,
                survivors_checked: false,
                written: BTreeMap::new(),
                kinds: BTreeSet::new(),
                harvesting_reported: false,
                deviations: BTreeSet::new(),
                steps: 0,
                gap: Vec::new(),
            },
        );
    }

    /// Whether job `key`'s survivors were looked for (it ended and its grace period passed);
    /// `None` for a job the engine does not know (any more).
    pub fn survivors_checked(&self, key: JobKey) -> Option<bool> {
        let key = self.stages.get(&key).copied().unwrap_or(key);
        self.jobs.get(&key).map(|j| j.survivors_checked)
    }

    fn end_job(&mut self, key: JobKey, time_ns: u64, out: &mut Vec<Finding>) {
        let Some(job) = self.jobs.get_mut(&key) else {
            return;
        };
        if job.ended_ns.is_some() {
            return;
        }
        job.ended_ns = Some(time_ns);
        let held = std::mem::take(&mut job.gap);
        let job = job.clone();
        self.stats.jobs_ended += 1;
        self.next_timer_ns = self
            .next_timer_ns
            .min(time_ns.saturating_add(self.grace_ns(key)));
        detect::job_ended(self, &job, time_ns, out);
        // Ended at its last stage's exit, inferred later: what its survivors did since was after
        // the end. (An explicit end holds nothing: `gap` is only filled while a stage gap runs.)
        if time_ns == job.last_stage_exit.unwrap_or(u64::MAX) {
            detect::judge_gap(self, held, out);
        }
    }
}

#[cfg(test)]
mod tests;
