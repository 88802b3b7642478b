//! Handles of their own on kernel maps, for writers outside the sensor (cloned descriptors; the
//! sensor keeps its own): the workflow pods' container cgroups (`enrich/workflow_pods.rs`) and
//! a job's start by name (`enrich/name_starts.rs`), whose container's id, resolved at the
//! daemon, goes into the kernel's requested-container map while the kernel's pending start is
//! freed so that no other container's cgroup takes it.

use aya::maps::{Array, HashMap, Map, MapData};
use runner_monitor_common::{
    CONTAINER_ID_LEN, ExecTarget, OpenBuild, PendingStart, container::EXEC_WINDOW_NS, map_name,
};

use super::{Sensor, job_roots::BPF_NOEXIST};
use crate::{clock::monotonic_ns, event::JobKey};

/// What a job asked the daemon to do with a container it named by name or short id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Asked {
    /// Start it: the kernel's pending start `slot`, made at `pending_ns`.
    Start { slot: u32, pending_ns: u64 },
    /// Run a command in it (`docker exec`), asked at `requested_ns` (the kernel's clock).
    Exec { requested_ns: u64 },
    /// Start it, in a request the kernel did not read where it was sent (found in the job's API
    /// stream; sent at `found_ns`): no pending start.
    Found { found_ns: u64 },
}

/// Own handles on the kernel maps a resolved start or exec by name writes.
pub struct NameStartMaps {
    requested: HashMap<MapData, [u8; CONTAINER_ID_LEN], u64>,
    pending: Array<MapData, PendingStart>,
    /// Container id -> cgroup id, cgroup id -> job, and cgroup id -> pending exec
    /// (`containers.rs`).
    ids: HashMap<MapData, [u8; CONTAINER_ID_LEN], u64>,
    cgroups: HashMap<MapData, u64, u64>,
    exec_targets: HashMap<MapData, u64, ExecTarget>,
}

/// A handle of its own on map `name` (a cloned descriptor): the sensor keeps its own.
fn own(sensor: &Sensor, name: &str) -> Option<Map> {
    use std::os::fd::AsFd as _;
    let map = sensor.ebpf.map(name)?;
    let data = match map {
        Map::HashMap(d) | Map::LruHashMap(d) | Map::Array(d) => d,
        _ => return None,
    };
    let fd = data.fd().as_fd().try_clone_to_owned().ok()?;
    let own = MapData::from_fd(fd).ok()?;
    Some(match map {
        Map::Array(_) => Map::Array(own),
        Map::HashMap(_) => Map::HashMap(own),
        _ => Map::LruHashMap(own),
    })
}

impl Sensor {
    /// The kernel's map of job container cgroups (cgroup id -> job): a process that execs in
    /// such a cgroup joins the job (`runner-monitor-ebpf/src/containers.rs`).
    pub fn container_cgroups_handle(&self) -> Option<HashMap<MapData, u64, u64>> {
        HashMap::try_from(own(self, map_name::CONTAINER_CGROUPS)?).ok()
    }

    /// An own handle on the settings map, for the event reader (`reader.rs`) and the heartbeat.
    pub fn settings_handle(&self) -> Option<Array<MapData, u32>> {
        use std::os::fd::AsFd as _;
        let map = aya::maps::IterableMap::map(&self.settings);
        let fd = map.fd().as_fd().try_clone_to_owned().ok()?;
        Array::try_from(Map::Array(MapData::from_fd(fd).ok()?)).ok()
    }

    /// The kernel's open builds (`runner-monitor-ebpf/src/builds.rs`), for the agent that keeps
    /// them true to their connections.
    pub fn build_slots(&self) -> Option<BuildSlotsMap> {
        Array::try_from(own(self, map_name::BUILDS)?)
            .ok()
            .map(BuildSlotsMap)
    }

    /// The network namespaces block mode's resolver listens in, and the processes whose
    /// namespace it should check (`dns_netns.rs`); `None` when the programs lack the maps.
    /// The ring is taken: one caller gets it.
    pub fn dns_netns_maps(&mut self) -> Option<super::dns_netns::DnsNetnsMaps> {
        Some(super::dns_netns::DnsNetnsMaps {
            served: self.dns_netns_served()?,
            wanted: aya::maps::RingBuf::try_from(self.ebpf.take_map(map_name::DNS_NETNS_WANTED)?)
                .ok()?,
        })
    }

    /// The network namespaces block mode's resolver listens in (`DNS_NETNS`).
    pub(super) fn dns_netns_served(&self) -> Option<HashMap<MapData, u64, u32>> {
        HashMap::try_from(own(self, map_name::DNS_NETNS)?).ok()
    }

    /// Handles for resolving starts by name; `None` when the programs lack the maps.
    pub fn name_start_maps(&self) -> Option<NameStartMaps> {
        Some(NameStartMaps {
            requested: HashMap::try_from(own(self, map_name::REQUESTED_CONTAINERS)?).ok()?,
            pending: Array::try_from(own(self, map_name::PENDING_STARTS)?).ok()?,
            ids: HashMap::try_from(own(self, map_name::CONTAINER_IDS)?).ok()?,
            cgroups: HashMap::try_from(own(self, map_name::CONTAINER_CGROUPS)?).ok()?,
            exec_targets: HashMap::try_from(own(self, map_name::EXEC_TARGETS)?).ok()?,
        })
    }
}

