//! Credential files: reads, writes, reuse across jobs, harvesting.

use super::{Engine, LedgerEntry, baseline, finding_job, is_ended, job_label};
use crate::{
    engine::{
        finding::{CredentialRef, Finding, TargetProcess},
        usage::Used,
    },
    event::{Event, EventDetail, FileAccess, JobKey},
    rule::RuleId,
};

/// A file a job process opened: another process's memory, or a credential read or written.
pub(super) fn file_open(
    engine: &mut Engine,
    event: &Event,
    f: &FileAccess,
    out: &mut Vec<Finding>,
) {
    let Some(job_key) = event.job.as_ref().map(|j| j.key) else {
        return;
    };
    if let Some(target) = f.target_pid {
        out.push(process_memory_access(engine, event, f, target));
        return;
    }
    let Some(kind) = engine.policy.credential_of_access(f) else {
        return;
    };
    let (kind_name, runner) = (kind.kind.clone(), kind.runner);
    // Built only for a finding: most reads of a credential during its job raise none.
    let credential = || CredentialRef {
        path: f.path.clone(),
        kind: kind_name.clone(),
        fingerprint: f.fingerprint.clone(),
        used_path: f.via.clone(),
    };
    let verb = verb_of(f);
    if let Some(finding) = after_end(engine, event, f) {
        out.push(finding);
    }
    if runner {
        out.push(runner_credential_access(engine, event, verb, &credential()));
        return;
    }
    if f.result < 0 {
        return;
    }
    let accesses = &mut engine.stats.credential_accesses;
    match accesses.get_mut(&kind_name) {
        Some(n) => *n += 1,
        None => {
            accesses.insert(kind_name.clone(), 1);
        }
    }
    if baseline::wanted(engine) {
        let used = Used::Credential {
            kind: kind_name.clone(),
            path: f.path.clone(),
        };
        baseline::used(engine, event, job_key, used, out);
    }
    if f.write {
        materialise(engine, event, job_key, &f.path, &kind_name, out);
    } else if let Some((origin, copied)) = written_by_another_job(engine, job_key, f) {
        out.push(reuse(engine, event, job_key, origin, &credential(), copied));
    }
    if let Some(finding) = credential_harvesting(engine, event, job_key, &kind_name, credential) {
        out.push(finding);
    }
}

/// Another process's `/proc/<pid>/{mem,environ,maps}` opened, or tried.
fn process_memory_access(engine: &Engine, event: &Event, f: &FileAccess, target: u32) -> Finding {
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
    finding
}

/// `credential-after-job-end` for a file opened by a process of an ended job, if the file is a
/// credential.
pub(super) fn after_end(engine: &Engine, event: &Event, f: &FileAccess) -> Option<Finding> {
    if !is_ended(event) || f.target_pid.is_some() {
        return None;
    }
    let kind = engine.policy.credential_of_access(f)?;
    let credential = CredentialRef {
        path: f.path.clone(),
        kind: kind.kind.clone(),
        fingerprint: f.fingerprint.clone(),
        used_path: f.via.clone(),
    };
    Some(credential_after_job_end(
        engine,
        event,
        verb_of(f),
        &credential,
    ))
}

fn verb_of(f: &FileAccess) -> &'static str {
    if f.write {
        "wrote"
    } else if f.io_uring {
        // Seen at submission: whether the open then succeeded is not known.
        "submitted an io_uring open of"
    } else if f.result >= 0 {
        "read"
    } else {
        "tried to read"
    }
}

/// A credential touched by a process its job left behind.
fn credential_after_job_end(
    engine: &Engine,
    event: &Event,
    verb: &str,
    credential: &CredentialRef,
) -> Finding {
    let mut finding = engine.raise(
        RuleId::CredentialAfterJobEnd,
        event,
        format!(
            "{verb} {} credential {} {}",
            credential.kind,
            credential.path,
            engine.after_end_text(event)
        ),
    );
    finding.credential = Some(credential.clone());
    finding
}

