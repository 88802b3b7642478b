//! Names the pods and containers jobs run in under Kubernetes (docs/containers.md,
//! "Kubernetes"). At the first event of a job process from a cgroup not looked at yet, the
//! process's cgroup path (`/proc/<pid>/cgroup`) is read in the kubelet's layout (`kube`): pod uid
//! and container id. Then the CRI socket (containerd's by default) is asked for the container's
//! name and image and its pod's name, namespace, labels and annotations. The answer becomes a
//! container event before the event that revealed the cgroup, so findings, the event trace and
//! `replay` carry `container` and `pod`.
//!
//! The CRI is asked on a thread of its own; the pipeline waits for it at most `WAIT`, once per
//! container. A later answer is sent as a second container event for the same cgroup when the
//! next event of a job comes. An absent socket is no error: the container and pod uid from the
//! path are still sent.
//!
//! A GitLab kubernetes-executor pod's annotations (`job.runner.gitlab.com/*`) name the job, for
//! discovery, when its environment has not already.
//!
//! The pods found running a job's processes are watched for workflow pods of theirs
//! (actions-runner-controller's kubernetes mode, `workflow_pods`): with a container link (the
//! kernel's map of job container cgroups), the CRI thread polls for them every `POLL`.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::mpsc,
    time::{Duration, Instant},
};

use super::{
    cri, kube,
    workflow_pods::{ContainerLink, JobPods, Linked, WorkflowPods},
};
use crate::{
    bounded::BoundedMap,
    event::{ContainerInfo, Event, EventDetail, JobInfo, JobRef, PodInfo},
};

/// containerd's socket, where the kubelet's CRI runtime listens on most nodes.
pub const DEFAULT_CRI_SOCKET: &str = "/run/containerd/containerd.sock";
/// How long the pipeline waits for the CRI's answer about a new container.
const WAIT: Duration = Duration::from_millis(250);
/// How long one CRI request may take on the CRI thread.
const TIMEOUT: Duration = Duration::from_secs(2);
/// How often the CRI thread looks for workflow pods while a pod runs a job's processes.
const POLL: Duration = Duration::from_millis(200);

/// A container event to judge before the event that revealed it, and the GitLab job its pod's
/// annotations name, if any.
pub struct PodContainer {
    pub event: Event,
    pub gitlab_job: Option<JobInfo>,
}

pub struct PodNamer {
    socket: Option<PathBuf>,
    worker: Option<Worker>,
    /// cgroup ids looked at.
    seen: BoundedMap<u64, ()>,
    /// container id -> its container event, sent without names; waiting for the CRI.
    pending: BoundedMap<String, Event>,
    /// Answers that came while the pipeline waited for another container's.
    late: Vec<(String, Option<cri::Named>)>,
    /// Pods running a job's processes, for the workflow pods' link.
    job_pods: JobPods,
    /// cgroup id -> (namespace, pod) of the job pods' containers named.
    pod_of_cgroup: BoundedMap<u64, (String, String)>,
    /// Writes a workflow pod's container cgroup into the kernel's map (moved to the CRI thread
    /// when it starts).
    link: Option<ContainerLink>,
}

impl PodNamer {
    /// `socket`: the CRI socket to ask (`None`: the kubelet's layout only).
    pub fn new(socket: Option<PathBuf>) -> Self {
        Self {
            socket,
            worker: None,
            seen: BoundedMap::new(4096),
            pending: BoundedMap::new(256),
            late: Vec::new(),
            job_pods: JobPods::default(),
            pod_of_cgroup: BoundedMap::new(4096),
            link: None,
        }
    }

    /// Links the containers of job pods' workflow pods to their jobs in the kernel through
    /// `link` (`workflow_pods`).
    pub fn link_containers(&mut self, link: ContainerLink) {
        self.link = Some(link);
    }

