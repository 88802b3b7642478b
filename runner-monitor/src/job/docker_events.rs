//! GitLab's docker executor ends a job by removing its containers: the build, helper and service
//! containers the runner made for it, all labelled `com.gitlab.gitlab-runner.job.id`. This
//! watches Docker's event stream at the runner's socket (each `docker` secret-socket path of the
//! policy that is a plain path and exists) and, when the last container of a job is destroyed,
//! ends that job through the control socket's own route (a `job_end` request from the agent
//! itself): as exact as the runner's hook, with no hook installed. A job with a hook is ended
//! by the hook first; the second end is refused as a replay, which is harmless.
//!
//! It also says when a job starts and which containers are its: at each container's `create`
//! (and, when it subscribes, for each labelled container that exists already) it inspects the
//! container and hands its id, its create time and the job's identity (`gitlab_containers.rs`)
//! to the agent's main loop (`Request::ContainerJob`), which registers the id as the job's in
//! the kernel's requested-container map before the runner starts the container: its cgroup,
//! made at start, is the job's, and so is every process in it from its first instruction,
//! whatever its environment holds. Without the daemon (not running, the agent not allowed to
//! open its socket) the kernel's environment scan finds the job at its first entrypoint's exec,
//! containers without `CI_*` variables are no job, and jobs end `stage_gap_seconds` after the
//! last stage's root exits.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::BufRead,
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::sync::{mpsc, oneshot};

use super::{
    control::{Command, Peer, Request},
    gitlab_containers::{self, JOB_LABEL},
};
use crate::{clock::monotonic_ns, docker_api, policy::JobIdentity};

/// `{"label":["com.gitlab.gitlab-runner.job.id"]}`, URL-encoded.
const LABEL_FILTER: &str = "%7B%22label%22%3A%5B%22com.gitlab.gitlab-runner.job.id%22%5D%2C\
                            %22type%22%3A%5B%22container%22%5D%7D";
const LIST_FILTER: &str = "%7B%22label%22%3A%5B%22com.gitlab.gitlab-runner.job.id%22%5D%7D";

/// The live containers of each GitLab job, as the daemon reported them.
#[derive(Debug, Default)]
pub struct JobContainers {
    live: BTreeMap<String, BTreeSet<String>>,
}

impl JobContainers {
    /// A container of job `job` exists.
    pub fn add(&mut self, job: &str, container: &str) {
        self.live
            .entry(job.to_owned())
            .or_default()
            .insert(container.to_owned());
    }

    /// One event of Docker's stream; returns the job whose last container it destroyed.
    pub fn event(&mut self, event: &serde_json::Value) -> Option<String> {
        let actor = &event["Actor"];
        let job = actor["Attributes"][JOB_LABEL].as_str()?;
        let container = actor["ID"].as_str()?;
        match event["Action"].as_str()? {
            "create" => {
                self.add(job, container);
                None
            }
            "destroy" => {
                let left = self.live.get_mut(job)?;
                if !left.remove(container) || !left.is_empty() {
                    return None;
                }
                self.live.remove(job);
                Some(job.to_owned())
            }
            _ => None,
        }
    }
}

/// Watches each socket on a thread of its own (reconnecting while the agent runs), hands every
/// labelled container to the main loop at its create, and sends a `job_end` for every job whose
/// containers are all gone. `gitlab`: the policy's GitLab identity (which `CI_*` variables name
/// what).
pub fn watch(sockets: Vec<PathBuf>, gitlab: Option<JobIdentity>, commands: mpsc::Sender<Command>) {
    for socket in sockets {
        let commands = commands.clone();
        let gitlab = gitlab.clone();
        let spawned = std::thread::Builder::new()
            .name("docker-events".into())
            .spawn(move || {
                let mut logged = false;
                loop {
                    if let Err(error) = follow(&socket, gitlab.as_ref(), &commands)
                        && !logged
                    {
                        tracing::info!(
                            socket = %socket.display(),
                            %error,
                            "Docker's event stream not followed (retrying): GitLab \
                             docker-executor jobs end stage_gap_seconds after their last \
                             container's entrypoint"
                        );
                        logged = true;
                    }
                    if commands.is_closed() {
                        return;
                    }
                    std::thread::sleep(Duration::from_secs(2));
                }
            });
        if let Err(error) = spawned {
            tracing::warn!(%error, "no thread to follow Docker's events");
        }
    }
}

