//! Carrying out control-socket requests against the sensor, the job directory and the engine.

use crate::{
    enrich,
    event::{Event, EventDetail},
    job::{
        JobDirectory, agent_event,
        control::{self, Request, Response},
        job_start_event,
    },
    pipeline::Pipeline,
    policy::Policy,
    sensor::Sensor,
};

/// Runs one event through the engine and writes the findings, with what only the live agent can
/// add (a survivor's tracking id).
pub fn feed(
    pipeline: &mut Pipeline,
    directory: &JobDirectory,
    event: &Event,
) -> std::io::Result<()> {
    let mut findings = pipeline.handle(event)?;
    for f in &mut findings {
        enrich::survivor_tracking_id(f, directory);
    }
    pipeline.alert_all(&findings)
}

/// Carries out a control-socket request. A process inside a job speaks only for its own job.
pub fn control_request(
    sensor: &mut Sensor,
    directory: &mut JobDirectory,
    pipeline: &mut Pipeline,
    policy: &Policy,
    peer: control::Peer,
    request: Request,
) -> anyhow::Result<Response> {
    // Stages of one staged job (GitLab) are that job.
    let peer_job = sensor.job_of(peer.pid).map(|k| directory.job_of_stage(k));
    Ok(match request {
        Request::JobStart { pid, info } => {
            if info.id.trim().is_empty() {
                return Ok(Response::error("a job id is required"));
            }
            let id_owner = directory.key_of(&info.id);
            let staged = policy.has_stages(info.platform.as_deref());
            let key = match sensor.job_of(pid) {
                Some(key) => {
                    if peer_job.is_some_and(|p| p != directory.job_of_stage(key)) {
                        return Ok(Response::error(format!(
                            "process {pid} belongs to another job"
                        )));
                    }
                    match id_owner {
                        // Another stage of a staged job (GitLab) names itself.
                        Some(owner) if staged => directory.add_stage(key, owner),
                        Some(owner) if owner != key => {
                            return Ok(Response::error(format!(
                                "job id {:?} is already in use by another job",
                                info.id
                            )));
                        }
                        _ => {}
                    }
                    key
                }
                None => {
                    if peer_job.is_some() {
                        return Ok(Response::error(
                            "a process inside a job cannot start a job for a process outside it",
                        ));
                    }
                    if id_owner.is_some() && !staged {
                        return Ok(Response::error(format!(
                            "job id {:?} is already in use",
                            info.id
                        )));
                    }
                    let key = match sensor.register_job(pid) {
                        Ok(key) => key,
                        Err(e) => return Ok(Response::error(e.to_string())),
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
            feed(pipeline, directory, &job_start_event(key, pid, *info))?;
            Response::ok(key.to_string())
        }
        Request::JobEnd { id } => {
            let Some(key) = directory.key_of(&id) else {
                return Ok(Response::error(format!("no job {id:?}")));
            };
            if peer_job.is_some_and(|p| p != directory.job_of_stage(key)) {
                return Ok(Response::error("a process cannot end another job"));
            }
            if let Err(e) = sensor.end_job(key) {
                return Ok(Response::error(e.to_string()));
            }
            feed(
                pipeline,
                directory,
                &agent_event(EventDetail::JobEnd, Some(key), peer.pid),
            )?;
            Response::ok(key.to_string())
        }
    })
}
