//! The detections, one function per kind of evidence.

mod baseline;
mod credentials;
mod network;
mod persistence;

use super::{Engine, Job, LedgerEntry};
use crate::{
    engine::finding::{
        Ancestor, CredentialRef, Finding, FindingJob, FindingProcess, TargetProcess,
    },
    event::{Event, EventDetail, JobKey, SentVia},
    policy::JobSelector,
    rule::RuleId,
};

const NS: u64 = 1_000_000_000;

fn finding_job(job: &Job, ended: bool) -> FindingJob {
    FindingJob {
        key: job.key,
        info: job.info.clone(),
        ended,
        ended_ns: job.ended_ns.filter(|_| ended),
        host: None,
    }
}

/// A short name for a job in summaries: `repository workflow #run` or its id.
fn job_label(job: &FindingJob) -> String {
    let info = &job.info;
    match &info.repository {
        Some(repo) => {
            let mut s = repo.clone();
            if let Some(w) = &info.workflow {
                s.push_str(&format!(" / {w}"));
            }
            if let Some(r) = &info.run {
                s.push_str(&format!(" #{r}"));
            }
            s
        }
        None => format!("job {}", info.id),
    }
}

impl Engine {
    fn job_selector(&self, key: Option<JobKey>) -> JobSelector<'_> {
        match key.and_then(|k| self.jobs.get(&k)) {
            Some(job) => JobSelector {
                repository: job.info.repository.as_deref(),
                workflow: job.info.workflow.as_deref(),
            },
            None => JobSelector::default(),
        }
    }

    pub(super) fn grace_ns(&self, key: JobKey) -> u64 {
        let mut grace = self.policy.grace_period_seconds;
        for rule in self.policy.rules_for(self.job_selector(Some(key))) {
            if let Some(g) = rule.grace_period_seconds {
                grace = g;
            }
        }
        grace.saturating_mul(NS)
    }

    fn process_view(&self, pid: u32, fallback: &Event) -> FindingProcess {
        let lookup = |pid: u32| self.processes.get(&pid).or_else(|| self.exited.get(&pid));
        let p = lookup(pid);
        let mut ancestry = Vec::new();
        let mut next = p.map_or(fallback.process.ppid, |p| p.ppid);
        let root = p
            .and_then(|p| p.job)
            .and_then(|k| self.jobs.get(&k))
            .map_or(0, |j| j.root_pid);
        while next != 0 && ancestry.len() < 16 {
            let parent = lookup(next);
            ancestry.push(Ancestor {
                pid: next,
                exe: parent.and_then(|p| p.exe.clone()),
            });
            if next == root {
                break;
            }
            next = parent.map_or(0, |p| p.ppid);
        }
        FindingProcess {
            pid,
            exe: p.and_then(|p| p.exe.clone()),
            cmdline: p.and_then(|p| p.cmdline.clone()),
            comm: p.map_or_else(|| fallback.process.comm.clone(), |p| p.comm.clone()),
            uid: p.map_or(fallback.process.uid, |p| p.uid),
            ancestry,
        }
    }

    /// A finding about `event`, with its job and process filled in.
    fn raise(&self, rule: RuleId, event: &Event, summary_tail: String) -> Finding {
        let job = event
            .job
            .as_ref()
            .and_then(|j| self.jobs.get(&j.key).map(|job| finding_job(job, j.ended)));
        let process = self.process_view(event.process.pid, event);
        let who = format!("{} (pid {})", process.comm, process.pid);
        let summary = match &job {
            Some(j) => format!("{who} of {} {summary_tail}", job_label(j)),
            None => format!("{who}, outside any job, {summary_tail}"),
        };
        let mut finding = Finding::new(rule, event.time_ns, summary);
        finding.job = job;
        finding.process = Some(process);
        finding.step = self.step_of(event.process.pid);
        finding
    }

    /// The job step process `pid` runs (or ran) in.
    fn step_of(&self, pid: u32) -> Option<crate::engine::Step> {
        self.processes
            .get(&pid)
            .or_else(|| self.exited.get(&pid))
            .and_then(|p| p.step.clone())
    }

    fn after_end_text(&self, event: &Event) -> String {
        let ended = event
            .job
            .as_ref()
            .and_then(|j| self.jobs.get(&j.key))
            .and_then(|j| j.ended_ns);
        match ended {
            Some(t) if event.time_ns >= t => {
                format!("{} s after the job ended", (event.time_ns - t) / NS)
            }
            _ => "after the job ended".to_owned(),
        }
    }

    fn target_exe(&self, pid: u32) -> Option<String> {
        self.processes
            .get(&pid)
            .or_else(|| self.exited.get(&pid))
            .and_then(|p| p.exe.clone())
    }
}

