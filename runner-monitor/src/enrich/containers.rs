//! Names a job's containers: at the kernel's container event (the container's cgroup was just
//! made, its entrypoint has not run yet), asks the Docker API the job itself used for the
//! container's name and image (the container list, filtered by its id), so that the event, the trace and
//! every finding about the container's processes carry them. Only a socket the policy lists as a
//! `docker` secret socket is asked (a job cannot point the agent at a socket of its choosing),
//! with a short timeout: a daemon that does not answer leaves the name and image out, never the
//! container. The kernel's attribution does not depend on any of this (docs/containers.md).

use std::time::Duration;

use super::{
    builds::{BuildSlots, Builds},
    name_starts::{NameStarts, Register},
    runtime_streams::{Action, RuntimeStreams},
};
use crate::{
    bounded::BoundedMap,
    docker_api,
    event::{Bind, ContainerInfo, Event, EventDetail, JobKey, SocketFamily},
    job::JobDirectory,
    mounts::HostPaths,
    policy::Policy,
};

/// How long the Docker API may take to answer one inspect.
const TIMEOUT: Duration = Duration::from_millis(300);
/// The most of an answer read (an inspect is a few KiB).
const MAX_ANSWER: u64 = 1 << 20;

/// The Docker API socket each job last connected to is kept in the job directory
/// (`JobDirectory::docker_socket`), which is saved with the agent's state.
pub struct ContainerNamer {
    /// Resolves jobs' starts by name while they are under way (`name_starts.rs`).
    name_starts: Option<NameStarts>,
    /// cgroup id -> path, of containers the kernel gave no whole path for (looked up once each).
    exec_cgroups: BoundedMap<u64, String>,
    /// The jobs' API streams, for the container requests the kernel did not read.
    streams: RuntimeStreams,
    /// Keeps the kernel's open builds true to their connections (`builds.rs`).
    builds: Option<Builds>,
    /// Where the agent reaches the socket a job in a mount namespace of its own connected to.
    host_paths: HostPaths,
    /// Jobs whose Docker socket the agent reaches nowhere (said once each).
    unreached: BoundedMap<JobKey, ()>,
}

impl Default for ContainerNamer {
    fn default() -> Self {
        Self {
            name_starts: None,
            exec_cgroups: BoundedMap::new(1024),
            streams: RuntimeStreams::default(),
            builds: None,
            host_paths: HostPaths::default(),
            unreached: BoundedMap::new(256),
        }
    }
}

impl ContainerNamer {
    /// Resolves jobs' starts by name at their daemon and registers the container through
    /// `register` (the kernel's requested-container map), before its cgroup is made.
    pub fn resolve_names(&mut self, register: Register) {
        match NameStarts::spawn(register) {
            Ok(starts) => self.name_starts = Some(starts),
            Err(error) => tracing::warn!(
                %error,
                "no thread to resolve starts by name: they are left to the kernel's guess"
            ),
        }
    }

    /// Keeps the kernel's build slots (`slots`) open while the builds' connections live.
    pub fn watch_builds(&mut self, slots: Box<dyn BuildSlots>) {
        match Builds::spawn(slots) {
            Ok(builds) => self.builds = Some(builds),
            Err(error) => tracing::warn!(
                %error,
                "no thread to follow builds: a job's build steps are its own for 30 s only"
            ),
        }
    }

