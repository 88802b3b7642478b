//! Carrying out control-socket requests: the kernel's job maps (the sensor), the job directory,
//! and the resulting `job_start` / `job_end` through the pipeline.

use runner_monitor::{
    event::{ContainerInfo, EventDetail},
    job::{
        agent_event,
        control::{self, Outcome, Reply, Request},
        job_start_event,
    },
    pipeline::Pipeline,
    report,
    sensor::{Claim, Sensor},
};

/// Carries out a control-socket request. A process inside a job speaks only for its own job; a
/// job is started (named) through the socket once and ended once: a replay of either is refused,
/// so a job's process cannot rename its job (and the per-repository rules that apply to it) or
/// move its end.
pub fn control_request(
    sensor: &mut Sensor,
    pipeline: &mut Pipeline,
    peer: control::Peer,
    request: Request,
) -> std::io::Result<Reply> {
    if let Request::JobReport { id } = &request {
        return Ok(job_report(sensor, pipeline, peer, id));
    }
    if request == Request::Status {
        return Ok(Reply::status(status(sensor, pipeline)));
    }
    let policy = pipeline.policy().clone();
    if let Request::ContainerJob {
        container,
        created_ns,
        info,
        named_by_environment,
    } = request
    {
        return container_job(
            sensor,
            pipeline,
            &container,
            created_ns,
            (*info, named_by_environment),
        );
    }
    let directory = pipeline.jobs_mut();
    // Stages of one staged job (GitLab) are that job.
    let peer_job = sensor.job_of(peer.pid).map(|k| directory.job_of_stage(k));
    Ok(match request {
        Request::JobStart { pid, info } => {
            if info.id.trim().is_empty() {
                return Ok(Reply::refused(Outcome::Rejected, "a job id is required"));
            }
            let id_owner = directory.key_of(&info.id);
            let staged = policy.has_stages(info.platform.as_deref());
            let key = match sensor.job_of(pid) {
                Some(key) => {
                    if peer_job.is_some_and(|p| p != directory.job_of_stage(key)) {
                        return Ok(Reply::refused(
                            Outcome::CrossJob,
                            format!("process {pid} belongs to another job"),
                        ));
                    }
                    if let Some(started) = directory.explicit_id(key) {
                        return Ok(Reply::refused(
                            Outcome::Replayed,
                            format!("the job of process {pid} was already started as {started:?}"),
                        ));
                    }
                    match id_owner {
                        // Another stage of a staged job (GitLab) names itself.
                        Some(owner) if staged => directory.add_stage(key, owner),
                        Some(owner) if owner != key => {
                            return Ok(Reply::refused(
                                Outcome::Replayed,
                                format!("job id {:?} is already in use by another job", info.id),
                            ));
                        }
                        _ => {}
                    }
                    key
                }
                None => {
                    if peer_job.is_some() {
                        return Ok(Reply::refused(
                            Outcome::CrossJob,
                            "a process inside a job cannot start a job for a process outside it",
                        ));
                    }
                    if id_owner.is_some() && !staged {
                        return Ok(Reply::refused(
                            Outcome::Replayed,
                            format!("job id {:?} is already in use", info.id),
                        ));
                    }
                    let key = match sensor.register_job(pid) {
                        Ok(key) => key,
                        Err(e) => return Ok(Reply::refused(Outcome::Rejected, e.to_string())),
                    };
                    if let Some(owner) = id_owner {
                        directory.add_stage(key, owner);
                    }
                    key
                }
            };
            directory.set_explicit(key, &info.id);
            // The id is the peer's: Debug-escaped (`%` would write its bytes raw into the log).
            tracing::info!(job = %key, id = ?info.id, pid, peer = peer.pid, "job started (control socket)");
            pipeline.run([job_start_event(key, pid, *info)])?;
            Reply::ok(key.to_string())
        }
        Request::JobEnd { id } => {
            let Some(key) = directory.key_of(&id) else {
                return Ok(Reply::refused(Outcome::Rejected, format!("no job {id:?}")));
            };
            if peer_job.is_some_and(|p| p != directory.job_of_stage(key)) {
                return Ok(Reply::refused(
                    Outcome::CrossJob,
                    "a process cannot end another job",
                ));
            }
            if directory.end_requested(key) {
                return Ok(Reply::refused(
                    Outcome::Replayed,
                    format!("job {id:?} was already ended"),
                ));
            }
            if let Err(e) = sensor.end_job(key) {
                return Ok(Reply::refused(Outcome::Rejected, e.to_string()));
            }
            directory.set_end_requested(key);
            pipeline.run([agent_event(EventDetail::JobEnd, Some(key), peer.pid)])?;
            Reply::ok(key.to_string())
        }
        Request::JobReport { .. } | Request::Status | Request::ContainerJob { .. } => {
            unreachable!("answered above")
        }
    })
}

