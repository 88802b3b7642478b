//! Staged jobs (GitLab) in the reports: a stage's `job_start` joins the running job of its id.

use super::{JobReports, MAX_PROCESSES};
use crate::event::{JobInfo, JobKey};

impl JobReports {
    /// A `job_start` naming another stage of a running staged job: its events go to that job.
    pub(super) fn joins_a_stage(&mut self, key: JobKey, info: &JobInfo) -> bool {
        if !self.policy.has_stages(info.platform.as_deref()) {
            return false;
        }
        let running = self
            .jobs
            .iter()
            .find(|(k, r)| {
                **k != key
                    && r.report.end_ns.is_none()
                    && r.report.job.id == info.id
                    && r.report.job.platform == info.platform
            })
            .map(|(k, _)| *k);
        let Some(job) = running else { return false };
        self.stages.insert(key, job);
        // Whatever the stage recorded before it was named moves over.
        if let Some(stage) = self.jobs.remove(&key)
            && let Some(record) = self.jobs.get_mut(&job)
        {
            for p in stage.report.processes {
                if record.process_at.contains_key(&p.pid) {
                    continue;
                }
                if record.report.processes.len() < MAX_PROCESSES {
                    record
                        .process_at
                        .insert(p.pid, record.report.processes.len());
                    record.report.processes.push(p);
                }
            }
        }
        true
    }
}