    /// Remembers a job's connect to a Docker socket; names a container of a job.
    pub fn process(&mut self, event: &mut Event, policy: &Policy, jobs: &mut JobDirectory) {
        let Some(job) = event.job.as_ref().map(|j| j.key) else {
            return;
        };
        match &mut event.detail {
            EventDetail::Connect(c) if c.family == SocketFamily::Unix && c.result == 0 => {
                let (pid, cgroup) = (event.process.pid, event.process.cgroup_id);
                let conn = (u64::from(pid) << 32) | u64::from(c.fd as u32);
                self.streams.connected(conn);
                if let Some(path) = &c.unix_path
                    && policy.secret_socket_of(path) == Some("docker")
                {
                    // The daemon the job reached, wherever its mounts put it: never another
                    // daemon that the agent finds at the same path.
                    match self.host_paths.reachable(pid, cgroup, path) {
                        Some(here) => jobs.set_docker_socket(job, &here),
                        None => {
                            if !self.unreached.contains_key(&job) {
                                self.unreached.insert(job, ());
                                tracing::info!(socket = %path, pid, "a job's Docker socket is not the file the agent finds at that path, and the agent reaches it nowhere: its containers are not named, and its starts by name are left to the kernel's guess");
                            }
                            jobs.forget_docker_socket(job);
                        }
                    }
                }
            }
            EventDetail::ContainerStart {
                reference,
                slot,
                pending_ns,
            } => {
                if let (Some(starts), Some(socket)) = (&self.name_starts, jobs.docker_socket(job)) {
                    starts.ask(socket, reference, job, *slot, *pending_ns);
                }
            }
            EventDetail::RuntimeSent {
                conn,
                buffer,
                len,
                data,
                via,
                io_uring,
            } => {
                let (via, len) = (*via, *len);
                let read = self.streams.sent(job, *conn, *buffer, len, &data.0);
                // The descriptor, unless the connection is an io_uring file's.
                let pid = event.process.pid;
                let fd = if *conn >> 32 == u64::from(pid) {
                    *conn as u32 as i32
                } else {
                    -1
                };
                let builds_found = read.found.iter().filter(|f| f.action == Action::Build);
                if let Some(builds) = &self.builds
                    && read.heads > builds_found.count()
                {
                    builds.next_request(pid, fd);
                }
                let (socket, at) = (jobs.docker_socket(job), event.time_ns);
                for found in read.found {
                    match (found.action, &self.builds, &self.name_starts) {
                        (Action::Build, Some(builds), _) => builds.open(job, pid, fd, at),
                        (Action::Start, _, Some(starts)) => {
                            starts.ask_found(socket, &found.reference, job, at)
                        }
                        // No socket: a full id needs none (`name_starts::exec`).
                        (Action::Exec, _, Some(starts)) => {
                            starts.ask_exec(socket.unwrap_or_default(), &found.reference, job, at)
                        }
                        (Action::Inspect, _, Some(starts)) => {
                            if let Some(socket) = socket {
                                starts.look_up(socket, &found.reference, job)
                            }
                        }
                        _ => {}
                    }
                }
                if read.unread {
                    // Judged (agent-tamper): a request there would not be the job's.
                    event.detail = EventDetail::RuntimeUnread {
                        socket: jobs.docker_socket(job).map(str::to_owned),
                        via,
                        io_uring: *io_uring,
                        bytes: len,
                    };
                }
            }
            EventDetail::ContainerExec { reference } => {
                if let (Some(starts), Some(socket)) = (&self.name_starts, jobs.docker_socket(job)) {
                    starts.ask_exec(socket, reference, job, event.time_ns);
                }
            }
            EventDetail::Container(info) => {
                if !info.cgroup.starts_with('/') {
                    // No whole path from the kernel: none for a container it knows by its id
                    // only (a `docker exec` target), a path's last 128 bytes for one nested
                    // deeper (a dind sidecar's, below its pod's). The path (and so the runtime)
                    // is looked up by the cgroup id, once per container (the command may be
                    // gone already, so not through its /proc).
                    let path = match self.exec_cgroups.get(&info.cgroup_id) {
                        Some(path) => Some(path.clone()),
                        None => crate::cgroups::container_cgroup_path(info.cgroup_id),
                    };
                    if let Some(path) = path {
                        self.exec_cgroups.insert(info.cgroup_id, path.clone());
                        info.runtime = ContainerInfo::runtime_of(&path).to_owned();
                        info.cgroup = path;
                    }
                }
                if info.requested_as.is_none()
                    && let Some(starts) = &self.name_starts
                {
                    info.requested_as = starts.requested_as(&info.id, event.time_ns);
                }
                let creator_parent = event.process.ppid;
                name_container(jobs.docker_socket(job), info, policy, creator_parent);
            }
            _ => {}
        }
    }
}

