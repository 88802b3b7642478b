//! Jobs: who they are (discovery from the environment, or the hooks and the control socket) and
//! their explicit lifecycle. Produces `job_start` / `job_end` events for the engine.

pub mod control;
pub mod discovery;
pub mod docker_events;
pub mod gitlab_containers;

use runner_monitor_common::MAX_JOBS;

use crate::{
    bounded::BoundedMap,
    clock::monotonic_ns,
    event::{Event, EventDetail, JobInfo, JobKey, JobRef, ProcessRef},
    policy::Policy,
};

/// How many exec events of a job are used to look for its identity before giving up.
const DISCOVERY_ATTEMPTS: u32 = 32;

/// What the agent knows about jobs beyond the kernel's keys.
pub struct JobDirectory {
    /// CI job id -> key.
    by_id: BoundedMap<String, JobKey>,
    /// key -> identity known (explicitly from a hook, or discovered).
    known: BoundedMap<JobKey, Known>,
    /// Stage key -> the job (first stage's key) it belongs to, for staged jobs (GitLab).
    stage_of: BoundedMap<JobKey, JobKey>,
    /// Jobs whose root exited before discovery could read an identity.
    pub unidentified: u64,
}

#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
struct Known {
    id: Option<String>,
    tracking_id: Option<String>,
    /// Set by a hook or the control socket: discovery does not override it.
    explicit: bool,
    /// Discovery found the environment (it runs once more for explicit jobs, for the tracking id).
    discovered: bool,
    attempts: u32,
    /// A `job end` for it was carried out.
    end_requested: bool,
    /// The Docker API socket a process of the job last connected to (a path the policy lists
    /// as a `docker` secret socket): the daemon asked for its containers' names. Saved with the
    /// state, so a container a job starts after an agent restart is named too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    docker_socket: Option<String>,
}

/// The directory's tables as data (state snapshots), entries oldest first.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct DirectorySnapshot {
    by_id: Vec<(String, JobKey)>,
    known: Vec<(JobKey, Known)>,
    stage_of: Vec<(JobKey, JobKey)>,
    unidentified: u64,
}

#[derive(serde::Serialize)]
struct DirectorySnapshotRef<'a> {
    by_id: &'a BoundedMap<String, JobKey>,
    known: &'a BoundedMap<JobKey, Known>,
    stage_of: &'a BoundedMap<JobKey, JobKey>,
    unidentified: u64,
}

impl JobDirectory {
    /// Writes the directory's tables (the shape of `DirectorySnapshot`) with `serializer`.
    pub fn save<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serde::Serialize::serialize(
            &DirectorySnapshotRef {
                by_id: &self.by_id,
                known: &self.known,
                stage_of: &self.stage_of,
                unidentified: self.unidentified,
            },
            serializer,
        )
    }

    /// A directory with the tables of `snapshot`.
    pub fn restore(snapshot: DirectorySnapshot) -> Self {
        let mut d = Self::default();
        d.by_id.extend(snapshot.by_id);
        d.known.extend(snapshot.known);
        d.stage_of.extend(snapshot.stage_of);
        d.unidentified = snapshot.unidentified;
        d
    }
}

impl Default for JobDirectory {
    fn default() -> Self {
        // As many jobs as the kernel's job table holds.
        Self::new(MAX_JOBS as usize)
    }
}

/// A `job_start` event for `key`, from `pid`.
pub fn job_start_event(key: JobKey, pid: u32, info: JobInfo) -> Event {
    agent_event(EventDetail::JobStart(info), Some(key), pid)
}

/// An event the agent itself produces (job lifecycle, sensor status).
pub fn agent_event(detail: EventDetail, job: Option<JobKey>, pid: u32) -> Event {
    Event {
        time_ns: monotonic_ns(),
        job: job.map(|key| JobRef {
            key,
            ended: false,
            root: true,
        }),
        process: ProcessRef {
            pid,
            tid: pid,
            ppid: 0,
            uid: 0,
            comm: String::new(),
            cgroup_id: 0,
        },
        truncated: false,
        detail,
    }
}

impl JobDirectory {
    pub fn new(capacity: usize) -> Self {
        Self {
            by_id: BoundedMap::new(capacity),
            known: BoundedMap::new(capacity),
            stage_of: BoundedMap::new(capacity),
            unidentified: 0,
        }
    }

    pub fn key_of(&self, id: &str) -> Option<JobKey> {
        self.by_id.get(id).copied()
    }

    pub fn id_of(&self, key: JobKey) -> Option<String> {
        self.known.get(&key).and_then(|k| k.id.clone())
    }

    /// The runner's tracking id of the job's processes, when discovery found one.
    pub fn tracking_id_of(&self, key: JobKey) -> Option<String> {
        self.known.get(&key).and_then(|k| k.tracking_id.clone())
    }

