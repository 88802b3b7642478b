//! Staged jobs (GitLab): several process trees (stages) sharing one job id are one job, which
//! waits `stage_gap_seconds` after a stage's root exits for the next stage. While it waits, what
//! its surviving processes do is held: if no stage follows, the job ended at its last stage's
//! exit and that was after the end (`detect::judge_gap`); if one does, it was inside the job.

use super::{Engine, MAX_GAP_EVENTS, detect};
use crate::event::{Event, JobKey};

impl Engine {
    /// An event of a staged job waiting for its next stage, of a kind an ended job is judged
    /// for, is kept: if no stage follows, the job ended before it (see `detect::timers`).
    pub(super) fn hold_if_in_stage_gap(&mut self, event: &Event) {
        let Some(key) = event.job.as_ref().map(|j| j.key) else {
            return;
        };
        let waiting = self
            .jobs
            .get(&key)
            .is_some_and(|j| j.ended_ns.is_none() && j.last_stage_exit.is_some());
        if waiting
            && detect::judged_after_end(self, event)
            && let Some(job) = self.jobs.get_mut(&key)
            && job.gap.len() < MAX_GAP_EVENTS
        {
            job.gap.push(event.clone());
        }
    }

    /// An event of a stage, as an event of the job it is a stage of; for a staged job, "ended"
    /// is the engine's view (the kernel ends each stage when its root exits).
    pub(super) fn as_stage_of_its_job(&self, event: &Event) -> Option<Event> {
        let key = event.job.as_ref()?.key;
        let job_key = self.stages.get(&key).copied().unwrap_or(key);
        let job = self.jobs.get(&job_key)?;
        if !job.staged {
            return None;
        }
        let mut e = event.clone();
        if let Some(j) = &mut e.job {
            j.key = job_key;
            j.ended = job.ended_ns.is_some();
        }
        Some(e)
    }

    /// Makes job `stage` a stage of `job`: its processes move over, and the job goes on.
    pub(super) fn join_stage(&mut self, stage: JobKey, job: JobKey) {
        self.stages.insert(stage, job);
        if self.jobs.remove(&stage).is_some() {
            // It was counted as a job of its own until now.
            self.stats.jobs_started -= 1;
        }
        for pid in self.pids_of(stage) {
            if let Some(p) = self.processes.get_mut(&pid) {
                p.job = Some(job);
            }
        }
        // The job goes on: what its processes did while it waited was inside it.
        if let Some(j) = self.jobs.get_mut(&job) {
            j.last_stage_exit = None;
            j.gap.clear();
        }
    }
}
