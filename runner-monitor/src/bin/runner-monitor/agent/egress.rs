//! Block mode's per-job plans, kept in step with the jobs the engine knows: each job's rules
//! (repository, workflow) decide its mode and allowlist (`Policy::egress_plan`), which the
//! sensor compiles into the kernel's maps. A job the kernel has no plan for yet is judged by the
//! global `[egress]` mode and allowlist.

use std::net::SocketAddr;

use runner_monitor::{
    policy::{JobSelector, Policy},
    sensor::{
        ProbeStatus, Sensor,
        dns_netns::NetnsResolvers,
        egress::missing_enforcement,
        resolver::{self, Upstream},
    },
};

use super::Agent;

/// Says at start which egress mode is in force, and whether the kernel can enforce it.
pub(super) fn announce(policy: &Policy, probes: &[ProbeStatus]) {
    let blocking_rules = policy.blocking_rules();
    let missing = missing_enforcement(probes, policy);
    if policy.wants_block() && !missing.is_empty() {
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

/// `[egress] dns_upstream`, else the nameservers of /etc/resolv.conf as the agent sees them.
fn upstream_of(policy: &Policy) -> Vec<SocketAddr> {
    if !policy.egress.dns_upstream.is_empty() {
        return policy.egress.dns_upstream.clone();
    }
    std::fs::read_to_string("/etc/resolv.conf")
        .map(|conf| resolver::nameservers(&conf))
        .unwrap_or_default()
}

/// Starts block mode's DNS resolver and points the kernel's redirect at it. Without it, job
/// processes in block mode reach only the DNS servers their allowlist admits by address, and
/// names in allowlists admit nothing.
pub(super) async fn start_resolver(policy: &Policy, sensor: &mut Sensor) -> Option<Upstream> {
    let upstream = upstream_of(policy);
    if upstream.is_empty() {
        tracing::warn!(
            "no DNS upstream (no [egress] dns_upstream, no nameserver in /etc/resolv.conf): \
             job DNS in block mode is not redirected"
        );
    }
    let lists = sensor.egress().allowlists();
    let started = match resolver::start(lists, upstream.clone()).await {
        Ok(started) => started,
        Err(error) => {
            tracing::error!(%error, "block mode's DNS resolver did not start: job DNS is not redirected");
            return None;
        }
    };
    if let Some(error) = &started.no_v6 {
        tracing::warn!(%error, "block mode's DNS resolver not on [::1]: unconnected IPv6 sends to \
            port 53 (musl's resolver with an IPv6 nameserver) are judged by address, not \
            redirected");
    }
    let v6 = started.no_v6.is_none();
    if let Err(error) = sensor.set_dns_resolver(started.port, started.netns_cookie, v6) {
        tracing::error!(%error, "block mode's DNS redirect not set: job DNS is not redirected");
        return None;
    }
    tracing::info!(
        port = started.port,
        ?upstream,
        v6,
        "block mode's DNS resolver on 127.0.0.1 (and [::1] when v6)"
    );
    // Job processes in network namespaces of their own (containers, `ip netns exec`).
    let in_namespaces = sensor
        .dns_netns_maps()
        .ok_or_else(|| std::io::Error::other("no namespace maps"))
        .and_then(|maps| NetnsResolvers::new(maps, started.service.clone(), started.port));
    match in_namespaces {
        Ok(resolvers) => {
            if let Err(error) = resolvers.spawn() {
                tracing::warn!(%error, "block mode's DNS resolver serves the agent's network \
                    namespace only");
            }
        }
        Err(error) => {
            tracing::warn!(%error, "block mode's DNS resolver serves the agent's network \
            namespace only: job processes in other namespaces reach DNS servers their allowlist \
            admits by address")
        }
    }
    Some(started.service.upstream)
}

impl Agent {
    /// A reloaded policy's upstream for the resolver.
    pub(super) fn set_dns_upstream(&mut self, policy: &Policy) {
        if let Some(upstream) = &self.dns_upstream {
            *upstream
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = upstream_of(policy);
        }
    }

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