    /// The job a kernel job key belongs to: itself, or the job it is a stage of.
    pub fn job_of_stage(&self, key: JobKey) -> JobKey {
        self.stage_of.get(&key).copied().unwrap_or(key)
    }

    /// Records that `stage` is a stage of `job`.
    pub fn add_stage(&mut self, stage: JobKey, job: JobKey) {
        let job = self.job_of_stage(job);
        if stage != job {
            self.stage_of.insert(stage, job);
        }
    }

    /// Records an identity given by a hook or the control socket.
    pub fn set_explicit(&mut self, key: JobKey, id: &str) {
        if !self.by_id.contains_key(id) {
            self.by_id.insert(id.to_owned(), key);
        }
        let before = self.known.get(&key);
        let known = Known {
            id: Some(id.to_owned()),
            tracking_id: before.and_then(|k| k.tracking_id.clone()),
            explicit: true,
            discovered: before.is_some_and(|k| k.discovered),
            attempts: 0,
            end_requested: before.is_some_and(|k| k.end_requested),
            docker_socket: before.and_then(|k| k.docker_socket.clone()),
        };
        self.known.insert(key, known);
    }

    /// The id a hook or the control socket gave the job, if one did.
    pub fn explicit_id(&self, key: JobKey) -> Option<String> {
        self.known
            .get(&key)
            .filter(|k| k.explicit)
            .and_then(|k| k.id.clone())
    }

    /// The Docker API socket a process of job `key` last connected to.
    pub fn docker_socket(&self, key: JobKey) -> Option<&str> {
        self.known
            .get(&key)
            .and_then(|k| k.docker_socket.as_deref())
    }

    pub fn set_docker_socket(&mut self, key: JobKey, path: &str) {
        let known = self.known.get_or_insert_with(key, Known::default);
        if known.docker_socket.as_deref() != Some(path) {
            known.docker_socket = Some(path.to_owned());
        }
    }

    /// The job's last Docker socket is one the agent cannot reach: no earlier one stands for it.
    pub fn forget_docker_socket(&mut self, key: JobKey) {
        if let Some(known) = self.known.get_mut(&key) {
            known.docker_socket = None;
        }
    }

    /// Was a `job end` for this job carried out already?
    pub fn end_requested(&self, key: JobKey) -> bool {
        self.known.get(&key).is_some_and(|k| k.end_requested)
    }

    pub fn set_end_requested(&mut self, key: JobKey) {
        self.known
            .get_or_insert_with(key, Known::default)
            .end_requested = true;
    }

    /// On the identity values the kernel found in a job root's environment at exec, or on an
    /// exec of a job process when the job's identity is not known yet (then this process's
    /// environment is read from /proc). Returns the `job_start` event to judge (before the exec)
    /// when it was found.
    pub fn discover(&mut self, event: &Event, policy: &Policy) -> Option<Event> {
        let job = event.job.as_ref()?;
        if job.root && matches!(event.detail, EventDetail::Exit { .. }) {
            if let Some(known) = self.known.get(&job.key)
                && known.id.is_none()
                && known.attempts > 0
            {
                self.unidentified += 1;
                tracing::warn!(
                    job = %job.key,
                    attempts = known.attempts,
                    "job root exited before any of its processes' environment could be read: \
                     the job stays unnamed (a hook names it for sure)"
                );
            }
            return None;
        }
        let info = match &event.detail {
            // The kernel copied the identity from the exec that made the job (its root's): no
            // race with the job's processes exiting, and no /proc.
            EventDetail::JobEnv { values } => {
                let known = self.known.get_or_insert_with(job.key, Known::default);
                if known.discovered {
                    return None;
                }
                discovery::identify_values(values, &policy.job_env_vars(), &policy.job_identity)?
            }
            // A job found some other way (executable name, job parent, registered root): the
            // environment of its processes, read from /proc.
            EventDetail::Exec { .. } => {
                let known = self.known.get_or_insert_with(job.key, Known::default);
                if known.discovered || known.attempts >= DISCOVERY_ATTEMPTS {
                    return None;
                }
                known.attempts += 1;
                discovery::identify_process(event.process.pid, &policy.job_identity)?
            }
            _ => return None,
        };
        self.found(job, event, info, policy)
    }

    /// GitLab Runner created a container for the job `info` names, which no process or
    /// container of it revealed before: job `key` (the agent's, with no root process) is that
    /// job from the container's create at `time_ns`. The `job_start` to judge.
    pub fn discover_container_job(
        &mut self,
        key: JobKey,
        time_ns: u64,
        info: JobInfo,
        policy: &Policy,
    ) -> Option<Event> {
        let event = Event {
            time_ns,
            ..agent_event(EventDetail::JobEnd, Some(key), 0)
        };
        let job = event.job.clone()?;
        self.found(&job, &event, info, policy)
    }