/// GitLab Runner created `container` for the job `info` names (Docker's events at its socket):
/// the container is registered as that job's in the kernel before the runner starts it. The job
/// is the one with that GitLab job id (an earlier container's, or a stage the environment scan
/// found), or else a new one that starts at this create. A container whose `CI_*` variables
/// name the job (`named_by_environment`; a service's may hold none, and then the runner's
/// labels named the job) names it again: the project's path replaces its id, and the job's
/// start moves to this create if that is earlier. A container whose cgroup is there already
/// (it runs, or its start beat this registration) is adopted: its cgroup and processes.
fn container_job(
    sensor: &mut Sensor,
    pipeline: &mut Pipeline,
    container: &str,
    created_ns: u64,
    (info, named_by_environment): (runner_monitor::event::JobInfo, bool),
) -> std::io::Result<Reply> {
    let policy = pipeline.policy().clone();
    let directory = pipeline.jobs_mut();
    let existing = directory.key_of(&info.id);
    let key = existing.unwrap_or_else(|| sensor.new_container_job_key());
    // First the kernel: the runner starts the container next. An entry already there is a
    // job's start request (or this container's registration, when the daemon's events are
    // followed again): it stays, and the container names nothing. A cgroup made before the
    // entry (the container runs already, or its start beat this) is adopted
    // (`sensor/adopt.rs`); what its processes did before is not seen.
    let adopted = match sensor.claim_container(container, key) {
        Ok(Claim::Kept) => {
            tracing::info!(container, id = ?info.id,
                "GitLab-labelled container already requested (by a job, or registered): kept");
            return Ok(Reply::ok(key.to_string()));
        }
        Ok(Claim::Requested) => None,
        Ok(Claim::Adopted { path, cgroup }) => Some((path, cgroup)),
        Err(e) => return Ok(Reply::refused(Outcome::Rejected, e.to_string())),
    };
    let start = match existing {
        None => {
            if let Err(e) = sensor.register_container_job(key, created_ns) {
                return Ok(Reply::refused(Outcome::Rejected, e.to_string()));
            }
            directory.discover_container_job(key, created_ns, info.clone(), &policy)
        }
        Some(key) if named_by_environment && directory.explicit_id(key).is_none() => {
            Some(runner_monitor::event::Event {
                time_ns: created_ns,
                ..job_start_event(key, 0, info.clone())
            })
        }
        Some(_) => None,
    };
    // How long after its create: the runner's start request, its runtime and the cgroup come
    // after this (the margin is measured in tests/tests/containers_gitlab.rs).
    let after_create_us = runner_monitor::clock::monotonic_ns().saturating_sub(created_ns) / 1000;
    tracing::info!(job = %key, container, id = ?info.id, after_create_us,
        "GitLab container registered as its job's");
    if let Some(start) = start {
        pipeline.run([start])?;
    }
    // The adopted container as the kernel would have announced it: findings name it.
    if let Some((path, cgroup)) = adopted {
        let info = ContainerInfo::new(container.to_owned(), path, cgroup);
        pipeline.run([agent_event(EventDetail::Container(info), Some(key), 0)])?;
    }
    Ok(Reply::ok(key.to_string()))
}

/// The agent's state: the egress mode in force, how many jobs block mode has a plan for and
/// refuses egress of, the connections it refused, and whether the kernel can enforce it.
fn status(sensor: &Sensor, pipeline: &Pipeline) -> serde_json::Value {
    let policy = pipeline.policy();
    let stats = pipeline.stats();
    serde_json::json!({
        "egress": {
            "mode": policy.egress.mode.as_str(),
            "on_agent_failure": policy.egress.on_agent_failure,
            "rules_blocking": policy.blocking_rules(),
            "jobs_planned": sensor.egress().planned_jobs().len(),
            "jobs_blocking": sensor.egress().blocking_jobs(),
            "connections_blocked": stats.egress.get("blocked").copied().unwrap_or(0),
            "enforceable": runner_monitor::sensor::egress::missing_enforcement(sensor.probes(), policy)
                .is_empty(),
        }
    })
}

/// A job's report, read-only. A process inside a job gets its own job's report only: another
/// job's processes, credentials and destinations are not its business.
fn job_report(sensor: &Sensor, pipeline: &Pipeline, peer: control::Peer, id: &str) -> Reply {
    let Some(reports) = pipeline.reports() else {
        return Reply::refused(Outcome::Rejected, "this agent keeps no job reports");
    };
    // Copied out: the lock is held for the lookup only.
    let found = report::lock(reports).find(id);
    let Some(found) = found else {
        return Reply::refused(Outcome::Rejected, format!("no report of a job {id:?}"));
    };
    let directory = pipeline.jobs();
    let peer_job = sensor.job_of(peer.pid).map(|k| directory.job_of_stage(k));
    if peer_job.is_some_and(|p| p != directory.job_of_stage(found.key)) {
        return Reply::refused(
            Outcome::CrossJob,
            "a process cannot read another job's report",
        );
    }
    match serde_json::to_value(&found) {
        Ok(value) => Reply::report(found.key.to_string(), value),
        Err(e) => Reply::refused(Outcome::Rejected, format!("encoding the report: {e}")),
    }
}
