//! Job roots the agent registers (hooks, the control socket, `--job-pid`), and job ends.
//!
//! Registering a root also attributes the processes it already has: the root goes into the
//! kernel's process map first, then its children are read from /proc and added, then theirs. A
//! child forked after its parent was added inherits the job in the kernel; one forked before is
//! in the children list read after the add. So no process of the job is missed.

use std::{
    collections::VecDeque,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::HashMap;
use runner_monitor_common::{
    AGENT_JOB_KEY_BIT, CONTAINER_ID_LEN, JOB_ENDED, JOB_REGISTERED, JobState, PROCESS_JOB_ROOT,
    ProcessJob, map_name,
};

use super::{
    Sensor, SensorError,
    procfs::{children, start_ns},
};
use crate::{clock::monotonic_ns, event::JobKey};

static NEXT_JOB: AtomicU64 = AtomicU64::new(0);

/// `bpf_map_update_elem`'s flag: only when the key has no entry.
pub(super) const BPF_NOEXIST: u64 = 1;

/// A key no kernel-made key and no earlier agent key can equal.
fn new_agent_job_key() -> JobKey {
    let sequence = NEXT_JOB.fetch_add(1, Ordering::Relaxed) & 0xfff;
    JobKey(AGENT_JOB_KEY_BIT | (monotonic_ns() & !0xfff & !AGENT_JOB_KEY_BIT) | sequence)
}

impl Sensor {
    pub(super) fn map_error(name: &'static str) -> impl Fn(aya::maps::MapError) -> SensorError {
        move |source| SensorError::Map { name, source }
    }

    /// Which job a process belongs to, according to the kernel.
    pub fn job_of(&self, pid: u32) -> Option<JobKey> {
        self.processes.get(&pid, 0).ok().map(|p| JobKey(p.job))
    }

    /// Makes `root_pid` the root of a new job, with every process it already has.
    pub fn register_job(&mut self, root_pid: u32) -> Result<JobKey, SensorError> {
        if !std::path::Path::new(&format!("/proc/{root_pid}")).exists() {
            return Err(SensorError::Process {
                pid: root_pid,
                reason: "no such process".into(),
            });
        }
        if let Some(existing) = self.job_of(root_pid) {
            // A process cannot be moved out of its job: that would hide it.
            return Err(SensorError::Process {
                pid: root_pid,
                reason: format!("already belongs to job {existing}"),
            });
        }
        let key = new_agent_job_key();
        let state = JobState {
            root_tgid: root_pid,
            flags: JOB_REGISTERED,
            started_ns: monotonic_ns(),
            ended_ns: 0,
        };
        self.jobs
            .insert(key.0, state, 0)
            .map_err(Self::map_error(map_name::JOBS))?;
        let root = ProcessJob {
            job: key.0,
            ppid: 0,
            flags: PROCESS_JOB_ROOT,
            start_ns: start_ns(root_pid).unwrap_or(0),
        };
        self.processes
            .insert(root_pid, root, 0)
            .map_err(Self::map_error(map_name::PROCESSES))?;
        let mut queue = VecDeque::from([root_pid]);
        while let Some(parent) = queue.pop_front() {
            for child in children(parent) {
                if self.job_of(child).is_some() {
                    continue;
                }
                let entry = ProcessJob {
                    job: key.0,
                    ppid: parent,
                    flags: 0,
                    start_ns: start_ns(child).unwrap_or(0),
                };
                self.processes
                    .insert(child, entry, 0)
                    .map_err(Self::map_error(map_name::PROCESSES))?;
                queue.push_back(child);
            }
        }
        tracing::info!(job = %key, root_pid, "job registered");
        Ok(key)
    }

    /// A key for a new job with no root process (`register_container_job`).
    pub fn new_container_job_key(&self) -> JobKey {
        new_agent_job_key()
    }

    /// Job `key`, with no root process, started at `started_ns`: its processes are those of
    /// the containers registered for it (`request_container`), GitLab's docker executor's. It
    /// ends when the agent ends it (`end_job`).
    pub fn register_container_job(
        &mut self,
        key: JobKey,
        started_ns: u64,
    ) -> Result<(), SensorError> {
        let state = JobState {
            root_tgid: 0,
            flags: JOB_REGISTERED,
            started_ns,
            ended_ns: 0,
        };
        self.jobs
            .insert(key.0, state, 0)
            .map_err(Self::map_error(map_name::JOBS))
    }

    /// Container `id` (64 hex digits) is job `key`'s: the kernel's requested-container map, the
    /// one a job's `POST /containers/<id>/start` fills. The cgroup its runtime makes at its
    /// start is the job's, and so is every process in it (`containers.rs` in the kernel).
    /// Never over an entry already there (false): a job that asked to start the container
    /// keeps it, whatever its labels claim, and a job's request after this one wins in the
    /// kernel too.
    pub fn request_container(&mut self, id: &str, key: JobKey) -> Result<bool, SensorError> {
        let id: [u8; CONTAINER_ID_LEN] = id
            .as_bytes()
            .try_into()
            .ok()
            .filter(|id: &[u8; CONTAINER_ID_LEN]| id.iter().all(u8::is_ascii_hexdigit))
            .ok_or_else(|| SensorError::Container(format!("not a container id: {id:?}")))?;
        // Lowercase, as runtimes name cgroups.
        let id = id.map(|b| b.to_ascii_lowercase());
        let map = self
            .ebpf
            .map_mut(map_name::REQUESTED_CONTAINERS)
            .ok_or(SensorError::MissingMap(map_name::REQUESTED_CONTAINERS))?;
        let mut map: HashMap<_, [u8; CONTAINER_ID_LEN], u64> =
            HashMap::try_from(map).map_err(Self::map_error(map_name::REQUESTED_CONTAINERS))?;
        match map.insert(id, key.0, BPF_NOEXIST) {
            Ok(()) => Ok(true),
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                Ok(false)
            }
            Err(e) => Err(Self::map_error(map_name::REQUESTED_CONTAINERS)(e)),
        }
    }

    /// Marks a job ended: from now on its processes' events say so.
    pub fn end_job(&mut self, key: JobKey) -> Result<(), SensorError> {
        let mut state = self
            .jobs
            .get(&key.0, 0)
            .map_err(|_| SensorError::NoSuchJob(key))?;
        if state.flags & JOB_ENDED == 0 {
            state.flags |= JOB_ENDED;
            state.ended_ns = monotonic_ns();
            self.jobs
                .insert(key.0, state, 0)
                .map_err(Self::map_error(map_name::JOBS))?;
            tracing::info!(job = %key, "job ended");
        }
        Ok(())
    }

    /// The kernel's view of a job.
    pub fn job_state(&self, key: JobKey) -> Option<JobState> {
        self.jobs.get(&key.0, 0).ok()
    }
}