    /// A GitLab kubernetes-executor pod's annotations name the job of `event`'s process: the
    /// `job_start` to judge, unless the job is named already (its environment came first).
    pub fn discover_pod(&mut self, event: &Event, info: JobInfo, policy: &Policy) -> Option<Event> {
        let job = event.job.as_ref()?;
        if self.known.get(&job.key).is_some_and(|k| k.discovered) {
            return None;
        }
        self.found(job, event, info, policy)
    }

    /// Discovery found job `job`'s identity at `event`: the `job_start` to judge, unless a hook
    /// named the job already or another job has the id.
    fn found(
        &mut self,
        job: &JobRef,
        event: &Event,
        info: JobInfo,
        policy: &Policy,
    ) -> Option<Event> {
        let known = self.known.get_or_insert_with(job.key, Known::default);
        known.discovered = true;
        known.tracking_id = info.tracking_id.clone();
        if known.explicit {
            // A hook named the job already; discovery only adds the tracking id.
            return None;
        }
        if let Some(other) = self.by_id.get(&info.id).copied()
            && other != job.key
            && !policy.has_stages(info.platform.as_deref())
        {
            // Another job already has this id (a job cannot rename itself into another).
            tracing::warn!(id = ?info.id, job = %job.key, other = %other, "job id already in use; not taken");
            return None;
        }
        let known = self.known.get_or_insert_with(job.key, Known::default);
        known.id = Some(info.id.clone());
        // A later stage of a staged job keeps the id pointing at the first stage's key, which
        // the engine treats as the job.
        match self.by_id.get(&info.id).copied() {
            Some(first) => self.add_stage(job.key, first),
            None => {
                self.by_id.insert(info.id.clone(), job.key);
            }
        }
        // Names from the job's environment are Debug-escaped: `%` would log their bytes raw.
        tracing::info!(job = %job.key, id = ?info.id, repository = ?info.repository, "job identified");
        // The job's start as of the exec that revealed it (its time and process): the pipeline
        // has the engine judge it just before that exec.
        Some(Event {
            time_ns: event.time_ns,
            job: Some(JobRef {
                key: job.key,
                ended: job.ended,
                root: true,
            }),
            process: event.process.clone(),
            truncated: false,
            detail: EventDetail::JobStart(info),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_log;

    #[test]
    fn a_job_named_through_the_socket_keeps_its_name_and_remembers_its_end() {
        let mut directory = JobDirectory::default();
        let key = JobKey(7);
        assert_eq!(directory.explicit_id(key), None);
        assert!(!directory.end_requested(key));
        directory.set_explicit(key, "9001/build");
        assert_eq!(directory.explicit_id(key).as_deref(), Some("9001/build"));
        assert_eq!(directory.key_of("9001/build"), Some(key));
        directory.set_end_requested(key);
        assert!(directory.end_requested(key));
        // Naming it again (as a staged job's later stage does for its own key) keeps the end.
        directory.set_explicit(key, "9001/build");
        assert!(directory.end_requested(key));
        // An end for a job the directory knew nothing about is remembered too.
        directory.set_end_requested(JobKey(8));
        assert!(directory.end_requested(JobKey(8)));
        assert_eq!(directory.explicit_id(JobKey(8)), None);
    }

    #[test]
    fn job_names_from_the_environment_are_logged_escaped() {
        // A real step process whose GitHub variables carry terminal escapes and a forged line.
        let mut step = std::process::Command::new("sleep")
            .arg("10")
            .env_clear()
            .env("GITHUB_RUN_ID", "9\u{1b}]0;pwn\u{7}")
            .env(
                "GITHUB_JOB",
                "build\n2026-01-01T00:00:00Z  INFO forged: job ended",
            )
            .env("GITHUB_REPOSITORY", "acme/\u{1b}[2J\u{9b}31mapp")
            .spawn()
            .expect("spawning sleep");
        let event = Event {
            detail: EventDetail::Exec {
                filename: "/usr/bin/sleep".into(),
                argv: vec![],
                argc: 2,
            },
            job: Some(JobRef {
                key: JobKey(7),
                ended: false,
                root: false,
            }),
            ..agent_event(EventDetail::JobEnd, None, step.id())
        };
        let policy = Policy::builtin();
        let mut directory = JobDirectory::default();
        let mut found = None;
        // spawn() returns once sleep is exec'd: its environment is readable.
        let log = test_log::capture(|| found = directory.discover(&event, &policy));
        let _ = step.kill();
        let _ = step.wait();
        let Some(Event {
            detail: EventDetail::JobStart(info),
            ..
        }) = found
        else {
            panic!("the step's job was not identified: {log}");
        };
        // The event keeps the names exactly; only the log escapes them.
        assert!(
            info.id.starts_with("9\u{1b}]0;pwn\u{7}/build\n"),
            "{info:?}"
        );
        assert!(log.contains("job identified"), "{log}");
        test_log::assert_safe(&log, 1);
        assert!(log.contains(r"\u{1b}]0;pwn\u{7}"), "{log}");
        assert!(log.contains(r"\u{9b}31mapp"), "{log}");
    }
}