/// Names a job's container: at `socket`, the Docker API socket the job connected to; else, for
/// a container of the job's own podman, from conmon; else at the policy's Docker sockets.
/// `creator_parent`: the parent of the process that made the container's cgroup.
fn name_container(
    socket: Option<&str>,
    info: &mut ContainerInfo,
    policy: &Policy,
    creator_parent: u32,
) {
    match socket {
        Some(socket) => {
            if name(socket, info) == Some(false) {
                unknown_to_the_daemon(info);
            }
        }
        // A job's own podman: the runc that made the cgroup is conmon's child.
        None if info.runtime == "podman" && name_from_conmon(creator_parent, info) => {}
        // No job process asked for it: a container GitLab Runner made for the job,
        // registered from its daemon's events (`job/docker_events.rs`).
        None => {
            name_at_policy_sockets(policy, info);
        }
    }
}

/// Fills `info`'s name, image and GitLab Runner labels from the Docker API at `socket`, when it
/// answers and knows the container: `Some(true)`; `Some(false)`: it answered that it has no
/// such container; `None`: no answer, or not a container id.
fn name(socket: &str, info: &mut ContainerInfo) -> Option<bool> {
    if info.id.len() != 64 || !info.id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    match inspect(socket, &info.id) {
        Ok(answer) if answer[0].is_object() => {
            let c = &answer[0];
            info.name = c["Names"][0]
                .as_str()
                .map(|n| n.trim_start_matches('/').to_owned());
            info.image = c["Image"].as_str().map(str::to_owned);
            info.binds = c["Mounts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|m| m["Type"] == "bind")
                .filter_map(|m| {
                    Some(Bind {
                        source: m["Source"].as_str()?.to_owned(),
                        destination: m["Destination"].as_str()?.to_owned(),
                    })
                })
                .collect();
            if let Some(labels) = c["Labels"].as_object() {
                info.labels = labels
                    .iter()
                    .filter(|(k, _)| k.starts_with(GITLAB_LABELS))
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                    .collect();
            }
            confirm(info);
            Some(true)
        }
        Ok(_) => Some(false),
        Err(e) => {
            tracing::debug!(socket, id = %info.id, error = %e, "container not named");
            None
        }
    }
}

/// A container a job's own podman made (no daemon): conmon, which podman leaves to watch it and
/// which forked the runc that made its cgroup, names it on its command line (`-c <id> -n
/// <name> -b <bundle>`), and podman's storage beside the bundle
/// (`<root>/<driver>-containers/<id>/userdata`, with `containers.json` two levels up) gives its
/// image. Both are the job's own processes and files: they can say what the job likes, as a
/// container name the job chose can; the id must match the kernel's.
fn name_from_conmon(conmon: u32, info: &mut ContainerInfo) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{conmon}/cmdline")) else {
        return false;
    };
    let Some(args) = ConmonArgs::parse(&cmdline) else {
        return false;
    };
    if args.id != info.id {
        return false;
    }
    info.name = Some(args.name);
    info.image = args
        .bundle
        .parent()
        .and_then(|dir| image_in_storage(dir, &info.id));
    true
}

#[derive(Debug, PartialEq)]
struct ConmonArgs {
    id: String,
    name: String,
    bundle: std::path::PathBuf,
}

impl ConmonArgs {
    /// conmon's NUL-separated command line, when its program is conmon.
    fn parse(cmdline: &[u8]) -> Option<Self> {
        let mut args = cmdline
            .split(|b| *b == 0)
            .map(|a| std::str::from_utf8(a).unwrap_or(""));
        if !args.next()?.rsplit('/').next()?.starts_with("conmon") {
            return None;
        }
        let (mut id, mut name, mut bundle) = (None, None, None);
        while let Some(arg) = args.next() {
            match arg {
                "-c" | "--cid" => id = args.next(),
                "-n" | "--name" => name = args.next(),
                "-b" | "--bundle" => bundle = args.next(),
                _ => {}
            }
        }
        Some(Self {
            id: id?.to_owned(),
            name: name?.to_owned(),
            bundle: bundle?.into(),
        })
    }
}