    /// Before `event`: container events for a pod container it reveals, and for containers the
    /// CRI named late. The pods named are remembered as running the job.
    pub fn process(&mut self, event: &Event) -> Vec<PodContainer> {
        if let Some(job) = &event.job
            && !job.ended
            && let Some((namespace, pod)) = self.pod_of_cgroup.get(&event.process.cgroup_id)
        {
            self.job_pods.set(namespace, pod, job.key);
        }
        let mut out = self.linked(event);
        out.extend(self.reveal(event));
        for named in &out {
            if let (EventDetail::Container(info), Some(job)) =
                (&named.event.detail, &named.event.job)
                && let Some(PodInfo {
                    name: Some(pod),
                    namespace: Some(namespace),
                    ..
                }) = &info.pod
                && !job.ended
            {
                self.job_pods.set(namespace, pod, job.key);
                self.pod_of_cgroup
                    .insert(info.cgroup_id, (namespace.clone(), pod.clone()));
            }
        }
        out
    }

    /// Container events for the workflow pods' containers the CRI thread linked to a job since
    /// the last event (judged before `event`).
    fn linked(&mut self, event: &Event) -> Vec<PodContainer> {
        let Some(worker) = &self.worker else {
            return Vec::new();
        };
        let linked: Vec<Linked> = worker.linked.try_iter().collect();
        let mut out = Vec::new();
        for l in linked {
            self.seen.insert(l.cgroup_id, ());
            let mut info = ContainerInfo::new(l.id, l.cgroup.clone(), l.cgroup_id);
            info.runtime = kube::parse(&l.cgroup)
                .map_or("cri", |k| k.runtime)
                .to_owned();
            let container = Event {
                time_ns: event.time_ns,
                job: Some(JobRef {
                    key: l.job,
                    ended: false,
                    root: false,
                }),
                process: event.process.clone(),
                truncated: false,
                detail: EventDetail::Container(info),
            };
            out.extend(Self::named(container, l.named));
        }
        out
    }

    fn reveal(&mut self, event: &Event) -> Vec<PodContainer> {
        let mut out = self.late_answers(None);
        let Some(job) = &event.job else {
            return out;
        };
        let cgroup_id = event.process.cgroup_id;
        if cgroup_id == 0
            || self.seen.contains_key(&cgroup_id)
            || matches!(
                event.detail,
                EventDetail::Container(_)
                    | EventDetail::JobEnv { .. }
                    | EventDetail::CredentialFingerprint { .. }
            )
        {
            return out;
        }
        // The process (or, if it is gone already, its parent, often in the same cgroup).
        let own = cgroup_v2_path(event.process.pid);
        let from_parent = own.is_none();
        let Some(path) = own.or_else(|| cgroup_v2_path(event.process.ppid)) else {
            return out;
        };
        let Some(kube::KubeCgroup {
            pod_uid,
            container_id: Some(id),
            runtime,
        }) = kube::parse(&path)
        else {
            // A parent outside the pod (containerd-shim, for an exec'd process gone already)
            // says nothing of the process's cgroup: the next event of it is looked at again.
            if !from_parent {
                self.seen.insert(cgroup_id, ());
            }
            return out;
        };
        self.seen.insert(cgroup_id, ());
        let mut info = ContainerInfo::new(id.clone(), path, cgroup_id);
        info.runtime = runtime.to_owned();
        info.pod = Some(PodInfo {
            uid: pod_uid,
            ..Default::default()
        });
        let container = Event {
            time_ns: event.time_ns,
            job: Some(JobRef {
                root: false,
                ..job.clone()
            }),
            process: event.process.clone(),
            truncated: false,
            detail: EventDetail::Container(info),
        };
        let named = self.ask(&id);
        out.extend(self.late_answers(named.as_ref().map(|_| id.as_str())));
        match named {
            Some(named) => out.extend(Self::named(container, named)),
            None => {
                if self.worker.is_some() {
                    self.pending.insert(id, container.clone());
                }
                out.push(PodContainer {
                    event: container,
                    gitlab_job: None,
                });
            }
        }
        out
    }

