//! actions-runner-controller's kubernetes mode: the runner's container hooks make, through the
//! Kubernetes API, a pod `<runner pod>-workflow` (label `runner-pod=<runner pod>`) whose
//! container `job` idles, and run each step by exec into it. The kubelet turns an exec into a CRI
//! exec: a process containerd-shim starts in the `job` container's cgroup, outside the job's
//! process tree and without its environment (docs/containers.md, "Kubernetes").
//!
//! While a pod runs a job's processes (the pod namer saw them), the CRI is polled for pods that
//! belong to it: ARC's `runner-pod` label naming it, or else the name `<its name, cut to 54
//! characters>-workflow`, in its namespace. Each running container of such a pod has its cgroup
//! written into the kernel's map of job container cgroups, so a process exec'd there joins the
//! job at its exec, before its first instruction, as a `docker exec`'d one does. The hooks exec
//! a step only once the pod is Running (the kubelet reports that after its next relist), so the
//! map is written in time; the pod's own entrypoint started before and is not the job's. The
//! container linked is told to the pod namer (`Linked`), whose container event for it then comes
//! before the first step's events.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc},
};

use tonic::{Status, transport::Channel};

use super::cri;
use crate::{bounded::BoundedMap, event::JobKey};

/// Writes "cgroup `id` is a container of job `key`" into the kernel's map of job container
/// cgroups (the live agent passes the sensor's); `Err` says why it could not.
pub type ContainerLink = Box<dyn FnMut(u64, JobKey) -> Result<(), String> + Send>;

/// A workflow pod's container linked to a job, for its container event (sent to the pod namer,
/// which judges it before the next event: before the first step's).
pub struct Linked {
    pub job: JobKey,
    pub cgroup_id: u64,
    /// Its cgroup's path in the host's v2 hierarchy.
    pub cgroup: String,
    pub named: cri::Named,
    /// The container's id.
    pub id: String,
}

/// The label ARC's container hooks put on the pods they make: the runner pod's name.
pub const RUNNER_POD_LABEL: &str = "runner-pod";
const WORKFLOW_SUFFIX: &str = "-workflow";
/// A pod name's longest (a DNS label); the hooks cut the runner pod's name to fit the suffix.
const MAX_POD_NAME: usize = 63;
/// How many pods running a job's processes are watched at once.
const MAX_JOB_PODS: usize = 1024;

/// Pods whose containers run a job's processes: (namespace, pod name) -> the job they run now.
/// Shared by the pod namer (which learns them) and the CRI thread (which polls for their
/// workflow pods).
#[derive(Clone, Default)]
pub struct JobPods(Arc<Mutex<HashMap<(String, String), JobKey>>>);

