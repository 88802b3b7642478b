//! Job reports: what one job did, for `runner-monitor report` and the HTTP endpoint's `/jobs`
//! pages. A stage of the pipeline after the engine: it is handed every judged event with the
//! findings it raised (and the findings time raises), and keeps, for the most recent jobs, only
//! what a report shows: the process tree, the credentials and secret sockets touched, the egress
//! with the names the job resolved, the survivors and the findings.
//!
//! Bounded twice: `MAX_JOBS` jobs (the oldest goes), and per job a cap on each list (what does
//! not fit is counted in `omitted`). Events of kinds a report does not show are dropped at the
//! first `match`, without a lookup or an allocation; a credential path or destination seen again
//! is a hash lookup by borrowed key.
//!
//! Never a secret: a report holds what the events and findings hold (paths, addresses, names,
//! command lines), never file contents or environments.
//!
//! Steps are derived from the recorded process tree with the engine's own pure functions
//! (`engine::step`, see `steps`). Not known to the agent yet, so absent from every report: the
//! containers a job started (`JobReport::not_tracked` says so).

mod after_end;
mod html;
mod model;
mod stages;
mod steps;
#[cfg(test)]
mod tests;
mod text;
mod tls;

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use crate::{
    bounded::{BoundedMap, Hasher},
    engine::Finding,
    event::{Connect, Dns, Event, EventDetail, FileAccess, JobInfo, JobKey, SocketFamily},
    policy::Policy,
    rule::RuleId,
};

pub use html::{job_page, jobs_page};
pub use model::*;
pub use text::{markdown, text};

/// Jobs kept, most recent first to stay.
///
/// With the per-job bounds below a full report is about 350 KB at worst, so the reports stay
/// near 11 MB even if every kept job fills every list (the agent's budget is 32 MB in all).
pub const MAX_JOBS: usize = 32;
/// Per job: processes, credential objects, destinations, resolved addresses, findings.
const MAX_PROCESSES: usize = 512;
const MAX_CREDENTIALS: usize = 128;
const MAX_EGRESS: usize = 256;
const MAX_DNS: usize = 256;
const MAX_FINDINGS: usize = 128;
const MAX_STEPS: usize = 256;
/// Processes named per credential or destination.
const MAX_PIDS: usize = 4;
/// A command line is cut to this many characters.
const ARGV_CHARS: usize = 200;

/// What the agent does not track yet (other issues), named in every report.
pub const NOT_TRACKED: [&str; 1] = ["containers"];

/// The reports, shared between the pipeline (which writes them) and the HTTP endpoint and the
/// control socket (which read them; lock briefly, copy out, render outside the lock).
pub type SharedReports = Arc<Mutex<JobReports>>;

/// Locks the reports; a panic elsewhere while holding the lock leaves them readable.
pub fn lock(reports: &SharedReports) -> MutexGuard<'_, JobReports> {
    reports.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A report as it is being recorded: the report plus the indexes that make an update a lookup.
struct Record {
    report: JobReport,
    /// pid -> index in `processes` (the latest process with that pid).
    process_at: HashMap<u32, usize, Hasher>,
    /// path -> index in `credentials`, or `None` for a path that is no credential.
    credential_at: HashMap<String, Option<usize>, Hasher>,
    egress_at: HashMap<(IpAddr, u16), usize, Hasher>,
    /// address -> the first name the job resolved to it.
    names: HashMap<IpAddr, String, Hasher>,
    /// The job's roots (its root, its stages' shells): their direct children start steps.
    roots: HashSet<u32, Hasher>,
}

impl Record {
    fn new(key: JobKey, time_ns: u64) -> Self {
        Self {
            report: JobReport {
                key,
                job: JobInfo {
                    id: key.to_string(),
                    ..JobInfo::default()
                },
                start_ns: time_ns,
                end_ns: None,
                processes: Vec::new(),
                steps: Vec::new(),
                credentials: Vec::new(),
                egress: Vec::new(),
                survivors: Vec::new(),
                findings: Vec::new(),
                omitted: Omitted::default(),
                not_tracked: NOT_TRACKED.iter().map(|s| (*s).to_owned()).collect(),
            },
            process_at: HashMap::default(),
            credential_at: HashMap::default(),
            egress_at: HashMap::default(),
            names: HashMap::default(),
            roots: HashSet::default(),
        }
    }

    /// The process `pid` of this job, added (as seen in `event`) when new.
    fn process(&mut self, event: &Event, pid: u32, ppid: u32) -> Option<&mut ProcessNode> {
        if let Some(&at) = self.process_at.get(&pid) {
            return self.report.processes.get_mut(at);
        }
        if self.report.processes.len() >= MAX_PROCESSES {
            self.report.omitted.processes += 1;
            return None;
        }
        self.process_at.insert(pid, self.report.processes.len());
        self.report.processes.push(ProcessNode {
            pid,
            ppid,
            comm: event.process.comm.clone(),
            exe: None,
            argv: None,
            start_ns: event.time_ns,
            exit_ns: None,
            exit_code: None,
            signal: None,
            survivor: false,
            step: None,
            io_uring: false,
        });
        self.report.processes.last_mut()
    }