/// Every detection that one event can raise.
pub(super) fn event(engine: &mut Engine, event: &Event, out: &mut Vec<Finding>) {
    match &event.detail {
        EventDetail::FileOpen(f) => {
            persistence::file_event(engine, event, f, out);
            credentials::file_open(engine, event, f, out)
        }
        EventDetail::FileRename(f) | EventDetail::FileLink(f) => {
            persistence::file_event(engine, event, f, out);
            credentials::file_moved(engine, event, f, out)
        }
        EventDetail::FileUnlink(f) => {
            if let Some(key) = event.job.as_ref().map(|j| j.key)
                && let Some(job) = engine.jobs.get_mut(&key)
            {
                job.written.remove(&f.path);
            }
            if f.result >= 0 {
                engine.ledger.remove(&f.path);
            }
        }
        EventDetail::Connect(c) => network::connect(engine, event, c, out),
        EventDetail::TlsClientHello(t) => network::tls_hello(engine, event, t, out),
        EventDetail::Ptrace {
            request,
            target_pid,
            targets_agent,
        } => memory_access(
            engine,
            event,
            *target_pid,
            *targets_agent,
            // A ptrace request ("attach"), or the syscall of another access check the LSM set
            // reports as ptrace events ("process_vm_writev", "pidfd_getfd", "syscall-N").
            if request.contains('_') || request.starts_with("syscall-") {
                request.clone()
            } else {
                format!("ptrace {request}")
            },
            out,
        ),
        EventDetail::ProcessVmRead {
            target_pid,
            targets_agent,
        } => memory_access(
            engine,
            event,
            *target_pid,
            *targets_agent,
            "process_vm_readv".to_owned(),
            out,
        ),
        // Only job processes: the service manager stopping the agent is not an attack.
        EventDetail::Signal {
            target_pid,
            signal,
            syscall,
        } if event.job.is_some() => {
            let mut f = engine.raise(
                RuleId::AgentTamper,
                event,
                format!("sent signal {signal} to the monitor ({syscall})"),
            );
            f.target = Some(TargetProcess {
                pid: *target_pid,
                exe: None,
                access: format!("signal {signal}"),
            });
            out.push(f);
        }
        EventDetail::Bpf { cmd_name, .. } if event.job.is_some() => {
            let mut f = engine.raise(
                RuleId::AgentTamper,
                event,
                format!("called bpf({cmd_name}), which can inspect or detach the monitor's probes"),
            );
            f.target = Some(TargetProcess {
                pid: 0,
                exe: None,
                access: format!("bpf {cmd_name}"),
            });
            out.push(f);
        }
        EventDetail::RuntimeUnread {
            socket,
            via,
            io_uring,
            bytes,
        } if event.job.is_some() => {
            let socket = socket
                .as_deref()
                .unwrap_or("a container runtime's API socket");
            let how = match io_uring {
                true => format!("io_uring {}", via.as_str()),
                false => via.as_str().to_owned(),
            };
            let what = match (bytes, via) {
                // A buffer longer than the kernel's copy, where a request could go on past it.
                (Some(n), SentVia::Buffer) => format!("{n} bytes in one buffer"),
                (Some(n), _) => format!("{n} bytes"),
                (None, SentVia::Sendmmsg) => "messages".to_owned(),
                // Iovecs the kernel could not read.
                (None, SentVia::Buffer) => "buffers".to_owned(),
                (None, _) => "bytes".to_owned(),
            };
            let mut f = engine.raise(
                RuleId::AgentTamper,
                event,
                format!(
                    "sent {what} to {socket} by {how} that the monitor cannot read: a container \
                     request among them would not be attributed to the job",
                ),
            );
            f.target = Some(TargetProcess {
                pid: 0,
                exe: None,
                access: format!("{how} to {socket}"),
            });
            out.push(f);
        }
        EventDetail::SensorStatus(status)
            if status.lost_events > 0 || !status.detached_probes.is_empty() =>
        {
            let mut parts = Vec::new();
            if status.lost_events > 0 {
                parts.push(format!("lost {} events", status.lost_events));
            }
            for job in &status.over_budget {
                parts.push(format!(
                    "job {} over its event budget: {} events dropped",
                    job.id.clone().unwrap_or_else(|| job.job.to_string()),
                    job.dropped
                ));
            }
            if !status.detached_probes.is_empty() {
                parts.push(format!(
                    "probes not attached: {}",
                    status.detached_probes.join(", ")
                ));
            }
            out.push(Finding::new(
                RuleId::SensorDegraded,
                event.time_ns,
                format!("the monitor is degraded: {}", parts.join("; ")),
            ));
        }
        _ => {}
    }
}