/// The image name podman's storage records for container `id`: `containers.json` in the
/// directory above the container's (`<root>/<driver>-containers/`), its `metadata`'s
/// `image-name`.
fn image_in_storage(container_dir: &std::path::Path, id: &str) -> Option<String> {
    let file = container_dir.parent()?.join("containers.json");
    let text = std::fs::read_to_string(file).ok()?;
    let all: serde_json::Value = serde_json::from_str(&text).ok()?;
    let entry = all.as_array()?.iter().find(|c| c["id"] == id)?;
    let metadata: serde_json::Value = serde_json::from_str(entry["metadata"].as_str()?).ok()?;
    metadata["image-name"].as_str().map(str::to_owned)
}

/// GitLab Runner's labels on the containers of its docker executor.
const GITLAB_LABELS: &str = "com.gitlab.gitlab-runner.";

/// A GitLab job root the environment scan found in a container cgroup (the docker executor:
/// the runner, outside any job, created the container, so the kernel sent no container event):
/// its container, as a container event of the job, named with the runner's labels by the
/// daemon at a `docker` secret-socket path of the policy (the runner's socket: the job never
/// connected to it). Best effort: the root must still run (its `/proc/<pid>/cgroup`).
pub fn of_job_root(start: &Event, policy: &Policy) -> Option<Event> {
    let EventDetail::JobStart(job) = &start.detail else {
        return None;
    };
    if job.platform.as_deref() != Some("gitlab") || start.process.cgroup_id <= 1 {
        return None;
    }
    let cgroups = std::fs::read_to_string(format!("/proc/{}/cgroup", start.process.pid)).ok()?;
    let path = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
    let base = path.rsplit('/').next()?;
    let base = base.strip_suffix(".scope").unwrap_or(base);
    let id = base.get(base.len().checked_sub(64)?..)?;
    if !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut info = ContainerInfo::new(id.to_owned(), path.to_owned(), start.process.cgroup_id);
    name_at_policy_sockets(policy, &mut info);
    let mut event = start.clone();
    event.detail = EventDetail::Container(info);
    Some(event)
}

/// Names `info` by the first `docker` secret-socket path of the policy that exists and knows it.
fn name_at_policy_sockets(policy: &Policy, info: &mut ContainerInfo) -> bool {
    policy.secret_socket_paths.iter().any(|socket| {
        policy.secret_socket_of(socket) == Some("docker")
            && std::path::Path::new(socket).exists()
            && name(socket, info) == Some(true)
    })
}

/// A container the kernel matched to a start by name or short id: does the daemon agree? A
/// name guess the daemon contradicts (another container was made between the job's request
/// and its own) is reported; the container stays the job's (docs/containers.md).
fn confirm(info: &mut ContainerInfo) {
    let Some(requested) = info.requested_as.as_mut() else {
        return;
    };
    let confirmed = match requested.by.as_str() {
        "short-id" => info.id.starts_with(&requested.reference),
        // A daemon that knows the container says no more: on it, a build's step and another
        // container look alike (one it does not know: `unknown_to_the_daemon`).
        "build" => return,
        _ => info.name.as_deref() == Some(requested.reference.as_str()),
    };
    requested.confirmed = Some(confirmed);
    if !confirmed {
        tracing::warn!(
            id = %info.id,
            name = info.name.as_deref().unwrap_or(""),
            reference = %requested.reference,
            "a container was attributed to a job's start by name, but the daemon names it otherwise"
        );
    }
}

/// The job's daemon answered that it has no container `info.id`. A step of the job's build
/// would be its container: unless the step is over already (the classic builder removes it at
/// once; its cgroup goes with it), this one is another daemon's, taken for the build's step
/// because it was made while the build was open (docs/containers.md, "A job's docker build").
fn unknown_to_the_daemon(info: &mut ContainerInfo) {
    let Some(requested) = info.requested_as.as_mut().filter(|r| r.by == "build") else {
        return;
    };
    let cgroup =
        crate::cgroups::cgroup2_root().map(|root| root.join(info.cgroup.trim_start_matches('/')));
    if !cgroup.is_some_and(|c| c.is_dir()) {
        return;
    }
    requested.confirmed = Some(false);
    tracing::warn!(
        id = %info.id,
        "a container was taken for a step of a job's build, but the job's daemon does not know it"
    );
}

