//! A container registered for a job after its cgroup was made (the agent followed the daemon
//! only after the container started, or the runner's start beat the registration): the
//! kernel's `cgroup_mkdir` has passed without the job's entry, so the agent maps the cgroup
//! itself and puts the processes already in it into the job. A process forked in it from then
//! on inherits the job at fork, and one that execs in it joins by the cgroup; one forked
//! between the two reads of `cgroup.procs` is in the second. What the container did before is
//! not seen.

use aya::maps::HashMap;
use runner_monitor_common::{PROCESS_CONTAINER, ProcessJob, map_name};

use super::{Sensor, SensorError, procfs::start_ns};
use crate::{
    cgroups::{ProcessCgroup, container_cgroup},
    event::JobKey,
};

/// What registering a container for a job did (`Sensor::claim_container`).
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// An entry was there already (a job's start request, or an earlier registration): kept.
    Kept,
    /// The kernel makes the container's cgroup the job's when the runtime makes it (or made it
    /// after the entry was written).
    Requested,
    /// Its cgroup was there already, made without the entry: mapped here, its processes taken
    /// in. Its v2 path and cgroup id.
    Adopted { path: String, cgroup: u64 },
}

impl Sensor {
    /// Container `id` (64 hex digits) is job `key`'s: its entry in the requested-container
    /// map, which the kernel's `cgroup_mkdir` reads, then its cgroup if it is there already
    /// (looked for after the entry, so a cgroup made in between was mapped by the kernel and is
    /// found mapped). An adoption that fails leaves the entry (`Requested`), with a warning.
    pub fn claim_container(&mut self, id: &str, key: JobKey) -> Result<Claim, SensorError> {
        if !self.request_container(id, key)? {
            return Ok(Claim::Kept);
        }
        let Some(cgroup) = container_cgroup(id) else {
            return Ok(Claim::Requested);
        };
        Ok(match self.adopt_cgroup(cgroup, key) {
            Ok(Some((path, cgroup))) => Claim::Adopted { path, cgroup },
            Ok(None) => Claim::Requested,
            Err(error) => {
                tracing::warn!(container = id, %error, "container's cgroup not adopted");
                Claim::Requested
            }
        })
    }

    /// `cgroup` (a container's) is job `key`'s, and so is every process in it that is no job's
    /// yet. Returns the cgroup (its v2 path and id); `None` when an entry was already there (a
    /// job's container): it is kept, and no process joins.
    fn adopt_cgroup(
        &mut self,
        ProcessCgroup {
            path,
            dir,
            id: cgroup,
        }: ProcessCgroup,
        key: JobKey,
    ) -> Result<Option<(String, u64)>, SensorError> {
        let map = self
            .ebpf
            .map_mut(map_name::CONTAINER_CGROUPS)
            .ok_or(SensorError::MissingMap(map_name::CONTAINER_CGROUPS))?;
        let mut cgroups: HashMap<_, u64, u64> =
            HashMap::try_from(map).map_err(Self::map_error(map_name::CONTAINER_CGROUPS))?;
        match cgroups.insert(cgroup, key.0, super::job_roots::BPF_NOEXIST) {
            Ok(()) => {}
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(Self::map_error(map_name::CONTAINER_CGROUPS)(e)),
        }
        let mut joined = 0;
        for _ in 0..2 {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            for member in procs
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
            {
                if self.job_of(member).is_some() {
                    continue;
                }
                let entry = ProcessJob {
                    job: key.0,
                    ppid: 0,
                    flags: PROCESS_CONTAINER,
                    start_ns: start_ns(member).unwrap_or(0),
                };
                self.processes
                    .insert(member, entry, 0)
                    .map_err(Self::map_error(map_name::PROCESSES))?;
                joined += 1;
            }
        }
        tracing::info!(job = %key, cgroup, joined,
            "container adopted into its job (its cgroup was made before its registration)");
        Ok(Some((path, cgroup)))
    }
}