    fn fork(&mut self, event: &Event, child: u32) {
        // A reused pid is a new process.
        self.process_at.remove(&child);
        let parent = event.process.pid;
        let step = self
            .process(event, parent, event.process.ppid)
            .and_then(|p| p.step);
        if let Some(c) = self.process(event, child, parent) {
            c.step = step;
        }
    }

    fn exec(&mut self, event: &Event, filename: &str, argv: &[String]) {
        let Some(p) = self.process(event, event.process.pid, event.process.ppid) else {
            return;
        };
        p.comm.clone_from(&event.process.comm);
        p.exe = Some(filename.to_owned());
        p.argv = Some(argv_summary(argv));
        self.exec_step(event, filename, argv);
    }

    fn exit(&mut self, event: &Event, code: Option<i32>, signal: Option<i32>) {
        if let Some(p) = self.process(event, event.process.pid, event.process.ppid) {
            p.exit_ns = Some(event.time_ns);
            p.exit_code = code;
            p.signal = signal;
        }
    }

    /// A file the kernel let through: a credential of the policy, or another process's memory.
    fn file_open(&mut self, policy: &Policy, event: &Event, f: &FileAccess, ended: bool) {
        let at = match self.credential_at.get(f.path.as_str()) {
            Some(at) => *at,
            None => {
                let (kind, access) = match f.target_pid {
                    Some(pid) => (format!("pid {pid}"), Access::Memory),
                    None => match policy.credential_of_access(f) {
                        Some(kind) => (kind.kind.clone(), Access::File),
                        None => {
                            self.remember_path(&f.path, None);
                            return;
                        }
                    },
                };
                match self.add_credential(&f.path, kind, access, event.time_ns) {
                    Some(at) => at,
                    None => return,
                }
            }
        };
        let Some(c) = at.and_then(|at| self.report.credentials.get_mut(at)) else {
            return;
        };
        if f.result < 0 {
            c.failed += 1;
        } else if f.write {
            c.writes += 1;
        } else {
            c.reads += 1;
        }
        c.after_end |= ended;
        add_pid(&mut c.pids, event.process.pid);
    }

    fn connect(&mut self, policy: &Policy, event: &Event, c: &Connect, ended: bool) {
        if c.family == SocketFamily::Unix {
            if let Some(path) = &c.unix_path {
                self.socket(policy, event, path, c.result, ended);
            }
            return;
        }
        let (Some(ip), Some(port)) = (c.ip, c.port) else {
            return;
        };
        if ip.is_unspecified() {
            return;
        }
        let at = match self.egress_at.get(&(ip, port)) {
            Some(at) => *at,
            None => {
                if self.report.egress.len() >= MAX_EGRESS {
                    self.report.omitted.egress += 1;
                    return;
                }
                self.egress_at.insert((ip, port), self.report.egress.len());
                self.report.egress.push(Egress {
                    ip,
                    port,
                    dns_name: self.names.get(&ip).cloned(),
                    connections: 0,
                    failed: 0,
                    sni: Vec::new(),
                    first_ns: event.time_ns,
                    pids: Vec::new(),
                    after_end: false,
                });
                self.report.egress.len() - 1
            }
        };
        let e = &mut self.report.egress[at];
        // EINPROGRESS: a non-blocking connect on its way.
        if c.result < 0 && c.result != -115 {
            e.failed += 1;
        } else {
            e.connections += 1;
        }
        e.after_end |= ended;
        add_pid(&mut e.pids, event.process.pid);
    }

    fn socket(&mut self, policy: &Policy, event: &Event, path: &str, result: i64, ended: bool) {
        let at = match self.credential_at.get(path) {
            Some(at) => *at,
            None => match policy.secret_socket_of(path) {
                Some(kind) => {
                    match self.add_credential(path, kind.to_owned(), Access::Socket, event.time_ns)
                    {
                        Some(at) => at,
                        None => return,
                    }
                }
                None => {
                    self.remember_path(path, None);
                    return;
                }
            },
        };
        let Some(c) = at.and_then(|at| self.report.credentials.get_mut(at)) else {
            return;
        };
        if result < 0 {
            c.failed += 1;
        } else {
            c.reads += 1;
        }
        c.after_end |= ended;
        add_pid(&mut c.pids, event.process.pid);
    }