/// The runner's own registration credential touched by a job.
fn runner_credential_access(
    engine: &Engine,
    event: &Event,
    verb: &str,
    credential: &CredentialRef,
) -> Finding {
    let mut finding = engine.raise(
        RuleId::RunnerCredentialAccess,
        event,
        format!(
            "{verb} the runner's registration credential {}",
            credential.path
        ),
    );
    finding.credential = Some(credential.clone());
    finding
}

/// The other job that wrote the credential `job` reads, by path, or by content (fingerprint)
/// when it was copied; and whether it was copied.
fn written_by_another_job(engine: &Engine, job: JobKey, f: &FileAccess) -> Option<(JobKey, bool)> {
    let by_path = engine.ledger.get(&f.path).and_then(|e| e.materialised_by);
    let by_content = f
        .fingerprint
        .as_ref()
        .and_then(|fp| engine.fingerprints.get(fp).copied());
    let origin = by_path
        .filter(|o| *o != job)
        .or(by_content.filter(|o| *o != job))?;
    Some((origin, by_path != Some(origin)))
}

/// Harvesting: many credential kinds in one job, or in one process; each reported once. Records
/// `kind` as touched by the process and its job.
fn credential_harvesting(
    engine: &mut Engine,
    event: &Event,
    job: JobKey,
    kind: &str,
    credential: impl FnOnce() -> CredentialRef,
) -> Option<Finding> {
    let threshold = engine.policy.harvesting_kinds;
    let mut process_kinds = Vec::new();
    if let Some(p) = engine.processes.get_mut(&event.process.pid) {
        if !p.kinds.contains(kind) {
            p.kinds.insert(kind.to_owned());
        }
        if p.kinds.len() >= threshold && !p.harvesting_reported {
            p.harvesting_reported = true;
            process_kinds = p.kinds.iter().cloned().collect();
        }
    }
    let mut job_kinds = Vec::new();
    if let Some(j) = engine.jobs.get_mut(&job) {
        if !j.kinds.contains(kind) {
            j.kinds.insert(kind.to_owned());
        }
        if j.kinds.len() >= threshold && !j.harvesting_reported {
            j.harvesting_reported = true;
            job_kinds = j.kinds.iter().cloned().collect();
        }
    }
    let kinds: Vec<String> = if !job_kinds.is_empty() {
        job_kinds
    } else {
        process_kinds
    };
    if kinds.is_empty() {
        return None;
    }
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
    finding.credential = Some(credential());
    Some(finding)
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
    let origin_repo = origin_job.as_ref().and_then(|j| j.info.repository.clone());
    // Critical only when both repositories are known and differ: a job not yet identified
    // (its identity is read from /proc, which can lag) is not claimed to be another repository.
    let other_repo = matches!((&this_repo, &origin_repo), (Some(a), Some(b)) if a != b);
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

/// A credential job `job` put at `path`. Written while the job ran but seen after the engine
/// ended it (a write is reported once the writer closed it and was hashed, which can come after
/// the runner's end request): left behind at once, since the end has already been judged.
fn materialise(
    engine: &mut Engine,
    event: &Event,
    job: JobKey,
    path: &str,
    kind: &str,
    out: &mut Vec<Finding>,
) {
    engine.ledger.insert(
        path.to_owned(),
        LedgerEntry {
            materialised_by: Some(job),
        },
    );
    let Some(j) = engine.jobs.get_mut(&job) else {
        return;
    };
    match j.ended_ns {
        None => {
            j.written.insert(path.to_owned(), kind.to_owned());
        }
        Some(ended) if !is_ended(event) => {
            let fj = finding_job(j, true);
            out.push(super::left_behind(&fj, path, kind, ended));
        }
        // Written by a survivor after the end: credential-after-job-end says it.
        Some(_) => {}
    }
}

/// Rename or link: a credential put in place at the new path; one moved away is gone.
pub(super) fn file_moved(
    engine: &mut Engine,
    event: &Event,
    f: &FileAccess,
    out: &mut Vec<Finding>,
) {
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
        materialise(engine, event, job, new_path, &kind, out);
    }
}