/// Follows one daemon's events until the stream ends or fails.
fn follow(
    socket: &Path,
    gitlab: Option<&JobIdentity>,
    commands: &mpsc::Sender<Command>,
) -> std::io::Result<()> {
    // Subscribe first, then list: a container made in between is in both, never in neither.
    let mut events = docker_api::request(socket, &format!("/events?filters={LABEL_FILTER}"), None)?;
    let mut jobs = JobContainers::default();
    for container in list(socket)? {
        if let (Some(id), Some(job)) = (
            container["Id"].as_str(),
            container["Labels"][JOB_LABEL].as_str(),
        ) {
            jobs.add(job, id);
            // Created before the agent followed the daemon: its job starts no later.
            let created = container["Created"].as_u64().unwrap_or(0);
            register(
                socket,
                id,
                created.saturating_mul(1_000_000_000),
                gitlab,
                commands,
            );
        }
    }
    tracing::info!(socket = %socket.display(), jobs = jobs.live.len(), "following Docker's events");
    let mut line = String::new();
    loop {
        line.clear();
        if events.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the daemon closed its event stream",
            ));
        }
        let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if event["Action"] == "create"
            && let Some(id) = event["Actor"]["ID"].as_str()
        {
            let created = event["timeNano"].as_u64().unwrap_or(0);
            register(socket, id, created, gitlab, commands);
        }
        if let Some(id) = jobs.event(&event) {
            tracing::info!(id = ?id, "the runner removed the last container of GitLab job: ending it");
            let (reply, answer) = oneshot::channel();
            let command = Command {
                // Pid 0: the agent itself, no process of any job.
                peer: Peer { uid: 0, pid: 0 },
                request: Request::JobEnd { id },
                reply,
            };
            if commands.blocking_send(command).is_err() {
                return Ok(());
            }
            drop(answer);
        }
    }
}

/// Hands container `id` of a GitLab job, created at `created_wall_ns` (CLOCK_REALTIME; 0:
/// unknown), to the main loop, and waits until it is registered: the runner starts it next.
fn register(
    socket: &Path,
    id: &str,
    created_wall_ns: u64,
    gitlab: Option<&JobIdentity>,
    commands: &mpsc::Sender<Command>,
) {
    let inspect = match gitlab_containers::inspect(socket, id) {
        Ok(inspect) => inspect,
        Err(error) => {
            // Removed already, or the daemon did not answer: its job is found at its exec.
            tracing::debug!(id, %error, "GitLab container not inspected");
            return;
        }
    };
    let Some((info, named_by_environment)) = gitlab_containers::identity(&inspect, gitlab) else {
        return;
    };
    let (reply, answer) = oneshot::channel();
    let command = Command {
        peer: Peer { uid: 0, pid: 0 },
        request: Request::ContainerJob {
            container: id.to_owned(),
            created_ns: monotonic_of_wall(created_wall_ns),
            info: Box::new(info),
            named_by_environment,
        },
        reply,
    };
    if commands.blocking_send(command).is_ok()
        && let Ok(reply) = answer.blocking_recv()
        && !reply.response.ok
    {
        tracing::warn!(id, error = ?reply.response.error, "GitLab container not registered");
    }
}

/// A CLOCK_REALTIME time as CLOCK_MONOTONIC (the events' clock); now for 0 or a future time.
fn monotonic_of_wall(wall_ns: u64) -> u64 {
    let now = monotonic_ns();
    let wall_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    if wall_ns == 0 {
        return now;
    }
    now.saturating_sub(wall_now.saturating_sub(wall_ns))
}

/// The containers with GitLab's job label, running or not.
fn list(socket: &Path) -> std::io::Result<Vec<serde_json::Value>> {
    let answer = docker_api::get(
        socket,
        &format!("/containers/json?all=1&filters={LIST_FILTER}"),
        Duration::from_secs(5),
        16 << 20,
    )?;
    serde_json::from_value(answer)
        .map_err(|_| std::io::Error::other("the container list is no list"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(action: &str, job: &str, id: &str) -> serde_json::Value {
        serde_json::json!({
            "Type": "container",
            "Action": action,
            "Actor": {"ID": id, "Attributes": {JOB_LABEL: job, "name": "runner-x-build"}},
        })
    }

    #[test]
    fn a_job_ends_when_its_last_container_is_destroyed_not_before() {
        let mut jobs = JobContainers::default();
        jobs.add("41", "predefined");
        assert_eq!(jobs.event(&event("create", "41", "build")), None);
        assert_eq!(jobs.event(&event("create", "42", "other")), None);
        assert_eq!(jobs.event(&event("die", "41", "build")), None);
        assert_eq!(jobs.event(&event("destroy", "41", "build")), None);
        // A container of another job, or one never seen, ends nothing.
        assert_eq!(jobs.event(&event("destroy", "41", "unknown")), None);
        assert_eq!(
            jobs.event(&event("destroy", "41", "predefined")),
            Some("41".to_owned())
        );
        // Ended once: a late duplicate destroy does not end it again.
        assert_eq!(jobs.event(&event("destroy", "41", "predefined")), None);
        assert_eq!(
            jobs.event(&event("destroy", "42", "other")),
            Some("42".to_owned())
        );
        // Events without the label are not GitLab's.
        assert_eq!(
            jobs.event(&serde_json::json!({"Action": "destroy", "Actor": {"ID": "x"}})),
            None
        );
    }
}
