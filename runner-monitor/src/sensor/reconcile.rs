//! After a restart: the pinned process map against /proc.
//!
//! While no agent ran, no probe did either: processes of jobs exited without the map hearing of
//! it, and forked without their children being added. `Sensor::reconcile` brings the map back to
//! the truth: dead entries (and entries whose pid a later process reused) go, a dead job root ends
//! its job, and children of job processes born meanwhile join their parent's job. What it changed
//! is returned, for the engine to hear as exits and forks.

use std::collections::VecDeque;

use runner_monitor_common::{JOB_ENDED, PROCESS_JOB_ROOT, ProcessJob, map_name};

use super::{
    Sensor, SensorError,
    procfs::{children, same_process, start_ns},
};
use crate::{
    clock::monotonic_ns,
    event::{Event, EventDetail, JobKey, JobRef, ProcessRef},
};

/// What `reconcile` changed.
#[derive(Debug, Default)]
pub struct Reconciled {
    /// Processes that exited (or whose pid was reused) while the agent was down.
    pub exited: Vec<(u32, ProcessJob)>,
    /// Children born while the agent was down: (child, parent, job).
    pub adopted: Vec<(u32, u32, JobKey)>,
    /// Jobs whose root exited while the agent was down, now marked ended.
    pub ended: Vec<JobKey>,
}

impl Reconciled {
    /// What changed, as the events the probes would have sent: forks of the adopted children,
    /// then exits of the dead (a root's exit ends its job in the engine).
    pub fn events(&self, sensor: &Sensor) -> Vec<Event> {
        let now = monotonic_ns();
        let job_ref = |key: JobKey, root: bool| JobRef {
            key,
            ended: sensor
                .job_state(key)
                .is_some_and(|s| s.flags & JOB_ENDED != 0),
            root,
        };
        let process = |pid: u32, ppid: u32| ProcessRef {
            pid,
            tid: pid,
            ppid,
            uid: 0,
            comm: String::new(),
            cgroup_id: 0,
        };
        let forks = self.adopted.iter().map(|&(child, parent, job)| Event {
            time_ns: now,
            job: Some(job_ref(job, false)),
            process: process(parent, 0),
            truncated: false,
            detail: EventDetail::Fork { child_pid: child },
        });
        let exits = self.exited.iter().map(|(pid, entry)| Event {
            time_ns: now,
            job: Some(job_ref(
                JobKey(entry.job),
                entry.flags & PROCESS_JOB_ROOT != 0,
            )),
            process: process(*pid, entry.ppid),
            truncated: false,
            detail: EventDetail::Exit {
                exit_code: None,
                signal: None,
            },
        });
        forks.chain(exits).collect()
    }
}

impl Sensor {
    /// Brings the kernel's process and job maps in line with /proc (see the module docs).
    pub fn reconcile(&mut self) -> Result<Reconciled, SensorError> {
        let map_error = |name| move |source| SensorError::Map { name, source };
        let entries: Vec<(u32, ProcessJob)> =
            self.processes.iter().filter_map(Result::ok).collect();
        let mut out = Reconciled::default();
        let mut alive = Vec::new();
        for (pid, entry) in entries {
            if same_process(pid, entry.start_ns) {
                alive.push((pid, entry));
                continue;
            }
            let _ = self.processes.remove(&pid);
            if entry.flags & PROCESS_JOB_ROOT != 0
                && let Ok(mut state) = self.jobs.get(&entry.job, 0)
                && state.flags & JOB_ENDED == 0
            {
                state.flags |= JOB_ENDED;
                state.ended_ns = monotonic_ns();
                self.jobs
                    .insert(entry.job, state, 0)
                    .map_err(map_error(map_name::JOBS))?;
                out.ended.push(JobKey(entry.job));
            }
            out.exited.push((pid, entry));
        }
        let mut queue: VecDeque<(u32, u64)> = alive.iter().map(|(p, e)| (*p, e.job)).collect();
        while let Some((parent, job)) = queue.pop_front() {
            for child in children(parent) {
                if self.processes.get(&child, 0).is_ok() {
                    continue;
                }
                let entry = ProcessJob {
                    job,
                    ppid: parent,
                    flags: 0,
                    start_ns: start_ns(child).unwrap_or(0),
                };
                self.processes
                    .insert(child, entry, 0)
                    .map_err(map_error(map_name::PROCESSES))?;
                out.adopted.push((child, parent, JobKey(job)));
                queue.push_back((child, job));
            }
        }
        Ok(out)
    }
}