impl NameStartMaps {
    /// What job `key` asked of container `id`, resolved at its daemon, written for the kernel
    /// (`enrich::NameStartRegister`).
    pub fn register(&mut self, id: &str, key: JobKey, asked: Asked) -> Result<bool, String> {
        let id: [u8; CONTAINER_ID_LEN] = id
            .as_bytes()
            .try_into()
            .map_err(|_| format!("not a container id: {id:?}"))?;
        let id = id.map(|b| b.to_ascii_lowercase());
        match asked {
            Asked::Start { slot, pending_ns } => self.start(id, key, slot, pending_ns),
            Asked::Exec { requested_ns } => self.exec(id, key, requested_ns),
            Asked::Found { .. } => self.found(id, key),
        }
    }

    /// Container `id` is job `key`'s, and the kernel's pending start `slot` (made at
    /// `pending_ns`) is freed: `Ok(true)`. When the start is no longer pending, a cgroup took it
    /// first by the kernel's first-in first-out guess: if the kernel knows container `id`
    /// (its cgroup was made), that was it, and the guess stands: `Ok(false)`, nothing written.
    /// If not, another container's cgroup took the start (one made by anyone between the job's
    /// request and its own): `id` is registered as the job's as a start by id would, so its
    /// cgroup is the job's when the runtime makes it: `Ok(true)`.
    fn start(
        &mut self,
        id: [u8; CONTAINER_ID_LEN],
        key: JobKey,
        slot: u32,
        pending_ns: u64,
    ) -> Result<bool, String> {
        let still = |p: &PendingStart| p.job == key.0 && p.ts_ns == pending_ns;
        let start = self.pending.get(&slot, 0).map_err(|e| e.to_string())?;
        let taken = !still(&start);
        if taken && self.known(&id)?.is_some() {
            return Ok(false);
        }
        // A job's own start by id of the same container keeps it (BPF_NOEXIST semantics are
        // not needed: the entry would name the same job or an earlier request).
        self.request(id, key)?;
        if taken {
            // The cgroup may have been made between the look-up and the entry: it took the
            // entry (and is the job's) unless it came before it.
            if let Some(cgroup) = self.known(&id)?
                && self.cgroups.get(&cgroup, 0).ok() != Some(key.0)
            {
                tracing::warn!(
                    container = %String::from_utf8_lossy(&id),
                    "a container started by name was made while the agent registered it after \
                     another took its start: it is not the job's"
                );
            }
            return Ok(true);
        }
        // Freed only if it is still this start (a cgroup may have taken it meanwhile).
        let now = self.pending.get(&slot, 0).map_err(|e| e.to_string())?;
        if still(&now) {
            let freed = PendingStart { job: 0, ..now };
            self.pending
                .set(slot, freed, 0)
                .map_err(|e| e.to_string())?;
        }
        Ok(true)
    }

    /// Container `id` is job `key`'s, as a start by id the kernel read would make it:
    /// `Ok(true)`; `Ok(false)` when its cgroup was made already (it is not the job's).
    fn found(&mut self, id: [u8; CONTAINER_ID_LEN], key: JobKey) -> Result<bool, String> {
        if let Some(cgroup) = self.known(&id)? {
            return Ok(self.cgroups.get(&cgroup, 0).ok() == Some(key.0));
        }
        self.request(id, key)?;
        Ok(true)
    }

    /// Container `id` is job `key`'s in the kernel's requested-container map, unless an entry
    /// is there already (the same job's, or an earlier request).
    fn request(&mut self, id: [u8; CONTAINER_ID_LEN], key: JobKey) -> Result<(), String> {
        match self.requested.insert(id, key.0, BPF_NOEXIST) {
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                Ok(())
            }
            other => other.map_err(|e| e.to_string()),
        }
    }

    /// The cgroup of container `id`, when the kernel knows it: it was made (`CONTAINER_IDS`).
    fn known(&self, id: &[u8; CONTAINER_ID_LEN]) -> Result<Option<u64>, String> {
        match self.ids.get(id, 0) {
            Ok(cgroup) => Ok(Some(cgroup)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    /// The next runc init in container `id`'s cgroup is job `key`'s (its `docker exec`), as the
    /// kernel marks it for a request by the full id: `Ok(false)` when the kernel does not know
    /// the container's cgroup.
    fn exec(
        &mut self,
        id: [u8; CONTAINER_ID_LEN],
        key: JobKey,
        requested_ns: u64,
    ) -> Result<bool, String> {
        // Past its window the request's command has run or will not: a mark now would wait
        // for someone else's.
        if monotonic_ns().saturating_sub(requested_ns) > EXEC_WINDOW_NS {
            return Ok(false);
        }
        let cgroup = match self.ids.get(&id, 0) {
            Ok(cgroup) => cgroup,
            Err(aya::maps::MapError::KeyNotFound) => return Ok(false),
            Err(e) => return Err(e.to_string()),
        };
        let current = self.exec_targets.get(&cgroup, 0).ok();
        let target = ExecTarget::after_request(current.as_ref(), key.0, requested_ns, &id);
        self.exec_targets
            .insert(cgroup, target, 0)
            .map_err(|e| e.to_string())?;
        Ok(true)
    }
}

/// Own handle on the kernel's build slots (`enrich/builds.rs` reads and writes them).
pub struct BuildSlotsMap(Array<MapData, OpenBuild>);

impl BuildSlotsMap {
    pub fn get(&self, slot: u32) -> Result<OpenBuild, String> {
        self.0.get(&slot, 0).map_err(|e| e.to_string())
    }

    pub fn set(&mut self, slot: u32, build: OpenBuild) -> Result<(), String> {
        self.0.set(slot, build, 0).map_err(|e| e.to_string())
    }
}