fn inspect(socket: &str, id: &str) -> std::io::Result<serde_json::Value> {
    // The container list, filtered by id: it reads the daemon's snapshot of its containers and
    // so answers while the container is starting (an inspect waits for the start to finish).
    docker_api::get(
        std::path::Path::new(socket),
        &format!("/containers/json?all=1&filters=%7B%22id%22%3A%5B%22{id}%22%5D%7D"),
        TIMEOUT,
        MAX_ANSWER,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::RequestedAs;

    #[test]
    fn conmons_command_line_names_the_container_and_its_bundle() {
        let id = "c1bb".repeat(16);
        let cmdline = format!(
            "/usr/bin/conmon\0--api-version\x001\0-c\0{id}\0-u\0{id}\0-r\0/usr/bin/runc\0-b\0\
             /s/vfs-containers/{id}/userdata\0-n\0web1\0--exit-dir\0/tmp/exits\0"
        );
        assert_eq!(
            ConmonArgs::parse(cmdline.as_bytes()),
            Some(ConmonArgs {
                id: id.clone(),
                name: "web1".into(),
                bundle: format!("/s/vfs-containers/{id}/userdata").into(),
            })
        );
        // Another program with the same arguments, or conmon without a name: nothing.
        assert_eq!(ConmonArgs::parse(&cmdline.as_bytes()[10..]), None);
        let unnamed = format!("/usr/bin/conmon\0-c\0{id}\0-b\0/b\0");
        assert_eq!(ConmonArgs::parse(unnamed.as_bytes()), None);
    }

    #[test]
    fn podmans_storage_gives_the_image_of_the_container() {
        let dir = std::env::temp_dir().join(format!("rm-podman-storage-{}", std::process::id()));
        let containers = dir.join("vfs-containers");
        let id = "c1bb".repeat(16);
        std::fs::create_dir_all(containers.join(&id)).unwrap();
        let metadata = r#"{"image-name":"localhost/rm-busybox:test","name":"web1"}"#;
        let json = serde_json::json!([
            {"id": "0".repeat(64), "metadata": "{\"image-name\":\"other\"}"},
            {"id": id, "names": ["web1"], "metadata": metadata},
        ]);
        std::fs::write(containers.join("containers.json"), json.to_string()).unwrap();
        let image = image_in_storage(&containers.join(&id), &id);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(image.as_deref(), Some("localhost/rm-busybox:test"));
    }

    fn matched(by: &str, reference: &str, name: Option<&str>) -> ContainerInfo {
        let id = "3f2a".repeat(16);
        let mut info = ContainerInfo::new(id.clone(), format!("/docker/{id}"), 7);
        info.name = name.map(str::to_owned);
        info.requested_as = Some(RequestedAs {
            reference: reference.into(),
            by: by.into(),
            waited_us: 90_000,
            confirmed: None,
            resolved_us: None,
        });
        info
    }

    fn confirmed(mut info: ContainerInfo) -> Option<bool> {
        confirm(&mut info);
        info.requested_as.unwrap().confirmed
    }

    #[test]
    fn a_start_by_name_is_confirmed_by_the_daemons_name_for_the_container() {
        assert_eq!(confirmed(matched("name", "web", Some("web"))), Some(true));
        // Another container was made between the job's request and its own.
        assert_eq!(confirmed(matched("name", "web", Some("db"))), Some(false));
        assert_eq!(confirmed(matched("name", "web", None)), Some(false));
    }

    #[test]
    fn a_start_by_short_id_is_confirmed_by_the_id() {
        assert_eq!(confirmed(matched("short-id", "3f2a3f", None)), Some(true));
        assert_eq!(confirmed(matched("short-id", "3f2b", None)), Some(false));
    }

    #[test]
    fn a_start_by_id_has_nothing_to_confirm() {
        let id = "ab".repeat(32);
        let mut info = ContainerInfo::new(id.clone(), format!("/docker/{id}"), 7);
        confirm(&mut info);
        assert_eq!(info.requested_as, None);
    }
}
