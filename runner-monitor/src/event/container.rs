//! A job's container, as findings name it.

use serde::{Deserialize, Serialize};

/// A container of a job: what findings about its processes name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerInfo {
    /// The runtime's id (64 hex digits).
    pub id: String,
    /// Its name, asked of the Docker API the job used (live agent only; absent if unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Its image, as the job asked for it (same source as `name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// `docker`, `buildkit` (a step of a `docker build`), `podman`, `containerd`, `cri-o` or
    /// `unknown`, from its cgroup's path.
    pub runtime: String,
    /// Its cgroup: path in the cgroup v2 hierarchy (its last 127 bytes) and id.
    #[serde(default)]
    pub cgroup: String,
    #[serde(default)]
    pub cgroup_id: u64,
    /// The Kubernetes pod it is part of (kubelet's cgroup layout, named through the CRI).
    /// Findings show it next to `container`, not inside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodInfo>,
    /// How the job's start request named the container when not by its full id: a name or a
    /// short id (the kernel matched it to the next container made: docs/containers.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_as: Option<RequestedAs>,
    /// The container is not the job's: the job ran this process in it with `docker exec`
    /// (docs/containers.md, "docker exec").
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exec_only: bool,
    /// GitLab Runner's labels (`com.gitlab.gitlab-runner.*`: job, project, pipeline and runner
    /// ids, the container's type), when the daemon was asked.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Its bind mounts, as the daemon describes them (live agent only, not in any output): a
    /// credential bound under another name is followed by that name (`identity`).
    #[serde(skip)]
    pub binds: Vec<Bind>,
}

/// A host path bound into a container.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bind {
    pub source: String,
    pub destination: String,
}

/// A Kubernetes pod: uid from the kubelet's cgroup path, name and namespace from the CRI
/// (docs/containers.md, "Kubernetes").
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub uid: String,
}

/// A start by name or short id, as the kernel matched it to a container.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestedAs {
    /// The name or short id in the job's request.
    pub reference: String,
    /// `short-id` (the container's id starts with it: exact), `name` (the first container
    /// made after the request: a guess) or `build` (no start request: a step of the job's open
    /// `docker build`; `reference` is empty, `confirmed` false when other jobs' builds were open).
    pub by: String,
    /// Microseconds from the request to the container's cgroup.
    pub waited_us: u64,
    /// The daemon confirmed it: the container's name is the reference (by name), or its id
    /// starts with it. False when the daemon named it otherwise; absent when it was not asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed: Option<bool>,
    /// By name: microseconds from the request to the daemon's answer, when the agent resolved
    /// the name before the container's cgroup was made and registered the container's id (the
    /// match is then exact, not a guess). Absent when the kernel's guess made the match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_us: Option<u64>,
}

impl ContainerInfo {
    /// The container `id` whose cgroup is `cgroup` (its v2 path) with id `cgroup_id`; not named.
    pub fn new(id: String, cgroup: String, cgroup_id: u64) -> Self {
        Self {
            id,
            name: None,
            image: None,
            runtime: Self::runtime_of(&cgroup).to_owned(),
            cgroup,
            cgroup_id,
            pod: None,
            requested_as: None,
            exec_only: false,
            labels: Default::default(),
            binds: Vec::new(),
        }
    }

    /// The runtime that made the cgroup `path` (`/docker/<id>`, `.../docker-<id>.scope`,
    /// `.../libpod-<id>.scope`, `.../cri-containerd-<id>.scope`, `.../crio-<id>.scope`).
    pub fn runtime_of(path: &str) -> &'static str {
        let name = path.rsplit('/').next().unwrap_or(path);
        let parent = path.rsplit('/').nth(1).unwrap_or("");
        // BuildKit's step ids are 25 characters: `<parent>/buildkit/<id>`, or the systemd
        // driver's `docker-<id>.scope` (a container's id is 64).
        if parent == "buildkit" || (name.starts_with("docker-") && name.len() == 7 + 25 + 6) {
            "buildkit"
        } else if name.starts_with("docker-") || parent == "docker" {
            "docker"
        } else if name.starts_with("libpod-") || parent == "libpod_parent" {
            "podman"
        } else if name.starts_with("cri-containerd-") || parent.contains("containerd") {
            "containerd"
        } else if name.starts_with("crio-") {
            "cri-o"
        } else {
            "unknown"
        }
    }
}