impl JobPods {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), JobKey>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pod `pod` of `namespace` runs processes of `job` (the latest job wins: a runner that is
    /// not ephemeral runs one job after another in the same pod).
    pub fn set(&self, namespace: &str, pod: &str, job: JobKey) {
        let mut pods = self.lock();
        if pods.len() >= MAX_JOB_PODS && !pods.contains_key(&(namespace.into(), pod.into())) {
            return;
        }
        pods.insert((namespace.to_owned(), pod.to_owned()), job);
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn snapshot(&self) -> HashMap<(String, String), JobKey> {
        self.lock().clone()
    }

    /// Forgets the pods the runtime no longer has.
    fn retain(&self, present: &HashSet<(String, String)>) {
        self.lock().retain(|k, _| present.contains(k));
    }
}

/// The job pod whose workflow pod `name` (in `namespace`, with `labels`) is, and its job: by
/// ARC's label when the pod has it, else by name.
pub fn owner(
    namespace: &str,
    name: &str,
    labels: &HashMap<String, String>,
    pods: &HashMap<(String, String), JobKey>,
) -> Option<(String, JobKey)> {
    if let Some(runner) = labels.get(RUNNER_POD_LABEL) {
        if runner == name {
            return None;
        }
        let key = (namespace.to_owned(), runner.clone());
        return pods.get(&key).map(|job| (runner.clone(), *job));
    }
    let prefix = name.strip_suffix(WORKFLOW_SUFFIX)?;
    let cut = MAX_POD_NAME - WORKFLOW_SUFFIX.len();
    pods.iter()
        .find(|((ns, pod), _)| {
            ns == namespace && pod != name && pod.get(..cut).unwrap_or(pod) == prefix
        })
        .map(|((_, pod), job)| (pod.clone(), *job))
}

/// A container's cgroup path in the host's cgroup v2 hierarchy, from the OCI spec's
/// `linux.cgroupsPath`: a path (cgroupfs driver), or systemd's `slice:prefix:name`
/// (`kubepods-besteffort-pod<uid>.slice:cri-containerd:<id>` is
/// `/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice/
/// cri-containerd-<id>.scope`).
pub fn host_cgroup_path(cgroups_path: &str) -> Option<String> {
    if cgroups_path.starts_with('/') {
        return Some(cgroups_path.to_owned());
    }
    let mut parts = cgroups_path.split(':');
    let (slice, prefix, name) = (parts.next()?, parts.next()?, parts.next()?);
    let mut path = String::new();
    if slice != "-.slice" && !slice.is_empty() {
        let stem = slice.strip_suffix(".slice")?;
        // Each dash-separated prefix of a slice's name is a parent slice.
        for (i, _) in stem.match_indices('-') {
            path.push_str(&format!("/{}.slice", &stem[..i]));
        }
        path.push_str(&format!("/{stem}.slice"));
    }
    path.push('/');
    if !prefix.is_empty() {
        path.push_str(prefix);
        path.push('-');
    }
    path.push_str(name);
    path.push_str(".scope");
    Some(path)
}

/// The cgroup id of a container, from containerd's verbose `ContainerStatus` info: the spec's
/// cgroup path under `root` (the v2 hierarchy's mount), or else its task's `/proc/<pid>/cgroup`
/// (only when that is not relative to another cgroup namespace). A cgroup v2 directory's inode
/// number is the cgroup's id. Returns the id and the path.
fn cgroup_of(info: &HashMap<String, String>, root: &Path) -> Option<(u64, String)> {
    use std::os::unix::fs::MetadataExt as _;
    let json: serde_json::Value = serde_json::from_str(info.get("info")?).ok()?;
    let from_spec = json["runtimeSpec"]["linux"]["cgroupsPath"]
        .as_str()
        .and_then(host_cgroup_path);
    let path = from_spec.or_else(|| {
        let pid = json["pid"].as_u64().filter(|p| *p > 0)?;
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
        (!path.starts_with("/..")).then(|| path.to_owned())
    })?;
    let meta = std::fs::metadata(root.join(path.trim_start_matches('/'))).ok()?;
    meta.is_dir().then(|| (meta.ino(), path))
}

/// The CRI thread's side: looks for the job pods' workflow pods and links their running
/// containers to the jobs.
pub struct WorkflowPods {
    pub pods: JobPods,
    link: ContainerLink,
    /// Container ids linked already.
    linked: BoundedMap<String, ()>,
    /// The cgroup v2 hierarchy's mount.
    root: Option<PathBuf>,
    /// Where the containers linked are told (the pod namer).
    pub(super) told: Option<mpsc::Sender<Linked>>,
}

impl WorkflowPods {
    pub fn new(pods: JobPods, link: ContainerLink) -> Self {
        Self {
            pods,
            link,
            linked: BoundedMap::new(4096),
            root: crate::sensor::attach::cgroup2_root(),
            told: None,
        }
    }

    /// One look at the runtime's pods; `runtime` is the runtime's name for itself.
    pub async fn poll(&mut self, channel: &Channel, runtime: &str) -> Result<(), Status> {
        let watched = self.pods.snapshot();
        let Some(root) = self.root.clone() else {
            return Ok(());
        };
        if watched.is_empty() {
            return Ok(());
        }
        let list: cri::ListPodSandboxResponse =
            cri::call(channel, "ListPodSandbox", cri::ListPodSandboxRequest {}).await?;
        let present = list
            .items
            .iter()
            .filter_map(|s| s.metadata.as_ref())
            .map(|m| (m.namespace.clone(), m.name.clone()))
            .collect();
        self.pods.retain(&present);
        for sandbox in list.items.iter().filter(|s| s.state == 0) {
            let Some(meta) = &sandbox.metadata else {
                continue;
            };
            let Some((runner, job)) = owner(&meta.namespace, &meta.name, &sandbox.labels, &watched)
            else {
                continue;
            };
            let containers: cri::ListContainersResponse = cri::call(
                channel,
                "ListContainers",
                cri::ListContainersRequest {
                    filter: Some(cri::ContainerFilter {
                        pod_sandbox_id: sandbox.id.clone(),
                        ..Default::default()
                    }),
                },
            )
            .await?;
            for c in containers.containers {
                // Running: its task, hence its cgroup, exists.
                if c.state != 1 || self.linked.contains_key(&c.id) {
                    continue;
                }
                let status: cri::ContainerStatusResponse = cri::call(
                    channel,
                    "ContainerStatus",
                    cri::ContainerStatusRequest {
                        container_id: c.id.clone(),
                        verbose: true,
                    },
                )
                .await?;
                let container = c.metadata.map(|m| m.name).unwrap_or_default();
                let Some((cgroup, path)) = cgroup_of(&status.info, &root) else {
                    tracing::debug!(id = c.id, "no cgroup found for a workflow pod's container");
                    continue;
                };
                match (self.link)(cgroup, job) {
                    Ok(()) => {
                        self.linked.insert(c.id.clone(), ());
                        tracing::info!(
                            pod = meta.name,
                            namespace = meta.namespace,
                            runner_pod = runner,
                            container,
                            id = c.id,
                            cgroup_id = cgroup,
                            job = %job,
                            "a runner pod's workflow pod container is its job's"
                        );
                        let named = cri::Named {
                            runtime: runtime.to_owned(),
                            container,
                            image: c.image.map(|i| i.image).unwrap_or_default(),
                            pod: meta.name.clone(),
                            namespace: meta.namespace.clone(),
                            pod_uid: meta.uid.clone(),
                            pod_labels: sandbox.labels.clone(),
                            pod_annotations: HashMap::new(),
                        };
                        if let Some(told) = &self.told {
                            let _ = told.send(Linked {
                                job,
                                cgroup_id: cgroup,
                                cgroup: path,
                                named,
                                id: c.id.clone(),
                            });
                        }
                    }
                    Err(e) => {
                        tracing::warn!(
                            pod = meta.name,
                            container,
                            error = e,
                            "a workflow pod's container could not be linked to its job"
                        );
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods(entries: &[(&str, &str, u64)]) -> HashMap<(String, String), JobKey> {
        entries
            .iter()
            .map(|(ns, pod, job)| (((*ns).into(), (*pod).into()), JobKey(*job)))
            .collect()
    }

    #[test]
    fn a_workflow_pod_belongs_to_its_runner_pod_by_label_or_else_by_name() {
        let jobs = pods(&[("arc", "runner-x7k2p-runner-abcde", 7)]);
        let none = HashMap::new();
        let label: HashMap<String, String> = [(
            RUNNER_POD_LABEL.to_owned(),
            "runner-x7k2p-runner-abcde".to_owned(),
        )]
        .into();
        // The label names the runner pod, whatever the name.
        assert_eq!(
            owner("arc", "renamed", &label, &jobs),
            Some(("runner-x7k2p-runner-abcde".into(), JobKey(7)))
        );
        // The label wins: a pod labelled for another runner is not this one's by name.
        let other: HashMap<String, String> =
            [(RUNNER_POD_LABEL.to_owned(), "another".to_owned())].into();
        assert_eq!(
            owner("arc", "runner-x7k2p-runner-abcde-workflow", &other, &jobs),
            None
        );
        assert_eq!(
            owner("arc", "runner-x7k2p-runner-abcde-workflow", &none, &jobs),
            Some(("runner-x7k2p-runner-abcde".into(), JobKey(7)))
        );
        // Another namespace, another pod, a pod whose runner is no job, the runner itself.
        assert_eq!(
            owner(
                "default",
                "runner-x7k2p-runner-abcde-workflow",
                &none,
                &jobs
            ),
            None
        );
        assert_eq!(
            owner("arc", "runner-x7k2p-runner-abcde", &none, &jobs),
            None
        );
        assert_eq!(owner("arc", "idle-workflow", &none, &jobs), None);
        assert_eq!(
            owner("arc", "runner-x7k2p-runner-abcde", &label, &jobs),
            None
        );
    }

    #[test]
    fn a_long_runner_pod_name_is_cut_before_the_suffix() {
        let long = format!("{}-runner-abcde", "r".repeat(50));
        let jobs = pods(&[("arc", &long, 9)]);
        let cut = format!("{}-workflow", &long[..54]);
        assert_eq!(cut.len(), 63);
        assert_eq!(
            owner("arc", &cut, &HashMap::new(), &jobs),
            Some((long.clone(), JobKey(9)))
        );
    }

    #[test]
    fn systemd_cgroup_paths_become_the_host_path() {
        assert_eq!(
            host_cgroup_path("kubepods-besteffort-pod1_2.slice:cri-containerd:abc").as_deref(),
            Some(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1_2.slice/cri-containerd-abc.scope"
            )
        );
        assert_eq!(
            host_cgroup_path("kubepods-pod1.slice:crio:abc").as_deref(),
            Some("/kubepods.slice/kubepods-pod1.slice/crio-abc.scope")
        );
        assert_eq!(
            host_cgroup_path("/kubepods/besteffort/pod1/abc").as_deref(),
            Some("/kubepods/besteffort/pod1/abc")
        );
        assert_eq!(host_cgroup_path("nonsense"), None);
    }
}
