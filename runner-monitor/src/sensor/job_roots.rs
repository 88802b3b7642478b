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

use runner_monitor_common::{
    AGENT_JOB_KEY_BIT, JOB_ENDED, JOB_REGISTERED, JobState, PROCESS_JOB_ROOT, ProcessJob, map_name,
};

use super::{
    Sensor, SensorError,
    procfs::{children, start_ns},
};
use crate::{clock::monotonic_ns, event::JobKey};

static NEXT_JOB: AtomicU64 = AtomicU64::new(0);

/// A key no kernel-made key and no earlier agent key can equal.
fn new_agent_job_key() -> JobKey {
    let sequence = NEXT_JOB.fetch_add(1, Ordering::Relaxed) & 0xfff;
    JobKey(AGENT_JOB_KEY_BIT | (monotonic_ns() & !0xfff & !AGENT_JOB_KEY_BIT) | sequence)
}

impl Sensor {
    fn map_error(name: &'static str) -> impl Fn(aya::maps::MapError) -> SensorError {
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
