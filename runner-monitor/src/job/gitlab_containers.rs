//! Who a GitLab docker-executor container is, from the daemon's description of it at its
//! create (`GET /containers/<id>/json`): the job id from the runner's label
//! `com.gitlab.gitlab-runner.job.id`, the rest from the job's `CI_*` variables the policy names
//! for GitLab (`CI_PROJECT_PATH`, `CI_JOB_NAME`, `CI_PIPELINE_ID`, ...), and, for a container
//! whose environment lacks them (a service such as `docker:dind`), from the runner's other
//! labels: the project id as the repository, the pipeline id as the run, the runner id.
//!
//! Only the named variables are looked at: the container's environment also holds the job's
//! secrets (`CI_JOB_TOKEN`, the project's variables), whose values are never kept or logged.

use std::{path::Path, time::Duration};

use super::discovery;
use crate::{docker_api, event::JobInfo, policy::JobIdentity};

/// The label GitLab Runner puts on every container of a job, with the job's id.
pub const JOB_LABEL: &str = "com.gitlab.gitlab-runner.job.id";

const PROJECT_LABEL: &str = "com.gitlab.gitlab-runner.project.id";
const PIPELINE_LABEL: &str = "com.gitlab.gitlab-runner.pipeline.id";
const RUNNER_LABEL: &str = "com.gitlab.gitlab-runner.runner.id";
/// Longest label value kept (the same bound as an environment value's).
const MAX_VALUE: usize = 256;
/// The most of an inspect read (a few KiB; an environment can be large).
const MAX_ANSWER: u64 = 4 << 20;

/// The variables `identity` names, the only ones read from a container's environment.
fn named(identity: &JobIdentity) -> Vec<&str> {
    let optional = [
        &identity.repository,
        &identity.workflow,
        &identity.run,
        &identity.attempt,
        &identity.runner,
        &identity.actor,
        &identity.git_ref,
        &identity.event,
        &identity.tracking_id,
    ];
    std::iter::once(identity.detect.as_str())
        .chain(identity.id.iter().map(String::as_str))
        .chain(optional.into_iter().flatten().map(String::as_str))
        .collect()
}

fn label(inspect: &serde_json::Value, name: &str) -> Option<String> {
    let value = inspect["Config"]["Labels"][name].as_str()?.trim();
    if value.is_empty() {
        return None;
    }
    let mut end = value.len().min(MAX_VALUE);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    Some(value[..end].to_owned())
}

/// The job of a container the daemon describes as `inspect`, when it carries GitLab Runner's
/// job label, and whether its environment named it (else the labels alone did). `gitlab`: the
/// policy's GitLab identity (which variables name what).
pub fn identity(
    inspect: &serde_json::Value,
    gitlab: Option<&JobIdentity>,
) -> Option<(JobInfo, bool)> {
    let id = label(inspect, JOB_LABEL)?;
    // Only the variables the identity names, as `NAME=value\0`: nothing else is copied.
    let mut environ = Vec::new();
    if let (Some(gitlab), Some(env)) = (gitlab, inspect["Config"]["Env"].as_array()) {
        let names = named(gitlab);
        for entry in env.iter().filter_map(serde_json::Value::as_str) {
            let Some((name, _)) = entry.split_once('=') else {
                continue;
            };
            if names.contains(&name) && !entry.contains('\0') {
                environ.extend_from_slice(entry.as_bytes());
                environ.push(0);
            }
        }
    }
    let found = gitlab.and_then(|g| discovery::identify(&environ, std::slice::from_ref(g)));
    let from_environment = found.is_some();
    let mut info = found.unwrap_or_default();
    // The label names the job, whatever the environment says.
    info.id = id;
    info.platform = Some(gitlab.map_or("gitlab", |g| g.platform.as_str()).to_owned());
    if info.repository.is_none() {
        // GitLab's API takes a project's numeric id wherever it takes its path.
        info.repository = label(inspect, PROJECT_LABEL);
    }
    if info.run.is_none() {
        info.run = label(inspect, PIPELINE_LABEL);
    }
    if info.runner.is_none() {
        info.runner = label(inspect, RUNNER_LABEL);
    }
    Some((info, from_environment))
}

/// `GET /containers/<id>/json` at the daemon's socket.
pub fn inspect(socket: &Path, id: &str) -> std::io::Result<serde_json::Value> {
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(std::io::Error::other("not a container id"));
    }
    docker_api::get(
        socket,
        &format!("/containers/{id}/json"),
        Duration::from_secs(5),
        MAX_ANSWER,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;

    fn gitlab() -> JobIdentity {
        Policy::builtin()
            .job_identity
            .into_iter()
            .find(|i| i.platform == "gitlab")
            .unwrap()
    }

    fn container(env: &[&str]) -> serde_json::Value {
        serde_json::json!({
            "Id": "ab".repeat(32),
            "Config": {
                "Labels": {
                    JOB_LABEL: "555",
                    PROJECT_LABEL: "42",
                    PIPELINE_LABEL: "77",
                    RUNNER_LABEL: "9",
                    "com.gitlab.gitlab-runner.type": "service",
                },
                "Env": env,
            },
        })
    }

    #[test]
    fn a_build_container_is_named_from_its_ci_variables_and_no_secret_is_kept() {
        let c = container(&[
            "CI_JOB_ID=555",
            "CI_PROJECT_PATH=group/proj",
            "CI_JOB_NAME=test",
            "CI_PIPELINE_ID=77",
            "CI_RUNNER_ID=9",
            "CI_JOB_TOKEN=rmcanary-token",
            "MY_SECRET=rmcanary-secret",
        ]);
        let (info, from_environment) = identity(&c, Some(&gitlab())).unwrap();
        assert!(from_environment);
        assert_eq!(info.id, "555");
        assert_eq!(info.platform.as_deref(), Some("gitlab"));
        assert_eq!(info.repository.as_deref(), Some("group/proj"));
        assert_eq!(info.workflow.as_deref(), Some("test"));
        assert_eq!(info.run.as_deref(), Some("77"));
        let json = serde_json::to_string(&info).unwrap();
        assert!(!json.contains("rmcanary"), "{json}");
    }

    #[test]
    fn a_service_container_without_ci_variables_is_named_from_the_labels() {
        let c = container(&["DOCKER_TLS_CERTDIR=/certs", "PATH=/usr/bin"]);
        let (info, from_environment) = identity(&c, Some(&gitlab())).unwrap();
        assert!(!from_environment);
        assert_eq!(info.id, "555");
        assert_eq!(info.platform.as_deref(), Some("gitlab"));
        assert_eq!(info.repository.as_deref(), Some("42"));
        assert_eq!(info.run.as_deref(), Some("77"));
        assert_eq!(info.runner.as_deref(), Some("9"));
        assert_eq!(info.workflow, None);
        // The label decides the job, not a variable that says otherwise.
        let c = container(&["CI_JOB_ID=999", "CI_PROJECT_PATH=group/proj"]);
        let (info, _) = identity(&c, Some(&gitlab())).unwrap();
        assert_eq!(info.id, "555");
        assert_eq!(info.repository.as_deref(), Some("group/proj"));
        // No job label: not GitLab's.
        let mut c = container(&[]);
        c["Config"]["Labels"] = serde_json::json!({});
        assert!(identity(&c, Some(&gitlab())).is_none());
    }
}
