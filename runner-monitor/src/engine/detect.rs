//! The detections, one function per kind of evidence.

use std::net::IpAddr;

use super::{Engine, Job, LedgerEntry};
use crate::{
    engine::finding::{
        Ancestor, CredentialRef, DestinationRef, Finding, FindingJob, FindingProcess, Mitre,
        SocketRef, TargetProcess,
    },
    event::{Connect, Event, EventDetail, FileAccess, JobKey, SocketFamily},
    policy::JobSelector,
    rule::RuleId,
};

const NS: u64 = 1_000_000_000;

fn finding_job(job: &Job, ended: bool) -> FindingJob {
    FindingJob {
        key: job.key,
        id: job.info.id.clone(),
        platform: job.info.platform.clone(),
        repository: job.info.repository.clone(),
        workflow: job.info.workflow.clone(),
        run: job.info.run.clone(),
        runner: job.info.runner.clone(),
        ended,
    }
}

/// A short name for a job in summaries: `repository workflow #run` or its id.
fn job_label(job: &FindingJob) -> String {
    match &job.repository {
        Some(repo) => {
            let mut s = repo.clone();
            if let Some(w) = &job.workflow {
                s.push_str(&format!(" / {w}"));
            }
            if let Some(r) = &job.run {
                s.push_str(&format!(" #{r}"));
            }
            s
        }
        None => format!("job {}", job.id),
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

    fn grace_ns(&self, key: JobKey) -> u64 {
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
        let technique = rule.technique();
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
        Finding {
            rule,
            severity: rule.default_severity(),
            mitre: Mitre {
                id: technique.id.to_owned(),
                name: technique.name.to_owned(),
            },
            time_ns: event.time_ns,
            job,
            process: Some(process),
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
        EventDetail::FileOpen(f) => file_open(engine, event, f, out),
        EventDetail::FileRename(f) | EventDetail::FileLink(f) => file_moved(engine, event, f),
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
        EventDetail::Connect(c) => connect(engine, event, c, out),
        EventDetail::Ptrace {
            request,
            target_pid,
            targets_agent,
        } => memory_access(
            engine,
            event,
            *target_pid,
            *targets_agent,
            format!("ptrace {request}"),
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
        EventDetail::SensorStatus(status)
            if status.lost_events > 0 || !status.detached_probes.is_empty() =>
        {
            let technique = RuleId::SensorDegraded.technique();
            let mut parts = Vec::new();
            if status.lost_events > 0 {
                parts.push(format!("lost {} events", status.lost_events));
            }
            if !status.detached_probes.is_empty() {
                parts.push(format!(
                    "probes not attached: {}",
                    status.detached_probes.join(", ")
                ));
            }
            out.push(Finding {
                rule: RuleId::SensorDegraded,
                severity: RuleId::SensorDegraded.default_severity(),
                mitre: Mitre {
                    id: technique.id.to_owned(),
                    name: technique.name.to_owned(),
                },
                time_ns: event.time_ns,
                job: None,
                process: None,
                credential: None,
                destination: None,
                socket: None,
                target: None,
                origin_job: None,
                escape: Vec::new(),
                kinds: Vec::new(),
                summary: format!("the monitor is degraded: {}", parts.join("; ")),
            });
        }
        _ => {}
    }
}

fn is_ended(event: &Event) -> bool {
    event.job.as_ref().is_some_and(|j| j.ended)
}

fn file_open(engine: &mut Engine, event: &Event, f: &FileAccess, out: &mut Vec<Finding>) {
    let Some(job_key) = event.job.as_ref().map(|j| j.key) else {
        return;
    };
    if let Some(target) = f.target_pid {
        let what = f.path.rsplit('/').next().unwrap_or("mem").to_owned();
        let verb = if f.result >= 0 {
            "read"
        } else {
            "tried to read"
        };
        let mut finding = engine.raise(
            RuleId::ProcessMemoryAccess,
            event,
            format!(
                "{verb} the {what} of pid {target}{}",
                engine
                    .target_exe(target)
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            ),
        );
        finding.target = Some(TargetProcess {
            pid: target,
            exe: engine.target_exe(target),
            access: f.path.clone(),
        });
        out.push(finding);
        return;
    }
    let Some(kind) = engine.policy.credential_of(&f.path) else {
        return;
    };
    let (kind_name, runner) = (kind.kind.clone(), kind.runner);
    let credential = CredentialRef {
        path: f.path.clone(),
        kind: kind_name.clone(),
        fingerprint: f.fingerprint.clone(),
    };
    let verb = if f.write {
        "wrote"
    } else if f.result >= 0 {
        "read"
    } else {
        "tried to read"
    };

    if is_ended(event) {
        let mut finding = engine.raise(
            RuleId::CredentialAfterJobEnd,
            event,
            format!(
                "{verb} {kind_name} credential {} {}",
                f.path,
                engine.after_end_text(event)
            ),
        );
        finding.credential = Some(credential.clone());
        out.push(finding);
    }
    if runner {
        let mut finding = engine.raise(
            RuleId::RunnerCredentialAccess,
            event,
            format!("{verb} the runner's registration credential {}", f.path),
        );
        finding.credential = Some(credential.clone());
        out.push(finding);
        return;
    }
    if f.result < 0 {
        return;
    }
    if f.write {
        materialise(engine, job_key, &f.path, &kind_name);
    } else {
        // Who wrote this credential: by path, or by content (fingerprint) when it was copied.
        let by_path = engine.ledger.get(&f.path).and_then(|e| e.materialised_by);
        let by_content = f
            .fingerprint
            .as_ref()
            .and_then(|fp| engine.fingerprints.get(fp).copied());
        let origin = by_path
            .filter(|o| *o != job_key)
            .or(by_content.filter(|o| *o != job_key));
        if let Some(origin) = origin {
            let copied = by_path != Some(origin);
            out.push(reuse(engine, event, job_key, origin, &credential, copied));
        }
    }

    // Harvesting: many kinds in one job, or in one process; each reported once.
    let threshold = engine.policy.harvesting_kinds;
    let mut process_kinds = Vec::new();
    if let Some(p) = engine.processes.get_mut(&event.process.pid) {
        p.kinds.insert(kind_name.clone());
        if p.kinds.len() >= threshold && !p.harvesting_reported {
            p.harvesting_reported = true;
            process_kinds = p.kinds.iter().cloned().collect();
        }
    }
    let mut job_kinds = Vec::new();
    if let Some(job) = engine.jobs.get_mut(&job_key) {
        job.kinds.insert(kind_name.clone());
        if job.kinds.len() >= threshold && !job.harvesting_reported {
            job.harvesting_reported = true;
            job_kinds = job.kinds.iter().cloned().collect();
        }
    }
    let kinds = if !job_kinds.is_empty() {
        job_kinds
    } else {
        process_kinds
    };
    if !kinds.is_empty() {
        let mut finding = engine.raise(
            RuleId::CredentialHarvesting,
            event,
            format!(
                "touched credentials of {} kinds: {}",
                kinds.len(),
                kinds.join(", ")
            ),
        );
        finding.kinds = kinds;
        finding.credential = Some(credential);
        out.push(finding);
    }
}

/// A credential of job `origin` used by `job`: critical across repositories.
fn reuse(
    engine: &Engine,
    event: &Event,
    job: JobKey,
    origin: JobKey,
    credential: &CredentialRef,
    copied: bool,
) -> Finding {
    let origin_job = engine
        .jobs
        .get(&origin)
        .map(|j| finding_job(j, j.ended_ns.is_some()));
    let this_repo = engine
        .jobs
        .get(&job)
        .and_then(|j| j.info.repository.clone());
    let origin_repo = origin_job.as_ref().and_then(|j| j.repository.clone());
    let other_repo = this_repo != origin_repo;
    let mut finding = engine.raise(
        RuleId::CrossJobCredentialReuse,
        event,
        format!(
            "read {} credential {} that {} wrote{}{}",
            credential.kind,
            credential.path,
            origin_job
                .as_ref()
                .map_or_else(|| format!("job {origin}"), job_label),
            if copied {
                " (same content, another path)"
            } else {
                ""
            },
            if other_repo {
                " (another repository)"
            } else {
                ""
            }
        ),
    );
    if other_repo {
        finding.severity = crate::rule::Severity::Critical;
    }
    finding.credential = Some(credential.clone());
    finding.origin_job = origin_job;
    finding
}

fn materialise(engine: &mut Engine, job: JobKey, path: &str, kind: &str) {
    engine.ledger.insert(
        path.to_owned(),
        LedgerEntry {
            materialised_by: Some(job),
        },
    );
    if let Some(j) = engine.jobs.get_mut(&job) {
        j.written.insert(path.to_owned(), kind.to_owned());
    }
}

/// Rename or link: a credential put in place at the new path; one moved away is gone.
fn file_moved(engine: &mut Engine, event: &Event, f: &FileAccess) {
    let Some(job) = event.job.as_ref().map(|j| j.key) else {
        return;
    };
    if f.result < 0 {
        return;
    }
    if matches!(event.detail, EventDetail::FileRename(_)) {
        if let Some(j) = engine.jobs.get_mut(&job) {
            j.written.remove(&f.path);
        }
        engine.ledger.remove(&f.path);
    }
    if let Some(new_path) = &f.new_path
        && let Some(kind) = engine.policy.credential_of(new_path)
    {
        let kind = kind.kind.clone();
        materialise(engine, job, new_path, &kind);
    }
}

fn connect(engine: &mut Engine, event: &Event, c: &Connect, out: &mut Vec<Finding>) {
    let Some(job) = event.job.as_ref().map(|j| j.key) else {
        return;
    };
    if c.family == SocketFamily::Unix {
        let Some(path) = &c.unix_path else { return };
        let Some(kind) = engine.policy.secret_socket_of(path).map(str::to_owned) else {
            return;
        };
        let socket = SocketRef {
            path: path.clone(),
            kind: kind.clone(),
        };
        if is_ended(event) {
            let mut f = engine.raise(
                RuleId::CredentialAfterJobEnd,
                event,
                format!(
                    "connected to the {kind} socket {path} {}",
                    engine.after_end_text(event)
                ),
            );
            f.socket = Some(socket.clone());
            out.push(f);
        }
        let entitled = engine
            .policy
            .rules_for(engine.job_selector(Some(job)))
            .any(|r| r.secret_sockets.contains(&kind));
        if !entitled {
            let mut f = engine.raise(
                RuleId::SecretSocketAccess,
                event,
                format!(
                    "connected to the {kind} socket {path}, which its policy does not entitle it to"
                ),
            );
            f.socket = Some(socket);
            out.push(f);
        }
        return;
    }
    let (Some(ip), Some(port)) = (c.ip, c.port) else {
        return;
    };
    if ip.is_unspecified() {
        return;
    }
    let names = engine.dns.get(&(job, ip)).cloned().unwrap_or_default();
    let destination = DestinationRef {
        ip,
        port,
        dns_name: names.first().cloned(),
    };
    let shown = match &destination.dns_name {
        Some(name) => format!("{name} ({ip}) port {port}"),
        None => format!("{ip} port {port}"),
    };
    if is_ended(event) && !ip.is_loopback() {
        let mut f = engine.raise(
            RuleId::CredentialAfterJobEnd,
            event,
            format!("connected to {shown} {}", engine.after_end_text(event)),
        );
        f.destination = Some(destination.clone());
        out.push(f);
    }
    if engine.policy.is_metadata_endpoint(ip) {
        let mut f = engine.raise(
            RuleId::MetadataEndpointAccess,
            event,
            format!("connected to the cloud metadata endpoint {ip} port {port}"),
        );
        f.destination = Some(destination);
        out.push(f);
        return;
    }
    if !egress_allowed(engine, job, ip, port, &names) {
        let mut f = engine.raise(
            RuleId::UnexpectedEgress,
            event,
            format!("connected to {shown}, outside its egress allowlist"),
        );
        f.destination = Some(destination);
        out.push(f);
    }
}

fn egress_allowed(engine: &Engine, job: JobKey, ip: IpAddr, port: u16, names: &[String]) -> bool {
    engine
        .policy
        .egress_allow
        .iter()
        .any(|a| a.allows(ip, port, names))
        || engine
            .policy
            .rules_for(engine.job_selector(Some(job)))
            .any(|r| r.allow_egress.iter().any(|a| a.allows(ip, port, names)))
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
    let technique = RuleId::CredentialLeftBehind.technique();
    let fj = finding_job(job, true);
    for (path, kind) in &job.written {
        out.push(Finding {
            rule: RuleId::CredentialLeftBehind,
            severity: RuleId::CredentialLeftBehind.default_severity(),
            mitre: Mitre {
                id: technique.id.to_owned(),
                name: technique.name.to_owned(),
            },
            time_ns,
            job: Some(fj.clone()),
            process: None,
            credential: Some(CredentialRef {
                path: path.clone(),
                kind: kind.clone(),
                fingerprint: None,
            }),
            destination: None,
            socket: None,
            target: None,
            origin_job: None,
            escape: Vec::new(),
            kinds: Vec::new(),
            summary: format!(
                "{} ended and left the {kind} credential it wrote at {path}",
                job_label(&fj)
            ),
        });
    }
    // The job's written credentials are reported once.
    if let Some(j) = engine.jobs.get_mut(&job.key) {
        j.written.clear();
    }
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
        let survivors: Vec<u32> = engine
            .processes
            .iter()
            .filter(|(_, p)| p.job == Some(key))
            .map(|(pid, _)| *pid)
            .collect();
        for pid in survivors {
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
            let technique = RuleId::ProcessSurvivedJob.technique();
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
            out.push(Finding {
                rule: RuleId::ProcessSurvivedJob,
                severity: RuleId::ProcessSurvivedJob.default_severity(),
                mitre: Mitre {
                    id: technique.id.to_owned(),
                    name: technique.name.to_owned(),
                },
                time_ns: now,
                job: Some(fj.clone()),
                summary: format!(
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
                process: Some(process),
                credential: None,
                destination: None,
                socket: None,
                target: None,
                origin_job: None,
                escape,
                kinds: Vec::new(),
            });
        }
    }
}