    /// A new credential object; `None` when the list is full (counted).
    fn add_credential(
        &mut self,
        path: &str,
        kind: String,
        access: Access,
        time_ns: u64,
    ) -> Option<Option<usize>> {
        if self.report.credentials.len() >= MAX_CREDENTIALS {
            self.report.omitted.credentials += 1;
            return None;
        }
        let at = self.report.credentials.len();
        self.report.credentials.push(CredentialUse {
            path: path.to_owned(),
            kind,
            access,
            reads: 0,
            writes: 0,
            failed: 0,
            first_ns: time_ns,
            pids: Vec::new(),
            after_end: false,
        });
        self.remember_path(path, Some(at));
        Some(Some(at))
    }

    /// Remembers what a path is, while there is room (a path not remembered is classified again).
    fn remember_path(&mut self, path: &str, at: Option<usize>) {
        if self.credential_at.len() < MAX_CREDENTIALS * 4 {
            self.credential_at.insert(path.to_owned(), at);
        }
    }

    fn dns_answer(&mut self, dns: &Dns) {
        let asked = dns.questions.first().map(|q| q.name.trim_end_matches('.'));
        for record in &dns.answers {
            let Ok(ip) = record.data.parse::<IpAddr>() else {
                continue;
            };
            if self.names.contains_key(&ip) {
                continue;
            }
            if self.names.len() >= MAX_DNS {
                return;
            }
            let name = asked.unwrap_or(record.name.trim_end_matches('.'));
            self.names.insert(ip, name.to_owned());
        }
    }

    fn finding(&mut self, f: &Finding) {
        if f.rule == RuleId::CredentialAfterJobEnd {
            self.after_end_from(f);
        }
        if f.rule == RuleId::ProcessSurvivedJob
            && let Some(p) = &f.process
        {
            if let Some(&at) = self.process_at.get(&p.pid) {
                self.report.processes[at].survivor = true;
            }
            if self.report.survivors.iter().all(|s| s.pid != p.pid)
                && self.report.survivors.len() < MAX_PROCESSES
            {
                self.report.survivors.push(Survivor {
                    pid: p.pid,
                    exe: p.exe.clone(),
                    cmdline: p.cmdline.clone(),
                    escape: f.escape.clone(),
                });
            }
        }
        if self.report.findings.len() >= MAX_FINDINGS {
            self.report.omitted.findings += 1;
            return;
        }
        self.report.findings.push(f.clone());
    }
}

/// The report stage.
pub struct JobReports {
    policy: Arc<Policy>,
    jobs: BoundedMap<JobKey, Record>,
    /// Stage job key -> the job it is a stage of (GitLab: one job, several process trees).
    stages: BoundedMap<JobKey, JobKey>,
    /// Jobs whose report made room for a newer job's: their later events are ignored (one
    /// lookup) instead of starting a partial report that would push out another (with more jobs
    /// than `MAX_JOBS` at once, every event would).
    evicted: BoundedMap<JobKey, ()>,
}

impl JobReports {
    pub fn new(policy: Arc<Policy>) -> Self {
        Self {
            policy,
            jobs: BoundedMap::new(MAX_JOBS),
            stages: BoundedMap::new(MAX_JOBS * 4),
            evicted: BoundedMap::new(MAX_JOBS * 64),
        }
    }

    /// A new shared handle.
    pub fn shared(policy: Arc<Policy>) -> SharedReports {
        Arc::new(Mutex::new(Self::new(policy)))
    }

    pub fn set_policy(&mut self, policy: Arc<Policy>) {
        self.policy = policy;
    }

    /// A judged event and the findings the engine raised for it.
    pub fn judged(&mut self, event: &Event, findings: &[Finding]) {
        if let Some(j) = &event.job {
            match &event.detail {
                EventDetail::Fork { .. }
                | EventDetail::Exec { .. }
                | EventDetail::Exit { .. }
                | EventDetail::FileOpen(_)
                | EventDetail::Connect(_)
                | EventDetail::DnsAnswer(_)
                | EventDetail::TlsClientHello(_)
                | EventDetail::IoUringSetup { .. }
                | EventDetail::JobStart(_)
                | EventDetail::JobEnd => self.record(event, j.key, j.ended),
                _ => {}
            }
        }
        self.findings(findings);
    }

    /// Findings raised without an event (timers: survivors, stage ends).
    pub fn findings(&mut self, findings: &[Finding]) {
        for f in findings {
            if let Some(job) = &f.job {
                let Some(record) = self.record_of(job.key, f.time_ns) else {
                    continue;
                };
                if record.report.job.id == job.key.to_string()
                    && job.info.id != record.report.job.id
                {
                    record.report.job = job.info.clone();
                }
                record.finding(f);
            }
        }
    }