    /// Asks the CRI about container `id`, waiting at most `WAIT`; `None` without an answer
    /// (no socket, no such container, slow runtime).
    fn ask(&mut self, id: &str) -> Option<cri::Named> {
        let socket = self.socket.as_ref()?;
        if self.worker.is_none() {
            if !Path::new(socket).exists() {
                return None;
            }
            let workflow = self
                .link
                .take()
                .map(|link| WorkflowPods::new(self.job_pods.clone(), link));
            self.worker = Some(Worker::spawn(socket.clone(), workflow));
        }
        let worker = self.worker.as_ref()?;
        worker.ask.send(id.to_owned()).ok()?;
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match worker.answers.recv_timeout(left) {
                Ok((answered, named)) if answered == id => return named,
                // An answer that came too late for its own container.
                Ok((answered, named)) => self.late.push((answered, named)),
                Err(_) => return None,
            }
        }
    }

    /// Container events for pending containers the CRI has named since (not `except`).
    fn late_answers(&mut self, except: Option<&str>) -> Vec<PodContainer> {
        let Some(worker) = &self.worker else {
            return Vec::new();
        };
        let mut answers: Vec<_> = self.late.drain(..).collect();
        answers.extend(worker.answers.try_iter());
        let mut out = Vec::new();
        for (id, named) in answers {
            if Some(id.as_str()) == except {
                continue;
            }
            if let (Some(container), Some(named)) = (self.pending.remove(&id), named) {
                out.extend(Self::named(container, named));
            }
        }
        out
    }

    /// The container event `container` with what the CRI said.
    fn named(mut container: Event, named: cri::Named) -> Option<PodContainer> {
        let EventDetail::Container(info) = &mut container.detail else {
            return None;
        };
        let some = |s: String| (!s.is_empty()).then_some(s);
        info.name = some(named.container);
        info.image = some(named.image);
        if info.runtime == "cri" && !named.runtime.is_empty() {
            info.runtime = named.runtime;
        }
        let pod = info.pod.get_or_insert_with(PodInfo::default);
        pod.name = some(named.pod);
        pod.namespace = some(named.namespace);
        if pod.uid.is_empty() {
            pod.uid = named.pod_uid;
        }
        Some(PodContainer {
            event: container,
            gitlab_job: gitlab_job(&named.pod_annotations, &named.pod_labels),
        })
    }
}

/// The job a GitLab kubernetes-executor pod runs, from its annotations (the runner sets
/// `job.runner.gitlab.com/{id,url,sha,before_sha,ref,name,timeout}` and
/// `project.runner.gitlab.com/id`; its labels `project.runner.gitlab.com/*` are read-only for
/// jobs). The repository is the job URL's path before `/-/jobs/`; the pipeline is not among them.
pub fn gitlab_job(
    annotations: &HashMap<String, String>,
    labels: &HashMap<String, String>,
) -> Option<JobInfo> {
    let id = annotations.get("job.runner.gitlab.com/id")?;
    let repository = annotations
        .get("job.runner.gitlab.com/url")
        .and_then(|url| url.split_once("://"))
        .and_then(|(_, rest)| rest.split_once('/'))
        .and_then(|(_, path)| path.split_once("/-/jobs/"))
        .map(|(project, _)| project.to_owned())
        .or_else(|| {
            // Without the URL, the namespace and name labels (no subgroups in labels).
            let namespace = labels.get("project.runner.gitlab.com/namespace")?;
            let name = labels.get("project.runner.gitlab.com/name")?;
            Some(format!("{namespace}/{name}"))
        });
    Some(JobInfo {
        id: id.clone(),
        platform: Some("gitlab".into()),
        repository,
        workflow: annotations.get("job.runner.gitlab.com/name").cloned(),
        git_ref: annotations.get("job.runner.gitlab.com/ref").cloned(),
        ..Default::default()
    })
}

