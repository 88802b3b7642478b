//! Block mode's per-job plans, kept in step with the jobs the engine knows: each job's rules
//! (repository, workflow) decide its mode and allowlist (`Policy::egress_plan`), which the
//! sensor compiles into the kernel's maps. A job the kernel has no plan for yet is judged by the
//! global `[egress]` mode and allowlist.

use runner_monitor::{
    policy::{EgressMode, JobSelector, Policy},
    sensor::{ProbeStatus, egress::missing_enforcement},
};

use super::Agent;

/// Says at start which egress mode is in force, and whether the kernel can enforce it.
pub(super) fn announce(policy: &Policy, probes: &[ProbeStatus]) {
    let blocking_rules = policy
        .rules
        .iter()
        .filter(|r| r.mode == Some(EgressMode::Block))
        .count();
    let missing = missing_enforcement(probes);
    let wants_block = policy.egress.mode == EgressMode::Block || blocking_rules > 0;
    if wants_block && !missing.is_empty() {
        tracing::error!(
            ?missing,
            "egress block mode is configured but its cgroup programs are not attached: \
             connections are reported, not refused"
        );
    }
    tracing::info!(
        mode = policy.egress.mode.as_str(),
        blocking_rules,
        "egress mode"
    );
}

impl Agent {
    /// Brings block mode's plans in step with the engine's jobs when they changed (or when
    /// `egress_seen` was reset: a reload, a control request). A map error is logged: the jobs
    /// keep the plan they had.
    pub(super) fn sync_egress(&mut self) {
        let engine = self.pipeline.engine();
        let changes = engine.job_changes();
        if self.egress_seen == Some(changes) {
            return;
        }
        self.egress_seen = Some(changes);
        let policy = self.pipeline.policy().clone();
        let mut jobs: Vec<_> = engine
            .jobs()
            .map(|(key, info)| {
                let selector = JobSelector {
                    repository: info.repository.as_deref(),
                    workflow: info.workflow.as_deref(),
                };
                (key, policy.egress_plan(selector))
            })
            .collect();
        // A stage (GitLab) has a kernel job key of its own: it gets its job's plan.
        let by_job: std::collections::HashMap<_, _> = jobs.iter().cloned().collect();
        let stages: Vec<_> = engine
            .stages()
            .filter_map(|(stage, job)| Some((stage, by_job.get(&job)?.clone())))
            .collect();
        jobs.extend(stages);
        let egress = self.sensor.egress_mut();
        let current: std::collections::HashSet<_> = jobs.iter().map(|(key, _)| *key).collect();
        let mut gone = egress.planned_jobs();
        gone.retain(|k| !current.contains(k));
        for (key, plan) in &jobs {
            if let Err(error) = egress.set_job(*key, plan) {
                tracing::warn!(job = %key, %error, "egress plan not written: the job keeps its previous one");
            }
        }
        for key in gone {
            if let Err(error) = egress.forget_job(key) {
                tracing::warn!(job = %key, %error, "egress plan not removed");
            }
        }
    }
}
