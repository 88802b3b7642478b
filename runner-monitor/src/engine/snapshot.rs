//! The engine's tables as data, so a restarted agent carries on where the last one stopped: jobs
//! and their processes, credentials and who made them, DNS answers, containers, dedup windows and
//! timers.

use std::{net::IpAddr, sync::Arc};

use serde::{Deserialize, Serialize};

use super::{Engine, EngineStats, Job, LedgerEntry, Process};
use crate::{
    event::{ContainerInfo, JobKey},
    policy::Policy,
};

/// Every table of an `Engine`, entries oldest first.
#[derive(Serialize, Deserialize)]
pub struct EngineSnapshot {
    processes: Vec<(u32, Process)>,
    exited: Vec<(u32, Process)>,
    jobs: Vec<(JobKey, Job)>,
    ledger: Vec<(String, LedgerEntry)>,
    fingerprints: Vec<(String, JobKey)>,
    dns: Vec<((JobKey, IpAddr), Vec<String>)>,
    stages: Vec<(JobKey, JobKey)>,
    dedup: Vec<(String, (u64, u64))>,
    /// Jobs' containers by cgroup id (absent in snapshots before 2026-12-05).
    #[serde(default)]
    containers: Vec<(u64, ContainerInfo)>,
    now_ns: u64,
    next_timer_ns: u64,
    stats: EngineStats,
}

/// The same shape, borrowed: writing a snapshot copies nothing.
#[derive(Serialize)]
struct EngineSnapshotRef<'a> {
    processes: &'a crate::bounded::BoundedMap<u32, Process>,
    exited: &'a crate::bounded::BoundedMap<u32, Process>,
    jobs: &'a crate::bounded::BoundedMap<JobKey, Job>,
    ledger: &'a crate::bounded::BoundedMap<String, LedgerEntry>,
    fingerprints: &'a crate::bounded::BoundedMap<String, JobKey>,
    dns: &'a crate::bounded::BoundedMap<(JobKey, IpAddr), Vec<String>>,
    stages: &'a crate::bounded::BoundedMap<JobKey, JobKey>,
    dedup: &'a crate::bounded::BoundedMap<String, (u64, u64)>,
    containers: &'a crate::bounded::BoundedMap<u64, ContainerInfo>,
    now_ns: u64,
    next_timer_ns: u64,
    stats: &'a EngineStats,
}

impl Engine {
    /// Writes the engine's tables (the shape of `EngineSnapshot`) with `serializer`.
    pub fn save<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        EngineSnapshotRef {
            processes: &self.processes,
            exited: &self.exited,
            jobs: &self.jobs,
            ledger: &self.ledger,
            fingerprints: &self.fingerprints,
            dns: &self.dns,
            stages: &self.stages,
            dedup: &self.dedup,
            containers: &self.containers,
            now_ns: self.now_ns,
            next_timer_ns: self.next_timer_ns,
            stats: &self.stats,
        }
        .serialize(serializer)
    }

    /// An engine with `policy` and the tables of `snapshot` (capacities are the policy's: a
    /// table that no longer fits drops its oldest entries, counted as evictions).
    pub fn restore(policy: Arc<Policy>, snapshot: EngineSnapshot) -> Self {
        let mut e = Engine::new(policy);
        e.processes.extend(snapshot.processes);
        e.exited.extend(snapshot.exited);
        e.jobs.extend(snapshot.jobs);
        e.ledger.extend(snapshot.ledger);
        e.fingerprints.extend(snapshot.fingerprints);
        e.dns.extend(snapshot.dns);
        e.stages.extend(snapshot.stages);
        e.dedup.extend(snapshot.dedup);
        e.containers.extend(snapshot.containers);
        e.now_ns = snapshot.now_ns;
        e.next_timer_ns = snapshot.next_timer_ns;
        e.stats = snapshot.stats;
        e
    }
}
