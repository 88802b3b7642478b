//! The containers that were running before the agent started: the kernel learns every
//! container cgroup made while its programs run (`cgroup_mkdir`), and the agent adds the ones
//! already there, so that a job's `docker exec` by the full id into a long-running container
//! (a host service's, a job's from before a restart) finds its cgroup
//! (`runner-monitor-ebpf/src/containers.rs`).

use aya::maps::HashMap;
use runner_monitor_common::{CONTAINER_ID_LEN, map_name};

use super::{Sensor, SensorError};
use crate::cgroups::container_cgroups;

impl Sensor {
    /// Puts the containers running now into the kernel's map of container ids; how many.
    pub fn learn_container_ids(&mut self) -> Result<usize, SensorError> {
        let map = self
            .ebpf
            .map_mut(map_name::CONTAINER_IDS)
            .ok_or(SensorError::MissingMap(map_name::CONTAINER_IDS))?;
        let mut ids: HashMap<_, [u8; CONTAINER_ID_LEN], u64> =
            HashMap::try_from(map).map_err(Self::map_error(map_name::CONTAINER_IDS))?;
        let found = container_cgroups();
        for (id, cgroup) in &found {
            ids.insert(id, cgroup, 0)
                .map_err(Self::map_error(map_name::CONTAINER_IDS))?;
        }
        Ok(found.len())
    }
}