fn is_ended(event: &Event) -> bool {
    event.job.as_ref().is_some_and(|j| j.ended)
}

/// Whether a process of an ended job doing `event` raises `credential-after-job-end`: a
/// credential touched, a secret socket or a remote address connected to.
pub(super) fn judged_after_end(engine: &Engine, event: &Event) -> bool {
    let mut ended = event.clone();
    if let Some(j) = &mut ended.job {
        j.ended = true;
    }
    after_end(engine, &ended).is_some()
}

/// `credential-after-job-end` for `event` of an ended job, if it is one.
fn after_end(engine: &Engine, event: &Event) -> Option<Finding> {
    match &event.detail {
        EventDetail::FileOpen(f) => credentials::after_end(engine, event, f),
        EventDetail::Connect(c) => network::after_end(engine, event, c),
        _ => None,
    }
}

/// A staged job's end was inferred (no stage followed its last one within the stage gap): what
/// its surviving processes did between the last stage's exit and now happened after the end.
pub(super) fn judge_gap(engine: &Engine, held: Vec<Event>, out: &mut Vec<Finding>) {
    for mut event in held {
        if let Some(j) = &mut event.job {
            j.ended = true;
        }
        out.extend(after_end(engine, &event));
    }
}

fn memory_access(
    engine: &mut Engine,
    event: &Event,
    target: u32,
    targets_agent: bool,
    access: String,
    out: &mut Vec<Finding>,
) {
    let exe = engine.target_exe(target);
    if event.job.is_none() {
        return;
    }
    let (rule, text) = if targets_agent {
        (
            RuleId::AgentTamper,
            format!("used {access} on the monitor (pid {target})"),
        )
    } else {
        (
            RuleId::ProcessMemoryAccess,
            format!(
                "used {access} on pid {target}{}",
                exe.as_ref().map(|e| format!(" ({e})")).unwrap_or_default()
            ),
        )
    };
    let mut f = engine.raise(rule, event, text);
    f.target = Some(TargetProcess {
        pid: target,
        exe,
        access,
    });
    out.push(f);
}

/// At a job's end: the credentials it wrote and left on disk.
pub(super) fn job_ended(engine: &mut Engine, job: &Job, time_ns: u64, out: &mut Vec<Finding>) {
    let fj = finding_job(job, true);
    for (path, kind) in &job.written {
        out.push(left_behind(&fj, path, kind, time_ns));
    }
    // The job's written credentials are reported once.
    if let Some(j) = engine.jobs.get_mut(&job.key) {
        j.written.clear();
    }
}