/// The process's cgroup in the v2 hierarchy (`0::<path>` in `/proc/<pid>/cgroup`).
fn cgroup_v2_path(pid: u32) -> Option<String> {
    if pid == 0 {
        return None;
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
}

/// The CRI thread: a tokio runtime of its own with one channel to the socket, made again after
/// an error.
struct Worker {
    ask: tokio::sync::mpsc::UnboundedSender<String>,
    answers: mpsc::Receiver<(String, Option<cri::Named>)>,
    /// The workflow pods' containers linked to jobs.
    linked: mpsc::Receiver<Linked>,
}

impl Worker {
    /// The CRI thread; with `workflow`, it also polls for the job pods' workflow pods.
    fn spawn(socket: PathBuf, mut workflow: Option<WorkflowPods>) -> Self {
        let (ask, mut asked) = tokio::sync::mpsc::unbounded_channel::<String>();
        let (answer, answers) = mpsc::channel();
        let (told, linked) = mpsc::channel();
        if let Some(w) = workflow.as_mut() {
            w.told = Some(told);
        }
        let spawned = std::thread::Builder::new()
            .name("cri".into())
            .spawn(move || {
                let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                runtime.block_on(async move {
                    let mut cri = Cri {
                        socket,
                        channel: None,
                        name: String::new(),
                    };
                    let mut poll = tokio::time::interval(POLL);
                    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        tokio::select! {
                            asked = asked.recv() => {
                                let Some(id) = asked else { return };
                                let named = cri.name(&id).await;
                                if answer.send((id, named)).is_err() {
                                    return;
                                }
                            }
                            _ = poll.tick(), if workflow.is_some() => {
                                if let Some(w) = workflow.as_mut()
                                    && !w.pods.is_empty()
                                    && let Some(channel) = cri.channel().await
                                    && let Err(e) = w.poll(&channel, &cri.name).await
                                {
                                    tracing::debug!(error = %e, "workflow pods not looked for");
                                    cri.failed(&e);
                                }
                            }
                        }
                    }
                });
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no CRI thread: pods are not named");
        }
        Self {
            ask,
            answers,
            linked,
        }
    }
}

/// The CRI thread's channel to the socket, made again after an error.
struct Cri {
    socket: PathBuf,
    channel: Option<tonic::transport::Channel>,
    /// The runtime's name for itself.
    name: String,
}

impl Cri {
    async fn channel(&mut self) -> Option<tonic::transport::Channel> {
        if self.channel.is_none() {
            match cri::connect(self.socket.clone(), TIMEOUT).await {
                Ok(c) => {
                    let version: Result<cri::VersionResponse, _> =
                        cri::call(&c, "Version", cri::VersionRequest::default()).await;
                    self.name = version.map(|v| v.runtime_name).unwrap_or_default();
                    self.channel = Some(c);
                }
                Err(e) => {
                    tracing::debug!(socket = %self.socket.display(), error = %e, "CRI not reached");
                }
            }
        }
        self.channel.clone()
    }

    async fn name(&mut self, id: &str) -> Option<cri::Named> {
        let channel = self.channel().await?;
        match cri::name(&channel, &self.name, id).await {
            Ok(named) => named,
            Err(e) => {
                tracing::debug!(id, error = %e, "container not named by the CRI");
                self.failed(&e);
                None
            }
        }
    }

    fn failed(&mut self, e: &tonic::Status) {
        if e.code() == tonic::Code::Unavailable {
            self.channel = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gitlab_kubernetes_executor_pod_names_its_job() {
        let annotations: HashMap<String, String> = [
            ("job.runner.gitlab.com/id", "4242"),
            (
                "job.runner.gitlab.com/url",
                "https://gitlab.example.com/acme/sub/app/-/jobs/4242",
            ),
            ("job.runner.gitlab.com/name", "test"),
            ("job.runner.gitlab.com/ref", "main"),
            ("project.runner.gitlab.com/id", "17"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let job = gitlab_job(&annotations, &HashMap::new()).unwrap();
        assert_eq!(job.id, "4242");
        assert_eq!(job.platform.as_deref(), Some("gitlab"));
        assert_eq!(job.repository.as_deref(), Some("acme/sub/app"));
        assert_eq!(job.workflow.as_deref(), Some("test"));
        assert_eq!(job.git_ref.as_deref(), Some("main"));
        // Without the URL, the labels name the project.
        let mut bare = annotations.clone();
        bare.remove("job.runner.gitlab.com/url");
        let labels: HashMap<String, String> = [
            ("project.runner.gitlab.com/namespace", "acme"),
            ("project.runner.gitlab.com/name", "app"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let job = gitlab_job(&bare, &labels).unwrap();
        assert_eq!(job.repository.as_deref(), Some("acme/app"));
        // Another pod is no GitLab job.
        assert_eq!(gitlab_job(&HashMap::new(), &labels), None);
    }
}
