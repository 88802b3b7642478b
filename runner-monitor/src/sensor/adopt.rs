//! A container registered for a job after its cgroup was made (the agent followed the daemon
//! only after the container started, or registered it too late): the kernel's `cgroup_mkdir`
//! has passed, so the agent maps the cgroup itself and puts the processes already in it into
//! the job. A process forked in it from then on inherits the job at fork, and one that execs in
//! it joins by the cgroup; one forked between the two reads of `cgroup.procs` is in the second.
//! What the container did before is not seen.

use aya::maps::HashMap;
use runner_monitor_common::{PROCESS_CONTAINER, ProcessJob, map_name};

use super::{Sensor, SensorError, procfs::start_ns};
use crate::{
    event::JobKey,
    mounts::{ProcessCgroup, cgroup_of},
};

impl Sensor {
    /// The cgroup of `pid` (a running container's process) is job `key`'s, and so is every
    /// process in it that is no job's yet. Returns the cgroup (its v2 path and id); `None` when
    /// an entry was already there (a job's container): it is kept, and no process joins.
    pub fn adopt_container(
        &mut self,
        pid: u32,
        key: JobKey,
    ) -> Result<Option<(String, u64)>, SensorError> {
        let unreadable = |reason: &str| SensorError::Process {
            pid,
            reason: reason.to_owned(),
        };
        let ProcessCgroup {
            path,
            dir,
            id: cgroup,
        } = cgroup_of(pid).map_err(unreadable)?;
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
        tracing::info!(job = %key, cgroup, joined, "running container adopted into its job");
        Ok(Some((path, cgroup)))
    }
}