/// `credential-left-behind`: job `fj` ended (at `time_ns`) with the credential it wrote at
/// `path` still there.
pub(super) fn left_behind(fj: &FindingJob, path: &str, kind: &str, time_ns: u64) -> Finding {
    let mut finding = Finding::new(
        RuleId::CredentialLeftBehind,
        time_ns,
        format!(
            "{} ended and left the {kind} credential it wrote at {path}",
            job_label(fj)
        ),
    );
    finding.job = Some(fj.clone());
    finding.credential = Some(CredentialRef {
        path: path.to_owned(),
        kind: kind.to_owned(),
        fingerprint: None,
        used_path: None,
    });
    finding
}

/// Staged jobs whose last stage ended `stage_gap` ago end; survivors: processes of an ended job
/// still alive after its grace period.
pub(super) fn timers(engine: &mut Engine, out: &mut Vec<Finding>) {
    let now = engine.now_ns;
    let gap = engine.policy.stage_gap_seconds.saturating_mul(NS);
    let finished: Vec<(JobKey, u64)> = engine
        .jobs
        .iter()
        .filter(|(_, j)| j.ended_ns.is_none())
        .filter_map(|(k, j)| j.last_stage_exit.map(|t| (*k, t)))
        .filter(|(_, t)| now >= t.saturating_add(gap))
        .collect();
    for (key, ended) in finished {
        engine.end_job(key, ended, out);
    }
    let due: Vec<JobKey> = engine
        .jobs
        .iter()
        .filter(|(_, j)| !j.survivors_checked)
        .filter_map(|(k, j)| j.ended_ns.map(|t| (*k, t)))
        .filter(|(k, t)| now >= t.saturating_add(engine.grace_ns(*k)))
        .map(|(k, _)| k)
        .collect();
    for key in due {
        let Some(job) = engine.jobs.get_mut(&key) else {
            continue;
        };
        job.survivors_checked = true;
        let job = job.clone();
        let ended = job.ended_ns.unwrap_or(now);
        for pid in engine.pids_of(key) {
            let Some(p) = engine.processes.get(&pid).cloned() else {
                continue;
            };
            let mut escape: Vec<String> = p.detached_via.iter().cloned().collect();
            let parent_alive = engine
                .processes
                .get(&p.ppid)
                .is_some_and(|pp| pp.job == Some(key));
            if !parent_alive && pid != job.root_pid {
                escape.insert(0, "re-parented".to_owned());
            }
            let fj = finding_job(&job, true);
            let fake = Event {
                time_ns: now,
                job: None,
                process: crate::event::ProcessRef {
                    pid,
                    tid: pid,
                    ppid: p.ppid,
                    uid: p.uid,
                    comm: p.comm.clone(),
                    cgroup_id: 0,
                },
                truncated: false,
                detail: EventDetail::JobEnd,
            };
            let process = engine.process_view(pid, &fake);
            engine.stats.survivors += 1;
            let mut finding = Finding::new(
                RuleId::ProcessSurvivedJob,
                now,
                format!(
                    "{} (pid {pid}) of {} is still running {} s after the job ended{}",
                    p.comm,
                    job_label(&fj),
                    (now - ended) / NS,
                    if escape.is_empty() {
                        String::new()
                    } else {
                        format!(" (escaped by {})", escape.join(", "))
                    }
                ),
            );
            finding.job = Some(fj);
            finding.process = Some(process);
            finding.step = p.step.clone();
            finding.escape = escape;
            out.push(finding);
        }
    }
    // When the next timer is due: the earliest stage gap or grace period still pending.
    let gap = engine.policy.stage_gap_seconds.saturating_mul(NS);
    engine.next_timer_ns = engine
        .jobs
        .iter()
        .filter_map(|(k, j)| match (j.ended_ns, j.last_stage_exit) {
            (None, Some(t)) => Some(t.saturating_add(gap)),
            (Some(t), _) if !j.survivors_checked => Some(t.saturating_add(engine.grace_ns(*k))),
            _ => None,
        })
        .min()
        .unwrap_or(u64::MAX);
}