    /// The record of job `key` (or of the job it is a stage of), started when new; `None` for
    /// a job whose record was evicted.
    fn record_of(&mut self, key: JobKey, time_ns: u64) -> Option<&mut Record> {
        let key = self.stages.get(&key).copied().unwrap_or(key);
        if !self.jobs.contains_key(&key) {
            if self.evicted.contains_key(&key) {
                return None;
            }
            if let Some((old, _)) = self.jobs.insert(key, Record::new(key, time_ns)) {
                self.evicted.insert(old, ());
            }
        }
        self.jobs.get_mut(&key)
    }

    fn record(&mut self, event: &Event, key: JobKey, ended: bool) {
        if let EventDetail::JobStart(info) = &event.detail
            && self.joins_a_stage(key, info)
        {
            // The stage's root is a process of the job.
            if let Some(record) = self.record_of(key, event.time_ns) {
                record.process(event, event.process.pid, event.process.ppid);
            }
            return;
        }
        let policy = self.policy.clone();
        let Some(record) = self.record_of(key, event.time_ns) else {
            return;
        };
        // A staged job's stage ending is not the job's end: what its survivors do before the
        // next stage or the inferred end is judged by the engine, whose findings say so
        // (`Record::after_end_from`).
        let staged = policy.has_stages(record.report.job.platform.as_deref());
        let ended = (ended && !staged) || record.report.end_ns.is_some();
        let pid = event.process.pid;
        // Pid 0 is the agent's own: a job it started at its first container's create.
        if pid != 0
            && (event.job.as_ref().is_some_and(|j| j.root)
                || matches!(event.detail, EventDetail::JobStart(_)))
            && record.roots.len() < MAX_PROCESSES
        {
            record.roots.insert(pid);
        }
        match &event.detail {
            EventDetail::Fork { child_pid } => record.fork(event, *child_pid),
            EventDetail::Exec { filename, argv, .. } => record.exec(event, filename, argv),
            EventDetail::Exit { exit_code, signal } => {
                record.exit(event, *exit_code, *signal);
                // A staged job's root is one stage's: the job ends with its `job_end`.
                if event.job.as_ref().is_some_and(|j| j.root)
                    && !staged
                    && record.report.end_ns.is_none()
                {
                    record.report.end_ns = Some(event.time_ns);
                }
            }
            EventDetail::FileOpen(f) => record.file_open(&policy, event, f, ended),
            EventDetail::Connect(c) => record.connect(&policy, event, c, ended),
            EventDetail::DnsAnswer(dns) => record.dns_answer(dns),
            EventDetail::TlsClientHello(t) => record.tls_hello(t),
            EventDetail::IoUringSetup { .. } => {
                if let Some(p) = record.process(event, pid, event.process.ppid) {
                    p.io_uring = true;
                }
            }
            EventDetail::JobStart(info) => {
                record.report.job = info.clone();
                // A GitLab docker-executor job starts at its first container's create, which
                // may be before its first event recorded here.
                record.report.start_ns = record.report.start_ns.min(event.time_ns);
                if pid != 0 {
                    record.process(event, pid, event.process.ppid);
                }
            }
            EventDetail::JobEnd => {
                record.report.end_ns.get_or_insert(event.time_ns);
            }
            _ => {}
        }
    }

    /// The report of a job by its CI id or its key (`/jobs/KEY`); the most recent when several
    /// jobs share an id.
    pub fn find(&self, id: &str) -> Option<JobReport> {
        self.jobs
            .iter_by_age()
            .filter(|(k, r)| r.report.job.id == id || k.to_string() == id)
            .last()
            .map(|(_, r)| r.report.clone())
    }

    /// Every report kept, oldest first (the live agent's attestations are made from them).
    pub fn reports(&self) -> impl Iterator<Item = &JobReport> {
        self.jobs.iter_by_age().map(|(_, r)| &r.report)
    }

    /// Every job kept, most recent first.
    pub fn list(&self) -> Vec<JobSummary> {
        let mut out: Vec<JobSummary> = self
            .jobs
            .iter_by_age()
            .map(|(_, r)| JobSummary {
                key: r.report.key,
                job: r.report.job.clone(),
                start_ns: r.report.start_ns,
                end_ns: r.report.end_ns,
                processes: r.report.processes.len(),
                findings: r.report.findings.len(),
                worst: r.report.findings.iter().map(|f| f.severity).max(),
            })
            .collect();
        out.reverse();
        out
    }
}

fn add_pid(pids: &mut Vec<u32>, pid: u32) {
    if pids.len() < MAX_PIDS && !pids.contains(&pid) {
        pids.push(pid);
    }
}

/// The command line, cut at `ARGV_CHARS` characters.
fn argv_summary(argv: &[String]) -> String {
    let mut out = String::new();
    for (i, arg) in argv.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(arg);
        if out.chars().count() > ARGV_CHARS {
            out = out.chars().take(ARGV_CHARS).collect();
            out.push('…');
            break;
        }
    }
    out
}
